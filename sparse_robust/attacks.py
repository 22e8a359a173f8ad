"""Adversarial attacks as pure jittable functions: FGSM, PGD (L∞ / L2), APGD and APGD-T (Croce &
Hein 2020, as the reference implementation runs them), FAB-T (`sparse_robust.fab`), Square
(`sparse_robust.square`) and standard AutoAttack, which composes them.

An attack is a pure function ``(logits_fn, x, y, key, **settings) -> x_adv`` where
``logits_fn(x) -> logits`` closes over a model in eval mode, ``x`` is a batch [B, ...] lying in
[clip_min, clip_max] (default [0, 1]) and ``y`` holds int labels [B]. ``eps`` and ``step_size`` may
be traced values (so ``jax.vmap`` over an ε grid compiles once); every other setting is a static
Python value, validated before anything is traced. The result always lies in the ε-ball around
``x`` (L∞ or L2) and in [clip_min, clip_max], and is returned under ``lax.stop_gradient``.

``make_attack(name, **settings)`` bundles validated settings into a hashable `Attack`, callable as
``attack(logits_fn, x, y, key, *, eps=None, step_size=None)``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparse_robust import attack_parts as parts
from sparse_robust.attack_parts import NORMS, LogitsFn
from sparse_robust.checks import check_choice
from sparse_robust.fab import fab_t
from sparse_robust.losses import dlr_loss, margin_parts, targeted_dlr_loss
from sparse_robust.square import square, square_schedule

__all__ = ["NORMS", "ATTACK_NAMES", "AUTOATTACK_STAGES", "Attack", "make_attack", "fgsm", "pgd",
           "apgd", "apgd_checkpoints", "apgd_t", "fab_t", "square", "square_schedule", "autoattack",
           "autoattack_with_flags", "autoattack_stages", "predicted_labels", "margin_parts",
           "dlr_loss"]

ATTACK_NAMES = ("fgsm", "pgd", "apgd", "apgd_t", "fab_t", "square", "autoattack")

_APGD_MOMENTUM = 0.75  # α in Croce & Hein (2020).
_APGD_INITIAL_STEP = 2.0  # η(0) = 2ε.


# --------------------------------------------------------------------------------------------
# Attacks


def predicted_labels(logits_fn: LogitsFn, x: jax.Array) -> jax.Array:
    """The model's own predictions (argmax of the logits), under stop-gradient."""
    return lax.stop_gradient(jnp.argmax(logits_fn(x), axis=-1))


def pgd(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, key: Optional[jax.Array], *,
        eps, step_size, num_steps: int, norm: str = "linf", random_start: bool = True,
        restarts: int = 1, loss: str = "ce", targeted: bool = False,
        clip_min: float = 0.0, clip_max: float = 1.0) -> jax.Array:
    """Projected gradient descent (Madry et al. 2018).

    Each of `num_steps` steps moves `step_size` along the sign of the gradient (L∞) or the
    normalised gradient (L2) and projects back onto the ε-ball and the box. The start is uniform in
    the ball when `random_start` (see `_random_start`; needs `key`). Losses: "ce", "margin"
    (max other logit − true logit) and "kl" (KL(p_clean ‖ p_adv), TRADES). With `targeted`, y is
    the target class and the loss is decreased. With `restarts` R > 1, each example keeps the worst
    of the R final iterates (misclassified first, then highest loss); restart r starts from
    ``jax.random.split(key, R)[r]``.
    """
    parts.check_settings("pgd", dict(eps=eps, step_size=step_size, num_steps=num_steps, norm=norm,
                                random_start=random_start, restarts=restarts, loss=loss,
                                targeted=targeted, clip_min=clip_min, clip_max=clip_max))
    x, y = jnp.asarray(x), jnp.asarray(y)
    parts.check_inputs(x, y, key, needs_key=random_start)
    objective = parts.make_objective(logits_fn, x, y, loss, targeted)
    eps, step_size = parts.as_float(eps, x), parts.as_float(step_size, x)

    def step(_, x_adv):
        _, _, grad = parts.objective_and_grad(objective, x_adv)
        moved = x_adv + step_size * parts.ascent_direction(grad, norm)
        return parts.project(moved, x, eps, norm, clip_min, clip_max)

    def run(run_key):
        start = parts.random_start(run_key, x, eps, norm, clip_min, clip_max) if random_start else x
        x_adv = lax.fori_loop(0, num_steps, step, start)
        value, success = objective(x_adv)  # Only used across restarts (dead code otherwise).
        return x_adv, success, value

    return lax.stop_gradient(parts.worst_over_restarts(run, key, x, restarts)[0])


