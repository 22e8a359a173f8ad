"""Adversarial attacks: FGSM, PGD (L∞ / L2) and APGD (Croce & Hein 2020), as pure jittable functions.

An attack is a pure function ``(logits_fn, x, y, key, **settings) -> x_adv`` where
``logits_fn(x) -> logits`` closes over a model in eval mode, ``x`` is a batch [B, ...] lying in
[clip_min, clip_max] (default [0, 1]) and ``y`` holds int labels [B]. ``eps`` and ``step_size`` may
be traced values (so ``jax.vmap`` over an ε grid compiles once); every other setting is a static
Python value, validated before anything is traced. The result always lies in the ε-ball around
``x`` (L∞ or L2) and in [clip_min, clip_max], and is returned under ``lax.stop_gradient``.

``make_attack(name, **settings)`` bundles validated settings into a hashable `Attack`, callable as
``attack(logits_fn, x, y, key, *, eps=None, step_size=None)``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import types
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparse_robust.checks import check_choice, check_int
from sparse_robust.objectives import cross_entropy, kl_divergence

LogitsFn = Callable[[jax.Array], jax.Array]

NORMS = ("linf", "l2")
PGD_LOSSES = ("ce", "margin", "kl")
APGD_LOSSES = ("ce", "dlr")
LABEL_SOURCES = ("true", "predicted")
ATTACK_NAMES = ("fgsm", "pgd", "apgd")

_APGD_MOMENTUM = 0.75  # α in Croce & Hein (2020).
_APGD_INITIAL_STEP = 2.0  # η(0) = 2ε.
_TINY = 1e-12  # Guards divisions by a zero norm (zero gradient, zero perturbation).


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


def _check_settings(attack: str, settings: Mapping[str, Any]) -> None:
    """Validates the settings of `attack` (one code path for the functions and `make_attack`)."""
    losses = APGD_LOSSES if attack == "apgd" else PGD_LOSSES
    for field, value in settings.items():
        if field == "eps":
            _check_nonnegative(field, value)
        elif field == "step_size":
            if not (attack == "fgsm" and value is None):
                _check_nonnegative(field, value)
        elif field in ("num_steps", "restarts"):
            check_int(field, value, 1)
        elif field == "norm":
            check_choice(field, value, NORMS)
        elif field == "loss":
            check_choice(field, value, losses)
        elif field == "label_source":
            check_choice(field, value, LABEL_SOURCES)
        elif field in ("random_start", "targeted"):
            _check_bool(field, value)
        elif field in ("clip_min", "clip_max"):
            _check_real(field, value)
        elif field == "rho":
            _check_real(field, value)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"rho={value!r} is invalid; allowed values: 0 < rho <= 1.")
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


def _check_inputs(x, y, key, needs_key: bool) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a floating-point batch in [clip_min, clip_max], got dtype {x.dtype}.")
    if x.ndim < 1 or y.shape != x.shape[:1]:
        raise ValueError(f"x and y must share the batch axis: got x.shape={x.shape}, y.shape={y.shape}.")
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(f"y must hold integer labels, got dtype {y.dtype}.")
    if needs_key and key is None:
        raise ValueError("key=None is invalid here: the random start needs a jax.random key.")


# --------------------------------------------------------------------------------------------
# Losses (per example; the attack ascends them)


def margin_parts(logits, y):
    """(true-class logit, largest other logit) per example."""
    true_logit = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
    is_true = jax.nn.one_hot(y, logits.shape[-1], dtype=bool)
    other_logit = jnp.max(jnp.where(is_true, -jnp.inf, logits), axis=-1)
    return true_logit, other_logit


def dlr_loss(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Difference of logits ratio: −(z_y − max_{i≠y} z_i) / (z_π1 − z_π3 + 1e−12), per example."""
    true_logit, other_logit = margin_parts(logits, y)
    top = jnp.sort(logits, axis=-1)
    return -(true_logit - other_logit) / (top[:, -1] - top[:, -3] + _TINY)


