r"""Tables and plots from experiment workdirs.

  python -m experiments.report WORKDIR [WORKDIR ...] [--out DIR]

prints the paper-style table (test accuracy per sparsity level, mean ± std over trials; for
method comparisons also the methods × sparsity table and inverse inheritance vs from scratch) and
writes into DIR (default: the first WORKDIR/report) table.md, table.tex and PNG plots: adversarial test
accuracy during training, accuracy and early-stopping step vs weights remaining, distributions of
the surviving weights, and robust accuracy vs the diagnostics when the records carry them.

A *series* is what one line or panel shows: a run's pruning chain, or one of its branches (records
with a "branch" field). Files are found through ``sparse_robust.runs.layout``. Standard deviations
are sample ones (ddof=1), omitted for a single trial.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from typing import Callable, Optional, Sequence, Union

import numpy as np
from matplotlib import cm, colors, ticker
from matplotlib.figure import Figure

from sparse_robust import masks as masks_lib
from sparse_robust.checks import check_choice
from sparse_robust.runs import store
from sparse_robust.runs.errors import UserError
from sparse_robust.runs.layout import Layout

FORMATS = ("markdown", "latex")
# Which accuracies a table or plot shows: the final weights', or those kept by early stopping.
ACCURACY_FIELDS = {"final": ("clean_accuracy", "robust_accuracy"),
                   "early_stop": ("early_stop_clean_accuracy", "early_stop_robust_accuracy")}
SPLITS = ("train", "val", "test")
WORST_CASE = "worst_case"
_MISSING = {"markdown": "—", "latex": "--"}


@dataclasses.dataclass(frozen=True)
class Run:
    """One workdir: its summary records, its resolved config and the label it is shown under."""

    workdir: str
    label: str
    config: dict
    records: list


def load_run(workdir: str, label: Optional[str] = None) -> Run:
    """Read WORKDIR/summary.json and config.json; label defaults to the pruning strategy (the
    directory name for a comparison of methods)."""
    layout = Layout(workdir)
    records = store.read_json(layout.summary) if os.path.exists(layout.summary) else None
    if not records:
        raise FileNotFoundError(f"no finished level yet in {workdir} ({layout.summary} is missing "
                                "or empty); run the experiment first.")
    config = store.read_json(layout.config) if os.path.exists(layout.config) else {}
    if label is None:  # a plain chain by its strategy; a comparison of branches by its directory
        branches = config.get("branches", {}).get("names")
        strategy = config.get("prune", {}).get("strategy")
        label = (strategy if not branches else None) or _dir_name(workdir)
    return Run(workdir=os.path.abspath(workdir), label=label, config=config, records=records)


def load_runs(workdirs: Sequence[str]) -> list[Run]:
    """:func:`load_run` for each workdir; runs sharing a label get their directory name added."""
    if isinstance(workdirs, str):
        workdirs = [workdirs]
    if not workdirs:
        raise ValueError("workdirs=[] is empty: give at least one workdir.")
    runs = [load_run(w) for w in workdirs]
    labels = [r.label for r in runs]
    for i, run in enumerate(runs):
        if labels.count(run.label) > 1:
            runs[i] = dataclasses.replace(run, label=f"{run.label} ({_dir_name(workdirs[i])})")
    if len({r.label for r in runs}) < len(runs):  # same strategy and same directory name
        runs = [dataclasses.replace(r, label=f"{r.label} [{i}]") for i, r in enumerate(runs)]
    return runs


# ----------------------------------------------------------------------------- aggregation

def _dir_name(path: str) -> str:
    return os.path.basename(os.path.normpath(os.path.abspath(path)))


def _as_runs(runs: Union[Run, Sequence[Run]]) -> list[Run]:
    runs = [runs] if isinstance(runs, Run) else list(runs)
    if not runs:
        raise ValueError("runs=[] is empty: give at least one Run (see load_run).")
    return runs


def _method(record: dict) -> str:
    """The series of a record: "" for the pruning chain, else its branch."""
    return record.get("branch") or ""


def _series(runs: Sequence[Run]) -> list[tuple[str, Run, str, list[dict]]]:
    """(name, run, method, records) for each run, split into its chain and its branches."""
    out = []
    for run in runs:
        methods = sorted({_method(r) for r in run.records})
        for method in methods:
            records = [r for r in run.records if _method(r) == method]
            out.append((f"{run.label}: {method}" if method else run.label, run, method, records))
    return out


def _level_groups(records: Sequence[dict]) -> list[tuple[str, int, list[dict]]]:
    """(method, level, records) sorted by method then level ("" for the chain)."""
    groups = {}
    for record in records:
        groups.setdefault((_method(record), record["level"]), []).append(record)
    return [(method, level, rs) for (method, level), rs in sorted(groups.items())]


def _remaining_percent(records: Sequence[dict]) -> float:
    """Mean weights remaining (%) of records of one level (equal across trials, or nearly)."""
    return 100 * float(np.mean([r["weights_remaining"] for r in records]))


def mean_std(values) -> tuple[float, Optional[float]]:
    """Mean and sample std (ddof=1) of the values; std is None for a single value."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), (float(values.std(ddof=1)) if values.size > 1 else None)


