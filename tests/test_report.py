"""Tests for experiments.report on fake workdirs with known numbers (2 trials × 3 levels)."""

import os
import re

import numpy as np
import pytest

from experiments import report
from sparse_robust.runs import store
from sparse_robust.runs.layout import Layout

ATTACKS = ("fgsm", "pgd", "worst_case")
NUM_TRIALS, NUM_LEVELS = 2, 3
STEPS = (10, 20, 30)
LAYER_SHAPES = {"dense_0/kernel": (5, 4), "output/kernel": (4, 3)}


def known_numbers(seed: int) -> dict:
    """Accuracies, early-stop steps and test adv accuracies indexed [trial, level(, step)]."""
    rng = np.random.default_rng(seed)
    return {
        "clean": rng.uniform(0.8, 0.99, (NUM_TRIALS, NUM_LEVELS)),
        **{a: rng.uniform(0.1, 0.7, (NUM_TRIALS, NUM_LEVELS)) for a in ATTACKS},
        "early_stop_step": rng.integers(1, 50, (NUM_TRIALS, NUM_LEVELS)) * 100,
        "curve": rng.uniform(0.0, 1.0, (NUM_TRIALS, NUM_LEVELS, len(STEPS))),
    }


SETTINGS = {"fgsm": {"name": "fgsm", "eps": 0.3, "label_source": "predicted"},
            "pgd": {"name": "pgd", "eps": 0.3, "step_size": 0.05, "num_steps": 10,
                    "label_source": "predicted"}}
TITLES = ["FGSM ε=0.3 (pred. labels)", "PGD-10 ε=0.3 (pred. labels)", "worst case"]


def record(numbers, trial, level, **extra) -> dict:
    robust = {a: float(numbers[a][trial, level]) for a in ATTACKS}
    return {
        "trial": trial, "level": level, "weights_remaining": 0.8 ** level,
        "clean_accuracy": float(numbers["clean"][trial, level]), "robust_accuracy": robust,
        "early_stop_step": int(numbers["early_stop_step"][trial, level]),
        "early_stop_clean_accuracy": 0.5, "early_stop_robust_accuracy": dict(robust),
        "layer_weights_remaining": {"dense_0": 0.8 ** level, "output": 0.9 ** level},
        "steps": STEPS[-1], "train_seconds": 1.0, "steps_per_second": 30.0,
        "strategy": "rewind_init", "attacks": SETTINGS, "test_examples": 1000, **extra,
    }


def write_workdir(path, numbers, strategy="rewind_init", checkpoints=True, seed=0, records=None):
    """A workdir as the pipeline leaves it (written through its layout); records in reverse
    level order."""
    layout = Layout(str(path))
    store.write_json(layout.config, {"prune": {"strategy": strategy},
                                     "train": {"objective": "mixed"},
                                     "eval": {"attacks": "fgsm,pgd", "attack": "pgd", "every": 10},
                                     "attacks": SETTINGS, "data": {"name": "fashion_mnist"}})
    rng = np.random.default_rng(seed)
    if records is None:
        records = [record(numbers, t, lvl) for t in range(NUM_TRIALS)
                   for lvl in reversed(range(NUM_LEVELS))]
    store.write_json(layout.summary, records)
    for r in sorted(records, key=lambda r: (r["trial"], r["level"], r.get("branch") or "")):
        t, lvl = r["trial"], r["level"]
        files = layout.unit(t, lvl, r.get("branch"))
        history = []
        for i, step in enumerate(STEPS):
            metrics = {"loss": 1.0, "accuracy": 0.9, "adv_loss": 2.0,
                       "adv_accuracy": float(numbers["curve"][t, lvl, i])}
            history.append({"step": step, "train": {"loss": 1.0, "accuracy": 0.9},
                            "train_seconds": 0.1 * step, "val": metrics, "test": metrics})
        store.write_jsonl(files.metrics, history)
        if checkpoints:
            mask = {n: rng.random(s) < 0.8 ** lvl for n, s in LAYER_SHAPES.items()}
            np.savez(files.mask, **mask)
            params = {"dense_0": {"kernel": rng.normal(size=LAYER_SHAPES["dense_0/kernel"])},
                      "output": {"kernel": rng.normal(size=LAYER_SHAPES["output/kernel"]),
                                 "bias": np.zeros(3)}}
            params = {k: {n: v.astype(np.float32) for n, v in d.items()}
                      for k, d in params.items()}
            store.save_tree(files.final_variables,
                            (params, {"batch_stats": {"mean": np.zeros(2, np.float32)}}))
    return str(path)


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    """Two runs (rewind_init with checkpoints, random_reinit without) and their numbers."""
    root = tmp_path_factory.mktemp("runs")
    numbers = [known_numbers(1), known_numbers(2)]
    dirs = [write_workdir(root / "a", numbers[0]),
            write_workdir(root / "b", numbers[1], strategy="random_reinit", checkpoints=False)]
    return dirs, numbers


