"""The rules that decide how strong an attack is, each checked so that loosening it fails a test:
Square's acceptance (against its own shorter runs: a shared key makes a longer run extend a
shorter one), FAB's step (against an independent NumPy loop on fixed inputs: step bound,
overshoot and pull-back included) and FMN's ε rule and schedules (an independent NumPy loop).
APGD's step-size rule, checkpoints and restarts are checked
against a reference loop in test_attacks, the target order of APGD-T and FAB-T in
test_autoattack, FMN's minimal norms against a linear model's closed form in test_fmn."""

import jax.numpy as jnp
import numpy as np
import pytest

from sparse_robust import attacks, losses
from sparse_robust.attacks import fab
from test_attacks import NumpyMLP, fast_key

NUM_CLASSES = 5
DIM = 64  # 8×8 images for Square
MODEL = NumpyMLP(21, DIM, num_classes=NUM_CLASSES)
X = np.random.default_rng(5).uniform(size=(24, DIM)).astype(np.float32)
Y = np.argmax(np.asarray(MODEL.jax_logits(X)), -1).astype(np.int32)


def margins(x_adv):
    true_logit, other_logit = losses.margin_parts(MODEL.jax_logits(jnp.asarray(x_adv)),
                                                  jnp.asarray(Y))
    return np.asarray(true_logit - other_logit)


@pytest.mark.parametrize("norm, eps", [("linf", 0.03), ("l2", 0.3)])
def test_square_only_accepts_proposals_that_lower_the_margin(norm, eps):
    """Query t uses fold_in(key, t) and (without rescaling) the same window size whatever the
    budget, so the run with more queries continues the shorter one: per example the margin can
    only fall as the budget grows. Accepting a worse (or an equal) proposal breaks this."""
    found = [margins(attacks.square(MODEL.jax_logits, X, Y, fast_key(4), eps=eps, norm=norm,
                                    num_queries=queries, p_init=0.3, rescale_schedule=False,
                                    image_shape=(8, 8, 1)))
             for queries in (5, 20, 80)]
    for fewer, more in zip(found, found[1:]):
        alive = fewer > 0  # misclassified examples stop
        assert np.all(more[alive] <= fewer[alive])
    assert np.mean(found[-1] < found[0] - 1e-4) > 0.3  # and the search does lower it


# Steep enough that FAB's linearisation misleads and its step bound α_max binds on many points
# (on MODEL it never does within a few steps, so removing the bound would go unseen).
STEEP = NumpyMLP(21, DIM, num_classes=NUM_CLASSES, scale=10.0)
STEEP_Y = np.argmax(np.asarray(STEEP.jax_logits(X)), -1).astype(np.int32)


def numpy_fab_target(x, y, target, *, num_steps, norm, alpha_max=0.1, eta=1.05, beta=0.9):
    """FAB's search towards one target per row, written from the paper's update in NumPy with
    the model's analytic gradient (the projection is fab.project_to_hyperplane_in_box, checked
    against an LP in test_autoattack): (closest adversarial point, its norm) per row."""
    project = lambda p, w, b: np.asarray(fab.project_to_hyperplane_in_box(
        jnp.asarray(p), jnp.asarray(w), jnp.asarray(b), norm))
    size = lambda v: np.abs(v).max(1) if norm == "linf" else np.linalg.norm(v, axis=1)
    rows = np.arange(len(x))
    x1, best, best_norm = x.copy(), x.copy(), np.full(len(x), np.inf, np.float32)
    for _ in range(num_steps):
        h = np.tanh(x1 @ STEEP.w1 + STEEP.b1)
        z = h @ STEEP.w2
        value = z[rows, target] - z[rows, y]
        w = ((STEEP.w2[:, target] - STEEP.w2[:, y]).T * (1 - h ** 2)) @ STEEP.w1.T
        offset = np.sum(w * x1, 1) - value
        d1, d2 = project(x1, w, offset), project(x, w, offset)
        a1, a2 = np.maximum(size(d1), 1e-8), np.maximum(size(d2), 1e-8)
        alpha = np.clip(a1 / (a1 + a2), 0.0, alpha_max)[:, None]  # the step bound
        x1 = np.clip((x1 + eta * d1) * (1 - alpha) + (x + eta * d2) * alpha, 0.0, 1.0)
        adversarial = np.argmax(np.tanh(x1 @ STEEP.w1 + STEEP.b1) @ STEEP.w2, 1) != y
        distance = size(x1 - x)
        closer = adversarial & (distance < best_norm)
        best[closer], best_norm[closer] = x1[closer], distance[closer]
        x1 = np.where(adversarial[:, None], x + beta * (x1 - x), x1)  # pull back after success
    return best, best_norm


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_follows_an_independent_loop_step_by_step(norm):
    """FAB-T with one target equals the NumPy loop: any change to the step bound α_max, the
    overshoot η or the pull-back β moves the closest points it finds."""
    target = np.argsort(-np.asarray(STEEP.jax_logits(X)), 1)[:, 1]
    best, best_norm = numpy_fab_target(X, STEEP_Y, target, num_steps=20, norm=norm)
    eps = float(np.median(best_norm[np.isfinite(best_norm)]))
    x_adv = np.asarray(attacks.fab_t(STEEP.jax_logits, X, STEEP_Y, None, eps=eps, num_steps=20,
                                     norm=norm, n_target_classes=1))
    within = best_norm <= eps
    assert 0.2 < within.mean() < 1.0
    np.testing.assert_allclose(x_adv[within], best[within], atol=2e-4)
    np.testing.assert_array_equal(x_adv[~within], X[~within])


