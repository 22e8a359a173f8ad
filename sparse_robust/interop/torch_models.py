"""PyTorch definitions of every architecture `sparse_robust.interop` exports (needs torch: the
`interop` extra). An export loads into them with `load_state_dict(..., strict=True)`.

`ResNet18` and `HydraVGG16` are the Adversarial Pruning Benchmark's ResNet-18 and VGG-16 (its
`models/base_resnet18.py`, `models/base_vgg16.py`), `WideResNet` the one HYDRA and RobustBench
use; `Sequential` builds our other architectures with the names of `sparse_robust.interop.naming`.
`for_model(model, input_shape)` gives the PyTorch twin of one of our models. Inputs are NCHW.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from sparse_robust import models as ours
from sparse_robust.interop.convert import MASK_SUFFIX


class Sequential(nn.Module):
    """`features` (optional), then a flatten or a global average pool, then `classifier`."""

    def __init__(self, features: Optional[nn.Sequential], classifier: nn.Sequential,
                 global_pool: bool = False):
        super().__init__()
        if features is not None:
            self.features = features
        self.classifier = classifier
        self.global_pool = global_pool

    def forward(self, x):
        if hasattr(self, "features"):
            x = self.features(x)
        if self.global_pool:
            x = x.mean(dim=(2, 3))
        return self.classifier(torch.flatten(x, 1))


def _classifier(sizes: Sequence[int], bias: bool = True) -> nn.Sequential:
    """Linear, ReLU, ..., Linear through `sizes` (inputs first)."""
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out, bias=bias))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _flat_size(features: nn.Sequential, input_shape: Sequence[int]) -> int:
    """Inputs the classifier gets from `features` on one NHWC-shaped (H, W, C) input."""
    h, w, c = input_shape
    with torch.no_grad():
        return int(features(torch.zeros(1, c, h, w)).numel())


def vgg_features(layers: Sequence[Union[int, str]], in_channels: int,
                 ceil_mode: bool) -> nn.Sequential:
    """Conv 3x3 (no bias), BatchNorm2d, ReLU per width; MaxPool2d(2) per "M"."""
    modules = []
    for layer in layers:
        if layer == "M":
            modules.append(nn.MaxPool2d(2, 2, ceil_mode=ceil_mode))
            continue
        modules += [nn.Conv2d(in_channels, layer, 3, padding=1, bias=False),
                    nn.BatchNorm2d(layer), nn.ReLU()]
        in_channels = layer
    return nn.Sequential(*modules)


class HydraVGG16(nn.Module):
    """HYDRA's `vgg16_bn`: features, AdaptiveAvgPool2d((2, 2)), classifier 2048-256-256-classes."""

    def __init__(self, layers: Sequence[Union[int, str]], dense_sizes: Sequence[int] = (256, 256),
                 num_classes: int = 10, in_channels: int = 3, pooled_size: int = 2):
        super().__init__()
        self.features = vgg_features(layers, in_channels, ceil_mode=False)
        self.avgpool = nn.AdaptiveAvgPool2d((pooled_size, pooled_size))
        last = [layer for layer in layers if layer != "M"][-1]
        self.classifier = _classifier([last * pooled_size**2, *dense_sizes, num_classes])

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class BasicBlock(nn.Module):
    """The CIFAR ResNet block of kuangliu/pytorch-cifar, as the benchmark has it."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """The benchmark's CIFAR ResNet: 3x3 stem, layer1..layer4, 4x4 average pool, `linear`."""

    def __init__(self, num_blocks: Sequence[int] = (2, 2, 2, 2), widths=(64, 128, 256, 512),
                 num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        for stage, (blocks, width) in enumerate(zip(num_blocks, widths)):
            strides = [1 if stage == 0 else 2] + [1] * (blocks - 1)
            layer = []
            for stride in strides:
                layer.append(BasicBlock(in_planes, width, stride))
                in_planes = width
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layer))
        self.num_stages = len(num_blocks)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        for stage in range(self.num_stages):
            out = getattr(self, f"layer{stage + 1}")(out)
        out = F.avg_pool2d(out, 4)  # the benchmark's: the global mean on 32x32 inputs
        return self.linear(out.view(out.size(0), -1))