def table_rows(markdown: str) -> tuple[list, list]:
    """(header, rows) of a markdown table, cells stripped."""
    lines = [ln for ln in markdown.splitlines() if ln.startswith("|")]
    split = lambda ln: [c.strip() for c in ln.strip("|").split("|")]
    return split(lines[0]), [split(ln) for ln in lines[2:]]


def parse_cell(cell: str) -> tuple[float, float]:
    mean, std = cell.split("±")
    return float(mean), float(std)


def test_table_mean_std_matches_numpy(workdirs):
    (path, _), (numbers, _) = workdirs
    header, rows = table_rows(report.paper_table(report.load_run(path)))
    assert header == ["Level", "Weights remaining (%)", "Clean", *TITLES, "Early stop (step)"]
    for level, row in enumerate(rows):
        for column, key in zip(row[2:6], ("clean",) + ATTACKS):
            mean, std = parse_cell(column)
            values = 100 * numbers[key][:, level]
            assert mean == pytest.approx(np.mean(values), abs=0.006)
            assert std == pytest.approx(np.std(values, ddof=1), abs=0.006)
        mean, std = parse_cell(row[6])
        steps = numbers["early_stop_step"][:, level]
        assert mean == pytest.approx(np.mean(steps), abs=0.6)
        assert std == pytest.approx(np.std(steps, ddof=1), abs=0.6)


def test_rows_ordered_by_level_with_weights_remaining(workdirs):
    (path, _), _ = workdirs
    _, rows = table_rows(report.paper_table(report.load_run(path)))
    assert [row[0] for row in rows] == [str(lvl) for lvl in range(NUM_LEVELS)]
    assert [row[1] for row in rows] == [f"{100 * 0.8 ** lvl:.1f}" for lvl in range(NUM_LEVELS)]


def test_early_stop_accuracy_and_chosen_attacks(workdirs):
    (path, _), _ = workdirs
    run = report.load_run(path)
    header, rows = table_rows(report.paper_table(run, attacks=["pgd"], accuracy="early_stop"))
    assert header[2:] == ["Clean", TITLES[1], "Early stop (step)"]
    assert all(row[2] == "50.00 ± 0.00" for row in rows)  # early_stop_clean_accuracy is 0.5


def test_single_trial_has_no_std(tmp_path):
    numbers = known_numbers(3)
    records = [record(numbers, 0, lvl) for lvl in range(NUM_LEVELS)]
    path = write_workdir(tmp_path / "one", numbers, checkpoints=False, records=records)
    _, rows = table_rows(report.paper_table(report.load_run(path)))
    assert len(rows) == NUM_LEVELS and not any("±" in cell for row in rows for cell in row)
    assert float(rows[1][2]) == pytest.approx(100 * numbers["clean"][0, 1], abs=0.006)


