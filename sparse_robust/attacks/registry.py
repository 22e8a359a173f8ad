"""The attack registry: `make_attack` bundles an attack's name and validated settings into a
hashable `Attack`, the static jit argument the trainer and the evaluator take."""

from __future__ import annotations

import dataclasses
import inspect
import types
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax

from sparse_robust.attacks import parts
from sparse_robust.attacks.apgd import apgd, apgd_t
from sparse_robust.attacks.autoattack import autoattack
from sparse_robust.attacks.fab import fab_t
from sparse_robust.attacks.fmn import fmn
from sparse_robust.attacks.parts import LogitsFn
from sparse_robust.attacks.pgd import fgsm, pgd
from sparse_robust.attacks.square import square
from sparse_robust.checks import check_choice

ATTACK_NAMES = ("fgsm", "pgd", "apgd", "apgd_t", "fab_t", "square", "fmn", "autoattack")

# Names the configs' labels and AutoAttack's stages use: an attack with one setting fixed.
ALIASES = types.MappingProxyType({"apgd_ce": ("apgd", {"loss": "ce"}),
                                  "apgd_dlr": ("apgd", {"loss": "dlr"})})


def predicted_labels(logits_fn: LogitsFn, x: jax.Array) -> jax.Array:
    """The model's own predictions (argmax of the logits), under stop-gradient."""
    return lax.stop_gradient(jnp.argmax(logits_fn(x), axis=-1))



_ATTACK_FNS = types.MappingProxyType({"fgsm": fgsm, "pgd": pgd, "apgd": apgd, "apgd_t": apgd_t,
                                      "fab_t": fab_t, "square": square, "fmn": fmn,
                                      "autoattack": autoattack})


def _keyword_defaults(fn) -> dict[str, Any]:
    """Keyword-only parameters of an attack function and their defaults (inspect.Parameter.empty
    for required ones): the single source of each attack's settings."""
    return {name: p.default for name, p in inspect.signature(fn).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


@dataclasses.dataclass(frozen=True)
class Attack:
    """An attack with validated settings; hashable, so it can be a static argument of `jax.jit`.

    Call as ``attack(logits_fn, x, y, key, *, eps=None, step_size=None)`` (the convention of
    every attack: ``logits_fn(x) -> logits``, a batch x inside the box, integer labels y, and a
    key, positional, None only for an attack that draws nothing).

    The ε-override rule (the one rule; ``evaluation.Evaluator.sweep`` follows it too): ``eps``
    (traced values allowed, e.g. under ``jax.vmap``) replaces the stored ε and scales the step
    size with it, ``step_size · eps / self.eps``, so the attack keeps its shape; an explicit
    ``step_size`` wins. An attack stored with ε = 0 has no ratio: give ``step_size`` with ``eps``.
    APGD, FAB, Square and AutoAttack adapt their own steps and take no ``step_size``. With
    ``label_source="predicted"`` the attack targets the model's own predictions and ignores `y`.
    """

    name: str
    eps: float
    step_size: Optional[float]
    label_source: str
    options: tuple[tuple[str, Any], ...]  # The remaining static settings, sorted by name.

    @property
    def uses_step_size(self) -> bool:
        return self.name in ("fgsm", "pgd")

    def step_size_at(self, eps):
        """The step size at an overriding ``eps`` (None: the stored ε), by the ε-override rule:
        the stored step scaled by eps / self.eps (FGSM without a step size steps ε itself)."""
        if eps is None or self.step_size is None:
            return self.step_size
        if self.eps == 0:
            raise ValueError(f"eps={eps!r} needs step_size= for attack {self.name!r} stored with "
                             "eps=0 (the step scales with ε, and there is no ratio to scale).")
        return self.step_size * (eps / self.eps)

    def __call__(self, logits_fn: LogitsFn, x: jax.Array, y: jax.Array, key, *,
                 eps=None, step_size=None) -> jax.Array:
        kwargs = dict(self.options)
        kwargs["eps"] = self.eps if eps is None else eps
        if self.uses_step_size:
            kwargs["step_size"] = self.step_size_at(eps) if step_size is None else step_size
        elif step_size is not None:
            raise ValueError(f"step_size={step_size!r} is invalid for attack {self.name!r}, which "
                             "adapts its own step size; allowed values: None.")
        if self.label_source == "predicted":
            y = predicted_labels(logits_fn, x)
        return _ATTACK_FNS[self.name](logits_fn, x, y, key, **kwargs)


def make_attack(name: str, **settings) -> Attack:
    """Builds an `Attack` from a name (`ATTACK_NAMES`, or an alias of `ALIASES`: ``apgd_ce``,
    ``apgd_dlr``) and its keyword settings.

    Accepts the keyword settings of the attack function plus ``label_source`` ("true" or
    "predicted"), e.g. ``make_attack(**config.attack.to_dict())`` with
    ``{"name": "pgd", "eps": 0.3, "step_size": 0.05, "num_steps": 10, "label_source": "predicted"}``.
    Raises ValueError naming the field, the bad value and the allowed values.
    """
    check_choice("name", name, ATTACK_NAMES + tuple(ALIASES))
    if name in ALIASES:
        alias, (name, fixed) = name, ALIASES[name]
        for field, value in fixed.items():
            if settings.get(field, value) != value:
                raise ValueError(f"{field}={settings[field]!r} is invalid for {alias!r}, which "
                                 f"fixes {field}={value!r}; use name={name!r} to choose it.")
        settings = {**settings, **fixed}
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
    parts.check_settings(name, resolved)
    step_size = resolved.pop("step_size", None)
    return Attack(
        name=name,
        eps=float(resolved.pop("eps")),
        step_size=None if step_size is None else float(step_size),
        label_source=resolved.pop("label_source"),
        options=tuple(sorted(resolved.items())),
    )
