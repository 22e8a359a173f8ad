"""`compact`: remove dead channels physically, giving a smaller network with the same function.

A hidden channel (a conv filter or a dense neuron) can go when

- its outgoing weights are all pruned (nothing reads it), or
- its own weights are all pruned (a channel mask removed it): it then outputs a constant,
  relu(bias), or behind a batch norm relu(β + γ·(bias − mean)/sqrt(var + ε)) with the running
  statistics. Into a dense layer, or a 'VALID' convolution (lenet-5's second), that constant is
  folded exactly into the next bias (for a flattened or pooled feature map: over every position
  of the channel; for a VALID conv: over every kernel position). Into a 'SAME' convolution it is
  not a bias (zero padding makes it vary near the border), so such a channel stays, unless its
  constant is 0; so does one whose constant would enter a layer without a bias.

A layer keeps at least one channel. The result computes the same logits up to float rounding —
for batch-norm models in eval mode (running statistics; in train mode a removed channel's batch
statistics would differ) — with smaller convolutions and matmuls, so FLOPs and time drop.
Host-side (numpy): shapes change.

Supported: the feed-forward models, MLP (dense-300-100, lenet-300-100), ConvNet (conv-2/4/6),
LeNet5 (lenet-5), VGG (vgg-16) and HydraVGG (vgg-16-hydra), all their hidden channels; and the
residual ones, ResNet (resnet-18) and WideResNet (wide-resnet-28, wrn-*), only the inner channels
of each block: conv_1's filters, which only the block's conv_2 reads (through bn_1 in ResNet,
bn_2 in WideResNet). A residual add ties every other channel (stem, conv_2, shortcut) to the
same channel of the whole stage, so those stay even where a mask removed them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import numpy as np

from sparse_robust import masks as masks_lib
from sparse_robust.models import ConvNet, HydraVGG, LeNet5, MLP, ResNet, VGG, WideResNet

FEED_FORWARD = (MLP, ConvNet, LeNet5, VGG, HydraVGG)
RESIDUAL = (ResNet, WideResNet)
BN_EPSILON = 1e-5  # flax.linen.BatchNorm's default, which models.base.batch_norm keeps


class Compacted(NamedTuple):
    """The smaller network: its model, params and mask, the fields that build the model
    (`model_kwargs`, for `type(model)(**model_kwargs)` or a config), and its batch statistics
    (None for a model without batch norm)."""

    model: Any
    params: Any
    mask: Any
    model_kwargs: dict
    batch_stats: Any = None


@dataclasses.dataclass(frozen=True)
class _Layer:
    name: str
    kind: str                  # "conv" or "dense"
    bn: Optional[str] = None   # the batch norm between it and its ReLU
    padding: str = "SAME"      # a conv's: a constant input is a bias only to a 'VALID' one


def supports(model) -> bool:
    """Whether `compact` can shrink this model (see the module docstring)."""
    return isinstance(model, FEED_FORWARD + RESIDUAL)


def _dense(count: int) -> list[_Layer]:
    return [_Layer(f"dense_{i}", "dense") for i in range(count)] + [_Layer("output", "dense")]


def _layers(model) -> list[_Layer]:
    """The model's layers in order; the last is `output`."""
    if isinstance(model, MLP):
        return _dense(len(model.hidden_sizes))
    if isinstance(model, ConvNet):
        convs = sum(len(stage) for stage in model.conv_stages)
        return [_Layer(f"conv_{i}", "conv") for i in range(convs)] + _dense(len(model.dense_sizes))
    if isinstance(model, LeNet5):
        return ([_Layer("conv_0", "conv"), _Layer("conv_1", "conv", padding="VALID")]
                + _dense(len(model.dense_sizes)))
    if isinstance(model, (VGG, HydraVGG)):
        convs = sum(layer != "M" for layer in model.layers)
        return ([_Layer(f"conv_{i}", "conv", bn=f"bn_{i}") for i in range(convs)]
                + _dense(len(model.dense_sizes) if isinstance(model, HydraVGG) else 0))
    raise ValueError(f"compact supports MLP, ConvNet, LeNet5, VGG, HydraVGG, ResNet and "
                     f"WideResNet (the registry's models), not {type(model).__name__}.")


