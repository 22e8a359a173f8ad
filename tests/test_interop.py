"""Tests for sparse_robust.interop: PyTorch state dicts out and in (no torch needed), and, where
torch is installed, strict loads into the reference definitions with equal logits."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from sparse_robust import interop, masks
from sparse_robust.models import get_model

# (registry name, model kwargs, NHWC input shape of one example). Small widths keep them fast.
ARCHITECTURES = [
    ("dense-300-100", {}, (28, 28, 1)),
    ("lenet-300-100", {}, (28, 28, 1)),
    ("lenet-5", {}, (28, 28, 1)),
    ("conv-2", {"width_multiplier": 0.25}, (32, 32, 3)),
    ("conv-4", {"width_multiplier": 0.25}, (32, 32, 3)),
    ("conv-6", {"width_multiplier": 0.125}, (32, 32, 3)),
    ("vgg-16", {"width_multiplier": 0.125}, (32, 32, 3)),
    ("vgg-16-hydra", {"width_multiplier": 0.125}, (32, 32, 3)),
    ("resnet-18", {"width_multiplier": 0.125}, (32, 32, 3)),
    ("wide-resnet-28", {"widen_factor": 1, "width_multiplier": 0.5}, (32, 32, 3)),
]
IDS = [name for name, _, _ in ARCHITECTURES]
BN = {"vgg-16", "vgg-16-hydra", "resnet-18", "wide-resnet-28"}
HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(
    not HAS_TORCH, reason="torch is not installed (pip install -e '.[interop]'); the PyTorch "
    "reference definitions cannot be built")


def _random_variables(model, input_shape, seed=0):
    """(params, model_state) with every entry random (positive variances), built in numpy."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                               jnp.zeros((1, *input_shape)), train=False))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "var":
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
        scale = 1.0 / np.sqrt(np.prod(leaf.shape[:-1])) if name == "kernel" else 0.3
        return jnp.asarray(rng.normal(size=leaf.shape) * scale + (name == "scale"), leaf.dtype)

    variables = dict(jax.tree_util.tree_map_with_path(fill, shapes))
    return variables.pop("params"), variables


def _random_mask(params, density=0.5, seed=1):
    rng = np.random.default_rng(seed)
    return masks.map_prunable(lambda m: jnp.asarray(rng.uniform(size=m.shape) < density),
                              masks.create_mask(params))


def _build(name, kwargs, input_shape, with_mask=True):
    model = get_model(name, **kwargs)
    params, model_state = _random_variables(model, input_shape)
    mask = _random_mask(params) if with_mask else None
    return model, params, model_state, mask


def _assert_trees_equal(a, b):
    flat_a = masks.named_leaves(a)
    flat_b = masks.named_leaves(b)
    assert list(flat_a) == list(flat_b)
    for name in flat_a:
        if flat_a[name] is None:
            assert flat_b[name] is None, name
        else:
            np.testing.assert_array_equal(np.asarray(flat_a[name]), np.asarray(flat_b[name]),
                                          err_msg=name)


# ---------------------------------------------------------------------------------------------
# No torch needed


@pytest.mark.parametrize("name, kwargs, input_shape", ARCHITECTURES, ids=IDS)
def test_export_import_round_trip_through_safetensors(name, kwargs, input_shape):
    model, params, model_state, mask = _build(name, kwargs, input_shape)
    exported = interop.to_state_dict(model, params, model_state, mask, include_masks=True)
    loaded = safetensors.numpy.load(safetensors.numpy.save(exported))
    assert set(loaded) == set(exported)
    imported = interop.from_state_dict(model, loaded, (1, *input_shape))
    _assert_trees_equal(imported.params, masks.apply_mask(params, mask))
    _assert_trees_equal(imported.model_state, model_state)
    _assert_trees_equal(imported.mask, mask)
    # The keys are exactly those the model expects, with the shapes it expects.
    expected = interop.expected_keys(model, (1, *input_shape), include_masks=True)
    assert {key: tuple(value.shape) for key, value in loaded.items()} == expected


