"""Tests for sparse_robust.pruning.inheritance against numpy references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparse_robust import masks, optim, pruning
from sparse_robust.pruning import inheritance
from sparse_robust.models import get_model


def mlp_params(seed, hidden=(6, 5), inputs=7, classes=3):
    """Dense params with biases: dense_0, dense_1, output."""
    rng = np.random.default_rng(seed)
    sizes = (inputs, *hidden, classes)
    names = [f"dense_{i}" for i in range(len(hidden))] + ["output"]
    return {name: {"kernel": jnp.asarray(rng.normal(size=(a, b)), jnp.float32),
                   "bias": jnp.asarray(rng.normal(size=b), jnp.float32)}
            for name, a, b in zip(names, sizes, sizes[1:])}


def random_mask(seed, params, density=0.4):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda m: jnp.asarray(rng.uniform(size=m.shape) < density),
                                  masks.create_mask(params))


def np_tree(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


def reference_inherit(small, mask, large, fill, fill_scale):
    """Numpy: fill everywhere, then the surviving small weights in the leading corner."""
    out = {}
    for layer, leaves in large.items():
        out[layer] = {}
        for leaf, big in leaves.items():
            big = np.asarray(big)
            value = np.zeros_like(big) if fill == "zeros" else fill_scale * big
            s = np.asarray(small[layer][leaf])
            corner = tuple(slice(0, d) for d in s.shape)
            alive = np.ones(s.shape, bool) if leaf == "bias" else np.asarray(mask[layer][leaf])
            value[corner] = np.where(alive, s, value[corner])
            out[layer][leaf] = value
    return out


@pytest.mark.parametrize("fill, fill_scale", [("zeros", 1.0), ("init", 0.5)])
def test_inherit_same_architecture_matches_numpy(fill, fill_scale):
    small, large = mlp_params(0), mlp_params(1)
    mask = random_mask(2, small)
    got = inheritance.inherit(small, mask, large, fill=fill, fill_scale=fill_scale)
    expected = reference_inherit(np_tree(small), np_tree(mask), np_tree(large), fill, fill_scale)
    for layer in expected:
        for leaf in expected[layer]:
            np.testing.assert_array_equal(np.asarray(got[layer][leaf]), expected[layer][leaf],
                                          err_msg=f"{layer}/{leaf}")
    # Surviving weights kept, pruned ones filled: the kernels differ exactly off the mask.
    k = np.asarray(got["dense_0"]["kernel"])
    m = np.asarray(mask["dense_0"]["kernel"])
    np.testing.assert_array_equal(k[m], np.asarray(small["dense_0"]["kernel"])[m])


@pytest.mark.parametrize("fill, fill_scale", [("zeros", 1.0), ("init", 2.0)])
def test_inherit_wider_places_weights_in_the_leading_slice(fill, fill_scale):
    small, large = mlp_params(0, hidden=(6, 5)), mlp_params(1, hidden=(12, 10))
    mask = random_mask(3, small)
    got = inheritance.inherit_wider(small, mask, large, fill=fill, fill_scale=fill_scale)
    expected = reference_inherit(np_tree(small), np_tree(mask), np_tree(large), fill, fill_scale)
    assert got["dense_0"]["kernel"].shape == (7, 12)      # input dim unchanged
    assert got["output"]["kernel"].shape == (10, 3)       # output dim unchanged
    for layer in expected:
        for leaf in expected[layer]:
            np.testing.assert_array_equal(np.asarray(got[layer][leaf]), expected[layer][leaf],
                                          err_msg=f"{layer}/{leaf}")


def test_zero_filled_wider_lenet_computes_the_small_sparse_network(numpy_init):
    """LeNet-5's first dense layer reads a flattened conv map: inheritance copies per position."""
    small_model, large_model = get_model("lenet-5"), get_model("lenet-5", width_multiplier=2.0)
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(5, 16, 16, 1)), jnp.float32)
    small = numpy_init(small_model, x[:1], 1)["params"]
    large = numpy_init(large_model, x[:1], 2)["params"]
    mask = jax.jit(lambda p: pruning.magnitude_prune(p, masks.create_mask(p), 0.7,
                                                     scope="global"))(small)
    flattened = inheritance.flattened_inputs(small_model, x[:1])
    assert flattened == {"dense_0": 2 * 2}  # 16 -> conv SAME, pool 8 -> conv VALID 4, pool 2

    # Jitted (one compilation instead of one per eager op): inheritance composes with jit.
    wide = jax.jit(functools.partial(inheritance.inherit_wider, flattened_inputs=flattened))(
        small, mask, large)
    apply = jax.jit(lambda model, params: model.apply({"params": params}, x), static_argnums=0)
    np.testing.assert_allclose(apply(large_model, wide),
                               apply(small_model, masks.apply_mask(small, mask)),
                               rtol=1e-5, atol=1e-5)
    # Numpy reference for the flattened kernel: block p, channel c -> row p * C_large + c.
    small_k = np.where(mask["dense_0"]["kernel"], small["dense_0"]["kernel"], 0).reshape(4, 16, 120)
    wide_k = np.asarray(wide["dense_0"]["kernel"]).reshape(4, 32, 240)
    np.testing.assert_array_equal(wide_k[:, :16, :120], small_k)
    assert not wide_k[:, 16:, :].any() and not wide_k[:, :, 120:].any()


