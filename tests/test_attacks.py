"""Tests for sparse_robust.attacks: constraints, determinism, vmap/jit behaviour, agreement with
plain NumPy reference implementations, restarts, losses, validation and adversarial training."""

import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from sparse_robust import attacks
from sparse_robust.attacks.apgd import _apgd_run

NUM_CLASSES = 4
BALL_TOL = 1e-6


# --------------------------------------------------------------------------------------------
# Shared helpers (also imported by test_evaluation.py)


def make_data(seed, n, num_classes=NUM_CLASSES, num_weak=20, weak_shift=0.08, noise_rate=0.1):
    """A problem with a robust and a non-robust signal, inputs in [0, 1].

    The first `num_classes` features are a one-hot of the label (0.1 / 0.9), wrong for a
    `noise_rate` fraction of examples; the other `num_weak` features are shifted by ±weak_shift per
    class under N(0, 0.15) noise. A natural model leans on the weak features (an ε > weak_shift L∞
    attack flips them all); an adversarially trained one must use the robust block.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    shown = np.where(rng.uniform(size=n) < noise_rate, rng.integers(0, num_classes, n), labels)
    robust = 0.1 + 0.8 * np.eye(num_classes)[shown] + 0.03 * rng.standard_normal((n, num_classes))
    signs = np.random.default_rng(1234).choice([-1.0, 1.0], (num_classes, num_weak))  # Fixed per class.
    weak = 0.5 + weak_shift * signs[labels] + 0.15 * rng.standard_normal((n, num_weak))
    images = np.clip(np.concatenate([robust, weak], axis=1), 0.0, 1.0).astype(np.float32)
    return images, labels.astype(np.int32)


class TinyMLP(nn.Module):
    """Flattens, then Dense(hidden) -> tanh -> Dense(num_classes)."""

    hidden: int = 32
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes)(jnp.tanh(nn.Dense(self.hidden)(x)))


def train_mlp(images, labels, key, attack=None, steps=200, learning_rate=1e-2):
    """Full-batch Adam; with `attack`, the loss is 0.5·CE(clean) + 0.5·CE(adversarial)."""
    model = TinyMLP()
    init_key, train_key = jax.random.split(key)
    params = model.init(init_key, images[:1])
    optimizer = optax.adam(learning_rate)
    x, y = jnp.asarray(images), jnp.asarray(labels)

    def loss_fn(params, attack_key):
        ce = lambda z: optax.softmax_cross_entropy_with_integer_labels(model.apply(params, z), y).mean()
        if attack is None:
            return ce(x)
        frozen = jax.lax.stop_gradient(params)
        x_adv = attack(lambda z: model.apply(frozen, z), x, y, attack_key)
        return 0.5 * ce(x) + 0.5 * ce(x_adv)

    def step(carry, attack_key):
        params, opt_state = carry
        grads = jax.grad(loss_fn)(params, attack_key)
        updates, opt_state = optimizer.update(grads, opt_state)
        return (optax.apply_updates(params, updates), opt_state), None

    @jax.jit
    def train(params, train_key):
        (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)),
                                      jax.random.split(train_key, steps))
        return params

    return model, train(params, train_key)


def accuracy(logits_fn, x, y):
    return float(np.mean(np.argmax(np.asarray(logits_fn(x)), -1) == np.asarray(y)))


# --------------------------------------------------------------------------------------------
# NumPy references (independent of JAX autodiff): a tanh MLP with hand-written gradients


class NumpyMLP:
    """logits = tanh(x W1 + b1) W2 on flat float32 inputs, with analytic input gradients."""

    def __init__(self, seed, dim, hidden=16, num_classes=NUM_CLASSES, scale=3.0):
        rng = np.random.default_rng(seed)
        self.w1 = (scale * rng.standard_normal((dim, hidden)) / math.sqrt(dim)).astype(np.float32)
        self.b1 = (0.1 * rng.standard_normal(hidden)).astype(np.float32)
        self.w2 = (scale * rng.standard_normal((hidden, num_classes)) / math.sqrt(hidden)).astype(np.float32)

    def jax_logits(self, x):
        x = x.reshape(x.shape[0], -1)
        return jnp.tanh(x @ self.w1 + self.b1) @ self.w2

    def loss_and_grad(self, x, y, loss, sign=1.0):
        """Per-example loss values, d loss / d x and predictions, in float32."""
        h = np.tanh(x @ self.w1 + self.b1)
        z = h @ self.w2
        rows = np.arange(len(x))
        others = np.where(np.eye(z.shape[1], dtype=bool)[y], -np.inf, z)
        o = np.argmax(others, axis=1)
        dz = np.zeros_like(z)
        if loss == "ce":
            shifted = z - z.max(axis=1, keepdims=True)
            p = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
            value = np.log(np.exp(shifted).sum(axis=1)) - shifted[rows, y]
            dz = p.copy()
            dz[rows, y] -= 1
        elif loss == "margin":
            value = z[rows, o] - z[rows, y]
            dz[rows, o] += 1
            dz[rows, y] -= 1
        elif loss == "dlr":
            order = np.argsort(z, axis=1)
            top1, top3 = order[:, -1], order[:, -3]
            denom = z[rows, top1] - z[rows, top3] + 1e-12
            numer = z[rows, y] - z[rows, o]
            value = -numer / denom
            np.add.at(dz, (rows, y), -1 / denom)
            np.add.at(dz, (rows, o), 1 / denom)
            np.add.at(dz, (rows, top1), numer / denom**2)
            np.add.at(dz, (rows, top3), -numer / denom**2)
        dx = ((dz @ self.w2.T) * (1 - h**2)) @ self.w1.T
        return (sign * value).astype(np.float32), (sign * dx).astype(np.float32), z.argmax(axis=1)


def ref_random_start(key, x, eps, norm):
    """The documented random start, re-derived from the key."""
    if norm == "linf":
        noise = eps * np.asarray(jax.random.uniform(key, x.shape, jnp.float32, -1.0, 1.0))
    else:
        k_dir, k_radius = jax.random.split(key)
        direction = np.array(jax.random.normal(k_dir, x.shape, jnp.float32))
        direction /= np.linalg.norm(direction.reshape(len(x), -1), axis=1).reshape(-1, *[1] * (x.ndim - 1))
        radius = eps * np.asarray(jax.random.uniform(k_radius, x.shape[:1], jnp.float32)) ** (1 / x[0].size)
        noise = radius.reshape(-1, *[1] * (x.ndim - 1)) * direction
    return np.clip(x + noise, 0.0, 1.0).astype(np.float32)


def ref_direction(g, norm):
    if norm == "linf":
        return np.sign(g)
    return g / max(np.linalg.norm(g), 1e-12) if g.ndim == 1 else \
        g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)


def ref_project(x_adv, x, eps, norm):
    delta = x_adv - x
    if norm == "linf":
        delta = np.clip(delta, -eps, eps)
    else:
        n = np.linalg.norm(delta.reshape(len(delta), -1) if delta.ndim > 1 else delta[None], axis=1)
        scale = np.minimum(1.0, eps / np.maximum(n, 1e-12))
        delta = delta * (scale.reshape(-1, 1) if delta.ndim > 1 else scale[0])
    return np.clip(x + delta, 0.0, 1.0).astype(np.float32)


def ref_pgd(model, x, y, start, eps, step_size, num_steps, norm, loss, sign=1.0):
    x_adv = start.copy()
    for _ in range(num_steps):
        _, grad, _ = model.loss_and_grad(x_adv, y, loss, sign)
        x_adv = ref_project(x_adv + step_size * ref_direction(grad, norm), x, eps, norm)
    return x_adv


def assert_equivalent_results(actual, expected, y, loss, min_identical=0.85):
    """APGD keeps the best of many iterates and follows sign(gradient), so float-level rounding
    differences (batched vs per-example matmuls) can pick another iterate at a near-tie or wander
    differently on a flat stretch of the loss (DLR is exactly 1 wherever the true class ranks
    third). So each example must reach the expected point (atol 1e-3), or the same outcome: both
    attacks succeed, or both fail with the same loss. Most examples must reach the same point."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    same_point = np.all(np.isclose(actual, expected, atol=1e-3), axis=tuple(range(1, actual.ndim)))
    loss_a, _, pred_a = MODEL.loss_and_grad(actual.reshape(len(y), -1), y, loss)
    loss_e, _, pred_e = MODEL.loss_and_grad(expected.reshape(len(y), -1), y, loss)
    success_a, success_e = pred_a != y, pred_e != y
    same_outcome = (success_a & success_e) | (
        ~success_a & ~success_e & np.isclose(loss_a, loss_e, rtol=1e-4, atol=1e-5))
    assert np.all(same_point | same_outcome), np.flatnonzero(~(same_point | same_outcome))
    assert same_point.mean() >= min_identical, same_point.mean()


