"""HARP (Zhao & Wressnegger, ICLR 2023, "Holistic Adversarially Robust Pruning"): learn *which*
weights to keep (a score per weight) and *how many* in each layer (a keep rate per layer) at once.

The weights of an adversarially trained dense network stay frozen. Layer l has scores s_l and one
rate logit ρ_l; its keep rate is ``k_l = k_min + (1 − k_min)·sigmoid(ρ_l)`` with
``k_min = α·target`` (target: the weights remaining the whole network must reach), and its mask
keeps the ``round(k_l·n_l)`` highest scores. The straight-through estimator (as in the authors'
code) passes the gradient g = ∂L/∂m of the mask to every score unchanged and to the layer's keep
rate as Σ g over the layer: the backward pass is that of ``m ≈ M + s + k_l`` (M the hard mask held
constant). The loss is the adversarial loss plus ``γ·max(Σ n_l k_l / Σ n_l / target − 1, 0)``,
γ rising linearly from 0 to ``gamma`` over the score phase. The final mask takes the learned
per-layer rates, scaled by one common factor so that it meets the target exactly (the score phase
ends near it, not on it), and the weights are then fine-tuned adversarially under it.

Scores start from HYDRA's scaled magnitudes (``hydra.init_scores``); rates start at the target.
Trees: scores and rate logits have the mask's structure (an array, resp. a scalar, per prunable
leaf; None elsewhere). The score phase's params are ``{"scores": ..., "rate_logits": ...}`` and its
model state ``{"weights": frozen params, "model_state": the model's, "step": int}``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparse_robust import masks as masks_lib
from sparse_robust import training
from sparse_robust.checks import check_number
from sparse_robust.objectives import WrappedObjective
from sparse_robust.pruning import hydra

init_scores = hydra.init_scores


def check_settings(target: float, alpha: float) -> tuple[float, float]:
    """(target, alpha) as floats; ValueError with the allowed values otherwise."""
    target = check_number("target", target, 0, 1, low_open=True, high_open=True)
    alpha = check_number("alpha", alpha, 0, 1, high_open=True)
    return target, alpha


def k_min(target: float, alpha: float) -> float:
    """The lowest keep rate a layer may learn: ``alpha · target``."""
    target, alpha = check_settings(target, alpha)
    return alpha * target


def keep_rate(logit, kmin: float):
    """``k = k_min + (1 − k_min)·sigmoid(logit)``."""
    return kmin + (1.0 - kmin) * jax.nn.sigmoid(logit)


def init_rate_logits(mask, target: float, alpha: float, start: float | None = None):
    """A scalar logit per prunable leaf, such that every layer starts at keep rate ``start``
    (default: the target)."""
    kmin = k_min(target, alpha)
    start = target if start is None else check_number("start", start, kmin, 1, low_open=True,
                                                       high_open=True)
    p = (start - kmin) / (1.0 - kmin)
    logit = math.log(p / (1.0 - p))
    return masks_lib.map_prunable(lambda m: jnp.asarray(logit, jnp.float32), mask)


def _sizes(scores) -> list[int]:
    return [int(np.size(s)) for s in jax.tree_util.tree_leaves(scores)]


def topk_at_rates(scores, rates):
    """The hard mask: in each leaf, the ``round(k·n)`` highest scores (ties to the earlier index).

    ``rates`` may be traced (jittable); it has the scores' structure with a scalar per leaf.
    """
    def keep(s, k):
        flat = jnp.ravel(s)
        count = jnp.round(k * flat.size).astype(jnp.int32)
        rank = jnp.argsort(jnp.argsort(-flat, stable=True), stable=True)
        return (rank < count).reshape(jnp.shape(s))

    return jax.tree_util.tree_map(keep, scores, rates)


def masked_weights(weights, scores, rate_logits, kmin: float):
    """``w ⊙ topk_k(s)`` forward; backward as if the mask were ``M + s + k``: the scores get
    ``g·w`` per weight and each rate ``Σ g·w`` over its layer (g = ∂L/∂(w ⊙ m))."""
    rates = jax.tree_util.tree_map(lambda r: keep_rate(r, kmin), rate_logits)
    hard = topk_at_rates(jax.lax.stop_gradient(scores), jax.lax.stop_gradient(rates))

    def gate(s, m, k, w):
        if s is None:
            return w
        ste = m.astype(w.dtype) + (s - jax.lax.stop_gradient(s)) + (k - jax.lax.stop_gradient(k))
        return w * ste.astype(w.dtype)

    return jax.tree_util.tree_map(gate, scores, hard, rates, weights, is_leaf=masks_lib.is_none)


def density(rate_logits, sizes, kmin: float):
    """Σ n_l k_l / Σ n_l: the fraction of weights the learned rates keep (traceable)."""
    rates = [keep_rate(r, kmin) for r in jax.tree_util.tree_leaves(rate_logits)]
    return sum(n * k for n, k in zip(sizes, rates)) / float(sum(sizes))


def rate_penalty(rate_logits, sizes, kmin: float, target: float):
    """``max(Σ n_l k_l / Σ n_l / target − 1, 0)``: how far the rates keep more than the target."""
    return jnp.maximum(density(rate_logits, sizes, kmin) / target - 1.0, 0.0)


def make_score_model_fn(model_fn: training.ModelFn, kmin: float) -> training.ModelFn:
    """A model_fn whose trainable params are ``{"scores", "rate_logits"}``; the frozen weights
    ride in its model state (see :func:`create_score_state`) and get no gradient."""

    def score_model_fn(params, state, x, train):
        weights = masked_weights(state["weights"], params["scores"], params["rate_logits"], kmin)
        logits, inner = model_fn(weights, state["model_state"], x, train)
        return logits, {**state, "model_state": inner}

    return score_model_fn


@dataclasses.dataclass(frozen=True)
class RatePenalizedObjective(WrappedObjective):
    """The adversarial objective plus ``γ_t · rate_penalty``, γ_t = gamma · t / num_steps.

    Counts its steps in the model state's "step" (so a resumed phase continues the schedule);
    reads as its inner objective otherwise (name, adv_weight for early stopping).
    """
    objective: Any
    sizes: tuple[int, ...]
    kmin: float
    target: float
    gamma: float
    num_steps: int

    def gamma_at(self, step):
        """The penalty's weight at score step ``step``: γ grows linearly from 0 to ``gamma`` over
        the score phase, then stays."""
        return self.gamma * jnp.minimum(step / self.num_steps, 1.0)

    def __call__(self, model_fn, params, model_state, x, y, key):
        loss, (new_state, metrics) = self.objective(model_fn, params, model_state, x, y, key)
        penalty = rate_penalty(params["rate_logits"], self.sizes, self.kmin, self.target)
        total = loss + self.gamma_at(model_state["step"]) * penalty
        new_state = {**new_state, "step": model_state["step"] + 1}
        return total, (new_state, {**metrics, "loss": total, "rate_penalty": penalty,
                                   "density": density(params["rate_logits"], self.sizes,
                                                      self.kmin)})


def make_objective(objective, scores, target: float, alpha: float, gamma: float,
                   num_steps: int) -> RatePenalizedObjective:
    """HARP's score-phase objective: ``objective`` (e.g. PGD-AT) plus γ(step) times the penalty
    max(density / target − 1, 0), for rate logits shaped like ``scores``' layers; keep rates
    never fall below k_min = ``alpha`` · ``target``. ValueError on a bad setting, before compute."""
    target, alpha = check_settings(target, alpha)
    check_number("gamma", gamma, 0)
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r} is invalid; the score phase needs >= 1 step.")
    return RatePenalizedObjective(objective, tuple(_sizes(scores)), alpha * target, target,
                                  float(gamma), num_steps)


def create_score_state(weights, model_state, scores, rate_logits,
                       tx: optax.GradientTransformation, key: jax.Array) -> training.TrainState:
    """A fresh train state for the score phase: params = scores and rate logits, weights frozen."""
    params = {"scores": scores, "rate_logits": rate_logits}
    every = jax.tree_util.tree_map(lambda p: jnp.ones(jnp.shape(p), bool), params)
    state = {"weights": weights, "model_state": model_state, "step": jnp.zeros((), jnp.int32)}
    return training.create_train_state(params, state, tx, every, key)


def score_optimizer(scores_tx: optax.GradientTransformation,
                    rates_tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """One optimizer for the score phase's params, with its own for the rate logits: a logit must
    travel several units over the phase (k_l from the target to where the layer needs it), far
    more than an Adam step of the scores' learning rate allows in a few hundred steps."""
    return optax.multi_transform({"scores": scores_tx, "rate_logits": rates_tx},
                                 {"scores": "scores", "rate_logits": "rate_logits"})


