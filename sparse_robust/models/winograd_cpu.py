"""Winograd F(2x2, 3x3) as one fused CPU kernel: the "winograd_cpu" path of `models.Conv`.

`winograd.conv_winograd` expresses the algorithm in XLA ops, and XLA:CPU runs its input
transform, 16 matmuls and output transform as separate passes over whole activations: in a
conv-4 PGD step about half the op time was those passes, not the multiplications
(benchmarks/README.md). `winograd_cpu.cc` runs all three per block of 32 tiles while the block
is in cache, over XLA's intra-op thread pool, through XLA's FFI.

The kernel is C++ built on first use with the machine's C++ compiler (`$CXX`, else `c++`),
against this jaxlib's FFI headers and for this CPU (`-march=native`), and cached in
`cache_dir()` under a name that hashes the source, jaxlib's version, the compiler, the flags and
the CPU, so a shared home directory never serves one machine's build to another. Where it cannot
be built (no compiler, another platform) `available()` is False, `unavailable_reason()` says why,
and `Conv` runs "winograd" instead.

`conv3x3(x, u)` is a JAX primitive bilinear in the input and the transformed kernel
`u = winograd.transformed_kernel(kernel)`, so every transformation works: forward and reverse
mode to any order, `jax.linear_transpose`, `vmap` (leading dimensions of `x` and `u` are a batch
the kernel loops over), `jit`, `scan`. Its transpose in `x` is the same kernel with the kernel
flipped (a permutation of `u`'s tile positions) and its channels swapped; its transpose in `u` is
that of `winograd.conv_transformed`, which is also what it lowers to off CPU. It serves 3x3
kernels with stride 1, one pixel of zero padding (SAME) and float32 channel counts that are
multiples of 16 (`serves`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from sparse_robust.models.winograd import conv_transformed

SOURCE = Path(__file__).with_name("winograd_cpu.cc")
_SYMBOL = "SparseRobustWinogradConv"
_TARGET = "sparse_robust_winograd_conv3x3"
_FLAGS = ("-O3", "-march=native", "-std=gnu++17", "-ffp-contract=fast", "-shared", "-fPIC", "-w")
PADDING = ((1, 1), (1, 1))
# Flipping a 3x3 kernel reverses its taps; in G g G^T that swaps rows 0 and 3 of each axis.
_FLIP = np.array([3, 1, 2, 0])


def serves(kernel_shape, strides, padding, dtype=jnp.float32) -> bool:
    """Whether `conv3x3` runs a convolution with this HWIO kernel shape, stride, explicit
    (low, high) padding pairs and dtype."""
    return (tuple(kernel_shape[:2]) == (3, 3) and tuple(strides) == (1, 1)
            and tuple(map(tuple, padding)) == PADDING and jnp.dtype(dtype) == jnp.float32
            and kernel_shape[2] % 16 == 0 and kernel_shape[3] % 16 == 0)


def cache_dir() -> Path:
    """Where built kernels are kept: `$SPARSE_ROBUST_CACHE`, else `$XDG_CACHE_HOME/sparse_robust`,
    else `~/.cache/sparse_robust`."""
    if os.environ.get("SPARSE_ROBUST_CACHE"):
        return Path(os.environ["SPARSE_ROBUST_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sparse_robust"


def available() -> bool:
    """Whether the kernel is built and registered with XLA (builds it on the first call)."""
    return _load() is None


def unavailable_reason() -> str | None:
    """Why the kernel cannot run here, in one line; None where it can."""
    return _load()


def _cpu_identity() -> str:
    """The CPU's model and feature flags: what `-march=native` compiles for."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + " " + platform.processor()
    keep = [line for line in lines if line.split(":")[0].strip() in ("model name", "flags")]
    return "\n".join(dict.fromkeys(keep))


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), jaxlib.__version__, version,
                                    " ".join(_FLAGS), _cpu_identity()]).encode()).hexdigest()
    library = cache_dir() / f"winograd_cpu-{key[:16]}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed, so concurrent first uses never load half a file.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=library.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE),
                                 "-o", partial], capture_output=True, text=True)
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines() or ["(no output)"]
            raise RuntimeError(f"{compiler} failed on {SOURCE.name}: {lines[0]}")
        os.replace(partial, library)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return library


