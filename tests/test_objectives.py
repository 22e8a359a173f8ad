"""Tests for sparse_robust.objectives against numpy losses and fixed-x_adv gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_robust import objectives, training
from sparse_robust.objectives import Objective

NUM_CLASSES = 4


def linear_model_fn(params, model_state, x, train):
    return x @ params["w"] + params["b"], model_state


def numpy_logits(params, x):
    return np.asarray(x, np.float64) @ np.asarray(params["w"], np.float64) + np.asarray(params["b"])


def numpy_log_softmax(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def numpy_ce(logits, y, smoothing=0.0):
    targets = np.eye(logits.shape[-1])[y] * (1 - smoothing) + smoothing / logits.shape[-1]
    return float(np.mean(-(targets * numpy_log_softmax(logits)).sum(-1)))


def numpy_kl(p_logits, q_logits):
    p_log, q_log = numpy_log_softmax(p_logits), numpy_log_softmax(q_logits)
    return float(np.mean((np.exp(p_log) * (p_log - q_log)).sum(-1)))


def gradient_step_attack(eps):
    """x + eps·∇x CE, clipped: unlike FGSM's sign, it depends differentiably on the params."""

    def attack(logits_fn, x, y, key):
        del key
        loss = lambda z: jnp.sum(objectives.cross_entropy(logits_fn(z), y))
        return jnp.clip(x + eps * jax.grad(loss)(x), 0.0, 1.0)

    return attack


@pytest.fixture
def problem():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(6, NUM_CLASSES)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=NUM_CLASSES), jnp.float32)}
    x = jnp.asarray(rng.uniform(size=(8, 6)), jnp.float32)
    y = jnp.asarray(rng.integers(0, NUM_CLASSES, size=8), jnp.int32)
    return params, x, y, jax.random.PRNGKey(3)


def adversarial_example(attack, params, x, y, key):
    """The attack run separately, on the eval-mode model, as the objective should."""
    return attack(lambda z: linear_model_fn(params, {}, z, False)[0], x, y, key)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_natural_loss_is_numpy_cross_entropy(problem, smoothing):
    params, x, y, key = problem
    loss, (state, metrics) = Objective("natural", label_smoothing=smoothing)(
        linear_model_fn, params, {}, x, y, key)
    logits = numpy_logits(params, x)
    assert float(loss) == pytest.approx(numpy_ce(logits, np.asarray(y), smoothing), rel=1e-5)
    assert float(metrics["accuracy"]) == pytest.approx(np.mean(logits.argmax(-1) == np.asarray(y)))
    assert state == {}


@pytest.mark.parametrize("weight, smoothing", [(0.5, 0.0), (0.5, 0.1), (0.3, 0.1)])
def test_mixed_loss_is_weighted_clean_plus_adversarial(problem, make_fgsm, weight, smoothing):
    params, x, y, key = problem
    attack = make_fgsm(0.1, random_start=True)  # random start: the key must reach the attack
    loss, (_, metrics) = Objective("mixed", attack, adv_weight=weight, label_smoothing=smoothing)(
        linear_model_fn, params, {}, x, y, key)
    x_adv = adversarial_example(attack, params, x, y, key)
    clean = numpy_ce(numpy_logits(params, x), np.asarray(y), smoothing)
    adv = numpy_ce(numpy_logits(params, x_adv), np.asarray(y), smoothing)
    assert adv > clean  # the attack did something
    assert float(loss) == pytest.approx((1 - weight) * clean + weight * adv, rel=1e-5)
    adv_correct = numpy_logits(params, x_adv).argmax(-1) == np.asarray(y)
    assert float(metrics["adv_accuracy"]) == pytest.approx(adv_correct.mean())


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_madry_loss_is_adversarial_cross_entropy(problem, make_fgsm, smoothing):
    params, x, y, key = problem
    attack = make_fgsm(0.1, random_start=True)
    loss, _ = Objective("madry", attack, label_smoothing=smoothing)(
        linear_model_fn, params, {}, x, y, key)
    x_adv = adversarial_example(attack, params, x, y, key)
    assert float(loss) == pytest.approx(
        numpy_ce(numpy_logits(params, x_adv), np.asarray(y), smoothing), rel=1e-5)


