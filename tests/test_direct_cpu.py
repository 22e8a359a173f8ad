"""Tests for sparse_robust.models.direct_cpu: the direct-convolution CPU kernel against XLA's
convolution, under every transformation, its choice by "auto" and its fallback."""

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

from sparse_robust import models
from sparse_robust.models import direct_cpu

# The kernel must build wherever CI runs; elsewhere the fallback is what is tested.
pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() != "x86_64",
    reason="the kernel is built for Linux on x86-64 only")

# (x shape NHWC, kernel HWIO, padding): LeNet-5's two layers; one image and 17 (a block of 16
# and one more); output channels 1, 11 (8 + a zero-padded block of 3) and 16 (two blocks);
# kernel widths 1, 3 and 7; uneven padding on each side.
CASES = [
    ((5, 28, 28, 1), (5, 5, 1, 6), ((2, 2), (2, 2))),
    ((17, 14, 14, 6), (5, 5, 6, 16), ((0, 0), (0, 0))),
    ((1, 7, 9, 2), (3, 3, 2, 11), ((1, 2), (0, 2))),
    ((20, 6, 5, 3), (2, 7, 3, 1), ((1, 0), (6, 3))),
    ((3, 4, 4, 4), (1, 1, 4, 5), ((0, 0), (0, 0))),
]


def _xla(x, kernel, padding):
    return lax.conv_general_dilated(x, kernel, (1, 1), padding,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=lax.Precision.HIGHEST)


def _inputs(shape, kernel_shape, seed=0):
    kx, kk = jax.random.split(jax.random.key(seed))
    fan_in = np.prod(kernel_shape[:3])
    return jax.random.normal(kx, shape), jax.random.normal(kk, kernel_shape) / np.sqrt(fan_in)


def _close(got, want, rtol=1e-5):
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * float(jnp.abs(want).max()))


def _loss(conv, padding):
    return lambda x, k: jnp.sum(jnp.sin(conv(x, k, padding)))


def test_the_kernel_builds_here():
    assert direct_cpu.available(), direct_cpu.unavailable_reason()
    assert direct_cpu.unavailable_reason() is None


def test_forward_and_input_gradient_run_as_the_kernel():
    """The input gradient, which every attack takes, is the kernel too; the kernel gradient is
    XLA's (the patches path)."""
    x, kernel = _inputs(*CASES[1][:2])
    hlo = jax.jit(jax.grad(_loss(direct_cpu.conv, CASES[1][2]))).lower(x, kernel).as_text()
    calls = [line for line in hlo.splitlines() if "stablehlo.custom_call" in line]
    assert sum("sparse_robust_direct_conv" in line for line in calls) == 2


@pytest.mark.parametrize("shape, kernel_shape, padding", CASES)
def test_forward_and_gradients_match_xla(shape, kernel_shape, padding):
    x, kernel = _inputs(shape, kernel_shape)
    _close(jax.jit(direct_cpu.conv, static_argnums=2)(x, kernel, padding),
           _xla(x, kernel, padding))
    got = jax.jit(jax.grad(_loss(direct_cpu.conv, padding), (0, 1)))(x, kernel)
    want = jax.grad(_loss(_xla, padding), (0, 1))(x, kernel)
    for g, w in zip(got, want):
        _close(g, w)


def test_same_inputs_same_bits():
    """Work units go to whichever thread is free, but each sum runs in one fixed order."""
    x, kernel = _inputs((40, 14, 14, 6), (5, 5, 6, 16))
    fn = jax.jit(jax.value_and_grad(_loss(direct_cpu.conv, ((1, 1), (2, 2))), (0, 1)))
    first = jax.tree_util.tree_leaves(fn(x, kernel))
    for _ in range(3):
        for a, b in zip(first, jax.tree_util.tree_leaves(fn(x, kernel))):
            np.testing.assert_array_equal(a, b)


def test_forward_mode_second_order_and_linear_transpose():
    shape, kernel_shape, padding = CASES[2]
    x, kernel = _inputs(shape, kernel_shape)
    tangent = jax.random.normal(jax.random.key(5), x.shape)
    jvp = lambda conv: jax.jvp(lambda x: conv(x, kernel, padding), (x,), (tangent,))[1]
    _close(jvp(direct_cpu.conv), jvp(_xla))
    # Second order through the input: a Hessian-vector product of the loss in x.
    hvp = lambda conv: jax.jvp(jax.grad(lambda x: _loss(conv, padding)(x, kernel)), (x,),
                               (tangent,))[1]
    _close(hvp(direct_cpu.conv), hvp(_xla), rtol=1e-4)
    y = _xla(x, kernel, padding)
    transpose = lambda conv: jax.linear_transpose(lambda x: conv(x, kernel, padding), x)(y)[0]
    _close(transpose(direct_cpu.conv), transpose(_xla))


def test_vmap_over_inputs_kernels_or_both():
    shape, kernel_shape, padding = CASES[0]
    xs, kernels = zip(*[_inputs((3, *shape[1:]), kernel_shape, seed) for seed in range(3)])
    xs, kernels = jnp.stack(xs), jnp.stack(kernels)
    conv = lambda x, k: direct_cpu.conv(x, k, padding)
    both = jax.jit(jax.vmap(conv))(xs, kernels)
    only_x = jax.vmap(conv, (0, None))(xs, kernels[0])
    nested = jax.vmap(jax.vmap(conv, (0, None)), (None, 0))(xs, kernels)  # [kernel, x, ...]
    for i in range(3):
        _close(both[i], _xla(xs[i], kernels[i], padding))
        _close(only_x[i], _xla(xs[i], kernels[0], padding))
        for j in range(3):
            _close(nested[i, j], _xla(xs[j], kernels[i], padding))
    # Per-trial input gradients, the batch axis not leading.
    loss = lambda conv: lambda x, k: jnp.sum(jnp.sin(conv(x, k, padding)))
    got = jax.vmap(jax.grad(loss(direct_cpu.conv)), (1, 0))(jnp.moveaxis(xs, 0, 1), kernels)
    for i in range(3):
        _close(got[i], jax.grad(loss(_xla))(xs[i], kernels[i]))


