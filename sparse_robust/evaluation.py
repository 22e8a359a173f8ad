"""Robust evaluation: accuracy under several attacks, ε sweeps, and sanity checks on the numbers.

``apply_fn(variables, x) -> logits`` is the model in eval mode. Data are evaluated in batches of a
fixed size (the last one padded and masked, so nothing recompiles); batch b attacks with
``jax.random.fold_in(key, b)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm import tqdm

from sparse_robust.attacks import NORMS, Attack, make_attack
from sparse_robust.checks import check_choice
from sparse_robust.training import batch_spans, pad_batch

ApplyFn = Callable[[Any, jax.Array], jax.Array]

_RESERVED_NAMES = ("clean", "worst_case")


# --------------------------------------------------------------------------------------------
# Batching


def _check_data(images, labels, batch_size) -> tuple[np.ndarray, np.ndarray]:
    images, labels = np.asarray(images, np.float32), np.asarray(labels)
    if images.ndim < 2 or labels.shape != images.shape[:1] or images.shape[0] == 0:
        raise ValueError(f"images [N, ...] and labels [N] must be non-empty and share N; got "
                         f"images.shape={images.shape}, labels.shape={labels.shape}.")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid; allowed values: integers >= 1.")
    return images, labels.astype(np.int32)


def _padded_batches(images, labels, batch_size) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Yields (images, labels, num_valid) batches of exactly min(batch_size, N) rows; the last one
    is padded (see `training.pad_batch`), and only its first num_valid rows count."""
    size = min(batch_size, len(images))
    for start, valid in batch_spans(len(images), size):
        yield pad_batch(images, start, size), pad_batch(labels, start, size), valid


def _num_batches(num_examples: int, batch_size: int) -> int:
    return math.ceil(num_examples / min(batch_size, num_examples))


def _correct(logits, labels):
    return jnp.argmax(logits, axis=-1) == labels


# --------------------------------------------------------------------------------------------
# Robust accuracy under several attacks


@functools.partial(jax.jit, static_argnames=("apply_fn", "attacks"))
def _batch_correct(variables, x, y, key, *, apply_fn, attacks):
    """Per-example correctness: clean [B] and under each attack [A, B] (attack i uses
    fold_in(key, i))."""
    logits_fn = lambda z: apply_fn(variables, z)
    clean = _correct(logits_fn(x), y)
    under_attack = [_correct(logits_fn(attack(logits_fn, x, y, jax.random.fold_in(key, i))), y)
                    for i, (_, attack) in enumerate(attacks)]
    return clean, jnp.stack(under_attack)


def evaluate_robustness(apply_fn: ApplyFn, variables, images, labels,
                        attacks: Mapping[str, Attack], key, batch_size: int = 1000,
                        progress: bool = True) -> dict[str, float]:
    """Accuracy on clean data and under each attack, plus the per-example worst case.

    Returns ``{"clean": acc, <attack name>: acc, ..., "worst_case": acc}``; an example counts for
    "worst_case" only if it is classified correctly clean and under every attack. In batch b,
    the i-th attack (in mapping order) uses ``fold_in(fold_in(key, b), i)``.
    """
    images, labels = _check_data(images, labels, batch_size)
    if not attacks:
        raise ValueError("attacks is empty; pass a mapping from names to `make_attack(...)` attacks.")
    for name, attack in attacks.items():
        if name in _RESERVED_NAMES or not isinstance(attack, Attack):
            raise ValueError(f"attacks[{name!r}] is invalid: names must not be {_RESERVED_NAMES} and "
                             "values must be `Attack`s from `make_attack`.")
    attack_items = tuple(attacks.items())
    clean_total, attack_totals, worst_total = 0, np.zeros(len(attack_items), np.int64), 0
    batches = _padded_batches(images, labels, batch_size)
    total = _num_batches(len(images), batch_size)
    for index, (x, y, valid) in enumerate(tqdm(batches, total=total, disable=not progress,
                                               desc="robust evaluation")):
        clean, under_attack = _batch_correct(variables, x, y, jax.random.fold_in(key, index),
                                             apply_fn=apply_fn, attacks=attack_items)
        clean, under_attack = np.asarray(clean)[:valid], np.asarray(under_attack)[:, :valid]
        clean_total += clean.sum()
        attack_totals += under_attack.sum(axis=1)
        worst_total += (clean & under_attack.all(axis=0)).sum()
    n = len(images)
    results = {"clean": clean_total / n}
    results.update({name: count / n for (name, _), count in zip(attack_items, attack_totals)})
    results["worst_case"] = worst_total / n
    return {name: float(value) for name, value in results.items()}


# --------------------------------------------------------------------------------------------
# ε sweeps


@functools.partial(jax.jit, static_argnames=("apply_fn", "attack"))
def _sweep_correct(variables, x, y, key, eps_grid, step_sizes, *, apply_fn, attack):
    """Per-example correctness [E, B] under `attack` at every ε of the grid (one vmap)."""
    logits_fn = lambda z: apply_fn(variables, z)

    def correct_at(eps, step_size):
        return _correct(logits_fn(attack(logits_fn, x, y, key, eps=eps, step_size=step_size)), y)

    if step_sizes is None:
        return jax.vmap(lambda eps: correct_at(eps, None))(eps_grid)
    return jax.vmap(correct_at)(eps_grid, step_sizes)


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