def _accuracy_getters(accuracy: str, attacks: Sequence[str]) -> dict[str, Callable]:
    """{column name: record -> accuracy or None} for clean and each attack."""
    clean_field, robust_field = ACCURACY_FIELDS[accuracy]
    getters = {"clean": lambda r: r.get(clean_field)}
    for attack in attacks:
        getters[attack] = lambda r, a=attack: (r.get(robust_field) or {}).get(a)
    return getters


def _level_stats(records: Sequence[dict], getter: Callable):
    """Per level with a value: weights remaining (%), mean and std (0 for one trial) of getter."""
    xs, means, stds = [], [], []
    for _, _, level_records in _level_groups(records):
        values = [v for v in map(getter, level_records) if v is not None]
        if not values:
            continue
        mean, std = mean_std(values)
        xs.append(_remaining_percent(level_records))
        means.append(mean)
        stds.append(std or 0.0)
    return np.array(xs), np.array(means), np.array(stds)


def _resolve_attacks(runs: Sequence[Run], attacks, accuracy: str) -> list[str]:
    """The attack labels found in the records (worst case last), or the checked ``attacks``."""
    robust_field = ACCURACY_FIELDS[accuracy][1]
    found = []
    for run in runs:
        for record in run.records:
            found += [a for a in record.get(robust_field) or {} if a not in found]
    found = [a for a in found if a != WORST_CASE] + [a for a in found if a == WORST_CASE]
    if attacks is None:
        return found
    if isinstance(attacks, str):
        attacks = [attacks]
    unknown = [a for a in attacks if a not in found]
    if unknown:
        raise ValueError(f"attacks={list(attacks)!r} names {unknown}, absent from the records; "
                         f"allowed values: {found}.")
    return list(attacks)


# ----------------------------------------------------------------------------- the table

def paper_table(runs: Union[Run, Sequence[Run]], fmt: str = "markdown",
                attacks: Optional[Sequence[str]] = None, accuracy: str = "final") -> str:
    """The paper-style table: a row per (run, method, level), ordered by level within a run.

    Columns: weights remaining (%), clean accuracy and accuracy under each attack (worst case
    last), all in %, and the early-stopping step; each cell is mean ± std over trials.
    ``accuracy`` picks the final weights' accuracies or the early-stopped ones'.
    """
    check_choice("fmt", fmt, FORMATS)
    check_choice("accuracy", accuracy, ACCURACY_FIELDS)
    runs = _as_runs(runs)
    attacks = _resolve_attacks(runs, attacks, accuracy)
    getters = _accuracy_getters(accuracy, attacks)
    show_run = len(runs) > 1
    show_method = any("branch" in r for run in runs for r in run.records)

    header = (["Run"] if show_run else []) + (["Method"] if show_method else [])
    header += ["Level", "Weights remaining", "Clean"]
    header += ["Worst case" if a == WORST_CASE else a for a in attacks] + ["Early-stop step"]
    blocks = []
    for run in runs:
        rows = []
        for method, level, records in _level_groups(run.records):
            row = ([run.label] if show_run else []) + ([method] if show_method else [])
            row += [str(level), f"{_remaining_percent(records):.1f}%"]
            row += [_cell([g(r) for r in records], 100, 2, fmt) for g in getters.values()]
            row.append(_cell([r.get("early_stop_step") for r in records], 1, 0, fmt))
            rows.append(row)
        blocks.append(rows)
    what = "at the early-stopping step" if accuracy == "early_stop" else "of the final weights"
    caption = f"Test accuracy (%) {what}; mean ± std (ddof=1) over trials."
    if fmt == "markdown":
        return _markdown(caption, header, blocks)
    return _latex(caption, header, blocks)


