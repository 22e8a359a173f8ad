"""Train units: chunks of jitted steps, periodic measurement, early stopping, checkpoints.

Every ``eval_every`` steps a unit measures clean and adversarial loss/accuracy on prefixes of the
validation and test sets, keeps the weights with the lowest validation value of the
early-stopping metric, and every ``checkpoint_every`` steps saves its whole progress. Batches
and attack keys are pure functions of the step, so a unit resumed from a checkpoint ends with
exactly the numbers of an uninterrupted one.

Several units (the trials of one level) can train together: their states are stacked and one
``jax.vmap``-ed loop advances them all, while measurement, early stopping, checkpoints and files
stay per unit, as if each had trained alone (up to float rounding: the stacked matmuls round
differently). A unit whose checkpoint is behind the others' (a kill between two checkpoint
writes) first catches up alone.

A non-finite training loss stops the run with a `DivergedError` naming the unit and the step;
the last good checkpoint is kept and metrics.jsonl stays valid JSON.
"""

from __future__ import annotations

import dataclasses
import math
import time
import typing
from typing import Any, Optional, Sequence

import jax
import numpy as np

from sparse_robust import data as data_lib
from sparse_robust import parallel
from sparse_robust import training
from sparse_robust.runs import store
from sparse_robust.runs.errors import DivergedError
from sparse_robust.runs.layout import UnitFiles

if typing.TYPE_CHECKING:
    from sparse_robust.runs.context import Context


@dataclasses.dataclass
class FitJob:
    """One unit to train: its fresh state (a checkpoint in ``files`` supersedes it) and keys."""
    state: training.TrainState
    data_key: jax.Array          # batches: data.batch_indices(data_key, ...)
    eval_key: jax.Array          # attack keys of the periodic measurements
    files: UnitFiles
    label: str                   # e.g. "trial 0 level 3", for progress and errors
    snapshot_step: Optional[int] = None   # also keep the params after this many steps


@dataclasses.dataclass
class FitOutcome:
    state: training.TrainState   # final, on the host
    best_params: Any
    best_model_state: Any
    best_step: int
    history: list
    snapshot: Any                # params at snapshot_step (None if not asked)
    train_seconds: float


_CURVE_NAMES = {"clean_accuracy": "accuracy", "clean_loss": "loss"}


def boundaries(ctx: Context, snapshot_steps=()) -> list[int]:
    """Steps at which a chunk ends: every eval_every, the snapshot steps, and the last step."""
    schedule = ctx.schedule
    points = set(range(schedule.eval_every, schedule.num_steps, schedule.eval_every))
    points |= {schedule.num_steps} | {s for s in snapshot_steps if s}
    return sorted(points)