def fgsm(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, key: Optional[jax.Array] = None, *,
         eps, step_size=None, random_start: bool = False, loss: str = "ce", targeted: bool = False,
         norm: str = "linf", clip_min: float = 0.0, clip_max: float = 1.0) -> jax.Array:
    """Fast gradient sign method: one step of `step_size` (default eps), projected on the ε-ball.

    With ``random_start=True`` and ``step_size=1.25 * eps`` this is the "fast" FGSM of
    Wong et al. (2020). ``norm="l2"`` steps along the normalised gradient (fast gradient method).
    """
    parts.check_settings("fgsm", dict(eps=eps, step_size=step_size, random_start=random_start, loss=loss,
                                 targeted=targeted, norm=norm, clip_min=clip_min, clip_max=clip_max))
    return pgd(logits_fn, x, y, key, eps=eps, step_size=eps if step_size is None else step_size,
               num_steps=1, norm=norm, random_start=random_start, restarts=1, loss=loss,
               targeted=targeted, clip_min=clip_min, clip_max=clip_max)


def apgd_checkpoints(num_steps: int) -> list[int]:
    """Iterations at which APGD may halve its step size, placed as the reference implementation
    (fra31/auto-attack) places them: the first after k_1 = max(⌊0.22·N⌋, 1) steps, then every
    k_{j+1} = max(k_j − max(⌊0.03·N⌋, 1), max(⌊0.06·N⌋, 1)) steps, N = num_steps.

    The paper's w_j = ⌈p_j·N⌉ gives the same points for N = 100 but not for short runs
    (N = 20: 5, 9, 12, … against 4, 7, 9, 10, …); AutoAttack's numbers come from the reference.
    Integer arithmetic here equals the reference's int(0.22 * N) etc. for every N < 5000.
    """
    interval = max(22 * num_steps // 100, 1)
    shrink, shortest = max(3 * num_steps // 100, 1), max(6 * num_steps // 100, 1)
    checkpoints, at = [], interval
    while at <= num_steps:
        checkpoints.append(at)
        interval = max(interval - shrink, shortest)
        at += interval
    return checkpoints


def _apgd_run(objective, x, key, eps, *, num_steps: int, norm: str, rho: float,
              clip_min: float, clip_max: float):
    """One APGD run from a random point of the ε-sphere (`attack_parts.boundary_start` with
    `key`): the worst (x_adv, success, objective) triple it visits."""
    checkpoints = apgd_checkpoints(num_steps)
    # Static per-iteration tables: is iteration i (producing x^(i+1)) a checkpoint, and how long
    # was the interval that ends there.
    is_checkpoint = np.zeros(num_steps, bool)
    interval = np.zeros(num_steps, np.float32)
    for previous, current in zip([0] + checkpoints, checkpoints):
        is_checkpoint[current - 1] = True
        interval[current - 1] = current - previous
    is_checkpoint, interval = jnp.asarray(is_checkpoint), jnp.asarray(interval)

    def project(z):
        return parts.project(z, x, eps, norm, clip_min, clip_max)

    def step(i, state):
        eta = parts.expand(state["eta"], x)
        x_cur = state["x"]
        momentum = jnp.where(i == 0, 1.0, _APGD_MOMENTUM).astype(x.dtype)
        z = project(x_cur + eta * parts.ascent_direction(state["grad"], norm))
        x_new = project(x_cur + momentum * (z - x_cur) + (1 - momentum) * (x_cur - state["x_prev"]))
        value, success, grad = parts.objective_and_grad(objective, x_new)

        increases = state["increases"] + (value > state["value"])
        improved = value > state["best_value"]
        best_x = jnp.where(parts.expand(improved, x), x_new, state["best_x"])
        best_grad = jnp.where(parts.expand(improved, x), grad, state["best_grad"])
        best_value = jnp.where(improved, value, state["best_value"])
        worst = parts.keep_worst(state["worst"], (x_new, success, value))

        at_check = is_checkpoint[i]
        # `<=`, not `<`: the reference halves when at most rho·k of the k steps increased the loss.
        stalled = increases <= rho * interval[i]
        no_progress = ~state["reduced_last"] & (state["best_at_last_check"] >= best_value)
        reduce = at_check & (stalled | no_progress)
        reset = parts.expand(reduce, x)
        return dict(
            x=jnp.where(reset, best_x, x_new),
            x_prev=x_cur,
            grad=jnp.where(reset, best_grad, grad),
            # The last iterate's loss even after a reset to the best point: the reference's loss
            # history records iterates, so the next step's "increase" is judged against it.
            value=value,
            eta=jnp.where(reduce, state["eta"] / 2, state["eta"]),
            increases=jnp.where(at_check, 0, increases),
            reduced_last=jnp.where(at_check, reduce, state["reduced_last"]),
            best_at_last_check=jnp.where(at_check, best_value, state["best_at_last_check"]),
            best_x=best_x, best_grad=best_grad, best_value=best_value, worst=worst)

    start = parts.boundary_start(key, x, eps, norm, clip_min, clip_max)
    value, success, grad = parts.objective_and_grad(objective, start)
    batch = x.shape[:1]
    state = dict(
        x=start, x_prev=start, grad=grad,
        # The reference's loss history holds 0 before the first step (its first window reads an
        # unwritten entry), so the first step counts as an increase iff its loss exceeds 0.
        value=jnp.zeros_like(value),
        eta=jnp.full(batch, _APGD_INITIAL_STEP, x.dtype) * eps,
        increases=jnp.zeros(batch, jnp.int32),
        # Condition (2) cannot fire at the first checkpoint: the reference starts this flag at 1.
        reduced_last=jnp.ones(batch, bool),
        best_at_last_check=value, best_x=start, best_grad=grad, best_value=value,
        worst=(start, success, value))
    return lax.fori_loop(0, num_steps, step, state)["worst"]


def apgd(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, key: jax.Array, *, eps, num_steps: int,
         norm: str = "linf", loss: str = "ce", restarts: int = 1, rho: float = 0.75,
         clip_min: float = 0.0, clip_max: float = 1.0) -> jax.Array:
    """Auto-PGD (Croce & Hein 2020, Algorithm 1) as the reference implementation runs it.

    Starts at a random point on the ε-sphere (`attack_parts.boundary_start`, as the reference; PGD
    keeps Madry's uniform start), steps with η = 2ε and momentum α = 0.75, and at each checkpoint
    (`apgd_checkpoints`) halves η of an example and restarts it from its best point when (1) at
    most rho·k of its k steps since the last checkpoint increased the loss, or (2) η was not
    halved at the last checkpoint (never true at the first) and the best loss did not improve
    since. Uses num_steps + 1 gradient evaluations. Returns per example the worst point seen
    (misclassified first, then highest loss). Losses: "ce" and "dlr" (difference of logits ratio,
    needs >= 3 classes). Restarts as in `pgd`.
    """
    parts.check_settings("apgd", dict(eps=eps, num_steps=num_steps, norm=norm, loss=loss,
                                      restarts=restarts, rho=rho, clip_min=clip_min, clip_max=clip_max))
    x, y = jnp.asarray(x), jnp.asarray(y)
    parts.check_inputs(x, y, key, needs_key=True)
    objective = parts.make_objective(logits_fn, x, y, loss, targeted=False)
    eps = parts.as_float(eps, x)

    run = functools.partial(_apgd_run, objective, x, eps=eps, num_steps=num_steps, norm=norm,
                            rho=rho, clip_min=clip_min, clip_max=clip_max)
    return lax.stop_gradient(parts.worst_over_restarts(run, key, x, restarts)[0])


def apgd_t(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, key: jax.Array, *, eps,
           num_steps: int = 100, norm: str = "linf", n_target_classes: int = 9, restarts: int = 1,
           rho: float = 0.75, clip_min: float = 0.0, clip_max: float = 1.0) -> jax.Array:
    """APGD-T (Croce & Hein 2020): APGD on the targeted DLR loss, once per target.

    Targets are the classes ranked 2nd to (n_target_classes + 1)-th by the clean logits
    (`attack_parts.ranked_targets`); the run for target rank r (0-based) uses
    ``fold_in(key, r)`` (its restarts split it, as in `pgd`). Each run ascends
    ``losses.targeted_dlr_loss`` with y the true label. As in the reference, success is
    misclassification (into any class), which is what robust accuracy counts. Returns per example the worst point over all runs (misclassified
    first, then the highest targeted DLR). Needs at least 4 classes.
    """
    parts.check_settings("apgd_t", dict(eps=eps, num_steps=num_steps, norm=norm,
                                        n_target_classes=n_target_classes, restarts=restarts,
                                        rho=rho, clip_min=clip_min, clip_max=clip_max))
    x, y = jnp.asarray(x), jnp.asarray(y)
    parts.check_inputs(x, y, key, needs_key=True)
    parts.check_target_count(logits_fn, x, n_target_classes, 4, "APGD-T (targeted DLR loss)")
    eps = parts.as_float(eps, x)
    targets = parts.ranked_targets(logits_fn, x, n_target_classes)

    def target_run(worst, rank_and_target):
        rank, target = rank_and_target

        def objective(x_adv):
            logits = logits_fn(x_adv)
            return targeted_dlr_loss(logits, y, target), jnp.argmax(logits, axis=-1) != y

        run = functools.partial(_apgd_run, objective, x, eps=eps, num_steps=num_steps, norm=norm,
                                rho=rho, clip_min=clip_min, clip_max=clip_max)
        result = parts.worst_over_restarts(run, jax.random.fold_in(key, rank), x, restarts)
        return parts.keep_worst(worst, result), None

    worst, _ = lax.scan(target_run, parts.initial_worst(x),
                        (jnp.arange(n_target_classes), targets.T))
    return lax.stop_gradient(worst[0])


# --------------------------------------------------------------------------------------------
# AutoAttack (the standard version of Croce & Hein 2020)

AUTOATTACK_STAGES = ("apgd_ce", "apgd_t", "fab_t", "square")


def _autoattack_plan(norm, num_steps, n_target_classes, num_queries, image_shape, clip_min,
                     clip_max):
    """(stage, attack name, settings but eps) of the standard version, in order, with the
    reference's settings: one restart, 100 steps, 9 targets, and Square with p_init 0.8 and
    5000 queries on the schedule of 10,000 (AutoAttack does not rescale it)."""
    box = dict(norm=norm, clip_min=clip_min, clip_max=clip_max)
    targeted = dict(num_steps=num_steps, n_target_classes=n_target_classes, **box)
    return (("apgd_ce", "apgd", dict(num_steps=num_steps, loss="ce", **box)),
            ("apgd_t", "apgd_t", targeted),
            ("fab_t", "fab_t", targeted),
            ("square", "square", dict(num_queries=num_queries, p_init=0.8, rescale_schedule=False,
                                      image_shape=image_shape, **box)))


def autoattack_stages(eps: float, norm: str = "linf", *, num_steps: int = 100,
                      n_target_classes: int = 9, num_queries: int = 5000,
                      image_shape: Optional[tuple[int, int, int]] = None, clip_min: float = 0.0,
                      clip_max: float = 1.0) -> dict[str, Attack]:
    """The stages of standard AutoAttack as `Attack`s, in order: {"apgd_ce", "apgd_t", "fab_t",
    "square"}. Each is a static jit argument, so an evaluator compiles one program per stage (see
    `sparse_robust.autoattack.run_stages`); `autoattack_with_flags` runs the same stages."""
    return {stage: make_attack(name, eps=eps, **settings) for stage, name, settings in
            _autoattack_plan(norm, num_steps, n_target_classes, num_queries, image_shape,
                             clip_min, clip_max)}


def autoattack_with_flags(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, key: jax.Array, *,
                          eps, norm: str = "linf", num_steps: int = 100, n_target_classes: int = 9,
                          num_queries: int = 5000, image_shape: Optional[tuple[int, int, int]] = None,
                          clip_min: float = 0.0, clip_max: float = 1.0):
    """Standard AutoAttack on one batch: APGD-CE, APGD-T, FAB-T, then Square (`autoattack_stages`),
    stage i with ``fold_in(key, i)``.

    Returns (x_adv, flags). flags maps "clean" and each stage name to bool [B]: correctly
    classified on clean data and at the adversarial point of every stage so far (so an example
    robust after a stage is robust under each earlier one). x_adv holds per example the point
    of the first stage that broke it, else x, so ``argmax(logits_fn(x_adv)) == y`` is exactly
    flags["square"]. Every stage runs on the whole batch (shapes are static); to skip examples
    already broken, run the stages with `sparse_robust.autoattack.run_stages`.
    """
    settings = dict(eps=eps, norm=norm, num_steps=num_steps, n_target_classes=n_target_classes,
                    num_queries=num_queries, image_shape=image_shape, clip_min=clip_min,
                    clip_max=clip_max)
    parts.check_settings("autoattack", settings)
    x, y = jnp.asarray(x), jnp.asarray(y)
    parts.check_inputs(x, y, key, needs_key=True)

    def correct(z):
        return jnp.argmax(logits_fn(z), axis=-1) == y

    robust = correct(x)
    flags, x_adv = {"clean": robust}, x
    plan = _autoattack_plan(norm, num_steps, n_target_classes, num_queries, image_shape,
                            clip_min, clip_max)
    for index, (stage, name, stage_settings) in enumerate(plan):
        candidate = _ATTACK_FNS[name](logits_fn, x, y, jax.random.fold_in(key, index), eps=eps,
                                      **stage_settings)
        still_correct = correct(candidate)
        x_adv = jnp.where(parts.expand(robust & ~still_correct, x), candidate, x_adv)
        robust = robust & still_correct
        flags[stage] = robust
    return lax.stop_gradient(x_adv), flags


def autoattack(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, key: jax.Array, *, eps,
               norm: str = "linf", num_steps: int = 100, n_target_classes: int = 9,
               num_queries: int = 5000, image_shape: Optional[tuple[int, int, int]] = None,
               clip_min: float = 0.0, clip_max: float = 1.0) -> jax.Array:
    """Standard AutoAttack as an attack: the x_adv of `autoattack_with_flags`."""
    return autoattack_with_flags(
        logits_fn, x, y, key, eps=eps, norm=norm, num_steps=num_steps,
        n_target_classes=n_target_classes, num_queries=num_queries, image_shape=image_shape,
        clip_min=clip_min, clip_max=clip_max)[0]


# --------------------------------------------------------------------------------------------
# Factory

_ATTACK_FNS = types.MappingProxyType({"fgsm": fgsm, "pgd": pgd, "apgd": apgd, "apgd_t": apgd_t,
                                      "fab_t": fab_t, "square": square, "autoattack": autoattack})


def _keyword_defaults(fn) -> dict[str, Any]:
    """Keyword-only parameters of an attack function and their defaults (inspect.Parameter.empty
    for required ones): the single source of each attack's settings."""
    return {name: p.default for name, p in inspect.signature(fn).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


@dataclasses.dataclass(frozen=True)
class Attack:
    """An attack with validated settings; hashable, so it can be a static argument of `jax.jit`.

    Call as ``attack(logits_fn, x, y, key, *, eps=None, step_size=None)``; `eps` and `step_size`
    (traced values allowed) override the stored defaults, e.g. for ε sweeps. With
    ``label_source="predicted"`` the attack targets the model's own predictions and ignores `y`.
    """

    name: str
    eps: float
    step_size: Optional[float]
    label_source: str
    options: tuple[tuple[str, Any], ...]  # The remaining static settings, sorted by name.

    @property
    def uses_step_size(self) -> bool:
        return self.name in ("fgsm", "pgd")

    def __call__(self, logits_fn: LogitsFn, x: jax.Array, y: jax.Array, key, *,
                 eps=None, step_size=None) -> jax.Array:
        kwargs = dict(self.options)
        kwargs["eps"] = self.eps if eps is None else eps
        if self.uses_step_size:
            kwargs["step_size"] = self.step_size if step_size is None else step_size
        elif step_size is not None:
            raise ValueError(f"step_size={step_size!r} is invalid for attack {self.name!r}, which "
                             "adapts its own step size; allowed values: None.")
        if self.label_source == "predicted":
            y = predicted_labels(logits_fn, x)
        return _ATTACK_FNS[self.name](logits_fn, x, y, key, **kwargs)


def make_attack(name: str, **settings) -> Attack:
    """Builds an `Attack` from a name (`ATTACK_NAMES`) and its keyword settings.

    Accepts the keyword settings of the attack function plus ``label_source`` ("true" or
    "predicted"), e.g. ``make_attack(**config.attack.to_dict())`` with
    ``{"name": "pgd", "eps": 0.3, "step_size": 0.05, "num_steps": 10, "label_source": "predicted"}``.
    Raises ValueError naming the field, the bad value and the allowed values.
    """
    check_choice("name", name, ATTACK_NAMES)
    defaults = _keyword_defaults(_ATTACK_FNS[name])
    defaults["label_source"] = "true"
    unknown = sorted(set(settings) - set(defaults))
    if unknown:
        raise ValueError(f"Unknown setting(s) {unknown} for attack {name!r}; "
                         f"allowed settings: {sorted(defaults)}.")
    resolved = {**defaults, **settings}
    missing = sorted(k for k, v in resolved.items() if v is inspect.Parameter.empty)
    if missing:
        raise ValueError(f"Attack {name!r} needs setting(s) {missing}.")
    parts.check_settings(name, resolved)
    step_size = resolved.pop("step_size", None)
    return Attack(
        name=name,
        eps=float(resolved.pop("eps")),
        step_size=None if step_size is None else float(step_size),
        label_source=resolved.pop("label_source"),
        options=tuple(sorted(resolved.items())),
    )