def test_trainable_mask_and_frozen_entries_keep_their_values():
    small, large = mlp_params(0, hidden=(6, 5)), mlp_params(1, hidden=(12, 10))
    mask = random_mask(3, small)
    params = inheritance.inherit_wider(small, mask, large, fill="init")
    inherited = inheritance.trainable_mask(small, mask, large, "inherited")
    new = inheritance.trainable_mask(small, mask, large, "new")
    everything = inheritance.trainable_mask(small, mask, large)
    for layer in large:
        for leaf in large[layer]:
            expected = np.zeros(large[layer][leaf].shape, bool)
            corner = tuple(slice(0, d) for d in small[layer][leaf].shape)
            expected[corner] = True if leaf == "bias" else np.asarray(mask[layer][leaf])
            np.testing.assert_array_equal(inherited[layer][leaf], expected)
            np.testing.assert_array_equal(new[layer][leaf], ~expected)
            assert np.all(everything[layer][leaf])

    tx = optax.sgd(0.1)
    state = inheritance.create_train_state(params, {}, tx, new, jax.random.PRNGKey(0))
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, _ = optim.keep_pruned_at_zero(tx).update(grads, state.opt_state, state.params)
    stepped = optax.apply_updates(state.params, updates)
    for layer in params:
        for leaf in params[layer]:
            before, after = np.asarray(params[layer][leaf]), np.asarray(stepped[layer][leaf])
            frozen = np.asarray(inherited[layer][leaf])
            # The state does not zero untrainable entries; the step leaves them untouched.
            np.testing.assert_array_equal(np.asarray(state.params[layer][leaf]), before)
            np.testing.assert_array_equal(after[frozen], before[frozen])
            np.testing.assert_allclose(after[~frozen], before[~frozen] - 0.1, rtol=1e-6)


def test_clear_errors():
    small, large = mlp_params(0), mlp_params(1, hidden=(12, 10))
    mask = random_mask(0, small)
    with pytest.raises(ValueError, match="fill='ones'.*allowed values"):
        inheritance.inherit(small, mask, small, fill="ones")
    with pytest.raises(ValueError, match="which='some'.*allowed values"):
        inheritance.trainable_mask(small, mask, large, "some")
    with pytest.raises(ValueError, match="use inherit_wider"):
        inheritance.inherit(small, mask, large)
    with pytest.raises(ValueError, match="at least as long"):
        inheritance.inherit_wider(large, None, small)
    other = mlp_params(1, hidden=(6, 5, 4))
    with pytest.raises(ValueError, match=r"only in the large one \['dense_2/bias'"):
        inheritance.inherit_wider(small, mask, other)
    with pytest.raises(ValueError, match="mask does not have the structure"):
        inheritance.inherit(small, {"dense_0": {"kernel": None}}, small)
    with pytest.raises(ValueError, match="flattened_inputs names unknown layers"):
        inheritance.inherit_wider(small, mask, large, flattened_inputs={"conv_9": 4})
