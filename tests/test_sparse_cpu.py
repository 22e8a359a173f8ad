"""Tests for sparse_robust.models.sparse_cpu: the sparse x dense kernels against the dense product
of the same kernel, under every transformation, and their XLA-ops fallback."""

import json
import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from sparse_robust.models import sparse_cpu
from sparse_robust.models.sparse_cpu import Pattern

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() != "x86_64",
    reason="the kernel is built for Linux on x86-64 only")

# (x shape, N, density): rows below, at and past a 64-row block, widths that are and are not
# multiples of 8, a leading batch dimension, an almost empty and a fairly dense pattern, and one
# block with enough columns to be split over threads.
CASES = [((7, 13), 5, 0.3), ((64, 40), 24, 0.1), ((150, 33), 17, 0.05),
         ((3, 70, 16), 9, 0.2), ((130, 784), 300, 0.01), ((50, 40), 70, 0.1)]


def _case(shape, n, density, seed=0):
    rng = np.random.default_rng(seed)
    mask = rng.random((shape[-1], n)) < density
    mask[0, 0] = True  # at least one nonzero
    mask[:, -1] = False  # an output column with none
    pattern = Pattern.of(mask)
    values = jnp.asarray(rng.standard_normal(pattern.nnz), jnp.float32)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    return x, values, pattern


def _dense(x, values, pattern):
    return jnp.matmul(x, pattern.dense(values), precision=lax.Precision.HIGHEST)


def _close(got, want, tol=1e-5):
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, float(jnp.abs(want).max())))


def test_the_kernel_builds_here():
    assert sparse_cpu.available(), sparse_cpu.unavailable_reason()


def test_pattern_lists_the_mask_and_its_transpose():
    mask = np.array([[1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 0, 0]], bool)
    p = Pattern.of(mask)
    assert p.shape == (4, 3) and p.nnz == 5 and p.density == 5 / 12
    assert list(zip(p.rows, p.cols)) == [(0, 0), (2, 0), (2, 1), (0, 2), (1, 2)]
    assert list(p.ptr) == [0, 2, 3, 5]
    t = p.transposed
    assert t.shape == (3, 4) and t.transposed is p
    kernel = jnp.arange(12.0).reshape(4, 3) * mask
    np.testing.assert_array_equal(t.dense(p.gather(kernel)[p.perm]), kernel.T)
    np.testing.assert_array_equal(p.dense(t.gather(kernel.T)[t.perm]), kernel)
    with pytest.raises(ValueError, match=r"2-D \[K, N\] mask"):
        Pattern.of(np.ones((2, 2, 2), bool))


@pytest.mark.parametrize("shape, n, density", CASES)
def test_product_and_gradients_match_the_dense_product(shape, n, density):
    x, values, pattern = _case(shape, n, density)
    _close(jax.jit(sparse_cpu.matmul, static_argnums=2)(x, values, pattern),
           _dense(x, values, pattern))
    loss = lambda mm: lambda x, v: jnp.sum(jnp.sin(mm(x, v, pattern)))
    got = jax.jit(jax.grad(loss(sparse_cpu.matmul), (0, 1)))(x, values)
    want = jax.grad(loss(_dense), (0, 1))(x, values)
    for g, w in zip(got, want):
        _close(g, w)


def test_it_runs_as_the_kernels_on_cpu():
    """Forward and input gradient are spmm calls, the values' gradient one sddmm call."""
    x, values, pattern = _case(*CASES[2])
    hlo = jax.jit(jax.grad(lambda x, v: jnp.sum(sparse_cpu.matmul(x, v, pattern) ** 2),
                           (0, 1))).lower(x, values).as_text()
    calls = [line for line in hlo.splitlines() if "stablehlo.custom_call" in line]
    assert sum("sparse_robust_spmm" in line for line in calls) == 2
    assert sum("sparse_robust_sddmm" in line for line in calls) == 1
    assert "dot_general" not in hlo


def test_same_inputs_same_bits():
    x, values, pattern = _case((1000, 100), 80, 0.05)
    fn = jax.jit(jax.value_and_grad(
        lambda x, v: jnp.sum(jnp.sin(sparse_cpu.matmul(x, v, pattern))), (0, 1)))
    first = jax.tree_util.tree_leaves(fn(x, values))
    for _ in range(3):
        for a, b in zip(first, jax.tree_util.tree_leaves(fn(x, values))):
            np.testing.assert_array_equal(a, b)


def test_forward_mode_second_order_and_linear_transpose():
    x, values, pattern = _case(*CASES[2])
    tx = jax.random.normal(jax.random.key(1), x.shape)
    tv = jax.random.normal(jax.random.key(2), values.shape)
    jvp = lambda mm: jax.jvp(lambda x, v: mm(x, v, pattern), (x, values), (tx, tv))[1]
    _close(jvp(sparse_cpu.matmul), jvp(_dense))
    # Hessian-vector products through both operands: forward over reverse.
    loss = lambda mm: lambda x, v: jnp.sum(jnp.sin(mm(x, v, pattern)))
    for argnum, tangent in ((0, tx), (1, tv)):
        primal = (x, values)[argnum]
        hvp = lambda mm: jax.jvp(
            lambda p: jax.grad(loss(mm), argnum)(*((p, values) if argnum == 0 else (x, p))),
            (primal,), (tangent,))[1]
        _close(hvp(sparse_cpu.matmul), hvp(_dense), 1e-4)
    y = _dense(x, values, pattern)
    transpose = lambda mm: jax.linear_transpose(lambda x: mm(x, values, pattern), x)(y)[0]
    _close(transpose(sparse_cpu.matmul), transpose(_dense))
    # sddmm is the transpose in the values; its own transposes are products.
    dy = jax.random.normal(jax.random.key(3), y.shape)
    want = jax.linear_transpose(lambda v: _dense(x, v, pattern), values)(dy)[0]
    _close(sparse_cpu.sddmm(x, dy, pattern), want)
    _close(jax.linear_transpose(lambda dy: sparse_cpu.sddmm(x, dy, pattern), dy)(values)[0],
           _dense(x, values, pattern))
    _close(jax.linear_transpose(lambda x: sparse_cpu.sddmm(x, dy, pattern), x)(values)[0],
           jax.linear_transpose(lambda x: _dense(x, values, pattern), x)(dy)[0])