def ref_boundary_start(key, x, eps, norm):
    """APGD's documented start on the ε-sphere, re-derived from the key."""
    if norm == "linf":
        t = np.asarray(jax.random.uniform(key, x.shape, jnp.float32, -1.0, 1.0))
        size = np.abs(t.reshape(len(x), -1)).max(axis=1)
    else:
        t = np.asarray(jax.random.normal(key, x.shape, jnp.float32))
        size = np.linalg.norm(t.reshape(len(x), -1), axis=1)
    return np.clip(x + eps * t / (size.reshape(-1, *[1] * (x.ndim - 1)) + 1e-12), 0.0, 1.0)


def ref_schedule(num_steps):
    """The reference's (first interval, shrink, shortest interval), in its float arithmetic."""
    return (max(int(0.22 * num_steps), 1), max(int(0.03 * num_steps), 1),
            max(int(0.06 * num_steps), 1))


def ref_checkpoints(num_steps):
    """APGD checkpoints by simulating the reference's loop: a counter of steps since the last
    check, a check when it reaches the current interval k, then k shrinks."""
    k, shrink, shortest = ref_schedule(num_steps)
    checkpoints, counter = [], 0
    for i in range(num_steps):
        counter += 1
        if counter == k:
            checkpoints.append(i + 1)
            counter, k = 0, max(k - shrink, shortest)
    return checkpoints


