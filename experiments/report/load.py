"""Runs as the report sees them: records grouped into series and levels, attacks described by
their settings, files found through ``sparse_robust.runs.layout``.

A *series* is what one line or row shows: a run's pruning chain (the "lottery" ticket of every
level) or one of its branches. Standard deviations are sample ones (ddof=1), none for one trial.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional, Sequence, Union

import numpy as np

from sparse_robust.evaluation import WORST_CASE
from sparse_robust.runs import store
from sparse_robust.runs.layout import Layout, UnitFiles

# Which accuracies a table or plot shows: the final weights', or those kept by early stopping.
ACCURACY_FIELDS = {"final": ("clean_accuracy", "robust_accuracy"),
                   "early_stop": ("early_stop_clean_accuracy", "early_stop_robust_accuracy")}
# Row order of the methods: the dense network, the chain's tickets, then the branches.
METHOD_ORDER = ("dense", "lottery", "inherit", "reinit", "random", "hydra", "harp", "radmm",
                "inverse_inheritance", "scratch_large")
METHOD_TITLES = {"dense": "dense", "lottery": "lottery ticket", "inherit": "inherit (one-shot)",
                 "reinit": "same mask, random reinit", "random": "random mask",
                 "hydra": "HYDRA", "harp": "HARP", "radmm": "RADMM",
                 "inverse_inheritance": "inverse inheritance",
                 "scratch_large": "large, from scratch"}
_ATTACK_NAMES = {"fgsm": "FGSM", "pgd": "PGD", "apgd": "APGD", "apgd_t": "APGD-T",
                 "fab_t": "FAB-T", "square": "Square", "fmn": "FMN",
                 "autoattack": "AutoAttack"}


@dataclasses.dataclass(frozen=True)
class Run:
    """One workdir: its summary records, its resolved config and the label it is shown under."""

    workdir: str
    label: str
    config: dict
    records: list

    @property
    def layout(self) -> Layout:
        return Layout(self.workdir)


def _dir_name(path: str) -> str:
    return os.path.basename(os.path.normpath(os.path.abspath(path)))


def load_run(workdir: str, label: Optional[str] = None) -> Run:
    """Read WORKDIR/summary.json and config.json; label defaults to the reset strategy of a plain
    chain, or the directory name of a run with branches."""
    layout = Layout(workdir)
    records = store.read_json(layout.summary) if os.path.exists(layout.summary) else None
    if not records:
        raise FileNotFoundError(f"no finished level yet in {workdir} ({layout.summary} is missing "
                                "or empty); run the experiment first.")
    config = store.read_json(layout.config) if os.path.exists(layout.config) else {}
    if label is None:
        branches = config.get("branches", {}).get("names")
        strategy = config.get("prune", {}).get("strategy")
        label = (strategy if not branches else None) or _dir_name(workdir)
    return Run(workdir=os.path.abspath(workdir), label=label, config=config, records=records)


def load_runs(workdirs: Union[str, Sequence[str]]) -> list[Run]:
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


def as_runs(runs: Union[Run, Sequence[Run]]) -> list[Run]:
    runs = [runs] if isinstance(runs, Run) else list(runs)
    if not runs:
        raise ValueError("runs=[] is empty: give at least one Run (see load_run).")
    return runs


# --------------------------------------------------------------------------- series and levels

def method(record: dict) -> str:
    """The series of a record: "" for the pruning chain, else its branch."""
    return record.get("branch") or ""


def table_method(record: dict) -> str:
    """A record's row in a methods comparison: dense (chain level 0), lottery, or its branch."""
    return method(record) or ("dense" if record["level"] == 0 else "lottery")


def method_rank(name: str) -> tuple:
    return (METHOD_ORDER.index(name) if name in METHOD_ORDER else len(METHOD_ORDER), name)


def series(runs: Sequence[Run]) -> list[tuple[str, Run, str, list[dict]]]:
    """(name, run, method, records) of each run's chain and branches. A plain chain is named
    after its run; with branches, each is named after its method (and its run when several)."""
    out = []
    for run in runs:
        methods = sorted({method(r) for r in run.records}, key=lambda m: method_rank(m or "lottery"))
        for m in methods:
            if len(methods) == 1:
                name = run.label
            else:
                title = METHOD_TITLES.get(m or "lottery", m)
                name = title if len(runs) == 1 else f"{run.label}: {title}"
            out.append((name, run, m, [r for r in run.records if method(r) == m]))
    return out


def level_groups(records: Sequence[dict]) -> list[tuple[str, int, list[dict]]]:
    """(method, level, records) sorted by method then level."""
    groups = {}
    for record in records:
        groups.setdefault((method(record), record["level"]), []).append(record)
    return [(m, level, rs) for (m, level), rs in sorted(groups.items())]