def _per_example_loss(loss: str, logits, y, clean_logits):
    if loss == "ce":
        return cross_entropy(logits, y)
    if loss == "margin":  # Carlini–Wagner: max other logit − true logit.
        true_logit, other_logit = margin_parts(logits, y)
        return other_logit - true_logit
    if loss == "kl":  # TRADES: KL(p_clean ‖ p_adv) with the clean prediction held fixed.
        return kl_divergence(clean_logits, logits)
    return dlr_loss(logits, y)


def _make_objective(logits_fn: LogitsFn, x, y, loss: str, targeted: bool):
    """x_adv -> (objective [B], success [B]); the attack maximises the objective.

    Targeted attacks minimise the loss towards the target y, so their objective is −loss.
    Success means misclassified (untargeted) or classified as the target (targeted).
    """
    num_classes = jax.eval_shape(logits_fn, x).shape[-1]
    minimum = {"margin": 2, "dlr": 3}.get(loss, 1)
    if num_classes < minimum:
        raise ValueError(f"loss={loss!r} needs at least {minimum} classes, the model has {num_classes}.")
    clean_logits = lax.stop_gradient(logits_fn(x)) if loss == "kl" else None
    sign = -1.0 if targeted else 1.0

    def objective(x_adv):
        logits = logits_fn(x_adv)
        predicted = jnp.argmax(logits, axis=-1)
        success = (predicted == y) if targeted else (predicted != y)
        return sign * _per_example_loss(loss, logits, y, clean_logits), success

    return objective


def _objective_and_grad(objective, x_adv):
    """(objective [B], success [B], d objective / d x_adv); examples are independent."""
    def total(z):
        values, success = objective(z)
        return jnp.sum(values), (values, success)

    (_, (values, success)), grad = jax.value_and_grad(total, has_aux=True)(x_adv)
    return values, success, grad


# --------------------------------------------------------------------------------------------
# Geometry: norms, steps, projection, random starts


def _expand(per_example, x):
    """[B] -> [B, 1, ..., 1], broadcastable against x."""
    return per_example.reshape(per_example.shape + (1,) * (x.ndim - 1))


def _l2_norm(v):
    return jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(range(1, v.ndim)), keepdims=True))


def _ascent_direction(grad, norm: str):
    """Steepest-ascent unit step: sign for L∞, the normalised gradient for L2."""
    if norm == "linf":
        return jnp.sign(grad)
    return grad / jnp.maximum(_l2_norm(grad), _TINY)


def _project(x_adv, x, eps, norm: str, clip_min: float, clip_max: float):
    """Projects onto the ε-ball around x, then onto the box.

    With x inside the box, clipping only moves coordinates towards x, so it never leaves the ball.
    """
    delta = x_adv - x
    if norm == "linf":
        delta = jnp.clip(delta, -eps, eps)
    else:
        delta = delta * jnp.minimum(1.0, eps / jnp.maximum(_l2_norm(delta), _TINY))
    return jnp.clip(x + delta, clip_min, clip_max)


def _random_start(key, x, eps, norm: str, clip_min: float, clip_max: float):
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
        direction = direction / jnp.maximum(_l2_norm(direction), _TINY)
        dim = math.prod(x.shape[1:])
        radius = eps * jax.random.uniform(k_radius, x.shape[:1], x.dtype) ** (1.0 / dim)
        noise = _expand(radius, x) * direction
    return jnp.clip(x + noise, clip_min, clip_max)


# --------------------------------------------------------------------------------------------
# Restarts


def _keep_worst(best, candidate):
    """Per example, keeps the worse (for the model) of two (x_adv, success, objective) triples:
    a successful one first, then the higher objective."""
    best_x, best_success, best_value = best
    x_adv, success, value = candidate
    take = (success & ~best_success) | ((success == best_success) & (value > best_value))
    return (jnp.where(_expand(take, x_adv), x_adv, best_x),
            jnp.where(take, success, best_success),
            jnp.where(take, value, best_value))


