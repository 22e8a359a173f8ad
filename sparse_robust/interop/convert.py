"""Our variables <-> a flat {PyTorch name: numpy array} state dict, with PyTorch's layouts.

  Linear     kernel (in, out)            <-> weight (out, in); bias
  Conv2d     kernel (kh, kw, in, out)    <-> weight (out, in, kh, kw); bias
  BatchNorm  scale, bias / mean, var     <-> weight, bias / running_mean, running_var, and
                                             num_batches_tracked (not kept by flax: written as
                                             given, ignored on import)

A Linear fed by the flatten of a feature map sees its input rows in our NHWC order (h, w, c);
PyTorch flattens NCHW (c, h, w), so those rows are permuted (square maps: every model here is).
A mask leaf goes to `<weight name>_mask` (as `torch.nn.utils.prune` names its buffers), float
0 / 1 in the weight's layout; the weights themselves carry the mask's zeros.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sparse_robust import masks as masks_lib
from sparse_robust.interop.naming import Layer, layer_table

MASK_SUFFIX = "_mask"


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One array of the state dict and the leaf of ours it is."""

    key: str  # PyTorch name, e.g. "features.0.weight"
    collection: Optional[str]  # "params", "batch_stats", or None for num_batches_tracked
    leaf: str  # our leaf name inside the collection, e.g. "conv_0/kernel"
    to_torch: Callable[[np.ndarray], np.ndarray]
    from_torch: Callable[[np.ndarray], np.ndarray]
    torch_shape: tuple


def _same(x):
    return x


