"""FMN: the Fast Minimum-Norm attack (Pintor et al., NeurIPS 2021), L∞ and L2.

FMN looks for each image's smallest adversarial perturbation. It keeps a norm budget ε_k per
example and takes, at step k, a gradient step of size α_k on the logit difference
``max_{j≠y} z_j − z_y`` (the gradient normalised in L2, as the published algorithm), then
projects onto the ε_k-ball and the box. ε_k adapts towards the decision boundary: when the
iterate is adversarial it shrinks to min(ε_k·(1 − γ_k), best norm so far); when it is not, it
grows by (1 + γ_k) if an adversarial point was found before, else jumps to ‖δ‖ plus the
linearised distance to the boundary, |loss| / ‖∇loss‖_* (dual norm: L1 for L∞, L2 for L2).
α_k and γ_k follow cosine annealing from their initial to their final values. One run gives,
per image, the smallest adversarial norm it found, so robust accuracy at every ε (a robustness
curve) comes from a single run.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from sparse_robust.attacks import parts
from sparse_robust.attacks.parts import LogitsFn
from sparse_robust.losses import margin_parts


def _dual_norm(v, norm: str):
    """The dual norm of a batch [B, ...]: L1 for L∞, L2 for L2."""
    flat = v.reshape(v.shape[0], -1)
    if norm == "linf":
        return jnp.sum(jnp.abs(flat), axis=-1)
    return jnp.sqrt(jnp.sum(jnp.square(flat), axis=-1))


def _cosine(k, num_steps: int, initial, final):
    """Cosine annealing from `initial` (k = 0) towards `final` (k = num_steps)."""
    return final + (initial - final) * (1 + jnp.cos(math.pi * k / num_steps)) / 2


def fmn_min_norm(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, *, norm: str = "linf",
                 num_steps: int = 100, alpha_init: float = 1.0, alpha_final: float = 0.01,
                 gamma_init: float = 0.05, gamma_final: float = 0.001, clip_min: float = 0.0,
                 clip_max: float = 1.0):
    """Per example the smallest adversarial point FMN finds and its norm: (x_adv [B, ...],
    norm [B]). 0 for an image misclassified clean; +∞ (and x_adv = x) where no step was
    adversarial. Every x_adv lies in the box. Pure and jittable."""
    parts.check_settings("fmn", dict(norm=norm, num_steps=num_steps, alpha_init=alpha_init,
                                     alpha_final=alpha_final, gamma_init=gamma_init,
                                     gamma_final=gamma_final, clip_min=clip_min,
                                     clip_max=clip_max))
    x, y = jnp.asarray(x), jnp.asarray(y)
    parts.check_inputs(x, y, None, False, clip_min, clip_max)
    parts.num_classes_at_least(logits_fn, x, 2, "FMN")
    # The largest perturbation the box allows: no budget beyond it is useful.
    worst_norm = parts.norm_of(jnp.maximum(x - clip_min, clip_max - x), norm)

    def loss_fn(delta):
        logits = logits_fn(x + delta)
        true_logit, other_logit = margin_parts(logits, y)
        loss = other_logit - true_logit  # > 0 exactly when misclassified (ties aside)
        return jnp.sum(loss), (loss, jnp.argmax(logits, axis=-1) != y)

    def step(k, state):
        delta, eps, best_norm, best_adv, found = state
        alpha = _cosine(k, num_steps, alpha_init, alpha_final)
        gamma = _cosine(k, num_steps, gamma_init, gamma_final)
        (_, (loss, adversarial)), grad = jax.value_and_grad(loss_fn, has_aux=True)(delta)
        delta_norm = parts.norm_of(delta, norm)
        smaller = adversarial & (delta_norm < best_norm)
        best_norm = jnp.where(smaller, delta_norm, best_norm)
        best_adv = jnp.where(parts.expand(smaller, x), x + delta, best_adv)
        found = found | adversarial
        to_boundary = jnp.abs(loss) / (_dual_norm(grad, norm) + parts.TINY)
        eps = jnp.where(adversarial, jnp.minimum(eps * (1 - gamma), best_norm),
                        jnp.where(found, eps * (1 + gamma), delta_norm + to_boundary))
        eps = jnp.minimum(eps, worst_norm)
        unit = grad / jnp.maximum(parts.l2_norm(grad), parts.TINY)
        moved = parts.project(x + delta + alpha * unit, x, parts.expand(eps, x), norm, clip_min,
                              clip_max)
        return moved - x, eps, best_norm, best_adv, found

    batch = x.shape[:1]
    state = (jnp.zeros_like(x), jnp.full(batch, jnp.inf, x.dtype),
             jnp.full(batch, jnp.inf, x.dtype), x, jnp.zeros(batch, bool))
    _, _, best_norm, best_adv, _ = lax.fori_loop(0, num_steps, step, state)
    return lax.stop_gradient(best_adv), lax.stop_gradient(best_norm)


def fmn(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, key: Optional[jax.Array], *,
        eps, norm: str = "linf", num_steps: int = 100, alpha_init: float = 1.0,
        alpha_final: float = 0.01, gamma_init: float = 0.05, gamma_final: float = 0.001,
        clip_min: float = 0.0, clip_max: float = 1.0) -> jax.Array:
    """FMN as a fixed-budget attack (no randomness, so `key` is unused): the smallest
    adversarial point of `fmn_min_norm` where its norm is at most ε, else x."""
    parts.check_settings("fmn", dict(eps=eps, norm=norm, num_steps=num_steps,
                                     alpha_init=alpha_init, alpha_final=alpha_final,
                                     gamma_init=gamma_init, gamma_final=gamma_final,
                                     clip_min=clip_min, clip_max=clip_max))
    x = jnp.asarray(x)
    x_adv, found_norm = fmn_min_norm(
        logits_fn, x, y, norm=norm, num_steps=num_steps, alpha_init=alpha_init,
        alpha_final=alpha_final, gamma_init=gamma_init, gamma_final=gamma_final,
        clip_min=clip_min, clip_max=clip_max)
    within = found_norm <= parts.as_float(eps, x)
    return jnp.where(parts.expand(within, x), x_adv, x)
