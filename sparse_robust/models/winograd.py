"""3x3 stride-1 convolution by Winograd's minimal filtering, F(m x m, 3 x 3).

Direct convolution (XLA's, or the patches path's matmul) spends 9 multiplications per output and
input channel pair. Winograd's algorithm computes an m x m tile of outputs from an (m+2) x (m+2)
tile of inputs with (m+2)^2 multiplications per channel pair instead of 9 m^2: 16 instead of 36
for F(2x2, 3x3) (2.25x fewer), 36 instead of 144 for F(4x4, 3x3) (4x fewer). Per tile

    Y = A^T [ (G g G^T) * (B^T d B) ] A

with `d` the input tile, `g` the 3x3 kernel, `*` elementwise, and the small constant matrices
B, G, A of Lavin & Gray (2016). Summed over input channels, the elementwise product becomes one
matmul per tile position: (tiles, cin) @ (cin, cout), (m+2)^2 of them.

Layout choices, measured on XLA:CPU (conv-4, batch 50): the (m+2)^2 matmuls take separate
operands (stacking them for one batched matmul costs a concatenation, which XLA:CPU ran 4x slower
than the same copies unstacked); the input and output transforms are sums of strided slices (a
dot with the 4x4 constant matrices runs at a few GFLOP/s); the output tiles are interleaved by one
stack and a reshape (interior pads were materialised full-size and re-read by every tile
position's gradient: 104 against 83 ms per forward + input gradient of conv-4).

Everything here is linear in the input and in the kernel and built from pads, strided slices,
reshapes and dots with small constant matrices, so JAX's autodiff transposes it into the same
structure: the input gradient is a Winograd-like transposed convolution (the cotangent through
A, the batched matmul with the transformed kernel, back through B), the kernel gradient one
batched matmul of transformed inputs and cotangents followed by G^T . G. Both keep the reduced
multiplication count, under `jit`, `vmap`, `scan` and `jax.linear_transpose`.

Results equal `lax.conv_general_dilated` up to float rounding: the transforms add and subtract
neighbouring inputs before multiplying, so the error grows with m (F(2x2, 3x3) stays near float32
rounding; F(4x4, 3x3) loses about one more digit, and measured slower here: its 36 matmuls are
small and its transforms longer, so `tile=2` is the default and the one `Conv` uses).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# (B^T, G, A^T) for each output tile size m: B^T [m+2, m+2], G [m+2, 3], A^T [m, m+2].
TRANSFORMS = {
    2: (np.array([[1, 0, -1, 0],
                  [0, 1, 1, 0],
                  [0, -1, 1, 0],
                  [0, 1, 0, -1]], np.float64),
        np.array([[1, 0, 0],
                  [.5, .5, .5],
                  [.5, -.5, .5],
                  [0, 0, 1]], np.float64),
        np.array([[1, 1, 1, 0],
                  [0, 1, -1, -1]], np.float64)),
    4: (np.array([[4, 0, -5, 0, 1, 0],
                  [0, -4, -4, 1, 1, 0],
                  [0, 4, -4, -1, 1, 0],
                  [0, -2, -1, 2, 1, 0],
                  [0, 2, -1, -2, 1, 0],
                  [0, 4, 0, -5, 0, 1]], np.float64),
        np.array([[1 / 4, 0, 0],
                  [-1 / 6, -1 / 6, -1 / 6],
                  [-1 / 6, 1 / 6, -1 / 6],
                  [1 / 24, 1 / 12, 1 / 6],
                  [1 / 24, -1 / 12, 1 / 6],
                  [0, 0, 1]], np.float64),
        np.array([[1, 1, 1, 1, 1, 0],
                  [0, 1, -1, 2, -2, 0],
                  [0, 1, 1, 4, 4, 0],
                  [0, 1, -1, 8, -8, 1]], np.float64)),
}


def serves(kernel_shape: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether `conv_winograd` runs a convolution with this HWIO kernel shape and stride."""
    return tuple(kernel_shape[:2]) == (3, 3) and tuple(strides) == (1, 1)


