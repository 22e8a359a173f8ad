"""The parts the attacks are built from: settings checks, objectives, norm-ball geometry and
keeping the worst result per example.

The modules of `sparse_robust.attacks` share them, so every
attack validates, projects and keeps its worst point the same way.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparse_robust.checks import check_choice, check_int, check_labels
from sparse_robust.convention import LogitsFn, check_logits_fn
from sparse_robust.losses import cross_entropy, dlr_loss, kl_divergence, margin_parts

NORMS = ("linf", "l2")
PGD_LOSSES = ("ce", "margin", "kl")
APGD_LOSSES = ("ce", "dlr")
LABEL_SOURCES = ("true", "predicted")

TINY = 1e-12  # Guards divisions by a zero norm (zero gradient, zero perturbation).


# --------------------------------------------------------------------------------------------
# Validation (eager, before tracing)


def _check_bool(field: str, value) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{field}={value!r} is invalid; allowed values: True or False.")


def _check_nonnegative(field: str, value) -> None:
    """Checks a strength (eps, step_size) unless it is traced, where only its shape is checked."""
    if isinstance(value, jax.core.Tracer):
        if value.shape != ():
            raise ValueError(f"{field} must be a scalar, got shape {value.shape}.")
        return
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        array = None
    if array is None or array.shape != () or not np.isfinite(array) or array < 0:
        raise ValueError(f"{field}={value!r} is invalid; allowed values: finite scalars >= 0.")


def _check_real(field: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{field}={value!r} is invalid; allowed values: finite real numbers.")


def _check_interval(field: str, value, low: float, high: float, low_open: bool) -> None:
    """A finite real in (low, high] (low_open) or [low, high]."""
    _check_real(field, value)
    if not (low < value <= high if low_open else low <= value <= high):
        raise ValueError(f"{field}={value!r} is invalid; allowed values: "
                         f"{low} {'<' if low_open else '<='} {field} <= {high}.")


def _check_image_shape(value) -> None:
    if value is None:
        return
    if not (isinstance(value, tuple) and len(value) == 3 and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in value)):
        raise ValueError(f"image_shape={value!r} is invalid; allowed values: None or a tuple "
                         "(height, width, channels) of integers >= 1.")


# Fields checked the same way by every attack that has them.
_INT_FIELDS = ("num_steps", "restarts", "n_target_classes", "num_queries")
_BOOL_FIELDS = ("random_start", "targeted", "rescale_schedule")
_INTERVALS = {  # field: (low, high, low_open)
    "rho": (0.0, 1.0, True), "p_init": (0.0, 1.0, True), "alpha_max": (0.0, 1.0, False),
    "beta": (0.0, 1.0, True), "eta": (1.0, math.inf, False),
    "alpha_init": (0.0, math.inf, True), "alpha_final": (0.0, math.inf, True),
    "gamma_init": (0.0, 1.0, True), "gamma_final": (0.0, 1.0, True)}


def check_settings(attack: str, settings: Mapping[str, Any]) -> None:
    """Validates the settings of `attack` (one code path for the functions and `make_attack`)."""
    losses = APGD_LOSSES if attack == "apgd" else PGD_LOSSES
    for field, value in settings.items():
        if field == "eps":
            _check_nonnegative(field, value)
        elif field == "step_size":
            if not (attack == "fgsm" and value is None):
                _check_nonnegative(field, value)
        elif field in _INT_FIELDS:
            check_int(field, value, 1)
        elif field == "norm":
            check_choice(field, value, NORMS)
        elif field == "loss":
            check_choice(field, value, losses)
        elif field == "label_source":
            check_choice(field, value, LABEL_SOURCES)
        elif field in _BOOL_FIELDS:
            _check_bool(field, value)
        elif field in ("clip_min", "clip_max"):
            _check_real(field, value)
        elif field in _INTERVALS:
            _check_interval(field, value, *_INTERVALS[field])
        elif field == "image_shape":
            _check_image_shape(value)
    if not settings["clip_min"] < settings["clip_max"]:
        raise ValueError(
            f"clip_min={settings['clip_min']!r}, clip_max={settings['clip_max']!r} are invalid; "
            "allowed values: clip_min < clip_max.")
    if settings.get("targeted") and settings.get("loss") == "kl":
        raise ValueError("targeted=True is invalid with loss='kl' (KL ignores labels); "
                         f"allowed losses for targeted attacks: {[l for l in PGD_LOSSES if l != 'kl']}.")
    if settings.get("targeted") and settings.get("label_source") == "predicted":
        raise ValueError("label_source='predicted' is invalid with targeted=True (y is the target); "
                         "allowed values: label_source='true'.")
    if settings.get("restarts", 1) > 1 and not settings.get("random_start", True):
        raise ValueError(f"restarts={settings['restarts']!r} is invalid with random_start=False "
                         "(every restart would be identical); allowed values: restarts=1.")


def check_inputs(x, y, key, needs_key: bool, clip_min: float, clip_max: float) -> None:
    """Checks an attack's call before any compute: x a float batch inside the box [clip_min,
    clip_max] (values checked where x is concrete; a traced x is checked by whoever holds the
    data, e.g. the Evaluator), y integer labels [B] and a key where one is needed. The logits
    function is checked with the class count (`num_classes_at_least`)."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a floating-point batch in [clip_min, clip_max], got dtype {x.dtype}.")
    if x.ndim < 1:
        raise ValueError(f"x must be a batch [B, ...], got x.shape={x.shape}.")
    check_labels(y, x.shape[0], "y")
    if needs_key and key is None:
        raise ValueError("key=None is invalid here: the random start needs a jax.random key.")
    check_box(x, clip_min, clip_max)


