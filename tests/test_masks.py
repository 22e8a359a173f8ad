"""Tests for sparse_robust.masks: structure, application, counting, checks, serialisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_robust import masks


@pytest.fixture
def mlp_params(tiny_mlp, numpy_init):
    return numpy_init(tiny_mlp(use_bias=True), jnp.zeros((1, 7)), seed=0)["params"]


@pytest.fixture
def conv_variables(tiny_conv_bn, numpy_init):
    return numpy_init(tiny_conv_bn(), jnp.zeros((1, 5, 5, 2)), seed=1)


def random_mask(params, seed, keep=0.6):
    """A mask with i.i.d. alive entries (numpy reference input)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda m: None if m is None else jnp.asarray(rng.random(m.shape) < keep),
        masks.create_mask(params), is_leaf=lambda x: x is None)


def flat_leaves(tree):
    """{'layer/leaf': value} for a two-level flax params dict, without using the library."""
    return {f"{layer}/{name}": leaf
            for layer, leaves in tree.items() for name, leaf in leaves.items()}


def test_create_mask_selects_kernels_only(mlp_params, conv_variables):
    for params in (mlp_params, conv_variables["params"]):
        mask = flat_leaves(masks.create_mask(params))
        for name, param in flat_leaves(params).items():
            if name.endswith("/kernel"):
                assert mask[name].dtype == jnp.bool_ and mask[name].shape == param.shape
                assert bool(jnp.all(mask[name]))
            else:  # biases and batch-norm scales/offsets
                assert mask[name] is None, name


def test_create_mask_custom_predicate(mlp_params):
    mask = masks.create_mask(mlp_params, prunable=lambda name, leaf: name.startswith("dense_0/"))
    assert sorted(masks.mask_leaves(mask)) == ["dense_0/bias", "dense_0/kernel"]
    assert mask["output"]["kernel"] is None
    with pytest.raises(ValueError, match="prunable"):
        masks.create_mask(mlp_params, prunable=lambda name, leaf: False)


def test_apply_mask_zeros_exactly_the_false_entries(mlp_params):
    params = jax.tree_util.tree_map(lambda p: p + 1.0, mlp_params)  # no accidental zeros
    mask = random_mask(params, seed=0)
    out = masks.apply_mask(params, mask)
    for name, param in flat_leaves(params).items():
        m, o = flat_leaves(mask)[name], np.asarray(flat_leaves(out)[name])
        assert o.dtype == param.dtype
        if m is None:
            np.testing.assert_array_equal(o, param)
        else:
            np.testing.assert_array_equal(o, np.where(np.asarray(m), np.asarray(param), 0.0))
            assert np.all(o[~np.asarray(m)] == 0.0) and np.all(o[np.asarray(m)] != 0.0)
    assert masks.apply_mask(params, None) is params


def test_apply_mask_zeros_non_finite_pruned_weights(mlp_params):
    params = jax.tree_util.tree_map(lambda p: jnp.full_like(p, jnp.nan), mlp_params)
    mask = random_mask(params, seed=1)
    kernel = np.asarray(masks.apply_mask(params, mask)["dense_1"]["kernel"])
    assert np.all(kernel[~np.asarray(mask["dense_1"]["kernel"])] == 0.0)


def test_counts_against_numpy(mlp_params):
    mask = random_mask(mlp_params, seed=2)
    arrays = {name: np.asarray(m) for name, m in flat_leaves(mask).items() if m is not None}
    alive = sum(int(a.sum()) for a in arrays.values())
    total = sum(a.size for a in arrays.values())
    assert masks.count(mask) == (alive, total)
    assert masks.weights_remaining(mask) == pytest.approx(alive / total)
    expected = {name.rsplit("/", 1)[0]: a.mean() for name, a in arrays.items()}
    assert masks.layer_weights_remaining(mask) == pytest.approx(expected)


