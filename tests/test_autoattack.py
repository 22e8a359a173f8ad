"""Tests for AutoAttack and its new stages: APGD-T, FAB-T (and its projection), Square, the
batch-level `attacks.autoattack_with_flags` and the compacting dataset driver
`sparse_robust.attacks.autoattack.run_stages`. Independent references: an LP (scipy) and a
brute-force enumeration for FAB's projection and for minimal distances, the published Square
schedule, each stage run on its own, and every stage applied to every point (masked) for the
driver."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linprog

from sparse_robust import attacks, evaluation, losses
from sparse_robust.attacks import fab, passes
from sparse_robust.attacks.autoattack import default_bucket_sizes, run_stages
from test_attacks import NumpyMLP, fast_key

NUM_CLASSES = 5
DIM = 16  # Flat inputs, seen by Square as 4×4 images.
MODEL = NumpyMLP(21, DIM, num_classes=NUM_CLASSES)
X = np.random.default_rng(5).uniform(size=(48, DIM)).astype(np.float32)
Y = np.argmax(np.asarray(MODEL.jax_logits(X)), -1).astype(np.int32)  # Clean accuracy 1.
EPS = 0.08
SMALL = dict(num_steps=15, n_target_classes=3)  # Fast stage settings for the tests.


def predicted(logits_fn, x):
    return np.argmax(np.asarray(logits_fn(jnp.asarray(x))), -1)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply(attack, logits_fn, x, y, key):
    return attack(logits_fn, x, y, key)


def run(name, logits_fn=MODEL.jax_logits, x=X, y=Y, key=None, **settings):
    """make_attack(name, **settings) on a batch, jitted (one program per attack and model)."""
    attack = attacks.make_attack(name, **settings)
    return np.asarray(_apply(attack, logits_fn, x, y, fast_key(0) if key is None else key))


# --------------------------------------------------------------------------------------------
# Losses, targets, schedules


def test_targeted_dlr_loss_and_ranked_targets_match_definitions():
    logits = np.random.default_rng(0).standard_normal((20, 6)).astype(np.float32)
    y, t = np.arange(20) % 6, (np.arange(20) + 2) % 6
    top = np.sort(logits, axis=1)
    expected = -(logits[np.arange(20), y] - logits[np.arange(20), t]) / (
        top[:, -1] - 0.5 * (top[:, -3] + top[:, -4]) + 1e-12)
    np.testing.assert_allclose(losses.targeted_dlr_loss(jnp.asarray(logits), jnp.asarray(y),
                                                        jnp.asarray(t)), expected, rtol=1e-5)
    targets = np.asarray(attacks.parts.ranked_targets(lambda z: z, jnp.asarray(logits), 4))
    np.testing.assert_array_equal(targets, np.argsort(-logits, axis=1)[:, 1:5])


def published_square_p(iteration):
    """Andriushchenko et al. (2020) for 10,000 queries: p = 0.8 up to iteration 10, then halved
    after 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 iterations."""
    table = [(10, 0.8), (50, 0.4), (200, 0.2), (500, 0.1), (1000, 0.05), (2000, 0.025),
             (4000, 0.0125), (6000, 0.00625), (8000, 0.003125)]
    return next((p for last, p in table if iteration <= last), 0.0015625)


def test_square_schedule_is_the_published_one():
    np.testing.assert_allclose(attacks.square_schedule(10000),
                               [published_square_p(t) for t in range(10000)])
    # AutoAttack's 5000 queries follow the 10,000-query schedule without rescaling.
    np.testing.assert_allclose(attacks.square_schedule(5000, rescale_schedule=False),
                               [published_square_p(t) for t in range(5000)])
    # Rescaled to 1000 queries, every boundary falls at a tenth of its iteration: p halves
    # after iterations 1, 5, 20, 50, 100, 200, 400, 600 and 800.
    boundaries = [1, 5, 20, 50, 100, 200, 400, 600, 800]
    expected = [0.8 / 2 ** sum(t > b for b in boundaries) for t in range(1000)]
    np.testing.assert_allclose(attacks.square_schedule(1000), expected)
    np.testing.assert_allclose(attacks.square_schedule(1000, p_init=0.4), np.array(expected) / 2)


# --------------------------------------------------------------------------------------------
# FAB-T and its projection


def lp_min_linf(point, w, b):
    """min ‖d‖∞ s.t. w·(point + d) = b, 0 <= point + d <= 1 (None if infeasible), by LP."""
    dim = len(point)
    bounds = [(-p, 1 - p) for p in point] + [(0, None)]
    a_ub = np.block([[np.eye(dim), -np.ones((dim, 1))], [-np.eye(dim), -np.ones((dim, 1))]])
    res = linprog(np.r_[np.zeros(dim), 1.0], A_ub=a_ub, b_ub=np.zeros(2 * dim),
                  A_eq=np.r_[w, 0.0][None], b_eq=[b - w @ point], bounds=bounds, method="highs")
    return res.fun if res.status == 0 else None


def brute_min_l2(point, w, b):
    """min ‖d‖₂ s.t. w·(point + d) = b, 0 <= point + d <= 1 (None if infeasible), by trying every
    assignment of the coordinates to {lower bound, upper bound, free} (KKT: free ones move ∝ w)."""
    best = None
    for assignment in itertools.product((0, 1, 2), repeat=len(point)):
        fixed = np.array([a < 2 for a in assignment])
        d = np.where(fixed, np.array([0.0 if a == 0 else 1.0 for a in assignment]) - point, 0.0)
        need = b - w @ point - w[fixed] @ d[fixed]
        free_w = np.where(fixed, 0.0, w)
        if free_w @ free_w > 1e-12:
            d = d + need / (free_w @ free_w) * free_w
        elif abs(need) > 1e-9:
            continue
        z = point + d
        if z.min() >= -1e-9 and z.max() <= 1 + 1e-9 and abs(w @ z - b) < 1e-7:
            best = np.linalg.norm(d) if best is None else min(best, np.linalg.norm(d))
    return best


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_projection_matches_lp_and_brute_force(norm):
    rng = np.random.default_rng(1 if norm == "linf" else 2)
    n, dim = 150, 4
    points = rng.uniform(0, 1, (n, dim))
    points[rng.uniform(size=(n, dim)) < 0.2] = 0.0  # Coordinates on the box's faces.
    w = rng.standard_normal((n, dim))
    w[rng.uniform(size=(n, dim)) < 0.2] = 0.0
    b = (w * points).sum(1) + rng.normal(0, 1.0, n)  # Both sides; some hyperplanes miss the box.
    project = jax.jit(fab.project_to_hyperplane_in_box, static_argnames="norm")
    d = np.asarray(project(*(jnp.asarray(a, jnp.float32) for a in (points, w, b)), norm=norm),
                   np.float64)
    infeasible = 0
    for i in range(n):
        optimum = (lp_min_linf if norm == "linf" else brute_min_l2)(points[i], w[i], b[i])
        z = points[i] + d[i]
        if optimum is None:  # The box corner nearest the hyperplane.
            infeasible += 1
            toward = np.sign(w[i]) * np.sign(b[i] - w[i] @ points[i])
            corner = np.where(toward > 0, 1.0, np.where(toward < 0, 0.0, points[i]))
            np.testing.assert_allclose(z, corner, atol=1e-6)
            continue
        size = np.abs(d[i]).max() if norm == "linf" else np.linalg.norm(d[i])
        assert size == pytest.approx(optimum, abs=2e-5), i
        assert abs(w[i] @ z - b[i]) < 1e-4 and z.min() >= -1e-6 and z.max() <= 1 + 1e-6, i
    assert 10 < infeasible < n - 50  # Both cases are exercised.


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_t_finds_the_minimal_distance_on_a_linear_binary_model(norm):
    # On a linear two-class model the decision boundary is the hyperplane FAB linearises, so the
    # smallest adversarial perturbation within the box is a projection: the LP / brute force.
    rng = np.random.default_rng(3)
    dim = 6
    w = rng.standard_normal((dim, 2)).astype(np.float32)
    bias = np.array([0.0, -0.3], np.float32)
    logits_fn = lambda z: z @ w + bias
    x = rng.uniform(0.1, 0.9, (40, dim)).astype(np.float32)
    y = predicted(logits_fn, x).astype(np.int32)
    x_adv = run("fab_t", logits_fn, x, y, eps=10.0, norm=norm, num_steps=100, n_target_classes=1)
    assert np.all(predicted(logits_fn, x_adv) != y)
    for i in range(len(x)):
        normal = (w[:, 1 - y[i]] - w[:, y[i]]).astype(np.float64)
        offset = float(bias[y[i]] - bias[1 - y[i]])
        minimum = lp_min_linf if norm == "linf" else brute_min_l2
        optimum = minimum(x[i].astype(np.float64), normal, offset)
        found = np.abs(x_adv[i] - x[i]).max() if norm == "linf" else np.linalg.norm(x_adv[i] - x[i])
        assert optimum - 1e-5 <= found <= 1.01 * optimum + 1e-5, (i, found, optimum)


def test_fab_t_counts_only_adversarials_within_eps():
    x_far = run("fab_t", eps=10.0, **SMALL)
    distances = np.abs(x_far - X).max(axis=1)
    broken = predicted(MODEL.jax_logits, x_far) != Y
    assert broken.mean() > 0.9
    eps = float(np.median(distances[broken]))
    x_adv = run("fab_t", eps=eps, **SMALL)
    # FAB's search does not depend on ε: the same points, kept only where within ε.
    within = broken & (distances <= eps)
    np.testing.assert_array_equal(predicted(MODEL.jax_logits, x_adv) != Y, within)
    np.testing.assert_allclose(x_adv[within], x_far[within])
    np.testing.assert_array_equal(x_adv[~within], X[~within])


# --------------------------------------------------------------------------------------------
# APGD-T


def linear_model_with_an_unreachable_runner_up(seed=10, dim=8, n=40):
    """A linear 4-class model where class 0 wins, class 1 is always second but unreachable
    (z_1 = z_0 − 0.5 everywhere), class 2 ranks third and is reachable for some examples at
    ε = 0.3, and class 3 is far below. Returns (logits_fn, x, y, class-2 reachable [n])."""
    rng = np.random.default_rng(seed)
    a, v = rng.standard_normal(dim), rng.standard_normal(dim)
    x = rng.uniform(0.2, 0.8, (n, dim)).astype(np.float32)
    c = float((x @ v).max()) + 0.6  # z_2 − z_0 = v·x − c <= −0.6 < −0.5: class 2 ranks third.
    w = np.stack([a, a, a + v, a], axis=1).astype(np.float32)
    bias = np.array([0.0, -0.5, -c, -c - 5.0], np.float32)
    gain = np.sum(np.where(v > 0, np.minimum(0.3, 1 - x), np.minimum(0.3, x)) * np.abs(v), axis=1)
    reachable = x @ v + gain > c + 1e-3  # The most an ε = 0.3 L∞ move in the box can add.
    return (lambda z: z @ w + bias), x, np.zeros(n, np.int32), reachable


@pytest.mark.parametrize("name", ["apgd_t", "fab_t"])
def test_targeted_stages_attack_the_ranked_classes_in_turn(name):
    logits_fn, x, y, reachable = linear_model_with_an_unreachable_runner_up()
    assert 5 < reachable.sum() < len(x) - 5
    broken = {k: predicted(logits_fn, run(name, logits_fn, x, y, eps=0.3, num_steps=30,
                                          n_target_classes=k)) != y for k in (1, 2, 3)}
    # The runner-up cannot be reached (APGD-T's random start may break an example on its own).
    assert np.all(broken[1] <= reachable) and broken[1].sum() <= 2
    np.testing.assert_array_equal(broken[2], reachable)  # The third class, where it can.
    np.testing.assert_array_equal(broken[3], broken[2])


@pytest.mark.parametrize("name", ["apgd_t", "fab_t"])
def test_targeted_stages_push_towards_their_target(name):
    # As in the reference, a targeted run counts any misclassification as success; what makes
    # it targeted is its direction: towards the class ranked second (n_target_classes = 1).
    x_adv = run(name, eps=EPS, num_steps=20, n_target_classes=1)
    target = np.argsort(-np.asarray(MODEL.jax_logits(X)), axis=1)[:, 1]
    rows = np.arange(len(X))

    def gap(z):
        logits = np.asarray(MODEL.jax_logits(z))
        return logits[rows, target] - logits[rows, Y]

    moved = np.any(x_adv != X, axis=1)
    assert np.all(gap(x_adv)[moved] > gap(X)[moved])
    broken = predicted(MODEL.jax_logits, x_adv) != Y
    assert broken.mean() > 0.3
    assert np.mean(predicted(MODEL.jax_logits, x_adv)[broken] == target[broken]) >= 0.9


# --------------------------------------------------------------------------------------------
# Square: no gradients


def rounded_logits_fn(x):
    """Four classes from the sum of the inputs rounded to a grid of 1/4: gradient zero almost
    everywhere. Class 0 wins while the rounded sum exceeds 32."""
    total = jnp.sum(jnp.round(x.reshape(x.shape[0], -1) * 4) / 4, axis=-1)
    return jnp.stack([total - 32.0, jnp.zeros_like(total), jnp.full_like(total, -0.5),
                      jnp.full_like(total, -1.0)], axis=-1)


@jax.custom_vjp
def _no_gradient(x):
    return x


def _no_gradient_fwd(x):
    return x, None


def _no_gradient_bwd(_, g):
    raise AssertionError("the attack asked for a gradient")


_no_gradient.defvjp(_no_gradient_fwd, _no_gradient_bwd)

MASKED_X = np.random.default_rng(6).uniform(0.3, 0.9, (32, 64)).astype(np.float32)  # 8×8 images.
MASKED_Y = np.zeros(32, np.int32)
MASKED_EPS = 0.2


def test_square_never_differentiates_the_model():
    # A smooth model whose gradient raises (on the rounded model autodiff would skip the raising
    # rule: rounding's derivative is a symbolic zero).
    poisoned = lambda z: MODEL.jax_logits(_no_gradient(z))
    x_adv = run("square", poisoned, eps=EPS, num_queries=100)
    assert np.mean(predicted(MODEL.jax_logits, x_adv) != Y) > 0.3
    assert np.abs(x_adv - X).max() <= EPS + 1e-6


def test_square_is_deterministic_per_key_and_l2_respects_its_ball():
    a, b, c = (run("square", key=fast_key(k), eps=EPS, num_queries=60) for k in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
    x = np.random.default_rng(7).uniform(size=(6, 7, 6, 2)).astype(np.float32)  # NHWC, H != W.
    y = np.zeros(6, np.int32)
    logits_fn = NumpyMLP(8, x[0].size, num_classes=NUM_CLASSES).jax_logits
    x_adv = run("square", logits_fn, x, y, eps=0.5, norm="l2", num_queries=40)
    sizes = np.linalg.norm((x_adv - x).reshape(6, -1), axis=1)
    assert np.all(sizes <= 0.5 + 1e-5) and x_adv.min() >= 0 and x_adv.max() <= 1
    assert np.all(sizes > 0.1)  # The L2 start spends the budget.


# --------------------------------------------------------------------------------------------
# AutoAttack on one batch


STAGE_SETTINGS = dict(num_steps=10, n_target_classes=3, num_queries=60)


def test_autoattack_is_the_per_example_conjunction_of_its_stages():
    key = fast_key(8)
    x_adv, flags = jax.jit(lambda x, y, k: attacks.autoattack_with_flags(
        MODEL.jax_logits, x, y, k, eps=EPS, **STAGE_SETTINGS))(X, Y, key)
    flags = {name: np.asarray(v) for name, v in flags.items()}
    assert set(flags) == {"clean", *attacks.AUTOATTACK_STAGES}
    # Each stage run alone, with the documented key fold_in(key, i).
    stages = attacks.autoattack_stages(EPS, **STAGE_SETTINGS)
    alone = {name: predicted(MODEL.jax_logits, _apply(attack, MODEL.jax_logits, X, Y,
                                                      jax.random.fold_in(key, i))) == Y
             for i, (name, attack) in enumerate(stages.items())}
    robust = flags["clean"]
    for name in attacks.AUTOATTACK_STAGES:
        robust = robust & alone[name]
        np.testing.assert_array_equal(flags[name], robust)
        assert np.all(flags["square"] <= alone[name])  # Never above any stage.
    np.testing.assert_array_equal(predicted(MODEL.jax_logits, x_adv) == Y, flags["square"])
    assert np.abs(np.asarray(x_adv) - X).max() <= EPS + 1e-6
    # make_attack("autoattack") is the same attack, as a hashable static jit argument.
    np.testing.assert_array_equal(run("autoattack", key=key, eps=EPS, **STAGE_SETTINGS), x_adv)
    assert flags["apgd_ce"].mean() < 0.9 and flags["square"].mean() < flags["apgd_ce"].mean()


def test_on_a_gradient_masked_model_square_finds_what_the_gradient_stages_miss():
    assert np.all(predicted(rounded_logits_fn, MASKED_X) == MASKED_Y)
    # The rounded model's gradient is zero almost everywhere, and random ±ε moves (the APGD
    # starts) rarely shift its rounded sum below 32; Square's coordinated search does.
    # Vmapped over ε (traced in every stage): ε = 0 breaks nothing.
    settings = dict(num_steps=10, n_target_classes=3, num_queries=100)
    x_adv, flags = jax.jit(jax.vmap(lambda eps: attacks.autoattack_with_flags(
        rounded_logits_fn, MASKED_X, MASKED_Y, fast_key(9), eps=eps, **settings)))(
            jnp.array([0.0, MASKED_EPS]))
    flags = {name: np.asarray(v) for name, v in flags.items()}
    assert np.all(flags["square"][0]) and np.all(np.asarray(x_adv[0]) == MASKED_X)
    assert np.all(flags["fab_t"][1])  # APGD-CE, APGD-T and FAB-T break nothing...
    assert np.mean(flags["square"][1]) < 0.5  # ...Square breaks most.
    np.testing.assert_array_equal(predicted(rounded_logits_fn, x_adv[1]) == MASKED_Y, flags["square"][1])


# --------------------------------------------------------------------------------------------
# The compacting dataset driver


def stage_verdicts(num_points, num_stages, seed=0):
    """A fixed verdict per (stage, point): what a deterministic stage says about that point."""
    return np.random.default_rng(seed).uniform(size=(num_stages, num_points)) > 0.3


def make_stage_fn(verdicts, calls):
    """A stage that reads a point's verdict from its image (image = its index) and records calls."""
    def stage_fn(stage, x, y, key):
        calls.append((stage, x[:, 0].astype(int).copy(), jax.random.key_data(key)))
        return verdicts[stage, x[:, 0].astype(int)]
    return stage_fn