def check_box(x, clip_min: float, clip_max: float, name: str = "x") -> None:
    """Raises ValueError when a concrete ``x`` has values outside [clip_min, clip_max]: an attack
    would otherwise project them into the box, far outside the ε-ball. Traced values pass."""
    if isinstance(x, jax.core.Tracer) or x.size == 0:
        return
    values = np.asarray(x)  # numpy: inside a trace (a scan over a constant x) jnp would trace
    low, high = float(values.min()), float(values.max())
    if low < clip_min or high > clip_max:
        raise ValueError(f"{name} lies in [{low:.4g}, {high:.4g}], outside the attack's box "
                         f"[clip_min, clip_max] = [{clip_min:g}, {clip_max:g}]; give the attack "
                         "the box your inputs live in (clip_min=, clip_max=) or rescale them.")


def num_classes_at_least(logits_fn: LogitsFn, x, minimum: int, reason: str) -> int:
    """The model's number of classes (from shapes only); raises unless it is >= minimum, or
    unless ``logits_fn`` follows the convention (`convention.check_logits_fn`)."""
    num_classes = check_logits_fn(logits_fn, x)
    if num_classes < minimum:
        raise ValueError(f"{reason} needs at least {minimum} classes, the model has {num_classes}.")
    return num_classes


def check_target_count(logits_fn: LogitsFn, x, n_target_classes: int, minimum: int,
                       attack: str) -> None:
    """Raises unless the model has >= minimum classes and n_target_classes other classes."""
    num_classes = num_classes_at_least(logits_fn, x, minimum, attack)
    if n_target_classes > num_classes - 1:
        raise ValueError(f"n_target_classes={n_target_classes!r} is invalid for a model with "
                         f"{num_classes} classes; allowed values: 1 to {num_classes - 1}.")


# --------------------------------------------------------------------------------------------
# Objectives (per example; the attack ascends them)


def _per_example_loss(loss: str, logits, y, clean_logits):
    if loss == "ce":
        return cross_entropy(logits, y)
    if loss == "margin":  # Carlini–Wagner: max other logit − true logit.
        true_logit, other_logit = margin_parts(logits, y)
        return other_logit - true_logit
    if loss == "kl":  # TRADES: KL(p_clean ‖ p_adv) with the clean prediction held fixed.
        return kl_divergence(clean_logits, logits)
    return dlr_loss(logits, y)


def make_objective(logits_fn: LogitsFn, x, y, loss: str, targeted: bool):
    """x_adv -> (objective [B], success [B]); the attack maximises the objective.

    Targeted attacks minimise the loss towards the target y, so their objective is −loss.
    Success means misclassified (untargeted) or classified as the target (targeted).
    """
    num_classes_at_least(logits_fn, x, {"margin": 2, "dlr": 3}.get(loss, 1), f"loss={loss!r}")
    clean_logits = lax.stop_gradient(logits_fn(x)) if loss == "kl" else None
    sign = -1.0 if targeted else 1.0

    def objective(x_adv):
        logits = logits_fn(x_adv)
        predicted = jnp.argmax(logits, axis=-1)
        success = (predicted == y) if targeted else (predicted != y)
        return sign * _per_example_loss(loss, logits, y, clean_logits), success

    return objective


def objective_and_grad(objective, x_adv):
    """(objective [B], success [B], d objective / d x_adv); examples are independent."""
    def total(z):
        values, success = objective(z)
        return jnp.sum(values), (values, success)

    (_, (values, success)), grad = jax.value_and_grad(total, has_aux=True)(x_adv)
    return values, success, grad


def ranked_targets(logits_fn: LogitsFn, x, n_target_classes: int):
    """[B, n_target_classes] target classes per example: the classes ranked 2nd, 3rd, … by the
    clean logits (the targets of AutoAttack's APGD-T and FAB-T), under stop-gradient."""
    order = jnp.argsort(lax.stop_gradient(logits_fn(x)), axis=-1)
    return order[:, ::-1][:, 1:n_target_classes + 1]


# --------------------------------------------------------------------------------------------
# Geometry: norms, steps, projection, random starts