def _worst_over_restarts(run, key, x, restarts: int):
    """Runs `run(key) -> (x_adv, success, objective)` once per restart key and keeps per example
    the worst result. A single restart uses `key` itself; R > 1 restarts use
    ``jax.random.split(key, R)``, so restart r equals a 1-restart run with the r-th split key."""
    if restarts == 1:
        return run(key)[0]
    batch = x.shape[:1]
    initial = (x, jnp.zeros(batch, bool), jnp.full(batch, -jnp.inf, x.dtype))
    best, _ = lax.scan(lambda best, k: (_keep_worst(best, run(k)), None),
                       initial, jax.random.split(key, restarts))
    return best[0]


def _as_float(value, x):
    return jnp.asarray(value, dtype=x.dtype)


# --------------------------------------------------------------------------------------------
# Attacks


def predicted_labels(logits_fn: LogitsFn, x: jax.Array) -> jax.Array:
    """The model's own predictions (argmax of the logits), under stop-gradient."""
    return lax.stop_gradient(jnp.argmax(logits_fn(x), axis=-1))


def pgd(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, key: Optional[jax.Array], *,
        eps, step_size, num_steps: int, norm: str = "linf", random_start: bool = True,
        restarts: int = 1, loss: str = "ce", targeted: bool = False,
        clip_min: float = 0.0, clip_max: float = 1.0) -> jax.Array:
    """Projected gradient descent (Madry et al. 2018).

    Each of `num_steps` steps moves `step_size` along the sign of the gradient (L∞) or the
    normalised gradient (L2) and projects back onto the ε-ball and the box. The start is uniform in
    the ball when `random_start` (see `_random_start`; needs `key`). Losses: "ce", "margin"
    (max other logit − true logit) and "kl" (KL(p_clean ‖ p_adv), TRADES). With `targeted`, y is
    the target class and the loss is decreased. With `restarts` R > 1, each example keeps the worst
    of the R final iterates (misclassified first, then highest loss); restart r starts from
    ``jax.random.split(key, R)[r]``.
    """
    _check_settings("pgd", dict(eps=eps, step_size=step_size, num_steps=num_steps, norm=norm,
                                random_start=random_start, restarts=restarts, loss=loss,
                                targeted=targeted, clip_min=clip_min, clip_max=clip_max))
    x, y = jnp.asarray(x), jnp.asarray(y)
    _check_inputs(x, y, key, needs_key=random_start)
    objective = _make_objective(logits_fn, x, y, loss, targeted)
    eps, step_size = _as_float(eps, x), _as_float(step_size, x)

    def step(_, x_adv):
        _, _, grad = _objective_and_grad(objective, x_adv)
        moved = x_adv + step_size * _ascent_direction(grad, norm)
        return _project(moved, x, eps, norm, clip_min, clip_max)

    def run(run_key):
        start = _random_start(run_key, x, eps, norm, clip_min, clip_max) if random_start else x
        x_adv = lax.fori_loop(0, num_steps, step, start)
        value, success = objective(x_adv)  # Only used across restarts (dead code otherwise).
        return x_adv, success, value

    return lax.stop_gradient(_worst_over_restarts(run, key, x, restarts))


def fgsm(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, key: Optional[jax.Array] = None, *,
         eps, step_size=None, random_start: bool = False, loss: str = "ce", targeted: bool = False,
         norm: str = "linf", clip_min: float = 0.0, clip_max: float = 1.0) -> jax.Array:
    """Fast gradient sign method: one step of `step_size` (default eps), projected on the ε-ball.

    With ``random_start=True`` and ``step_size=1.25 * eps`` this is the "fast" FGSM of
    Wong et al. (2020). ``norm="l2"`` steps along the normalised gradient (fast gradient method).
    """
    _check_settings("fgsm", dict(eps=eps, step_size=step_size, random_start=random_start, loss=loss,
                                 targeted=targeted, norm=norm, clip_min=clip_min, clip_max=clip_max))
    return pgd(logits_fn, x, y, key, eps=eps, step_size=eps if step_size is None else step_size,
               num_steps=1, norm=norm, random_start=random_start, restarts=1, loss=loss,
               targeted=targeted, clip_min=clip_min, clip_max=clip_max)