@pytest.mark.parametrize("name, kwargs, input_shape", ARCHITECTURES, ids=IDS)
def test_masked_export_has_exactly_the_masks_zeros(name, kwargs, input_shape):
    model, params, model_state, mask = _build(name, kwargs, input_shape)
    assert all(np.all(np.asarray(p) != 0) for p in masks.named_leaves(params).values())
    exported = interop.to_state_dict(model, params, model_state, mask, include_masks=True)
    masked_keys = [key for key in exported if key.endswith("_mask")]
    assert len(masked_keys) == len(masks.mask_leaves(mask))
    for key in masked_keys:
        weight = exported[key[:-len("_mask")]]
        np.testing.assert_array_equal(weight == 0, exported[key] == 0, err_msg=key)
    # Counted independently of any layout: per layer, zeros = pruned entries; nowhere else.
    zeros = sorted(int(np.sum(exported[key[:-len("_mask")]] == 0)) for key in masked_keys)
    pruned = sorted(int(np.sum(~np.asarray(m))) for m in masks.mask_leaves(mask).values())
    assert zeros == pruned
    others = [key for key in exported if not key.endswith("_mask") and key + "_mask" not in exported
              and not key.endswith("num_batches_tracked")]
    assert all(np.all(exported[key] != 0) for key in others)


def test_layouts_are_pytorchs():
    """Conv weights are (out, in, kh, kw); a Linear after a conv sees NCHW-flattened inputs."""
    model, params, model_state, _ = _build("conv-2", {"width_multiplier": 0.125}, (8, 8, 3),
                                           with_mask=False)
    exported = interop.to_state_dict(model, params, model_state)
    kernel = np.asarray(params["conv_0"]["kernel"])  # (kh, kw, in, out)
    weight = exported["features.0.weight"]
    assert weight.shape == (kernel.shape[3], kernel.shape[2], *kernel.shape[:2])
    rng = np.random.default_rng(0)
    for _ in range(5):
        kh, kw, i, o = (rng.integers(n) for n in kernel.shape)
        assert weight[o, i, kh, kw] == kernel[kh, kw, i, o]
    # dense_0 on a feature map f: ours flattens NHWC, PyTorch NCHW, same outputs.
    channels = params["conv_1"]["kernel"].shape[-1]
    features = rng.normal(size=(2, 4, 4, channels)).astype(np.float32)
    ours = features.reshape(2, -1) @ np.asarray(params["dense_0"]["kernel"])
    theirs = features.transpose(0, 3, 1, 2).reshape(2, -1) @ exported["classifier.0.weight"].T
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_benchmark_names():
    """The Adversarial Pruning Benchmark's names for ResNet-18 and VGG-16 (HYDRA's vgg16_bn)."""
    resnet = interop.expected_keys(get_model("resnet-18", width_multiplier=0.125), (1, 32, 32, 3))
    assert {"conv1.weight", "bn1.num_batches_tracked", "layer2.0.shortcut.0.weight",
            "layer2.0.shortcut.1.running_var", "layer4.1.bn2.bias", "linear.weight",
            "linear.bias"} <= set(resnet)
    assert not any(key.startswith("layer1.0.shortcut") for key in resnet)
    vgg = interop.expected_keys(get_model("vgg-16-hydra"), (1, 32, 32, 3))
    convs = sorted(int(key.split(".")[1]) for key in vgg
                   if key.startswith("features.") and vgg[key] and len(vgg[key]) == 4)
    # conv, BN, ReLU per conv; one index per pool: pools sit after convs 2, 4, 7 and 10.
    assert convs == [0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40]
    assert vgg["classifier.0.weight"] == (256, 2048)
    assert vgg["classifier.4.weight"] == (10, 256) and vgg["classifier.4.bias"] == (10,)