def conv_winograd(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                  padding: Sequence[tuple[int, int]], precision=None, tile: int = 2) -> jax.Array:
    """`lax.conv_general_dilated(x, kernel, strides, padding)` for NHWC `x`, a 3x3 HWIO `kernel`
    and stride 1, by F(tile x tile, 3 x 3).

    `padding` holds explicit (low, high) pairs for H and W (see `lax.padtype_to_pads`).
    """
    if not serves(kernel.shape, strides):
        raise ValueError(f"conv_winograd serves 3x3 kernels with stride 1, not kernel "
                         f"{tuple(kernel.shape[:2])} with strides {tuple(strides)}")
    return conv_transformed(x, transformed_kernel(kernel, tile), padding, precision, tile)


def transformed_kernel(kernel: jax.Array, tile: int = 2) -> jax.Array:
    """U = G g G^T of a 3x3 HWIO `kernel`, as [(tile+2)^2, cin, cout] (tile positions row-major)."""
    g = TRANSFORMS[tile][1].astype(np.float32)
    alpha = g.shape[0]
    return jnp.einsum("ai,ijco,bj->abco", g, kernel, g, precision=lax.Precision.HIGHEST
                      ).reshape(alpha * alpha, *kernel.shape[2:])


def conv_transformed(x: jax.Array, u: jax.Array, padding: Sequence[tuple[int, int]],
                     precision=None, tile: int = 2) -> jax.Array:
    """`conv_winograd` given the transformed kernel `u = transformed_kernel(kernel, tile)`."""
    bt, _, at = TRANSFORMS[tile]
    alpha, m = bt.shape[0], tile
    cin, cout = u.shape[1:]
    ((top, bottom), (left, right)) = padding
    n, height, width, _ = x.shape
    out_h, out_w = height + top + bottom - 2, width + left + right - 2
    tiles_h, tiles_w = -(-out_h // m), -(-out_w // m)
    # Pad so the tile grid covers the output; the extra outputs are cropped at the end.
    x = jnp.pad(x, ((0, 0), (top, bottom + tiles_h * m - out_h),
                    (left, right + tiles_w * m - out_w), (0, 0)))

    def transform(rows, matrix, axis, count):
        # out[k] = sum_a matrix[k, a] * rows[a*, axis], the a-th input of every tile along axis.
        taps = [lax.slice_in_dim(rows, a, a + m * (count - 1) + 1, m, axis)
                for a in range(matrix.shape[1])]
        return [_combine(row, taps) for row in matrix]

    # V[xi][nu]: (N * tiles_h * tiles_w, cin), B^T d B at tile position (xi, nu) of every tile.
    v = [t.reshape(-1, cin) for r in transform(x, bt, 1, tiles_h)
         for t in transform(r, bt, 2, tiles_w)]
    # One matmul per tile position, on separate operands: XLA:CPU's concatenations are slow.
    prod = [jnp.matmul(v[p], u[p].astype(v[p].dtype), precision=precision)
            for p in range(alpha * alpha)]
    prod = [[prod[a * alpha + b].reshape(n, tiles_h, tiles_w, cout) for b in range(alpha)]
            for a in range(alpha)]
    # Y = A^T M A; output (r, s) of tile (i, j) is pixel (m i + r, m j + s).
    rows = [_combine(at_row, prod) for at_row in at]  # combines lists elementwise
    y = jnp.stack([jnp.stack([_combine(at[c], rows[r]) for c in range(m)], axis=3)
                   for r in range(m)], axis=2)  # (N, tiles_h, m, tiles_w, m, cout)
    y = y.reshape(n, tiles_h * m, tiles_w * m, cout)
    return y[:, :out_h, :out_w]


def _combine(coefficients, terms):
    """sum_i coefficients[i] * terms[i], skipping zeros and multiplying by no +-1; terms that are
    lists are combined elementwise."""
    if isinstance(terms[0], list):
        return [_combine(coefficients, column) for column in zip(*terms)]
    total = None
    for c, t in zip(coefficients, terms):
        if c == 0:
            continue
        t = t if abs(c) == 1 else float(abs(c)) * t
        total = (t if c > 0 else -t) if total is None else (total + t if c > 0 else total - t)
    return total
