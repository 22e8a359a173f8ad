"""Sparse x dense products over a fixed nonzero pattern: the kernels of sparse ticket execution.

A pruned dense layer computes `x @ (kernel * mask)`; with 1 % of its weights alive, 99 % of the
multiply-adds are with zeros. `matmul(x, values, pattern)` does only the others: `pattern`
(`Pattern.of(mask)`) lists the mask's nonzeros, `values` [nnz] holds the kernel there
(`pattern.gather(kernel)`), and the product runs as `sparse_cpu.cc` on CPU, one C++ kernel
through XLA's FFI (built and cached by `native`), with the batch as the vector axis. XLA's own
sparse paths do not pay on CPU: `jax.experimental.sparse` and a gather / segment-sum formulation
measured 0.1-1.0x the masked-dense time on dense-300-100 at 10 to 1 % of the weights.

`spmm` (the product) and `sddmm` (its gradient in `values`: x and the output's cotangent
multiplied at the nonzeros only) are JAX primitives, each bilinear in its two array operands,
with the pattern a static parameter, so every transformation works: forward and reverse mode to
any order (spmm's transpose in x is spmm over the transposed pattern, the one attacks take; in
`values` it is sddmm, the one training takes; sddmm's transposes are spmms), `linear_transpose`,
`vmap` (leading dimensions of x are more batch rows; a batch of values runs as a loop), `jit`,
`scan`. Off CPU, for dtypes other than float32, or where the kernel cannot be built
(`unavailable_reason()`), they lower to gathers and segment sums in XLA ops.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from sparse_robust.models import native

SOURCE = Path(__file__).with_name("sparse_cpu.cc")


class Pattern:
    """The nonzeros of a [K, N] kernel, ordered by output column then input row: nonzero j sits
    at (`rows[j]`, `cols[j]`); those of column n are `ptr[n]:ptr[n + 1]`. `transposed` is the
    pattern of the kernel's transpose, whose values are `values[perm]`.

    Compared and hashed by identity (a static parameter of the primitives): build one per mask.
    """

    def __init__(self, rows, cols, shape, perm=None, transposed=None):
        self.rows, self.cols = np.asarray(rows, np.int32), np.asarray(cols, np.int32)
        self.shape = tuple(int(s) for s in shape)
        self.ptr = np.searchsorted(self.cols, np.arange(self.shape[1] + 1)).astype(np.int32)
        if transposed is None:
            perm = np.lexsort((self.cols, self.rows)).astype(np.int32)  # by row, then column
            transposed = Pattern(self.cols[perm], self.rows[perm], self.shape[::-1],
                                 np.argsort(perm).astype(np.int32), self)
        self.perm, self.transposed = perm, transposed

    @classmethod
    def of(cls, mask) -> "Pattern":
        """The pattern of a boolean [K, N] mask's True entries."""
        mask = np.asarray(mask)
        if mask.ndim != 2:
            raise ValueError(f"a sparse pattern needs a 2-D [K, N] mask, not shape {mask.shape}")
        cols, rows = np.nonzero(mask.T)  # by column, then row
        return cls(rows, cols, mask.shape)

    @property
    def nnz(self) -> int:
        return len(self.rows)

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.shape[0] * self.shape[1])

    def gather(self, kernel: jax.Array) -> jax.Array:
        """The [nnz] values of a [K, N] kernel at the pattern's nonzeros (differentiable)."""
        return kernel[self.rows, self.cols]

    def dense(self, values: jax.Array) -> jax.Array:
        """The [K, N] kernel with `values` at the nonzeros, zeros elsewhere."""
        return jnp.zeros(self.shape, values.dtype).at[self.rows, self.cols].set(
            values, unique_indices=True)

    def __repr__(self):
        return f"Pattern(shape={self.shape}, nnz={self.nnz})"


def available() -> bool:
    """Whether the kernels are built and registered with XLA (builds them on the first call)."""
    return _load() is None


def unavailable_reason() -> str | None:
    """Why the kernels cannot run here, in one line; None where they can."""
    return _load()


def matmul(x: jax.Array, values: jax.Array, pattern: Pattern) -> jax.Array:
    """`x @ kernel` for x [..., K] and the [K, N] kernel that is `values` [nnz] at `pattern`'s
    nonzeros and zero elsewhere: [..., N]."""
    _load()  # the CPU lowering is the kernel's once it is registered
    return spmm_p.bind(x, values, pattern=pattern)


def sddmm(x: jax.Array, dy: jax.Array, pattern: Pattern) -> jax.Array:
    """`matmul`'s transpose in `values`: [nnz], sum over the rows r of x [..., K] and dy [..., N]
    of x[r, rows[j]] * dy[r, cols[j]]."""
    _load()
    return sddmm_p.bind(x, dy, pattern=pattern)


# ------------------------------------------------------------------------------ XLA-ops forms


def _reference_spmm(x, values, *, pattern):
    rows = x.reshape(-1, x.shape[-1])
    products = rows[:, pattern.rows] * values  # [R, nnz]
    y = jax.ops.segment_sum(products.T, pattern.cols, pattern.shape[1], indices_are_sorted=True)
    return y.T.reshape(x.shape[:-1] + (pattern.shape[1],))