def _small_export():
    model, params, model_state, _ = _build("vgg-16-hydra", {"width_multiplier": 0.125},
                                           (32, 32, 3), with_mask=False)
    return model, interop.to_state_dict(model, params, model_state)


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.pop("features.4.running_var"), r"'features.4.running_var' .*is missing"),
    (lambda sd: sd.update({"features.99.weight": np.zeros(3, np.float32)}),
     r"'features.99.weight' is not a variable of this model"),
    (lambda sd: sd.update({"classifier.2.weight": np.zeros((32, 33), np.float32)}),
     r"'classifier.2.weight' has shape \(32, 33\) but the model needs \(32, 32\)"),
    (lambda sd: sd.update({"features.0.weight_mask": np.ones((8, 3, 3, 3), np.float32)}),
     r"'features.3.weight_mask' .*is missing"),
], ids=["missing", "unexpected", "misshaped", "partial masks"])
def test_import_errors_name_the_first_bad_key_in_one_line(change, message):
    model, exported = _small_export()
    change(exported)
    with pytest.raises(ValueError, match=message) as error:
        interop.from_state_dict(model, exported, (1, 32, 32, 3))
    assert "\n" not in str(error.value)


def test_import_of_another_architecture_is_refused():
    _, exported = _small_export()
    with pytest.raises(ValueError, match="does not fit ResNet"):
        interop.from_state_dict(get_model("resnet-18"), exported, (1, 32, 32, 3))


def test_import_needs_a_batch_shape():
    model, exported = _small_export()
    with pytest.raises(ValueError, match="sample_input must be a batch"):
        interop.from_state_dict(model, exported, (32,))


# ---------------------------------------------------------------------------------------------
# Against the PyTorch reference definitions


def _logits_pair(name, kwargs, input_shape, train):
    import torch
    from sparse_robust.interop import torch_models

    model, params, model_state, mask = _build(name, kwargs, input_shape)
    exported = interop.to_state_dict(model, params, model_state, mask)
    twin = torch_models.for_model(model, input_shape)
    twin.load_state_dict(torch_models.to_torch_state_dict(exported), strict=True)
    images = np.random.default_rng(2).uniform(size=(4, *input_shape)).astype(np.float32)
    variables = {"params": masks.apply_mask(params, mask), **model_state}
    if train:
        ours, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
    else:
        ours = model.apply(variables, images, train=False)
    twin.train(train)
    with torch.no_grad():
        theirs = twin(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    return np.asarray(ours), theirs


@needs_torch
@pytest.mark.parametrize("name, kwargs, input_shape", ARCHITECTURES, ids=IDS)
def test_strict_load_into_reference_gives_our_logits(name, kwargs, input_shape):
    for train in ([False, True] if name in BN else [False]):
        ours, theirs = _logits_pair(name, kwargs, input_shape, train)
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4,
                                   err_msg=f"train={train}")


@needs_torch
def test_reference_vgg_16_hydra_is_the_benchmarks_size():
    from sparse_robust.interop import torch_models
    twin = torch_models.for_model(get_model("vgg-16-hydra"), (32, 32, 3))
    exported = interop.expected_keys(get_model("vgg-16-hydra"), (1, 32, 32, 3))
    assert {key: tuple(value.shape) for key, value in twin.state_dict().items()} == exported


@needs_torch
def test_masks_load_the_torch_prune_way():
    import torch
    from sparse_robust.interop import torch_models

    model, params, model_state, mask = _build("lenet-5", {}, (28, 28, 1))
    exported = interop.to_state_dict(model, params, model_state, mask, include_masks=True)
    twin = torch_models.load_pruned(torch_models.for_model(model, (28, 28, 1)), exported)
    layer = twin.features[0]
    np.testing.assert_array_equal(layer.weight_mask.numpy(), exported["features.0.weight_mask"])
    np.testing.assert_array_equal(layer.weight.detach().numpy(), exported["features.0.weight"])
    images = np.random.default_rng(0).uniform(size=(3, 28, 28, 1)).astype(np.float32)
    ours = model.apply({"params": masks.apply_mask(params, mask)}, images)
    with torch.no_grad():
        theirs = twin(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(theirs, np.asarray(ours), atol=1e-4, rtol=1e-4)