def _dense_entry(layer: Layer, shape: tuple) -> _Entry:
    rows, out = shape
    channels = layer.flattened_channels
    if not channels:
        return _Entry(f"{layer.torch}.weight", "params", f"{layer.path}/kernel",
                      lambda k: k.T, lambda w: w.T, (out, rows))
    side = math.isqrt(rows // channels)
    if side * side * channels != rows:
        raise ValueError(f"Layer {layer.path!r} takes {rows} inputs, not the flatten of a square "
                         f"map of {channels} channels; only square feature maps can be exported.")
    nhwc, nchw = (side, side, channels, out), (channels, side, side, out)

    def to_torch(kernel):
        return kernel.reshape(nhwc).transpose(2, 0, 1, 3).reshape(rows, out).T

    def from_torch(weight):
        return weight.T.reshape(nchw).transpose(1, 2, 0, 3).reshape(rows, out)

    return _Entry(f"{layer.torch}.weight", "params", f"{layer.path}/kernel", to_torch, from_torch,
                  (out, rows))


def _layer_entries(layer: Layer, shapes: Mapping[str, tuple]) -> list[_Entry]:
    """The state-dict entries of one layer, given our leaves' shapes {leaf name: shape}."""
    path = layer.path
    if layer.kind == "dense":
        entries = [_dense_entry(layer, shapes[f"{path}/kernel"])]
    elif layer.kind == "conv":
        kh, kw, cin, cout = shapes[f"{path}/kernel"]
        entries = [_Entry(f"{layer.torch}.weight", "params", f"{path}/kernel",
                          lambda k: k.transpose(3, 2, 0, 1), lambda w: w.transpose(2, 3, 1, 0),
                          (cout, cin, kh, kw))]
    else:  # bn
        (channels,) = shapes[f"{path}/scale"]
        pairs = [("weight", "params", "scale"), ("bias", "params", "bias"),
                 ("running_mean", "batch_stats", "mean"), ("running_var", "batch_stats", "var")]
        entries = [_Entry(f"{layer.torch}.{theirs}", collection, f"{path}/{ours}", _same, _same,
                          (channels,)) for theirs, collection, ours in pairs]
        return entries + [_Entry(f"{layer.torch}.num_batches_tracked", None, "", _same, _same, ())]
    if f"{path}/bias" in shapes:
        entries.append(_Entry(f"{layer.torch}.bias", "params", f"{path}/bias", _same, _same,
                              shapes[f"{path}/bias"]))
    return entries


def _shapes(tree) -> dict[str, tuple]:
    return {name: tuple(np.shape(leaf)) for name, leaf in masks_lib.named_leaves(tree).items()}


def _plan(model, params, model_state) -> list[_Entry]:
    """The entries of every array of the state dict, in PyTorch's `state_dict()` order."""
    shapes = {**_shapes(params), **_shapes((model_state or {}).get("batch_stats", {}))}
    table = layer_table(model, params)
    entries = [entry for layer in table for entry in _layer_entries(layer, shapes)]
    mapped = {(entry.collection, entry.leaf) for entry in entries}
    ours = [("params", name) for name in _shapes(params)] + [
        ("batch_stats", name) for name in _shapes((model_state or {}).get("batch_stats", {}))]
    unmapped = [f"{collection}/{name}" for collection, name in ours
                if (collection, name) not in mapped]
    if unmapped:
        raise ValueError(f"{type(model).__name__} has leaves with no PyTorch name: {unmapped}.")
    return entries


def _collections(params, model_state) -> dict[str, dict[str, Any]]:
    return {"params": masks_lib.named_leaves(params),
            "batch_stats": masks_lib.named_leaves((model_state or {}).get("batch_stats", {}))}


def to_state_dict(model, params, model_state=None, mask=None, *, include_masks: bool = False,
                  num_batches_tracked: int = 0) -> dict[str, np.ndarray]:
    """{PyTorch name: numpy array} of `model`'s variables, ready for `safetensors.numpy.save_file`.

    With a `mask`, its zeros are put into the weights; `include_masks` also writes every mask leaf
    as `<weight name>_mask`. BatchNorm's `num_batches_tracked` (flax does not count batches) is
    written as `num_batches_tracked`.
    """
    if include_masks and mask is None:
        raise ValueError("include_masks=True needs the mask.")
    if mask is not None:
        masks_lib.check_mask(params, mask)
        params = masks_lib.apply_mask(params, mask)
    entries = _plan(model, params, model_state)
    values = _collections(params, model_state)
    out = {}
    for entry in entries:
        if entry.collection is None:
            out[entry.key] = np.asarray(num_batches_tracked, np.int64)
            continue
        value = np.asarray(values[entry.collection][entry.leaf])
        out[entry.key] = np.ascontiguousarray(entry.to_torch(value))
    if include_masks:
        alive = masks_lib.mask_leaves(mask)
        for entry in entries:
            if entry.collection == "params" and entry.leaf in alive:
                layout = entry.to_torch(np.asarray(alive[entry.leaf], np.float32))
                out[entry.key + MASK_SUFFIX] = np.ascontiguousarray(layout)
    return out


class Imported(NamedTuple):
    """Variables read from a state dict: `mask` is None when the state dict holds no masks."""

    params: Any
    model_state: Any
    mask: Optional[Any]


def _mismatch(state_dict: Mapping[str, Any], expected: Mapping[str, tuple]) -> Optional[str]:
    """One line naming the first missing, unexpected or mis-shaped key, or None."""
    missing = [key for key in expected if key not in state_dict]
    unexpected = sorted(key for key in state_dict if key not in expected)
    misshaped = [key for key in expected
                 if key in state_dict and tuple(np.shape(state_dict[key])) != expected[key]]
    counts = f"({len(missing)} missing, {len(unexpected)} unexpected, {len(misshaped)} mis-shaped)"
    if missing:
        key = missing[0]
        return f"key {key!r} (shape {expected[key]}) is missing from the state dict {counts}"
    if unexpected:
        return f"key {unexpected[0]!r} is not a variable of this model {counts}"
    if misshaped:
        key = misshaped[0]
        return (f"key {key!r} has shape {tuple(np.shape(state_dict[key]))} but the model needs "
                f"{expected[key]} {counts}")
    return None


def expected_keys(model, sample_input, *, include_masks: bool = False) -> dict[str, tuple]:
    """{PyTorch name: shape} of every array a state dict of `model` must hold, for inputs shaped
    like `sample_input` (one example or a batch of them)."""
    params, model_state = _abstract_variables(model, sample_input)
    return _expected(_plan(model, params, model_state), params, include_masks)


def _expected(entries, params, include_masks) -> dict[str, tuple]:
    expected = {entry.key: entry.torch_shape for entry in entries}
    if include_masks:
        prunable = masks_lib.mask_leaves(masks_lib.create_mask(params))
        expected.update({entry.key + MASK_SUFFIX: entry.torch_shape for entry in entries
                         if entry.collection == "params" and entry.leaf in prunable})
    return expected


def _input_shape(sample_input) -> tuple:
    """The batch shape of `sample_input`: an input batch, or its shape as a tuple of ints."""
    if isinstance(sample_input, (tuple, list)) and all(isinstance(d, int) for d in sample_input):
        shape = tuple(sample_input)
    else:
        shape = tuple(np.shape(sample_input))
    if len(shape) < 2:
        raise ValueError("sample_input must be a batch (N, ...) or its shape, e.g. (1, 32, 32, 3); "
                         f"got shape {shape}.")
    return shape


def _abstract_variables(model, sample_input):
    x = jax.ShapeDtypeStruct(_input_shape(sample_input), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)
    variables = dict(variables)
    params = variables.pop("params")
    return params, variables


def from_state_dict(model, state_dict: Mapping[str, Any], sample_input) -> Imported:
    """(params, model_state, mask) of `model` from a state dict such as `to_state_dict` writes or
    a PyTorch checkpoint of the matching definition (see `sparse_robust.interop.naming`).

    `sample_input`: an input batch (or its shape) of the data the model will see, for the shapes.
    Raises ValueError naming the first missing, unexpected or mis-shaped key before anything is
    converted. Masks are read when the state dict has `*_mask` keys (then it needs all of them);
    a mask entry is alive where it is nonzero.
    """
    like_params, like_state = _abstract_variables(model, sample_input)
    entries = _plan(model, like_params, like_state)
    with_masks = any(key.endswith(MASK_SUFFIX) for key in state_dict)
    problem = _mismatch(state_dict, _expected(entries, like_params, with_masks))
    if problem:
        raise ValueError(f"The state dict does not fit {type(model).__name__}: {problem}.")

    like = _collections(like_params, like_state)
    values = {"params": {}, "batch_stats": {}}
    for entry in entries:
        if entry.collection is None:
            continue
        dtype = like[entry.collection][entry.leaf].dtype
        array = entry.from_torch(np.asarray(state_dict[entry.key]))
        values[entry.collection][entry.leaf] = jnp.asarray(array, dtype)
    params = masks_lib.from_named_leaves(like_params, values["params"])
    model_state = dict(like_state)
    if "batch_stats" in model_state:
        model_state["batch_stats"] = masks_lib.from_named_leaves(like_state["batch_stats"],
                                                                 values["batch_stats"])
    mask = None
    if with_masks:
        alive = {entry.leaf: entry.from_torch(np.asarray(state_dict[entry.key + MASK_SUFFIX])) != 0
                 for entry in entries if entry.key + MASK_SUFFIX in state_dict}
        mask = masks_lib.mask_from_numpy(params, alive)
    return Imported(params, model_state, mask)