@pytest.mark.parametrize("batch_size,bucket_sizes", [(16, None), (10, (3, 7)), (64, (64,))])
def test_run_stages_compacts_and_matches_attacking_every_point(batch_size, bucket_sizes):
    n, stages = 90, ("a", "b", "c")
    images = np.arange(n, dtype=np.float32)[:, None].repeat(3, axis=1)
    labels = np.zeros(n, np.int32)
    clean = np.random.default_rng(1).uniform(size=n) > 0.2
    clean[0] = False  # So padding with point 0 (instead of a row of the chunk) would show.
    verdicts = stage_verdicts(n, len(stages))
    calls = []
    key = jax.random.key(3)
    results = run_stages(make_stage_fn(verdicts, calls), images, labels, clean, key,
                                    stages=stages, batch_size=batch_size, bucket_sizes=bucket_sizes)
    # Masked reference: every stage on every point, robust = clean & all verdicts so far.
    robust = clean
    for s, name in enumerate(stages):
        robust = robust & verdicts[s]
        np.testing.assert_array_equal(results[name], robust)
    buckets = set(default_bucket_sizes(batch_size) if bucket_sizes is None
                  else bucket_sizes) | {batch_size}
    before = {0: clean, 1: results["a"], 2: results["b"]}
    chunk_counter = {}
    for stage, rows, key_data in calls:
        assert len(rows) in buckets
        assert np.all(before[stage][rows])  # Never a point an earlier stage broke.
        real = len(set(rows))  # Distinct points in index order, then copies of the first.
        assert np.all(np.diff(rows[:real]) > 0) and np.all(rows[real:] == rows[0])
        chunk = chunk_counter.get(stage, 0)
        chunk_counter[stage] = chunk + 1
        expected = jax.random.fold_in(jax.random.fold_in(key, stage), chunk)
        np.testing.assert_array_equal(key_data, jax.random.key_data(expected))
    for stage in range(len(stages)):  # Each still-robust point exactly once per stage.
        rows = np.concatenate([r for s, r, _ in calls if s == stage])
        assert set(rows) == set(np.flatnonzero(before[stage]))
        assert len(rows) - len(set(rows)) < min(buckets)  # Padding only.