def test_latex_is_a_valid_tabular(workdirs):
    (a, b), _ = workdirs
    latex = report.paper_table(report.load_runs([a, b]), fmt="latex")
    lines = latex.strip().splitlines()
    begin = [ln for ln in lines if ln.startswith(r"\begin{tabular}")]
    assert len(begin) == 1 and lines[-1] == r"\end{tabular}"
    num_columns = len(re.match(r"\\begin\{tabular\}\{([lrc]+)\}", begin[0]).group(1))
    rows = [ln for ln in lines if ln.endswith(r"\\")]
    assert len(rows) == 1 + 2 * NUM_LEVELS  # header + rows of both runs
    for row in rows:
        assert len(re.findall(r"(?<!\\)&", row)) == num_columns - 1
    assert r"rewind\_init" in latex and r"\pm" in latex and r"Weights remaining (\%)" in latex
    assert "% Worst case: an image counts as robust only if" in latex  # the legend, as comments


def test_compare_two_workdirs(workdirs):
    (a, b), (numbers_a, numbers_b) = workdirs
    runs = report.load_runs([a, b])
    header, rows = table_rows(report.paper_table(runs))
    assert header[0] == "Run"
    assert [row[0] for row in rows] == ["rewind_init"] * NUM_LEVELS + ["random_reinit"] * NUM_LEVELS
    clean_b = parse_cell(rows[NUM_LEVELS + 2][3])[0]
    assert clean_b == pytest.approx(100 * np.mean(numbers_b["clean"][:, 2]), abs=0.006)


def test_same_strategy_runs_get_distinct_labels(tmp_path):
    numbers = known_numbers(4)
    dirs = [write_workdir(tmp_path / name, numbers, checkpoints=False) for name in ("fgsm", "pgd")]
    labels = [run.label for run in report.load_runs(dirs)]
    assert labels == ["rewind_init (fgsm)", "rewind_init (pgd)"]


def test_attack_missing_from_a_run_is_a_dash(tmp_path):
    numbers = known_numbers(9)
    records = [record(numbers, t, lvl) for t in range(NUM_TRIALS) for lvl in range(NUM_LEVELS)]
    for r in records:
        r["robust_accuracy"] = {"apgd_ce": 0.25}
    dirs = [write_workdir(tmp_path / "a", numbers, checkpoints=False),
            write_workdir(tmp_path / "b", numbers, checkpoints=False, records=records)]
    header, rows = table_rows(report.paper_table(report.load_runs(dirs)))
    assert header[4:8] == [*TITLES[:2], "apgd_ce", "worst case"]
    assert all(row[6] == "—" for row in rows[:NUM_LEVELS])
    assert all(row[4:6] == ["—", "—"] and row[6] == "25.00 ± 0.00" for row in rows[NUM_LEVELS:])


def test_method_rows(tmp_path):
    numbers = known_numbers(5)
    records = [record(numbers, t, lvl, branch=m) for m in ("inverse_inheritance", "hydra")
               for t in range(NUM_TRIALS) for lvl in range(NUM_LEVELS)]
    path = write_workdir(tmp_path / "methods", numbers, checkpoints=False, records=records)
    run = report.load_run(path)
    header, rows = table_rows(report.paper_table(run))
    assert header[:2] == ["Method", "Level"]
    assert [(row[0], row[1]) for row in rows] == [
        (m, str(lvl)) for m in ("hydra", "inverse_inheritance") for lvl in range(NUM_LEVELS)]
    assert len(report.plot_weight_distributions(run, str(tmp_path / "out"))) == 0
    assert set(report.learning_curves(run)) == {
        (m, lvl) for m in ("hydra", "inverse_inheritance") for lvl in range(NUM_LEVELS)}


def test_learning_curves_average_trials(workdirs):
    (path, _), (numbers, _) = workdirs
    curves = report.learning_curves(report.load_run(path))
    assert sorted(curves) == [("", lvl) for lvl in range(NUM_LEVELS)]
    for lvl in range(NUM_LEVELS):
        steps, values = curves[("", lvl)]
        np.testing.assert_array_equal(steps, STEPS)
        np.testing.assert_allclose(values, numbers["curve"][:, lvl].mean(axis=0), rtol=1e-12)


