"""Figures of a report. Each ``*_figure`` function builds a matplotlib Figure (so a test can read
its axes, labels and limits); each ``plot_*`` function builds one and writes it as a PNG.

Conventions: accuracies in %, on y ranges shared by every panel of a figure (clean and robust
compare at a glance); weights remaining in % on a log axis, decreasing to the right (sparser to
the right, as in the lottery-ticket papers), with a tick at every level; a line is the mean over
trials and its band ± one std.
"""

from __future__ import annotations

import os
import re
from typing import Optional, Sequence, Union

import numpy as np
from matplotlib import cm, colors, ticker
from matplotlib.figure import Figure

from experiments.report.load import (ACCURACY_FIELDS, WORST_CASE, Run, accuracy_getters,
                                     as_runs, attack_settings, attack_title, level_groups,
                                     mean_std, num_trials, periodic_attack_title,
                                     remaining_percent, resolve_attacks, series, unit_files)
from sparse_robust import masks as masks_lib
from sparse_robust.checks import check_choice
from sparse_robust.runs import store

SPLITS = ("train", "val", "test")
DIAGNOSTIC_TITLES = {
    "lipschitz_upper_bound": "Lipschitz upper bound (product of layer spectral norms)",
    "local_lipschitz_mean": "mean local Lipschitz constant (input-gradient norm of the margin)",
    "margin_clean_mean": "mean logit margin, clean test images",
    "margin_adversarial_mean": "mean logit margin, adversarial test images",
}


# ----------------------------------------------------------------------------- helpers

def _panels(n: int, ncols: Optional[int] = None, size=(4.6, 3.4), sharey: bool = False):
    """n panels: one row up to 5, else rows of 4, 3 or 5 leaving the fewest empty cells."""
    ncols = min(ncols or (n if n <= 5 else min((4, 3, 5), key=lambda c: -n % c)), n)
    nrows = -(-n // ncols)
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=sharey).ravel()
    for ax in axes[n:]:
        fig.delaxes(ax)
    return fig, list(axes[:n])