class _Unit:
    """A job's bookkeeping: its state, best weights, history, checkpointer."""

    def __init__(self, ctx: Context, job: FitJob):
        self.job = job
        self.checkpointer = store.ProgressCheckpointer(job.files.progress)
        state = job.state
        self.kept = {"best_params": state.params, "best_model_state": state.model_state,
                     "snapshot": state.params}
        self.history, self.best_step, self.best_value, self.seconds = [], 0, math.inf, 0.0
        restored = self.checkpointer.restore_latest({"state": state, **self.kept})
        if restored is not None:
            _, tree, extras = restored
            state = tree.pop("state")
            self.kept = tree
            self.history, self.best_step = extras["history"], extras["best_step"]
            self.best_value = math.inf if extras["best_value"] is None else extras["best_value"]
            self.seconds = extras["train_seconds"]
        self.kept = store.to_host(self.kept)
        self.state = parallel.put(state, parallel.replicated(ctx.mesh))

    @property
    def step(self) -> int:
        return int(self.state.step)

    def indices(self, ctx: Context, begin: int, end: int) -> np.ndarray:
        return data_lib.batch_indices(self.job.data_key, ctx.dataset.num_train,
                                      ctx.schedule.batch_size, begin, end - begin)

    def after_chunk(self, ctx: Context, state, begin: int, end: int, metrics: dict,
                    seconds: float) -> Optional[str]:
        """Checks, measures, keeps the best, checkpoints; returns the progress note."""
        losses = np.asarray(metrics["loss"], np.float64)
        bad = ~np.isfinite(losses)
        if bad.any():
            step = begin + int(np.argmax(bad)) + 1
            last = self.checkpointer.latest_step()
            kept = ("no checkpoint was written yet" if last is None else
                    f"the last good checkpoint (step {last}) is kept in {self.job.files.progress}")
            raise DivergedError(
                f"training diverged in {self.job.label}: the loss is {losses[bad][0]} at step "
                f"{step}; {kept}. Lower config.train.learning_rate (or check momentum and weight "
                "decay), then run again with --overwrite.")
        self.state = state
        self.seconds += seconds
        if end == self.job.snapshot_step:
            self.kept["snapshot"] = store.to_host(state.params)
        schedule = ctx.schedule
        if end % schedule.eval_every and end != schedule.num_steps:
            return None
        record = {"step": end, "train": {k: float(np.mean(v)) for k, v in metrics.items()},
                  "train_seconds": self.seconds}
        n = ctx.eval.num_examples or None
        dataset = ctx.dataset
        attacks = {"adv": ctx.eval.attack} if ctx.eval.attack is not None else {}
        for split, images, labels in (("val", dataset.val_images[:n], dataset.val_labels[:n]),
                                      ("test", dataset.test_images[:n], dataset.test_labels[:n])):
            measured = ctx.evaluator.evaluate(state.params, state.model_state, images, labels,
                                              attacks, jax.random.fold_in(self.job.eval_key, end))
            measured.pop("worst_case_accuracy", None)
            # Learning-curve records name the clean numbers as the train metrics do.
            record[split] = {_CURVE_NAMES.get(k, k): v for k, v in measured.items()}
        self.history.append(record)
        value = ctx.early_stop_value(record["val"])
        if value < self.best_value:
            self.best_value, self.best_step = value, end
            self.kept["best_params"] = store.to_host(state.params)
            self.kept["best_model_state"] = store.to_host(state.model_state)
        store.write_jsonl(self.job.files.metrics, self.history)
        if end % schedule.checkpoint_every == 0 or end == schedule.num_steps:
            self.checkpointer.save(end, {"state": state, **self.kept},
                                   {"history": self.history, "best_step": self.best_step,
                                    "best_value": self.best_value,
                                    "train_seconds": self.seconds})
        return _note(record)

    def outcome(self, ctx: Context) -> FitOutcome:
        self.checkpointer.close()
        return FitOutcome(state=store.to_host(self.state), best_params=self.kept["best_params"],
                          best_model_state=self.kept["best_model_state"],
                          best_step=self.best_step, history=self.history,
                          snapshot=self.kept["snapshot"] if self.job.snapshot_step else None,
                          train_seconds=self.seconds)


def _note(record: dict) -> str:
    val = record["val"]
    parts = [f"loss {record['train']['loss']:.3f}", f"val acc {val['accuracy']:.3f}"]
    if "adv_accuracy" in val:
        parts.append(f"val adv {val['adv_accuracy']:.3f}")
    return ", ".join(parts)


def _advance(ctx: Context, units: Sequence[_Unit], end: int, bar) -> None:
    """Train ``units`` (all at the same step) to ``end``: alone, or stacked under vmap."""
    begin = units[0].step
    images, labels = ctx.train_data
    batch_axis = 1 if len(units) == 1 else 2  # of indices: [trials,] steps, batch
    indices = np.stack([u.indices(ctx, begin, end) for u in units])
    indices = parallel.put(indices if len(units) > 1 else indices[0],
                           parallel.batch_sharded(ctx.mesh, batch_axis))
    state = units[0].state if len(units) == 1 else training.stack_states([u.state for u in units])
    tic = time.perf_counter()
    state, metrics = ctx.train_loop(len(units))(state, images, labels, indices)
    metrics = jax.device_get(metrics)  # waits for the chunk
    seconds = time.perf_counter() - tic
    states = [state] if len(units) == 1 else training.unstack_states(state, len(units))
    notes = []
    for i, (unit, unit_state) in enumerate(zip(units, states)):
        unit_metrics = metrics if len(units) == 1 else {k: v[i] for k, v in metrics.items()}
        notes.append(unit.after_chunk(ctx, unit_state, begin, end, unit_metrics, seconds))
    bar.advance(end - begin, (end - begin) * len(units))
    if notes[0]:
        bar.note(notes[0] if len(units) == 1 else f"{notes[0]} (first of {len(units)})")


def fit(ctx: Context, jobs: Sequence[FitJob]) -> list[FitOutcome]:
    """Train every job to ``ctx.schedule.num_steps`` (resuming where each left off); jobs train
    together under vmap when there are several."""
    units = [_Unit(ctx, job) for job in jobs]
    points = boundaries(ctx, [job.snapshot_step for job in jobs])
    label = jobs[0].label if len(jobs) == 1 else f"{jobs[0].label} (+{len(jobs) - 1} trials)"
    with ctx.progress.unit(label, ctx.schedule.num_steps, min(u.step for u in units)) as bar:
        top = max(u.step for u in units)
        for unit in units:  # catch up alone to the most advanced one
            for end in [p for p in points if unit.step < p <= top]:
                _advance(ctx, [unit], end, bar)
        for end in [p for p in points if p > top]:
            _advance(ctx, units, end, bar)
    return [unit.outcome(ctx) for unit in units]
