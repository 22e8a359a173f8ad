"""Pruning masks as pytrees.

A mask has the structure of the parameters: a boolean array (True = weight alive) for every
prunable leaf and ``None`` for every other leaf (biases, norm scales, ...). All functions here are
pure and work under ``jax.jit``/``jax.vmap``.

The tree helpers (`is_none`, `named_leaves`, `from_named_leaves`, `map_prunable`) are public: the
pruning, HYDRA and inheritance modules use them, and so can any code that handles masks.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

Params = Any
Mask = Any
PrunablePredicate = Callable[[str, Any], bool]


def is_none(x) -> bool:
    """``is_leaf`` for trees with None leaves (masks): None counts as a leaf, not an empty node."""
    return x is None


def path_name(path) -> str:
    """'/'-joined readable name of a pytree key path, e.g. 'dense_0/kernel'."""
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def default_prunable(name: str, leaf) -> bool:
    """Kernels of dense and conv layers are prunable; biases, norms and the rest are not."""
    return name.split("/")[-1] == "kernel" and np.ndim(leaf) >= 2


def create_mask(params: Params, prunable: PrunablePredicate = default_prunable) -> Mask:
    """An all-alive mask: True arrays for the leaves ``prunable(name, leaf)`` selects, None elsewhere."""
    def make(path, leaf):
        return jnp.ones(jnp.shape(leaf), bool) if prunable(path_name(path), leaf) else None

    mask = jax.tree_util.tree_map_with_path(make, params)
    if not mask_leaves(mask):
        raise ValueError(
            "No prunable leaf found in the params: the predicate selected nothing. Leaves are named "
            f"like {list(leaf_names(params))[:5]}; pass `prunable=` to choose them.")
    return mask


def leaf_names(tree) -> list[str]:
    """The '/'-joined names of a pytree's leaves (None leaves skipped), in flattening order."""
    return [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def named_leaves(tree) -> dict[str, Any]:
    """{leaf name: leaf} in flattening order; None leaves (a mask's unprunable ones) included."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_none)[0]
    return {path_name(p): leaf for p, leaf in flat}


def from_named_leaves(like, values: Mapping[str, Any]):
    """A tree with the structure of ``like`` whose leaf named n is ``values[n]`` (None-aware)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(like, is_leaf=is_none)
    return treedef.unflatten([values[path_name(p)] for p, _ in flat])


def map_prunable(fn: Callable, mask: Mask, *trees):
    """``fn(mask_leaf, *tree_leaves)`` at every prunable leaf, None at every other one: a tree
    with the mask's structure (e.g. scores, or per-weight flags restricted to the prunable part)."""
    return jax.tree_util.tree_map(lambda m, *leaves: None if m is None else fn(m, *leaves),
                                  mask, *trees, is_leaf=is_none)


def mask_leaves(mask: Mask) -> dict[str, Any]:
    """{leaf name: bool array} for the prunable leaves of a mask (None leaves skipped)."""
    flat = jax.tree_util.tree_flatten_with_path(mask, is_leaf=is_none)[0]
    return {path_name(p): m for p, m in flat if m is not None}


def layer_name(leaf_name: str) -> str:
    """The module path of a leaf: 'block_1/conv_0/kernel' -> 'block_1/conv_0'."""
    return leaf_name.rsplit("/", 1)[0] if "/" in leaf_name else leaf_name


def check_mask(params: Params, mask: Mask) -> None:
    """Raise ValueError unless ``mask`` has the params' structure, shapes and a bool dtype."""
    try:
        pairs = jax.tree_util.tree_map(lambda m, p: (m, p), mask, params, is_leaf=is_none)
    except ValueError as err:
        raise ValueError(
            "The mask does not have the structure of the params. Build it with "
            f"`create_mask(params)`. Params leaves: {leaf_names(params)[:8]}...; mask leaves: "
            f"{list(mask_leaves(mask))[:8]}... ({err})") from None
    flat = jax.tree_util.tree_flatten_with_path(pairs, is_leaf=lambda x: isinstance(x, tuple))[0]
    for path, (m, p) in flat:
        if m is None:
            continue
        if jnp.shape(m) != jnp.shape(p):
            raise ValueError(f"Mask leaf {path_name(path)!r} has shape {jnp.shape(m)} but the param "
                             f"has shape {jnp.shape(p)}.")
        if jnp.result_type(m) != jnp.bool_:
            raise ValueError(f"Mask leaf {path_name(path)!r} has dtype {jnp.result_type(m)}; masks "
                             "are boolean (True = weight alive).")


def apply_mask(params: Params, mask: Mask) -> Params:
    """Zero the pruned weights; leaves whose mask is None pass through."""
    if mask is None:
        return params
    return jax.tree_util.tree_map(
        lambda m, p: p if m is None else jnp.where(m, p, jnp.zeros((), jnp.result_type(p))),
        mask, params, is_leaf=is_none)


def count(mask: Mask) -> tuple[int, int]:
    """(alive, total) over all prunable leaves (host values)."""
    leaves = mask_leaves(mask).values()
    return (int(sum(int(np.sum(m)) for m in leaves)), int(sum(int(np.size(m)) for m in leaves)))


def weights_remaining(mask: Mask) -> float:
    """Fraction of prunable weights alive, in [0, 1]."""
    alive, total = count(mask)
    return alive / total


def layer_weights_remaining(mask: Mask) -> dict[str, float]:
    """{layer name: fraction alive} for every prunable leaf."""
    return {layer_name(n): float(np.mean(m)) for n, m in mask_leaves(mask).items()}


def is_subset(new: Mask, old: Mask) -> bool:
    """True when every weight alive in ``new`` is alive in ``old`` (masks only shrink)."""
    new_leaves, old_leaves = mask_leaves(new), mask_leaves(old)
    if new_leaves.keys() != old_leaves.keys():
        return False
    return all(bool(np.all(~np.asarray(new_leaves[k]) | np.asarray(old_leaves[k])))
               for k in new_leaves)


def summary_table(mask: Mask, *, params: Params | None = None) -> str:
    """A text table of alive/total weights per prunable layer, plus the overall fraction (and,
    with ``params``, the count of all parameters, prunable or not)."""
    rows = [("layer", "alive", "total", "remaining")]
    for name, m in mask_leaves(mask).items():
        alive, total = int(np.sum(m)), int(np.size(m))
        rows.append((layer_name(name), str(alive), str(total), f"{alive / total:.2%}"))
    alive, total = count(mask)
    rows.append(("overall", str(alive), str(total), f"{alive / total:.2%}"))
    if params is not None:
        check_mask(params, mask)
        dense = sum(int(np.size(p)) for p in jax.tree_util.tree_leaves(params))
        rows.append(("all params", "", str(dense), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def mask_to_numpy(mask: Mask) -> dict[str, np.ndarray]:
    """Flat {leaf name: bool ndarray}, e.g. for ``np.savez``."""
    return {k: np.asarray(v) for k, v in mask_leaves(mask).items()}


def mask_from_numpy(params: Params, arrays: Mapping[str, np.ndarray],
                    prunable: PrunablePredicate = default_prunable) -> Mask:
    """Inverse of :func:`mask_to_numpy`: the mask of ``params`` saved as ``arrays``."""
    template = create_mask(params, prunable)
    names = set(mask_leaves(template))
    if set(arrays) != names:
        raise ValueError(f"Saved mask leaves {sorted(arrays)} do not match the model's prunable "
                         f"leaves {sorted(names)}.")

    def load(path, m):
        return None if m is None else jnp.asarray(arrays[path_name(path)], bool)

    mask = jax.tree_util.tree_map_with_path(load, template, is_leaf=is_none)
    check_mask(params, mask)
    return mask