@functools.cache
def _load() -> str | None:
    """Builds, loads and registers the kernel; returns None, or why it cannot run here."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"the kernel is built for Linux on x86-64 only, not {platform.system()} " \
               f"on {platform.machine()}"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler: {compiler!r} is not on PATH (install g++ or set $CXX)"
    try:
        library = ctypes.cdll.LoadLibrary(str(_build(compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        return f"building the kernel failed: {error}"
    jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(getattr(library, _SYMBOL)),
                                platform="cpu")
    mlir.register_lowering(conv3x3_p, jax.ffi.ffi_lowering(_TARGET), platform="cpu")
    return None


def conv3x3(x: jax.Array, u: jax.Array) -> jax.Array:
    """3x3, stride-1, SAME convolution of NHWC `x` [..., n, h, w, cin] with the transformed kernel
    `u` [..., 16, cin, cout] (leading dimensions: a batch, the same in both)."""
    _load()  # the CPU lowering is the kernel's once it is registered
    return conv3x3_p.bind(x, u)


def _abstract_eval(x, u):
    if x.ndim < 4 or u.ndim != x.ndim - 1 or x.shape[:-4] != u.shape[:-3]:
        raise ValueError(f"conv3x3 takes x [..., n, h, w, cin] and u [..., 16, cin, cout] with "
                         f"the same leading dimensions, not {x.shape} and {u.shape}")
    if u.shape[-3] != 16 or u.shape[-2] != x.shape[-1] or x.dtype != u.dtype:
        raise ValueError(f"conv3x3: u must be [..., 16, {x.shape[-1]}, cout] of x's dtype, "
                         f"not {u.shape} {u.dtype}")
    return jax.core.ShapedArray(x.shape[:-1] + u.shape[-1:], x.dtype)


def _reference(x, u):
    """The same function in XLA ops (winograd.conv_transformed), over any leading dimensions."""
    fn = functools.partial(conv_transformed, padding=PADDING)
    for _ in range(x.ndim - 4):
        fn = jax.vmap(fn)
    return fn(x, u)


def _flipped(u):
    """The transformed kernel of the flipped, channel-swapped kernel: conv3x3's transpose in x."""
    grid = u.reshape(u.shape[:-3] + (4, 4) + u.shape[-2:])
    grid = grid[..., _FLIP, :, :, :][..., _FLIP, :, :]
    return jnp.swapaxes(grid, -1, -2).reshape(u.shape[:-3] + (16, u.shape[-1], u.shape[-2]))


def _transpose_x(ct, x, u):
    return conv3x3(ct, _flipped(u))


def _transpose_u(ct, x, u):
    aval = jax.ShapeDtypeStruct(u.aval.shape, u.aval.dtype)
    (ct_u,) = jax.linear_transpose(functools.partial(_reference, x), aval)(ct)
    return ct_u


def _batch(args, dims):
    x, u = args
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)  # None: not mapped
    x, u = (batching.bdim_at_front(a, d, size) for a, d in zip(args, dims))
    return conv3x3(x, u), 0


conv3x3_p = Primitive("sparse_robust_winograd_conv3x3")
conv3x3_p.def_impl(lambda x, u: jax.jit(conv3x3_p.bind)(x, u))
conv3x3_p.def_abstract_eval(_abstract_eval)
ad.defbilinear(conv3x3_p, _transpose_x, _transpose_u)
batching.primitive_batchers[conv3x3_p] = _batch
# Everywhere but CPU with the kernel built (registered in `_load`): the same algorithm in XLA ops.
mlir.register_lowering(conv3x3_p, mlir.lower_fun(_reference, multiple_results=False))
