"""The lottery-ticket pipeline: schedules, reset strategies, resume, workdir safety, compiles."""

import hashlib
import json
import os

import jax
import numpy as np
import pytest

from experiments.configs import quickstart
from sparse_robust import checkpoint as checkpoint_lib
from sparse_robust import config as config_lib
from sparse_robust import data
from sparse_robust import experiment as experiment_lib
from sparse_robust import lottery
from sparse_robust import masks
from sparse_robust import models
from sparse_robust import workdir as workdir_lib

TIMING_FIELDS = ("train_seconds", "steps_per_second")


@pytest.fixture(scope="module")
def dataset():
    return data.make_synthetic(0, num_train=240, num_val=60, num_test=60, image_shape=(8, 8, 1),
                               flatten=True)


def tiny_config(**overrides):
    config = quickstart.get_config()
    config.progress = False
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
        node = config
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


def strip_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def load(path, like):
    return checkpoint_lib.load_pytree(path, like)


def test_dense_300_100_schedule_follows_closed_form():
    model = models.get_model("dense-300-100")
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, 784)))["params"])
    params = jax.tree_util.tree_map(lambda s: np.random.default_rng(0).normal(size=s.shape), params)
    mask = masks.create_mask(params)
    rates = {"*": 0.2, "output": 0.1}
    remaining = [1.0]
    for _ in range(18):
        mask = lottery.next_mask(params, mask, rates)
        remaining.append(masks.weights_remaining(mask))
    sizes = {"hidden": 784 * 300 + 300 * 100, "output": 100 * 10}
    closed = [(sizes["hidden"] * 0.8 ** k + sizes["output"] * 0.9 ** k) / sum(sizes.values())
              for k in range(19)]
    np.testing.assert_allclose(remaining, closed, atol=2e-5)  # integer rounding only
    # the numbers of Cosentino et al.: 51.3%, 16.9%, 8.7%, 3.6%, 1.8% after 3, 8, 11, 15, 18 levels
    for level, paper in ((3, 51.3), (8, 16.9), (11, 8.7), (15, 3.6), (18, 1.8)):
        assert 100 * remaining[level] == pytest.approx(paper, abs=0.06)  # 1.85% is "1.8%" there


def test_reset_rejects_unknown_strategy_and_missing_source():
    mask = {"w": np.ones((2, 2), bool)}
    with pytest.raises(ValueError, match="Unknown reset strategy"):
        lottery.reset("rewind", mask, {"init": {"w": np.ones((2, 2))}})
    with pytest.raises(ValueError, match="needs the 'rewind' params"):
        lottery.reset("rewind_step", mask, {"init": {"w": np.ones((2, 2))}})


@pytest.mark.parametrize("strategy", ["rewind_init", "rewind_step", "random_reinit", "continue",
                                      "dense_trained"])
def test_each_strategy_starts_where_it_promises(tmp_path, dataset, strategy):
    config = tiny_config(**{"prune.strategy": strategy, "prune.rewind_step": 10,
                            "train.objective": "natural"})
    lottery.run(config, str(tmp_path), dataset=dataset)
    trial = tmp_path / "trial_0"
    exp = experiment_lib.Experiment.build(config, dataset)
    init_params, init_state = exp.init(experiment_lib.trial_keys(config.seed, 0)["init"])
    like = (init_params, init_state)
    theta0 = load(str(trial / "init_params"), init_params)
    final = [load(str(trial / f"level_{l:02d}" / "final_variables"), like)[0] for l in range(3)]
    for level in (1, 2):
        level_dir = trial / f"level_{level:02d}"
        mask = masks.mask_from_numpy(dict(np.load(level_dir / "mask.npz")), init_params)
        start = load(str(level_dir / "start_params"), init_params)
        source = {"rewind_init": lambda: theta0,
                  "rewind_step": lambda: load(str(trial / "rewind_params"), init_params),
                  "continue": lambda: final[level - 1],
                  "dense_trained": lambda: final[0]}.get(strategy, lambda: None)()
        for name, alive in masks.mask_leaves(mask).items():
            got = np.asarray(masks.mask_leaves(start)[name])
            assert np.all(got[~np.asarray(alive)] == 0)
            if source is not None:
                np.testing.assert_array_equal(got[alive], np.asarray(masks.mask_leaves(source)[name])[alive])
            else:  # a new draw: not θ0, not trained, but initializer-like
                assert not np.allclose(got[alive], np.asarray(masks.mask_leaves(theta0)[name])[alive])
                assert np.std(got[alive]) == pytest.approx(float(np.std(masks.mask_leaves(theta0)[name])),
                                                           rel=0.2)
        if strategy == "rewind_step":  # θk differs from θ0 and from the trained weights
            rewind = load(str(trial / "rewind_params"), init_params)
            assert not np.allclose(rewind["output"]["kernel"], theta0["output"]["kernel"])
            assert not np.allclose(rewind["output"]["kernel"], final[0]["output"]["kernel"])


