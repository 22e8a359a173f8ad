"""Winograd F(2x2, 3x3) as one fused CPU kernel: the "winograd_cpu" path of `models.Conv`.

`winograd.conv_winograd` expresses the algorithm in XLA ops, and XLA:CPU runs its input
transform, 16 matmuls and output transform as separate passes over whole activations: in a
conv-4 PGD step about half the op time was those passes, not the multiplications
(benchmarks/README.md). `winograd_cpu.cc` runs all three per block of 32 tiles while the block
is in cache, over XLA's intra-op thread pool, through XLA's FFI; a second kernel does the same
for the kernel gradient (transformed inputs times transformed cotangents, summed over tiles).

The kernel is C++ built on first use (`native.load`: the machine's C++ compiler, this jaxlib's
FFI headers, `-march=native`) and cached in `cache_dir()` under a name that hashes the source,
jaxlib's version, the compiler, the flags and the CPU's instruction-set features, so a shared
home directory never serves one machine's build to another. Where it cannot be built (no
compiler, another platform) `available()` is False, `unavailable_reason()` says why, and `Conv`
runs "winograd" instead.

`conv3x3(x, u)` and `kernel_grad(x, dy)` are JAX primitives, each bilinear in its two operands
(`u = winograd.transformed_kernel(kernel)`), so every transformation works: forward and reverse
mode to any order, `jax.linear_transpose`, `vmap` (leading dimensions are a batch the kernels
loop over), `jit`, `scan`. conv3x3's transpose in `x` is conv3x3 with the kernel flipped (a
permutation of `u`'s tile positions) and its channels swapped, its transpose in `u` is
kernel_grad, and kernel_grad's transposes are conv3x3s. Off CPU, or before the kernels are
built, they lower to `winograd.conv_transformed` and its transpose. They serve 3x3 kernels with
stride 1, one pixel of zero padding (SAME) and float32 channel counts that are multiples of 16
(`serves`). Same inputs, same bits: every sum runs in a fixed order whichever thread runs it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.interpreters import ad, batching

from sparse_robust.models import native, winograd
from sparse_robust.models.native import cache_dir  # noqa: F401  (where the build is kept)

SOURCE = Path(__file__).with_name("winograd_cpu.cc")
PADDING = ((1, 1), (1, 1))
# Flipping a 3x3 kernel reverses its taps; in G g G^T that swaps rows 0 and 3 of each axis.
_FLIP = np.array([3, 1, 2, 0])


def serves(kernel_shape, strides, padding, dtype=jnp.float32) -> bool:
    """Whether `conv3x3` runs a convolution with this HWIO kernel shape, stride, explicit
    (low, high) padding pairs and dtype: one `winograd.conv_winograd` serves, with SAME padding,
    float32 and channel counts that are multiples of 16."""
    return (winograd.serves(kernel_shape, strides)
            and tuple(map(tuple, padding)) == PADDING and jnp.dtype(dtype) == jnp.float32
            and kernel_shape[2] % 16 == 0 and kernel_shape[3] % 16 == 0)


def available() -> bool:
    """Whether the kernel is built and registered with XLA (builds it on the first call)."""
    return _load() is None


def unavailable_reason() -> str | None:
    """Why the kernel cannot run here, in one line; None where it can."""
    return _load()


def _load() -> str | None:
    """Builds, loads and registers the kernels (once); None, or why they cannot run here."""
    return native.load(SOURCE, ((conv3x3_p, "SparseRobustWinogradConv"),
                                (kernel_grad_p, "SparseRobustWinogradKernelGrad")))


def conv3x3(x: jax.Array, u: jax.Array) -> jax.Array:
    """3x3, stride-1, SAME convolution of NHWC `x` [..., n, h, w, cin] with the transformed kernel
    `u` [..., 16, cin, cout] (leading dimensions: a batch, the same in both)."""
    _load()  # the CPU lowering is the kernel's once it is registered
    return conv3x3_p.bind(x, u)


def kernel_grad(x: jax.Array, dy: jax.Array) -> jax.Array:
    """`conv3x3`'s transpose in `u`: the cotangent [..., 16, cin, cout] of the transformed kernel,
    given the input `x` [..., n, h, w, cin] and the output's cotangent `dy` [..., n, h, w, cout]."""
    _load()
    return kernel_grad_p.bind(x, dy)


