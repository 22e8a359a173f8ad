"""Train one level: chunks of jitted steps, periodic validation, early stopping, checkpoints.

Every ``eval_every`` steps the level measures clean and adversarial loss/accuracy on (a prefix
of) the validation and test sets, keeps the parameters with the lowest validation value of the
early-stopping metric, and every ``checkpoint_every`` steps saves the whole progress. Because
batches and attack keys are pure functions of the step, a level resumed from a checkpoint ends
with exactly the numbers of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Optional

import jax
from tqdm.auto import tqdm

from sparse_robust import checkpoint as checkpoint_lib
from sparse_robust import data as data_lib
from sparse_robust import masks as masks_lib
from sparse_robust import parallel
from sparse_robust import training


@dataclasses.dataclass
class LevelSpec:
    """What one level trains and how it measures; shared, compiled pieces come from the caller."""

    train_loop: Callable          # training.make_train_loop(...)
    eval_batch: Callable          # training.make_eval_fn(model_fn, attack)
    train_images: Any             # device arrays, gathered by index inside the loop
    train_labels: Any
    val: tuple                    # (images, labels) numpy, the prefix used during training
    test: tuple
    batch_size: int
    num_steps: int
    eval_every: int
    eval_batch_size: int
    checkpoint_every: int
    early_stop_value: Callable[[dict], float]  # validation metrics -> value to minimise
    progress: bool = True
    snapshot_step: Optional[int] = None        # also return the params after this many steps
    mesh: Any = None                           # a parallel.make_mesh() mesh, or None: one device


@dataclasses.dataclass
class LevelOutcome:
    state: training.TrainState
    best_params: Any
    best_model_state: Any
    best_step: int
    history: list
    snapshot: Any                 # params at snapshot_step (None if not asked)
    train_seconds: float


def _boundaries(spec: LevelSpec) -> list[int]:
    """Steps at which a chunk ends: every eval_every, the snapshot step, and the last step."""
    points = set(range(spec.eval_every, spec.num_steps, spec.eval_every)) | {spec.num_steps}
    if spec.snapshot_step:
        points.add(spec.snapshot_step)
    return sorted(points)


def train_level(spec: LevelSpec, state: training.TrainState, data_key: jax.Array,
                eval_key: jax.Array, level_dir: str, description: str) -> LevelOutcome:
    """Train ``state`` for ``spec.num_steps`` steps, resuming from ``level_dir`` if possible."""
    checkpointer = checkpoint_lib.ProgressCheckpointer(os.path.join(level_dir, "progress"))
    host = checkpoint_lib.to_host
    progress = {"state": state, "best_params": state.params, "best_model_state": state.model_state,
                "snapshot": state.params}
    history, best_step, best_value, seconds = [], 0, math.inf, 0.0
    restored = checkpointer.restore_latest(progress)
    if restored is not None:
        _, progress, extras = restored
        history, best_step, best_value = extras["history"], extras["best_step"], extras["best_value"]
        seconds = extras["train_seconds"]
    state = progress["state"]
    progress = {k: host(v) for k, v in progress.items() if k != "state"}
    if spec.mesh is not None:
        state = parallel.put(state, parallel.replicated(spec.mesh))
    start = int(state.step)

    bar = tqdm(total=spec.num_steps, initial=start, desc=description, disable=not spec.progress,
               unit="step", dynamic_ncols=True, mininterval=1.0)
    num_train = len(spec.train_labels)
    for end in [b for b in _boundaries(spec) if b > start]:
        begin = int(state.step)
        indices = data_lib.batch_indices(data_key, num_train, spec.batch_size, begin, end - begin)
        if spec.mesh is not None:
            indices = parallel.put(indices, parallel.batch_sharded(spec.mesh, 1))
        tic = time.perf_counter()
        state, train_metrics = spec.train_loop(state, spec.train_images, spec.train_labels, indices)
        train_metrics = {k: float(v) for k, v in train_metrics.items()}  # waits for the chunk
        seconds += time.perf_counter() - tic
        bar.update(end - begin)
        if end == spec.snapshot_step:
            progress["snapshot"] = host(state.params)
        if end % spec.eval_every and end != spec.num_steps:
            continue

        record = {"step": end, "train": train_metrics, "train_seconds": seconds}
        for split, (images, labels) in (("val", spec.val), ("test", spec.test)):
            record[split] = training.evaluate(spec.eval_batch, state.params, state.model_state,
                                              images, labels, jax.random.fold_in(eval_key, end),
                                              spec.eval_batch_size)
        history.append(record)
        value = spec.early_stop_value(record["val"])
        if value < best_value:
            best_value, best_step = value, end
            progress["best_params"] = host(state.params)
            progress["best_model_state"] = host(state.model_state)
        bar.set_postfix_str(_postfix(record), refresh=False)
        _write_history(level_dir, history)
        if end % spec.checkpoint_every == 0 or end == spec.num_steps:
            checkpointer.save(end, {"state": state, **progress},
                              {"history": history, "best_step": best_step, "best_value": best_value,
                               "train_seconds": seconds})
    bar.close()
    checkpointer.close()
    return LevelOutcome(state=state, best_params=progress["best_params"],
                        best_model_state=progress["best_model_state"], best_step=best_step,
                        history=history,
                        snapshot=progress["snapshot"] if spec.snapshot_step else None,
                        train_seconds=seconds)


def _postfix(record: dict) -> str:
    val = record["val"]
    parts = [f"loss {record['train']['loss']:.3f}", f"val acc {val['accuracy']:.3f}"]
    if "adv_accuracy" in val:
        parts.append(f"val adv {val['adv_accuracy']:.3f}")
    return ", ".join(parts)


def _write_history(level_dir: str, history: list) -> None:
    tmp = os.path.join(level_dir, "metrics.jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in history:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, os.path.join(level_dir, "metrics.jsonl"))


def describe(trial: int, level: int, mask) -> str:
    return f"trial {trial} level {level:2d} ({masks_lib.weights_remaining(mask):6.1%} left)"