def test_surviving_weights_are_the_masked_params(tmp_path):
    numbers = known_numbers(6)
    path = write_workdir(tmp_path / "w", numbers, seed=7)
    files = Layout(path).unit(1, 2)
    weights = report.surviving_weights(files)
    params = store.load_tree_raw(files.final_variables)[0]
    mask = np.load(files.mask)
    assert set(weights) == set(LAYER_SHAPES)
    for name in LAYER_SHAPES:
        layer, leaf = name.split("/")
        expected = np.asarray(params[layer][leaf])[mask[name]]
        np.testing.assert_array_equal(weights[name], expected)
        assert weights[name].size == mask[name].sum()


def is_png(path) -> bool:
    with open(path, "rb") as f:
        return os.path.getsize(path) > 1000 and f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_writes_tables_and_plots_into_first_workdir(workdirs, capsys):
    (a, b), _ = workdirs
    assert report.main([a, b]) == 0
    printed = capsys.readouterr().out
    out = os.path.join(a, "report")
    with open(os.path.join(out, "table.md")) as f:
        assert f.read() + "\n" == printed
    assert "random_reinit" in printed and "| Run |" in printed
    assert os.path.getsize(os.path.join(out, "table.tex")) > 0
    pngs = sorted(n for n in os.listdir(out) if n.endswith(".png"))
    # Only run a has checkpoints; no record has diagnostics.
    assert pngs == ["accuracy_vs_weights.png", "early_stopping.png", "learning_curves.png",
                    "weights_rewind_init_trial0.png"]
    assert all(is_png(os.path.join(out, n)) for n in pngs)


def test_failed_sanity_checks_are_listed_and_passed_ones_are_not(tmp_path, capsys):
    numbers = known_numbers(0)
    checks = lambda passed: {"eps0_equals_clean": {"passed": True, "detail": "ok"},
                             "ce_and_dlr_agree": {"passed": passed, "detail": f"gap {passed}"}}
    records = [record(numbers, t, lvl, sanity_checks=checks(passed=(t, lvl) != (1, 2)))
               for t in range(NUM_TRIALS) for lvl in range(NUM_LEVELS)]
    clean = str(tmp_path / "clean")
    write_workdir(clean, numbers, checkpoints=False,
                  records=[record(numbers, 0, lvl, sanity_checks=checks(True)) for lvl in range(3)])
    assert report.failed_sanity_checks(report.load_run(clean)) == ""
    flagged = str(tmp_path / "flagged")
    write_workdir(flagged, numbers, checkpoints=False, records=records)
    assert report.main([flagged]) == 0
    printed = capsys.readouterr().out
    listed = [line for line in printed.splitlines() if line.startswith("- rewind_init")]
    assert listed == ["- rewind_init, level 2, trial 1: **ce_and_dlr_agree**: gap False"]
    assert "Sanity checks FAILED" in printed


def test_plot_functions_return_written_pngs(workdirs, tmp_path):
    (a, b), _ = workdirs
    runs = report.load_runs([a, b])
    out = str(tmp_path)
    paths = [report.plot_early_stopping(runs, out),
             report.plot_accuracy_vs_weights(runs, out, attacks=["fgsm"]),
             *report.plot_weight_distributions(runs[0], out, trial=1)]
    assert [os.path.basename(p) for p in paths] == [
        "early_stopping.png", "accuracy_vs_weights.png", "weights_rewind_init_trial1.png"]
    assert all(is_png(p) for p in paths)
    assert report.plot_diagnostics(runs, out) is None