# Row order of the methods table: the dense network, the chain's tickets, then the branches.
METHOD_ORDER = ("dense", "lottery", "inherit", "reinit", "random", "hydra", "inverse_inheritance",
                "scratch_large")


def _method_rank(method: str) -> tuple:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def _level_label(level: int, records: Sequence[dict]) -> str:
    """"dense" for level 0, else the level's sparsity (of the chain's ticket)."""
    if level == 0:
        return "dense"
    chain = [r for r in records if not _method(r)] or records
    return f"{100 - _remaining_percent(chain):.1f}% sparse"


def _table_method(record: dict) -> str:
    """A record's row in the methods table: dense (chain level 0), lottery, or its branch."""
    return _method(record) or ("dense" if record["level"] == 0 else "lottery")


def _compared(run: Run) -> list[dict]:
    """The records of the methods table: the branches, and the chain at the branches' levels."""
    branches = [r for r in run.records if "branch" in r]
    levels = {r["level"] for r in branches} | {0}
    return branches + [r for r in run.records if "branch" not in r and r["level"] in levels] \
        if branches else []


def methods_table(runs: Union[Run, Sequence[Run]], fmt: str = "markdown",
                  accuracy: str = "final") -> str:
    """Methods as rows, sparsity levels as columns, each cell "clean / robust" test accuracy (%)
    with robust = the worst case over the evaluation attacks (mean ± std over trials).

    Only runs with branches count; "" when there are none. For inverse inheritance the column is
    the sparsity of the inherited small network (the large network is dense).
    """
    check_choice("fmt", fmt, FORMATS)
    check_choice("accuracy", accuracy, ACCURACY_FIELDS)
    runs = _as_runs(runs)
    getters = _accuracy_getters(accuracy, [WORST_CASE])
    show_run = len(runs) > 1
    blocks, columns = [], {}
    for run in runs:
        records = _compared(run)
        for level in sorted({r["level"] for r in records}):
            columns.setdefault(level, _level_label(level, [r for r in records
                                                           if r["level"] == level]))
    if not columns:
        return ""
    for run in runs:
        groups = {}
        for record in _compared(run):
            groups.setdefault(_table_method(record), {}).setdefault(record["level"], []).append(
                record)
        rows = []
        for method in sorted(groups, key=_method_rank):
            row = ([run.label] if show_run else []) + [method]
            for level in columns:
                records = groups[method].get(level)
                row.append(_MISSING[fmt] if not records else " / ".join(
                    _cell([g(r) for r in records], 100, 1, fmt) for g in getters.values()))
            rows.append(row)
        blocks.append(rows)
    header = (["Run"] if show_run else []) + ["Method"] + list(columns.values())
    what = "at the early-stopping step" if accuracy == "early_stop" else "of the final weights"
    caption = (f"Clean / robust test accuracy (%) {what} by method and sparsity (robust: worst case "
               "over the evaluation attacks); inverse_inheritance: the dense large network that "
               "inherited that level's sparse network.")
    if fmt == "markdown":
        return _markdown(caption, header, blocks)
    return _latex(caption, header, blocks)


