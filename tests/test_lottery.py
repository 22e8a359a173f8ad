"""The pruning chain: from plain Python (no config), its reset strategies, and through the
pipeline (schedules, records, resume, compile counts)."""

import json

import jax
import numpy as np
import optax
import pytest

from conftest import set_field
from experiments.configs import base
from sparse_robust import data, masks, models, pruning
from sparse_robust.objectives import Objective
from sparse_robust.runs import context, lottery, pipeline, store
from sparse_robust.runs.layout import Layout

TIMING_FIELDS = ("train_seconds", "steps_per_second")


@pytest.fixture(scope="module")
def dataset():
    return data.make_synthetic(0, num_train=240, num_val=60, num_test=60, image_shape=(8, 8, 1),
                               flatten=True)


def tiny_config(**overrides):
    config = base.get_config()
    config.progress = False
    config.num_trials = 1
    config.train.attack = config.eval.attack = "pgd"
    config.model.name = "lenet-300-100"
    config.train.num_steps = 20
    config.train.batch_size = 20
    config.attacks.pgd.num_steps = 2
    config.eval.every = 10
    config.eval.num_examples = 0
    config.eval.batch_size = 60
    config.eval.attacks = "fgsm"
    config.eval.sanity_examples = 0
    config.checkpoint_every = 10
    config.prune.levels = 2
    config.parallel.num_devices = 1
    for dotted, value in overrides.items():
        set_field(config, dotted, value)
    return config


def strip_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def plain_context(dataset, num_steps=10):
    """A context built from library objects only: no ConfigDict anywhere."""
    return context.build(dataset, models.get_model("lenet-300-100"), optax.adam(1e-3),
                         Objective("natural"), num_steps=num_steps, batch_size=20, eval_every=5)


def test_dense_300_100_schedule_follows_closed_form():
    model = models.get_model("dense-300-100")
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, 784)))["params"])
    params = jax.tree_util.tree_map(lambda s: np.random.default_rng(0).normal(size=s.shape), params)
    mask = masks.create_mask(params)
    rates = {"*": 0.2, "output": 0.1}
    remaining = [1.0]
    for _ in range(18):
        mask = pruning.prune_by(None, "magnitude", params, mask, rates)
        remaining.append(masks.weights_remaining(mask))
    sizes = {"hidden": 784 * 300 + 300 * 100, "output": 100 * 10}
    closed = [(sizes["hidden"] * 0.8 ** k + sizes["output"] * 0.9 ** k) / sum(sizes.values())
              for k in range(19)]
    np.testing.assert_allclose(remaining, closed, atol=2e-5)  # integer rounding only
    # the numbers of Cosentino et al.: 51.3%, 16.9%, 8.7%, 3.6%, 1.8% after 3, 8, 11, 15, 18 levels
    for level, paper in ((3, 51.3), (8, 16.9), (11, 8.7), (15, 3.6), (18, 1.8)):
        assert 100 * remaining[level] == pytest.approx(paper, abs=0.06)  # 1.85% is "1.8%" there


def test_targets_give_the_rates_that_reach_them():
    config = tiny_config(**{"prune.levels": 0, "prune.targets": "0.8,0.95",
                            "prune.rounds_per_target": 2, "prune.scope": "global"})
    rates = pipeline.chain_rates(config)
    remaining = np.cumprod([1 - r for r in rates])
    np.testing.assert_allclose(remaining[[1, 3]], [0.2, 0.05], rtol=1e-12)
    assert rates[0] == pytest.approx(rates[1]) and rates[2] == pytest.approx(rates[3])


def test_chain_runs_from_plain_python(dataset, tmp_path):
    """run_chain takes explicit arguments: initial weights, a starting mask, per-level rates,
    a reset strategy and a layout."""
    ctx = plain_context(dataset)
    layout = Layout(str(tmp_path))
    init = ctx.init(jax.random.PRNGKey(7))
    start_mask = pruning.magnitude_prune(init[0], masks.create_mask(init[0]), 0.5)
    rates = [0.5, {"*": 0.2, "output": 0.0}]
    records = lottery.run_chain(ctx, layout, {3: init}, rates, reset="rewind_init",
                                mask=start_mask)[3]
    assert [r["level"] for r in records] == [0, 1, 2] and {r["trial"] for r in records} == {3}
    remaining = [r["weights_remaining"] for r in records]
    assert remaining[0] == pytest.approx(0.5, abs=1e-3)
    assert remaining[1] == pytest.approx(0.25, abs=1e-3)
    output = [r["layer_weights_remaining"]["output"] for r in records]
    assert output[2] == output[1] and remaining[2] < remaining[1]  # the per-layer rates held
    # Level 2 restarts the survivors at the given θ0 (rewinding), under its own mask.
    files = layout.unit(3, 2)
    start = store.load_tree(files.start_params, init[0])
    mask = store.load_mask(files.mask, init[0])
    for name, alive in masks.mask_leaves(mask).items():
        alive = np.asarray(alive)
        got, theta0 = np.asarray(masks.named_leaves(start)[name]), np.asarray(
            masks.named_leaves(init[0])[name])
        np.testing.assert_array_equal(got[alive], theta0[alive])
        assert np.all(got[~alive] == 0)
    # Running it again trains nothing: every level is read back.
    again = lottery.run_chain(ctx, layout, {3: init}, rates, reset="rewind_init",
                              mask=start_mask)[3]
    assert again == records


