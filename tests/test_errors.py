"""Errors that say the fix: one line each, with the exact shape below, raised before any compute
(the model functions here record every call made with concrete values, and there must be none)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_robust import attacks, evaluation, masks, objectives, pruning

B, D, C = 4, 6, 3


class Recorder:
    """A linear model that records every call it gets with concrete (not traced) inputs."""

    def __init__(self, pair=False):
        self.w = jnp.asarray(np.random.default_rng(0).normal(size=(D, C)), jnp.float32)
        self.pair, self.concrete_calls = pair, 0

    def logits(self, x):
        if not isinstance(x, jax.core.Tracer):
            self.concrete_calls += 1
        logits = x.reshape((x.shape[0], -1)) @ self.w
        return (logits, {}) if self.pair else logits

    def model_fn(self, params, model_state, x, train):
        return self.logits(x), model_state


def _data(low=0.0, high=1.0):
    rng = np.random.default_rng(1)
    x = rng.uniform(low, high, size=(B, D)).astype(np.float32)
    return x, rng.integers(0, C, B).astype(np.int32)


def _raises(call, exc=ValueError) -> str:
    with pytest.raises(exc) as err:
        call()
    message = str(err.value)
    assert "\n" not in message and "  " not in message
    return message


PGD = attacks.make_attack("pgd", eps=0.1, step_size=0.05, num_steps=2)


def test_one_hot_labels_name_the_fix_in_attacks_evaluator_and_objectives():
    model = Recorder()
    x, y = _data()
    one_hot = np.eye(C, dtype=np.float32)[y]
    expected = (f"{{name}} has shape ({B}, {C}): one-hot labels? {{name}} must hold integer class "
                f"labels of shape ({B},); pass argmax({{name}}, axis=-1).")
    assert _raises(lambda: PGD(model.logits, x, one_hot, jax.random.key(0))) == \
        expected.format(name="y")
    assert _raises(lambda: evaluation.Evaluator(model.model_fn).evaluate(
        {}, {}, x, one_hot, {"pgd": PGD}, jax.random.key(0))) == expected.format(name="labels")
    objective = objectives.Objective("natural")
    assert _raises(lambda: jax.eval_shape(
        lambda: objective(model.model_fn, {}, {}, x, jnp.asarray(one_hot), None))) == \
        expected.format(name="y")
    assert model.concrete_calls == 0


def test_float_labels_say_integers():
    x, y = _data()
    assert _raises(lambda: PGD(Recorder().logits, x, y.astype(np.float32), jax.random.key(0))) \
        == "y has dtype float32; class labels must be integers (e.g. y.astype(int32))."


def test_a_traced_pruning_rate_says_it_must_be_static():
    params = {"dense": {"kernel": jnp.arange(12.0).reshape(3, 4)}}
    mask = masks.create_mask(params)
    for scope in ("layerwise", "global"):
        message = _raises(lambda: jax.jit(
            lambda rate: pruning.magnitude_prune(params, mask, rate, scope=scope))(0.5))
        assert message == ("Pruning rate is a traced value (float32[]); a rate must be a static "
                           "Python number in [0, 1): pass it outside jax.jit/vmap or as a static "
                           "argument (static_argnums).")
    assert _raises(lambda: pruning.magnitude_prune(params, mask, 1.5)) == (
        "Pruning rate is 1.5; a rate is the fraction of the remaining weights to remove, a static "
        "Python number in [0, 1).")
    assert _raises(lambda: pruning.magnitude_prune(params, mask, {"dense": "half"})) == (
        "Pruning rate for layer 'dense' is 'half'; a rate is the fraction of the remaining "
        "weights to remove, a static Python number in [0, 1).")


def test_inputs_outside_the_attack_box_are_an_error_not_a_projection():
    model = Recorder()
    x, y = _data(-0.5, 2.0)  # e.g. a normalised dataset
    low, high = float(x.min()), float(x.max())
    box = (f"lies in [{low:.4g}, {high:.4g}], outside the attack's box [clip_min, clip_max] = "
           "[{lo:g}, {hi:g}]; give the attack the box your inputs live in (clip_min=, clip_max=) "
           "or rescale them.")
    assert _raises(lambda: PGD(model.logits, x, y, jax.random.key(0))) == \
        "x " + box.format(lo=0, hi=1)
    for name in ("fgsm", "apgd", "square", "fab_t", "autoattack"):
        settings = dict(eps=0.1, num_steps=2) if name in ("apgd", "fab_t") else dict(eps=0.1)
        if name == "square":
            settings = dict(eps=0.1, num_queries=2, image_shape=(2, 3, 1))
        attack = attacks.make_attack(name, **settings)
        assert _raises(lambda: attack(model.logits, x, y, jax.random.key(0))).startswith("x lies")
    # The box is a setting: the same inputs inside a declared box of [-1, 2] are attacked.
    wide = attacks.make_attack("pgd", eps=0.1, step_size=0.05, num_steps=2, clip_min=-1.0,
                               clip_max=2.0)
    assert model.concrete_calls == 0
    x_adv = wide(model.logits, x, y, jax.random.key(0))
    assert float(jnp.abs(x_adv - x).max()) <= 0.1 + 1e-6
    # The Evaluator checks its data against every attack's box before compiling anything.
    evaluator = evaluation.Evaluator(Recorder().model_fn)
    for call in (lambda: evaluator.evaluate({}, {}, x, y, {"pgd": PGD}, jax.random.key(0)),
                 lambda: evaluator.sweep({}, {}, x, y, PGD, [0.0, 0.1], jax.random.key(0)),
                 lambda: evaluator.adversarial_examples({}, {}, x, y, PGD, jax.random.key(0))):
        assert _raises(call) == "images " + box.format(lo=0, hi=1)
    assert not evaluator._programs


def test_a_logits_fn_returning_a_pair_names_the_convention_and_the_adapter():
    model = Recorder(pair=True)
    x, y = _data()
    message = _raises(lambda: PGD(model.logits, x, y, jax.random.key(0)), TypeError)
    assert message == (
        f"logits_fn returned a tuple of 2 for a batch of {B}; attacks take logits_fn(x) -> logits "
        "[batch, classes]; for a model_fn(params, model_state, x, train) -> (logits, model_state) "
        "pass sparse_robust.convention.as_logits_fn(model_fn, params, model_state).")
    assert re.search("as_logits_fn", _raises(
        lambda: attacks.make_attack("autoattack", eps=0.1)(model.logits, x, y, jax.random.key(0)),
        TypeError))
    assert model.concrete_calls == 0
