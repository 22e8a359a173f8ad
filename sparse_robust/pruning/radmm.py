"""RADMM (Ye et al., ICCV 2019, "Adversarial Robustness vs. Model Compression, or Both?"):
adversarial training under the ADMM splitting of the sparsity constraint, then hard pruning.

Minimise the adversarial loss f(W) subject to W ∈ S (at most a fraction ``weights_remaining`` of
the prunable weights non-zero, per layer or over all layers). ADMM introduces Z ∈ S and the scaled
dual U, and alternates:

- W: a round of adversarial training on ``f(W) + ρ/2 · ‖W − Z + U‖²`` (Z, U fixed);
- Z ← Π_S(W + U), the Euclidean projection onto S: keep the largest |·| entries, zero the rest;
- U ← U + W − Z.

ρ may grow by a factor per round (``rho_growth``), which drives the residual ‖W − Z‖ to zero.
Afterwards W is hard-pruned to Z's support and fine-tuned adversarially under that mask
(ordinary masked training). Ties in the projection go as in ``pruning.prune`` (the earlier flat
index is removed first), so it keeps exactly the requested count.

Granularity "channel": S is the set of weights with at most k_l non-zero *channels* (output units:
conv filters, dense neurons) in layer l, ``output`` never pruned. The Euclidean projection onto
it keeps each layer's k_l channels of largest L2 norm ‖(W + U)_c‖₂ (zeroing a channel costs
exactly its squared norm), so Π_S ranks channels by their summed squares; the scope is then
"layerwise" and ``weights_remaining`` may give each layer its own fraction ({layer: fraction},
e.g. the chain's channel mask's fractions).

In the train loop the W-step is the optimizer step; the Z- and U-updates happen inside the step
at the start of every round (steps ``r · steps_per_round``, r ≥ 1), from the weights the previous
round ended with. Z, U and the step count ride in the model state
(``{"model_state": the model's, "admm": {"z", "u"}, "step"}``), so checkpoints resume them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from sparse_robust import masks as masks_lib
from sparse_robust import pruning
from sparse_robust import training
from sparse_robust.checks import check_number
from sparse_robust.objectives import WrappedObjective
from sparse_robust.pruning import hydra

SCOPES = pruning.SCOPES


def check_settings(weights_remaining, scope: str, rho: float, rho_growth: float,
                   steps_per_round: int, granularity: str = "weight") -> None:
    """ValueError naming the first bad setting and what is allowed."""
    if isinstance(weights_remaining, Mapping):
        hydra.check_weights_remaining(weights_remaining)
    else:
        check_number("weights_remaining", weights_remaining, 0, 1, low_open=True)
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} is invalid; allowed values: {SCOPES}.")
    if pruning.check_granularity(granularity) == "channel" and scope != "layerwise":
        raise ValueError(f"scope={scope!r} is invalid with granularity 'channel'; allowed "
                         "values: 'layerwise' (channels are ranked per layer).")
    check_number("rho", rho, 0, low_open=True)
    check_number("rho_growth", rho_growth, 1)
    if isinstance(steps_per_round, bool) or not isinstance(steps_per_round, int) \
            or steps_per_round < 1:
        raise ValueError(f"steps_per_round={steps_per_round!r} is invalid; allowed values: "
                         "integers >= 1 (training steps between Z/U updates).")


def projection_mask(values, mask, weights_remaining, scope: str, granularity: str = "weight"):
    """The support of Π_S(values): the largest |values| of each prunable leaf (``layerwise``) or
    over all of them (``global``), ``weights_remaining`` of them (a fraction, or {layer:
    fraction} layerwise); at granularity "channel" the channels of largest L2 norm. Jittable."""
    # Summed squares rank channels by L2 norm; single weights keep |v| (the same order).
    score = jnp.square if granularity == "channel" else jnp.abs
    return hydra.topk_mask(masks_lib.map_prunable(lambda m, v: score(v), mask, values),
                           weights_remaining, scope, granularity)


def project(values, mask, weights_remaining, scope: str, granularity: str = "weight"):
    """Π_S(values): ``values`` on its projection mask, zero elsewhere (prunable leaves only; the
    others are None, as in the mask)."""
    keep = projection_mask(values, mask, weights_remaining, scope, granularity)
    return masks_lib.map_prunable(lambda k, v: jnp.where(k, v, 0.0), keep, values)


def init_admm(params, mask, weights_remaining, scope: str, granularity: str = "weight") -> dict:
    """{"z": Π_S(W), "u": 0} for the prunable leaves of ``mask``."""
    z = project(params, mask, weights_remaining, scope, granularity)
    return {"z": z, "u": masks_lib.map_prunable(lambda m, z_: jnp.zeros_like(z_), mask, z)}


def admm_update(params, admm: dict, weights_remaining, scope: str,
                granularity: str = "weight") -> dict:
    """One Z- and U-update: Z ← Π_S(W + U), U ← U + W − Z."""
    w = masks_lib.map_prunable(lambda z, p: p, admm["z"], params)
    v = jax.tree_util.tree_map(jnp.add, w, admm["u"])
    z = project(v, admm["z"], weights_remaining, scope, granularity)
    u = jax.tree_util.tree_map(lambda u_, w_, z_: u_ + w_ - z_, admm["u"], w, z)
    return {"z": z, "u": u}


def penalty(params, admm: dict):
    """½ · ‖W − Z + U‖² over the prunable leaves (times ρ in the objective)."""
    w = masks_lib.map_prunable(lambda z, p: p, admm["z"], params)
    terms = jax.tree_util.tree_map(lambda w_, z, u: jnp.sum(jnp.square(w_ - z + u)),
                                   w, admm["z"], admm["u"])
    return 0.5 * sum(jax.tree_util.tree_leaves(terms))


def residual(params, admm: dict):
    """‖W − Z‖ (the primal residual) over the prunable leaves."""
    w = masks_lib.map_prunable(lambda z, p: p, admm["z"], params)
    terms = jax.tree_util.tree_map(lambda w_, z: jnp.sum(jnp.square(w_ - z)), w, admm["z"])
    return jnp.sqrt(sum(jax.tree_util.tree_leaves(terms)))


def make_model_fn(model_fn: training.ModelFn) -> training.ModelFn:
    """The model_fn of the ADMM phase: the model's own, its state nested under "model_state"."""

    def admm_model_fn(params, state, x, train):
        logits, inner = model_fn(params, state["model_state"], x, train)
        return logits, {**state, "model_state": inner}

    return admm_model_fn


