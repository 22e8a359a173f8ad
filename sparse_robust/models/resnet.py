"""CIFAR ResNet (He et al. 2016) with BasicBlocks; ResNet-18 is stage sizes (2, 2, 2, 2)."""

from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from sparse_robust.models.base import Classifier, batch_norm, conv_before_bn, require_images


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers and a residual connection (a 1x1 conv + BN projection when the shape
    changes). `inner_width`: conv_1's filters (default `width`; `pruning.compact` sets fewer).
    """

    width: int
    strides: int = 1
    conv_impl: str = "auto"
    inner_width: Optional[int] = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        strides = (self.strides, self.strides)
        inner = self.width if self.inner_width is None else self.inner_width
        y = conv_before_bn(inner, (3, 3), strides, padding=1, conv_impl=self.conv_impl,
                           name="conv_1")(x)
        y = nn.relu(batch_norm(train, "bn_1")(y))
        y = conv_before_bn(self.width, (3, 3), padding=1, conv_impl=self.conv_impl,
                           name="conv_2")(y)
        y = batch_norm(train, "bn_2")(y)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.width:
            projection = conv_before_bn(self.width, (1, 1), strides, padding="VALID",
                                        conv_impl=self.conv_impl, name="shortcut_conv")
            shortcut = batch_norm(train, "shortcut_bn")(projection(x))
        return nn.relu(y + shortcut)


class ResNet(Classifier):
    """CIFAR ResNet: 3x3 stem (no max-pool), BasicBlock stages of widths 64, 128, 256, 512
    (stride 2 from the second stage on), global average pool, `output` Dense.

    Layers are named `stem_conv`, `stem_bn`, `block_{stage}_{block}/...` (1-based) and `output`.
    Defaults give ResNet-18. `inner_widths` (per stage, per block; absolute, not scaled): each
    block's conv_1 filters, for `pruning.compact`'s smaller networks; None: the block's width.
    """

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    inner_widths: Optional[Sequence[Sequence[int]]] = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        require_images(x, type(self).__name__)
        x = conv_before_bn(self.scaled(64), (3, 3), padding=1, conv_impl=self.conv_impl,
                           name="stem_conv")(x)
        x = nn.relu(batch_norm(train, "stem_bn")(x))
        for stage, num_blocks in enumerate(self.stage_sizes):
            width = self.scaled(64 * 2**stage)
            for block in range(num_blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                inner = None if self.inner_widths is None else self.inner_widths[stage][block]
                x = BasicBlock(width, strides, self.conv_impl, inner,
                               name=f"block_{stage + 1}_{block + 1}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="output")(x)
