"""An optax transformation that keeps pruned weights at exactly zero.

``keep_pruned_at_zero(inner, mask)`` wraps any optax optimizer, including ones whose update takes
extra arguments (``optax.contrib.reduce_on_plateau`` needs ``value=``): it is an
``optax.GradientTransformationExtraArgs`` and passes every extra keyword argument on.

The mask lives in the optimizer state, not in the closure, so one jitted train step serves every
pruning level: a new level needs only ``replace_mask`` (or a new ``init``), never a new compile.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import optax

from sparse_robust import masks as masks_lib


class MaskedState(NamedTuple):
    """Optimizer state of :func:`keep_pruned_at_zero`: the inner state and the current mask."""
    inner_state: Any
    mask: Any


def keep_pruned_at_zero(inner: optax.GradientTransformation,
                        mask=None) -> optax.GradientTransformationExtraArgs:
    """Wrap an optax optimizer so that pruned weights get exactly zero updates.

    Gradients of pruned weights are zeroed *before* the inner optimizer (so no momentum or second
    moment ever builds up for them) and its updates are zeroed *after* (so weight decay and any
    other term cannot move them). Starting from masked params, pruned weights stay exactly 0.
    ``mask=None`` at construction means a dense (all-alive) mask at ``init``.
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        mask_ = masks_lib.create_mask(params) if mask is None else mask
        masks_lib.check_mask(params, mask_)
        return MaskedState(inner.init(params), mask_)

    def update_fn(updates, state, params=None, **extra_args):
        updates = masks_lib.apply_mask(updates, state.mask)
        updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        return masks_lib.apply_mask(updates, state.mask), MaskedState(inner_state, state.mask)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def replace_mask(opt_state: MaskedState, mask) -> MaskedState:
    """The same optimizer state under another mask (e.g. after pruning while training goes on).

    The inner state (moments) is kept: the newly pruned weights' entries are never read again,
    because their gradients and updates are zeroed from now on. Mask the params yourself
    (``masks.apply_mask``) so that they start at zero.
    """
    if not isinstance(opt_state, MaskedState):
        raise ValueError(f"opt_state is a {type(opt_state).__name__}; replace_mask needs the state "
                         "of keep_pruned_at_zero (a MaskedState).")
    old = masks_lib.mask_leaves(opt_state.mask)
    new = masks_lib.mask_leaves(mask)
    if old.keys() != new.keys() or any(old[k].shape != new[k].shape for k in old):
        raise ValueError("The new mask does not have the structure and shapes of the current one; "
                         f"current leaves {sorted(old)}, new leaves {sorted(new)}.")
    return opt_state._replace(mask=mask)
