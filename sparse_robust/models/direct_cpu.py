"""Direct convolution of few channels as one CPU kernel: the "direct_cpu" path of `models.Conv`.

LeNet-5's convolutions (1 -> 6 and 6 -> 16 channels, 5x5) are too narrow for a matrix product:
the "patches" path runs them as banded matmuls near the machine's matmul rate, but the band's
zeros are 6.4x (first layer) and 2.8x (second) the convolution's own multiply-adds, and XLA's own
convolution is slower still. `direct_cpu.cc` puts 16 images in the 16 lanes of a vector instead
(a block of images transposed to [row][column][channel][image]), so every multiply-add is a full
vector whatever the channel counts, and accumulates P output columns by CO output channels in
registers. Blocks of images (and rows, when there are few) are shared over XLA's intra-op pool.

`conv(x, kernel, padding)` is a JAX primitive, bilinear in `x` and `kernel`, so every
transformation works: forward and reverse mode to any order, `jax.linear_transpose`, `vmap`
(leading dimensions are a batch the kernel loops over), `jit`, `scan`. Its transpose in `x` is
the same kernel on the flipped, channel-swapped kernel with the complementary padding (the
input gradient every attack takes runs on it too); its transpose in `kernel` (training's
kernel gradient) is the "patches" path's, in XLA ops. It serves stride-1 float32 convolutions
with kernel widths 1, 3, 5 or 7, heights up to 7 and padding below the kernel's size on each
side (`serves`); the kernel is built on first use like the library's others (`native.load`) and,
off CPU or where it cannot be built, the primitive lowers to `patches.conv_patches`. Same inputs,
same bits: each output is summed in one fixed order, whichever thread computes it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.interpreters import ad, batching

from sparse_robust.models import native
from sparse_robust.models.patches import conv_patches

SOURCE = Path(__file__).with_name("direct_cpu.cc")
KERNEL_WIDTHS = (1, 3, 5, 7)
MAX_KERNEL_HEIGHT = 7


def serves(kernel_shape, strides, padding, dtype=jnp.float32) -> bool:
    """Whether `conv` runs a convolution with this HWIO kernel shape, stride, explicit (low, high)
    padding pairs and dtype: stride 1, float32, kernel widths 1, 3, 5 or 7, heights up to 7, and
    each side's padding below the kernel's size (so the input gradient is a convolution too)."""
    kh, kw = kernel_shape[:2]
    return (tuple(strides) == (1, 1) and jnp.dtype(dtype) == jnp.float32
            and kw in KERNEL_WIDTHS and 1 <= kh <= MAX_KERNEL_HEIGHT
            and all(0 <= pad < size for (low, high), size in zip(padding, (kh, kw))
                    for pad in (low, high)))


def available() -> bool:
    """Whether the kernel is built and registered with XLA (builds it on the first call)."""
    return _load() is None


def unavailable_reason() -> str | None:
    """Why the kernel cannot run here, in one line; None where it can."""
    return _load()


def _load() -> str | None:
    return native.load(SOURCE, ((conv_p, "SparseRobustDirectConv"),))


def conv(x: jax.Array, kernel: jax.Array, padding) -> jax.Array:
    """Stride-1 convolution of NHWC `x` [..., n, h, w, cin] with HWIO `kernel` [..., kh, kw, cin,
    cout] and explicit ((top, bottom), (left, right)) zero `padding` (leading dimensions: a
    batch, the same in both)."""
    _load()  # the CPU lowering is the kernel's once it is registered
    (top, bottom), (left, right) = padding
    return conv_p.bind(x, kernel, top=int(top), bottom=int(bottom), left=int(left),
                       right=int(right))


def _abstract_eval(x, kernel, *, top, bottom, left, right):
    if x.ndim < 4 or kernel.ndim != x.ndim or x.shape[:-4] != kernel.shape[:-4]:
        raise ValueError(f"direct_cpu.conv takes x [..., n, h, w, cin] and kernel [..., kh, kw, "
                         f"cin, cout] with the same leading dimensions, not {x.shape} and "
                         f"{kernel.shape}")
    kh, kw, cin, cout = kernel.shape[-4:]
    out_h, out_w = x.shape[-3] + top + bottom - kh + 1, x.shape[-2] + left + right - kw + 1
    if cin != x.shape[-1] or x.dtype != kernel.dtype or out_h < 1 or out_w < 1:
        raise ValueError(f"direct_cpu.conv: kernel {kernel.shape} {kernel.dtype} does not fit "
                         f"x {x.shape} {x.dtype} with padding {((top, bottom), (left, right))}")
    return jax.core.ShapedArray(x.shape[:-3] + (out_h, out_w, cout), x.dtype)


def _reference(x, kernel, *, top, bottom, left, right):
    """conv in XLA ops (the "patches" path), over any leading dimensions."""
    fn = functools.partial(conv_patches, strides=(1, 1), padding=((top, bottom), (left, right)))
    for _ in range(x.ndim - 4):
        fn = jax.vmap(fn)
    return fn(x, kernel)


def _transpose_x(ct, x, kernel, *, top, bottom, left, right):
    """The input's cotangent: the convolution of `ct` with the flipped kernel, its channels
    swapped, over the complementary padding (kh - 1 - pad on each side)."""
    kh, kw = kernel.shape[-4:-2]
    flipped = jnp.flip(kernel, (-4, -3)).swapaxes(-1, -2)
    return conv(ct, flipped, ((kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right)))


def _transpose_kernel(ct, x, kernel, **padding):
    """The kernel's cotangent, in XLA ops: the transpose of `_reference` in the kernel."""
    aval = jax.ShapeDtypeStruct(kernel.aval.shape, kernel.aval.dtype)
    return jax.linear_transpose(lambda k: _reference(x, k, **padding), aval)(ct)[0]


conv_p = native.define_primitive("sparse_robust_direct_conv", _abstract_eval, _reference,
                                 static=("top", "bottom", "left", "right"))
ad.defbilinear(conv_p, _transpose_x, _transpose_kernel)
batching.primitive_batchers[conv_p] = native.leading_batch_rule(conv_p)
