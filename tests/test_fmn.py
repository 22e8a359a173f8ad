"""Tests for FMN (sparse_robust.attacks.fmn) and the minimal-norm evaluation: perturbations in
the box, minimal norms against the closed-form distance of a linear classifier to its decision
boundary, and robustness curves."""

import jax
import numpy as np
import pytest

from sparse_robust import attacks, evaluation

NUM_CLASSES = 3
DIM = 12


def linear_model(seed=0):
    """logits = x W + b, with the points' minimal distances to the boundary (L∞ and L2, box
    ignored) in closed form: min over j ≠ y of margin_j / ‖w_y − w_j‖_dual."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((DIM, NUM_CLASSES)).astype(np.float32)
    b = rng.standard_normal(NUM_CLASSES).astype(np.float32) * 0.1
    x = rng.uniform(0.35, 0.65, (40, DIM)).astype(np.float32)
    logits = x @ w + b
    y = np.argmax(logits, axis=1).astype(np.int32)

    def distance(norm):
        out = np.full(len(x), np.inf)
        for j in range(NUM_CLASSES):
            diff = w[:, y] - w[:, [j]]  # [DIM, N]: w_y − w_j per point
            margin = logits[np.arange(len(x)), y] - logits[:, j]
            dual = np.abs(diff).sum(0) if norm == "linf" else np.linalg.norm(diff, axis=0)
            with np.errstate(invalid="ignore", divide="ignore"):  # j = y: 0 / 0, not used
                out = np.where(j == y, out, np.minimum(out, margin / dual))
        return out

    return (lambda z: z @ w + b), x, y, distance


def norm_of(delta, norm):
    delta = delta.reshape(len(delta), -1)
    return np.abs(delta).max(1) if norm == "linf" else np.linalg.norm(delta, axis=1)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_minimal_norm_is_adversarial_in_the_box_and_not_below_the_closed_form(norm):
    logits_fn, x, y, distance = linear_model()
    exact = distance(norm)
    assert np.all(exact < 0.15 if norm == "linf" else exact < 0.3)  # the boundary is in the box
    x_adv, found = jax.jit(lambda x, y: attacks.fmn_min_norm(logits_fn, x, y, norm=norm,
                                                             num_steps=100))(x, y)
    x_adv, found = np.asarray(x_adv), np.asarray(found)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    # On a linear model FMN's ε rule puts the iterate exactly on the boundary, where a float tie
    # can keep it from crossing; most points cross.
    broken = np.isfinite(found)
    assert broken.mean() >= 0.8
    np.testing.assert_array_equal(x_adv[~broken], x[~broken])
    logits = np.asarray(logits_fn(x_adv[broken]))
    true = logits[np.arange(len(logits)), y[broken]]
    other = np.where(np.eye(NUM_CLASSES, dtype=bool)[y[broken]], -np.inf, logits).max(1)
    # Adversarial (FMN stops on the boundary: recomputed outside its program, a tie may flip).
    assert np.all(other >= true - 1e-5)
    np.testing.assert_allclose(norm_of(x_adv - x, norm)[broken], found[broken], rtol=1e-5,
                               atol=1e-6)  # ... at the returned norm
    assert np.all(found >= exact * (1 - 1e-4))  # no adversarial point is closer than the boundary
    # Strength: FMN gets within 1 % of the exact minimal norm on most points (a loosened step
    # size or ε rule does not).
    assert np.mean(found <= exact * 1.01) >= 0.8, np.sort(found / exact)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fmn_as_an_attack_stays_in_the_ball_and_breaks_only_points_within_eps(norm):
    logits_fn, x, y, distance = linear_model(1)
    exact = distance(norm)
    eps = float(np.median(exact))
    x_adv = np.asarray(jax.jit(lambda x, y: attacks.make_attack("fmn", eps=eps, norm=norm)(
        logits_fn, x, y, None))(x, y))
    assert np.all(norm_of(x_adv - x, norm) <= eps + 1e-6)
    # Moved = FMN found an adversarial point within ε (judged in its program: on the boundary
    # of a linear model a recomputation may flip a tie).
    broken = np.any(x_adv != x, axis=1)
    assert not np.any(broken & (exact > eps * (1 + 1e-4)))  # nothing beyond the boundary
    within = exact < 0.95 * eps
    assert broken[within].mean() >= 0.75  # and most points clearly within ε (ties aside)


def test_robustness_curve_from_minimal_norms():
    logits_fn, x, y, distance = linear_model(2)
    y = y.copy()
    y[:5] = (y[:5] + 1) % NUM_CLASSES  # wrong clean: norm 0
    model_fn = lambda params, state, z, train: (logits_fn(z), state)
    ev = evaluation.Evaluator(model_fn, batch_size=16)
    norms = ev.minimal_norms({}, {}, x, y, attacks.make_attack("fmn", eps=0.1, num_steps=50))
    assert np.all(norms[:5] == 0) and np.all(norms[5:] > 0)
    grid = np.linspace(0, 0.3, 31)
    curve = evaluation.robustness_curve(norms, grid)
    assert np.all(np.diff(curve) <= 0)  # monotone
    assert curve[0] == pytest.approx(35 / 40)  # ε = 0: clean accuracy
    median = evaluation.median_norm(norms)
    assert evaluation.robustness_curve(norms, [median])[0] <= 0.5
    # The curve at ε agrees with FMN run as a fixed-ε attack (the same search, so exactly).
    eps = float(grid[10])
    fixed = ev.evaluate({}, {}, x, y, {"fmn": attacks.make_attack("fmn", eps=eps, num_steps=50)},
                        jax.random.key(0))["fmn_accuracy"]
    assert curve[10] == pytest.approx(fixed)


def test_the_fmn_check_flags_points_autoattack_missed():
    assert evaluation.fmn_check(0.50, 0.50, 100).passed
    check = evaluation.fmn_check(0.45, 0.50, 100)
    assert not check.passed and "5 of 100" in check.detail and "missed" in check.detail
    assert evaluation.fmn_check(0.45, 0.50, 100, slack=0.05).passed


def test_the_engine_records_fmn_curves_and_checks_them_against_autoattack(
        tiny_config_file, load_config, tmp_path):
    """An "fmn" attack among the final evaluation's: each record carries its robustness curve
    (monotone, starting at clean accuracy, with AutoAttack's ε on the grid) and the check
    against AutoAttack's accuracy at that ε."""
    import ml_collections

    from experiments import main as cli
    from sparse_robust.runs import store
    from sparse_robust.runs.layout import Layout

    config = load_config(tiny_config_file(20))
    config.attacks["fmn"] = ml_collections.ConfigDict(
        {"name": "fmn", "eps": 0.1, "norm": "linf", "num_steps": 10, "label_source": "true"})
    config.attacks["aa"] = ml_collections.ConfigDict(
        {"name": "autoattack", "eps": 0.05, "norm": "linf", "num_steps": 2,
         "n_target_classes": 1, "num_queries": 5, "label_source": "true"})
    config.eval.attacks = "fmn,aa"
    config.prune.levels = 1
    path = str(tmp_path / "run")
    assert cli.run_and_report(config, path) == 0
    records = store.read_json(Layout(path).summary)
    assert records
    for record in records:
        curve = record["robustness_curves"]["fmn"]
        assert np.all(np.diff(curve["accuracy"]) <= 0) and 0.05 in curve["eps"]
        assert curve["accuracy"][0] == pytest.approx(record["clean_accuracy"])
        check = record["sanity_checks"]["fmn_fmn_finds_nothing_new"]
        at_eps = curve["accuracy"][curve["eps"].index(0.05)]
        assert check["passed"] == (at_eps >= record["robust_accuracy"]["aa"] - 1e-9)
