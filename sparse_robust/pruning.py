"""Pruning criteria, scopes and an optax transformation that keeps pruned weights at zero.

Pruning here always removes a fraction *of the weights still alive*: rate 0.2 applied three times
leaves 0.8**3 of the prunable weights. A criterion is a score pytree (higher = more important);
the scope says whether the lowest scores are taken per layer (each with its own rate) or over all
prunable weights at once. Ties are broken by position (earlier flat index is pruned first), so the
result is deterministic and removes exactly the requested count.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparse_robust import masks as masks_lib

Rates = Union[float, Mapping[str, float]]
SCOPES = ("layerwise", "global")
DEFAULT_RATE_KEY = "*"


def magnitude_scores(params):
    """|w|: the classic magnitude criterion."""
    return jax.tree_util.tree_map(jnp.abs, params)


def random_scores(key: jax.Array, params):
    """I.i.d. uniform scores: random pruning at the same rates (a baseline)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([jax.random.uniform(k, jnp.shape(p)) for k, p in zip(keys, leaves)])


def _check_rate(rate, where: str) -> float:
    if not isinstance(rate, (int, float, np.floating)) or not 0.0 <= float(rate) < 1.0:
        raise ValueError(f"Pruning rate {where} is {rate!r}; a rate is the fraction of the remaining "
                         "weights to remove, a number in [0, 1).")
    return float(rate)


def layer_rates(leaf_names: Iterable[str], rates: Rates) -> dict[str, float]:
    """Resolve ``rates`` (a float, or {layer name or '*': rate}) to a rate per prunable leaf name."""
    names = list(leaf_names)
    if not isinstance(rates, Mapping):
        rate = _check_rate(rates, "")
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
            resolved[name] = _check_rate(rates[layer], f"for layer {layer!r}")
        elif DEFAULT_RATE_KEY in rates:
            resolved[name] = _check_rate(rates[DEFAULT_RATE_KEY], f"{DEFAULT_RATE_KEY!r}")
        else:
            raise ValueError(f"No pruning rate for layer {layer!r}: give it one or add a "
                             f"{DEFAULT_RATE_KEY!r} entry.")
    return resolved


def _keep_top(scores: jax.Array, alive: jax.Array, rate: float) -> jax.Array:
    """New alive flags (flat): drop round(rate * n_alive) of the alive entries with lowest scores."""
    n_alive = jnp.sum(alive)
    n_remove = jnp.round(rate * n_alive).astype(jnp.int32)
    n_dead = alive.size - n_alive
    # Dead entries sort first; a stable argsort breaks ties by index.
    order = jnp.argsort(jnp.where(alive, scores, -jnp.inf), stable=True)
    position = jnp.zeros(alive.shape, jnp.int32).at[order].set(jnp.arange(alive.size, dtype=jnp.int32))
    return position >= n_dead + n_remove


def prune(scores, mask, rates: Rates, *, scope: str = "layerwise"):
    """Remove a fraction of the remaining weights with the lowest ``scores``.

    Args:
      scores: pytree shaped like the params (only the mask's prunable leaves are read).
      mask: the current mask (see :mod:`sparse_robust.masks`).
      rates: for scope "layerwise", a float or {layer name: rate} with an optional '*' default,
        e.g. {'*': 0.2, 'output': 0.1} (Cosentino et al.); for "global", one float.
      scope: "layerwise" ranks each layer separately; "global" ranks all prunable weights together.

    Returns:
      The new mask: a subset of ``mask`` with exactly round(rate * alive) fewer weights per layer
      (layerwise) or overall (global).
    """
    if scope not in SCOPES:
        raise ValueError(f"Unknown pruning scope {scope!r}; choose one of {SCOPES}.")
    alive_by_name = masks_lib.mask_leaves(mask)
    leaves = jax.tree_util.tree_flatten_with_path(mask, is_leaf=masks_lib._is_none)[0]
    treedef = jax.tree_util.tree_structure(mask, is_leaf=masks_lib._is_none)
    score_by_name = dict(
        (masks_lib.path_name(p), s)
        for p, s in jax.tree_util.tree_flatten_with_path(scores, is_leaf=masks_lib._is_none)[0])
    missing = set(alive_by_name) - set(score_by_name)
    if missing:
        raise ValueError(f"Scores lack the prunable leaves {sorted(missing)}; give scores shaped "
                         "like the params.")

    if scope == "layerwise":
        per_leaf = layer_rates(alive_by_name, rates)
        new = {name: _keep_top(jnp.ravel(score_by_name[name]), jnp.ravel(m), per_leaf[name])
               .reshape(jnp.shape(m)) for name, m in alive_by_name.items()}
    else:
        if isinstance(rates, Mapping):
            raise ValueError("Global pruning takes one rate (a float), not a mapping per layer.")
        rate = _check_rate(rates, "")
        names = list(alive_by_name)
        flat_scores = jnp.concatenate([jnp.ravel(score_by_name[n]).astype(jnp.float32)
                                       for n in names])
        flat_alive = jnp.concatenate([jnp.ravel(alive_by_name[n]) for n in names])
        kept = _keep_top(flat_scores, flat_alive, rate)
        sizes = np.cumsum([np.size(alive_by_name[n]) for n in names])[:-1]
        new = {n: part.reshape(jnp.shape(alive_by_name[n]))
               for n, part in zip(names, jnp.split(kept, sizes))}
    return treedef.unflatten([None if m is None else new[masks_lib.path_name(p)]
                              for p, m in leaves])


def magnitude_prune(params, mask, rates: Rates, *, scope: str = "layerwise"):
    """Prune the smallest-magnitude surviving weights."""
    return prune(magnitude_scores(params), mask, rates, scope=scope)


def random_prune(key: jax.Array, mask, rates: Rates, *, scope: str = "layerwise"):
    """Prune surviving weights uniformly at random (same counts as magnitude pruning)."""
    return prune(random_scores(key, mask_as_params(mask)), mask, rates, scope=scope)


def mask_as_params(mask):
    """Float placeholders with the mask's shapes, for criteria that need only shapes."""
    return jax.tree_util.tree_map(lambda m: None if m is None else jnp.zeros(jnp.shape(m)), mask,
                                  is_leaf=masks_lib._is_none)


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


class MaskedState(NamedTuple):
    """Optimizer state of :func:`keep_pruned_at_zero`: the inner state and the current mask."""
    inner_state: Any
    mask: Any


def keep_pruned_at_zero(inner: optax.GradientTransformation,
                        mask=None) -> optax.GradientTransformation:
    """Wrap an optax optimizer so that pruned weights get exactly zero updates.

    Gradients of pruned weights are zeroed *before* the inner optimizer (so no momentum or second
    moment ever builds up for them) and its updates are zeroed *after* (so weight decay and any
    other term cannot move them). Starting from masked params, pruned weights stay exactly 0.

    The mask lives in the optimizer state, not in the closure: one jitted train step serves every
    pruning level, and a new level only needs a new ``init``. ``mask=None`` at construction means a
    dense (all-alive) mask at ``init``.
    """

    def init_fn(params):
        mask_ = masks_lib.create_mask(params) if mask is None else mask
        masks_lib.check_mask(params, mask_)
        return MaskedState(inner.init(params), mask_)

    def update_fn(updates, state, params=None):
        updates = masks_lib.apply_mask(updates, state.mask)
        updates, inner_state = inner.update(updates, state.inner_state, params)
        return masks_lib.apply_mask(updates, state.mask), MaskedState(inner_state, state.mask)

    return optax.GradientTransformation(init_fn, update_fn)