def _model_kwargs(model, widths: dict[str, int]) -> dict:
    """The fields of the same model class with the hidden widths `widths` (absolute: the
    width multiplier stays 1)."""
    dense = tuple(width for name, width in widths.items() if name.startswith("dense_"))
    convs = [width for name, width in widths.items() if name.startswith("conv_")]
    kwargs = {"num_classes": model.num_classes, "conv_impl": model.conv_impl}
    if isinstance(model, MLP):
        return {**kwargs, "hidden_sizes": dense, "use_bias": model.use_bias}
    if isinstance(model, ConvNet):
        stages, start = [], 0
        for stage in model.conv_stages:
            stages.append(tuple(convs[start:start + len(stage)]))
            start += len(stage)
        return {**kwargs, "conv_stages": tuple(stages), "dense_sizes": dense}
    if isinstance(model, LeNet5):
        return {**kwargs, "conv_widths": tuple(convs), "dense_sizes": dense}
    remaining = iter(convs)
    layers = tuple(layer if layer == "M" else next(remaining) for layer in model.layers)
    if isinstance(model, HydraVGG):
        return {**kwargs, "layers": layers, "dense_sizes": dense,
                "pooled_size": model.pooled_size}
    return {**kwargs, "layers": layers}


def _select_inputs(array: np.ndarray, kind: str, after_conv: bool, keep: np.ndarray) -> np.ndarray:
    if kind == "conv":
        return array[:, :, keep, :]
    if after_conv:
        out = array.shape[-1]
        return array.reshape(-1, keep.size, out)[:, keep, :].reshape(-1, out)
    return array[keep]


def _bn_constant(bias, norm) -> np.ndarray:
    """relu(BN(bias)) per channel with running statistics: what a dead channel outputs."""
    if norm is not None:
        bias = norm["bias"] + norm["scale"] * (bias - norm["mean"]) / np.sqrt(
            norm["var"] + BN_EPSILON)
    return np.maximum(bias, 0)


def compact(model, params, mask, batch_stats=None) -> Compacted:
    """The network of `model` with `params` (and `batch_stats`, needed for batch-norm models)
    under `mask`, without its removable channels."""
    if isinstance(model, RESIDUAL + (VGG, HydraVGG)) and batch_stats is None:
        raise ValueError(f"compact of a {type(model).__name__} needs its batch_stats (the "
                         "running statistics); pass batch_stats=model_state['batch_stats'].")
    if isinstance(model, RESIDUAL):
        return _compact_blocks(model, params, mask, batch_stats)
    layers = _layers(model)
    norms = [layer.bn for layer in layers if layer.bn]
    unknown = set(params) - {layer.name for layer in layers} - set(norms)
    if unknown:
        raise ValueError(f"compact does not know the layers {sorted(unknown)} of this "
                         f"{type(model).__name__}; it supports the registry's models only.")
    params = masks_lib.apply_mask(params, mask)
    kernel = {layer.name: np.array(params[layer.name]["kernel"]) for layer in layers}
    bias = {layer.name: np.array(params[layer.name]["bias"]) if "bias" in params[layer.name]
            else None for layer in layers}
    norm = {bn: {"scale": np.array(params[bn]["scale"]), "bias": np.array(params[bn]["bias"]),
                 "mean": np.array(batch_stats[bn]["mean"]), "var": np.array(batch_stats[bn]["var"])}
            for bn in norms}
    alive = {name: np.array(m) for name, m in masks_lib.mask_leaves(mask).items()}
    alive = {layer.name: alive.get(f"{layer.name}/kernel", np.ones(kernel[layer.name].shape, bool))
             for layer in layers}
    for layer, nxt in zip(layers[:-1], layers[1:]):
        name, channels = layer.name, kernel[layer.name].shape[-1]
        after_conv = layer.kind == "conv" and nxt.kind == "dense"
        dead = ~alive[name].reshape(-1, channels).any(axis=0)
        # Which of these channels the next layer reads through an alive weight.
        if nxt.kind == "conv":
            reads = np.transpose(alive[nxt.name], (2, 0, 1, 3)).reshape(channels, -1).any(axis=1)
        elif after_conv:
            reads = alive[nxt.name].reshape(-1, channels,
                                            alive[nxt.name].shape[-1]).any(axis=(0, 2))
        else:
            reads = alive[nxt.name].any(axis=1)
        # What a dead channel outputs everywhere: its bias, through the batch norm, the ReLU.
        constant = _bn_constant(bias[name] if bias[name] is not None else np.zeros(channels),
                                norm[layer.bn] if layer.bn else None)
        into_bias = (nxt.kind == "dense" or nxt.padding == "VALID") and bias[nxt.name] is not None
        remove = ~reads | (dead & (into_bias | (constant == 0)))
        if remove.all():
            remove[np.argmax(~dead)] = False
        fold = remove & reads & (constant != 0)
        if fold.any():  # the removed constants' contribution becomes the next layer's bias
            rows = kernel[nxt.name].reshape(-1, channels, kernel[nxt.name].shape[-1])
            bias[nxt.name] = bias[nxt.name] + np.einsum("c,pco->o", constant * fold, rows)
        keep = ~remove
        kernel[name], alive[name] = kernel[name][..., keep], alive[name][..., keep]
        if bias[name] is not None:
            bias[name] = bias[name][keep]
        if layer.bn:
            norm[layer.bn] = {key: value[keep] for key, value in norm[layer.bn].items()}
        kernel[nxt.name] = _select_inputs(kernel[nxt.name], nxt.kind, after_conv, keep)
        alive[nxt.name] = _select_inputs(alive[nxt.name], nxt.kind, after_conv, keep)

    new_params = {layer.name: {"kernel": kernel[layer.name],
                               **({} if bias[layer.name] is None else {"bias": bias[layer.name]})}
                  for layer in layers}
    new_params.update({bn: {"scale": norm[bn]["scale"], "bias": norm[bn]["bias"]}
                       for bn in norms})
    new_stats = {bn: {"mean": norm[bn]["mean"], "var": norm[bn]["var"]} for bn in norms}
    kwargs = _model_kwargs(model, {layer.name: kernel[layer.name].shape[-1]
                                   for layer in layers[:-1]})
    new_mask = masks_lib.create_mask(new_params)
    new_mask = masks_lib.from_named_leaves(new_mask, {
        leaf: None if m is None else alive[masks_lib.layer_name(leaf)]
        for leaf, m in masks_lib.named_leaves(new_mask).items()})
    return Compacted(type(model)(**kwargs), new_params, new_mask, kwargs,
                     new_stats if norms else None)


