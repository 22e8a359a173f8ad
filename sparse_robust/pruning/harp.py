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

Granularity "channel": the same with whole filters / neurons. A layer's rate is then the fraction
of its channels kept (which is its fraction of weights kept, so the penalty is unchanged), the
mask keeps the ``max(1, round(k_l·c_l))`` channels of highest summed score, and the ``output``
layer (its units are the classes) stays whole: its rate is fixed at 1, outside the learning and
the final scaling.

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
from sparse_robust.pruning import channels, criteria, hydra

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


def _fixed_whole(leaf_name: str, granularity: str) -> bool:
    """A leaf whose rate is fixed at 1: at channel granularity, a layer never pruned."""
    return granularity == "channel" and channels.is_whole_layer(leaf_name)


def keep_rates(rate_logits, kmin: float, granularity: str = "weight"):
    """Each prunable leaf's keep rate (the logits' structure); at granularity "channel" the
    ``output`` layer's is a constant 1 (no gradient reaches its logit)."""
    return masks_lib.from_named_leaves(rate_logits, {
        name: None if r is None else jnp.ones((), jnp.float32)
        if _fixed_whole(name, granularity) else keep_rate(r, kmin)
        for name, r in masks_lib.named_leaves(rate_logits).items()})


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


def _top(values, count):
    """Flags of the ``count`` highest ``values`` (1-D; ties to the earlier index)."""
    rank = jnp.argsort(jnp.argsort(-values, stable=True), stable=True)
    return rank < count


def topk_at_rates(scores, rates, granularity: str = "weight"):
    """The hard mask: in each leaf, the ``round(k·n)`` highest scores (ties to the earlier index);
    at granularity "channel", the ``max(1, round(k·c))`` of its c channels of highest summed score,
    each wholly kept.

    ``rates`` may be traced (jittable); it has the scores' structure with a scalar per leaf.
    """
    criteria.check_granularity(granularity)

    def keep(s, k):
        if granularity == "channel":
            summed = channels.channel_sums(s)
            count = jnp.maximum(jnp.round(k * summed.size), 1).astype(jnp.int32)
            return jnp.broadcast_to(_top(summed, count), jnp.shape(s))
        flat = jnp.ravel(s)
        count = jnp.round(k * flat.size).astype(jnp.int32)
        return _top(flat, count).reshape(jnp.shape(s))

    return jax.tree_util.tree_map(keep, scores, rates)


def masked_weights(weights, scores, rate_logits, kmin: float, granularity: str = "weight"):
    """``w ⊙ topk_k(s)`` forward; backward as if the mask were ``M + s + k``: the scores get
    ``g·w`` per weight and each rate ``Σ g·w`` over its layer (g = ∂L/∂(w ⊙ m))."""
    rates = keep_rates(rate_logits, kmin, granularity)
    hard = topk_at_rates(jax.lax.stop_gradient(scores), jax.lax.stop_gradient(rates),
                         granularity)

    def gate(s, m, k, w):
        if s is None:
            return w
        ste = m.astype(w.dtype) + (s - jax.lax.stop_gradient(s)) + (k - jax.lax.stop_gradient(k))
        return w * ste.astype(w.dtype)

    return jax.tree_util.tree_map(gate, scores, hard, rates, weights, is_leaf=masks_lib.is_none)


def density(rate_logits, sizes, kmin: float, granularity: str = "weight"):
    """Σ n_l k_l / Σ n_l: the fraction of weights the learned rates keep (traceable)."""
    rates = jax.tree_util.tree_leaves(keep_rates(rate_logits, kmin, granularity))
    return sum(n * k for n, k in zip(sizes, rates)) / float(sum(sizes))


def rate_penalty(rate_logits, sizes, kmin: float, target: float, granularity: str = "weight"):
    """``max(Σ n_l k_l / Σ n_l / target − 1, 0)``: how far the rates keep more than the target."""
    return jnp.maximum(density(rate_logits, sizes, kmin, granularity) / target - 1.0, 0.0)