def test_inside_a_loop_of_gradient_steps():
    """PGD's shape: repeated input gradients in a fori_loop, against the same loop on XLA's."""
    shape, kernel_shape, padding = CASES[1]
    x, kernel = _inputs(shape, kernel_shape)

    def attack(conv):
        grad = jax.grad(lambda x: jnp.sum(conv(x, kernel, padding) ** 2))
        step = lambda _, x: x + 0.01 * jnp.sign(grad(x))
        return jax.jit(lambda x: lax.fori_loop(0, 5, step, x))(x)

    _close(attack(direct_cpu.conv), attack(_xla))


def test_lenet5_runs_its_convolutions_on_the_kernel_and_keeps_its_outputs():
    x = jax.random.uniform(jax.random.key(0), (19, 28, 28, 1))
    model = models.get_model("lenet-5")
    variables = model.init(jax.random.key(1), x[:1])
    assert models.conv_impls(model, x) == {"conv_0": "direct_cpu", "conv_1": "direct_cpu"}
    reference = models.get_model("lenet-5", conv_impl="xla")
    loss = lambda m: lambda x: jnp.sum(jax.nn.log_softmax(m.apply(variables, x))[:, 3])
    _close(jax.jit(model.apply)(variables, x), reference.apply(variables, x))
    _close(jax.jit(jax.grad(loss(model)))(x), jax.grad(loss(reference))(x))


def test_bad_operands_are_refused_with_shapes():
    x = jnp.zeros((2, 5, 5, 3))
    with pytest.raises(ValueError, match="same leading dimensions"):
        direct_cpu.conv(x, jnp.zeros((2, 3, 3, 3, 4)), ((1, 1), (1, 1)))
    with pytest.raises(ValueError, match=r"does not fit x \(2, 5, 5, 3\)"):
        direct_cpu.conv(x, jnp.zeros((3, 3, 2, 4)), ((1, 1), (1, 1)))
    with pytest.raises(ValueError, match="does not fit"):
        direct_cpu.conv(x, jnp.zeros((7, 3, 3, 4)), ((0, 0), (1, 1)))


def test_serves():
    valid = ((0, 0), (0, 0))
    assert direct_cpu.serves((5, 5, 6, 16), (1, 1), valid)
    assert direct_cpu.serves((7, 1, 6, 16), (1, 1), ((6, 6), (0, 0)))
    assert not direct_cpu.serves((5, 5, 6, 16), (2, 2), valid)       # strided
    assert not direct_cpu.serves((5, 4, 6, 16), (1, 1), valid)       # even width
    assert not direct_cpu.serves((9, 5, 6, 16), (1, 1), valid)       # taller than 7
    assert not direct_cpu.serves((5, 5, 6, 16), (1, 1), ((5, 0), (0, 0)))  # pad >= kernel
    assert not direct_cpu.serves((5, 5, 6, 16), (1, 1), valid, jnp.bfloat16)


_PROBE = """
import json, jax, jax.numpy as jnp
from sparse_robust import models
from sparse_robust.models import direct_cpu, native
x = jax.random.uniform(jax.random.key(0), (4, 28, 28, 1))
model = models.get_model("lenet-5")
variables = model.init(jax.random.key(1), x)
error = jnp.max(jnp.abs(model.apply(variables, x) -
                        models.get_model("lenet-5", conv_impl="xla").apply(variables, x)))
print(json.dumps({"reason": direct_cpu.unavailable_reason(), "devices": jax.device_count(),
                  "impls": models.conv_impls(model, x), "error": float(error),
                  "files": sorted(p.name for p in native.cache_dir().glob("*"))}))
"""


def _probe(**env):
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                         env=dict(os.environ, **env), check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_without_a_compiler_lenet5_falls_back_to_patches(tmp_path):
    got = _probe(SPARSE_ROBUST_CACHE=str(tmp_path / "cache"), CXX="no-such-compiler")
    assert got["reason"] == ("no C++ compiler: 'no-such-compiler' is not on PATH "
                             "(install g++ or set $CXX)")
    assert got["impls"] == {"conv_0": "patches", "conv_1": "patches"}
    assert got["error"] < 1e-4
    assert got["files"] == []


def test_on_several_devices_auto_keeps_patches():
    """XLA's partitioner would gather an FFI call's operands across devices."""
    got = _probe(XLA_FLAGS="--xla_force_host_platform_device_count=8")
    assert got["devices"] == 8
    assert got["impls"] == {"conv_0": "patches", "conv_1": "patches"}


def test_a_float64_call_of_a_float32_layer_runs_the_patches_path():
    """The kernel is float32; promoted float64 inputs (x64 on) take the patches path."""
    from sparse_robust.models import Conv

    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1), jnp.float64)
        layer = Conv(6, (5, 5), padding="SAME", conv_impl="direct_cpu")
        y, variables = layer.init_with_output(jax.random.key(1), x)
        assert y.dtype == jnp.float64
        want = _xla(x, variables["params"]["kernel"].astype(jnp.float64), ((2, 2), (2, 2)))
        np.testing.assert_allclose(y, want + variables["params"]["bias"], rtol=1e-10, atol=1e-10)
