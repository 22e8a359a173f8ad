"""Tests for sparse_robust.training: scan loop vs steps, seeds, masks, evaluation, BN state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparse_robust import evaluation, masks, pruning, training
from sparse_robust.objectives import Objective

BATCH, STEPS = 8, 5


def teacher_data(seed, n=64, dim=6, classes=3):
    """A learnable problem: labels from a random linear teacher."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(n, dim)).astype(np.float32)
    labels = np.argmax((x - 0.5) @ rng.normal(size=(dim, classes)), axis=-1).astype(np.int32)
    return x, labels


def batch_indices(seed, steps, batch, n=64):
    rng = np.random.default_rng(seed)
    return jnp.asarray(np.stack([rng.permutation(n)[:batch] for _ in range(steps)]), jnp.int32)


def numpy_mlp(params, x):
    """Forward pass of the bias-free TinyMLP in numpy."""
    h = np.asarray(x, np.float64)
    for layer in ("dense_0", "dense_1"):
        h = np.maximum(h @ np.asarray(params[layer]["kernel"], np.float64), 0.0)
    return h @ np.asarray(params["output"]["kernel"], np.float64)


def numpy_metrics(logits, labels):
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return {"loss": -np.mean(log_probs[np.arange(len(labels)), labels]),
            "accuracy": np.mean(logits.argmax(-1) == labels)}


def leaves(tree):
    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(tree)]


@pytest.fixture(scope="module")
def setup(tiny_mlp, make_fgsm, numpy_init):
    """A tiny MLP, adam, and the mixed objective with a random-start FGSM (so the key matters).

    Module-scoped so that the jitted loop compiles once for all the tests that use it.
    """
    model = tiny_mlp(hidden=(8, 6), num_classes=3)
    tx = optax.adam(1e-2)
    objective = Objective("mixed", make_fgsm(0.1, random_start=True))
    traces = []  # one entry each time the model is traced

    def model_fn(params, model_state, x, train):
        traces.append(None)
        return flax_model_fn(params, model_state, x, train)

    flax_model_fn = training.make_model_fn(model)
    return dict(model=model, model_fn=model_fn, traces=traces, tx=tx, objective=objective,
                loop=training.make_train_loop(model_fn, tx, objective),
                step=jax.jit(training.make_train_step(model_fn, tx, objective)),
                evaluator=lambda batch_size: evaluation.Evaluator(model_fn, batch_size=batch_size),
                eval_attacks={"adv": make_fgsm(0.1)},
                data=teacher_data(0), make_fgsm=make_fgsm, init=numpy_init)


def init_variables(setup, seed):
    """(params, model_state) like ``training.init_variables``, from numpy values (see conftest)."""
    variables = setup["init"](setup["model"], jnp.zeros((1, 6)), seed)
    return variables.pop("params"), variables


def new_state(setup, init_seed=0, key_seed=0, mask_fn=None):
    params, model_state = init_variables(setup, init_seed)
    mask = masks.create_mask(params) if mask_fn is None else mask_fn(params)
    return training.create_train_state(params, model_state, setup["tx"], mask,
                                       jax.random.PRNGKey(key_seed))


def train(setup, init_seed=0, key_seed=0):
    images, labels = setup["data"]
    state, _ = setup["loop"](new_state(setup, init_seed, key_seed), images, labels,
                             batch_indices(1, STEPS, BATCH))
    return state


