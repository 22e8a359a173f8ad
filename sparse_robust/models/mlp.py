"""Fully connected classifiers: dense-300-100 (Cosentino et al. 2019) and lenet-300-100."""

import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from sparse_robust.models.base import Classifier, flatten_batch


class MLP(Classifier):
    """ReLU multilayer perceptron with Glorot-uniform kernels; flattens any input itself.

    Layers are named `dense_0`, `dense_1`, ... and `output`. Defaults give lenet-300-100.
    """

    hidden_sizes: Sequence[int] = (300, 100)
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        del train  # No dropout or batch norm.
        dense = functools.partial(
            nn.Dense,
            use_bias=self.use_bias,
            kernel_init=nn.initializers.glorot_uniform(),
            bias_init=nn.initializers.zeros,
        )
        x = flatten_batch(x)
        for i, width in enumerate(self.hidden_sizes):
            x = nn.relu(dense(self.scaled(width), name=f"dense_{i}")(x))
        return dense(self.num_classes, name="output")(x)
