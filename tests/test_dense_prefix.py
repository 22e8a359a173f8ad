"""Tests for `attacks.dense_prefix` (a network's first dense layer read from its forward pass) and
for L∞ Square's incremental loop that uses it: found exactly where the logits are
rest(flat(x) @ kernel + bias), refused wherever that would be wrong, and Square's result equal to
its plain loop's on fixed keys."""

import importlib
import platform

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_robust import attacks, masks, models, training
from sparse_robust.attacks.dense_prefix import dense_prefix
from sparse_robust.convention import as_logits_fn

square_module = importlib.import_module("sparse_robust.attacks.square")
linux_x86 = pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64",
                               reason="the sparse kernel is built for Linux on x86-64 only")


def _logits_fn(model, x, model_fn=None, params=None):
    if params is None:
        params, state = training.init_variables(model, jax.random.key(0), x[:1])
    else:
        state = {}
    model_fn = model_fn or training.make_model_fn(model)
    return as_logits_fn(model_fn, params, state), params


def _images(n=16, shape=(28, 28, 1), seed=1):
    return jax.random.uniform(jax.random.key(seed), (n, *shape))


def test_an_mlp_is_its_first_kernel_then_the_rest():
    x = _images()
    logits_fn, params = _logits_fn(models.MLP(hidden_sizes=(30, 20)), x)
    prefix = dense_prefix(logits_fn, x)
    assert prefix is not None
    np.testing.assert_array_equal(prefix.kernel, params["dense_0"]["kernel"])
    np.testing.assert_array_equal(prefix.bias, params["dense_0"]["bias"])
    # rest(first(x)) is the forward pass, on other inputs than the ones it was found on too.
    for z in (x, _images(seed=2)):
        np.testing.assert_allclose(prefix.rest(prefix.first(z)), logits_fn(z), atol=1e-6)
    # and rest reads its argument: another first-layer output gives other logits.
    assert not np.allclose(prefix.rest(prefix.first(x) + 1.0), logits_fn(x), atol=1e-3)


def test_a_first_layer_without_bias_has_zero_bias():
    x = _images(shape=(16,))
    logits_fn, _ = _logits_fn(models.MLP(hidden_sizes=(8,), use_bias=False), x)
    prefix = dense_prefix(logits_fn, x)
    np.testing.assert_array_equal(prefix.bias, np.zeros(8))
    np.testing.assert_allclose(prefix.rest(prefix.first(x)), logits_fn(x), atol=1e-6)


