"""Which PyTorch module each of our layers is: one table per architecture.

ResNet-18 (`resnet-18`) and VGG-16 (`vgg-16-hydra`) follow the Adversarial Pruning Benchmark's
definitions (its `models/base_resnet18.py` and `models/base_vgg16.py`, the CIFAR ResNet of
kuangliu/pytorch-cifar and HYDRA's `vgg16_bn`), so that an export loads strictly into them:

  resnet-18      conv1, bn1, layer{s}.{b}.conv1 / bn1 / conv2 / bn2 / shortcut.0 / shortcut.1,
                 linear
  vgg-16-hydra   features.{i} (conv, BN, ReLU per conv; MaxPool2d per "M"), classifier.{0,2,4}

The Wide ResNets follow the implementation HYDRA and RobustBench use (xternalz/WideResNet-pytorch):
conv1, block{g}.layer.{b}.bn1 / conv1 / bn2 / conv2 / convShortcut, bn1, fc.

Our other architectures use nn.Sequential-style names in the same spirit: a `features`
Sequential of the conv part, in which every module takes an index (Conv2d, BatchNorm2d, ReLU and
MaxPool2d alike), and a `classifier` Sequential of Linear and ReLU modules (a Flatten or an
average pool between them is done in `forward`, so it takes no index):

  dense-300-100, lenet-300-100   classifier.{0,2,4}                        (Linear, ReLU, ...)
  lenet-5                        features.{0,3} (conv, ReLU, pool), classifier.{0,2,4}
  conv-2 / conv-4 / conv-6       features.{i} (conv, ReLU per conv; pool per stage),
                                 classifier.{0,2,4}
  vgg-16                         features.{i} as vgg-16-hydra's (five pools), classifier.0

`sparse_robust.interop.torch_models` defines each of these in PyTorch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from sparse_robust.models import ConvNet, HydraVGG, LeNet5, MLP, ResNet, VGG, WideResNet

KINDS = ("dense", "conv", "bn")


@dataclasses.dataclass(frozen=True)
class Layer:
    """One of our layers and the PyTorch module it is.

    `flattened_channels` > 0 marks a dense layer fed by the NHWC flatten of a feature map with
    that many channels: PyTorch flattens NCHW, so its input rows are permuted.
    """

    path: str  # our module path, e.g. "block_1_1/conv_1"
    torch: str  # the PyTorch module's name, e.g. "layer1.0.conv1"
    kind: str  # "dense", "conv" or "bn"
    flattened_channels: int = 0


def _sequential(prefix: str, modules: list[Optional[tuple[str, str]]],
                flattened: Mapping[str, int] = None) -> list[Layer]:
    """Layers of an nn.Sequential: `modules` lists (our path, kind) per index, None for a module
    without parameters (ReLU, MaxPool2d)."""
    flattened = flattened or {}
    return [Layer(entry[0], f"{prefix}.{index}", entry[1], flattened.get(entry[0], 0))
            for index, entry in enumerate(modules) if entry is not None]


def _classifier(dense_paths: list[str], flattened: Mapping[str, int] = None) -> list[Layer]:
    """Linear, ReLU, Linear, ReLU, ..., Linear."""
    modules = []
    for i, path in enumerate(dense_paths):
        modules += [(path, "dense")] + ([None] if i < len(dense_paths) - 1 else [])
    return _sequential("classifier", modules, flattened)


def _dense_paths(params: Mapping[str, Any]) -> list[str]:
    count = sum(1 for name in params if name.startswith("dense_"))
    return [f"dense_{i}" for i in range(count)] + ["output"]


def _out_channels(params: Mapping[str, Any], path: str) -> int:
    return int(params[path]["kernel"].shape[-1])


def _vgg_features(layers) -> tuple[list[Layer], str]:
    """(features layers, path of the last conv) of a VGG layer list."""
    modules, conv = [], 0
    for layer in layers:
        if layer == "M":
            modules.append(None)
        else:
            modules += [(f"conv_{conv}", "conv"), (f"bn_{conv}", "bn"), None]
            conv += 1
    return _sequential("features", modules), f"conv_{conv - 1}"


def _blocks(params) -> list[tuple[str, int, int]]:
    """(name, stage, block) of every `block_{stage}_{block}`, in numeric order."""
    found = [(name, *(int(part) for part in name.split("_")[1:]))
             for name in params if name.startswith("block_")]
    return sorted(found, key=lambda entry: entry[1:])


def _resnet(params) -> list[Layer]:
    table = [Layer("stem_conv", "conv1", "conv"), Layer("stem_bn", "bn1", "bn")]
    for name, stage, block in _blocks(params):
        prefix = f"layer{stage}.{block - 1}"
        parts = [("conv_1", "conv1", "conv"), ("bn_1", "bn1", "bn"), ("conv_2", "conv2", "conv"),
                 ("bn_2", "bn2", "bn"), ("shortcut_conv", "shortcut.0", "conv"),
                 ("shortcut_bn", "shortcut.1", "bn")]
        table += [Layer(f"{name}/{ours}", f"{prefix}.{theirs}", kind)
                  for ours, theirs, kind in parts if ours in params[name]]
    return table + [Layer("output", "linear", "dense")]


def _wide_resnet(params) -> list[Layer]:
    table = [Layer("stem_conv", "conv1", "conv")]
    for name, group, block in _blocks(params):
        prefix = f"block{group}.layer.{block - 1}"
        parts = [("bn_1", "bn1", "bn"), ("conv_1", "conv1", "conv"), ("bn_2", "bn2", "bn"),
                 ("conv_2", "conv2", "conv"), ("shortcut_conv", "convShortcut", "conv")]
        table += [Layer(f"{name}/{ours}", f"{prefix}.{theirs}", kind)
                  for ours, theirs, kind in parts if ours in params[name]]
    return table + [Layer("final_bn", "bn1", "bn"), Layer("output", "fc", "dense")]


def layer_table(model, params: Mapping[str, Any]) -> list[Layer]:
    """The PyTorch module of every layer of `model` (whose params, or their shapes, are `params`),
    in the order of PyTorch's `state_dict()`."""
    if isinstance(model, MLP):
        return _classifier(_dense_paths(params))
    if isinstance(model, ConvNet):
        modules = []
        conv = 0
        for stage in model.conv_stages:
            for _ in stage:
                modules += [(f"conv_{conv}", "conv"), None]
                conv += 1
            modules.append(None)
        first_dense = "dense_0" if model.dense_sizes else "output"
        flat = {first_dense: _out_channels(params, f"conv_{conv - 1}")}
        return _sequential("features", modules) + _classifier(_dense_paths(params), flat)
    if isinstance(model, LeNet5):
        features = _sequential("features", [("conv_0", "conv"), None, None, ("conv_1", "conv")])
        flat = {"dense_0": _out_channels(params, "conv_1")}
        return features + _classifier(_dense_paths(params), flat)
    if isinstance(model, HydraVGG):
        features, last_conv = _vgg_features(model.layers)
        first_dense = "dense_0" if model.dense_sizes else "output"
        flat = {first_dense: _out_channels(params, last_conv)}
        return features + _classifier(_dense_paths(params), flat)
    if isinstance(model, VGG):
        features, _ = _vgg_features(model.layers)
        return features + _classifier(["output"])  # after a global average pool: no permutation
    if isinstance(model, ResNet):
        return _resnet(params)
    if isinstance(model, WideResNet):
        return _wide_resnet(params)
    raise ValueError(f"No PyTorch naming for a {type(model).__name__}; exportable models are "
                     "MLP, ConvNet, LeNet5, VGG, HydraVGG, ResNet and WideResNet.")
