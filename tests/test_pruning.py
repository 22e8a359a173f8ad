"""Tests for sparse_robust.pruning against numpy references, and for the masked optimizer
(sparse_robust.optim.keep_pruned_at_zero)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparse_robust import masks, optim, pruning

PAPER_RATES = {"*": 0.2, "output": 0.1}
SHAPES = {"dense_0": (12, 10), "dense_1": (10, 7), "output": (7, 4)}


def random_params(seed, shapes=SHAPES, bias=True):
    rng = np.random.default_rng(seed)
    params = {name: {"kernel": jnp.asarray(rng.normal(size=shape), jnp.float32)}
              for name, shape in shapes.items()}
    if bias:
        params["dense_0"]["bias"] = jnp.asarray(rng.normal(size=shapes["dense_0"][1]), jnp.float32)
    return params


def kernels(tree):
    """{layer: np array} of the kernels (reference code reads params/masks through this only)."""
    return {layer: np.asarray(leaves["kernel"]) for layer, leaves in tree.items()}


def reference_prune(scores, alive, rate):
    """Numpy: drop round(rate * n_alive) alive entries with the lowest (score, flat index)."""
    scores, alive = np.ravel(scores), np.ravel(alive).copy()
    idx = np.flatnonzero(alive)
    n_remove = round(rate * len(idx))
    alive[idx[np.lexsort((idx, scores[idx]))][:n_remove]] = False
    return alive


def reference_layerwise(params, mask, rates):
    weights, alive = kernels(params), kernels(mask)
    return {layer: reference_prune(np.abs(weights[layer]), alive[layer],
                                   rates.get(layer, rates.get("*"))).reshape(alive[layer].shape)
            for layer in weights}


def reference_global(params, mask, rate):
    weights, alive = kernels(params), kernels(mask)
    layers = sorted(weights)  # jax flattens dicts in key order
    kept = reference_prune(np.concatenate([np.abs(weights[l]).ravel() for l in layers]),
                           np.concatenate([alive[l].ravel() for l in layers]), rate)
    parts = np.split(kept, np.cumsum([alive[l].size for l in layers])[:-1])
    return {l: p.reshape(alive[l].shape) for l, p in zip(layers, parts)}


def assert_kernels_equal(mask, expected):
    assert mask["dense_0"]["bias"] is None
    got = kernels(mask)
    assert got.keys() == expected.keys()
    for layer in expected:
        np.testing.assert_array_equal(got[layer], expected[layer], err_msg=layer)


def test_layerwise_magnitude_pruning_matches_numpy_over_rounds():
    params = random_params(0)
    mask = masks.create_mask(params)
    for _ in range(4):
        expected = reference_layerwise(params, mask, PAPER_RATES)
        new = pruning.magnitude_prune(params, mask, PAPER_RATES)
        assert_kernels_equal(new, expected)
        for layer, rate in [("dense_0", 0.2), ("dense_1", 0.2), ("output", 0.1)]:
            before, after = kernels(mask)[layer].sum(), kernels(new)[layer].sum()
            assert before - after == round(rate * before)
        mask = new


def test_global_magnitude_pruning_matches_numpy():
    params = random_params(1)
    mask = masks.create_mask(params)
    for rate in (0.3, 0.5, 0.25):
        expected = reference_global(params, mask, rate)
        new = pruning.magnitude_prune(params, mask, rate, scope="global")
        assert_kernels_equal(new, expected)
        assert masks.count(mask)[0] - masks.count(new)[0] == round(rate * masks.count(mask)[0])
        mask = new
    per_layer = masks.layer_weights_remaining(mask)
    assert len(set(per_layer.values())) > 1  # global ranking did not prune layers uniformly


def test_ties_are_broken_by_position_deterministically():
    # All magnitudes equal (signs alternate in the output layer): only positions can decide.
    params = {name: {"kernel": jnp.ones(shape)} for name, shape in SHAPES.items()}
    params["output"]["kernel"] = jnp.asarray(
        np.where(np.arange(28) % 2, 1.0, -1.0).reshape(SHAPES["output"]), jnp.float32)
    flat = lambda m: {k: np.ravel(v) for k, v in kernels(m).items()}
    mask = masks.create_mask(params)
    first = flat(pruning.magnitude_prune(params, mask, 0.25))
    again = flat(pruning.magnitude_prune(params, mask, 0.25))
    for layer, n_removed in [("dense_0", 30), ("dense_1", 18), ("output", 7)]:  # 17.5 -> 18
        np.testing.assert_array_equal(first[layer], again[layer])
        np.testing.assert_array_equal(first[layer], np.arange(first[layer].size) >= n_removed)
    mask = pruning.magnitude_prune(params, mask, 0.25)
    second = flat(pruning.magnitude_prune(params, mask, 0.25))["dense_0"]
    np.testing.assert_array_equal(second, np.arange(120) >= 30 + 22)  # 22 more of the 90 alive

    # Global: the concatenation runs dense_0, dense_1, output, so the 54 removals (round(54.5))
    # all fall at the start of dense_0.
    glob = flat(pruning.magnitude_prune(params, masks.create_mask(params), 0.25, scope="global"))
    np.testing.assert_array_equal(glob["dense_0"], np.arange(120) >= 54)
    assert glob["dense_1"].all() and glob["output"].all()


def test_pruning_only_shrinks_even_when_dead_weights_are_large():
    params = random_params(2)
    mask = masks.create_mask(params)
    for level in range(5):
        scope, rates = ("global", 0.3) if level % 2 else ("layerwise", PAPER_RATES)
        # Params are *not* masked: dead weights keep non-zero values and must still stay dead.
        new = pruning.magnitude_prune(jax.tree_util.tree_map(lambda p: 10 * p, params), mask,
                                      rates, scope=scope)
        assert masks.is_subset(new, mask)
        assert masks.count(new)[0] < masks.count(mask)[0]
        mask = new


def test_random_pruning_depends_on_key_and_removes_the_same_counts():
    params = random_params(3)
    mask = pruning.magnitude_prune(params, masks.create_mask(params), 0.3)
    magnitude = pruning.magnitude_prune(params, mask, PAPER_RATES)
    a = pruning.random_prune(jax.random.PRNGKey(0), mask, PAPER_RATES)
    a_again = pruning.random_prune(jax.random.PRNGKey(0), mask, PAPER_RATES)
    b = pruning.random_prune(jax.random.PRNGKey(1), mask, PAPER_RATES)
    for layer in SHAPES:
        assert kernels(a)[layer].sum() == kernels(b)[layer].sum() == kernels(magnitude)[layer].sum()
        np.testing.assert_array_equal(kernels(a)[layer], kernels(a_again)[layer])
    assert any((kernels(a)[l] != kernels(b)[l]).any() for l in SHAPES)
    assert any((kernels(a)[l] != kernels(magnitude)[l]).any() for l in SHAPES)
    assert masks.is_subset(a, mask) and masks.is_subset(b, mask)
    g = pruning.random_prune(jax.random.PRNGKey(2), mask, 0.4, scope="global")
    assert masks.count(mask)[0] - masks.count(g)[0] == round(0.4 * masks.count(mask)[0])


def test_schedule_matches_actual_masks_and_the_paper():
    shapes = {"dense_0": (784, 300), "dense_1": (300, 100), "output": (100, 10)}
    sizes = {f"{name}/kernel": int(np.prod(shape)) for name, shape in shapes.items()}
    schedule = pruning.weights_remaining_schedule(sizes, PAPER_RATES, levels=18)
    assert len(schedule) == 19 and schedule[0] == 1.0

    params = random_params(4, shapes, bias=False)
    mask = masks.create_mask(params)
    prune = jax.jit(lambda m: pruning.magnitude_prune(params, m, PAPER_RATES))
    for level in range(1, 19):
        mask = prune(mask)
        alive = {f"{layer}/kernel": int(m.sum()) for layer, m in kernels(mask).items()}
        assert schedule[level] == sum(alive.values()) / sum(sizes.values()), level

    paper = {3: 0.513, 8: 0.169, 11: 0.087, 15: 0.036, 18: 0.018}
    for level, fraction in paper.items():
        assert abs(schedule[level] - fraction) <= 0.001 + 1e-9, (level, schedule[level])


@pytest.mark.parametrize("rates, scope, message", [
    (1.0, "layerwise", r"rate.*1\.0.*\[0, 1\)"),
    (-0.1, "layerwise", r"-0\.1"),
    ("0.2", "layerwise", r"'0\.2'"),
    ({"*": 0.2, "output": 1.5}, "layerwise", r"'output'.*1\.5"),
    ({"*": 0.2, "dense_9": 0.1}, "layerwise", r"unknown layers \['dense_9'\]"),
    ({"output": 0.1}, "layerwise", r"No pruning rate for layer 'dense_0'"),
    ({"*": 0.2}, "global", "one rate"),
    (1.2, "global", r"1\.2"),
    (0.2, "per-neuron", r"'per-neuron'.*layerwise.*global"),
])
def test_bad_rates_and_scopes_raise(rates, scope, message):
    params = random_params(5)
    with pytest.raises(ValueError, match=message):
        pruning.magnitude_prune(params, masks.create_mask(params), rates, scope=scope)


def test_schedule_rejects_unknown_layers():
    with pytest.raises(ValueError, match="unknown layers"):
        pruning.weights_remaining_schedule({"dense_0/kernel": 10}, {"output": 0.1}, levels=2)


# --- optim.keep_pruned_at_zero ---------------------------------------------------------------------

# A term that moves every weight whatever its gradient (as noise would): only masking the
# updates *after* the inner optimizer keeps pruned weights at zero under it.
DRIFT = optax.GradientTransformation(
    lambda params: optax.EmptyState(),
    lambda updates, state, params=None: (jax.tree_util.tree_map(lambda u: u + 1e-3, updates),
                                         state))

OPTIMIZERS = {
    "adam": optax.adam(1e-2),
    "adamw": optax.adamw(1e-2, weight_decay=0.1),
    "sgd_nesterov": optax.sgd(1e-2, momentum=0.9, nesterov=True),
    "sgd_with_drift": optax.chain(optax.sgd(1e-2), DRIFT),
}


def random_gradients(params, seed, num_steps=100):
    """[num_steps, ...] gradients, large on every entry, pruned or not."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda p: jnp.asarray(10 * rng.normal(size=(num_steps, *p.shape)), jnp.float32), params)


