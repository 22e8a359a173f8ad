"""Max-pooling over non-overlapping windows as a reshape and a max.

`nn.max_pool` is `lax.reduce_window`, whose gradient (`select_and_scatter_add`) XLA:CPU lowers to
four index arrays and a scatter: a third of a lenet-5 PGD step (benchmarks/README.md). Here the
pool is the elementwise maximum of each window's elements (slices of a free reshape), and its
gradient a chain of selects over the same slices, with the tie rule of
`select_and_scatter_add`: the first maximum of a window, in row-major order, takes all of the
gradient. Outputs and gradients equal `nn.max_pool(x, window, strides=window, padding=padding)`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


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
    return _pool(x[:, :height, :width], window)


def _window_elements(x, window):
    """The wh * ww elements of each window, in row-major order, each (N, H/wh, W/ww, C): slices
    of a free reshape to (N, H/wh, wh, W/ww, ww * C), which XLA fuses into one pass."""
    n, h, w, c = x.shape
    rows = x.reshape(n, h // window[0], window[0], w // window[1], window[1] * c)
    return [rows[:, :, i, :, j * c:(j + 1) * c] for i in range(window[0]) for j in range(window[1])]


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _pool(x, window):
    return functools.reduce(jnp.maximum, _window_elements(x, window))


@_pool.defjvp
def _pool_jvp(window, primals, tangents):
    (x,), (x_dot,) = primals, tangents
    elements = _window_elements(x, window)
    pooled = functools.reduce(jnp.maximum, elements)
    # The first maximum of the window, in row-major order, takes the tangent.
    element_dots = _window_elements(x_dot, window)
    pooled_dot = element_dots[-1]
    for element, element_dot in zip(elements[-2::-1], element_dots[-2::-1]):
        pooled_dot = jnp.where(element == pooled, element_dot, pooled_dot)
    return pooled, pooled_dot


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