def inverse_inheritance_table(runs: Union[Run, Sequence[Run]], fmt: str = "markdown",
                              accuracy: str = "final") -> str:
    """The large network trained from scratch vs inheriting each level's sparse network: clean,
    per-attack and worst-case accuracy (%), and the worst-case gain over from-scratch (points).
    "" when no run has both "scratch_large" and "inverse_inheritance" records."""
    check_choice("fmt", fmt, FORMATS)
    check_choice("accuracy", accuracy, ACCURACY_FIELDS)
    runs = _as_runs(runs)
    attacks = _resolve_attacks(runs, None, accuracy)
    getters = _accuracy_getters(accuracy, attacks)
    worst = getters.get(WORST_CASE)
    show_run = len(runs) > 1
    blocks = []
    for run in runs:
        scratch = [r for r in run.records if _method(r) == "scratch_large"]
        inverse = [r for r in run.records if _method(r) == "inverse_inheritance"]
        if not (scratch and inverse):
            continue
        rows = [(["from scratch"], scratch)]
        for level in sorted({r["level"] for r in inverse}):
            records = [r for r in inverse if r["level"] == level]
            remaining = 100 * np.mean([r.get("source_weights_remaining", 1.0) for r in records])
            sparsity = f"{100 - remaining:.1f}% sparse"
            rows.append(([f"inherits {records[0].get('source', '?')} ({sparsity})"], records))
        baseline = np.mean([worst(r) for r in scratch]) if worst else None
        block = []
        for name, records in rows:
            row = ([run.label] if show_run else []) + name
            row += [_cell([g(r) for r in records], 100, 2, fmt) for g in getters.values()]
            gain = (100 * (np.mean([worst(r) for r in records]) - baseline)
                    if worst and records is not scratch else None)
            row.append(_MISSING[fmt] if gain is None else f"{gain:+.2f}")
            block.append(row)
        blocks.append(block)
    if not blocks:
        return ""
    widths = sorted({r.get("width_multiplier", 1.0) for run in runs for r in run.records
                     if _method(r) == "scratch_large"})
    header = (["Run"] if show_run else []) + ["Large network", "Clean"]
    header += ["Worst case" if a == WORST_CASE else a for a in attacks] + ["Gain (worst case)"]
    caption = (f"Inverse weights inheritance: the large network (width x"
               f"{'/'.join(map(str, widths))}) adversarially trained from scratch vs after "
               "inheriting a sparse network; test accuracy (%), mean ± std over trials; gain in "
               "points over from scratch.")
    if fmt == "markdown":
        return _markdown(caption, header, blocks)
    return _latex(caption, header, blocks)


def _cell(values, scale: float, decimals: int, fmt: str) -> str:
    values = [scale * v for v in values if v is not None]
    if not values:
        return _MISSING[fmt]
    mean, std = mean_std(values)
    if std is None:
        return f"{mean:.{decimals}f}"
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}" if fmt == "markdown" else \
        f"${mean:.{decimals}f} \\pm {std:.{decimals}f}$"


def _markdown(caption: str, header: list, blocks: list) -> str:
    lines = [caption, "", "| " + " | ".join(header) + " |",
             "|" + "|".join("---" if h in ("Run", "Method") else "---:" for h in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for rows in blocks for row in rows]
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(c, c) for c in text)


def _latex(caption: str, header: list, blocks: list) -> str:
    spec = "".join("l" if h in ("Run", "Method") else "r" for h in header)
    # Cells built by _cell are already LaTeX (math mode); labels and percentages are escaped.
    cell = lambda c: c if c.startswith("$") or c == _MISSING["latex"] else _latex_escape(c)
    lines = [f"% {caption}", f"\\begin{{tabular}}{{{spec}}}", r"\hline",
             " & ".join(_latex_escape(h) for h in header) + r" \\", r"\hline"]
    for rows in blocks:
        lines += [" & ".join(cell(c) for c in row) + r" \\" for row in rows]
        lines.append(r"\hline")
    lines.append(r"\end{tabular}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- level artefacts

def unit_files(run: Run, record: dict):
    """The files of a record's unit (``runs.layout``)."""
    return Layout(run.workdir).unit(record["trial"], record["level"], record.get("branch"))


def learning_curves(run: Run, metric: str = "adv_accuracy",
                    split: str = "test") -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """{(method, level): (steps, mean over trials of split[metric])} from the metrics.jsonl files.

    Only steps measured in every trial that recorded the metric are kept ("" is the method of
    records without one); levels without such measurements are left out.
    """
    check_choice("split", split, SPLITS)
    curves = {}
    for method, level, records in _level_groups(run.records):
        per_trial = []
        for record in records:
            path = unit_files(run, record).metrics
            if os.path.exists(path):
                history = {m["step"]: m[split][metric] for m in store.read_jsonl(path)
                           if m.get(split, {}).get(metric) is not None}
                per_trial += [history] if history else []
        steps = sorted(set.intersection(*(set(h) for h in per_trial))) if per_trial else []
        if steps:
            curves[(method, level)] = (np.array(steps),
                                       np.array([np.mean([h[s] for h in per_trial]) for s in steps]))
    return curves


def surviving_weights(files) -> dict[str, np.ndarray]:
    """{leaf name: 1-D array of its alive weights} of a unit's final weights and mask."""
    restored = store.load_tree_raw(files.final_variables)
    params = restored[0] if isinstance(restored, (list, tuple)) else restored  # (params, state)
    flat = {name: np.asarray(leaf) for name, leaf in masks_lib.named_leaves(params).items()}
    mask = store.read_mask_arrays(files.mask)
    missing = sorted(set(mask) - set(flat))
    if missing:
        raise ValueError(f"{files.mask}: mask leaves {missing} are not among the checkpointed "
                         f"params {sorted(flat)}.")
    return {name: flat[name][alive] for name, alive in mask.items()}


def _has_weights(files) -> bool:
    return os.path.isdir(files.final_variables) and os.path.exists(files.mask)


# ----------------------------------------------------------------------------- plots

def _panels(n: int, ncols: int = 3, size=(4.6, 3.4), sharex: bool = False):
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=sharex).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _save(fig: Figure, out_dir: str, name: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def _weights_colours(percents) -> cm.ScalarMappable:
    """Colour scale over weights remaining (%), logarithmic like the sparsity levels."""
    high = max(percents)
    low = min(min(percents), high / 2)  # a non-empty range even for one level
    return cm.ScalarMappable(norm=colors.LogNorm(low, high), cmap="viridis")


def _plain_log_ticks(axis) -> None:
    axis.set_major_formatter(ticker.LogFormatter())  # plain numbers, not 9×10^1
    axis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False))


