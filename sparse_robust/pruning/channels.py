"""Channel (structured) pruning: whole conv filters and dense neurons, not single weights.

A *channel* of a kernel is one output unit: the last axis of a conv kernel (kh, kw, in, out) or
of a dense kernel (in, out). Its score is the sum of its alive weights' scores: with magnitude
scores the filter's L1 norm, with HYDRA scores their sum (any per-weight criterion works). A
round removes a fraction of each layer's *alive channels* (rounded as weight pruning rounds),
never the last one of a layer, and never a neuron of the `output` layer (those are the classes).
`compact` (sparse_robust.pruning.compact) then removes the dead channels physically.
"""

from __future__ import annotations

import jax.numpy as jnp

from sparse_robust import masks as masks_lib
from sparse_robust.pruning import criteria

WHOLE_LAYERS = ("output",)  # their units are the classes: never removed


def is_whole_layer(leaf_name: str) -> bool:
    """True for a leaf of a layer whose units are never removed (``WHOLE_LAYERS``)."""
    return masks_lib.layer_name(leaf_name) in WHOLE_LAYERS


def channel_alive(mask_leaf) -> jnp.ndarray:
    """(out,) bool: the channels of a kernel mask with at least one alive weight."""
    return jnp.any(mask_leaf, axis=tuple(range(jnp.ndim(mask_leaf) - 1)))


def channel_scores(scores_leaf, mask_leaf) -> jnp.ndarray:
    """(out,) per-channel score: the sum of the alive weights' scores of each channel."""
    axes = tuple(range(jnp.ndim(mask_leaf) - 1))
    return jnp.sum(jnp.where(mask_leaf, scores_leaf, 0.0), axis=axes)


def channel_sums(scores_leaf) -> jnp.ndarray:
    """(out,) the sum of each channel's scores (all its weights: a full mask)."""
    return jnp.sum(scores_leaf, axis=tuple(range(jnp.ndim(scores_leaf) - 1)))


def _prune_channels(scores_leaf, mask_leaf, rate: float):
    alive = channel_alive(mask_leaf)
    score = channel_scores(scores_leaf, mask_leaf).astype(jnp.float32)
    kept = criteria._keep_top(score, alive, rate)  # the same rounding and tie rule as weights
    # Never the whole layer: keep its best channel if the rate would take them all.
    best = jnp.arange(alive.size) == jnp.argmax(jnp.where(alive, score, -jnp.inf))
    kept = jnp.where(jnp.any(kept) | ~jnp.any(alive), kept, best & alive)
    return mask_leaf & kept


def channel_prune(scores, mask, rates: criteria.Rates, *, scope: str = "layerwise"):
    """Remove a fraction of the remaining channels of every prunable layer, lowest scores first.

    Args:
      scores: pytree shaped like the params (per-weight scores, e.g. |w| for L1 norms).
      mask: the current mask; the new one is a subset with whole channels dead.
      rates: a float or {layer name: rate} with an optional '*' default (as `criteria.prune`);
        a rate is the fraction of a layer's alive channels to remove. `output` is left whole.
      scope: "layerwise" only (channel norms of layers of different fan-in do not compare).
    """
    if scope != "layerwise":
        raise ValueError(f"Channel pruning ranks channels per layer: scope must be 'layerwise', "
                         f"got {scope!r}.")
    alive_by_name, score_by_name = criteria.alive_and_scores(scores, mask)
    per_leaf = criteria.layer_rates(alive_by_name, rates)
    new = {name: m if is_whole_layer(name)
           else _prune_channels(score_by_name[name], m, per_leaf[name])
           for name, m in alive_by_name.items()}
    return masks_lib.from_named_leaves(
        mask, {name: new.get(name) for name in masks_lib.named_leaves(mask)})


def is_channel_mask(mask) -> bool:
    """True when every prunable leaf's channels are wholly alive or wholly dead (host check)."""
    for m in masks_lib.mask_leaves(mask).values():
        alive = channel_alive(m)
        if not bool(jnp.all(jnp.where(alive, jnp.all(m, axis=tuple(range(m.ndim - 1))), True))):
            return False
    return True
