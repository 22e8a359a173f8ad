"""Masks that cannot leak: the masked optimizer zeroes pruned weights whatever the params were,
is never wrapped twice, and replace_mask finds its state inside optax's combinators."""

import flax.training.train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparse_robust import masks, optim, training

SHAPES = {"dense_0": (12, 10), "output": (10, 4)}


def params_and_mask(seed=0):
    """Unmasked params, with extreme magnitudes among them, and a mask pruning half of each kernel."""
    rng = np.random.default_rng(seed)
    params = {name: {"kernel": rng.normal(size=shape).astype(np.float32)}
              for name, shape in SHAPES.items()}
    params["dense_0"]["bias"] = rng.normal(size=SHAPES["dense_0"][1]).astype(np.float32)
    extremes = np.array([3.4e38, -3.4e38, 1e-45, -1e-45, 1e-30, 123456.789, -0.0], np.float32)
    params["output"]["kernel"].flat[:extremes.size] = extremes
    mask = {name: {"kernel": rng.uniform(size=shape) < 0.5} for name, shape in SHAPES.items()}
    mask["output"]["kernel"].flat[:extremes.size] = False  # the extremes are pruned
    mask["dense_0"]["bias"] = None
    to_jax = lambda tree: jax.tree_util.tree_map(jnp.asarray, tree)  # noqa: E731
    return to_jax(params), to_jax(mask)


def grads_like(params, seed):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)


def assert_pruned_exactly_zero(params, mask):
    for name, alive in masks.mask_leaves(mask).items():
        leaf = np.asarray(masks.named_leaves(params)[name])
        assert np.all(leaf[~np.asarray(alive)] == 0.0), name
        assert not np.any(np.signbit(leaf[~np.asarray(alive)])), name  # +0.0, not -0.0


INNER = {
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    "chain_clip_adam": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)),
    "sgd_momentum": lambda: optax.sgd(1e-2, momentum=0.9),
}


@pytest.mark.parametrize("name", sorted(INNER))
def test_one_update_zeroes_pruned_weights_of_unmasked_params(name):
    params, mask = params_and_mask()
    tx = optim.keep_pruned_at_zero(INNER[name](), mask)
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(grads_like(params, 1), state, params)
    stepped = optax.apply_updates(params, updates)
    assert_pruned_exactly_zero(stepped, mask)
    # Alive weights moved exactly as the inner optimizer moves them on masked gradients.
    inner = INNER[name]()
    masked_grads = masks.apply_mask(grads_like(params, 1), mask)
    inner_updates, _ = inner.update(masked_grads, inner.init(params), params)
    for leaf, alive in masks.mask_leaves(mask).items():
        np.testing.assert_allclose(np.asarray(masks.named_leaves(updates)[leaf])[alive],
                                   np.asarray(masks.named_leaves(inner_updates)[leaf])[alive],
                                   rtol=1e-6)  # jitted against eager


def test_flax_apply_gradients_gives_exact_zeros_too():
    params, mask = params_and_mask(1)
    state = flax.training.train_state.TrainState.create(
        apply_fn=None, params=params, tx=optim.keep_pruned_at_zero(optax.adamw(1e-2), mask))
    state = state.apply_gradients(grads=grads_like(params, 2))
    assert_pruned_exactly_zero(state.params, mask)


def test_update_without_params_is_refused():
    params, mask = params_and_mask()
    tx = optim.keep_pruned_at_zero(optax.sgd(0.1), mask)
    with pytest.raises(ValueError) as err:
        tx.update(grads_like(params, 0), tx.init(params))
    assert str(err.value) == ("keep_pruned_at_zero needs the params in its update, "
                              "tx.update(grads, opt_state, params), to hold pruned weights at "
                              "exactly zero.")


def test_freeze_keeps_untrainable_values():
    params, trainable = params_and_mask()
    tx = optim.freeze(optax.adamw(1e-2, weight_decay=0.1), trainable)
    updates, _ = tx.update(grads_like(params, 3), tx.init(params), params)
    stepped = optax.apply_updates(params, updates)
    for name, alive in masks.mask_leaves(trainable).items():
        before = np.asarray(masks.named_leaves(params)[name])
        after = np.asarray(masks.named_leaves(stepped)[name])
        # XLA:CPU flushes subnormals to zero in any addition (apply_updates), so those differ.
        normal = np.abs(before) >= np.finfo(np.float32).tiny
        np.testing.assert_array_equal(after[~alive & normal], before[~alive & normal])
        assert np.all(after[alive] != before[alive])