def make_score_model_fn(model_fn: training.ModelFn, kmin: float,
                        granularity: str = "weight") -> training.ModelFn:
    """A model_fn whose trainable params are ``{"scores", "rate_logits"}``; the frozen weights
    ride in its model state (see :func:`create_score_state`) and get no gradient. Its masks are
    of ``granularity`` (weights or whole channels)."""
    criteria.check_granularity(granularity)

    def score_model_fn(params, state, x, train):
        weights = masked_weights(state["weights"], params["scores"], params["rate_logits"], kmin,
                                 granularity)
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
    granularity: str = "weight"

    def gamma_at(self, step):
        """The penalty's weight at score step ``step``: γ grows linearly from 0 to ``gamma`` over
        the score phase, then stays."""
        return self.gamma * jnp.minimum(step / self.num_steps, 1.0)

    def __call__(self, model_fn, params, model_state, x, y, key):
        loss, (new_state, metrics) = self.objective(model_fn, params, model_state, x, y, key)
        penalty = rate_penalty(params["rate_logits"], self.sizes, self.kmin, self.target,
                               self.granularity)
        total = loss + self.gamma_at(model_state["step"]) * penalty
        new_state = {**new_state, "step": model_state["step"] + 1}
        return total, (new_state, {**metrics, "loss": total, "rate_penalty": penalty,
                                   "density": density(params["rate_logits"], self.sizes,
                                                      self.kmin, self.granularity)})


def make_objective(objective, scores, target: float, alpha: float, gamma: float,
                   num_steps: int, granularity: str = "weight") -> RatePenalizedObjective:
    """HARP's score-phase objective: ``objective`` (e.g. PGD-AT) plus γ(step) times the penalty
    max(density / target − 1, 0), for rate logits shaped like ``scores``' layers; keep rates
    never fall below k_min = ``alpha`` · ``target`` (at granularity "channel" the ``output``
    layer's is 1). ValueError on a bad setting, before compute."""
    target, alpha = check_settings(target, alpha)
    check_number("gamma", gamma, 0)
    criteria.check_granularity(granularity)
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r} is invalid; the score phase needs >= 1 step.")
    return RatePenalizedObjective(objective, tuple(_sizes(scores)), alpha * target, target,
                                  float(gamma), num_steps, granularity)


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


def learned_rates(rate_logits, kmin: float, granularity: str = "weight") -> dict[str, float]:
    """{layer: keep rate} the score phase learned (host floats)."""
    return {masks_lib.layer_name(name): float(k)
            for name, k in masks_lib.mask_leaves(keep_rates(rate_logits, kmin,
                                                            granularity)).items()}


def rates_meeting_target(rates: dict[str, float], sizes: dict[str, int], target: float,
                         fixed: tuple[str, ...] = ()) -> dict[str, float]:
    """``rates`` scaled by one factor c (each capped at 1) so that Σ n_l k_l = target · Σ n_l:
    the learned allocation between layers, at exactly the target sparsity. Bisection on c. The
    ``fixed`` layers keep their rate (they count towards the target, unscaled)."""
    total = sum(sizes.values())

    def scaled(layer, k, c):
        return k if layer in fixed else min(1.0, c * k)

    def kept(c):
        return sum(sizes[l] * scaled(l, k, c) for l, k in rates.items())

    low, high = 0.0, 1.0
    while kept(high) < target * total and high < 1e12:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if kept(mid) <= target * total else (low, mid)
    return {l: scaled(l, k, low) for l, k in rates.items()}


def final_mask(scores, rate_logits, target: float, alpha: float, granularity: str = "weight"):
    """(mask, learned rates, final rates): the top scores of each layer at the learned rates,
    scaled by one factor to meet ``target`` exactly (see :func:`rates_meeting_target`); at
    granularity "channel" the top channels by summed score, ``output`` whole (its rate 1)."""
    kmin = k_min(target, alpha)
    learned = learned_rates(rate_logits, kmin, granularity)
    sizes = {masks_lib.layer_name(n): int(np.size(s))
             for n, s in masks_lib.mask_leaves(scores).items()}
    fixed = tuple(masks_lib.layer_name(n) for n in masks_lib.mask_leaves(scores)
                  if _fixed_whole(n, granularity))
    final = rates_meeting_target(learned, sizes, target, fixed)
    rates_tree = masks_lib.from_named_leaves(scores, {
        n: None if s is None else jnp.asarray(final[masks_lib.layer_name(n)], jnp.float32)
        for n, s in masks_lib.named_leaves(scores).items()})
    return topk_at_rates(scores, rates_tree, granularity), learned, final
