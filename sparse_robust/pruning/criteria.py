"""Pruning criteria and scopes, and the reset strategies of iterative pruning (rewinding).

Pruning here always removes a fraction *of the weights still alive*: rate 0.2 applied three times
leaves 0.8**3 of the prunable weights. A criterion is a score pytree (higher = more important);
the scope says whether the lowest scores are taken per layer (each with its own rate) or over all
prunable weights at once. Ties are broken by position (earlier flat index is pruned first), so the
result is deterministic and removes exactly the requested count.

Vocabulary: *weights remaining* (the fraction alive) and *sparsity* (1 - weights remaining) describe
a mask; a *rate* is only ever the fraction of the remaining weights one pruning round removes.
The optax wrapper that keeps pruned weights at zero is ``sparse_robust.optim.keep_pruned_at_zero``.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from sparse_robust import masks as masks_lib

Rates = Union[float, Mapping[str, float]]
SCOPES = ("layerwise", "global")
CRITERIA = ("magnitude", "random")
GRANULARITIES = ("weight", "channel")  # single weights, or whole filters / neurons (channels.py)
DEFAULT_RATE_KEY = "*"


def magnitude_scores(params):
    """|w|: the classic magnitude criterion."""
    return jax.tree_util.tree_map(jnp.abs, params)


def random_scores(key: jax.Array, params):
    """I.i.d. uniform scores: random pruning at the same rates (a baseline)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([jax.random.uniform(k, jnp.shape(p)) for k, p in zip(keys, leaves)])


def check_rate(rate, where: str = "") -> float:
    """The rate as a float; ValueError unless it is a static Python number in [0, 1).

    A rate decides how many weights are removed, so it fixes shapes inside the selection: it
    cannot be a traced value (pass it as a Python number, e.g. a static argument of ``jax.jit``).
    """
    label = f"Pruning rate {where}".rstrip()
    if isinstance(rate, jax.core.Tracer):
        raise ValueError(f"{label} is a traced value ({rate.aval.str_short()}); a rate must be a "
                         "static Python number in [0, 1): pass it outside jax.jit/vmap or as a "
                         "static argument (static_argnums).")
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.floating, np.integer)) \
            or not 0.0 <= float(rate) < 1.0:
        raise ValueError(f"{label} is {rate!r}; a rate is the fraction of the remaining weights to "
                         "remove, a static Python number in [0, 1).")
    return float(rate)


