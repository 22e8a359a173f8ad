"""Tests for sparse_robust.diagnostics against independent numpy / lax references."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_robust import diagnostics


class TinyMLP(nn.Module):
    """6 -> 7 -> 5 -> 3 ReLU MLP with biases; flattens its input."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(7, name="dense_0")(x))
        x = nn.relu(nn.Dense(5, name="dense_1")(x))
        return nn.Dense(3, name="output")(x)


class ConvBlock(nn.Module):
    conv_kwargs: dict

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(name="conv_0", **self.conv_kwargs)(x)
        return nn.relu(nn.BatchNorm(use_running_average=not train)(x))


class TinyConvNet(nn.Module):
    conv_kwargs: dict

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = ConvBlock(self.conv_kwargs, name="block_1")(x, train)
        return nn.Dense(3, name="output")(x.reshape((x.shape[0], -1)))


def _random_variables(model, input_shape, seed):
    """Normal params (non-zero biases, so excluding them is tested), positive batch statistics."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1,) + input_shape))
    draw = {"params": rng.normal, "batch_stats": lambda size: rng.uniform(0.5, 1.5, size)}
    return {collection: jax.tree.map(lambda s, f=draw[collection]: jnp.asarray(f(size=s.shape),
                                                                                jnp.float32), tree)
            for collection, tree in shapes.items()}


def _mlp_variables(seed=0):
    model = TinyMLP()
    return model, _random_variables(model, (6,), seed)


def test_dense_spectral_norms_match_numpy():
    model, variables = _mlp_variables()
    norms = diagnostics.spectral_norms(model, variables, (6,), jax.random.key(1))
    assert set(norms) == {"dense_0", "dense_1", "output"}
    for name, value in norms.items():
        kernel = np.asarray(variables["params"][name]["kernel"], np.float64)
        np.testing.assert_allclose(value, np.linalg.norm(kernel, 2), rtol=1e-3)


def _conv_reference_matrix(kernel, input_shape, conv_kwargs):
    """Dense matrix of the bias-free convolution on `input_shape`, via jacfwd of lax directly."""
    def conv(x_flat):
        x = x_flat.reshape((1,) + input_shape)
        y = jax.lax.conv_general_dilated(
            x, kernel,
            window_strides=conv_kwargs.get("strides", (1, 1)),
            padding=conv_kwargs["padding"],
            rhs_dilation=conv_kwargs.get("kernel_dilation", (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=conv_kwargs.get("feature_group_count", 1),
            precision=jax.lax.Precision.HIGHEST)
        return y.reshape(-1)

    return np.asarray(jax.jacfwd(conv)(jnp.zeros(int(np.prod(input_shape)))), np.float64)


@pytest.mark.parametrize("conv_kwargs", [
    dict(features=4, kernel_size=(3, 3), padding="SAME"),
    dict(features=4, kernel_size=(3, 3), padding="VALID"),
    dict(features=4, kernel_size=(3, 3), padding="SAME", strides=(2, 2)),
    # A list-valued padding makes the module unhashable (the uncached compile path).
    dict(features=3, kernel_size=(2, 2), padding=[(1, 0), (0, 2)], strides=(2, 2)),
    dict(features=4, kernel_size=(3, 3), padding="SAME", kernel_dilation=(2, 2),
         feature_group_count=2),
])
def test_conv_spectral_norm_matches_dense_matrix(conv_kwargs):
    input_shape = (6, 6, 2)
    model = TinyConvNet(conv_kwargs)
    variables = _random_variables(model, input_shape, seed=1)
    assert "batch_stats" in variables

    norms = diagnostics.spectral_norms(model, variables, input_shape, jax.random.key(2),
                                       num_iters=300)
    assert set(norms) == {"block_1/conv_0", "output"}
    kernel = variables["params"]["block_1"]["conv_0"]["kernel"]
    matrix = _conv_reference_matrix(kernel, input_shape, conv_kwargs)
    np.testing.assert_allclose(norms["block_1/conv_0"], np.linalg.norm(matrix, 2), rtol=1e-3)
    # The output layer's input shape (the flattened feature map) was discovered correctly.
    output_kernel = np.asarray(variables["params"]["output"]["kernel"], np.float64)
    np.testing.assert_allclose(norms["output"], np.linalg.norm(output_kernel, 2), rtol=1e-3)


def test_fully_pruned_layer_has_zero_norm():
    model, variables = _mlp_variables()
    params = variables["params"]
    params = {**params, "dense_1": {**params["dense_1"],
                                    "kernel": jnp.zeros_like(params["dense_1"]["kernel"])}}
    norms = diagnostics.spectral_norms(model, {"params": params}, (6,), jax.random.key(0))
    assert norms["dense_1"] == 0.0
    assert diagnostics.lipschitz_upper_bound(norms) == 0.0


def test_lipschitz_bound_dominates_empirical_ratios():
    model, variables = _mlp_variables(seed=3)
    norms = diagnostics.spectral_norms(model, variables, (6,), jax.random.key(0))
    bound = diagnostics.lipschitz_upper_bound(norms)
    np.testing.assert_allclose(bound, np.prod(list(norms.values())), rtol=1e-6)

    rng = np.random.default_rng(4)
    x = rng.normal(size=(512, 6)).astype(np.float32)
    scales = np.exp(rng.uniform(-6.0, 1.0, size=(512, 1)))
    x_other = (x + scales * rng.normal(size=x.shape)).astype(np.float32)
    f = lambda z: model.apply(variables, z)  # noqa: E731
    ratios = (np.linalg.norm(np.asarray(f(x) - f(x_other), np.float64), axis=1)
              / np.linalg.norm(x.astype(np.float64) - x_other, axis=1))
    assert np.all(ratios <= bound * (1 + 1e-3))
    assert ratios.max() > 0  # the pairs actually exercise the network


def test_logit_margin_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(16, 5)).astype(np.float32)
    labels = rng.integers(0, 5, size=16)
    expected = [row[y] - np.delete(row, y).max() for row, y in zip(logits, labels)]
    got = diagnostics.logit_margin(jnp.asarray(logits), jnp.asarray(labels))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(got) > 0, logits.argmax(1) == labels)


@pytest.mark.parametrize("norm, ord_", [("linf", 1), ("l2", 2)])
def test_local_lipschitz_of_linear_model_is_dual_norm(norm, ord_):
    rng = np.random.default_rng(0)
    weights = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=4), jnp.float32)
    x = jnp.asarray(rng.uniform(size=(10, 2, 3)), jnp.float32)  # image-shaped, model flattens it
    labels = jnp.asarray(rng.integers(0, 4, size=10))

    def logits_fn(z):
        return z.reshape((z.shape[0], -1)) @ weights + bias

    got = diagnostics.local_lipschitz(logits_fn, x, labels, norm=norm)
    w, logits = np.asarray(weights), np.asarray(logits_fn(x))
    expected = []
    for row, y in zip(logits, np.asarray(labels)):
        others = row.copy()
        others[y] = -np.inf
        expected.append(np.linalg.norm(w[:, y] - w[:, others.argmax()], ord=ord_))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)


def _random_mask(params, seed):
    """Bernoulli(0.5) masks on the kernels, None on the biases."""
    rng = np.random.default_rng(seed)
    return {name: {"kernel": jnp.asarray(rng.random(layer["kernel"].shape) < 0.5), "bias": None}
            for name, layer in params.items()}


def test_weight_histograms_exclude_pruned_weights():
    _, variables = _mlp_variables()
    mask = _random_mask(variables["params"], seed=5)
    # Pruned weights get an outlying value: if counted, they would stretch the edges to 100.
    params = jax.tree.map(lambda m, p: p if m is None else jnp.where(m, p, 100.0),
                          mask, variables["params"], is_leaf=lambda m: m is None)
    histograms = diagnostics.weight_histograms(params, mask, bins=8)
    assert set(histograms) == {"dense_0", "dense_1", "output"}
    for name, hist in histograms.items():
        keep = np.asarray(mask[name]["kernel"])
        survivors = np.asarray(params[name]["kernel"])[keep]
        assert len(hist["counts"]) == 8 and len(hist["edges"]) == 9
        assert sum(hist["counts"]) == keep.sum()
        np.testing.assert_allclose([hist["edges"][0], hist["edges"][-1]],
                                   [survivors.min(), survivors.max()], rtol=1e-6)
        np.testing.assert_allclose(hist["remaining_fraction"], keep.mean())


def test_weight_histograms_without_mask_cover_all_kernels():
    _, variables = _mlp_variables()
    histograms = diagnostics.weight_histograms(variables["params"])
    assert set(histograms) == {"dense_0", "dense_1", "output"}
    for name, hist in histograms.items():
        assert sum(hist["counts"]) == variables["params"][name]["kernel"].size
        assert hist["remaining_fraction"] == 1.0


def test_compute_diagnostics_is_json_serializable_and_deterministic():
    model, variables = _mlp_variables()
    mask = _random_mask(variables["params"], seed=6)
    rng = np.random.default_rng(7)
    images = rng.uniform(size=(12, 6)).astype(np.float32)
    labels = rng.integers(0, 3, size=12)
    adversarial = np.clip(images + 0.1 * rng.normal(size=images.shape), 0, 1).astype(np.float32)

    def run(key):
        return diagnostics.compute_diagnostics(model, variables, mask, images, labels, key,
                                               adversarial_images=adversarial, norm="l2",
                                               num_iters=50)

    first = run(jax.random.key(8))
    json.dumps(first)
    assert json.dumps(first, sort_keys=True) == json.dumps(run(jax.random.key(8)), sort_keys=True)
    assert set(first) == {"spectral_norms", "lipschitz_upper_bound", "local_lipschitz_mean",
                          "margin_clean_mean", "margin_adversarial_mean", "weight_histograms"}

    # Everything is computed on the masked params.
    masked = jax.tree.map(lambda m, p: p if m is None else p * m, mask, variables["params"],
                          is_leaf=lambda m: m is None)
    masked_variables = {"params": masked}
    for name, value in first["spectral_norms"].items():
        kernel = np.asarray(masked[name]["kernel"], np.float64)
        np.testing.assert_allclose(value, np.linalg.norm(kernel, 2), rtol=1e-3)
    logits_fn = lambda z: model.apply(masked_variables, z)  # noqa: E731
    for field, x in (("margin_clean_mean", images), ("margin_adversarial_mean", adversarial)):
        logits = np.asarray(logits_fn(x))
        expected = np.mean([row[y] - np.delete(row, y).max()
                            for row, y in zip(logits, np.asarray(labels))])
        np.testing.assert_allclose(first[field], expected, rtol=1e-5, atol=1e-6)
    local = diagnostics.local_lipschitz(logits_fn, images, labels, norm="l2")
    np.testing.assert_allclose(first["local_lipschitz_mean"], float(np.mean(local)), rtol=1e-5)
    assert sum(first["weight_histograms"]["dense_0"]["counts"]) == int(
        np.sum(mask["dense_0"]["kernel"]))

    dense = diagnostics.compute_diagnostics(model, variables, None, images, labels,
                                            jax.random.key(8), num_iters=50)
    assert dense["margin_adversarial_mean"] is None
    json.dumps(dense)


def test_bad_inputs_raise_clear_errors():
    model, variables = _mlp_variables()
    x, labels = jnp.zeros((4, 6)), jnp.zeros((4,), jnp.int32)
    with pytest.raises(ValueError, match="norm='l3'.*linf"):
        diagnostics.local_lipschitz(lambda z: z, x, labels, norm="l3")
    with pytest.raises(ValueError, match="num_iters=0"):
        diagnostics.spectral_norms(model, variables, (6,), jax.random.key(0), num_iters=0)
    with pytest.raises(ValueError, match="bins=0"):
        diagnostics.weight_histograms(variables["params"], bins=0)
    with pytest.raises(ValueError, match="norms is empty"):
        diagnostics.lipschitz_upper_bound({})
    with pytest.raises(ValueError, match="labels"):
        diagnostics.logit_margin(jnp.zeros((4, 3)), jnp.zeros((5,), jnp.int32))
    with pytest.raises(ValueError, match="adversarial_images"):
        diagnostics.compute_diagnostics(model, variables, None, x, labels, jax.random.key(0),
                                        adversarial_images=jnp.zeros((3, 6)))
