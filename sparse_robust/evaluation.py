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


@dataclasses.dataclass(frozen=True)
class PerExample:
    """Per-example outcome of one evaluation: correct classification and cross-entropy (NaN for
    a staged attack, which has no single adversarial point), and for a staged attack the
    robustness after each stage (cumulative)."""
    correct: np.ndarray  # bool [N]
    loss: np.ndarray     # float32 [N]
    stages: Optional[dict[str, np.ndarray]] = None


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

    def _jit(self, fn, num_args: int = 5):
        """jit ``fn(params, model_state, x, y, key, *rest)`` with the batch split across the mesh
        (x and y sharded on axis 0, all else replicated, results gathered on every device)."""
        if self.mesh is None:
            return jax.jit(fn)
        rep, data = parallel.replicated(self.mesh), parallel.batch_sharded(self.mesh)
        return jax.jit(fn, in_shardings=(rep, rep, data, data) + (rep,) * (num_args - 4),
                       out_shardings=rep)

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
                    progress: bool = False) -> dict[str, PerExample]:
        """{"clean": ..., <attack name>: ...} per-example correctness and cross-entropy."""
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
                 *, progress: bool = False) -> dict[str, float]:
        """Mean accuracy and loss, clean and under each attack, plus the per-example worst case.

        Returns ``{"clean_accuracy", "clean_loss", "<name>_accuracy", "<name>_loss" for each
        attack, and with attacks "worst_case_accuracy"}`` (``clean_accuracy`` as in summary.json):
        an example counts for the worst case only if it is classified correctly clean and under
        every attack.
        """
        results = self.per_example(params, model_state, images, labels, attacks, key,
                                   progress=progress)
        out = {}
        for name, outcome in results.items():
            prefix = f"{name}_"
            out[f"{prefix}accuracy"] = float(outcome.correct.mean())
            if outcome.stages is None:
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
        programs = [self.program(attack) for attack in stages.values()]
        size, shards = self._size(len(images)), parallel.num_shards(self.mesh)
        # Chunk sizes: the batch and its halvings, each a multiple of the devices.
        buckets = sorted({max(shards, (size >> k) // shards * shards) for k in range(5)})

        def stage_fn(index, x, y, chunk_key):
            return programs[index](params, model_state, *self._place(x, y), chunk_key)[0]

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
        return PerExample(last, np.full(len(images), np.nan, np.float32), flags)

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
    for check in checks:
        if not check.passed:  # The caller reports them (the engine in summary.json and the report).
            logging.info("Robustness sanity check FAILED: %s: %s", check.name, check.detail)
    return checks


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
    if not passed:
        logging.info("Robustness sanity check FAILED: square_finds_nothing_new: %s", detail)
    return Check("square_finds_nothing_new", passed, detail)


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
    `sanity_checks` on the results.

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
    return sanity_checks(clean_accuracy=results[f"{CLEAN}_accuracy"], attack_accuracies=accuracies,
                         eps_grid=eps_grid, sweep_accuracies=sweep, num_examples=len(images),
                         num_classes=num_classes, tolerance_examples=tolerance_examples,
                         chance_slack=chance_slack, loss_gap_slack=loss_gap_slack)