def test_run_stages_validates_its_arguments():
    ok = dict(stages=("a",), batch_size=4)
    args = (lambda *a: None, np.zeros((3, 2)), np.zeros(3, np.int32), np.ones(3, bool),
            jax.random.key(0))
    for kwargs, message in [(dict(batch_size=0), "batch_size=0"), (dict(stages=()), "stages"),
                            (dict(stages=("a", "a")), "stages"),
                            (dict(bucket_sizes=(8,)), "bucket_sizes")]:
        with pytest.raises(ValueError, match=message):
            run_stages(*args, **{**ok, **kwargs})
    with pytest.raises(ValueError, match="share N"):
        run_stages(args[0], args[1], args[2][:2], args[3], args[4], **ok)
    with pytest.raises(ValueError, match="expected"):
        run_stages(lambda *a: np.ones(2, bool), *args[1:], **ok)


def test_the_evaluator_runs_autoattack_stage_by_stage():
    """evaluation.Evaluator runs AutoAttack through run_stages: cumulative per-stage robustness,
    the same robust accuracy as the batch version (other keys: within a few images), and one
    program per stage and chunk size."""
    model_fn = lambda params, state, z, train: (MODEL.jax_logits(z) * params["scale"], state)
    x = np.concatenate([X, X[:12] * 0.9])
    y = np.concatenate([Y, (Y[:12] + 1) % NUM_CLASSES])  # Some clean mistakes.
    attack = attacks.make_attack("autoattack", eps=EPS, **STAGE_SETTINGS)
    evaluator = evaluation.Evaluator(model_fn, batch_size=32)
    result = evaluator.per_example({"scale": 1.0}, {}, x, y, {"aa": attack}, fast_key(0))
    clean, staged = result["clean"].correct, result["aa"]
    assert list(staged.stages) == list(attacks.AUTOATTACK_STAGES)
    previous = clean
    for stage in attacks.AUTOATTACK_STAGES:  # each stage only ever removes robust images
        assert not np.any(staged.stages[stage] & ~previous)
        previous = staged.stages[stage]
    np.testing.assert_array_equal(staged.correct, staged.stages["square"])
    _, flags = jax.jit(lambda x, y, k: attacks.autoattack_with_flags(
        MODEL.jax_logits, x, y, k, eps=EPS, **STAGE_SETTINGS))(x, y, fast_key(0))
    assert abs(staged.correct.mean() - np.asarray(flags["square"]).mean()) <= 3 / len(x)
    assert staged.correct.mean() < clean.mean()  # AutoAttack broke something
    for stage_attack in attacks.autoattack_stages(EPS, **STAGE_SETTINGS).values():
        programs = (evaluator._pass_programs(stage_attack) if passes.num_passes(stage_attack) > 1
                    else [evaluator.program(stage_attack)])
        assert programs[-1]._cache_size() >= 1  # the program that attacks ran
        for program in programs:  # the chunk sizes, no more (none per target)
            assert program._cache_size() <= 5
    summary = evaluator.evaluate({"scale": 1.0}, {}, x, y, {"aa": attack}, fast_key(0))
    assert summary["aa_accuracy"] == summary["aa/square_accuracy"] == staged.correct.mean()
    assert "aa_loss" not in summary  # no single adversarial point, no loss


