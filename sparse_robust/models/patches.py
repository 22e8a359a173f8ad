"""2-D convolution as one matrix product over patches: the fast convolution on CPU.

XLA:CPU runs convolutions with few input channels (LeNet-5's, the first layer of every MNIST
conv net) at a few GFLOP/s, their input gradients slower still, and every convolution's
gradients 3-80x slower inside a loop (PGD's `fori_loop`, a scanned train loop) than at the top
level of a program. Its matrix products run near the machine's peak everywhere. Here the
convolution is one matmul, in one of two layouts:

* **banded** (narrow outputs): each output row is the product of the `kh` input rows it reads,
  side by side, with a banded matrix that holds the kernel at every output column's offset. The
  input is copied `kh` times (not `kh * kw`), at the price of multiplying the band's zeros;
* **im2col** (wide outputs, where the band would be mostly zeros): each output pixel is the
  product of its `kh * kw * cin` patch with the kernel.

Both are built from pads, slices, reshapes and dots, all linear in the input and in the kernel,
so JAX transposes them into matmuls too (input and kernel gradients), under `jit`, `vmap`,
`scan` and `jax.linear_transpose`. Results equal `lax.conv_general_dilated` up to float
rounding (the sums run in another order).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# The banded matrix has out_width * cout columns; beyond this many, im2col measured faster
# (benchmarks/README.md: lenet-5's 168 and 160 columns band, conv-4's first layer's 1792 do not).
BANDED_MAX_COLUMNS = 512


def conv_patches(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                 padding: Sequence[tuple[int, int]], precision=None) -> jax.Array:
    """`lax.conv_general_dilated(x, kernel, strides, padding)` for NHWC `x` and HWIO `kernel`.

    `padding` holds explicit (low, high) pairs for H and W (see `lax.padtype_to_pads`).
    """
    kh, kw, _, cout = kernel.shape
    (sh, sw), ((top, bottom), (left, right)) = strides, padding
    x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    n, height, width, cin = x.shape
    out_h, out_w = (height - kh) // sh + 1, (width - kw) // sw + 1

    def rows(i):  # the input rows that kernel row i reads, one per output row
        return x[:, i:i + sh * (out_h - 1) + 1:sh]

    if out_w * cout <= BANDED_MAX_COLUMNS:
        patches = jnp.stack([rows(i) for i in range(kh)], axis=2)  # (N, out_h, kh, W, cin)
        weights = _banded(kernel, width, out_w, sw).reshape(kh * width * cin, out_w * cout)
    else:
        # (N, out_h, out_w, kh*kw, cin)
        patches = jnp.stack([rows(i)[:, :, j:j + sw * (out_w - 1) + 1:sw]
                             for i in range(kh) for j in range(kw)], axis=3)
        weights = kernel.reshape(kh * kw * cin, cout)
    y = jnp.matmul(patches.reshape(-1, weights.shape[0]), weights, precision=precision)
    return y.reshape(n, out_h, out_w, cout)


def _banded(kernel, width: int, out_w: int, stride: int):
    """[kh, width, cin, out_w, cout]: the kernel at each output column's input offset."""
    kw = kernel.shape[1]
    # place[j, a, q] = 1 where input column a feeds output column q through kernel column j.
    place = np.zeros((kw, width, out_w), np.float32)
    for j in range(kw):
        place[j, np.arange(out_w) * stride + j, np.arange(out_w)] = 1.0
    return jnp.einsum("jaq,ijco->iacqo", place.astype(kernel.dtype), kernel,
                      precision=lax.Precision.HIGHEST)
