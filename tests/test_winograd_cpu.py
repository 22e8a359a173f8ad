"""Tests for sparse_robust.models.winograd_cpu: the fused CPU kernel against XLA's convolution,
under every transformation, its build cache and its fallback."""

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

from sparse_robust.models import winograd_cpu
from sparse_robust.models.winograd import transformed_kernel

# The kernel must build wherever CI runs; elsewhere the fallback is what is tested.
pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() != "x86_64",
    reason="the kernel is built for Linux on x86-64 only")

# (x shape NHWC, cout): odd and even sizes, one image, 16-wide and 32-wide channel blocks, and
# enough tiles for several blocks and both threads.
SHAPES = [((2, 7, 9, 16), 32), ((1, 4, 4, 32), 48), ((3, 8, 5, 48), 16), ((5, 14, 14, 64), 64)]


def _xla(x, kernel):
    return lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=lax.Precision.HIGHEST)


def _fused(x, kernel):
    return winograd_cpu.conv3x3(x, transformed_kernel(kernel))


def _inputs(shape, cout, seed=0):
    kx, kk = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, shape)
    return x, jax.random.normal(kk, (3, 3, shape[-1], cout)) / np.sqrt(9 * shape[-1])


def _close(got, want, rtol=1e-5):
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * float(jnp.abs(want).max()))


def test_the_kernel_builds_here():
    assert winograd_cpu.available(), winograd_cpu.unavailable_reason()
    assert winograd_cpu.unavailable_reason() is None


def test_it_runs_as_the_kernels_on_cpu():
    """Forward, input gradient and kernel gradient are FFI calls, not the XLA-ops lowering."""
    x, kernel = _inputs(*SHAPES[0])
    hlo = jax.jit(jax.grad(lambda x, k: jnp.sum(_fused(x, k) ** 2), (0, 1))).lower(x, kernel)
    calls = [line for line in hlo.as_text().splitlines() if "stablehlo.custom_call" in line]
    assert sum("sparse_robust_winograd_conv3x3" in line for line in calls) == 2
    assert sum("sparse_robust_winograd_kernel_grad" in line for line in calls) == 1
    # The only other products are G g G^T and its transpose, with the 4x3 matrix G.
    dots = [line for line in hlo.as_text().splitlines() if "dot_general" in line]
    assert dots and all("tensor<4x3xf32>" in line for line in dots)


@pytest.mark.parametrize("shape, cout", SHAPES)
def test_forward_and_gradients_match_xla(shape, cout):
    x, kernel = _inputs(shape, cout)
    _close(jax.jit(_fused)(x, kernel), _xla(x, kernel))
    loss = lambda conv: lambda x, k: jnp.sum(jnp.sin(conv(x, k)))
    got = jax.jit(jax.grad(loss(_fused), (0, 1)))(x, kernel)
    want = jax.grad(loss(_xla), (0, 1))(x, kernel)
    for g, w in zip(got, want):
        _close(g, w)


def test_same_inputs_same_bits():
    """Blocks go to whichever thread is free, but each sum runs in one fixed order."""
    x, kernel = _inputs((8, 14, 14, 64), 64)
    fn = jax.jit(jax.value_and_grad(lambda x, k: jnp.sum(jnp.sin(_fused(x, k))), (0, 1)))
    first = jax.tree_util.tree_leaves(fn(x, kernel))
    for _ in range(3):
        for a, b in zip(first, jax.tree_util.tree_leaves(fn(x, kernel))):
            np.testing.assert_array_equal(a, b)


def test_forward_mode_second_order_and_linear_transpose():
    x, kernel = _inputs(*SHAPES[0])
    tangent = jax.random.normal(jax.random.key(5), x.shape)
    for conv in (_fused, _xla):
        assert conv(x, kernel).shape == x.shape[:3] + (32,)
    jvp = lambda conv: jax.jvp(lambda x: conv(x, kernel), (x,), (tangent,))[1]
    _close(jvp(_fused), jvp(_xla))
    # A Hessian-vector product in the kernel: forward over reverse through both of its arguments.
    loss = lambda conv: lambda k: jnp.sum(jnp.sin(conv(x, k)))
    hvp = lambda conv: jax.jvp(jax.grad(loss(conv)), (kernel,), (kernel,))[1]
    _close(hvp(_fused), hvp(_xla), rtol=1e-4)
    y = _xla(x, kernel)
    transpose = lambda conv: jax.linear_transpose(lambda x: conv(x, kernel), x)(y)[0]
    _close(transpose(_fused), transpose(_xla))


