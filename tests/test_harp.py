"""HARP: the per-layer top-k at traced rates, the straight-through gradient (against a finite
difference of the surrogate it stands for), frozen weights, and learned rates meeting the target."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparse_robust import data as data_lib
from sparse_robust import masks, training
from sparse_robust.objectives import Objective
from sparse_robust.pruning import harp
from conftest import TOY_SHAPES, toy_mlp_data, toy_mlp_fn, toy_mlp_params

TARGET, ALPHA = 0.2, 0.5


def test_topk_at_rates_keeps_the_highest_scores_at_each_rate():
    scores = harp.init_scores(toy_mlp_params(0))
    rates = {"dense_0": {"kernel": 0.25}, "dense_1": {"kernel": 0.5},
             "output": {"kernel": 1.0, "bias": None}}
    rates = jax.tree_util.tree_map(jnp.asarray, rates)
    mask = jax.jit(harp.topk_at_rates)(scores, rates)
    for layer, k in (("dense_0", 0.25), ("dense_1", 0.5), ("output", 1.0)):
        s, m = np.ravel(scores[layer]["kernel"]), np.ravel(mask[layer]["kernel"])
        assert m.sum() == round(k * s.size)
        assert m.all() or s[m].min() >= s[~m].max()


def test_rates_start_at_the_target_and_stay_above_k_min():
    logits = harp.init_rate_logits(masks.create_mask(toy_mlp_params(0)), TARGET, ALPHA)
    for rate in harp.learned_rates(logits, ALPHA * TARGET).values():
        assert rate == pytest.approx(TARGET, rel=1e-6)
    assert float(harp.keep_rate(-1e4, ALPHA * TARGET)) == pytest.approx(ALPHA * TARGET)


def test_straight_through_gradient_matches_a_finite_difference_of_its_surrogate():
    """jax.grad of the STE loss equals the derivative of L(w ⊙ (M + s − s0 + k(ρ) − k(ρ0))) with
    the hard mask M frozen at (s0, ρ0): the gradient reaches every score and every rate logit.
    In float64, so the central difference is exact to ~1e-9."""
    with jax.enable_x64(True):
        check_ste_against_finite_difference()


def check_ste_against_finite_difference():
    to64 = lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), t)
    params, (x, y) = to64(toy_mlp_params(1)), toy_mlp_data(2, 16)
    x = x.astype(jnp.float64)
    target = 0.6  # dense enough that every layer's mask passes a gradient on this toy net
    kmin = ALPHA * target
    scores = to64(harp.init_scores(params))
    logits = to64(jax.tree_util.tree_map(lambda r: r + 0.3, harp.init_rate_logits(
        masks.create_mask(params), target, ALPHA)))
    ce = lambda logit: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logit, y))

    def ste_loss(s, r):
        return ce(toy_mlp_fn(harp.masked_weights(params, s, r, kmin), {}, x, True)[0])

    rates0 = jax.tree_util.tree_map(lambda r: harp.keep_rate(r, kmin), logits)
    hard = harp.topk_at_rates(scores, rates0)

    def surrogate(s, r):
        def gate(m, s_, s0, r_, r0, w):
            if m is None:
                return w
            return w * (m + (s_ - s0) + (harp.keep_rate(r_, kmin) - harp.keep_rate(r0, kmin)))
        weights = jax.tree_util.tree_map(gate, hard, s, scores, r, logits, params,
                                         is_leaf=masks.is_none)
        return ce(toy_mlp_fn(weights, {}, x, True)[0])

    g_scores, g_logits = jax.grad(ste_loss, argnums=(0, 1))(scores, logits)
    eps = 1e-5
    for layer in TOY_SHAPES:
        r0 = logits[layer]["kernel"]
        bump = lambda d: {**logits, layer: {**logits[layer], "kernel": r0 + d}}
        fd = (surrogate(scores, bump(eps)) - surrogate(scores, bump(-eps))) / (2 * eps)
        assert float(g_logits[layer]["kernel"]) == pytest.approx(float(fd), rel=1e-5, abs=1e-9)
        assert abs(float(g_logits[layer]["kernel"])) > 0
        flat = np.ravel(scores[layer]["kernel"])
        for i in (0, flat.size // 2, flat.size - 1):
            def at(d):
                s = np.array(flat)
                s[i] += d
                return {**scores, layer: {**scores[layer],
                                          "kernel": jnp.asarray(s.reshape(TOY_SHAPES[layer]))}}
            fd = (surrogate(at(eps), logits) - surrogate(at(-eps), logits)) / (2 * eps)
            got = float(np.ravel(g_scores[layer]["kernel"])[i])
            assert got == pytest.approx(float(fd), rel=1e-5, abs=1e-9)


@pytest.fixture(scope="module")
def score_phase():
    """A short HARP score phase on the toy problem, with FGSM adversarial training."""
    params, (x, y) = toy_mlp_params(3), toy_mlp_data(4, 256)
    fgsm = lambda logits_fn, x, y, key: jnp.clip(x + 0.05 * jnp.sign(jax.grad(
        lambda z: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_fn(z), y)))(x)),
        0.0, 1.0)
    steps = 200
    mask = masks.create_mask(params)
    scores = harp.init_scores(params)
    # Start every layer at twice the target: the penalty must bring the rates down.
    logits = harp.init_rate_logits(mask, TARGET, ALPHA, start=2 * TARGET)
    objective = harp.make_objective(Objective("madry", attack=fgsm), scores, TARGET, ALPHA,
                                    gamma=20.0, num_steps=steps)
    tx = optax.adam(0.01)
    state = harp.create_score_state(params, {}, scores, logits, tx, jax.random.PRNGKey(0))
    loop = training.make_train_loop(harp.make_score_model_fn(toy_mlp_fn, ALPHA * TARGET), tx,
                                    objective)
    indices = data_lib.batch_indices(jax.random.PRNGKey(1), x.shape[0], 32, 0, steps)
    final, metrics = loop(state, x, y, indices)
    return params, {"scores": scores, "rate_logits": logits}, final, metrics


def test_frozen_weights_never_change_in_the_score_phase(score_phase):
    params, _, final, _ = score_phase
    for a, b in zip(jax.tree_util.tree_leaves(params),
                    jax.tree_util.tree_leaves(final.model_state["weights"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(final.model_state["step"]) == 200


def test_scores_and_rates_learn(score_phase):
    _, start, final, _ = score_phase
    for a, b in zip(jax.tree_util.tree_leaves(start), jax.tree_util.tree_leaves(final.params)):
        assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_learned_rates_meet_the_target_within_ten_percent(score_phase):
    """The penalty brings the global keep fraction from 2x the target to within 10 % of it
    (relative); the final mask then meets it to the weight (per-layer rounding aside)."""
    _, _, final, metrics = score_phase
    kmin = ALPHA * TARGET
    learned = harp.learned_rates(final.params["rate_logits"], kmin)
    sizes = {layer: int(np.prod(s)) for layer, s in TOY_SHAPES.items()}
    kept = sum(sizes[l] * k for l, k in learned.items()) / sum(sizes.values())
    assert abs(kept / TARGET - 1.0) <= 0.10, learned
    assert float(metrics["density"][0]) > 1.5 * TARGET
    assert all(kmin <= k <= 1.0 for k in learned.values())
    mask, _, rates = harp.final_mask(final.params["scores"], final.params["rate_logits"],
                                     TARGET, ALPHA)
    alive, total = masks.count(mask)
    assert sum(sizes[l] * k for l, k in rates.items()) == pytest.approx(TARGET * total)
    assert abs(alive - TARGET * total) <= len(TOY_SHAPES)
    for layer, k in rates.items():
        assert int(np.sum(mask[layer]["kernel"])) == round(k * sizes[layer])


@pytest.mark.parametrize("rates", [{"a": 0.4, "b": 1.0}, {"a": 0.05, "b": 0.2},
                                   {"a": 0.1, "b": 0.9}])
def test_rates_meeting_target_scales_all_layers_by_one_factor(rates):
    sizes = {"a": 100, "b": 10}
    scaled = harp.rates_meeting_target(rates, sizes, 0.2)
    assert 100 * scaled["a"] + 10 * scaled["b"] == pytest.approx(0.2 * 110)
    if scaled["b"] < 1.0:  # one factor, unless a layer is capped at 1
        assert scaled["b"] / scaled["a"] == pytest.approx(rates["b"] / rates["a"])
    else:
        assert scaled["a"] == pytest.approx((0.2 * 110 - 10) / 100)


@pytest.mark.parametrize("kwargs, message", [
    ({"target": 0.0}, "target=0.0 is invalid"),
    ({"target": 1.0}, "target=1.0 is invalid"),
    ({"alpha": 1.0}, "alpha=1.0 is invalid"),
    ({"gamma": -1.0}, "gamma=-1.0 is invalid"),
    ({"num_steps": 0}, "num_steps=0 is invalid"),
])
def test_bad_settings_are_refused_with_one_line(kwargs, message):
    settings = {"target": 0.1, "alpha": 0.5, "gamma": 1.0, "num_steps": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        harp.make_objective(Objective("natural"), harp.init_scores(toy_mlp_params(0)), **settings)


def test_score_optimizer_steps_rates_with_their_own_learning_rate():
    params = {"scores": harp.init_scores(toy_mlp_params(0)),
              "rate_logits": harp.init_rate_logits(masks.create_mask(toy_mlp_params(0)), TARGET,
                                                   ALPHA)}
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    tx = harp.score_optimizer(optax.sgd(0.5), optax.sgd(3.0))
    updates, _ = tx.update(grads, tx.init(params), params)
    for leaf in jax.tree_util.tree_leaves(updates["scores"]):
        np.testing.assert_allclose(leaf, -0.5)
    for leaf in jax.tree_util.tree_leaves(updates["rate_logits"]):
        np.testing.assert_allclose(leaf, -3.0)
