"""Tests for sparse_robust.models: registry, shapes, initialisation, batch norm, widths, errors."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparse_robust.models import ResNet, VGG, WideResNet, available_models, get_model

MNIST_SHAPE = (28, 28, 1)
CIFAR_SHAPE = (32, 32, 3)
# The input each model was designed for (conv-2/4/6 follow Frankle & Carbin on CIFAR-10).
NATURAL_SHAPE = {
    "dense-300-100": (784,),
    "lenet-300-100": (784,),
    "lenet-5": MNIST_SHAPE,
    "conv-2": CIFAR_SHAPE,
    "conv-4": CIFAR_SHAPE,
    "conv-6": CIFAR_SHAPE,
    "vgg-16": CIFAR_SHAPE,
    "vgg-16-hydra": CIFAR_SHAPE,
    "resnet-18": CIFAR_SHAPE,
    "wide-resnet-28": CIFAR_SHAPE,
    "wrn-28-4": CIFAR_SHAPE,
    "wrn-28-10": CIFAR_SHAPE,
}
BN_MODELS = {"vgg-16", "vgg-16-hydra", "resnet-18", "wide-resnet-28", "wrn-28-4", "wrn-28-10"}
CONV_MODELS = sorted(set(NATURAL_SHAPE) - {"dense-300-100", "lenet-300-100"})


def _images(shape, batch, seed=0):
    return np.random.default_rng(seed).uniform(0.0, 1.0, (batch, *shape)).astype(np.float32)


def _variable_shapes(model, input_shape):
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *input_shape), jnp.float32))


def _numpy_variables(model, input_shape, seed=0):
    """He-scaled random variables with random BN statistics, built in numpy.

    The models' own initialisers compile one random kernel per parameter shape (tens of seconds
    for the ResNets on CPU); tests that are not about initialisation use these instead.
    """
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = math.prod(leaf.shape[:-1])
            value = rng.standard_normal(leaf.shape, dtype=np.float32) * math.sqrt(2.0 / fan_in)
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, leaf.shape)
        else:  # Biases, BN offsets and running means.
            value = rng.normal(0.0, 0.1, leaf.shape)
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, _variable_shapes(model, input_shape))


def _init(model, input_shape, seed=0):
    """The model's own initialisation, jitted (so the unused forward pass is never compiled).

    The "rbg" PRNG draws the same distributions as the default threefry one but compiles several
    times faster on CPU, and compiling dominates these tests' runtime.
    """
    key = jax.random.key(seed, impl="rbg")
    return jax.jit(model.init)(key, jnp.zeros((1, *input_shape), jnp.float32))


def _layer_leaves(params):
    """{'layer/path': {leaf_name: array}} for every layer holding parameters."""
    layers = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        keys = [entry.key for entry in path]
        layers.setdefault("/".join(keys[:-1]), {})[keys[-1]] = leaf
    return layers


# ---------------------------------------------------------------------------------------------
# Registry and every model


def test_registry_lists_every_model():
    assert sorted(NATURAL_SHAPE) == available_models()


@pytest.mark.parametrize("name", sorted(NATURAL_SHAPE))
def test_forward_shape_finite_and_output_layer_last(name):
    num_classes = 7
    model = get_model(name, num_classes=num_classes)
    variables = _numpy_variables(model, NATURAL_SHAPE[name])
    x = _images(NATURAL_SHAPE[name], batch=2)
    logits, state = model.apply(variables, x, train=False, capture_intermediates=True)
    assert logits.shape == (2, num_classes)
    assert logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    # The final layer is the Dense named `output`: its own output is the model's output.
    assert variables["params"]["output"]["kernel"].shape[-1] == num_classes
    np.testing.assert_array_equal(state["intermediates"]["output"]["__call__"][0], logits)


@pytest.mark.parametrize("name", sorted(NATURAL_SHAPE))
def test_batch_stats_collection_only_with_batch_norm(name):
    variables = _variable_shapes(get_model(name), NATURAL_SHAPE[name])
    expected = {"params", "batch_stats"} if name in BN_MODELS else {"params"}
    assert set(variables) == expected


def test_mlps_flatten_images_themselves():
    model = get_model("lenet-300-100")
    variables = _numpy_variables(model, (784,))
    images = _images(MNIST_SHAPE, batch=3)
    np.testing.assert_allclose(
        model.apply(variables, images), model.apply(variables, images.reshape(3, 784)), rtol=1e-6
    )


@pytest.mark.parametrize(
    "name, expected",
    [
        ("dense-300-100", {"dense_0", "dense_1", "output"}),
        ("lenet-5", {"conv_0", "conv_1", "dense_0", "dense_1", "output"}),
        ("conv-4", {"conv_0", "conv_1", "conv_2", "conv_3", "dense_0", "dense_1", "output"}),
        ("vgg-16", {f"conv_{i}" for i in range(13)} | {f"bn_{i}" for i in range(13)} | {"output"}),
        ("vgg-16-hydra", {f"conv_{i}" for i in range(13)} | {f"bn_{i}" for i in range(13)}
         | {"dense_0", "dense_1", "output"}),
    ],
)
def test_layer_names(name, expected):
    params = _variable_shapes(get_model(name), NATURAL_SHAPE[name])["params"]
    assert set(params) == expected


def test_resnet_layer_names():
    params = _variable_shapes(get_model("resnet-18"), CIFAR_SHAPE)["params"]
    blocks = {f"block_{stage}_{block}" for stage in range(1, 5) for block in (1, 2)}
    assert set(params) == {"stem_conv", "stem_bn", "output"} | blocks
    assert set(params["block_3_1"]) == {"conv_1", "bn_1", "conv_2", "bn_2", "shortcut_conv", "shortcut_bn"}
    assert set(params["block_3_2"]) == {"conv_1", "bn_1", "conv_2", "bn_2"}


# ---------------------------------------------------------------------------------------------
# Fully connected models and initialisation


def test_dense_300_100_has_no_biases_and_exact_parameter_count():
    params = _variable_shapes(get_model("dense-300-100"), (784,))["params"]
    leaves = jax.tree_util.tree_leaves_with_path(params)
    assert all(path[-1].key == "kernel" for path, _ in leaves)
    assert sum(leaf.size for _, leaf in leaves) == 784 * 300 + 300 * 100 + 100 * 10


def _glorot_fans(kernel):
    receptive_field = math.prod(kernel.shape[:-2])
    return kernel.shape[-2] * receptive_field, kernel.shape[-1] * receptive_field


@pytest.mark.parametrize("name, uniform", [("dense-300-100", True), ("lenet-5", True), ("conv-2", False)])
def test_glorot_initialisation(name, uniform):
    params = _init(get_model(name), NATURAL_SHAPE[name], seed=1)["params"]
    for layer, leaves in _layer_leaves(params).items():
        kernel = np.asarray(leaves["kernel"], np.float64)
        fan_in, fan_out = _glorot_fans(kernel)
        target_variance = 2.0 / (fan_in + fan_out)
        # Relative standard error of a sample variance: sqrt(Var(w^2)) / E[w^2] / sqrt(n), which is
        # sqrt(4/5) for a uniform and at most sqrt(2) for a (truncated) normal distribution.
        relative_error = (math.sqrt(0.8) if uniform else math.sqrt(2.0)) / math.sqrt(kernel.size)
        assert abs(np.mean(kernel**2) / target_variance - 1.0) < 5 * relative_error, layer
        if uniform:
            assert np.max(np.abs(kernel)) <= math.sqrt(6.0 / (fan_in + fan_out)) * (1 + 1e-6), layer


def test_lenet_300_100_has_zero_biases():
    params = _init(get_model("lenet-300-100"), (784,))["params"]
    for layer, size in [("dense_0", 300), ("dense_1", 100), ("output", 10)]:
        np.testing.assert_array_equal(params[layer]["bias"], np.zeros(size))
    count = sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))
    assert count == 784 * 300 + 300 * 100 + 100 * 10 + 300 + 100 + 10


# ---------------------------------------------------------------------------------------------
# Batch norm, on shallow and narrow members of each BN family (batch norm behaves the same at any
# depth and width; compiling the full-size networks would dominate the runtime).

BN_CASES = [  # (model, first conv, the batch norm applied to its output)
    (VGG(layers=(8, "M", 16, "M"), width_multiplier=1.0), ("conv_0",), ("bn_0",)),
    (ResNet(stage_sizes=(1, 1), width_multiplier=0.125), ("stem_conv",), ("stem_bn",)),
    (WideResNet(depth=10, widen_factor=1, width_multiplier=0.5), ("stem_conv",), ("block_1_1", "bn_1")),
]
BN_IDS = ["vgg", "resnet", "wide-resnet"]
BN_IMAGE_SHAPE = (16, 16, 3)


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _conv3x3_same(x, kernel):
    """Independent 'SAME' 3x3 cross-correlation in numpy (NHWC, HWIO)."""
    n, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((n, h, w, kernel.shape[-1]))
    for i in range(3):
        for j in range(3):
            out += padded[:, i : i + h, j : j + w, :] @ kernel[i, j]
    return out


@pytest.mark.parametrize("model, conv_path, bn_path", BN_CASES, ids=BN_IDS)
def test_training_updates_batch_stats_with_momentum(model, conv_path, bn_path):
    variables = _numpy_variables(model, BN_IMAGE_SHAPE)
    x = _images(BN_IMAGE_SHAPE, batch=4)
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    old, new = variables["batch_stats"], updates["batch_stats"]
    assert jax.tree_util.tree_structure(old) == jax.tree_util.tree_structure(new)
    for old_leaf, new_leaf in zip(jax.tree_util.tree_leaves(old), jax.tree_util.tree_leaves(new)):
        assert not np.allclose(old_leaf, new_leaf)
    # The first BN sees the first conv's output: running = 0.9 * running + 0.1 * batch statistic.
    kernel = np.asarray(_get(variables["params"], conv_path)["kernel"], np.float64)
    features = _conv3x3_same(x.astype(np.float64), kernel)
    old_stats, new_stats = _get(old, bn_path), _get(new, bn_path)
    for stat, batch_value in [("mean", features.mean(axis=(0, 1, 2))), ("var", features.var(axis=(0, 1, 2)))]:
        expected = 0.9 * old_stats[stat] + 0.1 * batch_value
        np.testing.assert_allclose(new_stats[stat], expected, rtol=1e-4, atol=1e-5, err_msg=stat)


@pytest.mark.parametrize("model, conv_path, bn_path", BN_CASES, ids=BN_IDS)
def test_eval_mode_is_per_example_and_deterministic(model, conv_path, bn_path):
    del conv_path, bn_path  # Shared parametrisation with the test above.
    variables = _numpy_variables(model, BN_IMAGE_SHAPE)
    x = _images(BN_IMAGE_SHAPE, batch=4)
    batched = model.apply(variables, x, train=False)
    np.testing.assert_array_equal(batched, model.apply(variables, x, train=False))
    singles = np.concatenate([model.apply(variables, x[i : i + 1], train=False) for i in range(4)])
    np.testing.assert_allclose(singles, batched, rtol=1e-4, atol=1e-5)
    # Control: in training mode the batch statistics do couple the examples.
    train_batched, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    train_single, _ = model.apply(variables, x[:1], train=True, mutable=["batch_stats"])
    assert not np.allclose(train_batched[:1], train_single, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Widths


def _input_features(input_shape):
    return input_shape[-1]  # Channels of an image, or features of a flat input.


@pytest.mark.parametrize("name", sorted(NATURAL_SHAPE))
def test_width_multiplier_doubles_hidden_widths_only(name):
    shape = NATURAL_SHAPE[name]
    base = _layer_leaves(_variable_shapes(get_model(name), shape)["params"])
    wide = _layer_leaves(_variable_shapes(get_model(name, width_multiplier=2), shape)["params"])
    assert base.keys() == wide.keys()
    for layer, leaves in base.items():
        is_output = layer == "output"
        for leaf_name, leaf in leaves.items():
            wide_shape = wide[layer][leaf_name].shape
            out_features = leaf.shape[-1] if is_output else 2 * leaf.shape[-1]
            if leaf_name == "kernel":
                in_features = leaf.shape[-2]
                if in_features != _input_features(shape):  # Only the first layer sees the input.
                    in_features *= 2
                assert wide_shape == (*leaf.shape[:-2], in_features, out_features), layer
            else:
                assert wide_shape == (out_features,), (layer, leaf_name)


def test_width_multiplier_rounds_and_keeps_at_least_one_unit():
    def hidden_widths(multiplier):
        params = _variable_shapes(get_model("dense-300-100", width_multiplier=multiplier), (784,))["params"]
        return params["dense_0"]["kernel"].shape[1], params["dense_1"]["kernel"].shape[1]

    assert hidden_widths(1.5) == (450, 150)
    assert hidden_widths(0.333) == (100, 33)
    assert hidden_widths(1e-3) == (1, 1)


# ---------------------------------------------------------------------------------------------
# Parameter counts from the architecture formulas


def _conv_params(k, c_in, c_out):
    return k * k * c_in * c_out


def _bn_params(c):
    return 2 * c  # scale and offset; running mean and variance live in batch_stats


def _counts(variables):
    return {
        collection: sum(leaf.size for leaf in jax.tree_util.tree_leaves(tree))
        for collection, tree in variables.items()
    }


def test_resnet_18_parameter_count():
    params, bn_channels, c_in = _conv_params(3, 3, 64) + _bn_params(64), 64, 64
    for stage, width in enumerate([64, 128, 256, 512]):
        for block in range(2):
            params += _conv_params(3, c_in, width) + _conv_params(3, width, width) + 2 * _bn_params(width)
            bn_channels += 2 * width
            if (stage > 0 and block == 0) or c_in != width:
                params += _conv_params(1, c_in, width) + _bn_params(width)
                bn_channels += width
            c_in = width
    params += 512 * 10 + 10
    counts = _counts(_variable_shapes(get_model("resnet-18"), CIFAR_SHAPE))
    assert counts == {"params": params, "batch_stats": 2 * bn_channels}
    assert abs(params - 11.17e6) < 0.01e6  # The usual quoted size of CIFAR ResNet-18.


def test_vgg_16_parameter_count():
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    params = sum(_conv_params(3, c_in, c_out) + _bn_params(c_out) for c_in, c_out in zip([3] + widths, widths))
    params += 512 * 10 + 10
    counts = _counts(_variable_shapes(get_model("vgg-16"), CIFAR_SHAPE))
    assert counts == {"params": params, "batch_stats": 2 * sum(widths)}


def test_vgg_16_hydra_parameter_count():
    """HYDRA's vgg16_bn: vgg-16's convs, then 512 x 2 x 2 -> 256 -> 256 -> 10 with biases."""
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    params = sum(_conv_params(3, c_in, c_out) + _bn_params(c_out) for c_in, c_out in zip([3] + widths, widths))
    params += (2048 * 256 + 256) + (256 * 256 + 256) + (256 * 10 + 10)
    variables = _variable_shapes(get_model("vgg-16-hydra"), CIFAR_SHAPE)
    assert _counts(variables) == {"params": params, "batch_stats": 2 * sum(widths)}
    assert variables["params"]["dense_0"]["kernel"].shape == (2048, 256)


def test_vgg_16_hydra_pools_four_times_and_averages_to_2x2():
    """32x32 reaches 2x2 after four VALID pools, where the adaptive pool is the identity; 28x28
    reaches 1x1 (28, 14, 7, 3, 1), which the adaptive pool repeats into 2x2."""
    model = get_model("vgg-16-hydra")
    for shape, spatial in [(CIFAR_SHAPE, 2), (MNIST_SHAPE, 1)]:
        variables = _numpy_variables(model, shape)
        _, state = model.apply(variables, _images(shape, 2), capture_intermediates=True)
        assert state["intermediates"]["bn_12"]["__call__"][0].shape == (2, spatial, spatial, 512)


@pytest.mark.parametrize("name, k", [("wrn-28-10", 10), ("wrn-28-4", 4)])
def test_wide_resnet_28_parameter_count(name, k):
    params, bn_channels, c_in = _conv_params(3, 3, 16), 0, 16
    for group, width in enumerate([16 * k, 32 * k, 64 * k]):
        for block in range(4):
            params += _bn_params(c_in) + _conv_params(3, c_in, width) + _bn_params(width)
            params += _conv_params(3, width, width)
            bn_channels += c_in + width
            if (group > 0 and block == 0) or c_in != width:
                params += _conv_params(1, c_in, width)
            c_in = width
    params += _bn_params(c_in) + c_in * 10 + 10
    bn_channels += c_in
    counts = _counts(_variable_shapes(get_model(name), CIFAR_SHAPE))
    assert counts == {"params": params, "batch_stats": 2 * bn_channels}


def test_wide_resnet_28_takes_widen_factor():
    def shapes(model):
        return jax.tree_util.tree_map(lambda leaf: leaf.shape, _variable_shapes(model, CIFAR_SHAPE))

    assert shapes(get_model("wide-resnet-28", widen_factor=4)) == shapes(get_model("wrn-28-4"))


@pytest.mark.parametrize("name", ["vgg-16", "vgg-16-hydra", "resnet-18", "wrn-28-4"])
def test_cifar_models_also_take_28x28_images(name):
    model = get_model(name)
    x = jnp.zeros((2, *MNIST_SHAPE), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    assert jax.eval_shape(model.apply, variables, x).shape == (2, 10)


# ---------------------------------------------------------------------------------------------
# Errors


def test_unknown_model_name_lists_known_models():
    with pytest.raises(ValueError, match="resnet-19") as error:
        get_model("resnet-19")
    for name in available_models():
        assert name in str(error.value)


def test_unknown_kwarg_names_it_and_the_accepted_fields():
    with pytest.raises(ValueError, match="dropout_rate") as error:
        get_model("resnet-18", dropout_rate=0.3)
    assert "width_multiplier" in str(error.value)
    assert "num_classes" in str(error.value)


def test_fields_fixed_by_the_name_cannot_be_overridden():
    with pytest.raises(ValueError, match="widen_factor.*fixed"):
        get_model("wrn-28-10", widen_factor=4)
    with pytest.raises(ValueError, match="use_bias.*fixed"):
        get_model("dense-300-100", use_bias=True)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 2.5}, "num_classes"),
        ({"width_multiplier": 0.0}, "width_multiplier"),
        ({"width_multiplier": -1.0}, "width_multiplier"),
        ({"widen_factor": 0}, "widen_factor"),
    ],
)
def test_bad_field_values(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        get_model("wide-resnet-28", **kwargs)


@pytest.mark.parametrize("name", CONV_MODELS)
def test_conv_nets_reject_flat_inputs(name):
    model = get_model(name)
    flat = jnp.zeros((2, math.prod(NATURAL_SHAPE[name])))
    with pytest.raises(ValueError, match=r"NHWC.*data\.flatten=False"):
        model.init(jax.random.key(0), flat)


@pytest.mark.parametrize("name, kwargs", [("lenet-5", {}), ("conv-2", {"width_multiplier": 0.25})])
def test_conv_impls_give_the_same_logits_and_train_steps(name, kwargs):
    """Every conv_impl computes the same function: same logits, same parameters after masked
    PGD-mixed train steps (the path the experiments take)."""
    from sparse_robust import attacks, masks, objectives, training

    x = _images(MNIST_SHAPE, 16)
    labels = np.arange(16, dtype=np.int32) % 10
    objective = objectives.Objective(
        "mixed", attacks.make_attack("pgd", eps=0.3, step_size=0.1, num_steps=2,
                                     label_source="predicted"), label_smoothing=0.1)
    tx = optax.sgd(0.1)  # Adam would turn float noise in near-zero gradients into steps of lr
    indices = np.arange(16, dtype=np.int32).reshape(2, 8)
    results = {}
    for conv_impl in ("xla", "patches", "auto"):
        model = get_model(name, conv_impl=conv_impl, **kwargs)
        params, model_state = training.init_variables(model, jax.random.key(0), x[:1])
        logits = model.apply({"params": params}, x)
        mask = masks.create_mask(params)
        state = training.create_train_state(params, model_state, tx, mask, jax.random.key(1))
        loop = training.make_train_loop(training.make_model_fn(model), tx, objective, scan=False)
        state, _ = loop(state, jnp.asarray(x), jnp.asarray(labels), indices)
        results[conv_impl] = (params, logits, state.params)
    reference = results.pop("xla")
    for conv_impl, result in results.items():
        for got, want in zip(jax.tree_util.tree_leaves(result), jax.tree_util.tree_leaves(reference)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=conv_impl)


@pytest.mark.parametrize("model", [case[0] for case in BN_CASES], ids=BN_IDS)
def test_conv_impls_give_the_same_logits_with_batch_norm(model):
    """Strided and 1x1 shortcut convs too, in train mode (batch statistics) and eval mode."""
    x = _images(CIFAR_SHAPE, 4)
    variables = _numpy_variables(model, CIFAR_SHAPE)
    outputs = {}
    for conv_impl in ("xla", "patches"):
        apply = jax.jit(functools.partial(model.clone(conv_impl=conv_impl).apply, mutable=["batch_stats"]),
                        static_argnames="train")
        outputs[conv_impl] = [apply(variables, x, train=train) for train in (False, True)]
    for got, want in zip(jax.tree_util.tree_leaves(outputs["patches"]),
                         jax.tree_util.tree_leaves(outputs["xla"])):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
