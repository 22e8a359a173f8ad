"""Tests for sparse_robust.pruning.hydra: scaled-magnitude scores, exact per-layer top-k, the
straight-through gradient, and score training with frozen weights."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparse_robust import masks, training
from sparse_robust.pruning import hydra
from sparse_robust.attacks import make_attack
from sparse_robust.objectives import Objective

# Layer sizes n with f·n far from a half-integer (f = WEIGHTS_REMAINING), so k = round(f·n) is
# unambiguous.
WEIGHTS_REMAINING = 0.3


def tiny_params(seed):
    rng = np.random.default_rng(seed)
    shapes = {"dense_0": (12, 10), "dense_1": (10, 7), "output": (7, 3)}
    params = {n: {"kernel": jnp.asarray(rng.normal(size=s), jnp.float32)} for n, s in shapes.items()}
    params["output"]["bias"] = jnp.asarray(rng.normal(size=3), jnp.float32)
    return params


def numpy_forward(params, x):
    h = np.asarray(x, np.float64)
    for layer in ("dense_0", "dense_1"):
        h = np.maximum(h @ np.asarray(params[layer]["kernel"], np.float64), 0)
    out = params["output"]
    return h @ np.asarray(out["kernel"], np.float64) + np.asarray(out["bias"], np.float64)


def model_fn(params, model_state, x, train):
    """The tiny MLP as a model_fn (no batch statistics)."""
    h = x
    for layer in ("dense_0", "dense_1"):
        h = jax.nn.relu(h @ params[layer]["kernel"])
    return h @ params["output"]["kernel"] + params["output"]["bias"], model_state


def loss_fn(logits, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def data(seed, n=16):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.uniform(size=(n, 12)), jnp.float32),
            jnp.asarray(rng.integers(0, 3, size=n), jnp.int32))


def test_init_scores_is_the_papers_scaled_magnitude():
    params = tiny_params(0)
    scores = hydra.init_scores(params)
    assert scores["output"]["bias"] is None
    for layer in ("dense_0", "dense_1", "output"):
        w = np.abs(np.asarray(params[layer]["kernel"]))
        expected = np.sqrt(6.0 / w.shape[0]) * w / w.max()
        np.testing.assert_allclose(scores[layer]["kernel"], expected, rtol=1e-6)


def test_topk_mask_keeps_exactly_k_highest_scores_per_layer():
    scores = hydra.init_scores(tiny_params(1))
    mask = jax.jit(hydra.topk_mask, static_argnums=1)(scores, WEIGHTS_REMAINING)
    assert mask["output"]["bias"] is None
    for layer in ("dense_0", "dense_1", "output"):
        s = np.asarray(scores[layer]["kernel"]).ravel()
        m = np.asarray(mask[layer]["kernel"]).ravel()
        assert m.sum() == round(WEIGHTS_REMAINING * s.size), layer
        assert s[m].min() > s[~m].max(), layer


def test_straight_through_gradient_reaches_every_score():
    params, (x, y) = tiny_params(2), data(3)
    scores = jax.tree_util.tree_map(lambda s: s + 0.01, hydra.init_scores(params))
    score_fn = hydra.make_score_model_fn(model_fn, WEIGHTS_REMAINING)
    state = {"weights": params, "model_state": {}}

    def loss_of_scores(s):
        return loss_fn(score_fn(s, state, x, True)[0], y)

    grads = jax.jit(jax.grad(loss_of_scores))(scores)

    # Independent reference: the mask by numpy top-k, the gradient w.r.t. the effective
    # weights w ⊙ m by plain autodiff, times w.
    effective = jax.tree_util.tree_map(lambda p: p, params)
    ref_masks = {}
    for layer in ("dense_0", "dense_1", "output"):
        s = np.asarray(scores[layer]["kernel"])
        k = round(WEIGHTS_REMAINING * s.size)
        keep = np.zeros(s.size, bool)
        keep[np.argsort(s.ravel(), kind="stable")[-k:]] = True
        ref_masks[layer] = keep.reshape(s.shape)
        effective[layer]["kernel"] = params[layer]["kernel"] * ref_masks[layer]
    np.testing.assert_allclose(model_fn(effective, {}, x, False)[0],
                               numpy_forward(effective, x), rtol=1e-5, atol=1e-5)
    forward = jax.jit(hydra.masked_weights, static_argnums=2)(params, scores, WEIGHTS_REMAINING)
    np.testing.assert_array_equal(forward["dense_1"]["kernel"],  # exactly w ⊙ m
                                  effective["dense_1"]["kernel"])
    grad_effective = jax.jit(jax.grad(lambda p: loss_fn(model_fn(p, {}, x, True)[0], y)))(effective)
    for layer in ("dense_0", "dense_1", "output"):
        expected = np.asarray(grad_effective[layer]["kernel"]) * np.asarray(params[layer]["kernel"])
        got = np.asarray(grads[layer]["kernel"])
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7, err_msg=layer)
        # Pruned weights' scores get gradient too (that is what lets them come back).
        assert np.any(got[~ref_masks[layer]] != 0), layer


def test_score_training_moves_scores_and_freezes_weights():
    params, (x, y) = tiny_params(4), data(5, n=32)
    score_fn = hydra.make_score_model_fn(model_fn, WEIGHTS_REMAINING)
    tx = optax.adam(1e-2)
    loop = training.make_train_loop(score_fn, tx, Objective("madry", make_attack("fgsm", eps=0.05)))
    scores = hydra.init_scores(params)
    state = hydra.create_score_state(params, {}, scores, tx, jax.random.PRNGKey(0))
    indices = jnp.asarray(np.random.default_rng(6).integers(0, 32, size=(10, 8)), jnp.int32)
    state, metrics = loop(state, x, y, indices)
    assert metrics["loss"].shape == (10,) and np.all(np.isfinite(metrics["loss"]))
    for layer in params:
        for leaf in params[layer]:  # weights bit-identical
            np.testing.assert_array_equal(state.model_state["weights"][layer][leaf],
                                          params[layer][leaf])
        assert not np.allclose(state.params[layer]["kernel"], scores[layer]["kernel"])
    final = hydra.topk_mask(state.params, WEIGHTS_REMAINING)
    assert masks.count(final) == masks.count(hydra.topk_mask(scores, WEIGHTS_REMAINING))


@pytest.mark.parametrize("weights_remaining", [0.0, 1.5, True, "0.5"])
def test_bad_weights_remaining_is_a_clear_error(weights_remaining):
    with pytest.raises(ValueError, match=r"weights_remaining=.*allowed values"):
        hydra.topk_mask(hydra.init_scores(tiny_params(0)), weights_remaining)
