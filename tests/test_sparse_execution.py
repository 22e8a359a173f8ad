"""Tests for sparse_robust.models.sparse_execution: a ticket's dense layers run from its nonzeros
give the masked-dense network's attacks, evaluation and gradients."""

import platform

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparse_robust import attacks, evaluation, masks, objectives, training
from sparse_robust.losses import cross_entropy
from sparse_robust.models import get_model
from sparse_robust.models.sparse_execution import sparse_impls, sparse_model_fn

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() != "x86_64",
    reason="the kernel is built for Linux on x86-64 only")

EPS = 0.1


def _ticket(model_name="dense-300-100", density=0.05, shape=(784,), seed=0):
    """A model with random weights, `density` of each prunable layer kept at random, and a batch
    labelled by the model's own predictions (so that attacks have something to break)."""
    model = get_model(model_name)
    init_key, mask_key, x_key = jax.random.split(jax.random.key(seed), 3)
    params, state = training.init_variables(model, init_key, jnp.zeros((1, *shape)))
    mask = masks.create_mask(params)
    named = masks.named_leaves(mask)
    keys = dict(zip(named, jax.random.split(mask_key, len(named))))
    mask = masks.from_named_leaves(mask, {
        name: None if leaf is None else jax.random.uniform(keys[name], leaf.shape) < density
        for name, leaf in named.items()})
    params = masks.apply_mask(params, mask)
    x = jax.random.uniform(x_key, (24, *shape))
    y = jnp.argmax(model.apply({"params": params, **state}, x), -1)
    return model, params, state, mask, x, y


def test_auto_runs_sparse_below_the_threshold_and_the_switch_forces_either_path():
    model, params, _, mask, _, _ = _ticket()
    layers = {"dense_0": "sparse", "dense_1": "sparse", "output": "sparse"}
    assert sparse_impls(mask) == layers == sparse_impls(mask, "sparse")
    assert sparse_impls(mask, "dense") == dict.fromkeys(layers, "dense")
    dense_mask = masks.create_mask(params)  # every weight alive: above the threshold
    assert sparse_impls(dense_mask) == dict.fromkeys(layers, "dense")
    assert sparse_impls(dense_mask, "sparse") == layers
    # "dense", or nothing sparse, is the plain model fn.
    assert sparse_model_fn(model, mask, "dense").__qualname__.startswith("make_model_fn")
    with pytest.raises(ValueError, match="sparse_impl"):
        sparse_model_fn(model, mask, "csr")


def test_logits_and_gradients_match_masked_dense():
    model, params, state, mask, x, y = _ticket(model_name="lenet-300-100")  # with biases
    sparse, dense = sparse_model_fn(model, mask, "sparse"), training.make_model_fn(model)
    np.testing.assert_allclose(sparse(params, state, x, False)[0],
                               dense(params, state, x, False)[0], atol=1e-5)

    loss = lambda fn: lambda p, x: jnp.mean(cross_entropy(fn(p, state, x, False)[0], y))
    got = jax.jit(jax.grad(loss(sparse), (0, 1)))(params, x)
    want = jax.grad(loss(dense), (0, 1))(params, x)
    np.testing.assert_allclose(got[1], want[1], atol=1e-5)  # the attacks' gradient
    # The params' gradient: the masked-dense one at the nonzeros, zero at pruned weights (which
    # the masked optimizer never moves anyway).
    masked_want = masks.apply_mask(want[0], mask)
    for g, w in zip(jax.tree_util.tree_leaves(got[0]), jax.tree_util.tree_leaves(masked_want)):
        np.testing.assert_allclose(g, w, atol=1e-5)


