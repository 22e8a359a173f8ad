"""Classifier models and a name -> model registry.

Every model is a `flax.linen.Module` called as `model.apply(variables, x, train=False)` on NHWC
images in [0, 1] (MLPs also take flat (N, D) inputs) and returns logits. Its final layer is an
`nn.Dense` named `output`. Models with batch norm keep running statistics in `batch_stats`.
Every model takes `conv_impl` ("auto", "xla", "patches", "winograd", "winograd_cpu",
"direct_cpu"): how its convolutions run (see `sparse_robust.models.conv`; `conv_impls` reports
the choice per layer).
"""

import dataclasses
from typing import Any, Mapping, NamedTuple

import flax.linen as nn

from sparse_robust.models.base import Classifier, conv_impls
from sparse_robust.models.conv import CONV_IMPLS, Conv, resolve_conv_impl
from sparse_robust.models.convnets import ConvNet, LeNet5
from sparse_robust.models.mlp import MLP
from sparse_robust.models.resnet import ResNet
from sparse_robust.models.vgg import HYDRA_VGG16_LAYERS, HydraVGG, VGG, VGG16_LAYERS
from sparse_robust.models.wide_resnet import WideResNet


class _Entry(NamedTuple):
    module: type[Classifier]
    fixed: Mapping[str, Any]  # Fields set by the model's name, which callers may not override.


_REGISTRY = {
    "dense-300-100": _Entry(MLP, {"hidden_sizes": (300, 100), "use_bias": False}),
    "lenet-300-100": _Entry(MLP, {"hidden_sizes": (300, 100), "use_bias": True}),
    "conv-2": _Entry(ConvNet, {"conv_stages": ((64, 64),), "dense_sizes": (256, 256)}),
    "conv-4": _Entry(ConvNet, {"conv_stages": ((64, 64), (128, 128)), "dense_sizes": (256, 256)}),
    "conv-6": _Entry(
        ConvNet, {"conv_stages": ((64, 64), (128, 128), (256, 256)), "dense_sizes": (256, 256)}
    ),
    "lenet-5": _Entry(LeNet5, {"conv_widths": (6, 16), "dense_sizes": (120, 84)}),
    "vgg-16": _Entry(VGG, {"layers": VGG16_LAYERS}),
    # The Adversarial Pruning Benchmark's VGG-16 (HYDRA's vgg16_bn), for its checkpoints.
    "vgg-16-hydra": _Entry(HydraVGG, {"layers": HYDRA_VGG16_LAYERS, "dense_sizes": (256, 256)}),
    "resnet-18": _Entry(ResNet, {"stage_sizes": (2, 2, 2, 2)}),
    "wide-resnet-28": _Entry(WideResNet, {"depth": 28}),
    "wrn-28-4": _Entry(WideResNet, {"depth": 28, "widen_factor": 4}),
    "wrn-28-10": _Entry(WideResNet, {"depth": 28, "widen_factor": 10}),
}


def available_models() -> list[str]:
    """Names accepted by `get_model`, sorted."""
    return sorted(_REGISTRY)


def get_model(name: str, *, num_classes: int = 10, **kwargs) -> nn.Module:
    """Builds the model registered as `name`.

    `kwargs` may set the model's remaining fields, e.g. `width_multiplier` for any model or
    `widen_factor` for "wide-resnet-28"; fields fixed by the name (such as the layer widths) may not.
    """
    if name not in _REGISTRY:
        raise ValueError(f"Unknown model name {name!r}; known models: {available_models()}.")
    entry = _REGISTRY[name]
    settable = [
        field.name
        for field in dataclasses.fields(entry.module)
        if field.init and field.name not in ("parent", "name") and field.name not in entry.fixed
    ]
    for key in kwargs:
        if key in entry.fixed:
            raise ValueError(
                f"Argument {key!r} of model {name!r} is fixed to {entry.fixed[key]!r} by its name; "
                f"accepted arguments: {settable}."
            )
        if key not in settable:
            raise ValueError(
                f"Unknown argument {key!r} for model {name!r}; accepted arguments: {settable}."
            )
    return entry.module(num_classes=num_classes, **entry.fixed, **kwargs)


__all__ = [
    "CONV_IMPLS",
    "Classifier",
    "Conv",
    "ConvNet",
    "HydraVGG",
    "LeNet5",
    "MLP",
    "ResNet",
    "VGG",
    "WideResNet",
    "available_models",
    "conv_impls",
    "get_model",
    "resolve_conv_impl",
]