@pytest.mark.parametrize("strategy", pruning.RESET_STRATEGIES)
def test_each_strategy_starts_where_it_promises(tmp_path, dataset, strategy):
    ctx = plain_context(dataset)
    layout = Layout(str(tmp_path))
    init = lottery.trial_init(ctx, 0)
    lottery.run_chain(ctx, layout, {0: init}, [0.3, 0.3], reset=strategy, rewind_step=5)
    trial = layout.trial(0)
    like = ctx.abstract_variables()
    theta0 = store.load_tree(trial.init_params, init[0])
    final = [store.load_tree(layout.unit(0, level).final_variables, like)[0] for level in range(3)]
    for level in (1, 2):
        files = layout.unit(0, level)
        mask = store.load_mask(files.mask, init[0])
        start = store.load_tree(files.start_params, init[0])
        source = {"rewind_init": lambda: theta0,
                  "rewind_step": lambda: store.load_tree(trial.rewind_params, init[0]),
                  "continue": lambda: final[level - 1],
                  "dense_trained": lambda: final[0]}.get(strategy, lambda: None)()
        for name, alive in masks.mask_leaves(mask).items():
            alive = np.asarray(alive)
            got = np.asarray(masks.mask_leaves(start)[name])
            assert np.all(got[~alive] == 0)
            if source is not None:
                np.testing.assert_array_equal(got[alive],
                                              np.asarray(masks.mask_leaves(source)[name])[alive])
            else:  # a new draw: not θ0, not trained, but initializer-like
                reference = np.asarray(masks.mask_leaves(theta0)[name])
                assert not np.allclose(got[alive], reference[alive])
                assert np.std(got[alive]) == pytest.approx(float(np.std(reference)), rel=0.2)
        if strategy == "rewind_step":  # θk differs from θ0 and from the trained weights
            rewind = store.load_tree(trial.rewind_params, init[0])
            assert not np.allclose(rewind["output"]["kernel"], theta0["output"]["kernel"])
            assert not np.allclose(rewind["output"]["kernel"], final[0]["output"]["kernel"])


def test_masks_shrink_and_summary_has_design_fields(tmp_path, dataset):
    records = pipeline.run(tiny_config(**{"eval.sanity_examples": 60}), str(tmp_path),
                           dataset=dataset)
    assert [r["level"] for r in records] == [0, 1, 2]
    remaining = [r["weights_remaining"] for r in records]
    assert remaining[0] == 1.0 and remaining[0] > remaining[1] > remaining[2]
    for record in records:
        assert 0 <= record["clean_accuracy"] <= 1
        assert set(record["robust_accuracy"]) == {"fgsm", "worst_case"}
        assert record["early_stop_step"] in (10, 20)
        assert record["attacks"]["fgsm"]["label_source"] == "predicted"
        assert record["attacks"]["fgsm"]["eps"] == 0.3
        assert set(record["sanity_checks"]) == {
            "num_examples", "monotone_in_eps", "eps0_equals_clean", "pgd_not_weaker_than_fgsm",
            "apgd_not_weaker_than_pgd", "large_eps_reaches_chance", "ce_and_dlr_agree",
            "deterministic_at_evaluation", "few_zero_gradients"}
        assert record["sanity_checks"]["eps0_equals_clean"]["passed"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert strip_timing(summary) == strip_timing(records)
    run_id = json.loads((tmp_path / "sparse_robust.json").read_text())["run_id"]
    assert {r["run_id"] for r in summary} == {run_id}
    layout = Layout(str(tmp_path))
    loaded = [store.read_mask_arrays(layout.unit(0, level).mask) for level in range(3)]
    for older, newer in zip(loaded, loaded[1:]):
        for name in older:
            assert np.all(~newer[name] | older[name])


def test_resume_after_interruption_gives_the_same_summary(tmp_path, dataset,
                                                          interrupt_train_loop):
    config = tiny_config(**{"train.num_steps": 30})
    reference = pipeline.run(config, str(tmp_path / "reference"), dataset=dataset)

    # Interrupt the second level after its second chunk (step 20; last checkpoint at step 20):
    # 3 chunks at level 0, then the 3rd chunk of level 1.
    calls = interrupt_train_loop(at=6)
    with pytest.raises(interrupt_train_loop.error):
        pipeline.run(config, str(tmp_path / "resumed"), dataset=dataset)
    partial = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert [r["level"] for r in partial] == [0]
    resumed = pipeline.run(config, str(tmp_path / "resumed"), dataset=dataset)
    # 1 call re-runs level 1's last chunk from the step-20 checkpoint, then level 2's 3 chunks
    assert calls["n"] == 6 + 1 + 3
    assert strip_timing(resumed) == strip_timing(reference)


@pytest.mark.parametrize("loop,model,conv_impl,expected", [  # JAX runs on the CPU in tests
    ("auto", "lenet-300-100", "auto", True), ("auto", "conv-2", "auto", True),  # patches
    ("auto", "conv-2", "xla", False), ("scan", "conv-2", "xla", True),
    ("per_step", "lenet-300-100", "auto", False)])
def test_train_loop_choice(loop, model, conv_impl, expected):
    sample = np.zeros((1, 8, 8, 1) if model == "conv-2" else (1, 64), np.float32)
    impls = models.conv_impls(models.get_model(model, conv_impl=conv_impl), sample)
    assert context.uses_scan(loop, impls) == expected


@pytest.mark.parametrize("loop", ["scan", "per_step"])
def test_levels_reuse_one_compiled_train_loop(tmp_path, dataset, loop):
    ctx = context.dataclasses.replace(plain_context(dataset), scan=loop == "scan")
    lottery.run_chain(ctx, Layout(str(tmp_path)), {0: lottery.trial_init(ctx, 0)}, [0.3, 0.3])
    assert ctx.train_loop()._cache_size() == 1  # no recompilation after the first level