def test_diagnostics_plot(tmp_path):
    numbers = known_numbers(8)
    records = [record(numbers, t, lvl, diagnostics={
        "lipschitz_upper_bound": 10.0 ** (lvl + 1), "margin_clean_mean": 1.0 + lvl,
        "margin_adversarial_mean": None, "weight_histograms": {"dense_0": {"counts": [1],
                                                                           "edges": [0, 1]}}})
               for t in range(NUM_TRIALS) for lvl in range(NUM_LEVELS)]
    path = write_workdir(tmp_path / "d", numbers, checkpoints=False, records=records)
    run = report.load_run(path)
    assert report.diagnostic_names(run) == ["lipschitz_upper_bound", "margin_clean_mean"]
    assert is_png(report.plot_diagnostics(run, str(tmp_path), attack="pgd"))
    with pytest.raises(ValueError, match="attack='cw'"):
        report.plot_diagnostics(run, str(tmp_path), attack="cw")


def test_missing_summary_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no finished level yet in .*empty"):
        report.load_run(str(empty))
    assert report.main([str(empty)]) == 2
    assert "no finished level yet" in capsys.readouterr().err


def test_bad_arguments_name_the_allowed_values(workdirs):
    (a, _), _ = workdirs
    run = report.load_run(a)
    with pytest.raises(ValueError, match=r"fmt='html'.*markdown"):
        report.paper_table(run, fmt="html")
    with pytest.raises(ValueError, match=r"accuracy='best'"):
        report.paper_table(run, accuracy="best")
    with pytest.raises(ValueError, match=r"\['cw'\].*fgsm"):
        report.paper_table(run, attacks=["cw"])
    with pytest.raises(ValueError, match=r"trial=5.*\(0, 1\)"):
        report.plot_weight_distributions(run, a, trial=5)
    with pytest.raises(ValueError, match="workdirs"):
        report.load_runs([])


# ----------------------------------------------------------------------------- the figures

def test_accuracy_figure_compares_clean_and_robust_on_one_scale(workdirs):
    (a, b), _ = workdirs
    fig = report.accuracy_figure(report.load_runs([a, b]))
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["clean", *TITLES]
    assert len({ax.get_ylim() for ax in axes}) == 1  # one y range for every panel
    low, high = axes[0].get_ylim()
    assert 0 <= low < high <= 100
    assert axes[0].get_ylabel() == "test accuracy (%)"
    levels = sorted(100 * 0.8 ** lvl for lvl in range(NUM_LEVELS))
    for ax in axes:
        assert ax.get_xscale() == "log"
        assert ax.get_xlim()[0] > ax.get_xlim()[1]  # sparser to the right
        np.testing.assert_allclose(sorted(ax.get_xticks()), levels, rtol=1e-3)
        assert [t.get_text() for t in ax.get_xticklabels()] == ["100.0", "80.0", "64.0"]
        assert ax.get_xlabel() == "weights remaining (%), sparser →"
    legend = axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["rewind_init", "random_reinit"]
    assert legend.get_title().get_text() == "mean ± std over 2 trials"
    assert "worst case: an image counts only if correct" in fig.get_supxlabel()


def test_accuracy_figure_plots_the_mean_and_the_spread(workdirs):
    (a, _), (numbers, _) = workdirs
    fig = report.accuracy_figure(report.load_run(a), attacks=["pgd"])
    clean_line = fig.axes[0].get_lines()[0]
    np.testing.assert_allclose(clean_line.get_ydata(), 100 * numbers["clean"].mean(axis=0))
    band = fig.axes[0].collections[0].get_paths()[0].vertices[:, 1]
    spread = 100 * numbers["clean"].std(axis=0, ddof=1)
    assert band.max() == pytest.approx(max(100 * numbers["clean"].mean(axis=0) + spread))


