"""The benchmark FLOP counter against closed forms (benchmarks print ratios built on it)."""

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.flops import matmul_flops
from sparse_robust import models


def test_dense_forward_and_scanned_steps_match_closed_form():
    model = models.get_model("dense-300-100")
    x = np.zeros((7, 784), np.float32)
    params = model.init(jax.random.PRNGKey(0), x)
    per_example = 2 * (784 * 300 + 300 * 100 + 100 * 10)
    assert matmul_flops(model.apply, params, x) == 7 * per_example
    scanned = lambda p, x: jax.lax.scan(lambda c, _: (c, model.apply(p, x)), 0, None, length=5)[1]
    assert matmul_flops(scanned, params, x) == 5 * 7 * per_example
    # fori_loop with static bounds is a scan too (our attacks loop this way)
    looped = lambda p, x: jax.lax.fori_loop(0, 3, lambda i, acc: acc + model.apply(p, x).sum(), 0.0)
    assert matmul_flops(looped, params, x) == 3 * 7 * per_example


def test_convolution_counts_multiply_adds_of_each_output():
    x = jnp.zeros((2, 9, 9, 3))
    kernel = jnp.zeros((3, 3, 3, 8))
    conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "VALID",
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    forward = 2 * (2 * 7 * 7 * 8) * (3 * 3 * 3)
    assert matmul_flops(conv, x, kernel) == forward
    # the input gradient: the forward pass, then a transposed 3x3 conv (8 -> 3 features) that
    # produces every one of the 2x9x9x3 inputs (XLA pads, so border multiply-adds count too)
    grad = jax.grad(lambda x, k: conv(x, k).sum())
    assert matmul_flops(grad, x, kernel) == forward + 2 * (2 * 9 * 9 * 3) * (3 * 3 * 8)