def model_objective(model, y, loss):
    """z -> (loss, d loss / dz, misclassified) for one example of `model` with label y."""
    def f(z):
        value, grad, pred = model.loss_and_grad(z[None], np.array([y]), loss)
        return value[0], grad[0], pred[0] != y
    return f


def ref_apgd_one(f, x, start, eps, num_steps, norm, rho=0.75):
    """APGD for one example and objective f(z) -> (value, gradient, success), following the
    reference implementation's loop (fra31/auto-attack `attack_single_run`) in plain NumPy: a
    loss history indexed as the reference indexes it (its first window reads the unwritten last
    entry, 0), a halving flag that starts at 1, the oscillation test `<=` and, after a halving,
    no change to the history."""
    k, shrink, shortest = ref_schedule(num_steps)
    eta = 2.0 * eps
    x_old = x_cur = start
    f_cur, g_cur, success = f(start)
    x_max, f_max, g_max = start, f_cur, g_cur
    out_x, out_success, out_value = start, success, f_cur
    history = np.zeros(num_steps, np.float32)
    counter, f_max_at_last_check, reduced_last = 0, f_max, True
    for i in range(num_steps):
        momentum_term, x_old = x_cur - x_old, x_cur
        alpha = 1.0 if i == 0 else 0.75
        z = ref_project(x_cur + eta * ref_direction(g_cur, norm), x, eps, norm)
        x_cur = ref_project(x_cur + alpha * (z - x_cur) + (1 - alpha) * momentum_term, x, eps, norm)
        f_cur, g_cur, success = f(x_cur)
        history[i] = f_cur
        if (success and not out_success) or (success == out_success and f_cur > out_value):
            out_x, out_success, out_value = x_cur, success, f_cur
        if f_cur > f_max:
            x_max, f_max, g_max = x_cur, f_cur, g_cur
        counter += 1
        if counter == k:
            increases = sum(history[i - c] > history[i - c - 1] for c in range(k))
            reduced_last = increases <= k * rho or (not reduced_last and f_max_at_last_check >= f_max)
            f_max_at_last_check = f_max
            if reduced_last:
                eta /= 2
                x_cur, g_cur = x_max, g_max
            counter, k = 0, max(k - shrink, shortest)
    return out_x


# --------------------------------------------------------------------------------------------
# Shared model, batch and compiled attacks (XLA compiles dominate the runtime, so tests share them)

DIM = 10
MODEL = NumpyMLP(11, DIM)
X = np.random.default_rng(2).uniform(size=(64, DIM)).astype(np.float32)
Y = np.random.default_rng(3).integers(0, NUM_CLASSES, 64).astype(np.int32)
PGD_STEPS, APGD_STEPS = 7, 25
ATTACK_FNS = {"fgsm": attacks.fgsm, "pgd": attacks.pgd, "apgd": attacks.apgd, "apgd_t": attacks.apgd_t,
              "fab_t": attacks.fab_t, "square": attacks.square, "fmn": attacks.fmn,
              "autoattack": attacks.autoattack}


def compiled(name, norm="linf", loss="ce", restarts=1, targeted=False):
    """jit(attack on MODEL) as a function of (x, y, key, eps, step_size), step_size unused by APGD;
    built once per setting, so tests share the compiled programs."""
    return _compiled(name, norm, loss, restarts, targeted)


@functools.lru_cache(maxsize=None)
def _compiled(name, norm, loss, restarts, targeted):
    fn = ATTACK_FNS[name]
    if name == "fgsm":
        attack = lambda x, y, key, eps, step: fn(MODEL.jax_logits, x, y, None, eps=eps,
                                                 step_size=step, norm=norm, loss=loss,
                                                 targeted=targeted)
    elif name == "pgd":
        attack = lambda x, y, key, eps, step: fn(MODEL.jax_logits, x, y, key, eps=eps, step_size=step,
                                                 num_steps=PGD_STEPS, norm=norm, loss=loss,
                                                 restarts=restarts, targeted=targeted)
    else:
        attack = lambda x, y, key, eps, step: fn(MODEL.jax_logits, x, y, key, eps=eps,
                                                 num_steps=APGD_STEPS, norm=norm, loss=loss,
                                                 restarts=restarts)
    return jax.jit(attack)