def _weights_colourbar(fig: Figure, mappable: cm.ScalarMappable, axes) -> None:
    colourbar = fig.colorbar(mappable, ax=list(axes), label="weights remaining (%)")
    _plain_log_ticks(colourbar.ax.yaxis)


def _weights_axis(ax) -> None:
    """Log-x in weights remaining (%), decreasing to the right (sparser to the right)."""
    ax.set_xscale("log")
    _plain_log_ticks(ax.xaxis)
    if not ax.xaxis_inverted():
        ax.invert_xaxis()
    ax.set_xlabel("weights remaining (%)")


def _band(ax, x, mean, std, color: str, label: str) -> None:
    ax.plot(x, mean, marker="o", ms=3, color=color, label=label)
    ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, lw=0)


def plot_learning_curves(runs: Union[Run, Sequence[Run]], out_dir: str,
                         metric: str = "adv_accuracy", split: str = "test") -> str:
    """One panel per series: split[metric] vs iteration, a line per level coloured by weights
    remaining (mean over trials). Writes learning_curves.png and returns its path."""
    check_choice("split", split, SPLITS)
    runs = _as_runs(runs)
    panels = []  # (series name, [(weights remaining %, steps, values)])
    for run in runs:
        curves = learning_curves(run, metric, split)
        remaining = {(m, lvl): _remaining_percent(rs) for m, lvl, rs in _level_groups(run.records)}
        for name, _, method, _ in _series([run]):
            panels.append((name, [(remaining[k], *curves[k]) for k in sorted(curves)
                                  if k[0] == method]))
    scale = 100 if "accuracy" in metric else 1
    mappable = _weights_colours([w for _, lines in panels for w, *_ in lines] or [100.0])
    fig, axes = _panels(len(panels))
    for ax, (name, lines) in zip(axes, panels):
        for weights, steps, values in lines:
            ax.plot(steps, scale * values, color=mappable.to_rgba(weights), lw=1.2)
        if not lines:
            ax.text(0.5, 0.5, f"no {split} {metric} in metrics.jsonl", ha="center",
                    transform=ax.transAxes)
        ax.set(title=name, xlabel="iteration",
               ylabel=f"{split} {metric}" + (" (%)" if scale == 100 else ""))
    _weights_colourbar(fig, mappable, axes)
    return _save(fig, out_dir, "learning_curves.png")