def apgd_checkpoints(num_steps: int) -> list[int]:
    """Iterations w_j = ceil(p_j · num_steps) at which APGD may halve its step size, with
    p_0 = 0, p_1 = 0.22 and p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06); w_0 = 0 excluded."""
    fractions = [0.0, 0.22]
    while fractions[-1] <= 1.0:
        fractions.append(fractions[-1] + max(fractions[-1] - fractions[-2] - 0.03, 0.06))
    # Rounding first keeps 0.41 * 100 from becoming 41.000000000000004 -> 42.
    steps = {math.ceil(round(p * num_steps, 6)) for p in fractions if p <= 1.0}
    return sorted(s for s in steps if 0 < s <= num_steps)


def apgd(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, key: jax.Array, *, eps, num_steps: int,
         norm: str = "linf", loss: str = "ce", restarts: int = 1, rho: float = 0.75,
         clip_min: float = 0.0, clip_max: float = 1.0) -> jax.Array:
    """Auto-PGD (Croce & Hein 2020, Algorithm 1) with per-example step sizes.

    Starts uniformly in the ε-ball (as `pgd`), steps with η = 2ε and momentum α = 0.75, and at each
    checkpoint w_j (`apgd_checkpoints`) halves η and restarts from the best point of an example when
    (1) fewer than rho·(w_j − w_{j−1}) of its steps since w_{j−1} increased the loss, or (2) η was
    not halved at w_{j−1} and the best loss did not improve since. Uses num_steps + 1 gradient
    evaluations. Returns per example the worst point seen (misclassified first, then highest loss).
    Losses: "ce" and "dlr" (difference of logits ratio, needs >= 3 classes). Restarts as in `pgd`.
    """
    _check_settings("apgd", dict(eps=eps, num_steps=num_steps, norm=norm, loss=loss,
                                 restarts=restarts, rho=rho, clip_min=clip_min, clip_max=clip_max))
    x, y = jnp.asarray(x), jnp.asarray(y)
    _check_inputs(x, y, key, needs_key=True)
    objective = _make_objective(logits_fn, x, y, loss, targeted=False)
    eps = _as_float(eps, x)
    checkpoints = apgd_checkpoints(num_steps)
    # Static per-iteration tables: is iteration i (producing x^(i+1)) a checkpoint, and how long
    # was the interval that ends there.
    is_checkpoint = np.zeros(num_steps, bool)
    interval = np.zeros(num_steps, np.float32)
    for previous, current in zip([0] + checkpoints, checkpoints):
        is_checkpoint[current - 1] = True
        interval[current - 1] = current - previous
    is_checkpoint, interval = jnp.asarray(is_checkpoint), jnp.asarray(interval)

    def project(z):
        return _project(z, x, eps, norm, clip_min, clip_max)

    def step(i, state):
        eta = _expand(state["eta"], x)
        x_cur = state["x"]
        momentum = jnp.where(i == 0, 1.0, _APGD_MOMENTUM).astype(x.dtype)
        z = project(x_cur + eta * _ascent_direction(state["grad"], norm))
        x_new = project(x_cur + momentum * (z - x_cur) + (1 - momentum) * (x_cur - state["x_prev"]))
        value, success, grad = _objective_and_grad(objective, x_new)

        increases = state["increases"] + (value > state["value"])
        improved = value > state["best_value"]
        best_x = jnp.where(_expand(improved, x), x_new, state["best_x"])
        best_grad = jnp.where(_expand(improved, x), grad, state["best_grad"])
        best_value = jnp.where(improved, value, state["best_value"])
        worst = _keep_worst(state["worst"], (x_new, success, value))

        at_check = is_checkpoint[i]
        stalled = increases < rho * interval[i]
        no_progress = ~state["reduced_last"] & (state["best_at_last_check"] >= best_value)
        reduce = at_check & (stalled | no_progress)
        reset = _expand(reduce, x)
        return dict(
            x=jnp.where(reset, best_x, x_new),
            x_prev=x_cur,
            grad=jnp.where(reset, best_grad, grad),
            value=jnp.where(reduce, best_value, value),
            eta=jnp.where(reduce, state["eta"] / 2, state["eta"]),
            increases=jnp.where(at_check, 0, increases),
            reduced_last=jnp.where(at_check, reduce, state["reduced_last"]),
            best_at_last_check=jnp.where(at_check, best_value, state["best_at_last_check"]),
            best_x=best_x, best_grad=best_grad, best_value=best_value, worst=worst)

    def run(run_key):
        start = _random_start(run_key, x, eps, norm, clip_min, clip_max)
        value, success, grad = _objective_and_grad(objective, start)
        batch = x.shape[:1]
        state = dict(
            x=start, x_prev=start, grad=grad, value=value,
            eta=jnp.full(batch, _APGD_INITIAL_STEP, x.dtype) * eps,
            increases=jnp.zeros(batch, jnp.int32), reduced_last=jnp.zeros(batch, bool),
            best_at_last_check=value, best_x=start, best_grad=grad, best_value=value,
            worst=(start, success, value))
        return lax.fori_loop(0, num_steps, step, state)["worst"]

    return lax.stop_gradient(_worst_over_restarts(run, key, x, restarts))