def init_state(params, model_state, mask, weights_remaining, scope: str,
               granularity: str = "weight") -> dict:
    """The ADMM phase's model state: the model's, Z and U, and a step counter."""
    return {"model_state": model_state,
            "admm": init_admm(params, mask, weights_remaining, scope, granularity),
            "step": jnp.zeros((), jnp.int32)}


@dataclasses.dataclass(frozen=True)
class AdmmObjective(WrappedObjective):
    """The adversarial objective plus ``ρ_r/2 · ‖W − Z + U‖²`` with ρ_r = rho · rho_growth^r in
    round r; at the first step of every round after the first, Z and U are updated from the
    current weights first (see the module docstring). Reads as its inner objective otherwise."""
    objective: Any
    # A fraction, or ((layer, fraction), ...) per layer: hashable, as the engine's contexts
    # memoize on their objective.
    weights_remaining: Any
    scope: str
    rho: float
    rho_growth: float
    steps_per_round: int
    granularity: str = "weight"

    @property
    def fractions(self):
        """``weights_remaining`` as the projection takes it: a float or {layer: fraction}."""
        if isinstance(self.weights_remaining, tuple):
            return dict(self.weights_remaining)
        return self.weights_remaining

    def __call__(self, model_fn, params, model_state, x, y, key):
        step = model_state["step"]
        frozen = jax.lax.stop_gradient(params)
        admm = jax.lax.cond(
            (step > 0) & (step % self.steps_per_round == 0),
            lambda a: admm_update(frozen, a, self.fractions, self.scope, self.granularity),
            lambda a: a, model_state["admm"])
        loss, (new_state, metrics) = self.objective(model_fn, params, model_state, x, y, key)
        rho = self.rho * self.rho_growth ** (step // self.steps_per_round).astype(jnp.float32)
        pen = penalty(params, admm)
        total = loss + rho * pen
        new_state = {**new_state, "admm": admm, "step": step + 1}
        return total, (new_state, {**metrics, "loss": total, "admm_penalty": pen,
                                   "admm_residual": residual(frozen, admm)})


def make_objective(objective, weights_remaining, scope: str, rho: float, rho_growth: float,
                   steps_per_round: int, granularity: str = "weight") -> AdmmObjective:
    """RADMM's objective: ``objective`` (e.g. PGD-AT) plus ρ_r/2·‖W − Z + U‖², Z the projection
    of W + U onto ``weights_remaining`` (``scope`` "layerwise" or "global"; weights or, at
    ``granularity`` "channel", whole channels) and U the scaled dual, both renewed every
    ``steps_per_round`` steps; ρ_r = ``rho`` · ``rho_growth``^round.
    ValueError on a bad setting, before compute."""
    check_settings(weights_remaining, scope, rho, rho_growth, steps_per_round, granularity)
    weights_remaining = (tuple(sorted(weights_remaining.items()))
                         if isinstance(weights_remaining, Mapping) else float(weights_remaining))
    return AdmmObjective(objective, weights_remaining, scope, float(rho), float(rho_growth),
                         steps_per_round, granularity)


def hard_prune_mask(admm: dict, weights_remaining, scope: str, granularity: str = "weight"):
    """The mask of the fine-tuning phase: Z's support (exactly the projection's count)."""
    return projection_mask(admm["z"], admm["z"], weights_remaining, scope, granularity)