def test_learning_curves_figure_shows_clean_and_adversarial(workdirs):
    (a, _), (numbers, _) = workdirs
    fig = report.learning_curves_figure(report.load_run(a))
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert len(lines) == 2 * NUM_LEVELS  # clean (solid) and adversarial (dashed) per level
    assert sorted(line.get_linestyle() for line in lines) == ["-"] * NUM_LEVELS + ["--"] * NUM_LEVELS
    dashed = [line for line in lines if line.get_linestyle() == "--"]
    np.testing.assert_allclose(dashed[0].get_ydata(), 100 * numbers["curve"][:, 0].mean(axis=0))
    np.testing.assert_array_equal(dashed[0].get_xdata(), STEPS)
    assert "PGD-10 ε=0.3 (pred. labels)" in ax.get_title()
    assert ax.get_xlabel() == "training step" and "accuracy (%)" in ax.get_ylabel()
    bar = next(a for a in fig.axes if a.get_ylabel() == "weights remaining (%)")
    fig.canvas.draw()  # tick labels are set at draw time
    low, high = bar.get_ylim()
    shown = [t.get_text() for t in bar.get_yticklabels(minor=True) + bar.get_yticklabels()
             if t.get_text() and low <= t.get_position()[1] <= high]
    assert shown == ["100"]  # the levels span 64-100 %: 1-2-5 steps, no label per minor tick


def test_early_stopping_figure_spans_the_training(workdirs):
    (a, _), (numbers, _) = workdirs
    ax = report.early_stopping_figure(report.load_run(a)).axes[0]
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] >= STEPS[-1]
    assert ax.get_ylabel() == "training step" and "lowest validation" in ax.get_title()
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(),
                               numbers["early_stop_step"].mean(axis=0))


def test_weight_figures_say_what_they_show_and_have_no_empty_cells(workdirs):
    (a, _), _ = workdirs
    [(name, fig)] = report.weight_figures(report.load_run(a), trial=1)
    assert name == "rewind_init"
    assert "final weights that survive pruning" in fig._suptitle.get_text()
    assert len(fig.axes) == NUM_LEVELS  # one panel per level, no empty cell
    for ax in fig.axes:
        assert ax.get_xlabel() == "weight value"
        assert any(t.get_text() for t in ax.get_xticklabels()) or ax.get_xticks().size
        assert ax.xaxis.get_tick_params()["labelbottom"]


def test_diagnostics_figure_names_its_axes(tmp_path):
    numbers = known_numbers(8)
    records = [record(numbers, t, lvl, diagnostics={"lipschitz_upper_bound": 10.0 ** (2 * lvl),
                                                    "margin_clean_mean": 1.0 + lvl})
               for t in range(NUM_TRIALS) for lvl in range(NUM_LEVELS)]
    path = write_workdir(tmp_path / "d", numbers, checkpoints=False, records=records)
    fig = report.diagnostics_figure(report.load_run(path))
    assert [ax.get_xlabel() for ax in fig.axes[:2]] == [
        "Lipschitz upper bound (product of layer spectral norms)",
        "mean logit margin, clean test images"]
    assert fig.axes[0].get_xscale() == "log"  # bounds over four orders of magnitude
    assert fig.axes[0].get_ylabel() == "worst case accuracy (%)"


@pytest.mark.parametrize("settings, title", [
    (dict(name="fab_t", eps=0.1), "FAB-T-100 ε=0.1"),
    (dict(name="apgd_t", eps=0.1), "APGD-T-100 ε=0.1"),
    (dict(name="apgd", eps=0.1, num_steps=50, loss="dlr"), "APGD-DLR-50 ε=0.1"),
    (dict(name="square", eps=0.5, norm="l2"), "Square ε₂=0.5"),
    (dict(name="pgd", eps=0.3, step_size=0.05, num_steps=10, label_source="predicted"),
     "PGD-10 ε=0.3 (pred. labels)"),
])
def test_attack_titles_name_every_attack_as_the_papers_do(settings, title):
    """A record's attack settings (as the engine writes them) titled for tables and plots."""
    from experiments.report.load import attack_title
    from sparse_robust import attacks
    from sparse_robust.runs import units
    record_settings = store.to_json(units._attack_settings(attacks.make_attack(**settings)))
    assert attack_title("label", record_settings) == title