# --------------------------------------------------------------------------------------------
# Factory

_ATTACK_FNS = types.MappingProxyType({"fgsm": fgsm, "pgd": pgd, "apgd": apgd})


def _keyword_defaults(fn) -> dict[str, Any]:
    """Keyword-only parameters of an attack function and their defaults (inspect.Parameter.empty
    for required ones): the single source of each attack's settings."""
    return {name: p.default for name, p in inspect.signature(fn).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


@dataclasses.dataclass(frozen=True)
class Attack:
    """An attack with validated settings; hashable, so it can be a static argument of `jax.jit`.

    Call as ``attack(logits_fn, x, y, key, *, eps=None, step_size=None)``; `eps` and `step_size`
    (traced values allowed) override the stored defaults, e.g. for ε sweeps. With
    ``label_source="predicted"`` the attack targets the model's own predictions and ignores `y`.
    """

    name: str
    eps: float
    step_size: Optional[float]
    label_source: str
    options: tuple[tuple[str, Any], ...]  # The remaining static settings, sorted by name.

    @property
    def uses_step_size(self) -> bool:
        return self.name != "apgd"

    def __call__(self, logits_fn: LogitsFn, x: jax.Array, y: jax.Array, key, *,
                 eps=None, step_size=None) -> jax.Array:
        kwargs = dict(self.options)
        kwargs["eps"] = self.eps if eps is None else eps
        if self.uses_step_size:
            kwargs["step_size"] = self.step_size if step_size is None else step_size
        elif step_size is not None:
            raise ValueError(f"step_size={step_size!r} is invalid for attack {self.name!r}, which "
                             "adapts its own step size; allowed values: None.")
        if self.label_source == "predicted":
            y = predicted_labels(logits_fn, x)
        return _ATTACK_FNS[self.name](logits_fn, x, y, key, **kwargs)


def make_attack(name: str, **settings) -> Attack:
    """Builds an `Attack` from a name ("fgsm", "pgd", "apgd") and its keyword settings.

    Accepts the keyword settings of the attack function plus ``label_source`` ("true" or
    "predicted"), e.g. ``make_attack(**config.attack.to_dict())`` with
    ``{"name": "pgd", "eps": 0.3, "step_size": 0.05, "num_steps": 10, "label_source": "predicted"}``.
    Raises ValueError naming the field, the bad value and the allowed values.
    """
    check_choice("name", name, ATTACK_NAMES)
    defaults = _keyword_defaults(_ATTACK_FNS[name])
    defaults["label_source"] = "true"
    unknown = sorted(set(settings) - set(defaults))
    if unknown:
        raise ValueError(f"Unknown setting(s) {unknown} for attack {name!r}; "
                         f"allowed settings: {sorted(defaults)}.")
    resolved = {**defaults, **settings}
    missing = sorted(k for k, v in resolved.items() if v is inspect.Parameter.empty)
    if missing:
        raise ValueError(f"Attack {name!r} needs setting(s) {missing}.")
    _check_settings(name, resolved)
    step_size = resolved.pop("step_size", None)
    return Attack(
        name=name,
        eps=float(resolved.pop("eps")),
        step_size=None if step_size is None else float(step_size),
        label_source=resolved.pop("label_source"),
        options=tuple(sorted(resolved.items())),
    )
