"""HYDRA (Sehwag et al. 2020): learn which weights to keep by training importance scores.

Every prunable weight w gets a score s. The network uses ``w ⊙ m`` where ``m`` keeps the top
``weights_remaining`` fraction of scores *of each layer* (one fraction for all layers as in the
paper, or one per layer; or, with scope "global", of all layers at once); the straight-through
estimator passes the gradient through the top-k as if it were the identity, so
``∂L/∂s = ∂L/∂(w ⊙ m) · w`` for every weight, kept or not. The weights stay frozen while the scores train with the adversarial
objective; the final mask then goes to ordinary adversarial fine-tuning of the weights.

Score initialisation follows the paper's "scaled initialisation":
``s = sqrt(6 / fan_in) · |w| / max|w|`` per layer (fan_in = product of all kernel axes but the
last). The authors' code initialises with the signed ``w`` and ranks ``|s|``; we initialise with
``|w|`` and rank ``s`` itself, which is the same mask at initialisation and keeps the gradient
above exact (a score pushed below zero simply ranks last).

How many weights each layer keeps matters more than which at high sparsity: at 1 % the paper's
uniform fraction leaves dense-300-100's 100x10 output layer 10 weights, and on Fashion-MNIST the
network then collapses (26 % clean / 23 % PGD-20 after fine-tuning), while the same score
training with the per-layer sizes of the one-shot global magnitude mask (output layer 39 %)
reaches 66 / 53 %, above a random mask of those sizes (63 / 37 %). The engine's hydra branch
therefore keeps those per-layer sizes by default (see ``runs/branches/hydra.py``).

Scores are a pytree with the mask's structure: an array per prunable leaf, ``None`` elsewhere.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp
import optax

from sparse_robust import masks as masks_lib
from sparse_robust import pruning
from sparse_robust import training


def _check_fraction(value, what: str = "weights_remaining") -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
        raise ValueError(f"{what}={value!r} is invalid; allowed values: the fraction of "
                         "weights kept, a number in (0, 1].")
    return float(value)


def check_weights_remaining(value):
    """A fraction for every layer, or {layer name: fraction} (one per prunable layer)."""
    if isinstance(value, Mapping):
        return {layer: _check_fraction(v, f"weights_remaining[{layer!r}]")
                for layer, v in value.items()}
    return _check_fraction(value)


def init_scores(params, mask=None):
    """Scaled-magnitude scores ``sqrt(6 / fan_in) · |w| / max|w|`` for every prunable leaf.

    ``mask`` (default: every kernel, see ``masks.create_mask``) only selects the prunable leaves.
    """
    mask = masks_lib.create_mask(params) if mask is None else mask
    masks_lib.check_mask(params, mask)

    def score(m, w):
        magnitude = jnp.abs(w).astype(jnp.float32)
        fan_in = math.prod(jnp.shape(w)[:-1])
        # A layer of zeros gets zero scores rather than NaN.
        return math.sqrt(6.0 / fan_in) * magnitude / jnp.maximum(jnp.max(magnitude), 1e-30)

    return masks_lib.map_prunable(score, mask, params)


def topk_mask(scores, weights_remaining, scope: str = "layerwise",
              granularity: str = "weight"):
    """Keep the highest scores: ``weights_remaining`` of each layer (a fraction for all, or
    {layer: fraction}), or with scope "global" that fraction of all prunable weights at once.

    Exactly ``n - round((1 - f) · n)`` weights survive in a layer of ``n`` (ties go to the later
    flat index), via ``pruning.prune``. With granularity "channel" the same counts are of whole
    filters / neurons ranked by their summed scores (``pruning.channels``; layerwise only, the
    ``output`` layer stays whole). Jittable.
    """
    weights_remaining = check_weights_remaining(weights_remaining)
    if scope not in pruning.SCOPES:
        raise ValueError(f"scope={scope!r} is invalid; allowed values: {pruning.SCOPES}.")
    if scope == "global" and isinstance(weights_remaining, dict):
        raise ValueError("scope='global' takes one weights_remaining for all layers, not a "
                         "mapping per layer.")
    alive = jax.tree_util.tree_map(lambda s: jnp.ones(jnp.shape(s), bool), scores)
    rates = ({layer: 1.0 - f for layer, f in weights_remaining.items()}
             if isinstance(weights_remaining, dict) else 1.0 - weights_remaining)
    return pruning.prune(scores, alive, rates, scope=scope, granularity=granularity)


def masked_weights(weights, scores, weights_remaining, scope: str = "layerwise",
                   granularity: str = "weight"):
    """``w ⊙ topk(s)`` forward; straight-through backward: ``∂/∂s = ∂/∂(w ⊙ m) · w``."""
    mask = topk_mask(jax.lax.stop_gradient(scores), weights_remaining, scope, granularity)

    def gate(s, m, w):
        if s is None:
            return w
        # m + (s - s): the value is exactly m, the derivative in s is exactly 1.
        return w * (m.astype(w.dtype) + (s - jax.lax.stop_gradient(s)).astype(w.dtype))

    return jax.tree_util.tree_map(gate, scores, mask, weights, is_leaf=masks_lib.is_none)


def make_score_model_fn(model_fn: training.ModelFn, weights_remaining,
                        scope: str = "layerwise", granularity: str = "weight") -> training.ModelFn:
    """A model_fn whose trainable "params" are the scores (the forward uses ``topk_mask`` at
    ``granularity``, so a channel-granularity score phase trains against channel masks).

    Its ``model_state`` is ``{"weights": frozen params, "model_state": the model's own state}``
    (see :func:`create_score_state`): the weights ride along untouched and get no gradient, so
    ``training.make_train_loop(score_model_fn, tx, objective)`` trains the scores alone.
    """
    weights_remaining = check_weights_remaining(weights_remaining)

    def score_model_fn(scores, state, x, train):
        params = masked_weights(state["weights"], scores, weights_remaining, scope, granularity)
        logits, inner = model_fn(params, state["model_state"], x, train)
        return logits, {"weights": state["weights"], "model_state": inner}

    return score_model_fn


def create_score_state(weights, model_state, scores, tx: optax.GradientTransformation,
                       key: jax.Array) -> training.TrainState:
    """A fresh train state for the score phase: params = scores, weights frozen in the state."""
    every_score = jax.tree_util.tree_map(lambda s: jnp.ones(jnp.shape(s), bool), scores)
    return training.create_train_state(scores, {"weights": weights, "model_state": model_state},
                                       tx, every_score, key)