def plot_accuracy_vs_weights(runs: Union[Run, Sequence[Run]], out_dir: str,
                             attacks: Optional[Sequence[str]] = None,
                             accuracy: str = "final") -> str:
    """Clean and per-attack test accuracy vs weights remaining (log-x), mean ± std band per
    series. Writes accuracy_vs_weights.png and returns its path."""
    check_choice("accuracy", accuracy, ACCURACY_FIELDS)
    runs = _as_runs(runs)
    getters = _accuracy_getters(accuracy, _resolve_attacks(runs, attacks, accuracy))
    fig, axes = _panels(len(getters))
    for ax, (column, getter) in zip(axes, getters.items()):
        for i, (name, _, _, records) in enumerate(_series(runs)):
            x, mean, std = _level_stats(records, getter)
            _band(ax, x, 100 * mean, 100 * std, f"C{i % 10}", name)
        _weights_axis(ax)
        ax.set(title="worst case" if column == WORST_CASE else column,
               ylabel="test accuracy (%)")
    axes[0].legend(fontsize="small")
    return _save(fig, out_dir, "accuracy_vs_weights.png")


def plot_early_stopping(runs: Union[Run, Sequence[Run]], out_dir: str) -> str:
    """Early-stopping iteration vs weights remaining (log-x), mean ± std band per series.
    Writes early_stopping.png and returns its path."""
    runs = _as_runs(runs)
    fig, (ax,) = _panels(1, size=(5.5, 3.8))
    for i, (name, _, _, records) in enumerate(_series(runs)):
        _band(ax, *_level_stats(records, lambda r: r.get("early_stop_step")), f"C{i % 10}", name)
    _weights_axis(ax)
    ax.set(title="early stopping", ylabel="early-stopping iteration")
    ax.legend(fontsize="small")
    return _save(fig, out_dir, "early_stopping.png")


def plot_weight_distributions(run: Run, out_dir: str, trial: Optional[int] = None,
                              bins: int = 50) -> list[str]:
    """Histograms of the surviving weights (one per layer), a panel per level, for one trial
    (default: the first). Writes weights_<series>_trial<T>.png per series; returns the paths.
    Levels without final_variables/ and mask.npz are skipped."""
    trials = sorted({r["trial"] for r in run.records})
    trial = trials[0] if trial is None else trial
    check_choice("trial", trial, trials)
    if not isinstance(bins, int) or isinstance(bins, bool) or bins < 1:
        raise ValueError(f"bins={bins!r} is invalid; expected an integer >= 1.")
    paths = []
    for name, _, _, records in _series([run]):
        levels = sorted(((r["level"], r["weights_remaining"], unit_files(run, r))
                         for r in records if r["trial"] == trial), key=lambda e: e[:2])
        levels = [entry for entry in levels if _has_weights(entry[2])]
        if not levels:
            continue
        fig, axes = _panels(len(levels), ncols=4, size=(3.6, 2.8), sharex=True)
        for ax, (level, remaining, path) in zip(axes, levels):
            weights = surviving_weights(path)
            for leaf, values in weights.items():  # each layer's own density: sizes differ a lot
                if values.size:
                    ax.hist(values, bins=bins, density=True, histtype="step",
                            label=masks_lib.layer_name(leaf))
            ax.set(title=f"level {level}: {100 * remaining:.1f}% left", xlabel="weight",
                   ylabel="density")
        axes[0].legend(fontsize="x-small")
        fig.suptitle(f"{name}, trial {trial}: surviving weights")
        paths.append(_save(fig, out_dir, f"weights_{_slug(name)}_trial{trial}.png"))
    return paths


def diagnostic_names(runs: Union[Run, Sequence[Run]]) -> list[str]:
    """Names of the scalar diagnostics found in the records (histograms and Nones excluded)."""
    names = {name for run in _as_runs(runs) for record in run.records
             for name, value in (record.get("diagnostics") or {}).items()
             if isinstance(value, (int, float)) and not isinstance(value, bool)}
    return sorted(names)


