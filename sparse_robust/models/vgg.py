"""CIFAR-style VGGs with batch norm.

`VGG` (our vgg-16): 13 convs, five max-pools, a global average pool and a single linear classifier.
`HydraVGG` (vgg-16-hydra): the `vgg16_bn` of HYDRA (Sehwag et al. 2020), which the Adversarial
Pruning Benchmark (Piras et al. 2024) uses: four max-pools, a 2x2 adaptive average pool and a
2048 -> 256 -> 256 -> classes classifier with biases.
"""

import functools
from typing import Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from sparse_robust.models.base import (Classifier, batch_norm, conv_before_bn, flatten_batch,
                                       require_images)
from sparse_robust.models.pooling import adaptive_avg_pool, max_pool

# Conv widths, with "M" for a 2x2 max-pool.
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# HYDRA's VGG-16: no pool after the last block.
HYDRA_VGG16_LAYERS = VGG16_LAYERS[:-1]


def _features(module: Classifier, x: jnp.ndarray, train: bool, pool_padding: str) -> jnp.ndarray:
    """The conv + BN + ReLU layers and max-pools of `module.layers`, named `conv_i` / `bn_i`.

    Called inside `module`'s compact `__call__`, so the layers are its submodules.
    """
    conv_index = 0
    for layer in module.layers:
        if layer == "M":
            x = max_pool(x, (2, 2), padding=pool_padding)
            continue
        x = conv_before_bn(module.scaled(layer), (3, 3), padding="SAME", conv_impl=module.conv_impl,
                           name=f"conv_{conv_index}")(x)
        x = nn.relu(batch_norm(train, f"bn_{conv_index}")(x))
        conv_index += 1
    return x


class VGG(Classifier):
    """3x3 conv + BN + ReLU layers with max-pools, global average pool, then the `output` Dense.

    Layers are named `conv_i` / `bn_i` (i counts convs) and `output`. Pools pad 'SAME' so that
    28x28 inputs work as well as 32x32 ones (both reach 1x1 after five pools).
    """

    layers: Sequence[Union[int, str]] = VGG16_LAYERS

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        require_images(x, type(self).__name__)
        x = _features(self, x, train, pool_padding="SAME")
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="output")(x)


class HydraVGG(Classifier):
    """HYDRA's `vgg16_bn`: conv + BN + ReLU layers with four max-pools, a 2x2 adaptive average
    pool, then Dense 256, ReLU, Dense 256, ReLU and the `output` Dense, all with biases.

    Layers are named `conv_i` / `bn_i` (i counts convs), `dense_0`, `dense_1` and `output`. Pools
    drop a last partial row or column, as PyTorch's `MaxPool2d` does, and the adaptive pool
    repeats a smaller map: 32x32 inputs reach 2x2 (the pool is then the identity), 28x28 ones 1x1.
    The flatten is NHWC; `sparse_robust.interop` permutes `dense_0` to PyTorch's NCHW order.
    Dense kernels start from N(0, 0.01^2) and biases from zero, as in HYDRA.
    """

    layers: Sequence[Union[int, str]] = HYDRA_VGG16_LAYERS
    dense_sizes: Sequence[int] = (256, 256)
    pooled_size: int = 2

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        require_images(x, type(self).__name__)
        x = _features(self, x, train, pool_padding="VALID")
        x = flatten_batch(adaptive_avg_pool(x, (self.pooled_size, self.pooled_size)))
        dense = functools.partial(nn.Dense, kernel_init=nn.initializers.normal(0.01))
        for i, width in enumerate(self.dense_sizes):
            x = nn.relu(dense(self.scaled(width), name=f"dense_{i}")(x))
        return dense(self.num_classes, name="output")(x)