class WideBasicBlock(nn.Module):
    """The pre-activation block of xternalz/WideResNet-pytorch (HYDRA, RobustBench)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes and stride == 1
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x):
        activated = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(activated))))
        return out + (x if self.equal_in_out else self.convShortcut(activated))


class WideNetworkBlock(nn.Module):
    def __init__(self, blocks: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[
            WideBasicBlock(out_planes if i else in_planes, out_planes, 1 if i else stride)
            for i in range(blocks)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """conv1, block1..block3, bn1, ReLU, global average pool, `fc`."""

    def __init__(self, depth: int = 28, widths=(16, 160, 320, 640), num_classes: int = 10,
                 in_channels: int = 3):
        super().__init__()
        blocks = (depth - 4) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        for group in range(3):
            stride = 1 if group == 0 else 2
            block = WideNetworkBlock(blocks, widths[group], widths[group + 1], stride)
            setattr(self, f"block{group + 1}", block)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        return self.fc(out.mean(dim=(2, 3)))


def for_model(model, input_shape: Sequence[int]) -> nn.Module:
    """The PyTorch twin of our `model` for inputs of NHWC shape `input_shape` = (H, W, C) (or
    (D,) for an MLP), with the names `sparse_robust.interop` exports."""
    scaled = model.scaled
    classes = model.num_classes
    channels = input_shape[-1]
    if isinstance(model, ours.MLP):
        sizes = [int(np.prod(input_shape)), *map(scaled, model.hidden_sizes), classes]
        return Sequential(None, _classifier(sizes, bias=model.use_bias))
    if isinstance(model, ours.ConvNet):
        modules, in_channels = [], channels
        for stage in model.conv_stages:
            for width in stage:
                modules += [nn.Conv2d(in_channels, scaled(width), 3, padding=1), nn.ReLU()]
                in_channels = scaled(width)
            modules.append(nn.MaxPool2d(2))
        features = nn.Sequential(*modules)
        sizes = [_flat_size(features, input_shape), *map(scaled, model.dense_sizes), classes]
        return Sequential(features, _classifier(sizes))
    if isinstance(model, ours.LeNet5):
        first, second = map(scaled, model.conv_widths)
        features = nn.Sequential(
            nn.Conv2d(channels, first, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(first, second, 5), nn.ReLU(), nn.MaxPool2d(2))
        sizes = [_flat_size(features, input_shape), *map(scaled, model.dense_sizes), classes]
        return Sequential(features, _classifier(sizes))
    layers = [layer if layer == "M" else scaled(layer) for layer in getattr(model, "layers", ())]
    if isinstance(model, ours.HydraVGG):
        return HydraVGG16(layers, [scaled(w) for w in model.dense_sizes], classes, channels,
                          model.pooled_size)
    if isinstance(model, ours.VGG):  # ours: 'SAME' pools round up, global average pool
        last = [layer for layer in layers if layer != "M"][-1]
        return Sequential(vgg_features(layers, channels, ceil_mode=True),
                          _classifier([last, classes]), global_pool=True)
    if isinstance(model, ours.ResNet):
        widths = [scaled(64 * 2**stage) for stage in range(len(model.stage_sizes))]
        return ResNet18(model.stage_sizes, widths, classes, channels)
    if isinstance(model, ours.WideResNet):
        widths = [scaled(16)] + [scaled(16 * 2**g * model.widen_factor) for g in range(3)]
        return WideResNet(model.depth, widths, classes, channels)
    raise ValueError(f"No PyTorch definition for a {type(model).__name__}.")


def to_torch_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(np.array(value)) for key, value in state_dict.items()}


def load_pruned(module: nn.Module, state_dict: Mapping[str, np.ndarray]) -> nn.Module:
    """Loads an export written with masks the `torch.nn.utils.prune` way: each `X.weight_mask`
    becomes X's pruning mask (`prune.custom_from_mask`), `X.weight` its `weight_orig`. Strict."""
    tensors = to_torch_state_dict(state_dict)
    renamed = {}
    for key, value in tensors.items():
        if key.endswith(MASK_SUFFIX):
            owner, _, parameter = key[:-len(MASK_SUFFIX)].rpartition(".")
            prune.custom_from_mask(module.get_submodule(owner), parameter, value)
            renamed[key[:-len(MASK_SUFFIX)] + "_orig"] = tensors[key[:-len(MASK_SUFFIX)]]
    for key, value in tensors.items():
        if key not in renamed and key + MASK_SUFFIX not in tensors:
            renamed[key] = value
    module.load_state_dict(renamed, strict=True)
    for submodule in module.modules():  # weight = weight_orig * mask, from the loaded values
        for hook in submodule._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                hook(submodule, None)
    return module