def _conv_abstract_eval(x, u):
    if x.ndim < 4 or u.ndim != x.ndim - 1 or x.shape[:-4] != u.shape[:-3]:
        raise ValueError(f"conv3x3 takes x [..., n, h, w, cin] and u [..., 16, cin, cout] with "
                         f"the same leading dimensions, not {x.shape} and {u.shape}")
    if u.shape[-3] != 16 or u.shape[-2] != x.shape[-1] or x.dtype != u.dtype:
        raise ValueError(f"conv3x3: u must be [..., 16, {x.shape[-1]}, cout] of x's dtype, "
                         f"not {u.shape} {u.dtype}")
    return jax.core.ShapedArray(x.shape[:-1] + u.shape[-1:], x.dtype)


def _kernel_grad_abstract_eval(x, dy):
    if x.ndim < 4 or dy.shape[:-1] != x.shape[:-1] or x.dtype != dy.dtype:
        raise ValueError(f"kernel_grad takes x [..., n, h, w, cin] and dy [..., n, h, w, cout] "
                         f"of one dtype, not {x.shape} {x.dtype} and {dy.shape} {dy.dtype}")
    return jax.core.ShapedArray(x.shape[:-4] + (16, x.shape[-1], dy.shape[-1]), x.dtype)


def _reference_conv(x, u):
    """conv3x3 in XLA ops (winograd.conv_transformed), over any leading dimensions."""
    fn = functools.partial(winograd.conv_transformed, padding=PADDING)
    for _ in range(x.ndim - 4):
        fn = jax.vmap(fn)
    return fn(x, u)


def _reference_kernel_grad(x, dy):
    """kernel_grad in XLA ops: the transpose of `_reference_conv` in u."""
    u = jax.ShapeDtypeStruct(x.shape[:-4] + (16, x.shape[-1], dy.shape[-1]), x.dtype)
    return jax.linear_transpose(functools.partial(_reference_conv, x), u)(dy)[0]


def _flipped(u):
    """The transformed kernel of the flipped, channel-swapped kernel: conv3x3's transpose in x."""
    grid = u.reshape(u.shape[:-3] + (4, 4) + u.shape[-2:])
    grid = grid[..., _FLIP, :, :, :][..., _FLIP, :, :]
    return jnp.swapaxes(grid, -1, -2).reshape(u.shape[:-3] + (16, u.shape[-1], u.shape[-2]))


def _define(name, abstract_eval, reference, transpose_first, transpose_second):
    """A primitive bilinear in its two operands, lowered to `reference` (until `_load` registers
    the kernel for CPU); transposes take (cotangent, first, second)."""
    primitive = native.define_primitive(name, abstract_eval, reference)
    ad.defbilinear(primitive, transpose_first, transpose_second)
    batching.primitive_batchers[primitive] = native.leading_batch_rule(primitive)
    return primitive


# <W, kernel_grad(x, dy)> = <conv3x3(x, W), dy> = <x, conv3x3(dy, flipped W)>: each transpose is
# the other primitive, so derivatives of any order stay on the kernels.
conv3x3_p = _define("sparse_robust_winograd_conv3x3", _conv_abstract_eval, _reference_conv,
                    lambda ct, x, u: conv3x3(ct, _flipped(u)),
                    lambda ct, x, u: kernel_grad(x, ct))
kernel_grad_p = _define("sparse_robust_winograd_kernel_grad", _kernel_grad_abstract_eval,
                        _reference_kernel_grad,
                        lambda ct, x, dy: conv3x3(dy, _flipped(ct)),
                        lambda ct, x, dy: conv3x3(x, ct))