def predicted(x):
    return np.argmax(np.asarray(MODEL.jax_logits(jnp.asarray(x))), -1)


def fast_key(seed):
    """An "rbg" key: XLA compiles threefry random bits slowly on CPU (~1.5 s per program), so
    tests that only need *some* key use rbg; the jit and training tests keep default keys."""
    return jax.random.key(seed, impl="rbg")


def random_logits_fn(seed, dim, num_classes=NUM_CLASSES):
    return NumpyMLP(seed, dim, num_classes=num_classes).jax_logits


# --------------------------------------------------------------------------------------------
# Constraints


CONSTRAINT_CASES = [  # (attack, norm, batch shape): several shapes, flat and image-like.
    ("fgsm", "linf", (3, 5)), ("fgsm", "l2", (2, 4, 4, 1)),
    ("pgd", "linf", (4, 2, 3, 1)), ("pgd", "l2", (1, 9)),
    ("apgd", "linf", (5, 7)), ("apgd", "l2", (3, 3, 2, 2)),
    ("apgd_t", "linf", (3, 6)), ("apgd_t", "l2", (2, 3, 2, 1)),
    ("fab_t", "linf", (4, 7)), ("fab_t", "l2", (3, 2, 2, 2)),
    ("square", "linf", (3, 16)), ("square", "l2", (2, 6, 5, 2)),
    ("fmn", "linf", (4, 7)), ("fmn", "l2", (3, 2, 2, 2)),
    ("autoattack", "linf", (3, 4, 4, 1)),
]


@pytest.mark.parametrize("name,norm,shape", CONSTRAINT_CASES)
def test_output_in_eps_ball_and_box(name, norm, shape):
    rng = np.random.default_rng(len(shape) * 10 + shape[0])
    # Many coordinates sit on the box's faces, so clipping is exercised.
    x = np.clip(rng.uniform(-0.3, 1.3, shape), 0, 1).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, shape[0]).astype(np.int32)
    logits_fn = random_logits_fn(shape[0], math.prod(shape[1:]))
    settings = {"fgsm": lambda eps: dict(random_start=True, step_size=1.25 * eps),
                "pgd": lambda eps: dict(step_size=eps / 3, num_steps=4),
                "apgd": lambda eps: dict(num_steps=6),
                "apgd_t": lambda eps: dict(num_steps=6, n_target_classes=2),
                "fab_t": lambda eps: dict(num_steps=6, n_target_classes=2),
                "square": lambda eps: dict(num_queries=30),
                "fmn": lambda eps: dict(num_steps=10),
                "autoattack": lambda eps: dict(num_steps=4, n_target_classes=2, num_queries=20)}[name]
    attack = jax.jit(lambda key, eps: ATTACK_FNS[name](logits_fn, x, y, key, eps=eps, norm=norm,
                                                       **settings(eps)))
    for eps in [0.0, 0.03, 0.3, 2.0]:
        x_adv = np.asarray(attack(fast_key(3), eps))
        delta = (x_adv - x).reshape(shape[0], -1)
        size = np.abs(delta).max(axis=1) if norm == "linf" else np.linalg.norm(delta, axis=1)
        assert x_adv.shape == x.shape and x_adv.dtype == np.float32
        assert np.all(size <= eps + BALL_TOL), (eps, size.max())
        assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
        if eps == 0.0:
            np.testing.assert_array_equal(x_adv, x)


def test_output_is_under_stop_gradient():
    def total(x):
        return jnp.sum(attacks.fgsm(MODEL.jax_logits, x, Y, None, eps=0.1))

    assert np.all(np.asarray(jax.grad(total)(jnp.asarray(X))) == 0)


# --------------------------------------------------------------------------------------------
# Randomness, vmap and jit


def test_pgd_deterministic_per_key_and_differs_across_keys():
    run = compiled("pgd")
    a, b, c = (np.asarray(run(X, Y, fast_key(k), 0.1, 0.02)) for k in (5, 5, 6))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


