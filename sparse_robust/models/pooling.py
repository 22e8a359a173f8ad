"""Max-pooling over non-overlapping windows, and PyTorch's adaptive average pooling.

`nn.max_pool` is `lax.reduce_window`, whose gradient (`select_and_scatter_add`) XLA:CPU lowers to
four index arrays and a scatter: a third of a lenet-5 PGD step (benchmarks/README.md). Here the
pool is `pool_cpu`'s primitives: on one CPU device, for 2x2 windows of at most 16 channels, a
kernel that reads each window once, forward and for its gradient; elsewhere XLA ops (a reshape
and a max, and a masked sum at each window's first maximum for the tangent). The tie rule is `select_and_scatter_add`'s: the first maximum of a
window, in row-major order, takes all of the gradient. Outputs and gradients equal
`nn.max_pool(x, window, strides=window, padding=padding)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from sparse_robust.models import pool_cpu


def max_pool(x: jax.Array, window: tuple[int, int], padding: str = "VALID") -> jax.Array:
    """`nn.max_pool(x, window, strides=window, padding=padding)` for NHWC batches `x`.

    "VALID" drops the rows and columns a last partial window would need; "SAME" pads with -inf.
    """
    if x.ndim != 4:
        raise ValueError(f"max_pool needs an NHWC batch (N, H, W, C), got shape {x.shape}.")
    window = tuple(window)
    pads = lax.padtype_to_pads(x.shape[1:3], window, window, padding)
    x = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-jnp.inf)
    height, width = (size // w * w for size, w in zip(x.shape[1:3], window))
    return pool_cpu.max_pool(x[:, :height, :width], window)


def adaptive_avg_pool(x: jax.Array, output_size: tuple[int, int]) -> jax.Array:
    """PyTorch's `nn.AdaptiveAvgPool2d(output_size)` for NHWC batches `x`.

    Output cell i along an axis of size n averages input rows floor(i * n / o) to
    ceil((i + 1) * n / o) (exclusive), so windows may overlap and a smaller input is repeated.
    """
    if x.ndim != 4:
        raise ValueError(
            f"adaptive_avg_pool needs an NHWC batch (N, H, W, C), got shape {x.shape}.")

    def bins(n, o):
        return [(i * n // o, -(-(i + 1) * n // o)) for i in range(o)]

    rows = []
    for h0, h1 in bins(x.shape[1], output_size[0]):
        cells = [jnp.mean(x[:, h0:h1, w0:w1], axis=(1, 2))
                 for w0, w1 in bins(x.shape[2], output_size[1])]
        rows.append(jnp.stack(cells, axis=1))
    return jnp.stack(rows, axis=1)