@pytest.mark.parametrize("corrupt, message", [
    (lambda m: {k: v for k, v in m.items() if k != "output"}, "structure"),
    (lambda m: {**m, "extra": {"kernel": m["output"]["kernel"]}}, "structure"),
    (lambda m: {**m, "dense_0": {**m["dense_0"], "kernel": m["dense_0"]["kernel"].T}},
     r"'dense_0/kernel' has shape \(6, 7\).*\(7, 6\)"),
    (lambda m: {**m, "output": {"kernel": m["output"]["kernel"].astype(jnp.float32),
                                "bias": None}}, "'output/kernel' has dtype float32"),
    (lambda m: {**m, "output": {"kernel": m["output"]["kernel"].astype(jnp.int32),
                                "bias": None}}, "'output/kernel' has dtype int32"),
])
def test_check_mask_rejects_bad_masks(mlp_params, corrupt, message):
    mask = masks.create_mask(mlp_params)
    masks.check_mask(mlp_params, mask)  # the good one passes
    with pytest.raises(ValueError, match=message):
        masks.check_mask(mlp_params, corrupt(mask))


def test_is_subset(mlp_params):
    dense = masks.create_mask(mlp_params)
    sparse = random_mask(mlp_params, seed=3)
    sparser = jax.tree_util.tree_map(jnp.logical_and, sparse, random_mask(mlp_params, seed=4))
    assert masks.is_subset(sparse, dense) and masks.is_subset(sparser, sparse)
    assert masks.is_subset(sparse, sparse)
    assert not masks.is_subset(dense, sparse) and not masks.is_subset(sparse, sparser)
    other = masks.create_mask(mlp_params, prunable=lambda name, leaf: name.startswith("output/"))
    assert not masks.is_subset(other, dense)  # different prunable leaves


def test_numpy_round_trip_through_npz(mlp_params, tmp_path):
    mask = random_mask(mlp_params, seed=5)
    np.savez(tmp_path / "mask.npz", **masks.mask_to_numpy(mask))
    with np.load(tmp_path / "mask.npz") as saved:
        restored = masks.mask_from_numpy(mlp_params, dict(saved))
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(mask)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(mask)):
        assert a.dtype == jnp.bool_
        np.testing.assert_array_equal(a, b)
    arrays = masks.mask_to_numpy(mask)
    del arrays["output/kernel"]
    with pytest.raises(ValueError, match="output/kernel"):
        masks.mask_from_numpy(mlp_params, arrays)


def test_summary_table_mentions_every_layer(conv_variables):
    params = conv_variables["params"]
    mask = random_mask(params, seed=6)
    table = masks.summary_table(mask, params=params)
    for name, m in masks.mask_leaves(mask).items():
        line = next(row for row in table.splitlines() if row.startswith(name.rsplit("/", 1)[0]))
        assert f"{int(np.sum(m))}" in line.split() and f"{np.size(m)}" in line.split()
    alive, total = masks.count(mask)
    assert f"{alive / total:.2%}" in table.splitlines()[-2]  # the overall row


def test_masks_under_jit_and_vmap(mlp_params):
    mask = random_mask(mlp_params, seed=7)
    jitted = jax.jit(masks.apply_mask)(mlp_params, mask)
    for a, b in zip(jax.tree_util.tree_leaves(jitted),
                    jax.tree_util.tree_leaves(masks.apply_mask(mlp_params, mask))):
        np.testing.assert_array_equal(a, b)
    traced_mask = jax.jit(masks.create_mask)(mlp_params)
    assert jax.tree_util.tree_structure(traced_mask) == jax.tree_util.tree_structure(mask)

    stacked_masks = [random_mask(mlp_params, seed=s) for s in range(3)]
    stacked = jax.tree_util.tree_map(lambda *ms: jnp.stack(ms), *stacked_masks)
    batched = jax.vmap(masks.apply_mask, in_axes=(None, 0))(mlp_params, stacked)
    for i, m in enumerate(stacked_masks):
        one = masks.apply_mask(mlp_params, m)
        for a, b in zip(jax.tree_util.tree_leaves(batched), jax.tree_util.tree_leaves(one)):
            np.testing.assert_array_equal(a[i], b)