@pytest.mark.parametrize("name,norm", [("pgd", "l2"), ("apgd", "linf")])
def test_vmap_over_eps_grid_matches_python_loop(name, norm):
    run = compiled(name, norm)
    key = fast_key(4)
    eps_grid = np.array([0.0, 0.05, 0.1, 0.3, 1.0], np.float32)
    swept = np.asarray(jax.jit(jax.vmap(lambda e: run(X, Y, key, e, e / 4)))(eps_grid))
    looped = np.stack([np.asarray(run(X, Y, key, e, e / 4)) for e in eps_grid])
    if name == "pgd":
        np.testing.assert_allclose(swept, looped, atol=1e-5)
    else:  # Batched matmuls round differently; see assert_equivalent_results.
        for s, l in zip(swept, looped):
            assert_equivalent_results(s, l, Y, "ce")


def test_jit_compiles_once_across_eps_values():
    traces = []

    def logits_fn(z):
        traces.append(1)  # Runs only while tracing.
        return MODEL.jax_logits(z)

    attack = attacks.make_attack("pgd", eps=0.3, step_size=0.05, num_steps=3)
    run = jax.jit(lambda x, y, key, eps: attack(logits_fn, x, y, key, eps=eps, step_size=eps / 4))
    run(X, Y, fast_key(0), 0.1)
    traced = len(traces)
    assert traced > 0
    for eps in [0.2, 0.3, 0.0]:
        run(X, Y, fast_key(0), eps)
    assert len(traces) == traced


# --------------------------------------------------------------------------------------------
# Agreement with the references


@pytest.mark.parametrize("norm,loss,targeted", [
    ("linf", "ce", False), ("l2", "ce", False), ("linf", "margin", True)])
def test_fgsm_and_pgd_match_numpy_reference(norm, loss, targeted):
    key = fast_key(9)
    eps = 0.2 if norm == "linf" else 0.8
    sign = -1.0 if targeted else 1.0  # Targeted attacks descend the loss towards y.

    fgsm = compiled("fgsm", norm, loss, targeted=targeted)(X, Y, None, eps, eps)
    np.testing.assert_allclose(fgsm, ref_pgd(MODEL, X, Y, X, eps, eps, 1, norm, loss, sign), atol=1e-5)

    pgd = compiled("pgd", norm, loss, targeted=targeted)(X, Y, key, eps, eps / 4)
    start = ref_random_start(key, X, eps, norm)
    expected = ref_pgd(MODEL, X, Y, start, eps, eps / 4, PGD_STEPS, norm, loss, sign)
    np.testing.assert_allclose(pgd, expected, atol=1e-5)


@pytest.mark.parametrize("norm,loss,eps", [("linf", "ce", 0.2), ("linf", "dlr", 0.1), ("l2", "ce", 0.4)])
def test_apgd_matches_reference(norm, loss, eps):
    key = fast_key(10)
    y = predicted(X)  # Correct clean labels, so the attack has work to do on every example.
    x_adv = compiled("apgd", norm, loss)(X, y, key, eps, None)
    start = ref_boundary_start(key, X, eps, norm)
    expected = np.stack([ref_apgd_one(model_objective(MODEL, y[i], loss), X[i], start[i], eps,
                                      APGD_STEPS, norm) for i in range(len(X))])
    assert_equivalent_results(x_adv, expected, y, loss)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_apgd_step_size_rule_follows_the_reference_loop_exactly(norm):
    # White-box: one APGD run on piecewise-linear objectives offset − ‖z − c‖₁ (exact gradients,
    # values of both signs), where the iterates oscillate around c, so halvings, resets and both
    # conditions fire often. Every example must follow the reference loop to the same point.
    rng = np.random.default_rng(0)
    n, dim, eps, steps = 256, 3, 0.1 if norm == "linf" else 0.15, 20
    x = rng.uniform(0.2, 0.8, (n, dim)).astype(np.float32)
    center = (x + rng.uniform(-0.12, 0.12, (n, dim))).astype(np.float32)
    offset = rng.uniform(-0.15, 0.3, n).astype(np.float32)

    def objective(z):
        return offset - jnp.sum(jnp.abs(z - center), axis=1), jnp.zeros(n, bool)

    def ref_objective(i):
        return lambda z: (offset[i] - np.abs(z - center[i]).sum(), -np.sign(z - center[i]), False)

    key = fast_key(0)
    start = ref_boundary_start(key, x, eps, norm).astype(np.float32)
    actual = jax.jit(lambda k: _apgd_run(
        objective, jnp.asarray(x), k, eps, num_steps=steps, norm=norm, rho=0.75, clip_min=0.0,
        clip_max=1.0)[0])(key)
    expected = np.stack([ref_apgd_one(ref_objective(i), x[i], start[i], eps, steps, norm)
                         for i in range(n)])
    same = np.all(np.isclose(actual, expected, atol=1e-6), axis=1)
    # L∞ steps are exact; XLA sums L2 norms in another order than NumPy, which can flip a near-tie.
    assert same.mean() >= (1.0 if norm == "linf" else 0.98), np.flatnonzero(~same)


