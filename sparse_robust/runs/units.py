"""A unit is one network the run trains and evaluates: a level of the pruning chain, or a branch.

`train_units` trains new units (grouped by ``ctx.trials_at_once``, see ``fit``), then finishes
each: final weights saved, test accuracies of the final and the early-stopping weights under every
final attack, sanity checks, diagnostics, and its record in result.json and summary.json.
`load_trained` gives a finished unit back from its files, as a resumed run sees it.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, Optional, Sequence

import jax
import numpy as np

from sparse_robust import diagnostics as diagnostics_lib
from sparse_robust import evaluation
from sparse_robust import flops
from sparse_robust.pruning import compact as compact_lib
from sparse_robust.pruning import inheritance
from sparse_robust import keys as keys_lib
from sparse_robust import masks as masks_lib
from sparse_robust import training
from sparse_robust.runs import fit as fit_lib
from sparse_robust.runs import store
from sparse_robust.runs.errors import CorruptFileError
from sparse_robust.runs.layout import Layout, UnitFiles

if typing.TYPE_CHECKING:
    from sparse_robust.runs.context import Context


@dataclasses.dataclass(frozen=True)
class UnitKeys:
    """The keys of one unit, derived from the trial's key by name (see ``keys.derive``)."""
    train: jax.Array        # the train state's key (each step folds in its number)
    data: jax.Array         # the batch order: shared by every unit of a trial
    eval: jax.Array         # periodic measurements
    final: jax.Array        # final evaluation, sanity checks, diagnostics

    @classmethod
    def of(cls, ctx: Context, trial: int, level: int, branch: Optional[str] = None) -> "UnitKeys":
        base = ctx.trial_key(trial)
        unit = ("level", level) if branch is None else ("level", level, "branch", branch)
        return cls(train=keys_lib.derive(base, "train", *unit),
                   data=keys_lib.derive(base, "data"),
                   eval=keys_lib.derive(base, "eval", *unit),
                   final=keys_lib.derive(base, "final_eval", *unit))


@dataclasses.dataclass
class Unit:
    """A unit to train: where it starts, under which mask, with which context and keys."""
    trial: int
    level: int
    branch: Optional[str]
    files: UnitFiles
    start: tuple                        # (params, model_state)
    mask: Any
    keys: UnitKeys
    ctx: Context
    trainable: Any = None               # inheritance: train these entries, keep the others
    snapshot_step: Optional[int] = None
    extra: dict = dataclasses.field(default_factory=dict)   # more record fields

    @property
    def label(self) -> str:
        where = f"trial {self.trial} level {self.level}"
        return where if self.branch is None else f"{where} {self.branch}"


@dataclasses.dataclass
class Trained:
    """A finished unit: its final weights, mask and record (and θk when it was asked for)."""
    params: Any
    model_state: Any
    mask: Any
    record: dict
    snapshot: Any = None


def finished(files: UnitFiles) -> bool:
    return os.path.exists(files.result)


def load_trained(ctx: Context, files: UnitFiles) -> Trained:
    params, model_state = store.load_tree(files.final_variables, ctx.abstract_variables())
    mask = store.load_mask(files.mask, params)
    return Trained(params, model_state, mask, store.read_json(files.result))


def _attack_settings(attack) -> dict:
    """How an attack measured: its name, ε, steps, label source and the rest of its settings."""
    return {"name": attack.name, "eps": attack.eps, "step_size": attack.step_size,
            "label_source": attack.label_source, **dict(attack.options)}


def accuracies(ctx: Context, params, model_state, key: jax.Array,
               evaluator: Optional[evaluation.Evaluator] = None) -> tuple[dict, dict]:
    """({"clean": ..., <label>: ..., "worst_case": ...}, {<staged label>: {stage: accuracy}})
    on the final evaluation's test images, by `evaluator` (default: the context's)."""
    n = ctx.eval.final_examples or None
    measured = (evaluator or ctx.evaluator).evaluate(
        params, model_state, ctx.dataset.test_images[:n], ctx.dataset.test_labels[:n],
        ctx.eval.attacks, key, progress=ctx.progress.enabled,
        adversarial_loss=False)  # Robust accuracy only: skip the images wrong clean.
    out = {"clean": measured["clean_accuracy"]}
    out.update({label: measured[f"{label}_accuracy"] for label in ctx.eval.attacks})
    if ctx.eval.attacks:
        out[evaluation.WORST_CASE] = measured[f"{evaluation.WORST_CASE}_accuracy"]
    stages = {label: {key_[len(label) + 1:-len("_accuracy")]: value
                      for key_, value in measured.items() if key_.startswith(f"{label}/")}
              for label in ctx.eval.attacks}
    return out, {label: values for label, values in stages.items() if values}


def _autoattacks_of_norm(ctx: Context, norm: str) -> dict:
    return {label: attack for label, attack in ctx.eval.attacks.items()
            if attack.name == "autoattack" and dict(attack.options)["norm"] == norm}