def check_granularity(granularity) -> str:
    """``granularity`` if it is one of ``GRANULARITIES``; ValueError naming them otherwise."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is invalid; allowed values: "
                         f"{GRANULARITIES}.")
    return granularity


def layer_rates(leaf_names: Iterable[str], rates: Rates) -> dict[str, float]:
    """Resolve ``rates`` (a float, or {layer name or '*': rate}) to a rate per prunable leaf name."""
    names = list(leaf_names)
    if not isinstance(rates, Mapping):
        rate = check_rate(rates, "")
        return {n: rate for n in names}
    layers = {masks_lib.layer_name(n) for n in names}
    unknown = set(rates) - layers - {DEFAULT_RATE_KEY}
    if unknown:
        raise ValueError(f"Pruning rates name unknown layers {sorted(unknown)}; prunable layers are "
                         f"{sorted(layers)} (use {DEFAULT_RATE_KEY!r} for all the others).")
    resolved = {}
    for name in names:
        layer = masks_lib.layer_name(name)
        if layer in rates:
            resolved[name] = check_rate(rates[layer], f"for layer {layer!r}")
        elif DEFAULT_RATE_KEY in rates:
            resolved[name] = check_rate(rates[DEFAULT_RATE_KEY], f"{DEFAULT_RATE_KEY!r}")
        else:
            raise ValueError(f"No pruning rate for layer {layer!r}: give it one or add a "
                             f"{DEFAULT_RATE_KEY!r} entry.")
    return resolved


def alive_and_scores(scores, mask) -> tuple[dict, dict]:
    """({leaf name: alive array} of the mask's prunable leaves, {leaf name: score array}); a
    ValueError naming the prunable leaves the scores lack."""
    alive_by_name = masks_lib.mask_leaves(mask)
    score_by_name = masks_lib.named_leaves(scores)
    missing = set(alive_by_name) - set(score_by_name)
    if missing:
        raise ValueError(f"Scores lack the prunable leaves {sorted(missing)}; give scores shaped "
                         "like the params.")
    return alive_by_name, score_by_name


def _keep_top(scores: jax.Array, alive: jax.Array, rate: float) -> jax.Array:
    """New alive flags (flat): drop round(rate * n_alive) of the alive entries with lowest scores."""
    n_alive = jnp.sum(alive)
    n_remove = jnp.round(rate * n_alive).astype(jnp.int32)
    n_dead = alive.size - n_alive
    # Dead entries sort first; a stable argsort breaks ties by index.
    order = jnp.argsort(jnp.where(alive, scores, -jnp.inf), stable=True)
    position = jnp.zeros(alive.shape, jnp.int32).at[order].set(jnp.arange(alive.size, dtype=jnp.int32))
    return position >= n_dead + n_remove


def prune(scores, mask, rates: Rates, *, scope: str = "layerwise", granularity: str = "weight"):
    """Remove a fraction of the remaining weights with the lowest ``scores``.

    Args:
      scores: pytree shaped like the params (only the mask's prunable leaves are read).
      mask: the current mask (see :mod:`sparse_robust.masks`).
      rates: for scope "layerwise", a float or {layer name: rate} with an optional '*' default,
        e.g. {'*': 0.2, 'output': 0.1} (Cosentino et al.); for "global", one float.
      scope: "layerwise" ranks each layer separately; "global" ranks all prunable weights together.
      granularity: "weight", or "channel": whole filters / neurons by their summed scores, a
        fraction of each layer's alive channels (see :mod:`sparse_robust.pruning.channels`).

    Returns:
      The new mask: a subset of ``mask`` with exactly round(rate * alive) fewer weights per layer
      (layerwise) or overall (global).
    """
    if scope not in SCOPES:
        raise ValueError(f"Unknown pruning scope {scope!r}; choose one of {SCOPES}.")
    if check_granularity(granularity) == "channel":
        from sparse_robust.pruning import channels  # it builds on this module
        return channels.channel_prune(scores, mask, rates, scope=scope)
    alive_by_name, score_by_name = alive_and_scores(scores, mask)

    if scope == "layerwise":
        per_leaf = layer_rates(alive_by_name, rates)
        new = {name: _keep_top(jnp.ravel(score_by_name[name]), jnp.ravel(m), per_leaf[name])
               .reshape(jnp.shape(m)) for name, m in alive_by_name.items()}
    else:
        if isinstance(rates, Mapping):
            raise ValueError("Global pruning takes one rate (a float), not a mapping per layer.")
        rate = check_rate(rates, "")
        names = list(alive_by_name)
        flat_scores = jnp.concatenate([jnp.ravel(score_by_name[n]).astype(jnp.float32)
                                       for n in names])
        flat_alive = jnp.concatenate([jnp.ravel(alive_by_name[n]) for n in names])
        kept = _keep_top(flat_scores, flat_alive, rate)
        sizes = np.cumsum([np.size(alive_by_name[n]) for n in names])[:-1]
        new = {n: part.reshape(jnp.shape(alive_by_name[n]))
               for n, part in zip(names, jnp.split(kept, sizes))}
    return masks_lib.from_named_leaves(
        mask, {name: new.get(name) for name in masks_lib.named_leaves(mask)})


def magnitude_prune(params, mask, rates: Rates, *, scope: str = "layerwise",
                    granularity: str = "weight"):
    """Prune the smallest-magnitude surviving weights (channels: the smallest L1 norms)."""
    return prune(magnitude_scores(params), mask, rates, scope=scope, granularity=granularity)


def random_prune(key: jax.Array, mask, rates: Rates, *, scope: str = "layerwise",
                 granularity: str = "weight"):
    """Prune surviving weights uniformly at random (same counts as magnitude pruning)."""
    return prune(random_scores(key, mask_as_params(mask)), mask, rates, scope=scope,
                 granularity=granularity)


def mask_as_params(mask):
    """Float placeholders with the mask's shapes, for criteria that need only shapes."""
    return masks_lib.map_prunable(lambda m: jnp.zeros(jnp.shape(m)), mask)


def weights_remaining_schedule(leaf_sizes: Mapping[str, int], rates: Rates,
                               levels: int) -> list[float]:
    """Overall fraction alive after 0..levels rounds of layerwise pruning, without any arrays.

    ``leaf_sizes`` maps prunable leaf names (as in ``masks.mask_leaves``) to sizes. Uses the same
    rounding as :func:`prune`, so it predicts the masks exactly.
    """
    per_leaf = layer_rates(leaf_sizes, rates)
    alive = dict(leaf_sizes)
    total = sum(leaf_sizes.values())
    out = [1.0]
    for _ in range(levels):
        # float32 like the traced count in _keep_top, so half-way cases round alike.
        alive = {n: a - int(np.round(np.float32(per_leaf[n]) * np.float32(a)))
                 for n, a in alive.items()}
        out.append(sum(alive.values()) / total)
    return out


def prune_by(key: Optional[jax.Array], criterion: str, params, mask, rates: Rates, *,
             scope: str = "layerwise", granularity: str = "weight"):
    """One pruning round by a named criterion: "magnitude" (of ``params``) or "random".

    Args:
      key: a PRNG key, first as in ``jax.random``; None is allowed where nothing is drawn
        ("magnitude").
      criterion: one of ``CRITERIA``.
      params, mask, rates, scope, granularity: as in :func:`prune` (params before mask).
    """
    if criterion == "magnitude":
        return magnitude_prune(params, mask, rates, scope=scope, granularity=granularity)
    if criterion == "random":
        if key is None:
            raise ValueError("criterion='random' needs a PRNG key; pass one as the first argument.")
        return random_prune(key, mask, rates, scope=scope, granularity=granularity)
    raise ValueError(f"criterion={criterion!r} is invalid; allowed values: {CRITERIA}.")


# What the surviving weights of the next round start from, and the source each strategy reads:
#   rewind_init    their values at initialisation θ0: the lottery ticket ("init");
#   rewind_step    their values after k training steps of the dense round ("rewind");
#   random_reinit  a fresh draw of the initializer ("fresh");
#   continue       the trained values of the previous round ("previous");
#   dense_trained  the trained *dense* values: what the original Cosentino code did
#                  ("dense_trained"); a meaningful baseline ("inherit trained weights").
RESET_SOURCES = {"rewind_init": "init", "rewind_step": "rewind", "random_reinit": "fresh",
                 "continue": "previous", "dense_trained": "dense_trained"}
RESET_STRATEGIES = tuple(RESET_SOURCES)


def reset(strategy: str, sources: Mapping[str, Any], mask):
    """The next round's starting params: ``sources[RESET_SOURCES[strategy]]`` under ``mask``.

    ``sources`` maps source names ("init", "rewind", "fresh", "previous", "dense_trained") to param
    pytrees; only the one the strategy reads must be present.
    """
    if strategy not in RESET_SOURCES:
        raise ValueError(f"strategy={strategy!r} is invalid; allowed values: {RESET_STRATEGIES}.")
    source = RESET_SOURCES[strategy]
    if sources.get(source) is None:
        raise ValueError(f"Strategy {strategy!r} needs the {source!r} params.")
    return masks_lib.apply_mask(sources[source], mask)