def test_the_square_check_flags_a_gradient_masked_model():
    """On the rounded-input model only Square breaks points; the check says so. On an honest
    model Square finds (almost) nothing new."""
    settings = dict(num_steps=10, n_target_classes=3, num_queries=100)
    attack = attacks.make_attack("autoattack", eps=MASKED_EPS, **settings)
    model_fn = lambda params, state, z, train: (rounded_logits_fn(z), state)
    measured = evaluation.Evaluator(model_fn, batch_size=len(MASKED_X)).evaluate(
        {}, {}, MASKED_X, MASKED_Y, {"aa": attack}, fast_key(3))
    stages = {s: measured[f"aa/{s}_accuracy"] for s in attacks.AUTOATTACK_STAGES}
    check = evaluation.square_check(stages, len(MASKED_X))
    assert not check.passed and "gradient masking" in check.detail
    assert stages["fab_t"] == 1.0 and stages["square"] < 0.5  # gradients found nothing at all
    honest_model = lambda params, state, z, train: (MODEL.jax_logits(z), state)
    honest = evaluation.Evaluator(honest_model, batch_size=len(X)).evaluate(
        {}, {}, X, Y, {"aa": attacks.make_attack("autoattack", eps=EPS, **settings)},
        fast_key(3))
    assert evaluation.square_check({s: honest[f"aa/{s}_accuracy"]
                                    for s in attacks.AUTOATTACK_STAGES}, len(X), slack=0.05).passed
    with pytest.raises(ValueError, match="Square last"):
        evaluation.square_check({"apgd_ce": 0.5}, 10)


