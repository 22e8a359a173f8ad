"""Attacks made of passes, run on the points still robust only.

APGD with R restarts, APGD-T (T targets × R restarts, target outer) and FAB-T (T targets) are
sequences of independent passes whose results are combined per example. The reference
implementation attacks, in each pass, only the points that no earlier pass broke; run in one
program with static shapes, every pass would run on every point (up to T·R times the work on a
batch most of whose points break at the first target).

`run_passes` is the host-side loop: before each pass it gathers the rows still robust and attacks
them in chunks of fixed bucket sizes (`pass_chunk_sizes`), so one compiled program per
bucket serves every pass (the pass index is a traced argument). A pass's random start is drawn
for the whole batch as the one-program attack draws it (`start_of`) and then gathered, so a
row's start, and therefore its result, is the one-program attack's.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparse_robust.attacks.apgd import apgd_pass, pass_start
from sparse_robust.attacks.autoattack import chunk_sizes
from sparse_robust.attacks.fab import fab_pass
from sparse_robust.attacks.parts import LogitsFn

# (x [b], y [b], start [b] or None, pass index) -> still correct [b] (a bucket-sized chunk).
PassFn = Callable[[np.ndarray, np.ndarray, Optional[np.ndarray], int], np.ndarray]
# pass index -> the starts of every row of the batch, or None for a pass without random start.
StartFn = Callable[[int], Optional[np.ndarray]]


def num_passes(attack) -> int:
    """How many passes `attack` (an `Attack`) is made of: restarts of APGD, targets × restarts
    of APGD-T, targets of FAB-T; 1 for any other attack (nothing to compact between)."""
    options = dict(attack.options)
    if attack.name == "apgd":
        return options["restarts"]
    if attack.name == "apgd_t":
        return options["n_target_classes"] * options["restarts"]
    if attack.name == "fab_t":
        return options["n_target_classes"]
    return 1


def _apgd_options(attack):
    options = dict(attack.options)
    targeted = attack.name == "apgd_t"
    return dict(eps=attack.eps, num_steps=options["num_steps"], norm=options["norm"],
                loss="dlr" if targeted else options["loss"], targeted=targeted,
                n_target_classes=options.get("n_target_classes", 1),
                restarts=options["restarts"], rho=options["rho"],
                clip_min=options["clip_min"], clip_max=options["clip_max"])


def start_of(attack, key, x, index):
    """The random start of pass `index` for every row of batch x (None for FAB-T): the start the
    one-program attack draws from `key` on the same batch."""
    if attack.name == "fab_t":
        return None
    options = _apgd_options(attack)
    return pass_start(key, x, index, eps=options["eps"], norm=options["norm"],
                      restarts=options["restarts"], targeted=options["targeted"],
                      clip_min=options["clip_min"], clip_max=options["clip_max"])


def adversarial_of_pass(attack, logits_fn: LogitsFn, x, y, start, index):
    """The adversarial point of pass `index` of `attack` on rows x from `start`."""
    if attack.name == "fab_t":
        options = dict(attack.options)
        return fab_pass(logits_fn, x, y, index, eps=attack.eps, **options)
    return apgd_pass(logits_fn, x, y, start, index, **_apgd_options(attack))


def pass_chunk_sizes(count: int, buckets: Sequence[int]) -> list[tuple[int, int]]:
    """(bucket size, real rows) of the chunks of one pass on `count` rows: a single chunk of the
    smallest bucket that holds them when it pads at most an eighth of them, else
    `autoattack.chunk_sizes`. A pass's rows shrink by a few at a time, so its chunks mostly keep
    the size of the stage's chunk, whose program is compiled already: compiling a program costs
    more than running the whole pass on a small batch (measured, benchmarks/README.md), and a
    row's result does not depend on the chunk it is in."""
    fitting = [b for b in buckets if b >= count]
    if fitting and min(fitting) - count <= count // 8:
        return [(min(fitting), count)]
    return chunk_sizes(count, buckets)


def run_passes(pass_fn: PassFn, start_fn: StartFn, x, y, *, passes: int,
               buckets: Sequence[int]) -> np.ndarray:
    """Runs `passes` passes on batch (x, y), each on the rows every earlier pass left correct,
    and returns bool [B]: correct after every pass.

    Args:
      pass_fn: ``pass_fn(x, y, start, index) -> still correct`` on a chunk of a bucket size;
        padding rows repeat the chunk's first real row.
      start_fn: ``start_fn(index)``: the starts of pass `index` for all B rows (or None).
      buckets: the stage's bucket sizes, split by `pass_chunk_sizes`; those above B are not used.
    """
    x, y = np.asarray(x), np.asarray(y)
    robust = np.ones(len(x), bool)
    usable = [b for b in buckets if b <= len(x)] or [len(x)]
    for index in range(passes):
        rows = np.flatnonzero(robust)
        if not len(rows):
            break
        starts = start_fn(index)
        done = 0
        for size, real in pass_chunk_sizes(len(rows), usable):
            chunk = rows[done:done + real]
            done += real
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], size - real)])
            still = np.asarray(pass_fn(x[chunk], y[chunk],
                                       None if starts is None else np.asarray(starts)[chunk],
                                       index))
            robust[chunk[:real]] = still[:real].astype(bool)
    return robust


def compacted(attack, logits_fn: LogitsFn, x, y, key, *,
              buckets: Optional[Sequence[int]] = None,
              on_pass: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
    """`attack` on batch (x, y) pass by pass, each pass on the rows still correct: bool [B],
    correct after every pass; row by row ``argmax(logits_fn(attack(logits_fn, x, y, key))) == y``.

    One jitted program per chunk size serves every pass (`evaluation.Evaluator` does the same on
    a mesh). `buckets` defaults to B and its halvings down to a sixteenth;
    ``on_pass(index, rows)`` is told the rows each pass's program receives.
    """
    x, y = np.asarray(x), np.asarray(y)
    if buckets is None:
        buckets = sorted({max(1, len(x) >> k) for k in range(5)})
    starts = _start_program(attack)
    adversarial = _pass_program(attack, logits_fn)

    def pass_fn(xs, ys, start, index):
        if on_pass is not None:
            on_pass(index, len(xs))
        return adversarial(xs, ys, xs if start is None else start, index)

    return run_passes(pass_fn, lambda index: starts(key, x, index), x, y,
                      passes=num_passes(attack), buckets=buckets)


@functools.lru_cache(maxsize=64)  # One program per attack (and model): warm calls reuse it.
def _start_program(attack):
    return jax.jit(lambda key, x, index: start_of(attack, key, x, index))


@functools.lru_cache(maxsize=64)
def _pass_program(attack, logits_fn: LogitsFn):
    def correct(x, y, start, index):
        x_adv = adversarial_of_pass(attack, logits_fn, x, y, start, index)
        return jnp.argmax(logits_fn(x_adv), axis=-1) == y

    return jax.jit(correct)
