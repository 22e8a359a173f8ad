"""`compact`: remove dead channels physically, giving a smaller network with the same function.

A hidden channel (a conv filter or a dense neuron) can go when

- its outgoing weights are all pruned (nothing reads it), or
- its own weights are all pruned (a channel mask removed it): it then outputs the constant
  relu(bias). Into a dense layer that constant is folded exactly into the next bias (for a
  flattened feature map: over every position of the channel). Into a 'SAME' convolution it is
  not a bias (zero padding makes it vary near the border), so such a channel stays, unless its
  constant is 0 (no bias, a bias <= 0, or a zero-initialised one).

A layer keeps at least one channel. The result computes the same logits up to float rounding;
its convolutions and matmuls are smaller, so FLOPs and time drop. Host-side (numpy): shapes change.
Supported: MLP (dense-300-100, lenet-300-100) and ConvNet (conv-2/4/6); batch-norm models are not
(a removed filter's BN output is a constant map again, entering a padded conv).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from sparse_robust import masks as masks_lib
from sparse_robust.models import ConvNet, MLP


class Compacted(NamedTuple):
    """The smaller network: its model, params and mask, and the fields that build the model
    (`model_kwargs`, for `type(model)(**model_kwargs)` or a config)."""

    model: Any
    params: Any
    mask: Any
    model_kwargs: dict


def supports(model) -> bool:
    """Whether `compact` can shrink this model (an MLP or a ConvNet)."""
    return isinstance(model, (MLP, ConvNet))


def _chain(model, params) -> list[tuple[str, str]]:
    """(layer name, "conv" or "dense") in order; the last is `output`."""
    if isinstance(model, MLP):
        return [(f"dense_{i}", "dense") for i in range(len(model.hidden_sizes))] + [
            ("output", "dense")]
    if isinstance(model, ConvNet):
        convs = sum(len(stage) for stage in model.conv_stages)
        return ([(f"conv_{i}", "conv") for i in range(convs)]
                + [(f"dense_{i}", "dense") for i in range(len(model.dense_sizes))]
                + [("output", "dense")])
    raise ValueError(f"compact supports MLP and ConvNet models (dense-300-100, lenet-300-100, "
                     f"conv-2/4/6), not {type(model).__name__}.")


def _select_inputs(array: np.ndarray, kind: str, after_conv: bool, keep: np.ndarray) -> np.ndarray:
    if kind == "conv":
        return array[:, :, keep, :]
    if after_conv:
        out = array.shape[-1]
        return array.reshape(-1, keep.size, out)[:, keep, :].reshape(-1, out)
    return array[keep]


def compact(model, params, mask) -> Compacted:
    """The network of `model` with `params` under `mask`, without its removable channels."""
    chain = _chain(model, params)
    params = masks_lib.apply_mask(params, mask)
    kernel = {name: np.array(params[name]["kernel"]) for name, _ in chain}
    bias = {name: np.array(params[name]["bias"]) if "bias" in params[name] else None
            for name, _ in chain}
    alive = {name: np.array(m) for name, m in masks_lib.mask_leaves(mask).items()}
    alive = {name: alive.get(f"{name}/kernel", np.ones(kernel[name].shape, bool))
             for name, _ in chain}
    for (name, kind), (nxt, nxt_kind) in zip(chain[:-1], chain[1:]):
        channels = kernel[name].shape[-1]
        after_conv = kind == "conv" and nxt_kind == "dense"
        dead = ~alive[name].reshape(-1, channels).any(axis=0)
        # Which of these channels the next layer reads through an alive weight.
        if nxt_kind == "conv":
            reads = np.transpose(alive[nxt], (2, 0, 1, 3)).reshape(channels, -1).any(axis=1)
        elif after_conv:
            reads = alive[nxt].reshape(-1, channels, alive[nxt].shape[-1]).any(axis=(0, 2))
        else:
            reads = alive[nxt].any(axis=1)
        constant = np.maximum(bias[name], 0) if bias[name] is not None else np.zeros(channels)
        foldable = np.full(channels, nxt_kind == "dense") | (constant == 0)
        remove = ~reads | (dead & foldable)
        if remove.all():
            remove[np.argmax(~dead)] = False
        fold = remove & reads & (constant != 0)
        if fold.any():  # dense next: the removed constants' contribution becomes bias
            rows = kernel[nxt].reshape(-1, channels, kernel[nxt].shape[-1])
            bias[nxt] = bias[nxt] + np.einsum("c,pco->o", constant * fold, rows)
        keep = ~remove
        kernel[name], alive[name] = kernel[name][..., keep], alive[name][..., keep]
        if bias[name] is not None:
            bias[name] = bias[name][keep]
        kernel[nxt] = _select_inputs(kernel[nxt], nxt_kind, after_conv, keep)
        alive[nxt] = _select_inputs(alive[nxt], nxt_kind, after_conv, keep)

    new_params = {name: {"kernel": kernel[name], **({} if bias[name] is None else
                                                    {"bias": bias[name]})}
                  for name, _ in chain}
    widths = [kernel[name].shape[-1] for name, _ in chain[:-1]]
    if isinstance(model, MLP):
        kwargs = {"hidden_sizes": tuple(widths), "use_bias": model.use_bias}
    else:
        stages, start = [], 0
        for stage in model.conv_stages:
            stages.append(tuple(widths[start:start + len(stage)]))
            start += len(stage)
        kwargs = {"conv_stages": tuple(stages), "dense_sizes": tuple(widths[start:])}
    kwargs.update(num_classes=model.num_classes, conv_impl=model.conv_impl)
    small = type(model)(**kwargs)
    new_mask = masks_lib.create_mask(new_params)
    new_mask = masks_lib.from_named_leaves(new_mask, {
        leaf: None if m is None else alive[masks_lib.layer_name(leaf)]
        for leaf, m in masks_lib.named_leaves(new_mask).items()})
    return Compacted(small, new_params, new_mask, kwargs)
