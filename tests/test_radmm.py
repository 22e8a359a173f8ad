"""RADMM: the projection against numpy, the Z/U update, the ADMM residual shrinking over rounds on
a toy problem, and hard-pruned weights staying zero through fine-tuning."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparse_robust import data as data_lib
from sparse_robust import masks, training
from sparse_robust.objectives import Objective
from sparse_robust.pruning import radmm
from conftest import TOY_SHAPES, toy_mlp_data, toy_mlp_fn, toy_mlp_params



def numpy_projection(values: dict, keep: float, scope: str) -> dict:
    """Top-|v| projection, independently: sort magnitudes, keep the k largest."""
    def top(v, k):
        out = np.zeros_like(v)
        idx = np.argsort(-np.abs(v))[:k]
        out[idx] = v[idx]
        return out
    if scope == "layerwise":
        return {n: top(v.ravel(), v.size - round((1 - keep) * v.size)).reshape(v.shape)
                for n, v in values.items()}
    names = list(values)
    flat = np.concatenate([values[n].ravel() for n in names])
    kept = top(flat, flat.size - round((1 - keep) * flat.size))
    out, start = {}, 0
    for n in names:
        out[n] = kept[start:start + values[n].size].reshape(values[n].shape)
        start += values[n].size
    return out


@pytest.mark.parametrize("scope", ["layerwise", "global"])
@pytest.mark.parametrize("keep", [0.3, 0.05])
def test_z_is_exactly_the_top_k_projection(scope, keep):
    params = toy_mlp_params(0)
    mask = masks.create_mask(params)
    z = jax.jit(radmm.project, static_argnums=(2, 3))(params, mask, keep, scope)
    assert z["output"]["bias"] is None
    values = {n: np.asarray(params[n]["kernel"]) for n in TOY_SHAPES}
    expected = numpy_projection(values, keep, scope)
    for n in TOY_SHAPES:
        np.testing.assert_array_equal(np.asarray(z[n]["kernel"]), expected[n], err_msg=n)


def test_admm_update_is_projection_then_dual_ascent():
    params, other = toy_mlp_params(1), toy_mlp_params(2)
    mask = masks.create_mask(params)
    admm = radmm.init_admm(other, mask, 0.3, "layerwise")
    admm["u"] = jax.tree_util.tree_map(lambda z: 0.1 * jnp.ones_like(z), admm["u"])
    new = radmm.admm_update(params, admm, 0.3, "layerwise")
    for n in TOY_SHAPES:
        w, u = np.asarray(params[n]["kernel"]), np.asarray(admm["u"][n]["kernel"])
        z = numpy_projection({n: w + u}, 0.3, "layerwise")[n]
        np.testing.assert_allclose(new["z"][n]["kernel"], z, rtol=1e-6)
        np.testing.assert_allclose(new["u"][n]["kernel"], u + w - z, rtol=1e-6, atol=1e-7)


def linear_fn(params, model_state, x, train):
    """Softmax regression: a convex loss, so full-batch ADMM behaves as the theory says."""
    return x @ params["output"]["kernel"] + params["output"]["bias"], model_state


@pytest.fixture(scope="module")
def admm_phase():
    """Full-batch ADMM on softmax regression: 8 rounds of 25 gradient steps, ρ growing 1.3x per
    round, 30 % of the weights kept."""
    rng = np.random.default_rng(3)
    params = {"output": {"kernel": jnp.asarray(rng.normal(size=(12, 3)) / 3, jnp.float32),
                         "bias": jnp.zeros(3, jnp.float32)}}
    x, y = toy_mlp_data(4)
    keep, rounds, per_round = 0.3, 8, 25
    objective = radmm.make_objective(Objective("natural"), keep, "layerwise", rho=0.1,
                                     rho_growth=1.3, steps_per_round=per_round)
    tx = optax.sgd(0.3)
    mask = masks.create_mask(params)
    state = training.create_train_state(
        params, radmm.init_state(params, {}, mask, keep, "layerwise"), tx, mask,
        jax.random.PRNGKey(0))
    loop = training.make_train_loop(radmm.make_model_fn(linear_fn), tx, objective)
    indices = data_lib.batch_indices(jax.random.PRNGKey(1), x.shape[0], x.shape[0], 0,
                                     rounds * per_round)
    final, metrics = loop(state, x, y, indices)
    return keep, per_round, final, metrics


def test_residual_decreases_over_rounds(admm_phase):
    """‖W − Z‖ right after each round's Z-update shrinks round after round (to < 1/5)."""
    _, per_round, _, metrics = admm_phase
    at_round_starts = np.asarray(metrics["admm_residual"])[per_round::per_round]
    assert np.all(np.diff(at_round_starts) < 0), at_round_starts
    assert at_round_starts[-1] < 0.2 * at_round_starts[0]


def test_z_keeps_the_projection_count(admm_phase):
    keep, per_round, final, _ = admm_phase
    assert int(final.model_state["step"]) == 8 * per_round
    kept = np.asarray(final.model_state["admm"]["z"]["output"]["kernel"]) != 0
    assert kept.sum() == kept.size - round((1 - keep) * kept.size)


def test_hard_pruned_weights_stay_zero_through_fine_tuning(admm_phase):
    keep, _, final, _ = admm_phase
    mask = radmm.hard_prune_mask(final.model_state["admm"], keep, "layerwise")
    x, y = toy_mlp_data(5)
    tx = optax.adamw(0.01, weight_decay=1e-3)
    state = training.create_train_state(final.params, {}, tx, mask, jax.random.PRNGKey(2))
    loop = training.make_train_loop(linear_fn, tx, Objective("natural"))
    indices = data_lib.batch_indices(jax.random.PRNGKey(3), x.shape[0], 32, 0, 50)
    tuned, _ = loop(state, x, y, indices)
    m = np.asarray(mask["output"]["kernel"])
    z = np.asarray(final.model_state["admm"]["z"]["output"]["kernel"])
    np.testing.assert_array_equal(m, z != 0)  # Z's support
    w = np.asarray(tuned.params["output"]["kernel"])
    assert not w[~m].any() and w[m].any()
    assert not np.array_equal(w[m], np.asarray(final.params["output"]["kernel"])[m])


@pytest.mark.parametrize("kwargs, message", [
    ({"weights_remaining": 0.0}, "weights_remaining=0.0 is invalid"),
    ({"scope": "per_layer"}, "scope='per_layer' is invalid"),
    ({"rho": 0.0}, "rho=0.0 is invalid"),
    ({"rho_growth": 0.5}, "rho_growth=0.5 is invalid"),
    ({"steps_per_round": 0}, "steps_per_round=0 is invalid"),
])
def test_bad_settings_are_refused_with_one_line(kwargs, message):
    settings = {"weights_remaining": 0.1, "scope": "layerwise", "rho": 1e-3, "rho_growth": 1.0,
                "steps_per_round": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        radmm.make_objective(Objective("natural"), **settings)
