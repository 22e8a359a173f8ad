"""End to end: every adversarial pruning method of sparse_robust.methods on a tiny synthetic problem
(one run, module-scoped), then properties of what it wrote; plus config validation."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import report
from experiments.configs import wang_fashion_mnist
from sparse_robust import config as config_lib
from sparse_robust import data, level, methods, workdir

SPARSITY = 0.5
SPARSE_METHODS = ("lottery", "inherit", "reinit", "random", "hydra")


def tiny_config():
    """The real small config, shrunk: a 15-5 MLP, a few steps per phase, one sparsity."""
    cfg = wang_fashion_mnist.get_config()
    cfg.progress = False
    cfg.num_trials = 1
    cfg.model.width_multiplier = 0.05
    cfg.sparsities = str(SPARSITY)
    cfg.train.update(batch_size=16, num_steps=4)
    cfg.retrain.num_steps = cfg.hydra.num_steps = 2
    cfg.hydra.learning_rate = 0.05
    cfg.eval.update(every=2, num_examples=32, batch_size=32, attacks="fgsm,pgd")
    cfg.checkpoint_every = 2
    cfg.train.attack = cfg.eval.attack = "fgsm"  # compiles faster than PGD
    cfg.attacks.pgd.num_steps = 2
    cfg.inheritance.width_multiplier = 2.0
    cfg.diagnostics.update(num_examples=8, num_iters=3)
    return cfg


def tiny_dataset():
    return data.make_synthetic(0, num_train=96, num_val=32, num_test=40, image_shape=(6, 6, 1),
                               flatten=True)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("wang"))
    return path, methods.run(tiny_config(), path, dataset=tiny_dataset())


def unit_dir(path, method, level):
    return os.path.join(path, "trial_0", method, f"level_{level:02d}")


def load_mask(path, method, level):
    with np.load(os.path.join(unit_dir(path, method, level), "mask.npz")) as arrays:
        return dict(arrays)


def load_params(path, method, level):
    with ocp.StandardCheckpointer() as checkpointer:
        params, _ = checkpointer.restore(os.path.join(unit_dir(path, method, level),
                                                      "final_variables"))
    return {f"{layer}/{leaf}": np.asarray(value)
            for layer, leaves in params.items() for leaf, value in leaves.items()}


def test_every_method_writes_a_complete_record(finished_run):
    _, records = finished_run
    units = {(r["method"], r["level"]) for r in records}
    assert units == {("dense", 0), ("scratch_large", 0), ("inverse_inheritance", 1),
                     *((m, 1) for m in SPARSE_METHODS)}
    for r in records:
        assert r["trial"] == 0 and 0 <= r["clean_accuracy"] <= 1
        robust = r["robust_accuracy"]
        assert set(robust) == {"fgsm", "pgd", "worst_case"}
        assert robust["worst_case"] <= min(robust["fgsm"], robust["pgd"], r["clean_accuracy"])
        assert 0 < r["early_stop_step"] <= r["steps"]
        diag = r["diagnostics"]
        assert diag["lipschitz_upper_bound"] == pytest.approx(np.prod(list(
            diag["spectral_norms"].values())), rel=1e-5)
        assert diag["margin_adversarial_mean"] <= diag["margin_clean_mean"] + 1e-6
    steps = {r["method"]: r["steps"] for r in records}
    assert steps["dense"] == steps["lottery"] == steps["scratch_large"] == 4
    assert steps["inherit"] == steps["hydra"] == 2  # retrain schedule


def test_masks_match_their_method(finished_run):
    path, records = finished_run
    by_method = {r["method"]: r for r in records}
    dense = load_params(path, "dense", 0)
    inherit = load_mask(path, "inherit", 1)
    # One-shot global magnitude pruning of the dense trained network (numpy reference).
    names = sorted(inherit)
    magnitudes = np.concatenate([np.abs(dense[n]).ravel() for n in names])
    threshold = np.sort(magnitudes)[round(SPARSITY * magnitudes.size)]
    for n in names:
        np.testing.assert_array_equal(inherit[n], np.abs(dense[n]) >= threshold, err_msg=n)
    # reinit: the same mask; random: the same count per layer, elsewhere.
    for n, m in load_mask(path, "reinit", 1).items():
        np.testing.assert_array_equal(m, inherit[n])
    random = load_mask(path, "random", 1)
    assert all(random[n].sum() == inherit[n].sum() for n in names)
    assert any((random[n] != inherit[n]).any() for n in names)
    # HYDRA: the same fraction in every layer.
    for n, m in load_mask(path, "hydra", 1).items():
        assert m.sum() == m.size - round(SPARSITY * m.size), n
    # The lottery's global rounds land on the target (up to rounding, a weight per round).
    total = magnitudes.size
    assert abs(by_method["lottery"]["weights_remaining"] - (1 - SPARSITY)) <= 2 / total
    for method in SPARSE_METHODS:  # pruned weights are exactly zero after training
        mask, params = load_mask(path, method, 1), load_params(path, method, 1)
        assert all(not params[n][~mask[n]].any() for n in mask), method


def test_inverse_inheritance_trains_the_wider_network(finished_run):
    path, records = finished_run
    by_method = {r["method"]: r for r in records}
    record = by_method["inverse_inheritance"]
    assert record["source"] == "lottery" and record["width_multiplier"] == 2.0
    assert record["source_weights_remaining"] == by_method["lottery"]["weights_remaining"]
    small, large = load_params(path, "lottery", 1), load_params(path, "inverse_inheritance", 1)
    scratch = load_params(path, "scratch_large", 0)
    for name in small:
        assert large[name].shape == scratch[name].shape
    assert large["dense_0/kernel"].shape == (36, 2 * small["dense_0/kernel"].shape[1])
    ticket_alive = sum(m.sum() for m in load_mask(path, "lottery", 1).values())
    assert record["inherited_weights"] == pytest.approx(
        ticket_alive / sum(v.size for v in large.values()))
    assert record["weights_remaining"] == 1.0  # the large network trains dense


def test_rerun_resumes_without_training(finished_run, monkeypatch):
    path, records = finished_run

    def no_training(*args, **kwargs):
        raise AssertionError("a finished unit was trained again")

    monkeypatch.setattr(level, "train_level", no_training)
    assert methods.run(tiny_config(), path, dataset=tiny_dataset()) == records
    assert workdir.read_json(os.path.join(path, "summary.json")) == records

    changed = tiny_config()
    changed.inheritance.fill = "init"
    with pytest.raises(workdir.WorkdirError, match="inheritance.fill"):
        methods.run(changed, path, dataset=tiny_dataset())


@pytest.mark.parametrize("field, value, message", [
    ("methods", "lottery,prune_all", "config.methods"),
    ("methods", "inherit,inherit", "config.methods"),
    ("sparsities", "0.9,0.5", "config.sparsities"),
    ("sparsities", "0.9,x", "config.sparsities"),
    ("inheritance.fill", "ones", r"config.inheritance.fill = 'ones'.*\('zeros', 'init'\)"),
    ("inheritance.width_multiplier", 0.5, "config.inheritance.width_multiplier"),
    ("random_mask.start", "dense", "config.random_mask.start"),
    ("lottery.rounds", 0, "config.lottery.rounds"),
])
def test_bad_config_fails_before_any_work(tmp_path, field, value, message):
    cfg = tiny_config()
    *parents, leaf = field.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[leaf] = value
    with pytest.raises(config_lib.ConfigError, match=message):
        methods.run(cfg, str(tmp_path / "run"))  # no dataset: validation comes first
    assert not os.path.exists(tmp_path / "run")


def test_shuffled_mask_keeps_counts_per_leaf():
    mask = {"a": {"kernel": np.arange(20).reshape(4, 5) % 3 == 0},
            "b": {"kernel": np.eye(3, dtype=bool)}, "c": {"bias": None}}
    first = methods.shuffled_mask(jax.random.PRNGKey(0), mask)
    second = methods.shuffled_mask(jax.random.PRNGKey(1), mask)
    assert first["c"]["bias"] is None
    for layer in ("a", "b"):
        assert first[layer]["kernel"].shape == mask[layer]["kernel"].shape
        assert first[layer]["kernel"].sum() == mask[layer]["kernel"].sum()
    assert (np.asarray(first["a"]["kernel"]) != np.asarray(second["a"]["kernel"])).any()


def test_report_tables_show_every_method(finished_run):
    path, records = finished_run
    run = report.load_run(path)
    lines = report.methods_table(run).splitlines()
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header == ["Method", "dense", f"{100 * SPARSITY:g}% sparse"]
    rows = {cells[0]: cells[1:] for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in lines[4:])}
    assert list(rows) == ["dense", *SPARSE_METHODS, "inverse_inheritance", "scratch_large"]
    for r in records:  # each cell is "clean / worst case" of its record (one trial: no std)
        expected = (f"{100 * r['clean_accuracy']:.1f} / "
                    f"{100 * r['robust_accuracy']['worst_case']:.1f}")
        assert rows[r["method"]][r["level"]] == expected

    inverse = report.inverse_inheritance_table(run).splitlines()
    by_method = {r["method"]: r for r in records}
    gain = 100 * (by_method["inverse_inheritance"]["robust_accuracy"]["worst_case"]
                  - by_method["scratch_large"]["robust_accuracy"]["worst_case"])
    assert inverse[-1].startswith("| inherits lottery (50% sparse) |")
    assert inverse[-1].rstrip(" |").endswith(f"{gain:+.2f}")
    latex = report.methods_table(run, "latex")
    assert latex.count(r"\\") == 1 + len(rows)  # header + one line per method
