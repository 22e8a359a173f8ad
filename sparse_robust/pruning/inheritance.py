"""Weights inheritance and inverse weights inheritance (Wang et al. 2020).

A *small* sparse network (trained params + mask) hands its surviving weights to a *large*
network: of the same architecture (:func:`inherit`) or of the same family with wider layers
(:func:`inherit_wider`, e.g. ``width_multiplier=2``). Every surviving weight keeps its position
(in a wider layer: the leading slice of every axis); every other entry of the large network is
filled by a rule: ``"zeros"`` (the paper's default, which imposes the small network's sparse
weight distribution) or ``"init"`` (``fill_scale`` times the large network's own fresh init).
Leaves without a mask entry (biases, norm scales, batch statistics) count as fully surviving.

With zero filling, the large network computes exactly the small sparse network's function: new
units get no input and send no output. :func:`trainable_mask` says which weights then train.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparse_robust import masks as masks_lib
from sparse_robust import optim
from sparse_robust import training
from sparse_robust.checks import check_choice
from sparse_robust.models.base import linear_layer_calls

FILLS = ("zeros", "init")
TRAINABLE = ("all", "inherited", "new")


def flattened_inputs(model: nn.Module, sample_input) -> dict[str, int]:
    """{dense layer: P} for every nn.Dense fed by a flattened conv feature map of P positions.

    Such a kernel's input axis is P blocks of C channels, (h, w, c) order; widening the convs
    widens every block, so inheritance must copy block by block instead of a leading slice.
    Shapes only: nothing is computed.
    """
    calls = linear_layer_calls(model, sample_input)
    found = {}
    for (_, previous, _), (name, module, shape) in zip(calls, calls[1:]):
        if isinstance(module, nn.Dense) and isinstance(previous, nn.Conv):
            channels = previous.features
            if shape[-1] % channels == 0 and shape[-1] // channels > 1:
                found[name] = shape[-1] // channels
    return found


def _leaves(tree, what: str) -> dict[str, Any]:
    leaves = masks_lib.named_leaves(tree)
    if not leaves:
        raise ValueError(f"{what} is empty.")
    return leaves


def _blocked_shape(name: str, shape: tuple, positions: Optional[int]) -> tuple:
    """The kernel shape with its input axis split into (positions, channels) when flattened."""
    if positions is None:
        return shape
    if len(shape) != 2 or shape[0] % positions:
        raise ValueError(f"flattened_inputs[{name!r}] = {positions} does not split the input axis "
                         f"of the kernel of shape {shape} into equal blocks.")
    return (positions, shape[0] // positions, shape[1])


def _positions(small_params, small_mask, large_params, flattened) -> dict[str, tuple]:
    """{leaf: (small value, inherited flags in the large shape, large value)}; checks everything."""
    small, large = _leaves(small_params, "small_params"), _leaves(large_params, "large_init_params")
    if small.keys() != large.keys():
        raise ValueError(
            "The small and the large network have different parameter structures: only in the "
            f"small one {sorted(small.keys() - large.keys())}, only in the large one "
            f"{sorted(large.keys() - small.keys())}. Inheritance needs the same architecture "
            "family.")
    if small_mask is not None:
        masks_lib.check_mask(small_params, small_mask)
    alive = {} if small_mask is None else masks_lib.mask_leaves(small_mask)
    flattened = dict(flattened or {})
    unknown = set(flattened) - {masks_lib.layer_name(n) for n in large}
    if unknown:
        raise ValueError(f"flattened_inputs names unknown layers {sorted(unknown)}.")

    out = {}
    for name, large_value in large.items():
        small_value = small[name]
        s_shape, l_shape = np.shape(small_value), np.shape(large_value)
        positions = flattened.get(masks_lib.layer_name(name)) if name.endswith("kernel") else None
        s_view, l_view = (_blocked_shape(name, s, positions) for s in (s_shape, l_shape))
        if len(s_view) != len(l_view) or any(s > l for s, l in zip(s_view, l_view)):
            raise ValueError(
                f"Leaf {name!r} has shape {s_shape} in the small network and {l_shape} in the "
                "large one; every axis of the large network must be at least as long.")
        if positions is not None and s_view[0] != l_view[0]:
            raise ValueError(f"Leaf {name!r}: the flattened input has {s_view[0]} positions in the "
                             f"small network and {l_view[0]} in the large one.")
        window = tuple(slice(0, s) for s in s_view)
        flags = alive.get(name)
        flags = jnp.ones(s_view, bool) if flags is None else jnp.reshape(flags, s_view)
        inherited = jnp.zeros(l_view, bool).at[window].set(flags).reshape(l_shape)
        placed = jnp.zeros(l_view, jnp.result_type(large_value)).at[window].set(
            jnp.reshape(small_value, s_view)).reshape(l_shape)
        out[name] = (placed, inherited, large_value)
    return out


def inherit_wider(small_params, small_mask, large_init_params, *, fill: str = "zeros",
                  fill_scale: float = 1.0, flattened_inputs: Optional[Mapping[str, int]] = None):
    """Initial params of a large network holding a small sparse network's surviving weights.

    Args:
      small_params: trained params of the small network.
      small_mask: its mask (None = every weight survives).
      large_init_params: a fresh init of the large network: same leaf names, every axis at least
        as long (kernels ``[..., in, out]``, biases and norm parameters ``[out]``).
      fill: "zeros" or "init" (``fill_scale`` × ``large_init_params``) for every entry that does
        not receive a surviving weight: pruned entries and the new rows/columns/channels.
      flattened_inputs: {dense layer: positions} for dense layers fed by a flattened conv map
        (see :func:`flattened_inputs`); their weights are copied block by block.

    Returns:
      Params with the structure of ``large_init_params``.
    """
    check_choice("fill", fill, FILLS)
    if not np.isfinite(fill_scale):
        raise ValueError(f"fill_scale={fill_scale!r} is invalid; allowed values: finite numbers.")
    positions = _positions(small_params, small_mask, large_init_params, flattened_inputs)
    values = {}
    for name, (placed, inherited, init) in positions.items():
        filler = jnp.zeros_like(init) if fill == "zeros" else fill_scale * init
        values[name] = jnp.where(inherited, placed, filler).astype(jnp.result_type(init))
    return masks_lib.from_named_leaves(large_init_params, values)


def inherit(small_params, small_mask, large_init_params, *, fill: str = "zeros",
            fill_scale: float = 1.0):
    """:func:`inherit_wider` for two networks of the same architecture (identical shapes)."""
    small = _leaves(small_params, "small_params")
    for name, leaf in _leaves(large_init_params, "large_init_params").items():
        if name in small and np.shape(small[name]) != np.shape(leaf):
            raise ValueError(f"Leaf {name!r} has shape {np.shape(small[name])} in the small "
                             f"network and {np.shape(leaf)} in the large one; use inherit_wider "
                             "for a wider network.")
    return inherit_wider(small_params, small_mask, large_init_params, fill=fill,
                         fill_scale=fill_scale)


def trainable_mask(small_params, small_mask, large_params, which: str = "all", *,
                   flattened_inputs: Optional[Mapping[str, int]] = None):
    """Which entries of the large network train after inheritance: a bool array per leaf.

    "all" (default): every entry; "inherited": only the entries that received a surviving
    weight; "new": only the others. Pass it to :func:`create_train_state`.
    """
    check_choice("which", which, TRAINABLE)
    positions = _positions(small_params, small_mask, large_params, flattened_inputs)
    flags = {name: (jnp.ones_like(inherited) if which == "all" else
                    inherited if which == "inherited" else ~inherited)
             for name, (_, inherited, _) in positions.items()}
    return masks_lib.from_named_leaves(large_params, flags)


def create_train_state(params, model_state, tx: optax.GradientTransformation, trainable,
                       key: jax.Array) -> training.TrainState:
    """A fresh train state whose untrainable entries keep their (non-zero) values.

    Unlike ``training.create_train_state`` nothing is zeroed: ``trainable`` (e.g. from
    :func:`trainable_mask`) only stops gradients and updates, through ``optim.freeze`` (whose
    state the train step recognises).
    """
    params, model_state, trainable, key = jax.tree_util.tree_map(
        jnp.array, (params, model_state, trainable, jnp.asarray(key, jnp.uint32)))
    return training.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               model_state=model_state,
                               opt_state=optim.freeze(tx, trainable).init(params),
                               key=key)