# --------------------------------------------------------------------------------------------
# Passes (targets × restarts) run only on the points still robust


@pytest.mark.parametrize("name, settings", [
    ("apgd_t", dict(num_steps=15, n_target_classes=3)),
    ("apgd_t", dict(num_steps=10, n_target_classes=2, restarts=2)),
    ("fab_t", dict(num_steps=15, n_target_classes=3)),
    ("apgd", dict(num_steps=10, restarts=3)),
])
def test_compacted_passes_give_the_one_program_result_per_example(name, settings):
    """Each pass on the points still robust only, with the start the one-program attack draws:
    per example, the same verdict as the attack run on the whole batch with the same key."""
    attack = attacks.make_attack(name, eps=EPS, **settings)
    logits_fn = MODEL.jax_logits
    for key in (fast_key(0), jax.random.key(1)):
        whole = jax.jit(lambda x, y, k: jnp.argmax(logits_fn(attack(logits_fn, x, y, k)), -1) == y)
        expected = np.asarray(whole(X, Y, key))
        seen = []
        actual = passes.compacted(attack, logits_fn, X, Y, key,
                                  on_pass=lambda index, rows: seen.append(rows))
        np.testing.assert_array_equal(actual, expected)
        assert 0 < expected.mean() < 1  # some points broken, some not: compaction did something
        assert len(seen) > passes.num_passes(attack) - 1 and sum(seen[1:]) < len(X) * (
            passes.num_passes(attack) - 1)


