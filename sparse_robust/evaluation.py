"""Evaluation: ONE batched, mesh-aware evaluator for clean and adversarial accuracy, ε sweeps and
sanity checks on the numbers.

The model convention is the train loop's: ``model_fn(params, model_state, x, train) -> (logits,
model_state)`` (``training.make_model_fn``), called here in eval mode. An :class:`Evaluator` is
built once per model function, batch size and mesh, and compiles one program per attack (plus one
for clean accuracy); params are arguments, so every pruning level and trial reuses the programs.

Data are split in batches of a fixed size: the last one is padded (copies of row 0) and only its
real rows count, so nothing recompiles. With a mesh, every batch is split across its devices
(params replicated) and the per-example results are gathered. Keys: the attack labelled ``name``
attacks batch b with ``fold_in(keys.derive(key, name), b)``, so an attack's numbers depend on its
label, never on its position among the others.

AutoAttack (``make_attack("autoattack", ...)``, true labels) runs stage by stage: each stage
(APGD-CE, APGD-T, FAB-T, Square) attacks only the images every earlier stage left robust, in
chunks of a few fixed sizes (``attacks.autoattack.run_stages``: one program per stage and chunk
size, and no work on images already broken); the per-stage robustness is kept with the result.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Callable, Iterator, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from sparse_robust import keys as keys_lib
from sparse_robust import parallel
from sparse_robust.attacks import NORMS, Attack, autoattack_stages, make_attack
from sparse_robust.attacks import passes
from sparse_robust.attacks.fmn import fmn_min_norm
from sparse_robust.attacks.autoattack import run_stages
from sparse_robust.attacks.parts import check_box
from sparse_robust.checks import check_choice, check_labels
from sparse_robust.convention import as_logits_fn
from sparse_robust.objectives import cross_entropy
from sparse_robust.training import ModelFn

CLEAN = "clean"
WORST_CASE = "worst_case"
_RESERVED_NAMES = (CLEAN, WORST_CASE)
_UNUSED_KEY = np.zeros(2, np.uint32)


def _check_data(images, labels, attacks=()) -> tuple[np.ndarray, np.ndarray]:
    """images [N, ...] and integer labels [N], inside the box of every `Attack` in ``attacks``."""
    images, labels = np.asarray(images, np.float32), np.asarray(labels)
    if images.ndim < 2 or images.shape[0] == 0:
        raise ValueError(f"images [N, ...] must be a non-empty batch; got images.shape="
                         f"{images.shape}.")
    check_labels(labels, images.shape[0], "labels")
    for attack in attacks:
        if isinstance(attack, Attack):
            options = dict(attack.options)
            check_box(images, options["clip_min"], options["clip_max"], "images")
    return images, labels.astype(np.int32)


def _check_attacks(attacks: Mapping[str, Callable]) -> None:
    for name, attack in attacks.items():
        if name in _RESERVED_NAMES or not callable(attack):
            raise ValueError(f"attacks[{name!r}] is invalid: names must not be {_RESERVED_NAMES} and "
                             "values must be attacks, `(logits_fn, x, y, key) -> x_adv` (e.g. "
                             "from `make_attack`).")


def batch_spans(num_examples: int, batch_size: int) -> Iterator[tuple[int, int]]:
    """(start, valid) pairs covering [0, num_examples) in batches of batch_size rows, the last
    one holding `valid` real rows (pad it with `pad_batch`)."""
    for start in range(0, num_examples, batch_size):
        yield start, min(batch_size, num_examples - start)


def pad_batch(array: np.ndarray, start: int, batch_size: int) -> np.ndarray:
    """Rows [start, start+batch_size) of ``array``, padded with copies of row 0 at the end."""
    chunk = array[start:start + batch_size]
    if len(chunk) < batch_size:
        pad = np.repeat(array[:1], batch_size - len(chunk), axis=0)
        chunk = np.concatenate([chunk, pad])
    return chunk


ATTACKED_ALL = "all"
ATTACKED_CLEAN_CORRECT = "clean_correct"


@dataclasses.dataclass(frozen=True)
class PerExample:
    """Per-example outcome of one evaluation: correct classification and cross-entropy (NaN for
    a staged attack, which has no single adversarial point, and for images not attacked), for a
    staged attack the robustness after each stage (cumulative), and which images the attack ran
    on: ``"all"``, or ``"clean_correct"`` (the others count as not robust, as in the reference:
    an image misclassified clean is not robust whatever the attack does)."""
    correct: np.ndarray  # bool [N]
    loss: np.ndarray     # float32 [N]
    stages: Optional[dict[str, np.ndarray]] = None
    attacked: str = ATTACKED_ALL


def staged(attack) -> Optional[dict[str, Attack]]:
    """The stages an evaluator runs one after the other for ``attack`` (AutoAttack on true
    labels), or None for an attack run in one go."""
    if isinstance(attack, Attack) and attack.name == "autoattack" \
            and attack.label_source == "true":
        return autoattack_stages(attack.eps, **dict(attack.options))
    return None


class Evaluator:
    """Clean and adversarial evaluation of ``(params, model_state)`` on in-memory data.

    Args:
      model_fn: the model convention of the library (see the module docstring).
      batch_size: rows per evaluated batch (rounded up to a multiple of the mesh's devices; a
        dataset smaller than a batch is one batch).
      mesh: a ``parallel.make_mesh`` mesh: batches are split across its devices; None = one device.
    """

    def __init__(self, model_fn: ModelFn, *, batch_size: int = 1000, mesh=None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) \
                or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} is invalid; allowed values: integers >= 1.")
        self.model_fn, self.batch_size, self.mesh = model_fn, int(batch_size), mesh
        self._programs: dict = {}

    # ---------------------------------------------------------------- compiled programs

    def _jit(self, fn, num_args: int = 5, batch_args: int = 2):
        """jit ``fn(params, model_state, x, y, *rest)`` with the batch split across the mesh
        (x, y and the first ``batch_args - 2`` of rest sharded on axis 0, all else replicated,
        results gathered on every device)."""
        if self.mesh is None:
            return jax.jit(fn)
        rep, data = parallel.replicated(self.mesh), parallel.batch_sharded(self.mesh)
        return jax.jit(fn, in_shardings=(rep, rep) + (data,) * batch_args
                       + (rep,) * (num_args - 2 - batch_args), out_shardings=rep)

    def program(self, attack: Optional[Attack]):
        """The jitted ``(params, model_state, x, y, key) -> (correct [B], loss [B])`` of one attack
        (None: clean); compiled once per attack and batch shape."""
        if attack not in self._programs:
            model_fn = self.model_fn

            def correct_and_loss(params, model_state, x, y, key):
                logits_fn = as_logits_fn(model_fn, params, model_state)
                if attack is not None:
                    x = attack(logits_fn, x, y, key)
                logits = logits_fn(x)
                return jnp.argmax(logits, axis=-1) == y, cross_entropy(logits, y)

            self._programs[attack] = self._jit(correct_and_loss)
        return self._programs[attack]

    def _adversarial_program(self, attack: Attack):
        key = ("adversarial", attack)
        if key not in self._programs:
            model_fn = self.model_fn

            def adversarial(params, model_state, x, y, key):
                return attack(as_logits_fn(model_fn, params, model_state), x, y, key)

            self._programs[key] = self._jit(adversarial)
        return self._programs[key]

    def _pass_programs(self, attack: Attack):
        """The jitted programs of an attack made of passes (`attacks.passes`): ``(params,
        model_state, x, y, key, index) -> starts`` and ``(params, model_state, x, y, start, index)
        -> correct [b]``."""
        key = ("passes", attack)
        if key not in self._programs:
            model_fn = self.model_fn

            def starts(params, model_state, x, y, key, index):
                return passes.start_of(attack, key, x, index)

            def correct(params, model_state, x, y, start, index):
                logits_fn = lambda z: model_fn(params, model_state, z, False)[0]
                x_adv = passes.adversarial_of_pass(attack, logits_fn, x, y, start, index)
                return jnp.argmax(logits_fn(x_adv), axis=-1) == y

            self._programs[key] = (self._jit(starts, 6), self._jit(correct, 6, batch_args=3))
        return self._programs[key]

    def _sweep_program(self, attack: Attack, with_step_sizes: bool):
        key = ("sweep", attack, with_step_sizes)
        if key not in self._programs:
            model_fn = self.model_fn

            def sweep(params, model_state, x, y, key, eps_grid, step_sizes):
                logits_fn = as_logits_fn(model_fn, params, model_state)

                def correct_at(eps, step_size):
                    x_adv = attack(logits_fn, x, y, key, eps=eps, step_size=step_size)
                    return jnp.argmax(logits_fn(x_adv), axis=-1) == y

                if step_sizes is None:
                    return jax.vmap(lambda eps: correct_at(eps, None))(eps_grid)
                return jax.vmap(correct_at)(eps_grid, step_sizes)

            if not with_step_sizes:
                sweep_fn = lambda p, s, x, y, k, eps: sweep(p, s, x, y, k, eps, None)
            else:
                sweep_fn = sweep
            self._programs[key] = self._jit(sweep_fn, 7 if with_step_sizes else 6)
        return self._programs[key]

    # ---------------------------------------------------------------- batching

    def _size(self, num_examples: int) -> int:
        """The batch size for a dataset: at most batch_size, a multiple of the devices."""
        shards = parallel.num_shards(self.mesh)
        return -(-min(self.batch_size, num_examples) // shards) * shards

    def _place(self, x, y):
        if self.mesh is None:
            return x, y
        return parallel.put((x, y), parallel.batch_sharded(self.mesh))

    def _batches(self, images, labels, progress: bool, desc: str):
        """Yields (index, x, y, valid) with x, y placed on the mesh (batch split)."""
        size = self._size(len(images))
        spans = list(batch_spans(len(images), size))
        for index, (start, valid) in enumerate(tqdm(spans, disable=not progress, desc=desc,
                                                    leave=False)):
            yield (index, *self._place(pad_batch(images, start, size),
                                       pad_batch(labels, start, size)), valid)

    def _params(self, params, model_state):
        if self.mesh is None:
            return params, model_state
        return parallel.put((params, model_state), parallel.replicated(self.mesh))

    # ---------------------------------------------------------------- public

    def per_example(self, params, model_state, images, labels,
                    attacks: Optional[Mapping[str, Attack]] = None,
                    key: Optional[jax.Array] = None, *,
                    progress: bool = False, adversarial_loss: bool = True) -> dict[str, PerExample]:
        """{"clean": ..., <attack name>: ...} per-example correctness and cross-entropy.

        With ``adversarial_loss=False`` an attack on true labels (an `Attack` with
        ``label_source="true"``) runs only on the images classified correctly clean, compacted
        as AutoAttack's stages are (``attacks.autoattack.run_stages``: chunk c uses
        ``fold_in(fold_in(key', 0), c)``, key' the attack's key); the others are not robust and
        their loss is NaN (``PerExample.attacked == "clean_correct"``). AutoAttack always runs so.
        """
        attacks = attacks or {}
        images, labels = _check_data(images, labels, attacks.values())
        _check_attacks(attacks)
        if attacks and key is None:
            raise ValueError("key=None is invalid with attacks; pass a jax.random key.")
        params, model_state = self._params(params, model_state)
        named = [(CLEAN, None)] + list(attacks.items())
        out = {}
        for name, attack in named:
            stages = staged(attack)
            if stages is not None:
                out[name] = self._run_stages(params, model_state, images, labels, stages,
                                             out[CLEAN].correct, keys_lib.derive(key, name),
                                             progress, name)
                continue
            if not adversarial_loss and isinstance(attack, Attack) \
                    and attack.label_source == "true":
                only = self._run_stages(params, model_state, images, labels, {name: attack},
                                        out[CLEAN].correct, keys_lib.derive(key, name),
                                        progress, name)
                out[name] = dataclasses.replace(only, stages=None)
                continue
            # The clean program ignores its key: any fixed one keeps the signature uniform.
            attack_key = _UNUSED_KEY if attack is None else keys_lib.derive(key, name)
            correct, loss = [], []
            for index, x, y, valid in self._batches(images, labels, progress, name):
                c, l = self.program(attack)(params, model_state, x, y,
                                            jax.random.fold_in(attack_key, index))
                correct.append(np.asarray(c)[:valid])
                loss.append(np.asarray(l)[:valid])
            out[name] = PerExample(np.concatenate(correct), np.concatenate(loss))
        return out

    def evaluate(self, params, model_state, images, labels,
                 attacks: Optional[Mapping[str, Attack]] = None, key: Optional[jax.Array] = None,
                 *, progress: bool = False, adversarial_loss: bool = True) -> dict[str, float]:
        """Mean accuracy and loss, clean and under each attack, plus the per-example worst case.

        Returns ``{"clean_accuracy", "clean_loss", "<name>_accuracy", "<name>_loss" for each
        attack, and with attacks "worst_case_accuracy"}`` (``clean_accuracy`` as in summary.json):
        an example counts for the worst case only if it is classified correctly clean and under
        every attack. A staged attack (AutoAttack) has no loss but "<name>/<stage>_accuracy" per
        stage. With ``adversarial_loss=False`` an attack on true labels runs only on the images
        correct clean (see `per_example`): no "<name>_loss", and
        ``"<name>_attacked_clean_correct_only": 1.0`` says so.
        """
        results = self.per_example(params, model_state, images, labels, attacks, key,
                                   progress=progress, adversarial_loss=adversarial_loss)
        out = {}
        for name, outcome in results.items():
            prefix = f"{name}_"
            out[f"{prefix}accuracy"] = float(outcome.correct.mean())
            if outcome.stages is None and outcome.attacked == ATTACKED_CLEAN_CORRECT:
                out[f"{name}_attacked_clean_correct_only"] = 1.0
            elif outcome.stages is None:
                out[f"{prefix}loss"] = float(outcome.loss.mean())
            else:
                out.update({f"{name}/{stage}_accuracy": float(robust.mean())
                            for stage, robust in outcome.stages.items()})
        if attacks:
            worst = np.logical_and.reduce([r.correct for r in results.values()])
            out[f"{WORST_CASE}_accuracy"] = float(worst.mean())
        return out

    def _run_stages(self, params, model_state, images, labels, stages: Mapping[str, Attack],
                    robust, key, progress: bool, desc: str) -> PerExample:
        """A staged attack on the images ``robust`` before it (clean-correct)."""
        attacks = list(stages.values())
        size, shards = self._size(len(images)), parallel.num_shards(self.mesh)
        # Chunk sizes: the batch and its halvings, each a multiple of the devices.
        buckets = sorted({max(shards, (size >> k) // shards * shards) for k in range(5)})

        def stage_fn(index, x, y, chunk_key):
            attack = attacks[index]
            if passes.num_passes(attack) == 1:
                return self.program(attack)(params, model_state, *self._place(x, y), chunk_key)[0]
            return self._compacted(params, model_state, attack, x, y, chunk_key, buckets)

        bar = tqdm(total=len(stages), disable=not progress, desc=desc, leave=False)
        done = {}

        def advance(stage, finished, total):
            if finished == total and stage not in done:
                done[stage] = True
                bar.update(1)

        flags = run_stages(stage_fn, images, labels, robust, key, stages=tuple(stages),
                           batch_size=size, bucket_sizes=buckets, progress=advance)
        bar.close()
        last = flags[tuple(stages)[-1]]
        return PerExample(last, np.full(len(images), np.nan, np.float32), flags,
                          ATTACKED_CLEAN_CORRECT)

    def _compacted(self, params, model_state, attack: Attack, x, y, key, buckets) -> np.ndarray:
        """Still correct [B] after `attack` (made of passes) on one chunk, each pass run only on
        the rows every earlier pass left correct (`attacks.passes.run_passes`); per row the
        result of the one-program attack with the same key."""
        starts_program, correct_program = self._pass_programs(attack)
        placed = self._place(x, y)
        random_start = attack.name != "fab_t"

        def start_fn(index):
            if not random_start:
                return None
            return starts_program(params, model_state, *placed, key, index)

        def pass_fn(xs, ys, start, index):
            xs, ys = self._place(xs, ys)
            start = xs if start is None else self._place(start, ys)[0]  # FAB-T ignores it.
            return correct_program(params, model_state, xs, ys, start, index)

        return passes.run_passes(pass_fn, start_fn, x, y, passes=passes.num_passes(attack),
                                 buckets=buckets)

    def adversarial_examples(self, params, model_state, images, labels, attack: Attack,
                             key: jax.Array) -> np.ndarray:
        """The adversarial images of ``attack`` (keys as in :meth:`per_example` for name "adv")."""
        images, labels = _check_data(images, labels, [attack])
        params, model_state = self._params(params, model_state)
        attack_key = keys_lib.derive(key, "adv")
        out = [np.asarray(self._adversarial_program(attack)(
                   params, model_state, x, y, jax.random.fold_in(attack_key, index)))[:valid]
               for index, x, y, valid in self._batches(images, labels, False, "adv")]
        return np.concatenate(out)

    def minimal_norms(self, params, model_state, images, labels, attack: Attack) -> np.ndarray:
        """Per image the smallest adversarial perturbation norm that FMN finds (``attack`` from
        ``make_attack("fmn", ...)``; its ε is not used): float [N], 0 for an image wrong clean,
        +∞ where FMN found nothing. `robustness_curve` turns it into accuracy at any ε."""
        images, labels = _check_data(images, labels)
        if not (isinstance(attack, Attack) and attack.name == "fmn"):
            raise ValueError(f"attack={attack!r} is invalid; allowed values: an `Attack` from "
                             "`make_attack('fmn', ...)`.")
        key = ("minimal_norms", attack)
        if key not in self._programs:
            model_fn, options = self.model_fn, dict(attack.options)

            def norms(params, model_state, x, y):
                logits_fn = lambda z: model_fn(params, model_state, z, False)[0]
                return fmn_min_norm(logits_fn, x, y, **options)[1]

            self._programs[key] = self._jit(norms, 4)
        params, model_state = self._params(params, model_state)
        out = [np.asarray(self._programs[key](params, model_state, x, y))[:valid]
               for _, x, y, valid in self._batches(images, labels, False, "fmn")]
        return np.concatenate(out)

    def sweep(self, params, model_state, images, labels, attack: Attack, eps_grid, key,
              step_size_ratio: Optional[float] = None) -> np.ndarray:
        """Robust accuracy under ``attack`` at each ε of ``eps_grid`` (float array [E]), vmapped
        over ε (one compile for the grid).

        Every ε uses the same per-batch keys (common random numbers), so the curve is smoother.
        Step sizes are ``step_size_ratio · ε``; the ratio defaults to the attack's step_size / eps,
        the ε-override rule of ``Attack`` (FGSM without a step size steps ε; APGD adapts its own).
        """
        images, labels = _check_data(images, labels, [attack])
        if not isinstance(attack, Attack):
            raise ValueError(f"attack={attack!r} is invalid; allowed values: an `Attack` from "
                             "`make_attack`.")
        eps_grid = np.asarray(eps_grid, np.float32)
        if eps_grid.ndim != 1 or eps_grid.size == 0 or not np.all(np.isfinite(eps_grid)) \
                or np.any(eps_grid < 0):
            raise ValueError(f"eps_grid={eps_grid!r} is invalid; allowed values: a non-empty 1-D "
                             "array of finite numbers >= 0.")
        step_sizes = _sweep_step_sizes(attack, eps_grid, step_size_ratio)
        program = self._sweep_program(attack, step_sizes is not None)
        params, model_state = self._params(params, model_state)
        extra = (eps_grid,) if step_sizes is None else (eps_grid, step_sizes)
        totals = np.zeros(len(eps_grid), np.int64)
        for index, x, y, valid in self._batches(images, labels, False, "sweep"):
            correct = program(params, model_state, x, y, jax.random.fold_in(key, index), *extra)
            totals += np.asarray(correct)[:, :valid].sum(axis=1)
        return totals / len(images)


def robustness_curve(norms, eps_grid) -> np.ndarray:
    """Robust accuracy at each ε of `eps_grid` from per-image minimal adversarial norms
    (`Evaluator.minimal_norms`): the share of images whose norm exceeds ε (an adversarial
    point at norm ε lies in the ε-ball). Non-increasing in ε by construction."""
    norms, eps_grid = np.asarray(norms, np.float64), np.asarray(eps_grid, np.float64)
    if norms.ndim != 1 or eps_grid.ndim != 1 or np.any(eps_grid < 0):
        raise ValueError(f"norms [N] and eps_grid [E] (>= 0) are expected; got shapes "
                         f"{norms.shape}, {eps_grid.shape}.")
    return np.mean(norms[None, :] > eps_grid[:, None], axis=1)


def median_norm(norms) -> float:
    """The median minimal adversarial norm (0 counts images wrong clean, +∞ those FMN could not
    break): the ε at which robust accuracy falls to about one half."""
    return float(np.median(np.asarray(norms, np.float64)))


def _sweep_step_sizes(attack: Attack, eps_grid: np.ndarray, step_size_ratio) -> Optional[np.ndarray]:
    """Step sizes scaling with ε: ratio · ε, the ratio defaulting to the attack's step_size / eps."""
    if not attack.uses_step_size:
        if step_size_ratio is not None:
            raise ValueError(f"step_size_ratio={step_size_ratio!r} is invalid for attack "
                             f"{attack.name!r}, which adapts its own step size; allowed values: None.")
        return None
    if step_size_ratio is None:
        if attack.step_size is None:  # FGSM: its step defaults to ε.
            return None
        if attack.eps == 0:
            raise ValueError("step_size_ratio=None is invalid for an attack with eps=0; allowed "
                             "values: a number >= 0 (step size = ratio · ε).")
        step_size_ratio = attack.step_size / attack.eps
    if not (isinstance(step_size_ratio, numbers.Real) and math.isfinite(step_size_ratio)
            and step_size_ratio >= 0):
        raise ValueError(f"step_size_ratio={step_size_ratio!r} is invalid; allowed values: finite "
                         "numbers >= 0.")
    return (step_size_ratio * eps_grid).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Sanity checks


@dataclasses.dataclass(frozen=True)
class Check:
    """One sanity check on robustness numbers."""

    name: str
    passed: bool
    detail: str


def format_checks(checks: Sequence[Check]) -> str:
    """One line per check: "PASS|FAIL  name: detail"."""
    return "\n".join(f"{'PASS' if c.passed else 'FAIL'}  {c.name}: {c.detail}" for c in checks)


def _require_sanity_attacks(name: str, mapping: Mapping) -> None:
    missing = sorted({"fgsm", "pgd", "apgd"} - set(mapping))
    if missing:
        raise ValueError(f"{name} lacks {missing}; it needs 'fgsm', 'pgd' and 'apgd'.")


def sanity_checks(*, clean_accuracy: float, attack_accuracies: Mapping[str, float], eps_grid,
                  sweep_accuracies, num_examples: int, num_classes: int,
                  tolerance_examples: int = 1, chance_slack: float = 0.05,
                  loss_gap_slack: float = 0.05) -> list[Check]:
    """Checks that robustness numbers are plausible (details in percent; failures also logged).

    Args:
      clean_accuracy: accuracy on clean data.
      attack_accuracies: accuracies under "fgsm", "pgd" and "apgd" (cross-entropy) at the same ε,
        and optionally "apgd_dlr" (APGD on the scale-invariant DLR loss).
      eps_grid, sweep_accuracies: an ε sweep (ascending, starting at 0); its largest ε should be
        large enough for any input to reach any other (e.g. 1 for L∞ on [0, 1] data).
      num_examples: examples behind each accuracy; the tolerance is tolerance_examples of them.
      num_classes: chance accuracy is 1 / num_classes.
      chance_slack: how far above chance the largest-ε accuracy may be.
      loss_gap_slack: how far APGD-DLR may fall below PGD before the losses are said to disagree.

    Checks: the sweep is non-increasing in ε; at ε = 0 it equals the clean accuracy; PGD is no
    weaker than FGSM; APGD (the stronger of its losses) no weaker than PGD; the largest ε drives
    accuracy to chance; and, with "apgd_dlr", the cross-entropy PGD is within loss_gap_slack of
    APGD-DLR. A larger gap means cross-entropy gradients vanish on saturated logits (Croce & Hein
    2020): the cross-entropy attacks overestimate robustness and only DLR-based numbers hold.
    """
    _require_sanity_attacks("attack_accuracies", attack_accuracies)
    eps_grid, sweep = np.asarray(eps_grid, np.float64), np.asarray(sweep_accuracies, np.float64)
    if eps_grid.ndim != 1 or eps_grid.shape != sweep.shape or eps_grid.size < 2 or eps_grid[0] != 0 \
            or np.any(np.diff(eps_grid) <= 0):
        raise ValueError(f"eps_grid={eps_grid.tolist()} is invalid (with sweep_accuracies of shape "
                         f"{sweep.shape}); allowed values: >= 2 increasing values starting at 0, one "
                         "accuracy each.")
    tol = tolerance_examples / num_examples + 1e-9  # Accuracies are ratios; allow float rounding.
    fgsm, pgd, apgd_ce = (attack_accuracies[name] for name in ("fgsm", "pgd", "apgd"))
    dlr = attack_accuracies.get("apgd_dlr")
    apgd = apgd_ce if dlr is None else min(apgd_ce, dlr)
    pct = lambda value: f"{100 * value:.2f} %"
    apgd_detail = f"apgd {pct(apgd_ce)}" + ("" if dlr is None else f", apgd_dlr {pct(dlr)}")

    rises = [(float(eps_grid[i]), float(eps_grid[i + 1]), float(sweep[i]), float(sweep[i + 1]))
             for i in range(len(sweep) - 1) if sweep[i + 1] > sweep[i] + tol]
    chance = 1.0 / num_classes
    checks = [
        Check("monotone_in_eps", not rises,
              "accuracy never rises with ε" if not rises else "accuracy rises: " + ", ".join(
                  f"ε {a:g}->{b:g}: {pct(p)}->{pct(q)}" for a, b, p, q in rises)),
        Check("eps0_equals_clean", abs(sweep[0] - clean_accuracy) <= tol,
              f"accuracy at ε=0 {pct(sweep[0])} vs clean {pct(clean_accuracy)}"),
        Check("pgd_not_weaker_than_fgsm", pgd <= fgsm + tol, f"pgd {pct(pgd)} vs fgsm {pct(fgsm)}"),
        Check("apgd_not_weaker_than_pgd", apgd <= pgd + tol, f"{apgd_detail} vs pgd {pct(pgd)}"),
        Check("large_eps_reaches_chance", sweep[-1] <= chance + chance_slack,
              f"accuracy at ε={eps_grid[-1]:g} is {pct(sweep[-1])}; chance {pct(chance)} "
              f"+ slack {100 * chance_slack:g} points"),
    ]
    if dlr is not None:
        gap = pgd - dlr
        checks.append(Check(
            "ce_and_dlr_agree", gap <= loss_gap_slack,
            f"pgd (cross-entropy) {pct(pgd)} vs apgd_dlr {pct(dlr)}; gap {100 * gap:+.2f} points, "
            f"slack {100 * loss_gap_slack:g}" + ("" if gap <= loss_gap_slack else
                                                " (cross-entropy attacks overestimate robustness "
                                                "here)")))
    return [_logged(check) for check in checks]


def _logged(check: Check) -> Check:
    """``check``, logged when it failed (the caller reports it: the engine in summary.json and
    the report)."""
    if not check.passed:
        logging.info("Robustness sanity check FAILED: %s: %s", check.name, check.detail)
    return check


def square_check(stage_accuracies: Mapping[str, float], num_examples: int, *,
                 slack: float = 0.01) -> Check:
    """Gradient masking seen by AutoAttack: its gradient-free last stage (Square) attacks only the
    images APGD-CE, APGD-T and FAB-T all left robust, so whatever it breaks, every gradient
    attack missed. More than ``slack`` (a fraction of the images) means the gradients mislead
    (Croce & Hein 2020): only the gradient-free number holds.

    ``stage_accuracies``: robust accuracy after each stage, in order, Square last.
    """
    stages = list(stage_accuracies)
    if len(stages) < 2 or stages[-1] != "square":
        raise ValueError(f"stage_accuracies has stages {stages}; expected AutoAttack's, Square "
                         "last.")
    before, after = stage_accuracies[stages[-2]], stage_accuracies["square"]
    broken = before - after
    count = round(broken * num_examples)
    passed = broken <= slack + 1e-9
    detail = (f"Square broke {count} of {num_examples} images ({100 * broken:.2f} %) that every "
              f"gradient attack missed; slack {100 * slack:g} %"
              + ("" if passed else " (gradient masking: trust the gradient-free number)"))
    return _logged(Check("square_finds_nothing_new", passed, detail))


def _logits_program(evaluator: Evaluator):
    key = ("logits",)
    if key not in evaluator._programs:
        model_fn = evaluator.model_fn
        evaluator._programs[key] = jax.jit(lambda p, s, x: model_fn(p, s, x, False)[0])
    return evaluator._programs[key]


def randomness_check(evaluator: Evaluator, params, model_state, images, *,
                     tolerance: float = 1e-4) -> Check:
    """The reference's warning for a randomised model: two clean passes over the same images
    must give the same logits. The second pass takes the batch in reverse order, so a model
    whose output depends on its neighbours in the batch or on its position (dropout left on
    with a fixed key, batch norm in train mode) shows it too. Attacks on such a model see a
    different function at each query, so its robust accuracy is not to be trusted.

    Passes when every logit agrees within ``tolerance · (1 + max |logit|)``.
    """
    images = _check_data(images, np.zeros(len(images), np.int32))[0]
    logits = _logits_program(evaluator)
    first = np.asarray(logits(params, model_state, images))
    second = np.asarray(logits(params, model_state, images[::-1]))[::-1]
    gap = float(np.max(np.abs(first - second)))
    bound = tolerance * (1.0 + float(np.max(np.abs(first))))
    passed = gap <= bound
    detail = (f"largest logit difference between two clean passes over {len(images)} images "
              f"{gap:.3g} (bound {bound:.3g})"
              + ("" if passed else " (the model is randomised or batch-dependent at evaluation: "
                                   "evaluate it in eval mode, deterministically)"))
    return _logged(Check("deterministic_at_evaluation", passed, detail))


def zero_gradient_check(evaluator: Evaluator, params, model_state, images, labels, *,
                        max_share: float = 0.01) -> Check:
    """The reference's warning for zero gradients: the share of images whose input gradient of
    the cross-entropy is zero (sum of |∂L/∂x| < 1e-8, the reference's threshold). Gradient
    attacks cannot move from such points (saturated softmax, rounding or other non-
    differentiable input processing), so their numbers overestimate robustness; more than
    ``max_share`` of the images fails the check."""
    images, labels = _check_data(images, labels)
    key = ("input_gradient_size",)
    if key not in evaluator._programs:
        model_fn = evaluator.model_fn

        def gradient_size(params, model_state, x, y):
            loss = lambda z: jnp.sum(cross_entropy(model_fn(params, model_state, z, False)[0], y))
            grad = jax.grad(loss)(x)
            return jnp.sum(jnp.abs(grad.reshape(grad.shape[0], -1)), axis=-1)

        evaluator._programs[key] = jax.jit(gradient_size)
    sizes = np.asarray(evaluator._programs[key](params, model_state, images, labels))
    zero = int(np.sum(sizes < 1e-8))
    share = zero / len(images)
    passed = share <= max_share + 1e-12
    detail = (f"{zero} of {len(images)} images ({100 * share:.2f} %) have a zero input gradient; "
              f"allowed {100 * max_share:g} %"
              + ("" if passed else " (gradient attacks cannot move from them: trust only "
                                   "gradient-free numbers such as AutoAttack's Square stage)"))
    return _logged(Check("few_zero_gradients", passed, detail))


def fmn_check(fmn_accuracy: float, autoattack_accuracy: float, num_examples: int, *,
              slack: float = 0.0) -> Check:
    """AutoAttack missed points: FMN's robustness curve at AutoAttack's ε (`robustness_curve`)
    should not fall below AutoAttack's robust accuracy, the stronger of the two by design. More
    than ``slack`` (a fraction of the images) below it means FMN found adversarial points within
    ε that every AutoAttack stage missed."""
    gap = autoattack_accuracy - fmn_accuracy
    count = round(gap * num_examples)
    passed = gap <= slack + 1e-9
    detail = (f"FMN at AutoAttack's ε {100 * fmn_accuracy:.2f} % vs AutoAttack "
              f"{100 * autoattack_accuracy:.2f} % ({max(count, 0)} of {num_examples} images); "
              f"slack {100 * slack:g} %" + ("" if passed else " (AutoAttack missed points: "
                                                             "trust the lower number)"))
    return _logged(Check("fmn_finds_nothing_new", passed, detail))


def sanity_attacks(eps: float, norm: str = "linf", num_steps: int = 20,
                   num_classes: int = 10) -> dict[str, Attack]:
    """FGSM, PGD (step 2.5·ε / num_steps, Madry et al.), APGD-CE and, with >= 3 classes (which
    the DLR loss needs), APGD-DLR at `eps`, for sanity checks."""
    attacks = {
        "fgsm": make_attack("fgsm", eps=eps, norm=norm),
        "pgd": make_attack("pgd", eps=eps, step_size=2.5 * eps / num_steps, num_steps=num_steps,
                           norm=norm),
        "apgd": make_attack("apgd", eps=eps, num_steps=num_steps, norm=norm),
    }
    if num_classes >= 3:
        attacks["apgd_dlr"] = make_attack("apgd", eps=eps, num_steps=num_steps, norm=norm, loss="dlr")
    return attacks


def run_sanity_checks(evaluator: Evaluator, params, model_state, images, labels, key, *,
                      eps: float, norm: str = "linf", num_steps: int = 20,
                      attacks: Optional[Mapping[str, Attack]] = None, sweep_points: int = 5,
                      large_eps: Optional[float] = None, tolerance_examples: int = 1,
                      chance_slack: float = 0.05, loss_gap_slack: float = 0.05) -> list[Check]:
    """Evaluates FGSM/PGD/APGD at `eps` and a PGD sweep with `evaluator`, then runs
    `sanity_checks` on the results, and adds the reference's warnings as checks
    (`randomness_check`, `zero_gradient_check`).

    `attacks` (keys "fgsm", "pgd", "apgd", optionally "apgd_dlr") defaults to
    `sanity_attacks(eps, norm, num_steps, num_classes)`; the sweep uses attacks["pgd"] at
    `sweep_points` values of ε in [0, eps] plus `large_eps` (default: the box's width for L∞, its
    diagonal for L2, enough to reach any input from any other). The PGD step scales with ε.
    """
    check_choice("norm", norm, NORMS)
    if not (isinstance(eps, numbers.Real) and eps > 0):
        raise ValueError(f"eps={eps!r} is invalid; allowed values: numbers > 0.")
    if isinstance(sweep_points, bool) or not isinstance(sweep_points, int) or sweep_points < 2:
        raise ValueError(f"sweep_points={sweep_points!r} is invalid; allowed values: integers >= 2.")
    images, labels = _check_data(images, labels)
    num_classes = jax.eval_shape(as_logits_fn(evaluator.model_fn, params, model_state),
                                 images[:1]).shape[-1]
    attacks = dict(sanity_attacks(eps, norm, num_steps, num_classes) if attacks is None
                   else attacks)
    _require_sanity_attacks("attacks", attacks)
    if large_eps is None:
        pgd_options = dict(attacks["pgd"].options)
        width = pgd_options["clip_max"] - pgd_options["clip_min"]
        large_eps = width if pgd_options["norm"] == "linf" else width * math.sqrt(images[0].size)
    if not large_eps > eps:
        raise ValueError(f"large_eps={large_eps!r} is invalid; allowed values: numbers > eps={eps!r}.")

    attack_key, sweep_key = jax.random.split(key)
    results = evaluator.evaluate(params, model_state, images, labels, attacks, attack_key)
    accuracies = {name: results[f"{name}_accuracy"] for name in attacks}
    eps_grid = np.append(np.linspace(0.0, eps, sweep_points), large_eps)
    sweep = evaluator.sweep(params, model_state, images, labels, attacks["pgd"], eps_grid,
                            sweep_key)
    checks = sanity_checks(clean_accuracy=results[f"{CLEAN}_accuracy"],
                           attack_accuracies=accuracies, eps_grid=eps_grid,
                           sweep_accuracies=sweep, num_examples=len(images),
                           num_classes=num_classes, tolerance_examples=tolerance_examples,
                           chance_slack=chance_slack, loss_gap_slack=loss_gap_slack)
    # The reference's own warnings: a randomised model, and gradients that vanish.
    return checks + [randomness_check(evaluator, params, model_state, images),
                     zero_gradient_check(evaluator, params, model_state, images, labels)]