def epsilon_sweep(apply_fn: ApplyFn, variables, images, labels, attack: Attack, eps_grid, key,
                  batch_size: int = 1000, step_size_ratio: Optional[float] = None) -> np.ndarray:
    """Robust accuracy under `attack` at each ε of `eps_grid` (float array [E]), vmapped over ε.

    Every ε uses the same per-batch keys (common random numbers), so the curve is smoother.
    Step sizes are ``step_size_ratio · ε``; the ratio defaults to the attack's step_size / eps
    (FGSM without a step size steps ε; APGD adapts its own).
    """
    images, labels = _check_data(images, labels, batch_size)
    if not isinstance(attack, Attack):
        raise ValueError(f"attack={attack!r} is invalid; allowed values: an `Attack` from `make_attack`.")
    eps_grid = np.asarray(eps_grid, np.float32)
    if eps_grid.ndim != 1 or eps_grid.size == 0 or not np.all(np.isfinite(eps_grid)) or np.any(eps_grid < 0):
        raise ValueError(f"eps_grid={eps_grid!r} is invalid; allowed values: a non-empty 1-D array "
                         "of finite numbers >= 0.")
    step_sizes = _sweep_step_sizes(attack, eps_grid, step_size_ratio)
    totals = np.zeros(len(eps_grid), np.int64)
    for index, (x, y, valid) in enumerate(_padded_batches(images, labels, batch_size)):
        correct = _sweep_correct(variables, x, y, jax.random.fold_in(key, index), eps_grid,
                                 step_sizes, apply_fn=apply_fn, attack=attack)
        totals += np.asarray(correct)[:, :valid].sum(axis=1)
    return totals / len(images)


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
    """Checks that robustness numbers are plausible; failures are logged as warnings.

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
    apgd_detail = f"apgd {apgd_ce:.4f}" + ("" if dlr is None else f", apgd_dlr {dlr:.4f}")

    rises = [(float(eps_grid[i]), float(eps_grid[i + 1]), float(sweep[i]), float(sweep[i + 1]))
             for i in range(len(sweep) - 1) if sweep[i + 1] > sweep[i] + tol]
    chance = 1.0 / num_classes
    checks = [
        Check("monotone_in_eps", not rises,
              "accuracy never rises with ε" if not rises else
              "accuracy rises: " + ", ".join(f"ε {a:g}->{b:g}: {p:.4f}->{q:.4f}" for a, b, p, q in rises)),
        Check("eps0_equals_clean", abs(sweep[0] - clean_accuracy) <= tol,
              f"accuracy at ε=0 {sweep[0]:.4f} vs clean {clean_accuracy:.4f}"),
        Check("pgd_not_weaker_than_fgsm", pgd <= fgsm + tol, f"pgd {pgd:.4f} vs fgsm {fgsm:.4f}"),
        Check("apgd_not_weaker_than_pgd", apgd <= pgd + tol, f"{apgd_detail} vs pgd {pgd:.4f}"),
        Check("large_eps_reaches_chance", sweep[-1] <= chance + chance_slack,
              f"accuracy at ε={eps_grid[-1]:g} is {sweep[-1]:.4f}; chance {chance:.4f} "
              f"+ slack {chance_slack:g}"),
    ]
    if dlr is not None:
        checks.append(Check(
            "ce_and_dlr_agree", pgd - dlr <= loss_gap_slack,
            f"pgd (cross-entropy) {pgd:.4f} vs apgd_dlr {dlr:.4f}; gap {pgd - dlr:+.4f}, slack "
            f"{loss_gap_slack:g}" + ("" if pgd - dlr <= loss_gap_slack else
                                      " (cross-entropy attacks overestimate robustness here)")))
    for check in checks:
        if not check.passed:
            logging.warning("Robustness sanity check FAILED: %s: %s", check.name, check.detail)
    return checks


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


def run_sanity_checks(apply_fn: ApplyFn, variables, images, labels, key, *, eps: float,
                      norm: str = "linf", num_steps: int = 20,
                      attacks: Optional[Mapping[str, Attack]] = None, sweep_points: int = 5,
                      large_eps: Optional[float] = None, batch_size: int = 1000,
                      tolerance_examples: int = 1, chance_slack: float = 0.05,
                      loss_gap_slack: float = 0.05, progress: bool = False) -> list[Check]:
    """Evaluates FGSM/PGD/APGD at `eps` and a PGD sweep, then runs `sanity_checks` on the results.

    `attacks` (keys "fgsm", "pgd", "apgd", optionally "apgd_dlr") defaults to
    `sanity_attacks(eps, norm, num_steps, num_classes)`; the
    sweep uses attacks["pgd"] at `sweep_points` values of ε in [0, eps] plus `large_eps` (default:
    the box's width for L∞, its diagonal for L2, enough to reach any input from any other).
    The PGD step scales with ε in the sweep.
    """
    check_choice("norm", norm, NORMS)
    if not (isinstance(eps, numbers.Real) and eps > 0):
        raise ValueError(f"eps={eps!r} is invalid; allowed values: numbers > 0.")
    if isinstance(sweep_points, bool) or not isinstance(sweep_points, int) or sweep_points < 2:
        raise ValueError(f"sweep_points={sweep_points!r} is invalid; allowed values: integers >= 2.")
    images, labels = _check_data(images, labels, batch_size)
    num_classes = jax.eval_shape(lambda z: apply_fn(variables, z), images[:1]).shape[-1]
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
    results = evaluate_robustness(apply_fn, variables, images, labels, attacks, attack_key,
                                  batch_size=batch_size, progress=progress)
    eps_grid = np.append(np.linspace(0.0, eps, sweep_points), large_eps)
    sweep = epsilon_sweep(apply_fn, variables, images, labels, attacks["pgd"], eps_grid, sweep_key,
                          batch_size=batch_size)
    return sanity_checks(clean_accuracy=results["clean"], attack_accuracies=results,
                         eps_grid=eps_grid, sweep_accuracies=sweep, num_examples=len(images),
                         num_classes=num_classes, tolerance_examples=tolerance_examples,
                         chance_slack=chance_slack, loss_gap_slack=loss_gap_slack)
