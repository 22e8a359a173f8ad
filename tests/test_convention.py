"""The one model convention: make_model_fn / init_variables on any flax module, the one adapter
(as_logits_fn), and one-line errors, raised while tracing, for a function of the wrong form."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_robust import convention, objectives, training


class NoTrainMLP(nn.Module):
    """A user's module: no ``train`` argument."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(5, name="hidden")(x.reshape((x.shape[0], -1))))
        return nn.Dense(3, name="output")(x)


class NoTrainBatchNorm(nn.Module):
    """Batch statistics but no ``train`` argument (they are always updated when mutable)."""

    @nn.compact
    def __call__(self, x):
        x = nn.BatchNorm(use_running_average=False, momentum=0.5, name="norm")(x)
        return nn.Dense(3, name="output")(x)


def _x(n=4, dim=6, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=(n, dim)), jnp.float32)


def test_module_without_train_initialises_and_runs_in_both_modes():
    model = NoTrainMLP()
    params, model_state = training.init_variables(model, jax.random.PRNGKey(0), _x(1))
    assert model_state == {} and set(params) == {"hidden", "output"}
    model_fn = training.make_model_fn(model)
    x = _x()
    expected = model.apply({"params": params}, x)
    for train in (False, True):
        logits, state = model_fn(params, model_state, x, train)
        np.testing.assert_array_equal(logits, expected)
        assert state == {}


def test_batch_statistics_of_a_module_without_train_update_only_in_train_mode():
    model = NoTrainBatchNorm()
    params, model_state = training.init_variables(model, jax.random.PRNGKey(0), _x(1))
    assert set(model_state) == {"batch_stats"}
    model_fn = training.make_model_fn(model)
    x = _x(8)
    _, new_state = model_fn(params, model_state, x, True)
    # momentum 0.5 from a zero mean: the running mean is half the batch mean.
    np.testing.assert_allclose(new_state["batch_stats"]["norm"]["mean"], 0.5 * x.mean(0),
                               rtol=1e-5)
    _, eval_state = model_fn(params, model_state, x, False)
    assert eval_state is model_state


def test_the_adapter_is_the_eval_mode_logits(tiny_conv_bn, numpy_init):
    model = tiny_conv_bn()
    x = jnp.asarray(np.random.default_rng(1).uniform(size=(2, 5, 5, 1)), jnp.float32)
    variables = numpy_init(model, x, 0)
    params, model_state = variables["params"], {"batch_stats": variables["batch_stats"]}
    model_fn = training.make_model_fn(model)
    logits_fn = convention.as_logits_fn(model_fn, params, model_state)
    np.testing.assert_array_equal(logits_fn(x), model.apply(variables, x, train=False))


def test_model_fn_returning_bare_logits_is_refused_while_tracing():
    model = NoTrainMLP()
    params, _ = training.init_variables(model, jax.random.PRNGKey(0), _x(1))
    bare = lambda p, s, x, train: model.apply({"params": p}, x)  # noqa: E731
    objective = objectives.Objective("natural")
    y = jnp.zeros(4, jnp.int32)
    with pytest.raises(TypeError) as err:  # eval_shape: traced only, nothing computed
        jax.eval_shape(lambda p: objective(bare, p, {}, _x(), y, None), params)
    message = str(err.value)
    assert "\n" not in message
    assert message == ("model_fn returned an array of shape (4, 3); training and evaluation take "
                       "model_fn(params, model_state, x, train) -> (logits, model_state) "
                       "(training.make_model_fn(module) builds one from a flax module).")


def test_logits_fn_returning_a_pair_is_refused_from_shapes():
    model = NoTrainMLP()
    params, _ = training.init_variables(model, jax.random.PRNGKey(0), _x(1))
    model_fn = training.make_model_fn(model)
    pair = lambda x: model_fn(params, {}, x, False)  # noqa: E731  the classic mistake
    with pytest.raises(TypeError) as err:
        convention.check_logits_fn(pair, _x())
    assert str(err.value) == (
        "logits_fn returned a tuple of 2 for a batch of 4; attacks take logits_fn(x) -> logits "
        "[batch, classes]; for a model_fn(params, model_state, x, train) -> (logits, model_state) "
        "pass sparse_robust.convention.as_logits_fn(model_fn, params, model_state).")
    assert convention.check_logits_fn(convention.as_logits_fn(model_fn, params, {}), _x()) == 3
