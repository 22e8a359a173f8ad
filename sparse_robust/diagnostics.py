"""Sparsity–robustness diagnostics: layer norms, Lipschitz bounds, margins, weight histograms.

Wang et al. (2020) relate weight sparsity to robustness through Lipschitz-type quantities. This
module computes them for one trained (and possibly pruned) network; every summary is plain Python
(floats, lists, dicts with string keys) so it can go straight into `summary.json`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparse_robust import masks
from sparse_robust.attacks import NORMS, margin_parts
from sparse_robust.models.base import linear_layer_calls
from sparse_robust.checks import check_choice, check_positive_int

# Dual norm of the gradient that bounds a first-order change of the margin under each attack norm.
_DUAL_ORD = {"linf": 1, "l2": 2}
_UNUSED_INIT = nn.initializers.zeros


def _capture_linear_layers(model: nn.Module, variables, input_shape) -> dict[str, tuple]:
    """(module, kernel, input shape) of every Dense/Conv layer, at its first call."""
    layers = {}
    for name, module, shape in linear_layer_calls(model, jnp.zeros((1,) + tuple(input_shape))):
        if name not in layers:
            kernel = variables["params"]
            for part in name.split("/"):
                kernel = kernel[part]
            layers[name] = (module, kernel["kernel"], shape)
    return layers


def _power_iteration(linear_module: nn.Module, kernel: jax.Array, start: jax.Array,
                     num_iters: jax.Array) -> jax.Array:
    """Largest singular value of x -> linear_module(x) with this kernel, started at `start`."""
    def linear_fn(x):
        return linear_module.apply({"params": {"kernel": kernel}}, x)

    transpose_fn = jax.linear_transpose(linear_fn, start)

    def normalize(v):
        # The floor keeps an all-zero (fully pruned) operator at v = 0 instead of NaN.
        return v / jnp.maximum(jnp.linalg.norm(v), jnp.finfo(v.dtype).tiny)

    def step(_, v):
        (ata_v,) = transpose_fn(linear_fn(v))
        return normalize(ata_v)

    v = jax.lax.fori_loop(0, num_iters, step, normalize(start))
    return jnp.linalg.norm(linear_fn(v))


def _jit_with_static_module(fn: Callable, module: nn.Module, static_argnames=()) -> Callable:
    """`fn(module, ...)` jitted with the module static, bound to `module`.

    Modules compare by value, so equal modules (e.g. the same model at every pruning level) share
    one compiled program; an unhashable module (a list- or dict-valued field) gets its own.
    """
    try:
        hash(module)
    except TypeError:
        return jax.jit(functools.partial(fn, module), static_argnames=static_argnames)
    return functools.partial(
        jax.jit(fn, static_argnums=0, static_argnames=static_argnames), module)


def spectral_norms(model: nn.Module, variables, input_shape, key: jax.Array,
                   num_iters: int = 100) -> dict[str, float]:
    """Operator (spectral) norm of every nn.Dense / nn.Conv layer's linear map, bias excluded.

    Each layer's input shape is found by running `model` once on `zeros((1,) + input_shape)`; a
    conv is measured as a linear operator on that shape (with its own strides, padding, dilation,
    feature groups), so the norm is exact for the network's actual feature maps. Power iteration,
    `num_iters` steps from a random start drawn with `key`; estimates approach the norm from below.

    Returns: {'/'-joined module path: norm}.
    """
    check_positive_int("num_iters", num_iters)
    layers = _capture_linear_layers(model, variables, input_shape)
    keys = jax.random.split(key, len(layers))
    norms = {}
    for layer_key, (name, (module, kernel, layer_input_shape)) in zip(keys, layers.items()):
        # Initializers do not affect apply; fixing them lets equal layers share a compile.
        linear_module = module.clone(parent=None, name=None, use_bias=False,
                                     kernel_init=_UNUSED_INIT, bias_init=_UNUSED_INIT)
        start = jax.random.normal(layer_key, layer_input_shape, jnp.float32)
        power_iteration = _jit_with_static_module(_power_iteration, linear_module)
        norms[name] = float(power_iteration(kernel, start, num_iters))
    return norms


def lipschitz_upper_bound(norms: Mapping[str, float]) -> float:
    """Product of per-layer operator norms: a global L2 Lipschitz bound of the network.

    Valid for a feed-forward composition of these linear layers with 1-Lipschitz activations and
    pooling (ReLU, max-pool). Batch norm (an extra per-channel scaling) and residual connections
    (a sum of paths, not a composition) are NOT covered by this simple product.
    """
    if not norms:
        raise ValueError("norms is empty; expected a mapping from layer name to operator norm.")
    negative = {name: value for name, value in norms.items() if value < 0}
    if negative:
        raise ValueError(f"norms must be non-negative; got {negative}.")
    return float(math.prod(norms.values()))


def logit_margin(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example margin [B]: true-class logit minus the largest other logit (< 0 if wrong)."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"logits must be [B, C] and labels [B]; got logits.shape={logits.shape}, "
            f"labels.shape={labels.shape}."
        )
    true_logit, other_max = margin_parts(logits, labels)
    return true_logit - other_max


def local_lipschitz(logits_fn: Callable[[jax.Array], jax.Array], x: jax.Array, labels: jax.Array,
                    norm: str = "linf") -> jax.Array:
    """Per-example norm [B] of the input gradient of the logit margin.

    The gradient is measured in the dual of the attack norm (L1 for L∞ attacks, L2 for L2), so a
    perturbation of size eps changes the margin by about eps times this value. Each example is
    differentiated on its own, so batch coupling in `logits_fn` cannot leak between examples.
    """
    check_choice("norm", norm, NORMS)
    if labels.shape != x.shape[:1]:
        raise ValueError(f"labels.shape={labels.shape} must be ({x.shape[0]},) to match x.")

    def margin_of_one(xi, yi):
        return logit_margin(logits_fn(xi[None]), yi[None])[0]

    grads = jax.vmap(jax.grad(margin_of_one))(x, labels)
    return jnp.linalg.norm(grads.reshape(grads.shape[0], -1), ord=_DUAL_ORD[norm], axis=1)


def weight_histograms(params, mask=None, bins: int = 50) -> dict[str, dict[str, Any]]:
    """Histogram of the surviving weights of each prunable kernel, and its remaining fraction.

    Prunable leaves are the non-None leaves of `mask` (every dense/conv kernel when `mask` is
    None). Layer names are '/'-joined module paths. Returns {layer: {"counts": [int],
    "edges": [float], "remaining_fraction": float}}; edges span the surviving weights' range.
    """
    check_positive_int("bins", bins)
    if mask is None:
        mask = masks.create_mask(params)
    else:
        masks.check_mask(params, mask)
    weights = {
        masks.path_name(path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    histograms = {}
    for name, keep in masks.mask_leaves(mask).items():
        keep = np.asarray(keep)
        counts, edges = np.histogram(np.asarray(weights[name], np.float64)[keep], bins=bins)
        histograms[masks.layer_name(name)] = {
            "counts": counts.tolist(),
            "edges": edges.tolist(),
            "remaining_fraction": float(keep.mean()),
        }
    return histograms


def _mean_margin(model: nn.Module, variables, images, labels):
    return jnp.mean(logit_margin(model.apply(variables, images, train=False), labels))


def _mean_local_lipschitz(model: nn.Module, variables, images, labels, norm):
    def logits_fn(x):
        return model.apply(variables, x, train=False)

    return jnp.mean(local_lipschitz(logits_fn, images, labels, norm))


def compute_diagnostics(model: nn.Module, variables, mask, images: jax.Array, labels: jax.Array,
                        key: jax.Array, adversarial_images: jax.Array | None = None,
                        norm: str = "linf", num_iters: int = 100) -> dict[str, Any]:
    """All diagnostics for one (masked) network on an evaluation sample, JSON-serializable.

    The mask is applied to the params first. `images` [B, ...] with int `labels` [B] is a modest
    sample (e.g. 1,000 test images): input gradients are taken for all of it at once.
    Returns {"spectral_norms", "lipschitz_upper_bound", "local_lipschitz_mean", "margin_clean_mean",
    "margin_adversarial_mean" (None without adversarial_images), "weight_histograms"}.
    """
    check_choice("norm", norm, NORMS)
    check_positive_int("num_iters", num_iters)
    if images.ndim < 2 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"images must be [B, ...] and labels [B]; got images.shape={images.shape}, "
            f"labels.shape={labels.shape}."
        )
    if adversarial_images is not None and adversarial_images.shape != images.shape:
        raise ValueError(f"adversarial_images.shape={adversarial_images.shape} must equal "
                         f"images.shape={images.shape}.")

    masked_params = masks.apply_mask(variables["params"], mask)
    masked_variables = {**variables, "params": masked_params}
    norms = spectral_norms(model, masked_variables, images.shape[1:], key, num_iters)
    mean_margin = _jit_with_static_module(_mean_margin, model)
    mean_local_lipschitz = _jit_with_static_module(_mean_local_lipschitz, model, ("norm",))
    adversarial_margin = None
    if adversarial_images is not None:
        adversarial_margin = float(mean_margin(masked_variables, adversarial_images, labels))
    return {
        "spectral_norms": norms,
        "lipschitz_upper_bound": lipschitz_upper_bound(norms),
        "local_lipschitz_mean": float(
            mean_local_lipschitz(masked_variables, images, labels, norm=norm)),
        "margin_clean_mean": float(mean_margin(masked_variables, images, labels)),
        "margin_adversarial_mean": adversarial_margin,
        "weight_histograms": weight_histograms(masked_params, mask),
    }