@pytest.mark.parametrize("shape, cout", SHAPES[:3])
def test_kernel_grad_is_the_transpose_in_the_transformed_kernel(shape, cout):
    x, kernel = _inputs(shape, cout)
    dy = jax.random.normal(jax.random.key(7), shape[:-1] + (cout,))
    u = transformed_kernel(kernel)
    want = jax.linear_transpose(lambda u: winograd_cpu._reference_conv(x, u), u)(dy)[0]
    _close(jax.jit(winograd_cpu.kernel_grad)(x, dy), want)
    # Its own transposes (second-order derivatives) are the convolution's.
    w = jax.random.normal(jax.random.key(8), u.shape)
    _close(jax.linear_transpose(lambda dy: winograd_cpu.kernel_grad(x, dy), dy)(w)[0],
           winograd_cpu._reference_conv(x, w))
    # Stacked trials: one kernel gradient per item.
    xs, dys = jnp.stack([x, -x]), jnp.stack([dy, 2 * dy])
    got = jax.vmap(winograd_cpu.kernel_grad)(xs, dys)
    _close(got[1], -2 * want)


def test_flipped_kernel_is_the_transform_of_the_flipped_kernel():
    _, kernel = _inputs((1, 4, 4, 16), 32)
    flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)
    _close(winograd_cpu._flipped(transformed_kernel(kernel)), transformed_kernel(flipped))


def test_vmap_over_inputs_kernels_or_both():
    xs, kernels = zip(*[_inputs((2, 6, 7, 16), 32, seed) for seed in range(3)])
    xs, kernels = jnp.stack(xs), jnp.stack(kernels)
    both = jax.jit(jax.vmap(_fused))(xs, kernels)
    only_x = jax.vmap(_fused, (0, None))(xs, kernels[0])
    only_kernel = jax.vmap(_fused, (None, 0))(xs[0], kernels)
    nested = jax.vmap(jax.vmap(_fused, (0, None)), (None, 0))(xs, kernels)  # [kernel, x, ...]
    for i in range(3):
        _close(both[i], _xla(xs[i], kernels[i]))
        _close(only_x[i], _xla(xs[i], kernels[0]))
        _close(only_kernel[i], _xla(xs[0], kernels[i]))
        for j in range(3):
            _close(nested[i, j], _xla(xs[j], kernels[i]))
    # Per-trial gradients, as trials_at_once takes them; the batch axis need not lead.
    loss = lambda conv: lambda x, k: jnp.sum(jnp.sin(conv(x, k)))
    got = jax.vmap(jax.grad(loss(_fused), 1), (1, 0))(jnp.moveaxis(xs, 0, 1), kernels)
    for i in range(3):
        _close(got[i], jax.grad(loss(_xla), 1)(xs[i], kernels[i]))


def test_inside_a_loop_of_gradient_steps():
    """PGD's shape: repeated input gradients in a fori_loop, against the same loop on XLA's."""
    x, kernel = _inputs((4, 10, 10, 16), 16)

    def attack(conv):
        grad = jax.grad(lambda x: jnp.sum(conv(x, kernel) ** 2))
        step = lambda _, x: x + 0.01 * jnp.sign(grad(x))
        return jax.jit(lambda x: lax.fori_loop(0, 5, step, x))(x)

    _close(attack(_fused), attack(_xla))


def test_bad_operands_are_refused_with_shapes():
    x = jnp.zeros((2, 5, 5, 16))
    with pytest.raises(ValueError, match="same leading dimensions"):
        winograd_cpu.conv3x3(x, jnp.zeros((2, 16, 16, 16)))
    with pytest.raises(ValueError, match=r"u must be \[\.\.\., 16, 16, cout\]"):
        winograd_cpu.conv3x3(x, jnp.zeros((9, 16, 16)))


