"""config.parallel.trials_at_once: the trials of a level train together under vmap, and the run
writes exactly what a sequential run writes (records, masks, early stopping, checkpoints)."""

import jax
import numpy as np
import pytest

from sparse_robust import data
from sparse_robust.runs import context, pipeline, store
from sparse_robust.runs.layout import Layout
from test_lottery import tiny_config

NUM_TRIALS = 3
APPROX = ("clean_accuracy", "robust_accuracy", "early_stop_clean_accuracy",
          "early_stop_robust_accuracy")


@pytest.fixture(scope="module")
def dataset():
    return data.make_synthetic(0, num_train=240, num_val=60, num_test=60, image_shape=(8, 8, 1),
                               flatten=True)


def config(trials_at_once):
    return tiny_config(**{"num_trials": NUM_TRIALS, "parallel.trials_at_once": trials_at_once,
                          "train.num_steps": 30})


def comparable(records):
    return [{k: v for k, v in r.items() if k not in APPROX + ("train_seconds", "steps_per_second")}
            for r in records]


def assert_same_records(got, want):
    assert comparable(got) == comparable(want)
    for a, b in zip(got, want):  # vmapped sums may differ in the last bit of a float
        assert a["clean_accuracy"] == pytest.approx(b["clean_accuracy"], abs=1 / 60)
        for name, value in b["robust_accuracy"].items():
            assert a["robust_accuracy"][name] == pytest.approx(value, abs=1 / 60)


@pytest.fixture(scope="module")
def sequential(dataset, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sequential"))
    return path, pipeline.run(config(1), path, dataset=dataset)


def test_trials_at_once_write_what_sequential_trials_write(sequential, dataset, tmp_path):
    seq_path, seq_records = sequential
    path = str(tmp_path / "together")
    records = pipeline.run(config(NUM_TRIALS), path, dataset=dataset)
    assert [(r["trial"], r["level"]) for r in records] == \
        [(t, l) for t in range(NUM_TRIALS) for l in range(3)]
    assert_same_records(records, seq_records)
    for trial in range(NUM_TRIALS):
        for level in range(3):
            mine, theirs = Layout(path).unit(trial, level), Layout(seq_path).unit(trial, level)
            for name, alive in store.read_mask_arrays(theirs.mask).items():
                np.testing.assert_array_equal(store.read_mask_arrays(mine.mask)[name], alive)
            assert [m["step"] for m in store.read_jsonl(mine.metrics)] == [10, 20, 30]
            assert sorted(p.name for p in __import__("pathlib").Path(mine.progress).iterdir()) \
                == ["30"]


def test_an_interrupted_stacked_run_resumes_to_the_same_records(sequential, dataset, tmp_path,
                                                                interrupt_train_loop, monkeypatch):
    _, seq_records = sequential
    interrupt_train_loop(at=5)  # level 1, its second chunk (after the step-10 checkpoint)
    path = str(tmp_path / "together")
    with pytest.raises(interrupt_train_loop.error):
        pipeline.run(config(NUM_TRIALS), path, dataset=dataset)
    monkeypatch.undo()
    # Resume with the trials one by one: trials_at_once does not change results.
    assert_same_records(pipeline.run(config(1), path, dataset=dataset), seq_records)


def test_the_stacked_loop_is_one_program_for_every_level(dataset, tmp_path):
    ctx = context.from_config(config(NUM_TRIALS), dataset)
    layout = Layout(str(tmp_path))
    from sparse_robust.runs import lottery
    lottery.run_chain(ctx, layout, {t: lottery.trial_init(ctx, t) for t in range(NUM_TRIALS)},
                      [0.2, 0.2])
    assert ctx.train_loop(NUM_TRIALS)._cache_size() == 1
    # Each trial's checkpoint holds its own weights, not the stacked ones.
    saved = store.load_tree_raw(layout.unit(1, 2).final_variables)
    assert jax.tree_util.tree_map(np.shape, tuple(saved)) == \
        jax.tree_util.tree_map(np.shape, tuple(ctx.abstract_variables()))
