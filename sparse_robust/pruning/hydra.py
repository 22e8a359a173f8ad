"""HYDRA (Sehwag et al. 2020): learn which weights to keep by training importance scores.

Every prunable weight w gets a score s. The network uses ``w ⊙ m`` where ``m`` keeps the top
``weights_remaining`` fraction of scores *of each layer*; the straight-through estimator passes the
gradient through the top-k as if it were the identity, so ``∂L/∂s = ∂L/∂(w ⊙ m) · w`` for every
weight, kept or not. The weights stay frozen while the scores train with the adversarial
objective; the final mask then goes to ordinary adversarial fine-tuning of the weights.

Score initialisation follows the paper's "scaled initialisation":
``s = sqrt(6 / fan_in) · |w| / max|w|`` per layer (fan_in = product of all kernel axes but the
last). The authors' code initialises with the signed ``w`` and ranks ``|s|``; we initialise with
``|w|`` and rank ``s`` itself, which is the same mask at initialisation and keeps the gradient
above exact (a score pushed below zero simply ranks last).

Scores are a pytree with the mask's structure: an array per prunable leaf, ``None`` elsewhere.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from sparse_robust import masks as masks_lib
from sparse_robust import pruning
from sparse_robust import training


def _check_weights_remaining(value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
        raise ValueError(f"weights_remaining={value!r} is invalid; allowed values: the fraction of "
                         "weights kept per layer, a number in (0, 1].")
    return float(value)


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


def topk_mask(scores, weights_remaining: float):
    """Keep the ``weights_remaining`` fraction with the highest scores in each layer.

    Exactly ``n - round((1 - weights_remaining) · n)`` weights survive in a layer of ``n`` (ties
    go to the later flat index), via ``pruning.prune``. Jittable.
    """
    weights_remaining = _check_weights_remaining(weights_remaining)
    alive = jax.tree_util.tree_map(lambda s: jnp.ones(jnp.shape(s), bool), scores)
    return pruning.prune(scores, alive, 1.0 - weights_remaining, scope="layerwise")


def masked_weights(weights, scores, weights_remaining: float):
    """``w ⊙ topk(s)`` forward; straight-through backward: ``∂/∂s = ∂/∂(w ⊙ m) · w``."""
    mask = topk_mask(jax.lax.stop_gradient(scores), weights_remaining)

    def gate(s, m, w):
        if s is None:
            return w
        # m + (s - s): the value is exactly m, the derivative in s is exactly 1.
        return w * (m.astype(w.dtype) + (s - jax.lax.stop_gradient(s)).astype(w.dtype))

    return jax.tree_util.tree_map(gate, scores, mask, weights, is_leaf=masks_lib.is_none)


def make_score_model_fn(model_fn: training.ModelFn, weights_remaining: float) -> training.ModelFn:
    """A model_fn whose trainable "params" are the scores.

    Its ``model_state`` is ``{"weights": frozen params, "model_state": the model's own state}``
    (see :func:`create_score_state`): the weights ride along untouched and get no gradient, so
    ``training.make_train_loop(score_model_fn, tx, objective)`` trains the scores alone.
    """
    weights_remaining = _check_weights_remaining(weights_remaining)

    def score_model_fn(scores, state, x, train):
        params = masked_weights(state["weights"], scores, weights_remaining)
        logits, inner = model_fn(params, state["model_state"], x, train)
        return logits, {"weights": state["weights"], "model_state": inner}

    return score_model_fn


def create_score_state(weights, model_state, scores, tx: optax.GradientTransformation,
                       key: jax.Array) -> training.TrainState:
    """A fresh train state for the score phase: params = scores, weights frozen in the state."""
    every_score = jax.tree_util.tree_map(lambda s: jnp.ones(jnp.shape(s), bool), scores)
    return training.create_train_state(scores, {"weights": weights, "model_state": model_state},
                                       tx, every_score, key)
