"""End to end: the pruning chain with every branch (the Wang et al. comparison) on a tiny synthetic
problem (one run, module-scoped), then properties of what it wrote."""

import jax
import numpy as np
import pytest

from experiments import report
from experiments.configs import wang_fashion_mnist
from sparse_robust import data
from sparse_robust.runs import branches, fit, pipeline, store
from sparse_robust.runs.branches.random import shuffled_mask
from sparse_robust.runs.errors import WorkdirError
from sparse_robust.runs.layout import Layout

SPARSITY = 0.5
SPARSE_METHODS = ("lottery", "inherit", "reinit", "random", "hydra")


def tiny_config():
    """The real small config, shrunk: a 15-5 MLP, a few steps per phase, one target sparsity
    reached in 2 rounds (so the branches start from chain level 2)."""
    cfg = wang_fashion_mnist.get_config()
    cfg.progress = False
    cfg.num_trials = 1
    cfg.model.width_multiplier = 0.05
    cfg.prune.update(targets=str(SPARSITY), rounds_per_target=2)
    cfg.train.update(batch_size=16, num_steps=4)
    cfg.retrain.num_steps = cfg.branches.hydra.num_steps = 2
    cfg.branches.hydra.learning_rate = 0.05
    cfg.eval.update(every=2, num_examples=32, batch_size=32, attacks="fgsm,pgd", sanity_examples=0,
                    final_examples=0)
    cfg.checkpoint_every = 2
    cfg.train.attack = cfg.eval.attack = "fgsm"  # compiles faster than PGD
    cfg.attacks.pgd.num_steps = 2
    cfg.branches.inverse_inheritance.width_multiplier = 2.0
    cfg.diagnostics.update(num_examples=8, num_iters=3)
    return cfg


def tiny_dataset():
    return data.make_synthetic(0, num_train=96, num_val=32, num_test=40, image_shape=(6, 6, 1),
                               flatten=True)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("wang"))
    return path, pipeline.run(tiny_config(), path, dataset=tiny_dataset())


def method(record):
    return record.get("branch") or ("dense" if record["level"] == 0 else "lottery")


def at_target(records):
    """{method: record} of the dense level, the target level and the branches."""
    return {method(r): r for r in records if r["level"] in (0, 2)}


def unit(path, name, level=2):
    branch = None if name in ("dense", "lottery") else name
    return Layout(path).unit(0, 0 if name in ("dense", "scratch_large") else level, branch)


def load_mask(path, name, level=2):
    return store.read_mask_arrays(unit(path, name, level).mask)


def load_params(path, name, level=2):
    params, _ = store.load_tree_raw(unit(path, name, level).final_variables)
    return {f"{layer}/{leaf}": np.asarray(value)
            for layer, leaves in params.items() for leaf, value in leaves.items()}


def test_every_branch_writes_a_complete_record(finished_run):
    _, records = finished_run
    units = {(method(r), r["level"]) for r in records}
    assert units == {("dense", 0), ("lottery", 1), ("lottery", 2), ("scratch_large", 0),
                     ("inverse_inheritance", 2), *((m, 2) for m in SPARSE_METHODS)}
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
    steps = {method(r): r["steps"] for r in records}
    assert steps["dense"] == steps["lottery"] == steps["scratch_large"] == 4
    assert steps["inherit"] == steps["hydra"] == 2  # retrain schedule
    assert at_target(records)["hydra"]["score_phase"]["steps"] == 2


def test_masks_match_their_branch(finished_run):
    path, records = finished_run
    by_method = at_target(records)
    dense = load_params(path, "dense")
    inherit = load_mask(path, "inherit")
    # One-shot global magnitude pruning of the dense trained network to the ticket's count.
    names = sorted(inherit)
    magnitudes = np.concatenate([np.abs(dense[n]).ravel() for n in names])
    ticket = load_mask(path, "lottery")
    alive = sum(m.sum() for m in ticket.values())
    threshold = np.sort(magnitudes)[magnitudes.size - alive]
    for n in names:
        np.testing.assert_array_equal(inherit[n], np.abs(dense[n]) >= threshold, err_msg=n)
    # reinit: the same mask; random: the same count per layer, elsewhere.
    for n, m in load_mask(path, "reinit").items():
        np.testing.assert_array_equal(m, inherit[n])
    random = load_mask(path, "random")
    assert all(random[n].sum() == inherit[n].sum() for n in names)
    assert any((random[n] != inherit[n]).any() for n in names)
    # HYDRA (allocation "level"): the one-shot mask's count in every layer, as random's.
    for n, m in load_mask(path, "hydra").items():
        assert m.sum() == inherit[n].sum(), n
    # The chain's global rounds land on the target (up to rounding, a weight per round).
    assert abs(by_method["lottery"]["weights_remaining"] - (1 - SPARSITY)) <= 2 / magnitudes.size
    for name in SPARSE_METHODS:  # pruned weights are exactly zero after training
        mask, params = load_mask(path, name), load_params(path, name)
        assert all(not params[n][~mask[n]].any() for n in mask), name