def _half_breaks_at_first_target():
    """4 classes, logits 10·x, label 0. Rows 0-3 sit 0.03 from class 1 (the 2nd-ranked class,
    so target 0) and break at ε = 0.05 (L∞); rows 4-7 are 0.3 from every other class."""
    near = np.array([0.5, 0.47, 0.1, 0.0], np.float32)
    far = np.array([0.5, 0.2, 0.1, 0.0], np.float32)
    x = np.stack([near] * 4 + [far] * 4)
    return (lambda z: 10.0 * z), x, np.zeros(8, np.int32)


@pytest.mark.parametrize("name", ["apgd_t", "fab_t"])
def test_no_target_runs_on_a_point_an_earlier_target_broke(name):
    logits_fn, x, y = _half_breaks_at_first_target()
    attack = attacks.make_attack(name, eps=0.05, num_steps=10, n_target_classes=3)
    seen = {}
    robust = passes.compacted(attack, logits_fn, x, y, fast_key(0),
                              on_pass=lambda index, rows: seen.setdefault(index, []).append(rows))
    np.testing.assert_array_equal(robust, [False] * 4 + [True] * 4)
    assert seen == {0: [8], 1: [4], 2: [4]}  # targets 2 and 3 see only the 4 robust rows
    stage_fn = jax.jit(lambda x, y, k: jnp.argmax(logits_fn(attack(logits_fn, x, y, k)), -1) == y)
    np.testing.assert_array_equal(np.asarray(stage_fn(x, y, fast_key(0))), robust)


