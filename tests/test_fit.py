"""Training units (sparse_robust.runs.fit): resume keeps the early-stopping weights, divergence
stops cleanly, and trials stacked under vmap give exactly what they give alone."""

import json
import math

import jax
import numpy as np
import optax
import pytest

from sparse_robust import data, masks, training
from sparse_robust.objectives import Objective
from sparse_robust.runs import context, fit, store
from sparse_robust.runs.errors import DivergedError
from sparse_robust.runs.layout import UnitFiles

NUM_STEPS, EVAL_EVERY = 30, 10


def negative_loss_context(tiny_mlp, optimizer=None, **options):
    """A tiny MLP on a learnable problem whose early stopping *maximises* the validation loss:
    training lowers it, so the first evaluation is the best and the early-stopping weights are
    not the last ones."""
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(160, 6)).astype(np.float32)
    labels = np.argmax((images - 0.5) @ rng.normal(size=(6, 3)), axis=-1).astype(np.int32)
    dataset = data.Dataset("teacher", 3, images[40:], labels[40:], images[:20], labels[:20],
                           images[20:40], labels[20:40])
    plan = context.EvalPlan(attack=None, attacks={}, early_stop_metric=lambda val: -val["loss"])
    return context.build(dataset, tiny_mlp(hidden=(8, 6), num_classes=3),
                         optimizer or optax.adam(5e-2), Objective("natural"), num_steps=NUM_STEPS,
                         batch_size=20, eval_every=EVAL_EVERY, eval_plan=plan, **options)


@pytest.fixture(scope="module")
def ctx(tiny_mlp):
    return negative_loss_context(tiny_mlp)


def job(ctx, directory, init_seed=0, key_seed=1):
    params, model_state = ctx.init(jax.random.PRNGKey(init_seed))
    state = training.create_train_state(params, model_state, ctx.optimizer,
                                        masks.create_mask(params), jax.random.PRNGKey(key_seed))
    return fit.FitJob(state=state, data_key=jax.random.PRNGKey(2 + key_seed),
                      eval_key=jax.random.PRNGKey(3), files=UnitFiles(str(directory)),
                      label=f"unit {init_seed}")


def leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_resume_restores_the_early_stopping_weights(ctx, tmp_path, interrupt_train_loop,
                                                    monkeypatch):
    [reference] = fit.fit(ctx, [job(ctx, tmp_path / "reference")])
    assert reference.best_step == EVAL_EVERY < NUM_STEPS  # an early step is the best

    interrupt_train_loop(at=3)  # the last chunk, after the checkpoint at step 20
    with pytest.raises(interrupt_train_loop.error):
        fit.fit(ctx, [job(ctx, tmp_path / "resumed")])
    monkeypatch.undo()
    [resumed] = fit.fit(ctx, [job(ctx, tmp_path / "resumed")])

    assert resumed.best_step == reference.best_step
    for got, want in zip(leaves((resumed.best_params, resumed.best_model_state)),
                         leaves((reference.best_params, reference.best_model_state))):
        np.testing.assert_array_equal(got, want)
    timeless = lambda history: [{k: v for k, v in r.items() if k != "train_seconds"}
                                for r in history]
    assert timeless(resumed.history) == timeless(reference.history)
    # The early-stopping accuracies, measured on the restored best weights, are the same too.
    dataset = ctx.dataset
    accuracies = [ctx.evaluator.evaluate(o.best_params, o.best_model_state, dataset.test_images,
                                         dataset.test_labels) for o in (reference, resumed)]
    assert accuracies[0] == accuracies[1]
    # And the best weights are not the final ones, so a stale copy could not pass by accident.
    assert not np.array_equal(np.asarray(resumed.best_params["output"]["kernel"]),
                              np.asarray(resumed.state.params["output"]["kernel"]))


def test_stacked_trials_equal_trials_trained_alone(ctx, tmp_path):
    stacked_ctx = ctx.derive(trials_at_once=3)
    alone = [fit.fit(ctx, [job(ctx, tmp_path / f"alone_{s}", s, s)])[0] for s in range(3)]
    together = fit.fit(stacked_ctx, [job(stacked_ctx, tmp_path / f"together_{s}", s, s)
                                     for s in range(3)])
    for one, other in zip(alone, together):
        assert one.best_step == other.best_step
        for a, b in zip(leaves((one.state.params, one.best_params)),
                        leaves((other.state.params, other.best_params))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        for a, b in zip(one.history, other.history):
            assert a["val"] == pytest.approx(b["val"], rel=1e-4)
    for s in range(3):  # each trial keeps its own checkpoint and metrics
        written = store.read_jsonl(str(tmp_path / f"together_{s}" / "metrics.jsonl"))
        assert [r["val"] for r in written] == [r["val"] for r in together[s].history]
        assert (tmp_path / f"together_{s}" / "progress" / str(NUM_STEPS)).is_dir()
    assert not np.allclose(together[0].state.params["output"]["kernel"],
                           together[1].state.params["output"]["kernel"])


def test_a_trial_behind_the_others_catches_up_alone(ctx, tmp_path):
    """A kill between two trials' checkpoint writes leaves them at different steps."""
    stacked_ctx = ctx.derive(trials_at_once=2)
    short = ctx.derive(schedule=context.Schedule(20, 20, 10, 10))
    fit.fit(short, [job(ctx, tmp_path / "t0", 0, 0)])  # trial 0 reached step 20; trial 1 nothing
    resumed = fit.fit(stacked_ctx, [job(ctx, tmp_path / f"t{s}", s, s) for s in range(2)])
    alone = [fit.fit(ctx, [job(ctx, tmp_path / f"a{s}", s, s)])[0] for s in range(2)]
    for one, other in zip(alone, resumed):
        for a, b in zip(leaves(one.state.params), leaves(other.state.params)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_divergence_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny_mlp, tmp_path):
    # A sane learning rate for 15 steps, then an absurd one: the loss overflows after step 15.
    schedule = optax.piecewise_constant_schedule(1e-2, {15: 1e20})
    ctx = negative_loss_context(tiny_mlp, optax.sgd(schedule))
    with pytest.raises(DivergedError, match=r"in unit 0: the loss is (nan|inf) at step \d+") as err:
        fit.fit(ctx, [job(ctx, tmp_path / "unit")])
    step = int(str(err.value).split(" at step ")[1].split(";")[0])
    assert 15 < step <= 20
    assert f"the last good checkpoint (step {EVAL_EVERY}) is kept" in str(err.value)
    assert sorted(p.name for p in (tmp_path / "unit" / "progress").iterdir()) == [str(EVAL_EVERY)]
    # metrics.jsonl holds the chunks before the divergence, as strict JSON.
    lines = (tmp_path / "unit" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
               for line in lines]
    assert [r["step"] for r in records] == [EVAL_EVERY]
    assert all(math.isfinite(v) for v in records[0]["val"].values())