ALREADY = ("the optimizer is already masked (keep_pruned_at_zero or freeze); pass the unmasked "
           "one: a second mask would silently intersect the first")


def test_a_masked_optimizer_is_not_masked_again():
    params, mask = params_and_mask()
    masked = optim.keep_pruned_at_zero(optax.adam(1e-2), mask)
    for wrap in (optim.keep_pruned_at_zero, optim.freeze):
        with pytest.raises(ValueError) as err:  # outermost: refused at construction
            wrap(masked, mask)
        assert str(err.value) == ALREADY + "."
    chained = optax.chain(optax.clip_by_global_norm(1.0), masked)
    with pytest.raises(ValueError) as err:  # inside a chain: refused at init
        optim.keep_pruned_at_zero(chained).init(params)
    assert str(err.value) == ALREADY + " (a masked state was found inside it)."
    with pytest.raises(ValueError, match="already masked"):  # the train state helpers wrap too
        training.create_train_state(params, {}, chained, mask, jax.random.PRNGKey(0))


def _inject(mask):
    return optax.inject_hyperparams(
        lambda learning_rate: optim.keep_pruned_at_zero(optax.adam(learning_rate), mask))(
            learning_rate=1e-2)


COMBINATORS = {
    "outermost": lambda mask: optim.keep_pruned_at_zero(optax.adam(1e-2), mask),
    "chain": lambda mask: optax.chain(optax.clip_by_global_norm(1.0),
                                      optim.keep_pruned_at_zero(optax.adam(1e-2), mask)),
    "named_chain": lambda mask: optax.named_chain(
        ("clip", optax.clip(1.0)), ("masked", optim.keep_pruned_at_zero(optax.adam(1e-2), mask))),
    "inject_hyperparams": _inject,
    "multi_steps": lambda mask: optax.MultiSteps(
        optim.keep_pruned_at_zero(optax.adam(1e-2), mask), every_k_schedule=1),
    "chain_of_inject": lambda mask: optax.chain(optax.clip(1.0), _inject(mask)),
}


@pytest.mark.parametrize("name", sorted(COMBINATORS))
def test_replace_mask_finds_the_masked_state_inside_combinators(name):
    params, _ = params_and_mask()
    dense = masks.create_mask(params)
    tx = COMBINATORS[name](dense)
    state = tx.init(params)
    updates, state = tx.update(grads_like(params, 4), state, params)
    params = optax.apply_updates(params, updates)
    assert masks.weights_remaining(optim.find_mask(state)) == 1.0

    _, mask = params_and_mask(5)  # a second pruning round, params left unmasked
    replaced = optim.replace_mask(state, mask)
    assert jax.tree_util.tree_structure(replaced) == jax.tree_util.tree_structure(state)
    assert optim.find_mask(replaced) is mask
    # Everything but the mask is the same state (moments kept).
    strip = lambda s: jax.tree_util.tree_leaves(jax.tree_util.tree_map(  # noqa: E731
        lambda x: x.inner_state if isinstance(x, optim.MaskedState) else x, s,
        is_leaf=lambda x: isinstance(x, optim.MaskedState)))
    assert all(a is b for a, b in zip(strip(replaced), strip(state)))
    updates, _ = tx.update(grads_like(params, 6), replaced, params)
    assert_pruned_exactly_zero(optax.apply_updates(params, updates), mask)


def test_replace_mask_needs_exactly_one_masked_state():
    params, mask = params_and_mask()
    with pytest.raises(ValueError, match="holds 0 masked states; replace_mask needs exactly one"):
        optim.replace_mask(optax.adam(1e-2).init(params), mask)
    two = optax.chain(optim.keep_pruned_at_zero(optax.sgd(0.1)),
                      optim.keep_pruned_at_zero(optax.sgd(0.1)))
    with pytest.raises(ValueError, match="holds 2 masked states"):
        optim.replace_mask(two.init(params), mask)
