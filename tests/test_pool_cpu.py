"""Tests for sparse_robust.models.pool_cpu: the 2x2 max-pool kernels against flax's nn.max_pool
(tests/test_pooling.py holds the cases both paths share), what they serve, and where they run."""

import json
import os
import platform
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_robust.models import pool_cpu
from sparse_robust.models.pooling import max_pool

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() != "x86_64",
    reason="the kernel is built for Linux on x86-64 only")


def _reference(x):
    return nn.max_pool(x, (2, 2), strides=(2, 2))


def _tied(shape, seed=0):
    """Values on a coarse grid after a ReLU: many windows hold equal maxima."""
    return jax.nn.relu(jnp.round(2.0 * jax.random.normal(jax.random.key(seed), shape)) / 2.0)


def test_serves_2x2_windows_of_at_most_16_float32_channels_here():
    assert pool_cpu.serves(jnp.zeros((2, 4, 4, 16)), (2, 2))
    assert not pool_cpu.serves(jnp.zeros((2, 4, 4, 17)), (2, 2))
    assert not pool_cpu.serves(jnp.zeros((2, 6, 6, 4)), (3, 3))
    assert not pool_cpu.serves(jnp.zeros((2, 4, 4, 4), jnp.bfloat16), (2, 2))


def test_forward_and_gradient_run_as_the_kernels():
    x = _tied((3, 8, 8, 6))
    hlo = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(max_pool(x, (2, 2)))))).lower(x).as_text()
    calls = [line for line in hlo.splitlines() if "stablehlo.custom_call" in line]
    assert sum("sparse_robust_max_pool" in line for line in calls) == 1
    assert sum("sparse_robust_pool_scatter" in line for line in calls) == 1
    hlo = jax.jit(lambda x: jax.jvp(lambda x: max_pool(x, (2, 2)), (x,), (x,))).lower(x).as_text()
    assert "sparse_robust_pool_select" in hlo


# One image with an odd number of output columns; LeNet-5's two pools; one channel; 16 channels
# (one full vector per column); 17 channels, which run as XLA ops.
@pytest.mark.parametrize("shape", [(1, 2, 6, 3), (113, 28, 28, 6), (9, 10, 10, 16),
                                   (4, 8, 14, 1), (3, 4, 4, 17)])
def test_values_gradients_and_tangents_equal_nn_max_pool_with_ties(shape):
    x = _tied(shape)
    y, vjp = jax.vjp(jax.jit(lambda x: max_pool(x, (2, 2))), x)
    y_ref, vjp_ref = jax.vjp(_reference, x)
    np.testing.assert_array_equal(y, y_ref)
    cotangent = jax.random.normal(jax.random.key(1), y.shape)
    np.testing.assert_array_equal(vjp(cotangent)[0], vjp_ref(cotangent)[0])
    tangent = jax.random.normal(jax.random.key(2), shape)
    x = jax.random.normal(jax.random.key(3), shape)  # no ties: forward mode is exact there
    np.testing.assert_array_equal(jax.jvp(lambda x: max_pool(x, (2, 2)), (x,), (tangent,))[1],
                                  jax.jvp(_reference, (x,), (tangent,))[1])


def test_use_kernel_false_runs_the_xla_ops_with_the_same_values_and_gradient():
    x = _tied((5, 8, 6, 6))
    pools = {flag: (lambda x, flag=flag: pool_cpu.max_pool(x, (2, 2), use_kernel=flag))
             for flag in (True, False)}
    hlo = {flag: jax.jit(jax.grad(lambda x: jnp.sum(pools[flag](x)))).lower(x).as_text()
           for flag in (True, False)}
    assert "sparse_robust_pool_scatter" in hlo[True] and "custom_call" not in hlo[False]
    cotangent = jax.random.normal(jax.random.key(1), (5, 4, 3, 6))
    for flag in (True, False):
        y, vjp = jax.vjp(pools[flag], x)
        np.testing.assert_array_equal(y, _reference(x))
        np.testing.assert_array_equal(vjp(cotangent)[0], jax.vjp(_reference, x)[1](cotangent)[0])


def test_a_window_with_a_nan_pools_to_nan():
    x = jax.random.normal(jax.random.key(0), (2, 4, 6, 5)).at[1, 2, 3, 4].set(jnp.nan)
    y = jax.jit(lambda x: max_pool(x, (2, 2)))(x)
    assert np.isnan(y[1, 1, 1, 4])
    assert np.isnan(y).sum() == 1
    np.testing.assert_array_equal(np.isnan(y), np.isnan(_reference(x)))


def test_second_order_and_vmap():
    """A Hessian-vector product through conv-like features and the pool, and a vmapped batch of
    batches, against nn.max_pool's."""
    x = jax.random.normal(jax.random.key(0), (3, 6, 8, 4))
    w = jax.random.normal(jax.random.key(1), (4, 4))
    loss = lambda pool: lambda x: jnp.sum(jnp.sin(pool(jnp.tanh(x @ w)) ** 2))
    hvp = lambda pool: jax.jvp(jax.grad(loss(pool)), (x,), (x,))[1]
    np.testing.assert_allclose(hvp(lambda x: max_pool(x, (2, 2))), hvp(_reference),
                               rtol=1e-5, atol=1e-5)
    stacked = jnp.stack([x, -x])
    got = jax.jit(jax.vmap(jax.grad(loss(lambda x: max_pool(x, (2, 2))))))(stacked)
    for i in range(2):
        np.testing.assert_allclose(got[i], jax.grad(loss(_reference))(stacked[i]), rtol=1e-5,
                                   atol=1e-6)


def test_on_several_devices_the_pool_runs_as_xla_ops():
    """XLA's partitioner would gather an FFI call's operands across devices."""
    probe = ("import json, jax, jax.numpy as jnp\n"
             "from sparse_robust.models import pool_cpu\n"
             "from sparse_robust.models.pooling import max_pool\n"
             "x = jnp.zeros((8, 4, 4, 6))\n"
             "hlo = jax.jit(lambda x: max_pool(x, (2, 2))).lower(x).as_text()\n"
             "print(json.dumps({'devices': jax.device_count(),\n"
             "                  'kernel': 'sparse_robust_max_pool' in hlo}))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"devices": 8, "kernel": False}