def test_inverse_inheritance_trains_the_wider_network(finished_run):
    path, records = finished_run
    by_method = at_target(records)
    record = by_method["inverse_inheritance"]
    assert record["source"] == "lottery" and record["width_multiplier"] == 2.0
    assert record["source_weights_remaining"] == by_method["lottery"]["weights_remaining"]
    small, large = load_params(path, "lottery"), load_params(path, "inverse_inheritance")
    scratch = load_params(path, "scratch_large")
    for name in small:
        assert large[name].shape == scratch[name].shape
    assert large["dense_0/kernel"].shape == (36, 2 * small["dense_0/kernel"].shape[1])
    ticket_alive = sum(m.sum() for m in load_mask(path, "lottery").values())
    assert record["inherited_weights"] == pytest.approx(
        ticket_alive / sum(v.size for v in large.values()))
    assert record["weights_remaining"] == 1.0  # the large network trains dense


def test_rerun_resumes_without_training(finished_run, monkeypatch):
    path, records = finished_run

    def no_training(*args, **kwargs):
        raise AssertionError("a finished unit was trained again")

    monkeypatch.setattr(fit, "fit", no_training)
    assert pipeline.run(tiny_config(), path, dataset=tiny_dataset()) == records
    assert store.read_json(Layout(path).summary) == records

    changed = tiny_config()
    changed.branches.inverse_inheritance.fill = "init"
    with pytest.raises(WorkdirError, match="branches.inverse_inheritance.fill"):
        pipeline.run(changed, path, dataset=tiny_dataset())


def test_requirements_run_first():
    settings = {"inverse_inheritance": {"source": "hydra"}}
    assert branches.with_requirements(["inverse_inheritance", "inherit"], settings) == \
        ["hydra", "inverse_inheritance", "inherit"]
    assert branches.with_requirements(["inverse_inheritance"],
                                      {"inverse_inheritance": {"source": "lottery"}}) == \
        ["inverse_inheritance"]


def test_shuffled_mask_keeps_counts_per_leaf():
    mask = {"a": {"kernel": np.arange(20).reshape(4, 5) % 3 == 0},
            "b": {"kernel": np.eye(3, dtype=bool)}, "c": {"bias": None}}
    first = shuffled_mask(jax.random.PRNGKey(0), mask)
    second = shuffled_mask(jax.random.PRNGKey(1), mask)
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
    sparsity = 100 - 100 * at_target(records)["lottery"]["weights_remaining"]
    assert header == ["Method", "dense", f"{sparsity:.1f}% sparse"]
    rows = {cells[0]: cells[1:] for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in lines[4:]
             if line.startswith("|"))}
    assert list(rows) == ["dense", *SPARSE_METHODS, "inverse_inheritance", "scratch_large"]
    for r in at_target(records).values():  # "clean / worst case" of its record (one trial)
        expected = (f"{100 * r['clean_accuracy']:.1f} / "
                    f"{100 * r['robust_accuracy']['worst_case']:.1f}")
        assert rows[method(r)][0 if r["level"] == 0 else 1] == expected

    inverse = [line for line in report.inverse_inheritance_table(run).splitlines()
               if line.startswith("|")]
    by_method = at_target(records)
    gain = 100 * (by_method["inverse_inheritance"]["robust_accuracy"]["worst_case"]
                  - by_method["scratch_large"]["robust_accuracy"]["worst_case"])
    assert inverse[-1].startswith(f"| inherits lottery ({sparsity:.1f}% sparse) |")
    assert inverse[-1].rstrip(" |").endswith(f"{gain:+.2f}")
    assert any(line.startswith("- inverse_inheritance: the dense large network") for line in lines)
    latex = report.methods_table(run, "latex")
    assert latex.count(r"\\") == 1 + len(rows)  # header + one line per method