def robustness_curves(ctx: Context, params, model_state) -> dict:
    """{label: {"eps": grid, "accuracy": robust accuracy at each ε, "median_norm": ...}} for the
    FMN attacks among the final evaluation's, from one minimal-norm run on its test images. The
    grid: 31 points from 0 to 3 × the attack's ε, plus the ε of every AutoAttack of its norm."""
    n = ctx.eval.final_examples or None
    curves = {}
    for label, attack in ctx.eval.attacks.items():
        if attack.name != "fmn":
            continue
        norms = ctx.evaluator.minimal_norms(params, model_state, ctx.dataset.test_images[:n],
                                            ctx.dataset.test_labels[:n], attack)
        norm = dict(attack.options)["norm"]
        extra = [a.eps for a in _autoattacks_of_norm(ctx, norm).values()]
        grid = np.unique(np.concatenate([np.linspace(0.0, 3.0 * attack.eps, 31), extra]))
        curves[label] = {"eps": grid.tolist(), "norm": norm,
                         "accuracy": evaluation.robustness_curve(norms, grid).tolist(),
                         "median_norm": evaluation.median_norm(norms)}
    return curves


def _fmn_checks(ctx: Context, curves: dict, final: dict) -> dict:
    """FMN's curve below AutoAttack at AutoAttack's ε (same norm): points AutoAttack missed."""
    checks = {}
    for fmn_label, curve in curves.items():
        for label, attack in _autoattacks_of_norm(ctx, curve["norm"]).items():
            at_eps = curve["accuracy"][curve["eps"].index(attack.eps)]
            check = evaluation.fmn_check(at_eps, final[label],
                                         ctx.eval.final_examples or ctx.dataset.num_test)
            checks[f"{fmn_label}_{check.name}"] = {"passed": bool(check.passed),
                                                   "detail": check.detail}
    return checks


def _sanity_checks(ctx: Context, params, model_state, key) -> Optional[dict]:
    n = ctx.eval.sanity_examples
    if not n or ctx.eval.attack is None:
        return None
    options = dict(ctx.eval.attack.options)
    checks = evaluation.run_sanity_checks(
        ctx.evaluator, params, model_state, ctx.dataset.test_images[:n],
        ctx.dataset.test_labels[:n], key, eps=ctx.eval.attack.eps,
        norm=options.get("norm", "linf"))
    return {"num_examples": n,
            **{c.name: {"passed": bool(c.passed), "detail": c.detail} for c in checks}}


def _diagnostics(ctx: Context, params, model_state, mask, key) -> Optional[dict]:
    n = ctx.eval.diagnostics_examples
    if not n:
        return None
    images, labels = ctx.dataset.test_images[:n], ctx.dataset.test_labels[:n]
    attack = ctx.eval.attack
    adversarial = None if attack is None else ctx.evaluator.adversarial_examples(
        params, model_state, images, labels, attack, key)
    norm = "linf" if attack is None else dict(attack.options).get("norm", "linf")
    return diagnostics_lib.compute_diagnostics(
        ctx.model, {"params": params, **model_state}, mask, jax.numpy.asarray(images),
        jax.numpy.asarray(labels), key,
        adversarial_images=None if adversarial is None else jax.numpy.asarray(adversarial),
        norm=norm, num_iters=ctx.eval.diagnostics_iters)


def record_of(unit: Unit, outcome: fit_lib.FitOutcome, final: dict, best: dict, **more) -> dict:
    """The summary.json record of a finished unit (DESIGN.md's fields first)."""
    robust = lambda acc: {k: v for k, v in acc.items() if k != "clean"}
    steps = int(outcome.state.step)
    record = {"trial": unit.trial, "level": unit.level}
    if unit.branch is not None:
        record["branch"] = unit.branch
    record.update({
        "weights_remaining": masks_lib.weights_remaining(unit.mask),
        "clean_accuracy": final["clean"],
        "robust_accuracy": robust(final),
        "early_stop_step": outcome.best_step,
        "early_stop_clean_accuracy": best["clean"],
        "early_stop_robust_accuracy": robust(best),
        "attacks": {label: _attack_settings(a) for label, a in unit.ctx.eval.attacks.items()},
        "test_examples": unit.ctx.eval.final_examples or unit.ctx.dataset.num_test,
        "layer_weights_remaining": masks_lib.layer_weights_remaining(unit.mask),
        "steps": steps,
        "train_seconds": outcome.train_seconds,
        "steps_per_second": steps / max(outcome.train_seconds, 1e-9),
        **unit.extra, **more})
    return record