def test_trades_loss_is_clean_ce_plus_beta_kl(problem, make_fgsm):
    params, x, y, key = problem
    attack = make_fgsm(0.1)
    loss, _ = Objective("trades", attack, trades_beta=3.0)(linear_model_fn, params, {}, x, y, key)
    clean_logits = numpy_logits(params, x)
    adv_logits = numpy_logits(params, adversarial_example(attack, params, x, y, key))
    kl = numpy_kl(clean_logits, adv_logits)
    assert kl > 1e-3
    expected = numpy_ce(clean_logits, np.asarray(y)) + 3.0 * kl
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def reference_loss(name, clean_logits, adv_logits, y):
    """The objective's formula in jnp, for gradient references."""
    ce = lambda logits: jnp.mean(objectives.cross_entropy(logits, y))
    if name == "mixed":
        return 0.5 * ce(clean_logits) + 0.5 * ce(adv_logits)
    if name == "madry":
        return ce(adv_logits)
    return ce(clean_logits) + 6.0 * jnp.mean(objectives.kl_divergence(clean_logits, adv_logits))


@pytest.mark.parametrize("name", ["mixed", "madry", "trades"])
def test_gradient_does_not_flow_through_the_adversarial_example(problem, name):
    params, x, y, key = problem
    attack = gradient_step_attack(0.5)
    objective = Objective(name, attack)
    grads = jax.grad(lambda p: objective(linear_model_fn, p, {}, x, y, key)[0])(params)

    x_adv = adversarial_example(attack, params, x, y, key)  # a constant for the reference
    logits = lambda p, z: linear_model_fn(p, {}, z, True)[0]
    fixed = jax.grad(lambda p: reference_loss(name, logits(p, x), logits(p, x_adv), y))(params)
    through = jax.grad(lambda p: reference_loss(
        name, logits(p, x), logits(p, attack(lambda z: logits(p, z), x, y, key)), y))(params)
    for k in params:
        np.testing.assert_allclose(grads[k], fixed[k], rtol=1e-4, atol=1e-6)
        # The check has teeth: differentiating through the attack gives other gradients.
        assert not np.allclose(through[k], fixed[k], rtol=1e-3, atol=1e-4)


def test_batch_norm_normalises_clean_and_adversarial_apart(tiny_conv_bn, make_fgsm, numpy_init):
    model = tiny_conv_bn()
    model_fn = training.make_model_fn(model)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.uniform(size=(6, 5, 5, 2)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, size=6), jnp.int32)
    variables = numpy_init(model, x[:1], seed=0)
    params, state = variables.pop("params"), variables
    attack = make_fgsm(0.2)

    @jax.jit  # one compilation instead of many eager conv/batch-norm ops
    def objective_and_reference(params, state):
        loss, (new_state, _) = Objective("mixed", attack)(model_fn, params, state, x, y, None)
        x_adv = attack(lambda z: model_fn(params, state, z, False)[0], x, y, None)
        clean_logits, mid_state = model_fn(params, state, x, True)
        adv_logits, expected_state = model_fn(params, mid_state, x_adv, True)
        return loss, new_state, x_adv, clean_logits, adv_logits, expected_state

    loss, new_state, x_adv, clean_logits, adv_logits, expected_state = objective_and_reference(
        params, state)
    expected = 0.5 * numpy_ce(np.asarray(clean_logits, np.float64), np.asarray(y)) + \
        0.5 * numpy_ce(np.asarray(adv_logits, np.float64), np.asarray(y))
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    running_mean = lambda s: np.asarray(s["batch_stats"]["input_norm"]["mean"])
    np.testing.assert_allclose(running_mean(new_state), running_mean(expected_state), rtol=1e-6)
    # Two updates of the input norm's running mean (momentum 0.9), first clean then adversarial.
    batch_mean = lambda z: np.asarray(z).mean(axis=(0, 1, 2))
    expected_mean = 0.9 * (0.9 * running_mean(state) + 0.1 * batch_mean(x)) + \
        0.1 * batch_mean(x_adv)
    np.testing.assert_allclose(running_mean(new_state), expected_mean, rtol=1e-5)


def test_objective_is_hashable_and_jittable(problem, make_fgsm):
    params, x, y, key = problem
    objective = Objective("mixed", make_fgsm(0.1))
    assert hash(objective) == hash(Objective("mixed", objective.attack))
    jitted = jax.jit(lambda p: objective(linear_model_fn, p, {}, x, y, key)[0])
    assert float(jitted(params)) == pytest.approx(
        float(objective(linear_model_fn, params, {}, x, y, key)[0]), rel=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="fgsm-at"), r"'fgsm-at'.*natural.*mixed.*madry.*trades"),
    (dict(name="mixed"), "needs an attack"),
    (dict(name="trades"), "needs an attack"),
    (dict(adv_weight=1.5), r"adv_weight is 1\.5.*\[0, 1\]"),
    (dict(adv_weight=-0.1), r"adv_weight is -0\.1"),
    (dict(trades_beta=-1.0), r"trades_beta is -1\.0"),
    (dict(label_smoothing=1.0), r"label_smoothing is 1\.0.*\[0, 1\)"),
])
def test_bad_objectives_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Objective(**kwargs)
