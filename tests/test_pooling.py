"""Tests for sparse_robust.models.pooling.max_pool against flax's nn.max_pool."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_robust.models.pooling import adaptive_avg_pool, max_pool

CASES = [((3, 8, 8, 4), (2, 2), "VALID"), ((3, 7, 9, 4), (2, 2), "VALID"),
         ((3, 7, 9, 4), (2, 2), "SAME"), ((2, 9, 6, 2), (3, 3), "VALID"),
         ((2, 6, 8, 3), (3, 2), "SAME")]


def _tied(shape):
    """ReLU of values on a coarse grid: windows hold many equal maxima (zeros and others)."""
    x = jnp.round(2.0 * jax.random.normal(jax.random.key(0), shape)) / 2.0
    return jax.nn.relu(x)


@pytest.mark.parametrize("shape, window, padding", CASES)
def test_values_and_gradients_equal_nn_max_pool_with_ties(shape, window, padding):
    """select_and_scatter's tie rule: the first maximum of a window (row-major) takes all."""
    x = _tied(shape)
    reference = lambda x: nn.max_pool(x, window, strides=window, padding=padding)
    y, vjp = jax.vjp(lambda x: max_pool(x, window, padding), x)
    y_ref, vjp_ref = jax.vjp(reference, x)
    np.testing.assert_array_equal(y, y_ref)
    cotangent = jax.random.normal(jax.random.key(1), y.shape)
    np.testing.assert_array_equal(vjp(cotangent)[0], vjp_ref(cotangent)[0])
    # Under jit and vmap too.
    batched = jax.jit(jax.vmap(jax.grad(lambda x: jnp.sum(max_pool(x, window, padding) ** 2))))
    batched_ref = jax.vmap(jax.grad(lambda x: jnp.sum(reference(x) ** 2)))
    np.testing.assert_array_equal(batched(x[:, None]), batched_ref(x[:, None]))


@pytest.mark.parametrize("shape, window, padding", CASES)
def test_forward_mode_equals_nn_max_pool_without_ties(shape, window, padding):
    x = jax.random.normal(jax.random.key(0), shape)
    tangent = jax.random.normal(jax.random.key(1), shape)
    _, y_dot = jax.jvp(lambda x: max_pool(x, window, padding), (x,), (tangent,))
    _, y_dot_ref = jax.jvp(lambda x: nn.max_pool(x, window, strides=window, padding=padding),
                           (x,), (tangent,))
    np.testing.assert_array_equal(y_dot, y_dot_ref)


def test_needs_an_nhwc_batch():
    with pytest.raises(ValueError, match=r"NHWC batch \(N, H, W, C\), got shape \(8, 8, 3\)"):
        max_pool(jnp.zeros((8, 8, 3)), (2, 2))


def _adaptive_avg_pool_loops(x, out_h, out_w):
    """PyTorch's AdaptiveAvgPool2d by its definition: cell (i, j) averages rows
    floor(i*H/oh) .. ceil((i+1)*H/oh) - 1 and likewise columns; written with explicit loops."""
    n, h, w, c = x.shape
    out = np.zeros((n, out_h, out_w, c), np.float64)
    for i in range(out_h):
        for j in range(out_w):
            r0, r1 = math.floor(i * h / out_h), math.ceil((i + 1) * h / out_h)
            c0, c1 = math.floor(j * w / out_w), math.ceil((j + 1) * w / out_w)
            out[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
    return out


@pytest.mark.parametrize("shape, output_size", [((2, 4, 4, 3), (2, 2)), ((2, 1, 1, 3), (2, 2)),
                                                 ((2, 7, 5, 3), (3, 2)), ((1, 2, 2, 1), (2, 2))])
def test_adaptive_avg_pool_equals_its_definition(shape, output_size):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(adaptive_avg_pool(jnp.asarray(x), output_size),
                               _adaptive_avg_pool_loops(x, *output_size), rtol=1e-6, atol=1e-6)
