"""Training objectives: natural, the Cosentino 50/50 mix, PGD-AT (Madry) and TRADES.

An objective is a frozen (hashable) dataclass called as
``objective(model_fn, params, model_state, x, y, key) -> (loss, (new_model_state, metrics))``
where ``model_fn(params, model_state, x, train) -> (logits, new_model_state)``.
Adversarial batches are generated with the *current* params in eval mode and held under
stop-gradient, so the parameter gradient is that of the loss at fixed adversarial inputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from sparse_robust.checks import check_labels
from sparse_robust.convention import as_logits_fn, call_model_fn
from sparse_robust.losses import cross_entropy, kl_divergence

OBJECTIVES = ("natural", "mixed", "madry", "trades")


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The fraction of rows of ``logits`` [B, classes] whose argmax is the integer label [B]."""
    return jnp.mean(jnp.argmax(logits, -1) == labels)


def _clean_and_adv_logits(model_fn, params, model_state, x, x_adv):
    """Train-mode logits of the clean and the adversarial batch, and the new model state."""
    if not jax.tree_util.tree_leaves(model_state):
        # Without batch statistics one pass over both halves computes the same logits, faster.
        logits, new_state = call_model_fn(model_fn, params, model_state,
                                          jnp.concatenate([x, x_adv]), True)
        return *jnp.split(logits, 2), new_state
    # Batch norm must normalise each batch by its own statistics (as TRADES and CleverHans do):
    # a joint pass would mix clean and adversarial statistics and change the loss.
    clean_logits, model_state = call_model_fn(model_fn, params, model_state, x, True)
    adv_logits, model_state = call_model_fn(model_fn, params, model_state, x_adv, True)
    return clean_logits, adv_logits, model_state


class WrappedObjective:
    """Base of the objectives that add a term to another, held as ``self.objective`` (HARP's rate
    penalty, RADMM's ADMM penalty): every field they do not set reads as the inner objective's
    (name, adversarial, adv_weight, ...: early stopping and the engine read them)."""

    def __getattr__(self, name):
        if name.startswith("__") or name == "objective":  # copy/pickle probes, unset fields
            raise AttributeError(name)
        return getattr(self.objective, name)


@dataclasses.dataclass(frozen=True)
class Objective:
    """A training loss.

    Attributes:
      name: "natural" (clean CE), "mixed" ((1-w)·CE(clean) + w·CE(adv), Cosentino et al. with
        w = 0.5), "madry" (CE(adv), PGD adversarial training) or "trades"
        (CE(clean) + β·KL(p_clean ‖ p_adv), Zhang et al. 2019).
      attack: the attack that makes the adversarial batch (any ``sparse_robust.attacks`` attack);
        None only for "natural". Use FGSM with a random start here for "fast" adversarial training.
      adv_weight: w for "mixed".
      trades_beta: β for "trades".
      label_smoothing: applied to the cross-entropy targets (clean and adversarial).
    """

    name: str = "natural"
    attack: Optional[Callable[..., jax.Array]] = None
    adv_weight: float = 0.5
    trades_beta: float = 6.0
    label_smoothing: float = 0.0

    def __post_init__(self):
        if self.name not in OBJECTIVES:
            raise ValueError(f"Unknown objective {self.name!r}; choose one of {OBJECTIVES}.")
        if self.name != "natural" and self.attack is None:
            raise ValueError(f"Objective {self.name!r} needs an attack to make adversarial batches.")
        if not 0.0 <= self.adv_weight <= 1.0:
            raise ValueError(f"adv_weight is {self.adv_weight}; it must lie in [0, 1].")
        if self.trades_beta < 0:
            raise ValueError(f"trades_beta is {self.trades_beta}; it must be >= 0.")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing is {self.label_smoothing}; it must lie in [0, 1).")

    @property
    def adversarial(self) -> bool:
        return self.name != "natural"

    def adversarial_batch(self, model_fn, params, model_state, x, y, key) -> jax.Array:
        """The attack on the current params (eval mode), under stop-gradient."""
        logits_fn = as_logits_fn(model_fn, jax.lax.stop_gradient(params), model_state)
        return jax.lax.stop_gradient(self.attack(logits_fn, x, y, key))

    def __call__(self, model_fn, params, model_state, x, y, key) -> tuple[jax.Array, Any]:
        check_labels(y, x.shape[0], "y")  # shapes only: at trace time, before any compute
        if not self.adversarial:
            logits, new_state = call_model_fn(model_fn, params, model_state, x, True)
            loss = jnp.mean(cross_entropy(logits, y, self.label_smoothing))
            return loss, (new_state, {"loss": loss, "accuracy": accuracy(logits, y)})

        x_adv = self.adversarial_batch(model_fn, params, model_state, x, y, key)
        if self.name == "madry":
            adv_logits, new_state = call_model_fn(model_fn, params, model_state, x_adv, True)
            loss = jnp.mean(cross_entropy(adv_logits, y, self.label_smoothing))
            return loss, (new_state, {"loss": loss, "adv_accuracy": accuracy(adv_logits, y)})

        clean_logits, adv_logits, new_state = _clean_and_adv_logits(model_fn, params, model_state,
                                                                    x, x_adv)
        clean_ce = jnp.mean(cross_entropy(clean_logits, y, self.label_smoothing))
        if self.name == "mixed":
            adv_term = jnp.mean(cross_entropy(adv_logits, y, self.label_smoothing))
            loss = (1.0 - self.adv_weight) * clean_ce + self.adv_weight * adv_term
        else:
            adv_term = jnp.mean(kl_divergence(clean_logits, adv_logits))
            loss = clean_ce + self.trades_beta * adv_term
        metrics = {"loss": loss, "accuracy": accuracy(clean_logits, y),
                   "adv_accuracy": accuracy(adv_logits, y)}
        return loss, (new_state, metrics)
