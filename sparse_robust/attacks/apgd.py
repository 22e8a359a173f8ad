"""APGD and APGD-T (Croce & Hein 2020), as the reference implementation (fra31/auto-attack)
runs them."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparse_robust.attacks import parts
from sparse_robust.attacks.parts import LogitsFn
from sparse_robust.losses import targeted_dlr_loss

_APGD_MOMENTUM = 0.75  # α in Croce & Hein (2020).
_APGD_INITIAL_STEP = 2.0  # η(0) = 2ε.


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
    """One APGD run from a random point of the ε-sphere (`parts.boundary_start` with
    `key`): the worst (x_adv, success, objective) triple it visits."""
    start = parts.boundary_start(key, x, eps, norm, clip_min, clip_max)
    return _apgd_from(objective, x, start, eps, num_steps=num_steps, norm=norm, rho=rho,
                      clip_min=clip_min, clip_max=clip_max)


def _apgd_from(objective, x, start, eps, *, num_steps: int, norm: str, rho: float,
               clip_min: float, clip_max: float):
    """`_apgd_run` from a given start (in the ε-ball and the box)."""
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

    Starts at a random point on the ε-sphere (`parts.boundary_start`, as the reference; PGD
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
    parts.check_inputs(x, y, key, True, clip_min, clip_max)
    objective = parts.make_objective(logits_fn, x, y, loss, targeted=False)
    eps = parts.as_float(eps, x)

    run = functools.partial(_apgd_run, objective, x, eps=eps, num_steps=num_steps, norm=norm,
                            rho=rho, clip_min=clip_min, clip_max=clip_max)
    return lax.stop_gradient(parts.worst_over_restarts(run, key, x, restarts)[0])


def _targeted_objective(logits_fn: LogitsFn, y, target):
    """APGD-T's objective: the targeted DLR loss; success is misclassification (any class)."""
    def objective(x_adv):
        logits = logits_fn(x_adv)
        return targeted_dlr_loss(logits, y, target), jnp.argmax(logits, axis=-1) != y

    return objective


def apgd_t(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, key: jax.Array, *, eps,
           num_steps: int = 100, norm: str = "linf", n_target_classes: int = 9, restarts: int = 1,
           rho: float = 0.75, clip_min: float = 0.0, clip_max: float = 1.0) -> jax.Array:
    """APGD-T (Croce & Hein 2020): APGD on the targeted DLR loss, once per target.

    Targets are the classes ranked 2nd to (n_target_classes + 1)-th by the clean logits
    (`parts.ranked_targets`); the run for target rank r (0-based) uses
    ``fold_in(key, r)`` (its restarts split it, as in `pgd`). Each run ascends
    ``losses.targeted_dlr_loss`` with y the true label. As in the reference, success is
    misclassification (into any class), which is what robust accuracy counts. Returns per example the worst point over all runs (misclassified
    first, then the highest targeted DLR). Needs at least 4 classes.
    """
    parts.check_settings("apgd_t", dict(eps=eps, num_steps=num_steps, norm=norm,
                                        n_target_classes=n_target_classes, restarts=restarts,
                                        rho=rho, clip_min=clip_min, clip_max=clip_max))
    x, y = jnp.asarray(x), jnp.asarray(y)
    parts.check_inputs(x, y, key, True, clip_min, clip_max)
    parts.check_target_count(logits_fn, x, n_target_classes, 4, "APGD-T (targeted DLR loss)")
    eps = parts.as_float(eps, x)
    targets = parts.ranked_targets(logits_fn, x, n_target_classes)

    def target_run(worst, rank_and_target):
        rank, target = rank_and_target
        objective = _targeted_objective(logits_fn, y, target)
        run = functools.partial(_apgd_run, objective, x, eps=eps, num_steps=num_steps, norm=norm,
                                rho=rho, clip_min=clip_min, clip_max=clip_max)
        result = parts.worst_over_restarts(run, jax.random.fold_in(key, rank), x, restarts)
        return parts.keep_worst(worst, result), None

    worst, _ = lax.scan(target_run, parts.initial_worst(x),
                        (jnp.arange(n_target_classes), targets.T))
    return lax.stop_gradient(worst[0])


# --------------------------------------------------------------------------------------------
# One pass (one target and restart) at a time, for drivers that attack only the points still
# robust between passes (`sparse_robust.attacks.passes`). Pass p of `apgd` is restart p; pass p of
# `apgd_t` is target rank p // restarts, restart p % restarts (target outer, as the reference).


def pass_start(key, x, index, *, eps, norm: str, restarts: int, targeted: bool,
               clip_min: float, clip_max: float):
    """The random start of pass `index` for every row of a batch: exactly the start that
    `apgd` / `apgd_t` draw for that restart and target from `key` on the same batch."""
    x = jnp.asarray(x)
    if targeted:
        key = jax.random.fold_in(key, index // restarts)
    if restarts > 1:
        key = jax.random.split(key, restarts)[index % restarts]
    return parts.boundary_start(key, x, parts.as_float(eps, x), norm, clip_min, clip_max)


def apgd_pass(logits_fn: LogitsFn, x, y, start, index, *, eps, num_steps: int, norm: str,
              loss: str, targeted: bool, n_target_classes: int, restarts: int, rho: float,
              clip_min: float, clip_max: float) -> jax.Array:
    """Pass `index` of `apgd` (untargeted, `loss`) or `apgd_t` (`targeted`) from `start` (see
    `pass_start`): the worst point of that one run. Rows are independent, so a row's result
    does not depend on which other rows share its batch."""
    x, y = jnp.asarray(x), jnp.asarray(y)
    eps = parts.as_float(eps, x)
    if targeted:
        targets = parts.ranked_targets(logits_fn, x, n_target_classes)
        objective = _targeted_objective(logits_fn, y, targets[:, index // restarts])
    else:
        objective = parts.make_objective(logits_fn, x, y, loss, targeted=False)
    worst = _apgd_from(objective, x, start, eps, num_steps=num_steps, norm=norm, rho=rho,
                       clip_min=clip_min, clip_max=clip_max)
    return lax.stop_gradient(worst[0])