def test_run_passes_attacks_each_row_until_it_breaks():
    """run_passes on a fake attack that breaks row i at pass i: pass p sees exactly the rows
    >= p (padded to a bucket), with the starts of pass p gathered for those rows."""
    x = np.arange(6, dtype=np.float32)[:, None]
    seen = []

    def pass_fn(xs, ys, start, index):
        seen.append((index, xs[:, 0].tolist(), start[:, 0].tolist()))
        return xs[:, 0] != index

    robust = passes.run_passes(pass_fn, lambda index: x * 10 + index, x, np.zeros(6, np.int32),
                               passes=4, buckets=[2, 4, 6])
    np.testing.assert_array_equal(robust, [False] * 4 + [True] * 2)
    assert seen[0] == (0, [0, 1, 2, 3, 4, 5], [0, 10, 20, 30, 40, 50])
    # 5 rows: a chunk of 4, then 1 padded to the smallest bucket with a copy of itself.
    assert [rows for index, rows, _ in seen if index == 1] == [[1, 2, 3, 4], [5, 5]]
    assert [rows for index, rows, _ in seen if index == 2] == [[2, 3, 4, 5]]
    assert seen[-2:] == [(3, [3, 4], [33, 43]), (3, [5, 5], [53, 53])]


def test_a_pass_keeps_its_chunk_size_while_few_rows_break():
    """A pass on rows that fill a bucket but for at most an eighth runs as one padded chunk of
    that bucket (its program is compiled already); more padding falls back to chunk_sizes."""
    assert passes.pass_chunk_sizes(97, [12, 25, 50, 100]) == [(100, 97)]
    assert passes.pass_chunk_sizes(100, [12, 25, 50, 100]) == [(100, 100)]
    assert passes.pass_chunk_sizes(80, [12, 25, 50, 100]) == [(50, 50), (25, 25), (12, 5)]
    assert passes.pass_chunk_sizes(5, [2, 4, 6]) == [(4, 4), (2, 1)]  # 6 would pad 1 > 5 // 8
    x = np.arange(16, dtype=np.float32)[:, None]
    seen = []

    def pass_fn(xs, ys, start, index):
        seen.append((index, len(xs)))
        return xs[:, 0] >= 1  # row 0 breaks at the first pass

    robust = passes.run_passes(pass_fn, lambda index: None, x, np.zeros(16, np.int32),
                               passes=2, buckets=[4, 8, 16])
    np.testing.assert_array_equal(robust, x[:, 0] >= 1)
    assert seen == [(0, 16), (1, 16)]  # 15 rows padded to 16, not 8 + 4 + 3 (padded to 4)