def test_masks_shrink_and_summary_has_design_fields(tmp_path, dataset):
    records = lottery.run(tiny_config(**{"eval.sanity_examples": 60}), str(tmp_path),
                          dataset=dataset)
    assert [r["level"] for r in records] == [0, 1, 2]
    remaining = [r["weights_remaining"] for r in records]
    assert remaining[0] == 1.0 and remaining[0] > remaining[1] > remaining[2]
    for record in records:
        assert 0 <= record["clean_accuracy"] <= 1
        assert set(record["robust_accuracy"]) == {"fgsm", "worst_case"}
        assert record["early_stop_step"] in (10, 20)
        assert set(record["sanity_checks"]) == {
            "monotone_in_eps", "eps0_equals_clean", "pgd_not_weaker_than_fgsm",
            "apgd_not_weaker_than_pgd", "large_eps_reaches_chance", "ce_and_dlr_agree"}
        assert record["sanity_checks"]["eps0_equals_clean"]["passed"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert strip_timing(summary) == strip_timing(records)
    loaded = [dict(np.load(tmp_path / "trial_0" / f"level_{l:02d}" / "mask.npz")) for l in range(3)]
    for older, newer in zip(loaded, loaded[1:]):
        for name in older:
            assert np.all(~newer[name] | older[name])


class Interrupt(Exception):
    pass


def test_resume_after_interruption_gives_the_same_summary(tmp_path, dataset, monkeypatch):
    config = tiny_config(**{"train.num_steps": 30})
    reference = lottery.run(config, str(tmp_path / "reference"), dataset=dataset)

    # Interrupt the second level after its second chunk (step 20; last checkpoint at step 20).
    real_build = experiment_lib.Experiment.build
    calls = {"n": 0}

    def build_with_interrupting_loop(*args, **kwargs):
        exp = real_build(*args, **kwargs)
        loop = exp.train_loop

        def interrupting(*a):
            calls["n"] += 1
            if calls["n"] == 6:  # 3 chunks at level 0, then the 3rd chunk of level 1
                raise Interrupt
            return loop(*a)

        exp.train_loop = interrupting
        return exp

    monkeypatch.setattr(experiment_lib.Experiment, "build", build_with_interrupting_loop)
    with pytest.raises(Interrupt):
        lottery.run(config, str(tmp_path / "resumed"), dataset=dataset)
    partial = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert [r["level"] for r in partial] == [0]
    resumed = lottery.run(config, str(tmp_path / "resumed"), dataset=dataset)
    # 1 call re-runs level 1's last chunk from the step-20 checkpoint, then level 2's 3 chunks
    assert calls["n"] == 6 + 1 + 3
    assert strip_timing(resumed) == strip_timing(reference)


def tree_digest(path):
    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            full = os.path.join(root, name)
            digest.update(full.encode())
            digest.update(open(full, "rb").read())
    return digest.hexdigest()


def test_different_config_in_workdir_is_refused_and_nothing_changes(tmp_path, dataset):
    lottery.run(tiny_config(**{"prune.levels": 1}), str(tmp_path), dataset=dataset)
    before = tree_digest(tmp_path)
    with pytest.raises(workdir_lib.WorkdirError, match="prune.levels: 1 -> 2"):
        lottery.run(tiny_config(), str(tmp_path), dataset=dataset)
    assert tree_digest(tmp_path) == before
    # the same config resumes (nothing to do), --overwrite starts afresh
    assert len(lottery.run(tiny_config(**{"prune.levels": 1}), str(tmp_path), dataset=dataset)) == 2
    assert len(lottery.run(tiny_config(), str(tmp_path), overwrite=True, dataset=dataset)) == 3


@pytest.mark.parametrize("field,value", [("prune.strategy", "rewind"), ("train.loop", "python")])
def test_bad_config_fails_before_the_workdir_is_touched(tmp_path, dataset, field, value):
    with pytest.raises(config_lib.ConfigError, match=field):
        lottery.run(tiny_config(**{field: value}), str(tmp_path / "w"), dataset=dataset)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("loop,model,expected", [
    ("auto", "lenet-300-100", True), ("auto", "conv-2", False),  # JAX runs on the CPU in tests
    ("scan", "conv-2", True), ("per_step", "lenet-300-100", False)])
def test_train_loop_choice(loop, model, expected):
    from sparse_robust import models
    config = tiny_config(**{"train.loop": loop})
    sample = np.zeros((1, 8, 8, 1) if model == "conv-2" else (1, 64), np.float32)
    assert experiment_lib.uses_scan(config, models.get_model(model), sample) == expected


@pytest.mark.parametrize("loop", ["scan", "per_step"])
def test_levels_reuse_one_compiled_train_loop(tmp_path, dataset, loop):
    config = tiny_config(**{"train.loop": loop})
    exp = experiment_lib.Experiment.build(config, dataset)
    work = workdir_lib.Workdir(str(tmp_path))
    work.claim(config_lib.result_fields(config))
    lottery.run_trial(exp, work, 0)
    assert len(work.records()) == 3
    assert exp.train_loop._cache_size() == 1  # no recompilation after the first level