def plot_diagnostics(runs: Union[Run, Sequence[Run]], out_dir: str,
                     attack: Optional[str] = None, accuracy: str = "final") -> Optional[str]:
    """Robust accuracy (default: worst case) vs each scalar diagnostic, a point per level (mean
    over trials) coloured by weights remaining. Writes diagnostics.png and returns its path, or
    None when no record has diagnostics or an attack."""
    check_choice("accuracy", accuracy, ACCURACY_FIELDS)
    runs = _as_runs(runs)
    names = diagnostic_names(runs)
    available = _resolve_attacks(runs, None, accuracy)
    if attack is None and available:
        attack = WORST_CASE if WORST_CASE in available else available[0]
    if attack is not None:
        check_choice("attack", attack, available)
    if not names or attack is None:
        return None
    robust = _accuracy_getters(accuracy, [attack])[attack]
    series = _series(runs)
    mappable = _weights_colours([100 * r["weights_remaining"] for run in runs for r in run.records])
    fig, axes = _panels(len(names))
    for ax, diagnostic in zip(axes, names):
        value = lambda r, d=diagnostic: (r.get("diagnostics") or {}).get(d)
        for i, (name, _, _, records) in enumerate(series):
            points = []  # (diagnostic mean, robust accuracy mean, weights remaining %)
            for _, _, level_records in _level_groups(records):
                kept = [r for r in level_records if value(r) is not None and robust(r) is not None]
                if kept:
                    points.append((np.mean([value(r) for r in kept]),
                                   100 * np.mean([robust(r) for r in kept]),
                                   _remaining_percent(kept)))
            if points:
                x, y, remaining = np.array(points).T
                ax.plot(x, y, color="0.6", lw=0.8, zorder=1)
                ax.scatter(x, y, c=remaining, cmap=mappable.cmap, norm=mappable.norm, zorder=2,
                           marker="os^Dv<>p*h"[i % 10], label=name)
        xs = [c for line in ax.get_lines() for c in line.get_xdata()]
        if xs and min(xs) > 0 and max(xs) / min(xs) > 100:  # e.g. Lipschitz bounds over levels
            ax.set_xscale("log")
        ax.set(xlabel=diagnostic, ylabel=f"{attack} accuracy (%)")
    axes[0].legend(fontsize="small")
    _weights_colourbar(fig, mappable, axes)
    return _save(fig, out_dir, "diagnostics.png")


# ----------------------------------------------------------------------------- sanity checks

def failed_sanity_checks(runs: Union[Run, Sequence[Run]]) -> str:
    """A markdown list of the gradient-masking checks that failed (``sanity_checks`` in the
    records), one line per run, method, level and trial; "" when none failed."""
    lines = []
    for name, _, _, records in _series(_as_runs(runs)):
        for record in records:
            for check, outcome in sorted((record.get("sanity_checks") or {}).items()):
                if isinstance(outcome, dict) and not outcome["passed"]:
                    lines.append(f"- {name}, level {record['level']}, trial {record.get('trial', 0)}: "
                                 f"**{check}**: {outcome['detail']}")
    if not lines:
        return ""
    return ("Sanity checks FAILED (evaluation.sanity_checks; robustness numbers they concern are "
            "suspect):\n\n" + "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- report and CLI

def write_report(workdirs: Sequence[str], out_dir: Optional[str] = None,
                 accuracy: str = "final") -> str:
    """Write table.md, table.tex and every plot into out_dir (default: the first WORKDIR/report);
    return the markdown table."""
    check_choice("accuracy", accuracy, ACCURACY_FIELDS)
    runs = load_runs(workdirs)
    out_dir = out_dir or os.path.join(runs[0].workdir, "report")
    os.makedirs(out_dir, exist_ok=True)
    tables = (paper_table, methods_table, inverse_inheritance_table)
    markdown, latex = ("\n".join(t for t in (table(runs, fmt, accuracy=accuracy) for table in tables)
                                 if t) for fmt in FORMATS)
    failures = failed_sanity_checks(runs)
    markdown += f"\n{failures}" if failures else ""
    for name, text in (("table.md", markdown), ("table.tex", latex)):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write(text)
    plot_learning_curves(runs, out_dir)
    plot_accuracy_vs_weights(runs, out_dir, accuracy=accuracy)
    plot_early_stopping(runs, out_dir)
    for run in runs:
        plot_weight_distributions(run, out_dir)
    plot_diagnostics(runs, out_dir, accuracy=accuracy)
    return markdown


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.report",
        description="Print the paper-style table of one or more workdirs and write it with plots.")
    parser.add_argument("workdirs", nargs="+", metavar="WORKDIR")
    parser.add_argument("--out", default=None, help="output directory (default: WORKDIR/report "
                        "of the first workdir)")
    parser.add_argument("--accuracy", choices=tuple(ACCURACY_FIELDS), default="final",
                        help="accuracies of the final weights or of the early-stopped ones")
    args = parser.parse_args(argv)
    try:
        print(write_report(args.workdirs, args.out, accuracy=args.accuracy))
    except (FileNotFoundError, ValueError, UserError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