def _finish(layout: Layout, unit: Unit, outcome: fit_lib.FitOutcome) -> Trained:
    ctx = unit.ctx
    params, model_state = outcome.state.params, outcome.state.model_state
    store.save_tree_if_missing(unit.files.final_variables, (params, model_state))
    final_key = unit.keys.final
    evaluator = ctx.ticket_evaluator(unit.mask)  # sparse execution where it pays
    final, stages = accuracies(ctx, params, model_state, final_key, evaluator)
    best = final if outcome.best_step == int(outcome.state.step) else accuracies(
        ctx, outcome.best_params, outcome.best_model_state, final_key, evaluator)[0]
    checks = _sanity_checks(ctx, params, model_state, keys_lib.derive(final_key, "sanity"))
    for label, by_stage in stages.items():  # AutoAttack's own gradient-masking check
        check = evaluation.square_check(by_stage, ctx.eval.final_examples or ctx.dataset.num_test)
        checks = dict(checks or {}, **{f"{label}_{check.name}": {"passed": bool(check.passed),
                                                                 "detail": check.detail}})
    curves = robustness_curves(ctx, params, model_state)
    if curves:
        checks = dict(checks or {}, **_fmn_checks(ctx, curves, final))
    extra = {"attack_stages": stages} if stages else {}
    if curves:
        extra["robustness_curves"] = curves
    record = record_of(
        unit, outcome, final, best, sanity_checks=checks, **extra,
        forward_flops=forward_flops(ctx, params, model_state, unit.mask),
        diagnostics=_diagnostics(ctx, params, model_state, unit.mask,
                                 keys_lib.derive(final_key, "diagnostics")))
    write_record(layout, unit.files, record)
    return Trained(params, model_state, unit.mask, record, outcome.snapshot)


def forward_flops(ctx: Context, params, model_state, mask) -> int:
    """Matmul and convolution FLOPs of one forward pass on one image of the unit's network, with
    its dead channels removed where `pruning.compact` applies (the feed-forward models), counted
    on the jaxpr of XLA convolutions (a direct convolution's work)."""
    model, model_state = ctx.model, dict(model_state or {})
    if "conv_impl" in getattr(model, "__dataclass_fields__", {}):
        model = model.clone(conv_impl="xla")
    if compact_lib.supports(model):
        small = compact_lib.compact(model, params, mask, model_state.get("batch_stats"))
        model, params = small.model, small.params
        if small.batch_stats is not None:
            model_state["batch_stats"] = small.batch_stats
    return flops.forward_flops(model, {"params": params, **model_state},
                               ctx.dataset.train_images[:1])


def _job(unit: Unit) -> fit_lib.FitJob:
    ctx = unit.ctx
    params, model_state = unit.start
    if unit.trainable is None:
        state = training.create_train_state(params, model_state, ctx.optimizer, unit.mask,
                                            unit.keys.train)
    else:
        state = inheritance.create_train_state(params, model_state, ctx.optimizer,
                                               unit.trainable, unit.keys.train)
    return fit_lib.FitJob(state=state, data_key=unit.keys.data, eval_key=unit.keys.eval,
                          files=unit.files, label=unit.label, snapshot_step=unit.snapshot_step)


def train_units(layout: Layout, units: Sequence[Unit]) -> list[Trained]:
    """Train and finish ``units`` (none finished yet), ``trials_at_once`` of them together when
    they share a context."""
    out = []
    for unit in units:
        store.save_mask(unit.files.mask, unit.mask)
        store.save_tree_if_missing(unit.files.start_params, unit.start[0])
    i = 0
    while i < len(units):
        ctx = units[i].ctx
        group = [units[i]]
        while (len(group) < ctx.trials_at_once and i + len(group) < len(units)
               and units[i + len(group)].ctx is ctx):
            group.append(units[i + len(group)])
        outcomes = fit_lib.fit(ctx, [_job(u) for u in group])
        out += [_finish(layout, u, o) for u, o in zip(group, outcomes)]
        i += len(group)
    return out


# ------------------------------------------------------------------------------ records


def _run_id(layout: Layout) -> Optional[str]:
    return store.read_json(layout.marker)["run_id"] if os.path.exists(layout.marker) else None


def records(layout: Layout) -> list[dict]:
    """Every finished unit's record, sorted by (trial, level, branch); each must belong to this
    run (its run id), so results of two configs can never mix in one summary."""
    run_id = _run_id(layout)
    out = []
    for *_, files in layout.units():
        if not finished(files):
            continue
        record = store.read_json(files.result)
        if run_id is not None and record.get("run_id") != run_id:
            raise CorruptFileError(f"{files.result} belongs to another run (run id "
                                   f"{record.get('run_id')!r}, this workdir's is {run_id!r}); "
                                   "move it away.")
        out.append(record)
    return sorted(out, key=lambda r: (r["trial"], r["level"], r.get("branch") or ""))


def write_record(layout: Layout, files: UnitFiles, record: dict) -> None:
    """result.json of a unit (stamped with the run id), then summary.json anew."""
    run_id = _run_id(layout)
    if run_id is not None:
        record["run_id"] = run_id
    store.write_json(files.result, record)
    store.write_json(layout.summary, records(layout))