def test_loop_equals_repeated_steps(setup):
    images, labels = setup["data"]
    indices = batch_indices(2, STEPS, BATCH)
    looped, step_metrics = setup["loop"](new_state(setup), images, labels, indices)
    state, history = new_state(setup), []
    for idx in np.asarray(indices):
        state, metrics = setup["step"](state, images[idx], labels[idx])
        history.append(metrics)
    assert int(looped.step) == int(state.step) == STEPS
    for a, b in zip(leaves(looped.params), leaves(state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(leaves(looped.opt_state), leaves(state.opt_state)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for name, values in step_metrics.items():  # one value per step, in order
        np.testing.assert_allclose(values, [float(m[name]) for m in history], rtol=1e-5)


def test_same_seed_same_params_other_seed_other_params(setup):
    reference = leaves(train(setup).params)
    for a, b in zip(leaves(train(setup).params), reference):
        np.testing.assert_array_equal(a, b)
    # Same init, other training key: only the attack's random start differs.
    assert any(not np.array_equal(a, b) for a, b in zip(leaves(train(setup, key_seed=1).params),
                                                         reference))
    assert any(not np.array_equal(a, b) for a, b in zip(leaves(train(setup, init_seed=1).params),
                                                         reference))


def test_pruned_weights_stay_zero_and_caller_arrays_survive(setup):
    images, labels = setup["data"]
    params, model_state = init_variables(setup, seed=0)
    mask = pruning.magnitude_prune(params, masks.create_mask(params), 0.5)
    key = jax.random.PRNGKey(4)
    state = training.create_train_state(params, model_state, setup["tx"], mask, key)
    start = masks.apply_mask(params, mask)
    trained, _ = setup["loop"](state, images, labels, batch_indices(3, STEPS, BATCH))
    for layer in ("dense_0", "dense_1", "output"):
        alive = np.asarray(mask[layer]["kernel"])
        kernel = np.asarray(trained.params[layer]["kernel"])
        assert np.all(kernel[~alive] == 0.0)
        assert np.any(kernel[alive] != np.asarray(start[layer]["kernel"])[alive])
        np.testing.assert_array_equal(trained.mask[layer]["kernel"], alive)
    # The loop donates the state; the caller's params, mask and key must not be donated with it.
    for array in jax.tree_util.tree_leaves((params, mask, key)):
        assert not array.is_deleted()


def test_loss_decreases_on_a_learnable_problem(setup):
    images, labels = setup["data"]
    state = new_state(setup)
    evaluator = setup["evaluator"](7)
    evaluate = lambda params: evaluator.evaluate(params, {}, images, labels, setup["eval_attacks"],
                                                 jax.random.PRNGKey(2))
    before = evaluate(state.params)
    for chunk in range(60):  # same index shape as the other tests: no new compilation
        state, _ = setup["loop"](state, images, labels, batch_indices(10 + chunk, STEPS, BATCH))
    after = evaluate(state.params)
    assert after["clean_loss"] < 0.5 * before["clean_loss"]
    assert after["clean_accuracy"] > 0.75 and after["adv_loss"] < before["adv_loss"]


def test_evaluate_matches_numpy_for_any_batch_size(setup):
    params = new_state(setup, init_seed=3).params
    images, labels = setup["data"]
    images, labels = images[:30], labels[:30]
    fgsm = setup["eval_attacks"]["adv"]
    x_adv = fgsm(lambda z: setup["model_fn"](params, {}, z, False)[0], images, labels, None)
    clean_logits, adv_logits = numpy_mlp(params, images), numpy_mlp(params, x_adv)
    expected = {f"clean_{k}": v for k, v in numpy_metrics(clean_logits, labels).items()}
    expected.update({f"adv_{k}": v for k, v in numpy_metrics(adv_logits, labels).items()})
    expected["worst_case_accuracy"] = np.mean((clean_logits.argmax(-1) == labels)
                                              & (adv_logits.argmax(-1) == labels))
    assert expected["adv_loss"] > expected["clean_loss"]
    for batch_size in (7, 1000):  # 7 leaves a padded last batch; 1000 > the dataset
        got = setup["evaluator"](batch_size).evaluate(params, {}, images, labels,
                                                      setup["eval_attacks"], jax.random.PRNGKey(0))
        assert got == pytest.approx(expected, rel=1e-5), batch_size
    with pytest.raises(ValueError, match="non-empty"):
        setup["evaluator"](7).evaluate(params, {}, images[:0], labels[:0])


def test_batch_norm_state_trains_and_is_read_only_in_evaluation(tiny_conv_bn, numpy_init):
    model = tiny_conv_bn()
    model_fn = training.make_model_fn(model)
    rng = np.random.default_rng(7)
    images = rng.uniform(size=(20, 5, 5, 2)).astype(np.float32)
    labels = rng.integers(0, 3, size=20).astype(np.int32)
    variables = numpy_init(model, images[:1], seed=0)
    params, model_state = variables.pop("params"), variables
    state = training.create_train_state(params, model_state, optax.sgd(0.1),
                                        masks.create_mask(params), jax.random.PRNGKey(1))
    indices = batch_indices(8, 3, 4, n=20)
    loop = training.make_train_loop(model_fn, optax.sgd(0.1), Objective("natural"))
    state, _ = loop(state, images, labels, indices)

    # Running averages with momentum 0.9 of the input's per-channel batch mean and variance.
    expected = {k: np.asarray(model_state["batch_stats"]["input_norm"][k]) for k in ("mean", "var")}
    for idx in np.asarray(indices):
        for k, batch_stat in [("mean", images[idx].mean(axis=(0, 1, 2))),
                              ("var", images[idx].var(axis=(0, 1, 2)))]:
            expected[k] = 0.9 * expected[k] + 0.1 * batch_stat
    for k in expected:
        np.testing.assert_allclose(state.model_state["batch_stats"]["input_norm"][k], expected[k],
                                   rtol=1e-4)

    stats_before = leaves(state.model_state)
    evaluate = lambda model_state, batch_size: evaluation.Evaluator(
        model_fn, batch_size=batch_size).evaluate(state.params, model_state, images, labels)
    # Running statistics make each prediction independent of its batch-mates.
    assert evaluate(state.model_state, 3) == pytest.approx(evaluate(state.model_state, 20),
                                                           rel=1e-5)
    for a, b in zip(leaves(state.model_state), stats_before):
        np.testing.assert_array_equal(a, b)
    stats = state.model_state["batch_stats"]
    shifted = {"batch_stats": {**stats, "input_norm": {**stats["input_norm"],
                                                       "mean": stats["input_norm"]["mean"] + 0.5}}}
    assert evaluate(shifted, 20)["clean_loss"] != pytest.approx(
        evaluate(state.model_state, 20)["clean_loss"])


def test_loop_does_not_retrace_for_a_new_mask(setup):
    images, labels = setup["data"]
    indices = batch_indices(9, STEPS, BATCH)
    state, _ = setup["loop"](new_state(setup), images, labels, indices)
    traced = len(setup["traces"])
    assert traced > 0
    state, _ = setup["loop"](state, images, labels, indices)  # continue from the loop's output
    rng = np.random.default_rng(0)
    random_mask = lambda p: jax.tree_util.tree_map(
        lambda m: None if m is None else jnp.asarray(rng.random(m.shape) < 0.3),
        masks.create_mask(p), is_leaf=lambda m: m is None)
    for seed, mask_fn in enumerate([random_mask, lambda p: pruning.magnitude_prune(
            p, masks.create_mask(p), 0.5)]):
        sparse, _ = setup["loop"](new_state(setup, init_seed=seed, mask_fn=mask_fn), images,
                                  labels, indices)
        pruned = ~np.asarray(sparse.mask["output"]["kernel"])
        assert pruned.any() and np.all(np.asarray(sparse.params["output"]["kernel"])[pruned] == 0)
    assert len(setup["traces"]) == traced


def test_per_step_loop_equals_scanned_loop_and_compiles_once(setup):
    images, labels = setup["data"]
    per_step = training.make_train_loop(setup["model_fn"], setup["tx"], setup["objective"],
                                        scan=False)
    indices = batch_indices(3, STEPS, BATCH)
    scanned, scanned_metrics = setup["loop"](new_state(setup), images, labels, indices)
    stepped, stepped_metrics = per_step(new_state(setup), images, labels, indices)
    assert int(stepped.step) == int(scanned.step) == STEPS
    for a, b in zip(leaves(stepped.params) + leaves(stepped.opt_state),
                    leaves(scanned.params) + leaves(scanned.opt_state)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert set(stepped_metrics) == set(scanned_metrics)
    for name, value in scanned_metrics.items():
        np.testing.assert_allclose(stepped_metrics[name], value, rtol=1e-5)
    per_step(stepped, images, labels, batch_indices(4, STEPS + 2, BATCH))  # more steps, same program
    assert per_step._cache_size() == 1


def test_per_step_loop_trains_vmapped_trials_like_scan(setup):
    images, labels = setup["data"]
    make = lambda scan: training.make_train_loop(setup["model_fn"], setup["tx"], setup["objective"],
                                                 vmap_trials=True, scan=scan)
    stack = lambda: training.stack_states([new_state(setup, init_seed=s, key_seed=s) for s in (0, 1)])
    indices = jnp.stack([batch_indices(5, STEPS, BATCH), batch_indices(6, STEPS, BATCH)])
    scanned, scanned_metrics = make(True)(stack(), images, labels, indices)
    stepped, stepped_metrics = make(False)(stack(), images, labels, indices)
    for a, b in zip(leaves(stepped.params), leaves(scanned.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for name, value in scanned_metrics.items():
        assert stepped_metrics[name].shape == (2, STEPS)
        np.testing.assert_allclose(stepped_metrics[name], value, rtol=1e-5)
    assert not np.allclose(stepped.params["output"]["kernel"][0], stepped.params["output"]["kernel"][1])