def save(fig: Figure, out_dir: str, name: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def _weights_axis(ax, levels_percent: Sequence[float]) -> None:
    """Log-x in weights remaining (%), sparser to the right, a labelled tick at every level."""
    ticks = sorted({round(p, 2) for p in levels_percent}, reverse=True)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(ticker.FixedLocator(ticks))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    # The tables' format (one decimal), so a tick reads as the table's row does.
    labels = [f"{t:.1f}" if t >= 0.1 else f"{t:.2g}" for t in ticks]
    ax.xaxis.set_major_formatter(ticker.FixedFormatter(labels))
    ax.tick_params(axis="x", labelrotation=45 if len(ticks) > 6 else 0)
    low, high = min(ticks), max(ticks)
    ax.set_xlim(high * 1.25, low / 1.25)  # decreasing: sparser to the right
    ax.set_xlabel("weights remaining (%), sparser →")


def _weights_colours(percents) -> cm.ScalarMappable:
    """Colour scale over weights remaining (%), logarithmic like the levels."""
    high = max(percents)
    low = min(min(percents), high / 2)
    return cm.ScalarMappable(norm=colors.LogNorm(low, high), cmap="viridis")


def _colourbar(fig: Figure, mappable: cm.ScalarMappable, axes) -> None:
    """The weights-remaining colour scale, labelled in plain numbers at 1-2-5 steps (labelling
    every log tick crowds 60, 70, 80, 90, 100 together)."""
    bar = fig.colorbar(mappable, ax=axes, label="weights remaining (%)")
    bar.ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    bar.ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    bar.ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def _stats(records: Sequence[dict], getter):
    """Per level with a value: weights remaining (%), mean and std (0 for one trial)."""
    xs, means, stds = [], [], []
    for _, _, level_records in level_groups(records):
        values = [v for v in map(getter, level_records) if v is not None]
        if values:
            mean, std = mean_std(values)
            xs.append(remaining_percent(level_records))
            means.append(mean)
            stds.append(std or 0.0)
    return np.array(xs), np.array(means), np.array(stds)


def _shared_percent_ylim(axes, values) -> None:
    values = [v for v in values if np.isfinite(v)]
    if values:
        low, high = min(values), max(values)
        pad = max(2.0, 0.08 * (high - low))
        axes[0].set_ylim(max(0.0, low - pad), min(100.0, high + pad))


def _spread_note(runs) -> str:
    trials = num_trials(runs)
    return f"mean ± std over {trials} trials" if trials > 1 else "1 trial"


# ----------------------------------------------------------------------------- accuracy

def accuracy_figure(runs: Union[Run, Sequence[Run]], attacks: Optional[Sequence[str]] = None,
                    accuracy: str = "final") -> Figure:
    """Clean and robust test accuracy (%) vs weights remaining: a panel per evaluator (clean
    first, worst case last), one shared y range, a line per series."""
    check_choice("accuracy", accuracy, ACCURACY_FIELDS)
    runs = as_runs(runs)
    getters = accuracy_getters(accuracy, resolve_attacks(runs, attacks, accuracy))
    fig, axes = _panels(len(getters), sharey=True)
    drawn, levels = [], []
    for ax, (column, getter) in zip(axes, getters.items()):
        for i, (name, _, _, records) in enumerate(series(runs)):
            x, mean, std = _stats(records, getter)
            if not len(x):
                continue
            style = dict(color=f"C{i % 10}", marker="o", ms=4, label=name)
            if len(x) > 1:
                ax.plot(x, 100 * mean, **style)
                ax.fill_between(x, 100 * (mean - std), 100 * (mean + std), color=style["color"],
                                alpha=0.2, lw=0)
            else:  # a branch at one level: a point with its spread
                ax.errorbar(x, 100 * mean, yerr=100 * std, ls="none", capsize=3, **style)
            drawn += list(100 * (mean - std)) + list(100 * (mean + std))
            levels += list(x)
        title = "clean" if column == "clean" else attack_title(column, attack_settings(runs, column))
        ax.set_title(title, fontsize="medium")
        ax.grid(alpha=0.3)
    for ax in axes:
        _weights_axis(ax, levels or [100.0])
        ax.tick_params(labelleft=True)
    axes[0].set_ylabel("test accuracy (%)")
    _shared_percent_ylim(axes, drawn)
    axes[0].legend(fontsize="small", title=_spread_note(runs), title_fontsize="small")
    if WORST_CASE in getters:
        fig.supxlabel("worst case: an image counts only if correct clean and under every attack",
                      fontsize="small")
    return fig


def plot_accuracy_vs_weights(runs, out_dir: str, attacks=None, accuracy: str = "final") -> str:
    return save(accuracy_figure(runs, attacks, accuracy), out_dir, "accuracy_vs_weights.png")


# ----------------------------------------------------------------------------- learning curves

def learning_curves(run: Run, metric: str = "adv_accuracy",
                    split: str = "test") -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """{(method, level): (steps, mean over trials of split[metric])} from the metrics.jsonl files.

    Only steps measured in every trial that recorded the metric are kept ("" is the chain's
    method); levels without such measurements are left out.
    """
    check_choice("split", split, SPLITS)
    curves = {}
    for m, level, records in level_groups(run.records):
        per_trial = []
        for record in records:
            path = unit_files(run, record).metrics
            if os.path.exists(path):
                history = {r["step"]: r[split][metric] for r in store.read_jsonl(path)
                           if r.get(split, {}).get(metric) is not None}
                per_trial += [history] if history else []
        steps = sorted(set.intersection(*(set(h) for h in per_trial))) if per_trial else []
        if steps:
            curves[(m, level)] = (np.array(steps),
                                  np.array([np.mean([h[s] for h in per_trial]) for s in steps]))
    return curves


def learning_curves_figure(runs: Union[Run, Sequence[Run]], split: str = "test") -> Figure:
    """A panel per series: clean (solid) and adversarial (dashed) accuracy of the periodic
    measurements vs training step, a colour per level (its weights remaining)."""
    check_choice("split", split, SPLITS)
    runs = as_runs(runs)
    curves = {run.workdir: (learning_curves(run, "accuracy", split),
                            learning_curves(run, "adv_accuracy", split)) for run in runs}
    panels = []  # (series name, run, [(weights remaining %, clean curve, adversarial curve)])
    for name, run, m, records in series(runs):
        clean, adv = curves[run.workdir]
        remaining = {level: remaining_percent(rs) for _, level, rs in level_groups(records)}
        panels.append((name, run, [(remaining[level], clean[(m, level)], adv.get((m, level)))
                                   for level in sorted(remaining) if (m, level) in clean]))
    mappable = _weights_colours([w for _, _, lines in panels for w, *_ in lines] or [100.0])
    fig, axes = _panels(len(panels), sharey=True)
    values = []
    for ax, (name, run, lines) in zip(axes, panels):
        for weights, (steps, acc), adv in lines:
            colour = mappable.to_rgba(weights)
            ax.plot(steps, 100 * acc, color=colour, lw=1.2, marker=".", ms=3)
            values += list(100 * acc)
            if adv is not None:
                ax.plot(adv[0], 100 * adv[1], color=colour, lw=1.2, ls="--", marker=".", ms=3)
                values += list(100 * adv[1])
        if not lines:
            ax.text(0.5, 0.5, "no periodic measurements", ha="center", transform=ax.transAxes)
        attack = periodic_attack_title(run) or "the periodic attack"
        ax.set_title(f"{name}\nsolid: clean, dashed: {attack}", fontsize="small")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.tick_params(labelleft=True)
    axes[0].set_ylabel(f"{split} accuracy (%), periodic sample")
    _shared_percent_ylim(axes, values)
    _colourbar(fig, mappable, axes)
    return fig


def plot_learning_curves(runs, out_dir: str, split: str = "test") -> str:
    return save(learning_curves_figure(runs, split), out_dir, "learning_curves.png")


# ----------------------------------------------------------------------------- early stopping

def early_stopping_figure(runs: Union[Run, Sequence[Run]]) -> Figure:
    """Early-stopping step vs weights remaining: a marker per level (mean, ± std bars), the y axis
    spanning the whole training with a grid line at every measurement."""
    runs = as_runs(runs)
    fig, (ax,) = _panels(1, size=(6.0, 3.8))
    levels, steps = [], []
    for i, (name, _, _, records) in enumerate(series(runs)):
        x, mean, std = _stats(records, lambda r: r.get("early_stop_step"))
        ax.errorbar(x, mean, yerr=std, color=f"C{i % 10}", marker="o", ls=":", capsize=3,
                    label=name)
        levels += list(x)
        steps += [r["steps"] for r in records if "steps" in r]
    _weights_axis(ax, levels or [100.0])
    every = runs[0].config.get("eval", {}).get("every")
    top = max(steps) if steps else 1
    ax.set_ylim(0, top * 1.05)
    if every and top / every <= 40:
        ax.yaxis.set_major_locator(ticker.MultipleLocator(every * max(1, round(top / every / 8))))
        ax.yaxis.set_minor_locator(ticker.MultipleLocator(every))
        ax.grid(axis="y", which="minor", alpha=0.15)
    ax.grid(alpha=0.3)
    metric = runs[0].config.get("eval", {}).get("early_stop_metric", "objective")
    ax.set(title=f"early stopping: step of the lowest validation {metric.replace('_', ' ')}",
           ylabel="training step")
    ax.legend(fontsize="small", title=_spread_note(runs), title_fontsize="small")
    return fig


def plot_early_stopping(runs, out_dir: str) -> str:
    return save(early_stopping_figure(runs), out_dir, "early_stopping.png")


# ----------------------------------------------------------------------------- weights

def surviving_weights(files) -> dict[str, np.ndarray]:
    """{leaf name: 1-D array of its alive final weights} of a unit."""
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


def weight_figures(run: Run, trial: Optional[int] = None,
                   bins: int = 50) -> list[tuple[str, Figure]]:
    """(series name, figure) per series: histograms of the *final* weights that survive pruning
    (pruned entries excluded), one panel per level, one line per layer."""
    trials = sorted({r["trial"] for r in run.records})
    trial = trials[0] if trial is None else trial
    check_choice("trial", trial, trials)
    if not isinstance(bins, int) or isinstance(bins, bool) or bins < 1:
        raise ValueError(f"bins={bins!r} is invalid; expected an integer >= 1.")
    out = []
    for name, _, _, records in series([run]):
        levels = sorted(((r["level"], remaining_percent([r]), unit_files(run, r))
                         for r in records if r["trial"] == trial), key=lambda e: e[:2])
        levels = [entry for entry in levels if _has_weights(entry[2])]
        if not levels:
            continue
        fig, axes = _panels(len(levels), size=(3.8, 2.9))
        for ax, (level, remaining, files) in zip(axes, levels):
            for leaf, values in surviving_weights(files).items():  # layer sizes differ a lot
                if values.size:
                    ax.hist(values, bins=bins, density=True, histtype="step",
                            label=masks_lib.layer_name(leaf))
            ax.set_title(f"level {level}: {remaining:.1f} % of the weights", fontsize="small")
            ax.set(xlabel="weight value", ylabel="density")
            ax.tick_params(labelbottom=True, labelleft=True)
        axes[0].legend(fontsize="x-small", title="layer", title_fontsize="x-small")
        fig.suptitle(f"{name}, trial {trial}: final weights that survive pruning "
                     "(pruned entries excluded)", fontsize="medium")
        out.append((name, fig))
    return out


def plot_weight_distributions(run: Run, out_dir: str, trial: Optional[int] = None,
                              bins: int = 50) -> list[str]:
    trials = sorted({r["trial"] for r in run.records})
    trial = trials[0] if trial is None else trial
    return [save(fig, out_dir, f"weights_{_slug(name)}_trial{trial}.png")
            for name, fig in weight_figures(run, trial, bins)]


# ----------------------------------------------------------------------------- diagnostics

def diagnostic_names(runs: Union[Run, Sequence[Run]]) -> list[str]:
    """Names of the scalar diagnostics found in the records (histograms and Nones excluded)."""
    names = {name for run in as_runs(runs) for record in run.records
             for name, value in (record.get("diagnostics") or {}).items()
             if isinstance(value, (int, float)) and not isinstance(value, bool)}
    return sorted(names)


def diagnostics_figure(runs: Union[Run, Sequence[Run]], attack: Optional[str] = None,
                       accuracy: str = "final") -> Optional[Figure]:
    """Robust accuracy (default: worst case) vs each scalar diagnostic, a point per level (mean
    over trials) coloured by weights remaining; None without diagnostics or attacks."""
    check_choice("accuracy", accuracy, ACCURACY_FIELDS)
    runs = as_runs(runs)
    names = diagnostic_names(runs)
    available = resolve_attacks(runs, None, accuracy)
    if attack is None and available:
        attack = WORST_CASE if WORST_CASE in available else available[0]
    if attack is not None:
        check_choice("attack", attack, available)
    if not names or attack is None:
        return None
    robust = accuracy_getters(accuracy, [attack])[attack]
    mappable = _weights_colours([remaining_percent([r]) for run in runs for r in run.records])
    fig, axes = _panels(len(names), sharey=True)
    for ax, diagnostic in zip(axes, names):
        value = lambda r, d=diagnostic: (r.get("diagnostics") or {}).get(d)
        for i, (name, _, _, records) in enumerate(series(runs)):
            points = []  # (diagnostic mean, robust accuracy mean, weights remaining %)
            for _, _, level_records in level_groups(records):
                kept = [r for r in level_records if value(r) is not None and robust(r) is not None]
                if kept:
                    points.append((np.mean([value(r) for r in kept]),
                                   100 * np.mean([robust(r) for r in kept]),
                                   remaining_percent(kept)))
            if points:
                x, y, remaining = np.array(points).T
                ax.plot(x, y, color="0.6", lw=0.8, zorder=1)
                ax.scatter(x, y, c=remaining, cmap=mappable.cmap, norm=mappable.norm, zorder=2,
                           marker="os^Dv<>p*h"[i % 10], label=name)
        xs = [c for line in ax.get_lines() for c in line.get_xdata()]
        if xs and min(xs) > 0 and max(xs) / min(xs) > 100:  # e.g. Lipschitz bounds over levels
            ax.set_xscale("log")
        ax.set_xlabel(DIAGNOSTIC_TITLES.get(diagnostic, diagnostic.replace("_", " ")),
                      fontsize="small")
        ax.tick_params(labelleft=True)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{attack_title(attack, attack_settings(runs, attack))} accuracy (%)")
    axes[0].legend(fontsize="small")
    _colourbar(fig, mappable, axes)
    return fig


def plot_diagnostics(runs, out_dir: str, attack: Optional[str] = None,
                     accuracy: str = "final") -> Optional[str]:
    fig = diagnostics_figure(runs, attack, accuracy)
    return None if fig is None else save(fig, out_dir, "diagnostics.png")


def robustness_curves_figure(runs: Union[Run, Sequence[Run]]) -> Optional[Figure]:
    """Robust accuracy vs ε from FMN's minimal norms (``robustness_curves`` in the records), one
    panel per method and FMN attack, a line per level (mean over trials) coloured by weights
    remaining, with AutoAttack's accuracy at its ε (same norm) as a point of the same colour;
    None when no record has a curve."""
    runs = as_runs(runs)
    labels = sorted({label for run in runs for r in run.records
                     for label in (r.get("robustness_curves") or {})})
    if not labels:
        return None
    panels = [(name, records, label) for name, _, _, records in series(runs) for label in labels
              if any(label in (r.get("robustness_curves") or {}) for r in records)]
    mappable = _weights_colours([remaining_percent([r]) for run in runs for r in run.records])
    fig, axes = _panels(len(panels), sharey=True)
    for ax, (name, records, label) in zip(axes, panels):
        for _, _, level_records in level_groups(records):
            kept = [r["robustness_curves"][label] for r in level_records
                    if label in (r.get("robustness_curves") or {})]
            if not kept:
                continue
            colour = mappable.to_rgba(remaining_percent(level_records))
            eps = np.asarray(kept[0]["eps"])
            ax.plot(eps, 100 * np.mean([c["accuracy"] for c in kept], axis=0), color=colour,
                    lw=1.2)
            for attack, settings in (level_records[0].get("attacks") or {}).items():
                if settings.get("name") == "autoattack" and \
                        settings.get("norm") == kept[0].get("norm"):
                    robust = [r["robust_accuracy"].get(attack) for r in level_records]
                    robust = [v for v in robust if v is not None]
                    if robust:
                        ax.scatter([settings["eps"]], [100 * np.mean(robust)], color=colour,
                                   marker="*", s=60, edgecolor="k", lw=0.5, zorder=3)
        title = attack_title(label, attack_settings(runs, label))
        ax.set_title(f"{name}: {title} (★ AutoAttack)", fontsize="small")
        ax.set_xlabel("ε")
        ax.grid(alpha=0.3)
        ax.tick_params(labelleft=True)
    axes[0].set_ylabel("robust accuracy (%)")
    _colourbar(fig, mappable, axes)
    return fig


def plot_robustness_curves(runs, out_dir: str) -> Optional[str]:
    fig = robustness_curves_figure(runs)
    return None if fig is None else save(fig, out_dir, "robustness_curves.png")