class Normalised(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(nn.relu(nn.Dense(20)((x.reshape(len(x), -1) - 0.5) / 0.25)))


class InputSkip(nn.Module):
    @nn.compact
    def __call__(self, x):
        flat = x.reshape(len(x), -1)
        return nn.Dense(10)(nn.relu(nn.Dense(20)(flat))) + nn.Dense(10)(flat)


class ScaledDense(nn.Dense):
    def __call__(self, inputs):
        return 2.0 * super().__call__(inputs)


class SubclassFirst(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(nn.relu(ScaledDense(20)(x.reshape(len(x), -1))))


class PerPixel(nn.Module):
    """A Dense on the channel axis of unflattened images: not a layer on flat(x)."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(nn.relu(nn.Dense(4)(x)).reshape(len(x), -1))


@pytest.mark.parametrize("model", [models.LeNet5(), Normalised(), InputSkip(), SubclassFirst(),
                                   PerPixel()], ids=lambda m: type(m).__name__)
def test_refused_where_the_logits_are_not_rest_of_a_first_dense_layer_on_flat_x(model):
    x = _images(n=4)
    logits_fn, _ = _logits_fn(model, x)
    assert dense_prefix(logits_fn, x) is None


def test_refused_for_a_function_outside_flax():
    kernel = jax.random.normal(jax.random.key(3), (784, 10))
    assert dense_prefix(lambda z: z.reshape(len(z), -1) @ kernel, _images(n=4)) is None


def test_refused_for_a_forward_pass_jitted_on_its_own():
    """jit replays its cached program without running the model's Python: a second trace would
    not see the first layer, so nothing may be assumed of it."""
    model, x = models.MLP(hidden_sizes=(8,)), _images(n=4)
    params = model.init(jax.random.key(0), x)
    apply = jax.jit(model.apply)
    assert dense_prefix(lambda z: apply(params, z), x) is None


@linux_x86
@pytest.mark.parametrize("first_density", [0.05, 0.5])
def test_through_sparse_execution_found_only_where_the_first_layer_runs_dense(first_density):
    """Sparse execution runs a layer from its nonzeros at <= 20 % density: then the layer is cheap
    already and is not a dense prefix; above it, the layer runs dense and the prefix is found,
    with the masked kernel, while the later (sparse) layers stay in `rest`."""
    from sparse_robust.models.sparse_execution import sparse_impls, sparse_model_fn
    model = models.MLP(hidden_sizes=(300, 100))
    x = _images()
    params, _ = training.init_variables(model, jax.random.key(0), x[:1])
    mask = masks.create_mask(params)
    named = masks.named_leaves(mask)
    densities = {name: first_density if "dense_0" in name else 0.05 for name in named}
    mask = masks.from_named_leaves(mask, {
        name: None if leaf is None else jax.random.uniform(jax.random.key(i), leaf.shape) < densities[name]
        for i, (name, leaf) in enumerate(named.items())})
    params = masks.apply_mask(params, mask)
    runs_sparse = first_density <= 0.2
    assert sparse_impls(mask) == {"dense_0": "sparse" if runs_sparse else "dense",
                                  "dense_1": "sparse", "output": "sparse"}
    logits_fn, _ = _logits_fn(model, x, sparse_model_fn(model, mask), params)
    prefix = dense_prefix(logits_fn, x)
    if runs_sparse:
        assert prefix is None
        return
    np.testing.assert_array_equal(prefix.kernel, params["dense_0"]["kernel"])
    np.testing.assert_allclose(prefix.rest(prefix.first(x)), logits_fn(x), atol=1e-5)


def _square(logits_fn, x, y, key, **settings):
    return jax.jit(lambda x, y, k: attacks.square(logits_fn, x, y, k, eps=0.05, **settings))(
        x, y, key)


@pytest.mark.parametrize("shape, num_queries", [((28, 28, 1), 400), ((6, 6, 3), 150)])
def test_square_on_a_dense_prefix_proposes_and_accepts_as_its_plain_loop(monkeypatch, shape,
                                                                         num_queries):
    """Same keys, same result as the loop that recomputes the whole forward pass per query; and the
    incremental loop is the one that ran. Loosening its acceptance rule or drawing other windows
    changes x_adv."""
    x = _images(n=32, shape=shape)
    logits_fn, _ = _logits_fn(models.MLP(hidden_sizes=(40, 20)), x)
    y = jnp.argmax(logits_fn(x), -1)
    ran = []
    incremental = square_module._linf_incremental
    monkeypatch.setattr(square_module, "_linf_incremental",
                        lambda *a, **k: ran.append(1) or incremental(*a, **k))
    settings = dict(num_queries=num_queries, p_init=0.3)
    fast = _square(logits_fn, x, y, jax.random.key(5), **settings)
    assert ran
    monkeypatch.setattr(square_module, "dense_prefix", lambda *a: None)
    plain = _square(logits_fn, x, y, jax.random.key(5), **settings)
    assert len(ran) == 1
    np.testing.assert_array_equal(fast, plain)
    broken = np.asarray(jnp.argmax(logits_fn(fast), -1) != y)
    assert 0 < broken.mean() < 1  # Something to compare: some examples broken, some not.
    assert np.max(np.abs(fast - x)) <= 0.05 + 1e-7


def test_square_keeps_the_box_and_stops_on_a_dense_prefix():
    """Every example misclassified from the start: the loop ends at once and returns the start."""
    x = _images(n=8)
    logits_fn, _ = _logits_fn(models.MLP(hidden_sizes=(10,)), x)
    wrong = (jnp.argmax(logits_fn(x), -1) + 1) % 10
    x_adv = _square(logits_fn, x, wrong, jax.random.key(0), num_queries=50)
    assert np.all((x_adv >= 0) & (x_adv <= 1))
    np.testing.assert_array_equal(jnp.argmax(logits_fn(x_adv), -1) != wrong, True)


@pytest.mark.parametrize("num_queries, p_init, rescale, side", [(5000, 0.8, False, 28),
                                                                (400, 0.3, True, 28),
                                                                (150, 0.3, True, 6)])
def test_the_incremental_loops_cover_the_schedule_in_groups_within_a_factor_two(
        num_queries, p_init, rescale, side):
    sides = square_module._side_lengths(
        attacks.square_schedule(num_queries, p_init, rescale), "linf", side, side)
    groups = square_module._phase_groups(sides)
    assert [first for _, first, _ in groups] == [0] + [end for _, _, end in groups[:-1]]
    assert groups[-1][2] == num_queries
    for largest, first, end in groups:
        assert largest == sides[first:end].max() <= 2 * sides[first:end].min()
    # Merging two neighbours would break the factor: the groups are as few as the rule allows.
    for (a, first, _), (_, _, end) in zip(groups, groups[1:]):
        assert a > 2 * sides[first:end].min()
    if num_queries == 5000:  # AutoAttack's schedule on 28×28 images: 3 loops.
        assert [largest for largest, _, _ in groups] == [25, 9, 4]


def test_square_on_a_dense_prefix_under_vmap_equals_a_loop():
    """ε grids and seeds are vmapped in sweeps: the incremental loop gives each mapped run what
    a call of its own gives."""
    x = _images(n=12)
    logits_fn, _ = _logits_fn(models.MLP(hidden_sizes=(20,)), x)
    y = jnp.argmax(logits_fn(x), -1)
    run = lambda eps, key: attacks.square(logits_fn, x, y, key, eps=eps, num_queries=120)
    eps, keys = jnp.array([0.02, 0.1]), jax.random.split(jax.random.key(6), 2)
    mapped = jax.jit(jax.vmap(run))(eps, keys)
    for i in range(2):
        np.testing.assert_array_equal(mapped[i], run(eps[i], keys[i]))
    assert not np.array_equal(mapped[0], mapped[1])