ATTACKS = {
    "fgsm": attacks.make_attack("fgsm", eps=EPS),
    "pgd": attacks.make_attack("pgd", eps=EPS, step_size=EPS / 4, num_steps=5),
    "apgd": attacks.make_attack("apgd", eps=EPS, num_steps=5),
    "autoattack": attacks.make_attack("autoattack", eps=EPS, num_steps=5, n_target_classes=2,
                                      num_queries=20),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attacks_give_the_same_per_example_results(name):
    model, params, state, mask, x, y = _ticket()
    key = jax.random.key(3)
    results = {}
    for impl in ("dense", "sparse"):
        model_fn = sparse_model_fn(model, mask, impl)
        logits_fn = lambda z: model_fn(params, state, z, False)[0]
        x_adv = jax.jit(lambda x, y, k: ATTACKS[name](logits_fn, x, y, k))(x, y, key)
        results[impl] = (x_adv, np.asarray(jnp.argmax(logits_fn(x_adv), -1) == y))
    np.testing.assert_array_equal(results["sparse"][1], results["dense"][1])
    np.testing.assert_allclose(results["sparse"][0], results["dense"][0], atol=1e-5)
    assert not results["dense"][1].all()  # the attack broke something: the test can fail


def test_the_evaluator_and_a_train_step_agree_with_masked_dense():
    model, params, state, mask, x, y = _ticket()
    x, y = np.asarray(x), np.asarray(y)
    attack = ATTACKS["pgd"]
    per_example, losses = {}, {}
    objective = objectives.Objective("mixed", attack=attack, label_smoothing=0.1)
    for impl in ("dense", "sparse"):
        model_fn = sparse_model_fn(model, mask, impl)
        evaluator = evaluation.Evaluator(model_fn, batch_size=10)
        per_example[impl] = evaluator.per_example(params, state, x, y, {"pgd": attack},
                                                  jax.random.key(4))
        step = jax.jit(training.make_train_step(model_fn, optax.adam(1e-3), objective))
        train_state = training.create_train_state(params, state, optax.adam(1e-3), mask,
                                                  jax.random.key(5))
        for _ in range(2):
            train_state, metrics = step(train_state, x[:12], y[:12])
        losses[impl] = (float(metrics["loss"]), train_state.params)
    assert set(per_example["sparse"]) == set(per_example["dense"]) == {"clean", "pgd"}
    for key, want in per_example["dense"].items():
        np.testing.assert_array_equal(per_example["sparse"][key].correct, want.correct)
        np.testing.assert_allclose(per_example["sparse"][key].loss, want.loss, atol=1e-5)
    assert abs(losses["sparse"][0] - losses["dense"][0]) < 1e-5
    for a, b in zip(jax.tree_util.tree_leaves(losses["sparse"][1]),
                    jax.tree_util.tree_leaves(losses["dense"][1])):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # Pruned weights stay exactly zero on the sparse path too.
    for p, m in zip(jax.tree_util.tree_leaves(losses["sparse"][1]),
                    jax.tree_util.tree_leaves(mask)):
        assert not np.any(np.asarray(p)[~np.asarray(m)])


def test_a_conv_tickets_dense_layers_run_sparse_and_its_convolutions_dense():
    model, params, state, mask, x, y = _ticket("conv-2", 0.05, (12, 12, 1))
    assert sparse_impls(mask) == {"dense_0": "sparse", "dense_1": "sparse", "output": "sparse"}
    sparse, dense = sparse_model_fn(model, mask), training.make_model_fn(model)
    np.testing.assert_allclose(sparse(params, state, x, False)[0],
                               dense(params, state, x, False)[0], atol=1e-5)


def test_a_traced_mask_is_refused():
    model, params, _, mask, _, _ = _ticket()
    with pytest.raises(ValueError, match="needs a concrete mask"):
        jax.jit(lambda m: sparse_model_fn(model, m)(params, {}, jnp.zeros((1, 784)), False)[0])(
            mask)


def test_the_engine_evaluates_a_sparse_ticket_sparse_and_anything_else_as_before():
    from sparse_robust import data
    from sparse_robust.runs import context

    model, params, state, mask, x, y = _ticket()
    x, y = np.asarray(x), np.asarray(y)
    dataset = data.Dataset("ticket", 10, x, y, x[:4], y[:4], x, y)
    plan = context.EvalPlan(attack=None, attacks={"pgd": ATTACKS["pgd"]})
    ctx = context.build(dataset, model, optax.adam(1e-3), objectives.Objective("natural"),
                        num_steps=1, batch_size=4, eval_plan=plan, sparse_impl="auto")
    ticket = ctx.ticket_evaluator(mask)
    assert ticket is not ctx.evaluator
    key = jax.random.key(6)
    measured = [e.evaluate(params, state, x, y, plan.attacks, key) for e in (ticket, ctx.evaluator)]
    assert measured[0] == measured[1] and measured[0]["pgd_accuracy"] < 1
    assert ctx.ticket_evaluator(masks.create_mask(params)) is ctx.evaluator  # above the threshold
    assert ctx.derive(sparse_impl="dense").ticket_evaluator(mask) is ctx.derive(
        sparse_impl="dense").evaluator
    # Another model fn (HYDRA's scores) is evaluated as it is.
    scored = ctx.derive(model_fn=lambda *args: ctx.model_fn(*args))
    assert scored.ticket_evaluator(mask) is scored.evaluator


def test_the_switch_is_a_config_field_that_does_not_change_results():
    """Either path gives the same per-example results, so a workdir resumes across it."""
    from experiments.configs import base
    from sparse_robust.runs import schema

    config = base.get_config()
    assert config.model.sparse_impl == "auto"
    assert "sparse_impl" not in schema.result_fields(config)["model"]
    assert "conv_impl" in schema.result_fields(config)["model"]