def learned_rates(rate_logits, kmin: float) -> dict[str, float]:
    """{layer: keep rate} the score phase learned (host floats)."""
    return {masks_lib.layer_name(name): float(keep_rate(r, kmin))
            for name, r in masks_lib.mask_leaves(rate_logits).items()}


def rates_meeting_target(rates: dict[str, float], sizes: dict[str, int],
                         target: float) -> dict[str, float]:
    """``rates`` scaled by one factor c (each capped at 1) so that Σ n_l k_l = target · Σ n_l:
    the learned allocation between layers, at exactly the target sparsity. Bisection on c."""
    total = sum(sizes.values())

    def kept(c):
        return sum(sizes[l] * min(1.0, c * k) for l, k in rates.items())

    low, high = 0.0, 1.0
    while kept(high) < target * total and high < 1e12:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if kept(mid) <= target * total else (low, mid)
    return {l: min(1.0, low * k) for l, k in rates.items()}


def final_mask(scores, rate_logits, target: float, alpha: float):
    """(mask, learned rates, final rates): the top scores of each layer at the learned rates,
    scaled by one factor to meet ``target`` exactly (see :func:`rates_meeting_target`)."""
    kmin = k_min(target, alpha)
    learned = learned_rates(rate_logits, kmin)
    sizes = {masks_lib.layer_name(n): int(np.size(s))
             for n, s in masks_lib.mask_leaves(scores).items()}
    final = rates_meeting_target(learned, sizes, target)
    rates_tree = masks_lib.from_named_leaves(scores, {
        n: None if s is None else jnp.asarray(final[masks_lib.layer_name(n)], jnp.float32)
        for n, s in masks_lib.named_leaves(scores).items()})
    return topk_at_rates(scores, rates_tree), learned, final