def run_steps(tx, params, opt_state, grads):
    """One optimizer step per leading slice of ``grads``; returns the final params."""

    def step(carry, g):
        params, opt_state = carry
        updates, opt_state = tx.update(g, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    return jax.lax.scan(step, (params, opt_state), grads)[0][0]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_pruned_weights_stay_exactly_zero(name):
    inner = OPTIMIZERS[name]
    params = random_params(6)
    mask = pruning.magnitude_prune(params, masks.create_mask(params), 0.5)
    params = masks.apply_mask(params, mask)
    tx = optim.keep_pruned_at_zero(inner, mask)
    grads = random_gradients(params, seed=7)
    masked = jax.jit(run_steps, static_argnums=0)(tx, params, tx.init(params), grads)
    # Reference: the plain optimizer on the same gradients. All three are elementwise, so the alive
    # weights must follow exactly the same trajectory.
    plain = jax.jit(run_steps, static_argnums=0)(inner, params, inner.init(params), grads)
    for layer in SHAPES:
        alive = kernels(mask)[layer]
        start, end = kernels(params)[layer], kernels(masked)[layer]
        assert np.all(end[~alive] == 0.0)
        assert np.all(end[alive] != start[alive])
        np.testing.assert_allclose(end[alive], kernels(plain)[layer][alive], rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(masked["dense_0"]["bias"]) != np.asarray(params["dense_0"]["bias"]))


def test_gradients_of_pruned_weights_have_no_effect():
    # LAMB scales each layer's update by a norm ratio over the whole layer: gradients of pruned
    # weights would leak into the alive ones unless they are zeroed *before* the inner optimizer.
    params = random_params(10)
    mask = pruning.magnitude_prune(params, masks.create_mask(params), 0.5)
    params = masks.apply_mask(params, mask)
    tx = optim.keep_pruned_at_zero(optax.lamb(1e-2), mask)
    grads = random_gradients(params, seed=11, num_steps=20)
    noise = random_gradients(params, seed=12, num_steps=20)
    changed_grads = jax.tree_util.tree_map(  # large changes at pruned positions only
        lambda m, g, n: g if m is None else g + jnp.where(m, 0.0, 100 * n), mask, grads, noise,
        is_leaf=lambda x: x is None)
    run = jax.jit(run_steps, static_argnums=0)
    a = run(tx, params, tx.init(params), grads)
    b = run(tx, params, tx.init(params), changed_grads)
    for layer in SHAPES:
        np.testing.assert_array_equal(kernels(a)[layer], kernels(b)[layer])


def test_mask_in_state_does_not_retrace():
    params = random_params(8)
    traces = []

    def update(grads, state, params):
        traces.append(None)
        return optim.keep_pruned_at_zero(optax.adam(1e-2)).update(grads, state, params)

    update = jax.jit(update)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    for seed in range(3):
        mask = pruning.random_prune(jax.random.PRNGKey(seed), masks.create_mask(params), 0.5)
        state = optim.keep_pruned_at_zero(optax.adam(1e-2), mask).init(params)
        updates, _ = update(grads, state, params)
        stepped = optax.apply_updates(params, updates)
        for layer in SHAPES:  # unmasked params: the update zeroes the pruned weights exactly
            np.testing.assert_array_equal(kernels(stepped)[layer] != 0, kernels(mask)[layer])
    assert len(traces) == 1


def test_init_defaults_to_dense_and_checks_the_mask():
    params = random_params(9)
    state = optim.keep_pruned_at_zero(optax.sgd(0.1)).init(params)
    assert masks.weights_remaining(state.mask) == 1.0
    bad = masks.create_mask(random_params(9, {**SHAPES, "output": (7, 5)}))
    with pytest.raises(ValueError, match="'output/kernel' has shape"):
        optim.keep_pruned_at_zero(optax.sgd(0.1), bad).init(params)


def test_extra_arguments_reach_the_inner_optimizer():
    # reduce_on_plateau reads value=: the wrapper must pass it on (and work inside a chain).
    params = random_params(3)
    mask = pruning.magnitude_prune(params, masks.create_mask(params), 0.5)
    params = masks.apply_mask(params, mask)
    inner = optax.chain(optax.adam(1e-2), optax.contrib.reduce_on_plateau(patience=1,
                                                                          factor=0.5))
    tx = optim.keep_pruned_at_zero(inner, mask)
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    state = tx.init(params)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    sizes = []
    for _ in range(4):  # a loss that never improves: the plateau halves the scale
        updates, state = tx.update(grads, state, params, value=jnp.asarray(1.0))
        params = optax.apply_updates(params, updates)
        sizes.append(float(jnp.abs(updates["output"]["kernel"]).max()))
        assert np.all(kernels(params)["output"][~kernels(mask)["output"]] == 0.0)
    assert sizes[-1] < sizes[0] / 1.5
    plateau_state = state.inner_state[1]
    assert float(plateau_state.scale) < 1.0


def test_replace_mask_keeps_the_moments_and_zeroes_the_newly_pruned():
    params = random_params(4)
    tx = optim.keep_pruned_at_zero(optax.adam(1e-2))
    state = tx.init(params)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    _, state = tx.update(grads, state, params)
    mask = pruning.magnitude_prune(params, masks.create_mask(params), 0.5)
    replaced = optim.replace_mask(state, mask)
    assert replaced.inner_state is state.inner_state
    updates, _ = tx.update(grads, replaced, params)
    stepped = optax.apply_updates(params, updates)
    for layer in SHAPES:
        np.testing.assert_array_equal(kernels(stepped)[layer] != 0, kernels(mask)[layer])
    other = masks.create_mask(random_params(4, {**SHAPES, "output": (7, 5)}))
    with pytest.raises(ValueError, match="structure and shapes"):
        optim.replace_mask(state, other)
    with pytest.raises(ValueError, match="holds 0 masked states"):
        optim.replace_mask(state.inner_state, mask)


@pytest.mark.parametrize("strategy, source", sorted(pruning.RESET_SOURCES.items()))
def test_reset_takes_the_strategys_source_under_the_mask(strategy, source):
    params = random_params(5)
    mask = pruning.magnitude_prune(params, masks.create_mask(params), 0.5)
    sources = {name: random_params(seed) for seed, name in
               enumerate(sorted(set(pruning.RESET_SOURCES.values())), start=20)}
    start = pruning.reset(strategy, sources, mask)
    for layer in SHAPES:
        alive = kernels(mask)[layer]
        np.testing.assert_array_equal(kernels(start)[layer][alive],
                                      kernels(sources[source])[layer][alive])
        assert np.all(kernels(start)[layer][~alive] == 0.0)


def test_reset_and_prune_by_reject_bad_arguments():
    params = random_params(5)
    mask = masks.create_mask(params)
    with pytest.raises(ValueError, match="strategy='rewind' is invalid"):
        pruning.reset("rewind", {"init": params}, mask)
    with pytest.raises(ValueError, match="needs the 'rewind' params"):
        pruning.reset("rewind_step", {"init": params}, mask)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        pruning.prune_by(None, "random", params, mask, 0.5)
    with pytest.raises(ValueError, match="criterion='taylor' is invalid"):
        pruning.prune_by(None, "taylor", params, mask, 0.5)
    by_magnitude = pruning.prune_by(None, "magnitude", params, mask, 0.5)
    assert masks.mask_leaves(by_magnitude).keys() == masks.mask_leaves(mask).keys()
    assert masks.weights_remaining(by_magnitude) == pytest.approx(0.5, abs=0.01)