def numpy_fmn(model, x, y, *, num_steps, norm, alpha_init=1.0, alpha_final=0.01,
              gamma_init=0.05, gamma_final=0.001):
    """FMN (Pintor et al. 2021, Algorithm 1 as the authors' code runs it) in NumPy with the
    model's analytic gradient of the logit difference: the smallest adversarial norm per row."""
    dual = (lambda g: np.abs(g).sum(1)) if norm == "linf" else (lambda g: np.linalg.norm(g, axis=1))
    size = (lambda v: np.abs(v).max(1)) if norm == "linf" else (lambda v: np.linalg.norm(v, axis=1))
    worst = size(np.maximum(x, 1 - x))
    delta = np.zeros_like(x)
    eps = np.full(len(x), np.inf, np.float32)
    best_norm = np.full(len(x), np.inf, np.float32)
    found = np.zeros(len(x), bool)
    for k in range(num_steps):
        cosine = (1 + np.cos(np.pi * k / num_steps)) / 2
        alpha = alpha_final + (alpha_init - alpha_final) * cosine
        gamma = gamma_final + (gamma_init - gamma_final) * cosine
        loss, grad, predicted = model.loss_and_grad(x + delta, y, "margin")
        adversarial = predicted != y
        delta_norm = size(delta)
        best_norm = np.where(adversarial & (delta_norm < best_norm), delta_norm, best_norm)
        found |= adversarial
        eps = np.where(adversarial, np.minimum(eps * (1 - gamma), best_norm),
                       np.where(found, eps * (1 + gamma),
                                delta_norm + np.abs(loss) / (dual(grad) + 1e-12)))
        eps = np.minimum(eps, worst)
        delta = delta + alpha * grad / np.maximum(np.linalg.norm(grad, axis=1, keepdims=True),
                                                  1e-12)
        if norm == "linf":
            delta = np.clip(delta, -eps[:, None], eps[:, None])
        else:
            delta = delta * np.minimum(1, eps / np.maximum(np.linalg.norm(delta, axis=1), 1e-12))[:, None]
        delta = np.clip(x + delta, 0, 1) - x
    return best_norm


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fmn_follows_an_independent_loop(norm):
    """On a steep network (where FMN's ε rule and schedules decide what it finds, unlike a
    linear model whose boundary the first step reaches) the minimal norms equal the NumPy loop's:
    loosening the ε shrink, the γ or α schedule or the projection changes them."""
    expected = numpy_fmn(STEEP, X, STEEP_Y, num_steps=30, norm=norm)
    _, actual = attacks.fmn_min_norm(STEEP.jax_logits, X, STEEP_Y, norm=norm, num_steps=30)
    assert np.isfinite(expected).mean() > 0.8  # (+∞ where neither found a point: equal too)
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=2e-3)