def test_serves():
    same = ((1, 1), (1, 1))
    assert winograd_cpu.serves((3, 3, 16, 32), (1, 1), same)
    assert not winograd_cpu.serves((3, 3, 16, 8), (1, 1), same)      # cout not a multiple of 16
    assert not winograd_cpu.serves((3, 3, 24, 32), (1, 1), same)     # cin not a multiple of 16
    assert not winograd_cpu.serves((3, 3, 16, 32), (2, 2), same)
    assert not winograd_cpu.serves((3, 3, 16, 32), (1, 1), ((0, 0), (0, 0)))
    assert not winograd_cpu.serves((5, 5, 16, 32), (1, 1), ((2, 2), (2, 2)))
    assert not winograd_cpu.serves((3, 3, 16, 32), (1, 1), same, jnp.bfloat16)


_MESH = """
import json, jax, jax.numpy as jnp, numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from sparse_robust import models
from sparse_robust.models import winograd_cpu
from sparse_robust.models.winograd import transformed_kernel
mesh = Mesh(np.array(jax.devices()), ("data",))
x = jax.device_put(jax.random.normal(jax.random.key(0), (16, 6, 6, 16)),
                   NamedSharding(mesh, P("data")))
k = jax.random.normal(jax.random.key(1), (3, 3, 16, 32)) * 0.1
loss = lambda conv: lambda x, k: jnp.sum(jnp.sin(conv(x, k)))
fused = jax.jit(jax.value_and_grad(loss(lambda x, k: winograd_cpu.conv3x3(
    x, transformed_kernel(k))), (0, 1)))(x, k)
xla = jax.value_and_grad(loss(lambda x, k: lax.conv_general_dilated(
    x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))), (0, 1))(x, k)
errors = [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
          for a, b in zip(jax.tree_util.tree_leaves(fused), jax.tree_util.tree_leaves(xla))]
impls = models.conv_impls(models.get_model("conv-4"), jnp.zeros((1, 28, 28, 1)))
print(json.dumps({"devices": jax.device_count(), "errors": errors, "impls": impls}))
"""


def test_on_a_device_mesh_explicit_kernels_agree_and_auto_keeps_xla_winograd():
    """XLA's partitioner gathers an FFI call's operands: right numbers, but "auto" does not pick
    the kernel on several devices."""
    out = subprocess.run([sys.executable, "-c", _MESH], capture_output=True, text=True, check=True,
                         env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["devices"] == 8
    assert max(got["errors"]) < 1e-5
    assert got["impls"] == {"conv_0": "patches", "conv_1": "winograd", "conv_2": "winograd",
                            "conv_3": "winograd"}


_PROBE = """
import json, jax.numpy as jnp
from sparse_robust import models
from sparse_robust.models import winograd_cpu
impls = models.conv_impls(models.get_model("conv-4"), jnp.zeros((1, 28, 28, 1)))
print(json.dumps({"reason": winograd_cpu.unavailable_reason(), "impls": impls,
                  "files": sorted(p.name for p in winograd_cpu.cache_dir().glob("*"))}))
"""


def _probe(**env):
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                         env=dict(os.environ, **env), check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_builds_once_into_the_cache_and_reuses_it(tmp_path):
    cache = tmp_path / "cache"
    first = _probe(SPARSE_ROBUST_CACHE=str(cache))
    assert first["reason"] is None
    assert first["impls"]["conv_1"] == "winograd_cpu"
    [library] = first["files"]  # one library, no temporary left behind
    built = (cache / library).stat().st_mtime_ns
    assert _probe(SPARSE_ROBUST_CACHE=str(cache))["files"] == [library]
    assert (cache / library).stat().st_mtime_ns == built


def test_without_a_compiler_conv_falls_back_to_xla_winograd(tmp_path):
    got = _probe(SPARSE_ROBUST_CACHE=str(tmp_path / "cache"), CXX="no-such-compiler")
    assert got["reason"] == ("no C++ compiler: 'no-such-compiler' is not on PATH "
                             "(install g++ or set $CXX)")
    assert got["impls"] == {"conv_0": "patches", "conv_1": "winograd", "conv_2": "winograd",
                            "conv_3": "winograd"}
    assert got["files"] == []