def test_robustness_curves_plot_beside_the_autoattack_point(tmp_path):
    numbers = known_numbers(9)
    attacks = dict(SETTINGS, aa={"name": "autoattack", "eps": 0.1, "norm": "linf",
                                 "label_source": "true"},
                   fmn={"name": "fmn", "eps": 0.1, "norm": "linf", "num_steps": 100,
                        "label_source": "true"})
    grid = list(np.linspace(0, 0.3, 7))
    records = []
    for t in range(NUM_TRIALS):
        for lvl in range(NUM_LEVELS):
            base = record(numbers, t, lvl)
            curve = list(np.linspace(0.8, 0.2, 7) - 0.05 * lvl)
            records.append(record(numbers, t, lvl, attacks=attacks,
                                  robust_accuracy=dict(base["robust_accuracy"], aa=0.5, fmn=0.6),
                                  robustness_curves={"fmn": {"eps": grid, "accuracy": curve,
                                                             "norm": "linf",
                                                             "median_norm": 0.15}}))
    path = write_workdir(tmp_path / "c", numbers, checkpoints=False, records=records)
    run = report.load_run(path)
    fig = report.robustness_curves_figure(run)
    ax = fig.axes[0]
    assert len(ax.get_lines()) == NUM_LEVELS  # a curve per level
    stars = [c for c in ax.collections if len(c.get_offsets()) == 1]
    assert len(stars) == NUM_LEVELS
    assert all(np.allclose(c.get_offsets()[0], [0.1, 50.0]) for c in stars)  # AutoAttack's point
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), 100 * np.linspace(0.8, 0.2, 7))
    assert "AutoAttack" in ax.get_title()
    assert is_png(report.plot_robustness_curves(run, str(tmp_path)))
    no_curves = report.load_run(write_workdir(tmp_path / "n", numbers, checkpoints=False))
    assert report.plot_robustness_curves(no_curves, str(tmp_path)) is None


def test_the_conclusion_ranks_the_sparse_methods_at_each_sparsity(tmp_path):
    """Per pruned level, the sparse methods (not the dense ones) in order of mean worst-case
    robust accuracy, and the verdict on the first two recomputed from the records with numpy."""
    numbers = known_numbers(11)
    rng = np.random.default_rng(12)
    records = [record(numbers, t, lvl) for t in range(NUM_TRIALS) for lvl in range(NUM_LEVELS)]
    for name in ("random", "hydra", "radmm", "inverse_inheritance"):
        for t in range(NUM_TRIALS):
            for lvl in range(1, NUM_LEVELS):
                r = record(numbers, t, lvl, branch=name)
                r["robust_accuracy"]["worst_case"] = float(rng.uniform(0.1, 0.7))
                records.append(r)
    run = report.load_run(write_workdir(tmp_path / "m", numbers, checkpoints=False,
                                        records=records))
    lines = [line for line in report.conclusion(run).splitlines() if "sparsity" in line]
    assert len(lines) == NUM_LEVELS - 1
    titles = {"": "lottery ticket", "random": "random mask", "hydra": "HYDRA", "radmm": "RADMM"}
    for line, lvl in zip(lines, range(1, NUM_LEVELS)):
        values = {title: 100 * np.array([r["robust_accuracy"]["worst_case"] for r in records
                                         if r.get("branch", "") == m and r["level"] == lvl])
                  for m, title in titles.items()}
        order = sorted(values, key=lambda k: -values[k].mean())
        assert f"At {100 - 100 * 0.8 ** lvl:.1f} % sparsity" in line
        assert "inverse inheritance" not in line  # a dense network
        shown = re.findall(r"([A-Za-z ]+) (\d+\.\d) ± (\d+\.\d)", line.split(": ", 1)[1])
        assert [name.strip(" ;") for name, _, _ in shown] == order
        for (name, mean, std), key in zip(shown, order):
            assert float(mean) == pytest.approx(values[key].mean(), abs=0.051)
            assert float(std) == pytest.approx(values[key].std(ddof=1), abs=0.051)
        first, second = (values[k] for k in order[:2])
        lead = round(first.mean(), 1) - round(second.mean(), 1)
        separated = lead > max(first.std(ddof=1), second.std(ddof=1))
        assert ("more than the larger of their stds" in line) == separated
        assert ("do not separate them" in line) == (not separated)
