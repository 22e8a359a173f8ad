"""CIFAR-style VGG with batch norm (VGG-16: 13 convs and a single linear classifier)."""

from typing import Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from sparse_robust.models.base import Classifier, batch_norm, conv_before_bn, require_images
from sparse_robust.models.pooling import max_pool

# Conv widths, with "M" for a 2x2 max-pool.
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(Classifier):
    """3x3 conv + BN + ReLU layers with max-pools, global average pool, then the `output` Dense.

    Layers are named `conv_i` / `bn_i` (i counts convs) and `output`. Pools pad 'SAME' so that
    28x28 inputs work as well as 32x32 ones (both reach 1x1 after five pools).
    """

    layers: Sequence[Union[int, str]] = VGG16_LAYERS

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        require_images(x, type(self).__name__)
        conv_index = 0
        for layer in self.layers:
            if layer == "M":
                x = max_pool(x, (2, 2), padding="SAME")
                continue
            x = conv_before_bn(self.scaled(layer), (3, 3), padding="SAME", conv_impl=self.conv_impl,
                               name=f"conv_{conv_index}")(x)
            x = nn.relu(batch_norm(train, f"bn_{conv_index}")(x))
            conv_index += 1
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="output")(x)