def test_apgd_checkpoints_follow_the_reference():
    # The reference's intervals: k_1 = max(int(0.22 N), 1), then k_{j+1} = max(k_j - s, m) with
    # s = max(int(0.03 N), 1) and m = max(int(0.06 N), 1); a checkpoint ends every interval.
    # N = 10: k_1 = 2, s = 1, m = 1 -> intervals 2, 1, 1, ... -> 2, 3, ..., 10.
    assert attacks.apgd_checkpoints(10) == list(range(2, 11))
    # N = 20: k_1 = 4, s = 1, m = 1 -> intervals 4, 3, 2, 1, 1, ... -> 4, 7, 9, 10, 11, ..., 20.
    assert attacks.apgd_checkpoints(20) == [4, 7, 9] + list(range(10, 21))
    # N = 100: k_1 = 22, s = 3, m = 6 -> intervals 22, 19, 16, 13, 10, 7, 6, 6 (the next, 105, is
    # past the end).
    assert attacks.apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    for num_steps in range(1, 301):
        assert attacks.apgd_checkpoints(num_steps) == ref_checkpoints(num_steps), num_steps


def test_dlr_loss_matches_definition():
    logits = np.random.default_rng(4).standard_normal((16, 5)).astype(np.float32)
    y = np.arange(16, dtype=np.int32) % 5
    srt = np.sort(logits, axis=1)
    others = np.where(np.eye(5, dtype=bool)[y], -np.inf, logits).max(axis=1)
    expected = -(logits[np.arange(16), y] - others) / (srt[:, -1] - srt[:, -3] + 1e-12)
    np.testing.assert_allclose(attacks.dlr_loss(jnp.asarray(logits), jnp.asarray(y)), expected, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Restarts, losses, labels


@pytest.mark.parametrize("name,loss", [("pgd", "ce"), ("pgd", "kl"), ("apgd", "ce")])
def test_restarts_keep_the_worst_restart_per_example(name, loss):
    # With KL the highest-loss restart is often not a misclassified one, which exercises the
    # "misclassified first" rule.
    key = fast_key(8)
    eps, step = 0.1, 0.025  # Weak enough that restarts disagree on some examples.
    y = predicted(X)
    multi = np.asarray(compiled(name, loss=loss, restarts=3)(X, y, key, eps, step))
    singles = np.stack([np.asarray(compiled(name, loss=loss)(X, y, k, eps, step))
                        for k in jax.random.split(key, 3)])
    correct_multi = predicted(multi) == y
    correct_singles = np.stack([predicted(s) == y for s in singles])
    assert np.all(correct_multi <= correct_singles.min(axis=0))
    assert correct_multi.mean() <= correct_singles.mean(axis=1).min()
    # Every example's result is one of its restarts' results.
    matches = np.all(np.isclose(singles, multi[None], atol=1e-6), axis=2)
    assert np.all(matches.any(axis=0))


def test_margin_kl_and_targeted_losses():
    key = fast_key(3)
    eps, step = 0.2, 0.05
    y = predicted(X)  # Clean accuracy 1.
    margin = compiled("pgd", "linf", "margin")(X, y, key, eps, step)
    assert np.mean(predicted(margin) == y) < 0.5

    clean_logits = MODEL.jax_logits(X)
    kl = lambda z: np.asarray(jnp.sum(jax.nn.softmax(clean_logits) * (
        jax.nn.log_softmax(clean_logits) - jax.nn.log_softmax(MODEL.jax_logits(z))), -1))
    start = ref_random_start(key, X, eps, "linf")
    x_kl = compiled("pgd", "linf", "kl")(X, y, key, eps, step)
    assert kl(x_kl).mean() > 5 * kl(start).mean() and kl(x_kl).mean() > 0.1

    target = (y + 1) % NUM_CLASSES
    prob_of_target = lambda z: np.asarray(jax.nn.softmax(MODEL.jax_logits(z)))[np.arange(len(y)), target]
    x_t = compiled("pgd", "linf", "margin", targeted=True)(X, target, key, eps, step)
    assert prob_of_target(x_t).mean() > prob_of_target(X).mean() + 0.3
    assert np.mean(predicted(x_t) == target) > 0.5


def test_factory_from_config_with_predicted_labels_and_overrides():
    config = ml_collections.ConfigDict({
        "name": "pgd", "eps": 0.3, "step_size": 0.1, "num_steps": PGD_STEPS, "norm": "linf",
        "random_start": True, "restarts": 1, "loss": "ce", "label_source": "predicted"})
    attack = attacks.make_attack(**config.to_dict())
    key = fast_key(1)
    np.testing.assert_array_equal(attacks.predicted_labels(MODEL.jax_logits, X), predicted(X))
    wrong_labels = np.zeros_like(Y)  # Ignored with label_source="predicted".
    x_adv = jax.jit(lambda x, y, key: attack(MODEL.jax_logits, x, y, key, eps=0.1, step_size=0.03))(
        X, wrong_labels, key)
    expected = compiled("pgd")(X, predicted(X), key, 0.1, 0.03)
    np.testing.assert_allclose(x_adv, expected, atol=1e-6)

    fgsm = attacks.make_attack("fgsm", eps=0.2)  # step_size defaults to eps, also when overridden.
    np.testing.assert_allclose(jax.jit(lambda x, y: fgsm(MODEL.jax_logits, x, y, None, eps=0.1))(X, Y),
                               compiled("fgsm")(X, Y, None, 0.1, 0.1), atol=1e-6)
    with pytest.raises(ValueError, match="step_size"):
        attacks.make_attack("apgd", eps=0.1, num_steps=3)(MODEL.jax_logits, X, Y, key, step_size=0.1)


# --------------------------------------------------------------------------------------------
# Validation


def _never_called(x):
    raise AssertionError("logits_fn must not run when settings are invalid")


BAD_CALLS = [
    (lambda f, x, y, k: attacks.pgd(f, x, y, k, eps=-0.1, step_size=0.1, num_steps=1), "eps=-0.1"),
    (lambda f, x, y, k: attacks.pgd(f, x, y, k, eps=0.1, step_size=0.1, num_steps=0), "num_steps=0"),
    (lambda f, x, y, k: attacks.pgd(f, x, y, k, eps=0.1, step_size=0.1, num_steps=1, norm="l1"), "norm='l1'"),
    (lambda f, x, y, k: attacks.pgd(f, x, y, k, eps=0.1, step_size=0.1, num_steps=1, loss="dlr"), "loss='dlr'"),
    (lambda f, x, y, k: attacks.pgd(f, x, y, k, eps=0.1, step_size=0.1, num_steps=1, restarts=0), "restarts=0"),
    (lambda f, x, y, k: attacks.pgd(f, x, y, k, eps=0.1, step_size=0.1, num_steps=1, restarts=2,
                                    random_start=False), "restarts=2"),
    (lambda f, x, y, k: attacks.pgd(f, x, y, None, eps=0.1, step_size=0.1, num_steps=1), "key=None"),
    (lambda f, x, y, k: attacks.pgd(f, x, y, k, eps=0.1, step_size=0.1, num_steps=1, loss="kl",
                                    targeted=True), "targeted=True"),
    (lambda f, x, y, k: attacks.pgd(f, x, y[:1], k, eps=0.1, step_size=0.1, num_steps=1), "batch axis"),
    (lambda f, x, y, k: attacks.fgsm(f, x, y, None, eps=float("nan")), "eps=nan"),
    (lambda f, x, y, k: attacks.fgsm(f, x, y, None, eps=0.1, clip_min=1.0, clip_max=0.0), "clip_min"),
    (lambda f, x, y, k: attacks.apgd(f, x, y, k, eps=0.1, num_steps=2, loss="margin"), "loss='margin'"),
    (lambda f, x, y, k: attacks.apgd(f, x, y, k, eps=0.1, num_steps=2, rho=1.5), "rho=1.5"),
    (lambda f, x, y, k: attacks.apgd(f, x, y, k, eps=0.1, num_steps=2.5), "num_steps=2.5"),
    (lambda f, x, y, k: attacks.make_attack("cw", eps=0.1), "name='cw'"),
    (lambda f, x, y, k: attacks.make_attack("pgd", eps=0.1, step_size=0.1, num_steps=1, steps=3), "steps"),
    (lambda f, x, y, k: attacks.make_attack("pgd", eps=0.1, num_steps=1), "step_size"),
    (lambda f, x, y, k: attacks.make_attack("pgd", eps=-1, step_size=0.1, num_steps=1), "eps=-1"),
    (lambda f, x, y, k: attacks.make_attack("fgsm", eps=0.1, label_source="model"), "label_source='model'"),
    (lambda f, x, y, k: attacks.make_attack("fgsm", eps=0.1, targeted=True, label_source="predicted"),
     "label_source='predicted'"),
    (lambda f, x, y, k: attacks.make_attack("apgd", eps=0.1, num_steps=5, step_size=0.1), "step_size"),
    (lambda f, x, y, k: attacks.apgd_t(f, x, y, k, eps=0.1, n_target_classes=0), "n_target_classes=0"),
    (lambda f, x, y, k: attacks.apgd_t(f, x, y, None, eps=0.1), "key=None"),
    (lambda f, x, y, k: attacks.make_attack("apgd_t", eps=0.1, loss="ce"), "loss"),
    (lambda f, x, y, k: attacks.make_attack("fab_t", eps=0.1, eta=0.5), "eta=0.5"),
    (lambda f, x, y, k: attacks.make_attack("fab_t", eps=0.1, beta=0.0), "beta=0.0"),
    (lambda f, x, y, k: attacks.make_attack("fab_t", eps=0.1, alpha_max=2), "alpha_max=2"),
    (lambda f, x, y, k: attacks.fab_t(f, x, y, None, eps=0.1, norm="l1"), "norm='l1'"),
    (lambda f, x, y, k: attacks.make_attack("square", eps=0.1, num_queries=0), "num_queries=0"),
    (lambda f, x, y, k: attacks.make_attack("square", eps=0.1, p_init=1.5), "p_init=1.5"),
    (lambda f, x, y, k: attacks.make_attack("square", eps=0.1, image_shape=(4, 4)), "image_shape=(4, 4)"),
    (lambda f, x, y, k: attacks.make_attack("square", eps=0.1, rescale_schedule=1), "rescale_schedule=1"),
    (lambda f, x, y, k: attacks.square(f, x, y, k, eps=0.1, image_shape=(3, 1, 1)), "image_shape=(3, 1, 1)"),
    (lambda f, x, y, k: attacks.square(f, x, y, k, eps=0.1, norm="l2"), "L2 Square"),
    (lambda f, x, y, k: attacks.make_attack("square", eps=0.1)(f, x, y, k, step_size=0.1), "step_size=0.1"),
    (lambda f, x, y, k: attacks.make_attack("autoattack", eps=0.1, num_queries=-5), "num_queries=-5"),
    (lambda f, x, y, k: attacks.autoattack(f, x, y, k, eps=-0.1), "eps=-0.1"),
]


@pytest.mark.parametrize("call,message", BAD_CALLS)
def test_bad_settings_raise_value_error_before_tracing(call, message):
    x = np.full((2, 4), 0.5, np.float32)
    y = np.zeros(2, np.int32)
    with pytest.raises(ValueError, match=re.escape(message)):
        call(_never_called, x, y, jax.random.key(0))


def test_target_counts_are_checked_against_the_model():
    x, y = np.zeros((2, 4), np.float32), np.zeros(2, np.int32)
    with pytest.raises(ValueError, match=re.escape("n_target_classes=4 is invalid for a model with 4 classes")):
        attacks.apgd_t(random_logits_fn(0, 4), x, y, jax.random.key(0), eps=0.1, n_target_classes=4)
    with pytest.raises(ValueError, match="at least 4 classes"):
        attacks.apgd_t(random_logits_fn(0, 4, num_classes=3), x, y, jax.random.key(0), eps=0.1,
                       n_target_classes=2)
    with pytest.raises(ValueError, match=re.escape("allowed values: 1 to 2")):
        attacks.fab_t(random_logits_fn(0, 4, num_classes=3), x, y, None, eps=0.1,
                      n_target_classes=3)


def test_dlr_needs_three_classes():
    logits_fn = random_logits_fn(0, 4, num_classes=2)
    with pytest.raises(ValueError, match="at least 3 classes"):
        attacks.apgd(logits_fn, np.zeros((2, 4), np.float32), np.zeros(2, np.int32), jax.random.key(0),
                     eps=0.1, num_steps=2, loss="dlr")


# --------------------------------------------------------------------------------------------
# Adversarial training


def test_adversarial_training_beats_natural_training_under_attack():
    (x, y), (x_test, y_test) = make_data(0, 512), make_data(1, 256)
    model, natural = train_mlp(x, y, jax.random.key(0))
    train_attack = attacks.make_attack("pgd", eps=0.15, step_size=0.05, num_steps=5)
    _, robust = train_mlp(x, y, jax.random.key(0), attack=train_attack)
    evaluate = attacks.make_attack("pgd", eps=0.15, step_size=0.02, num_steps=20)

    @jax.jit
    def robust_accuracy(params):
        logits_fn = lambda z: model.apply(params, z)
        x_adv = evaluate(logits_fn, x_test, y_test, jax.random.key(5))
        return jnp.mean(jnp.argmax(logits_fn(x_adv), -1) == y_test)

    natural_robust, adversarial_robust = float(robust_accuracy(natural)), float(robust_accuracy(robust))
    assert accuracy(lambda z: model.apply(robust, z), x_test, y_test) > 0.7
    assert adversarial_robust > 0.6
    assert adversarial_robust > natural_robust + 0.3, (natural_robust, adversarial_robust)
