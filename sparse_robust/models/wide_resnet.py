"""Wide ResNet (Zagoruyko & Komodakis 2016) with pre-activation blocks, e.g. WRN-28-10."""

from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from sparse_robust.checks import check_positive_int
from sparse_robust.models.base import Classifier, batch_norm, conv_before_bn, require_images


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 with an identity shortcut, or, when the shape changes, a 1x1
    conv of the pre-activated input (as in the authors' implementation). `inner_width`: conv_1's
    filters (default `width`; `pruning.compact` sets fewer).
    """

    width: int
    strides: int = 1
    conv_impl: str = "auto"
    inner_width: Optional[int] = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        strides = (self.strides, self.strides)
        activated = nn.relu(batch_norm(train, "bn_1")(x))
        inner = self.width if self.inner_width is None else self.inner_width
        y = conv_before_bn(inner, (3, 3), strides, padding=1, conv_impl=self.conv_impl,
                           name="conv_1")(activated)
        y = nn.relu(batch_norm(train, "bn_2")(y))
        y = conv_before_bn(self.width, (3, 3), padding=1, conv_impl=self.conv_impl,
                           name="conv_2")(y)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.width:
            projection = conv_before_bn(self.width, (1, 1), strides, padding="VALID",
                                        conv_impl=self.conv_impl, name="shortcut_conv")
            shortcut = projection(activated)
        return y + shortcut


class WideResNet(Classifier):
    """WRN-`depth`-`widen_factor`: 3x3 stem of 16, three groups of (depth - 4) / 6 pre-activation
    blocks of widths 16k, 32k, 64k (strides 1, 2, 2), BN-ReLU, global average pool, `output` Dense.

    Layers are named `stem_conv`, `block_{group}_{block}/...` (1-based), `final_bn` and `output`.
    `inner_widths` (per group, per block; absolute, not scaled): each block's conv_1 filters, for
    `pruning.compact`'s smaller networks; None: the block's width.
    """

    depth: int = 28
    widen_factor: int = 10
    inner_widths: Optional[Sequence[Sequence[int]]] = None

    def __post_init__(self):
        check_positive_int("widen_factor", self.widen_factor)
        check_positive_int("depth", self.depth)
        if self.depth < 10 or (self.depth - 4) % 6:
            raise ValueError(
                f"depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {self.depth!r}."
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        require_images(x, type(self).__name__)
        blocks_per_group = (self.depth - 4) // 6
        x = conv_before_bn(self.scaled(16), (3, 3), padding=1, conv_impl=self.conv_impl,
                           name="stem_conv")(x)
        for group in range(3):
            width = self.scaled(16 * 2**group * self.widen_factor)
            for block in range(blocks_per_group):
                strides = 2 if group > 0 and block == 0 else 1
                inner = None if self.inner_widths is None else self.inner_widths[group][block]
                x = PreActBlock(width, strides, self.conv_impl, inner,
                                name=f"block_{group + 1}_{block + 1}")(x, train)
        x = nn.relu(batch_norm(train, "final_bn")(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="output")(x)