def expand(per_example, x):
    """[B] -> [B, 1, ..., 1], broadcastable against x."""
    return per_example.reshape(per_example.shape + (1,) * (x.ndim - 1))


def l2_norm(v):
    """Per-example L2 norm of a batch [B, ...], shaped [B, 1, ..., 1] to broadcast against it."""
    return jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(range(1, v.ndim)), keepdims=True))


def norm_of(v, norm: str):
    """Per-example L∞ or L2 norm [B] of a batch [B, ...]."""
    flat = v.reshape(v.shape[0], -1)
    if norm == "linf":
        return jnp.max(jnp.abs(flat), axis=-1)
    return jnp.sqrt(jnp.sum(jnp.square(flat), axis=-1))


def ascent_direction(grad, norm: str):
    """Steepest-ascent unit step: sign for L∞, the normalised gradient for L2."""
    if norm == "linf":
        return jnp.sign(grad)
    return grad / jnp.maximum(l2_norm(grad), TINY)


def project(x_adv, x, eps, norm: str, clip_min: float, clip_max: float):
    """Projects onto the ε-ball around x, then onto the box.

    With x inside the box, clipping only moves coordinates towards x, so it never leaves the ball.
    """
    delta = x_adv - x
    if norm == "linf":
        delta = jnp.clip(delta, -eps, eps)
    else:
        delta = delta * jnp.minimum(1.0, eps / jnp.maximum(l2_norm(delta), TINY))
    return jnp.clip(x + delta, clip_min, clip_max)


def random_start(key, x, eps, norm: str, clip_min: float, clip_max: float):
    """A uniform draw from the ε-ball around x (clipped to the box).

    L∞: ``eps * uniform(key, x.shape, -1, 1)``. L2: with ``k_dir, k_radius = split(key)``, the
    direction is a normalised ``normal(k_dir, x.shape)`` and the radius ``eps * u ** (1 / d)`` with
    ``u = uniform(k_radius, [B])`` and d the number of features per example.
    """
    if norm == "linf":
        noise = eps * jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
    else:
        k_dir, k_radius = jax.random.split(key)
        direction = jax.random.normal(k_dir, x.shape, x.dtype)
        direction = direction / jnp.maximum(l2_norm(direction), TINY)
        dim = math.prod(x.shape[1:])
        radius = eps * jax.random.uniform(k_radius, x.shape[:1], x.dtype) ** (1.0 / dim)
        noise = expand(radius, x) * direction
    return jnp.clip(x + noise, clip_min, clip_max)


def boundary_start(key, x, eps, norm: str, clip_min: float, clip_max: float):
    """A random point on the ε-sphere around x (clipped to the box), as the APGD reference starts.

    L∞: ``x + eps * t / max|t|`` with ``t = uniform(key, x.shape, -1, 1)``; L2:
    ``x + eps * t / ‖t‖₂`` with ``t = normal(key, x.shape)`` (each divided by norm + 1e-12).
    """
    if norm == "linf":
        t = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
    else:
        t = jax.random.normal(key, x.shape, x.dtype)
    return jnp.clip(x + eps * t / (expand(norm_of(t, norm), x) + TINY), clip_min, clip_max)


# --------------------------------------------------------------------------------------------
# Keeping the worst result per example


def keep_worst(best, candidate):
    """Per example, keeps the worse (for the model) of two (x_adv, success, objective) triples:
    a successful one first, then the higher objective."""
    best_x, best_success, best_value = best
    x_adv, success, value = candidate
    take = (success & ~best_success) | ((success == best_success) & (value > best_value))
    return (jnp.where(expand(take, x_adv), x_adv, best_x),
            jnp.where(take, success, best_success),
            jnp.where(take, value, best_value))


def initial_worst(x):
    """The (x, success, objective) triple every result beats: unsuccessful, objective −∞."""
    batch = x.shape[:1]
    return x, jnp.zeros(batch, bool), jnp.full(batch, -jnp.inf, x.dtype)


def worst_over_runs(run, keys, x):
    """Runs `run(key) -> (x_adv, success, objective)` once per key (a stacked key array, scanned)
    and keeps per example the worst result (`keep_worst`)."""
    best, _ = lax.scan(lambda best, k: (keep_worst(best, run(k)), None), initial_worst(x), keys)
    return best


def worst_over_restarts(run, key, x, restarts: int):
    """`run`'s triple for one restart (which uses `key` itself), or per example the worst over
    R > 1 restarts, restart r using ``jax.random.split(key, R)[r]``, so restart r equals a
    1-restart run with the r-th split key."""
    if restarts == 1:
        return run(key)
    return worst_over_runs(run, jax.random.split(key, restarts), x)


def as_float(value, x):
    """``value`` (a number or a traced scalar such as ε) as an array of ``x``'s float dtype."""
    return jnp.asarray(value, dtype=x.dtype)
