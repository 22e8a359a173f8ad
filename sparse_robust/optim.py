"""Optax transformations that hold masked weights: pruned ones at exactly zero, frozen ones fixed.

``keep_pruned_at_zero(inner, mask)`` wraps any optax optimizer, including ones whose update takes
extra arguments (``optax.contrib.reduce_on_plateau`` needs ``value=``): it is an
``optax.GradientTransformationExtraArgs`` and passes every extra keyword argument on. Masks cannot
leak: the update of a pruned weight is minus its value, so after ``optax.apply_updates`` (or a
flax ``TrainState.apply_gradients``) every pruned weight is exactly zero, whatever the params
were. ``freeze(inner, trainable)`` is the same wrapper for weights that must keep their values
(inverse weights inheritance): their updates are exactly zero.

The mask lives in the optimizer state, not in the closure, so one jitted train step serves every
pruning level: a new level needs only ``replace_mask`` (or a new ``init``), never a new compile.
``replace_mask`` finds the masked state anywhere inside optax's combinators (``chain``,
``named_chain``, ``inject_hyperparams``, ``MultiSteps``, ...).

One wrapper per optimizer: masking an optimizer that is already masked (outermost, or anywhere
inside a chain) is refused with one line, since the effective mask would silently be the
intersection of the two.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparse_robust import masks as masks_lib


class MaskedState(NamedTuple):
    """Optimizer state of :func:`keep_pruned_at_zero`: the inner state and the current mask."""
    inner_state: Any
    mask: Any


class FrozenState(MaskedState):
    """Optimizer state of :func:`freeze`: the mask says which weights train; the others keep their
    values (the type, static under ``jax.jit``, is what tells the update apart)."""


class _MaskedTransformation(optax.GradientTransformationExtraArgs):
    """The transformation :func:`keep_pruned_at_zero` and :func:`freeze` return (a marker type, so
    that wrapping it again is caught at once)."""


_ALREADY_MASKED = ("the optimizer is already masked (keep_pruned_at_zero or freeze); pass the "
                   "unmasked one: a second mask would silently intersect the first")


def _is_masked_state(x) -> bool:
    return isinstance(x, MaskedState)


def _masked_states(opt_state) -> list[MaskedState]:
    """Every MaskedState inside an optimizer state (optax's combinators nest states as tuples,
    dicts and NamedTuples, all pytrees)."""
    leaves = jax.tree_util.tree_leaves(opt_state, is_leaf=_is_masked_state)
    return [leaf for leaf in leaves if _is_masked_state(leaf)]


def _wrap(inner: optax.GradientTransformation, mask, state_type: type) -> _MaskedTransformation:
    if isinstance(inner, _MaskedTransformation):
        raise ValueError(f"{_ALREADY_MASKED}.")
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        mask_ = masks_lib.create_mask(params) if mask is None else mask
        masks_lib.check_mask(params, mask_)
        inner_state = inner.init(params)
        if _masked_states(inner_state):  # e.g. optax.chain(clip, keep_pruned_at_zero(adam, m))
            raise ValueError(f"{_ALREADY_MASKED} (a masked state was found inside it).")
        return state_type(inner_state, mask_)

    def update_fn(updates, state, params=None, **extra_args):
        updates = masks_lib.apply_mask(updates, state.mask)  # No moments build up for them.
        updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        if isinstance(state, FrozenState):
            held = masks_lib.apply_mask(updates, state.mask)
        else:
            if params is None:
                raise ValueError("keep_pruned_at_zero needs the params in its update, "
                                 "tx.update(grads, opt_state, params), to hold pruned weights at "
                                 "exactly zero.")
            # Minus the value: p + (-p) is exactly 0 in floating point, so a pruned weight is
            # zero after the update even if the params were never masked.
            held = jax.tree_util.tree_map(
                lambda m, u, p: u if m is None else jnp.where(m, u, -jnp.asarray(p, u.dtype)),
                state.mask, updates, params, is_leaf=masks_lib.is_none)
        return held, type(state)(inner_state, state.mask)

    return _MaskedTransformation(init_fn, update_fn)


def keep_pruned_at_zero(inner: optax.GradientTransformation, mask=None) -> _MaskedTransformation:
    """Wrap an optax optimizer so that pruned weights are exactly zero after every update.

    Args:
      inner: any optax transformation (``chain``s included) that is not masked already.
      mask: the mask (see :mod:`sparse_robust.masks`; True = alive). None means a dense
        (all-alive) mask at ``init``. It is stored in the optimizer state.

    Gradients of pruned weights are zeroed *before* the inner optimizer (so no momentum or second
    moment ever builds up for them), and the update of a pruned weight is minus its current value
    (so weight decay or any other term cannot move it, and a weight the caller forgot to mask is
    zeroed by the first update). The update therefore needs ``params``:
    ``tx.update(grads, opt_state, params)``.

    Raises ValueError when ``inner`` is already masked (outermost at construction, anywhere
    inside at ``init``).
    """
    return _wrap(inner, mask, MaskedState)


def freeze(inner: optax.GradientTransformation, trainable=None) -> _MaskedTransformation:
    """Wrap an optax optimizer so that the weights outside ``trainable`` keep their values.

    Args:
      inner: any optax transformation that is not masked already.
      trainable: a mask-shaped pytree (True = trains), e.g. from
        ``inheritance.trainable_mask``; None means everything trains.

    Gradients and updates of the other weights are exactly zero; their values are never touched
    (unlike :func:`keep_pruned_at_zero`, which zeroes them). Same state layout, so the train
    step and :func:`replace_mask` serve both.
    """
    return _wrap(inner, trainable, FrozenState)


def find_mask(opt_state):
    """The mask held by the one masked state inside ``opt_state`` (see :func:`replace_mask`)."""
    return _the_masked_state(opt_state).mask


def _the_masked_state(opt_state) -> MaskedState:
    found = _masked_states(opt_state)
    if len(found) != 1:
        raise ValueError(f"opt_state holds {len(found)} masked states; replace_mask needs exactly "
                         "one (the state of an optimizer wrapped by keep_pruned_at_zero or freeze, "
                         "alone or inside optax combinators).")
    return found[0]


def replace_mask(opt_state, mask):
    """The same optimizer state under another mask (e.g. after pruning while training goes on).

    Args:
      opt_state: the state of a masked optimizer, or of any optax combinator (``chain``,
        ``named_chain``, ``inject_hyperparams``, ``MultiSteps``, ...) holding exactly one.
      mask: the new mask, with the leaves and shapes of the current one.

    Returns ``opt_state`` with the masked state's mask replaced, wherever it sits. The inner state
    (moments) is kept: the newly pruned weights' entries are never read again. The next update
    sets the newly pruned weights to exactly zero; mask the params too (``masks.apply_mask``) if
    the forward pass before it must already see them at zero.
    """
    old_state = _the_masked_state(opt_state)
    old = masks_lib.mask_leaves(old_state.mask)
    new = masks_lib.mask_leaves(mask)
    if old.keys() != new.keys() or any(jnp.shape(old[k]) != jnp.shape(new[k]) for k in old):
        raise ValueError("The new mask does not have the structure and shapes of the current one; "
                         f"current leaves {sorted(old)}, new leaves {sorted(new)}.")
    return jax.tree_util.tree_map(
        lambda s: s._replace(mask=mask) if s is old_state else s, opt_state,
        is_leaf=_is_masked_state)