def _blocks(model) -> list[list[str]]:
    """The residual blocks' names, per stage (ResNet) or group (WideResNet)."""
    if isinstance(model, ResNet):
        counts = list(model.stage_sizes)
    else:
        counts = [(model.depth - 4) // 6] * 3
    return [[f"block_{stage + 1}_{block + 1}" for block in range(count)]
            for stage, count in enumerate(counts)]


def _compact_blocks(model, params, mask, batch_stats) -> Compacted:
    """ResNet / WideResNet: each block's conv_1 filters that its conv_2 does not read, or that are
    dead with a constant of 0 (conv_2 is padded: another constant is no bias), go with their
    batch-norm entries and conv_2's input rows; everything else is unchanged."""
    to_numpy = lambda tree: {k: to_numpy(v) if hasattr(v, "items") else np.array(v)
                             for k, v in tree.items()}
    params = to_numpy(masks_lib.apply_mask(params, mask))
    stats = to_numpy(batch_stats)
    alive = {name: np.array(m) for name, m in masks_lib.mask_leaves(mask).items()}
    bn = "bn_1" if isinstance(model, ResNet) else "bn_2"  # the norm between conv_1 and conv_2
    inner_widths = []
    for stage in _blocks(model):
        inner_widths.append([])
        for block in stage:
            first, second = f"{block}/conv_1/kernel", f"{block}/conv_2/kernel"
            channels = params[block]["conv_1"]["kernel"].shape[-1]
            dead = ~alive[first].reshape(-1, channels).any(axis=0)
            reads = np.transpose(alive[second], (2, 0, 1, 3)).reshape(channels, -1).any(axis=1)
            norm = {**params[block][bn], **stats[block][bn]}
            remove = ~reads | (dead & (_bn_constant(np.zeros(channels), norm) == 0))
            if remove.all():
                remove[np.argmax(~dead)] = False
            keep = ~remove
            params[block]["conv_1"]["kernel"] = params[block]["conv_1"]["kernel"][..., keep]
            params[block]["conv_2"]["kernel"] = params[block]["conv_2"]["kernel"][:, :, keep, :]
            alive[first], alive[second] = alive[first][..., keep], alive[second][:, :, keep, :]
            params[block][bn] = {k: v[keep] for k, v in params[block][bn].items()}
            stats[block][bn] = {k: v[keep] for k, v in stats[block][bn].items()}
            inner_widths[-1].append(int(keep.sum()))
    kwargs = {field: getattr(model, field) for field in
              (("stage_sizes",) if isinstance(model, ResNet) else ("depth", "widen_factor"))}
    kwargs.update(num_classes=model.num_classes, conv_impl=model.conv_impl,
                  width_multiplier=model.width_multiplier,
                  inner_widths=tuple(map(tuple, inner_widths)))
    new_mask = masks_lib.from_named_leaves(mask, {
        leaf: None if m is None else alive[leaf]
        for leaf, m in masks_lib.named_leaves(mask).items()})
    return Compacted(type(model)(**kwargs), params, new_mask, kwargs, stats)