def test_vmap_over_inputs_values_or_both():
    x, values, pattern = _case((20, 30), 12, 0.2)
    xs, vs = jnp.stack([x, 2 * x, -x]), jnp.stack([values, -values, 3 * values])
    mm = lambda x, v: sparse_cpu.matmul(x, v, pattern)
    dense = lambda x, v: _dense(x, v, pattern)
    for axes in ((0, None), (None, 0), (0, 0)):
        args = [stacked if axis == 0 else one for stacked, one, axis in zip((xs, vs), (x, values),
                                                                            axes)]
        _close(jax.jit(jax.vmap(mm, axes))(*args), jax.vmap(dense, axes)(*args))
    # Per-item gradients in the values (vmapped sddmm); the batch axis need not lead.
    loss = lambda f: lambda x, v: jnp.sum(jnp.sin(f(x, v)))
    got = jax.vmap(jax.grad(loss(mm), 1), (1, 0))(jnp.moveaxis(xs, 0, 1), vs)
    _close(got, jax.vmap(jax.grad(loss(dense), 1))(xs, vs))


def test_inside_a_loop_of_gradient_steps():
    """PGD's shape: input gradients in a fori_loop, against the same loop on the dense product."""
    x, values, pattern = _case((40, 50), 10, 0.1)

    def attack(mm):
        grad = jax.grad(lambda x: jnp.sum(jnp.tanh(mm(x, values, pattern))))
        step = lambda _, x: x + 0.01 * jnp.sign(grad(x))
        return jax.jit(lambda x: lax.fori_loop(0, 5, step, x))(x)

    np.testing.assert_array_equal(attack(sparse_cpu.matmul), attack(_dense))


def test_the_xla_forms_and_other_dtypes():
    x, values, pattern = _case(*CASES[2])
    _close(sparse_cpu._reference_spmm(x, values, pattern=pattern), _dense(x, values, pattern))
    dy = jax.random.normal(jax.random.key(4), x.shape[:-1] + (pattern.shape[1],))
    _close(sparse_cpu._reference_sddmm(x, dy, pattern=pattern), sparse_cpu.sddmm(x, dy, pattern))
    # bfloat16 runs the XLA form (the kernel is float32 only).
    got = sparse_cpu.matmul(x.astype(jnp.bfloat16), values.astype(jnp.bfloat16), pattern)
    assert got.dtype == jnp.bfloat16
    _close(got.astype(jnp.float32), _dense(x, values, pattern), 5e-2)


def test_bad_operands_are_refused_with_shapes():
    x, values, pattern = _case((4, 6), 3, 0.5)
    with pytest.raises(ValueError, match=r"x \[\.\.\., 6\] and values \[\d+\]"):
        sparse_cpu.matmul(x[:, :5], values, pattern)
    with pytest.raises(ValueError, match=r"x \[\.\.\., 6\] and values \[\d+\]"):
        sparse_cpu.matmul(x, values[:-1], pattern)


_PROBE = """
import json, jax, jax.numpy as jnp, numpy as np
from sparse_robust.models import sparse_cpu, sparse_execution
mask = np.eye(6, 4, dtype=bool)
p = sparse_cpu.Pattern.of(mask)
x = jnp.arange(12.0).reshape(2, 6)
hlo = jax.jit(lambda x: sparse_cpu.matmul(x, jnp.ones(p.nnz), p)).lower(x).as_text()
print(json.dumps({"reason": sparse_cpu.unavailable_reason(),
                  "y": sparse_cpu.matmul(x, jnp.ones(p.nnz), p).tolist(),
                  "custom_call": "custom_call" in hlo,
                  "auto": sparse_execution.sparse_impls({"d": {"kernel": mask}}),
                  "forced": sparse_execution.sparse_impls({"d": {"kernel": mask}}, "sparse")}))
"""


def test_without_a_compiler_it_runs_xla_ops_and_auto_stays_dense(tmp_path):
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True,
                         env=dict(os.environ, SPARSE_ROBUST_CACHE=str(tmp_path),
                                  CXX="no-such-compiler")).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got["reason"] == ("no C++ compiler: 'no-such-compiler' is not on PATH "
                             "(install g++ or set $CXX)")
    assert got["y"] == (np.arange(12.0).reshape(2, 6) @ np.eye(6, 4)).tolist()
    assert not got["custom_call"]
    assert got["auto"] == {"d": "dense"} and got["forced"] == {"d": "sparse"}
    assert list(tmp_path.iterdir()) == []