def remaining_percent(records: Sequence[dict]) -> float:
    """Weights remaining (%) of a level's records: of the inherited network for inverse
    inheritance (its large network is dense), of the unit's mask otherwise."""
    return 100 * float(np.mean([r.get("source_weights_remaining", r["weights_remaining"])
                                for r in records]))


def mean_std(values) -> tuple[float, Optional[float]]:
    """Mean and sample std (ddof=1) of the values; std is None for a single value."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), (float(values.std(ddof=1)) if values.size > 1 else None)


def num_trials(runs: Sequence[Run]) -> int:
    return max(len({r["trial"] for r in run.records}) for run in runs)


# --------------------------------------------------------------------------- attacks

def attack_order(runs: Sequence[Run], accuracy: str = "final") -> list[str]:
    """The attack labels of the records, in the order of each run's config.eval.attacks (the
    paper's order: the paper's attacks first, then the stronger evaluators), worst case last."""
    robust_field = ACCURACY_FIELDS[accuracy][1]
    found = []
    for run in runs:
        configured = [a.strip() for a in run.config.get("eval", {}).get("attacks", "").split(",")
                      if a.strip()]
        for label in configured + [a for r in run.records for a in (r.get(robust_field) or {})]:
            if label not in found:
                found.append(label)
    return [a for a in found if a != WORST_CASE] + [a for a in found if a == WORST_CASE]


def attack_settings(runs: Sequence[Run], label: str) -> Optional[dict]:
    """The settings an attack label was measured with (from the records, else the config)."""
    for run in runs:
        for record in run.records:
            if label in record.get("attacks", {}):
                return record["attacks"][label]
        if label in run.config.get("attacks", {}):
            return run.config["attacks"][label]
    return None


def attack_title(label: str, settings: Optional[dict]) -> str:
    """"PGD-10 ε=0.3 (pred. labels)" from an attack's settings: how the number was measured."""
    if label == WORST_CASE:
        return "worst case"
    if not settings:
        return label
    name = _ATTACK_NAMES.get(settings.get("name"), settings.get("name", label))
    if settings.get("name") == "apgd":
        name = "APGD-T" if settings.get("targeted") else f"APGD-{settings.get('loss', 'ce').upper()}"
    elif settings.get("name") == "pgd" and settings.get("loss", "ce") != "ce":
        name = f"PGD-{settings['loss'].upper()}"
    steps = settings.get("num_steps")
    title = f"{name}-{steps}" if steps and settings.get("name") not in ("fgsm", "autoattack") else name
    title += f" {'ε₂' if settings.get('norm') == 'l2' else 'ε'}={settings.get('eps', 0):g}"
    notes = []
    if settings.get("name") == "autoattack":  # say so when it is not the standard version
        notes += [f"{settings[field]} {what}" for field, what, standard in
                  (("num_steps", "steps", 100), ("n_target_classes", "targets", 9),
                   ("num_queries", "queries", 5000))
                  if settings.get(field, standard) != standard]
    if settings.get("restarts", 1) > 1:
        notes.append(f"{settings['restarts']} restarts")
    if settings.get("label_source") == "predicted":
        notes.append("pred. labels")
    return title + (f" ({', '.join(notes)})" if notes else "")


def accuracy_getters(accuracy: str, attacks: Sequence[str]) -> dict[str, Callable]:
    """{column: record -> accuracy or None} for "clean" and each attack label."""
    clean_field, robust_field = ACCURACY_FIELDS[accuracy]
    getters = {"clean": lambda r: r.get(clean_field)}
    for attack in attacks:
        getters[attack] = lambda r, a=attack: (r.get(robust_field) or {}).get(a)
    return getters


def resolve_attacks(runs: Sequence[Run], attacks, accuracy: str) -> list[str]:
    """``attacks`` checked against the records' labels, or all of them in the paper's order."""
    found = attack_order(runs, accuracy)
    if attacks is None:
        return found
    if isinstance(attacks, str):
        attacks = [attacks]
    unknown = [a for a in attacks if a not in found]
    if unknown:
        raise ValueError(f"attacks={list(attacks)!r} names {unknown}, absent from the records; "
                         f"allowed values: {found}.")
    return list(attacks)


def periodic_attack_title(run: Run) -> Optional[str]:
    """How the learning curves' adversarial accuracy was measured."""
    label = run.config.get("eval", {}).get("attack")
    if not label:
        return None
    return attack_title(label, run.config.get("attacks", {}).get(label))


# --------------------------------------------------------------------------- files

def unit_files(run: Run, record: dict) -> UnitFiles:
    """The files of a record's unit."""
    return run.layout.unit(record["trial"], record["level"], record.get("branch"))
