"""FGSM and PGD (Madry et al. 2018), L∞ and L2, with CE, margin and KL losses."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from sparse_robust.attacks import parts
from sparse_robust.attacks.parts import LogitsFn


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
    parts.check_inputs(x, y, key, random_start, clip_min, clip_max)
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


def fgsm(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, key: Optional[jax.Array], *,
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
