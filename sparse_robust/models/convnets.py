"""Small convolutional classifiers: Conv-2/4/6 (Frankle & Carbin 2019) and LeNet-5."""

import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from sparse_robust.models.base import Classifier, flatten_batch, require_images
from sparse_robust.models.conv import Conv
from sparse_robust.models.pooling import max_pool


def _max_pool(x: jnp.ndarray) -> jnp.ndarray:
    return max_pool(x, (2, 2))


class ConvNet(Classifier):
    """Stages of 3x3 'SAME' ReLU convs, each stage followed by 2x2 max-pooling, then a ReLU MLP.

    `conv_stages` lists the conv widths of each stage; defaults give conv-2. Layers are named
    `conv_0`, `conv_1`, ... (counting across stages), `dense_0`, `dense_1`, ... and `output`.
    Kernels use Gaussian Glorot init, as in Frankle & Carbin (2019).
    """

    conv_stages: Sequence[Sequence[int]] = ((64, 64),)
    dense_sizes: Sequence[int] = (256, 256)

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        del train  # No dropout or batch norm.
        require_images(x, type(self).__name__)
        init = nn.initializers.glorot_normal()
        conv_index = 0
        for stage in self.conv_stages:
            for width in stage:
                conv = Conv(self.scaled(width), (3, 3), padding="SAME", kernel_init=init,
                            conv_impl=self.conv_impl, name=f"conv_{conv_index}")
                x = nn.relu(conv(x))
                conv_index += 1
            x = _max_pool(x)
        x = flatten_batch(x)
        for i, width in enumerate(self.dense_sizes):
            x = nn.relu(nn.Dense(self.scaled(width), kernel_init=init, name=f"dense_{i}")(x))
        return nn.Dense(self.num_classes, kernel_init=init, name="output")(x)


class LeNet5(Classifier):
    """LeNet-5 with ReLU and max-pooling: conv 6@5x5 (SAME), pool, conv 16@5x5 (VALID), pool,
    dense 120, 84, output. Glorot-uniform kernels, zero biases.

    `conv_widths` and `dense_sizes` (before `width_multiplier`) are LeNet-5's; other values are
    for `pruning.compact`'s smaller networks of the same layers.
    """

    conv_widths: Sequence[int] = (6, 16)
    dense_sizes: Sequence[int] = (120, 84)

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        del train  # No dropout or batch norm.
        require_images(x, type(self).__name__)
        init = nn.initializers.glorot_uniform()
        conv = functools.partial(Conv, kernel_size=(5, 5), kernel_init=init,
                                 conv_impl=self.conv_impl)
        first, second = self.conv_widths
        x = _max_pool(nn.relu(conv(self.scaled(first), padding="SAME", name="conv_0")(x)))
        x = _max_pool(nn.relu(conv(self.scaled(second), padding="VALID", name="conv_1")(x)))
        x = flatten_batch(x)
        for i, width in enumerate(self.dense_sizes):
            x = nn.relu(nn.Dense(self.scaled(width), kernel_init=init, name=f"dense_{i}")(x))
        return nn.Dense(self.num_classes, kernel_init=init, name="output")(x)