def _reference_sddmm(x, dy, *, pattern):
    rows, grads = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    return jnp.sum(rows[:, pattern.rows] * grads[:, pattern.cols], axis=0)


def _on_cpu(symbol, reference):
    """The CPU lowering: the kernel for float32, the XLA-ops form for anything else."""
    def lower(x, other, *, pattern):
        if x.dtype != jnp.float32 or other.dtype != jnp.float32:
            return reference(x, other, pattern=pattern)
        out = (jax.ShapeDtypeStruct(x.shape[:-1] + (pattern.shape[1],), x.dtype)
               if symbol == "spmm" else jax.ShapeDtypeStruct((pattern.nnz,), x.dtype))
        return jax.ffi.ffi_call(f"sparse_robust_{symbol}", out)(
            x, other, jnp.asarray(pattern.ptr), jnp.asarray(pattern.rows))
    return lower


@functools.cache
def _load() -> str | None:
    """Builds, loads and registers the kernels (once); None, or why they cannot run here."""
    return native.load(SOURCE, ((spmm_p, "SparseRobustSpmm", _on_cpu("spmm", _reference_spmm)),
                                (sddmm_p, "SparseRobustSddmm",
                                 _on_cpu("sddmm", _reference_sddmm))))


# ------------------------------------------------------------------------------ the primitives


def _spmm_abstract_eval(x, values, *, pattern):
    if x.ndim < 1 or x.shape[-1] != pattern.shape[0] or values.shape != (pattern.nnz,) \
            or x.dtype != values.dtype:
        raise ValueError(f"sparse matmul takes x [..., {pattern.shape[0]}] and values "
                         f"[{pattern.nnz}] of one dtype for {pattern}, not {x.shape} {x.dtype} "
                         f"and {values.shape} {values.dtype}")
    return jax.core.ShapedArray(x.shape[:-1] + (pattern.shape[1],), x.dtype)


def _sddmm_abstract_eval(x, dy, *, pattern):
    if x.ndim < 1 or x.shape[-1] != pattern.shape[0] or dy.shape != x.shape[:-1] + (
            pattern.shape[1],) or x.dtype != dy.dtype:
        raise ValueError(f"sddmm takes x [..., {pattern.shape[0]}] and dy [..., "
                         f"{pattern.shape[1]}] of one dtype for {pattern}, not {x.shape} "
                         f"{x.dtype} and {dy.shape} {dy.dtype}")
    return jax.core.ShapedArray((pattern.nnz,), x.dtype)


def _batch_spmm(args, dims, *, pattern):
    (x, values), (x_dim, values_dim) = args, dims
    if values_dim is None:  # more rows of x: the kernel's own batch
        return spmm_p.bind(jnp.moveaxis(x, x_dim, 0), values, pattern=pattern), 0
    return _loop(spmm_p, args, dims, pattern), 0


def _batch_sddmm(args, dims, *, pattern):
    return _loop(sddmm_p, args, dims, pattern), 0


def _loop(primitive, args, dims, pattern):
    """The primitive once per index of the mapped axis (a batch of values, or of sddmm's
    operands, which it would otherwise sum over)."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    operands = [batching.bdim_at_front(a, d, size) for a, d in zip(args, dims)]
    return jax.lax.map(lambda pair: primitive.bind(*pair, pattern=pattern), operands)


@functools.cache
def _compiled(primitive, pattern):
    return jax.jit(functools.partial(primitive.bind, pattern=pattern))


def _define(name, abstract_eval, reference, batch, transpose_first, transpose_second):
    """A primitive bilinear in its two operands with a static `pattern`, lowered to `reference`
    (until `_load` registers the kernel for CPU); transposes take (cotangent, first, second)."""
    primitive = Primitive(name)
    primitive.def_impl(lambda a, b, *, pattern: _compiled(primitive, pattern)(a, b))
    primitive.def_abstract_eval(abstract_eval)
    ad.defbilinear(primitive, transpose_first, transpose_second)
    batching.primitive_batchers[primitive] = batch
    mlir.register_lowering(primitive, mlir.lower_fun(reference, multiple_results=False))
    return primitive


# <v, sddmm(x, dy)> = <matmul(x, v), dy> = <x, matmul(dy, v[perm], transposed)>: each transpose
# is one of the two primitives, so derivatives of any order stay on the kernels.
spmm_p = _define(
    "sparse_robust_spmm", _spmm_abstract_eval, _reference_spmm, _batch_spmm,
    lambda ct, x, values, *, pattern: matmul(ct, values[pattern.perm], pattern.transposed),
    lambda ct, x, values, *, pattern: sddmm(x, ct, pattern))
sddmm_p = _define(
    "sparse_robust_sddmm", _sddmm_abstract_eval, _reference_sddmm, _batch_sddmm,
    lambda ct, x, dy, *, pattern: matmul(dy, ct[pattern.perm], pattern.transposed),
    lambda ct, x, dy, *, pattern: matmul(x, ct, pattern))
