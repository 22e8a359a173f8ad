"""Per-example losses on logits [B, K], shared by the attacks and the training objectives."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

_TINY = 1e-12  # Keeps the DLR denominators away from zero (as the reference implementation).


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy with optional label smoothing."""
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def kl_divergence(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
    """Per-example KL(softmax(p) || softmax(q))."""
    p_log = jax.nn.log_softmax(p_logits)
    return jnp.sum(jnp.exp(p_log) * (p_log - jax.nn.log_softmax(q_logits)), axis=-1)


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


def targeted_dlr_loss(logits: jax.Array, y: jax.Array, target: jax.Array) -> jax.Array:
    """Targeted DLR (Croce & Hein 2020): −(z_y − z_t) / (z_π1 − (z_π3 + z_π4) / 2 + 1e−12), per
    example, with y the true class and t the target; needs at least 4 classes."""
    true_logit = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
    target_logit = jnp.take_along_axis(logits, target[:, None], axis=-1)[:, 0]
    top = jnp.sort(logits, axis=-1)
    return -(true_logit - target_logit) / (top[:, -1] - 0.5 * (top[:, -3] + top[:, -4]) + _TINY)
