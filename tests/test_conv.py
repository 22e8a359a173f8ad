"""Tests for sparse_robust.models.conv (the Conv layer, its implementations and their choice) and
sparse_robust.models.patches, against flax's nn.Conv."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_robust import diagnostics, models
from sparse_robust.models import Conv, conv_impls, resolve_conv_impl
from sparse_robust.models.base import linear_layer_calls
from sparse_robust.models.conv import WINOGRAD_MIN_CHANNELS
from sparse_robust.models.patches import BANDED_MAX_COLUMNS
from sparse_robust.models import direct_cpu, winograd_cpu
from sparse_robust.models.winograd import conv_winograd

# (input shape HWC, Conv keyword arguments); out_width * features > BANDED_MAX_COLUMNS takes the
# im2col layout of the patches path, the others the banded one.
CASES = [
    ((12, 12, 1), dict(features=6, kernel_size=(5, 5), padding="SAME")),
    ((10, 10, 6), dict(features=16, kernel_size=(5, 5), padding="VALID")),
    ((9, 11, 3), dict(features=5, kernel_size=(3, 3), padding="SAME", strides=(2, 2))),
    ((9, 11, 3), dict(features=4, kernel_size=(3, 2), padding="VALID", strides=(2, 1))),
    ((7, 7, 2), dict(features=4, kernel_size=(3, 3), padding=((1, 0), (0, 2)), strides=(3, 2))),
    ((8, 8, 4), dict(features=3, kernel_size=(1, 1), padding=0)),
    ((8, 8, 4), dict(features=3, kernel_size=3, padding=1, use_bias=False)),
    ((28, 28, 1), dict(features=32, kernel_size=(3, 3), padding="SAME")),
    ((14, 14, 16), dict(features=64, kernel_size=(3, 3), padding="SAME", strides=2, use_bias=False)),
]
# 3x3 stride-1 layers, which "winograd" serves: odd and even output sizes, explicit paddings.
WINOGRAD_CASES = [
    ((9, 11, 3), dict(features=5, kernel_size=(3, 3), padding="SAME")),
    ((8, 8, 4), dict(features=3, kernel_size=(3, 3), padding=1, use_bias=False)),
    ((7, 10, 2), dict(features=4, kernel_size=(3, 3), padding="VALID")),
    ((7, 7, 2), dict(features=4, kernel_size=(3, 3), padding=((2, 0), (0, 3)))),
    ((14, 14, 32), dict(features=16, kernel_size=(3, 3), padding="SAME")),
    ((7, 9, 16), dict(features=32, kernel_size=(3, 3), padding="SAME")),  # winograd_cpu's too
]
IMPLS = ["xla", "patches", "winograd", "winograd_cpu", "direct_cpu"]
# What "winograd_cpu" resolves to on a layer it serves: the kernel where it could be built (on
# Linux x86-64 it must be: tests/test_winograd_cpu.py), else the XLA-ops Winograd; likewise
# "direct_cpu" (tests/test_direct_cpu.py), else "patches".
_KERNEL = "winograd_cpu" if winograd_cpu.available() else "winograd"
_DIRECT = "direct_cpu" if direct_cpu.available() else "patches"


def _case_id(case):
    shape, kwargs = case
    return "-".join([f"{shape[0]}x{shape[1]}x{shape[2]}"] + [f"{k}={v}" for k, v in kwargs.items()])


def _random(key, shape):
    return jax.random.normal(jax.random.key(key), shape)


def _grads(module, variables, x):
    """(output, d/dx, d/dparams) of <output, fixed random cotangent>, in one compiled program."""
    @jax.jit
    def run(variables, x):
        y, vjp = jax.vjp(module.apply, variables, x)
        dvariables, dx = vjp(_random(2, y.shape))
        return y, dx, dvariables

    return run(variables, x)


def test_large_outputs_take_the_im2col_layout():
    shape, kwargs = CASES[-2]
    assert shape[1] * kwargs["features"] > BANDED_MAX_COLUMNS
    assert all(s[1] * k["features"] <= BANDED_MAX_COLUMNS for s, k in CASES[:-2])


@pytest.mark.parametrize("conv_impl", IMPLS)
@pytest.mark.parametrize("case", CASES + WINOGRAD_CASES,
                         ids=[_case_id(c) for c in CASES + WINOGRAD_CASES])
def test_conv_matches_nn_conv_forward_and_gradients(case, conv_impl):
    shape, kwargs = case
    x = _random(0, (3, *shape))
    reference = nn.Conv(**kwargs)
    variables = jax.jit(reference.init)(jax.random.key(1), x)
    conv = Conv(**kwargs, conv_impl=conv_impl)
    # Same parameter tree, shapes and initial values as nn.Conv.
    _assert_trees_equal(jax.jit(conv.init)(jax.random.key(1), x), variables)

    y, dx, dvariables = _grads(conv, variables, x)
    y_ref, dx_ref, dvariables_ref = _grads(reference, variables, x)
    assert y.shape == y_ref.shape
    for got, want in [(y, y_ref), (dx, dx_ref), *zip(jax.tree_util.tree_leaves(dvariables),
                                                     jax.tree_util.tree_leaves(dvariables_ref))]:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def _assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_winograd_cases_take_the_winograd_path():
    for shape, kwargs in WINOGRAD_CASES:
        assert Conv(**kwargs, conv_impl="winograd").resolved_impl((1, *shape)) == "winograd"


@pytest.mark.parametrize("tile", [2, 4])
def test_conv_winograd_float32_accuracy(tile):
    """Relative error against XLA's convolution at conv-4's magnitudes (Glorot weights, inputs in
    [0, 1]): near float32 rounding for F(2x2, 3x3), one digit more for F(4x4, 3x3)."""
    x = jax.random.uniform(jax.random.key(0), (4, 28, 28, 64))
    kernel = _random(1, (3, 3, 64, 64)) * (2 / (9 * 64 + 9 * 64)) ** 0.5
    padding = ((1, 1), (1, 1))
    want = jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=(
        "NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)
    got = conv_winograd(x, kernel, (1, 1), padding, tile=tile)
    error = float(jnp.abs(got - want).max() / jnp.abs(want).max())
    assert error < (3e-6 if tile == 2 else 2e-5)


def test_conv_winograd_rejects_what_it_cannot_serve():
    x = jnp.zeros((1, 8, 8, 2))
    with pytest.raises(ValueError, match="3x3 kernels with stride 1"):
        conv_winograd(x, jnp.zeros((3, 3, 2, 2)), (2, 2), ((1, 1), (1, 1)))
    with pytest.raises(ValueError, match="3x3 kernels with stride 1"):
        conv_winograd(x, jnp.zeros((5, 5, 2, 2)), (1, 1), ((2, 2), (2, 2)))


@pytest.mark.parametrize("case, conv_impl", [(CASES[1], "patches"), (CASES[7], "patches"),
                                             (WINOGRAD_CASES[0], "winograd"),
                                             (WINOGRAD_CASES[5], "winograd_cpu"),
                                             (CASES[0], "direct_cpu")],
                         ids=["banded", "im2col", "winograd", "winograd_cpu", "direct_cpu"])
def test_cpu_paths_under_vmap_and_scan(case, conv_impl):
    shape, kwargs = case
    xs = _random(0, (4, 2, *shape))
    reference, conv = nn.Conv(**kwargs), Conv(**kwargs, conv_impl=conv_impl)
    assert conv.resolved_impl(xs[0].shape) == conv_impl
    variables = reference.init(jax.random.key(1), xs[0])

    def loss(module, variables, x):
        return jnp.mean(jnp.sin(module.apply(variables, x)))

    # vmap over a leading axis of inputs, differentiating both the inputs and the weights.
    grad = lambda module: jax.vmap(jax.grad(lambda v, x: loss(module, v, x), argnums=(0, 1)),
                                   in_axes=(None, 0))(variables, xs)
    for got, want in zip(jax.tree_util.tree_leaves(jax.jit(lambda: grad(conv))()),
                         jax.tree_util.tree_leaves(jax.jit(lambda: grad(reference))())):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))

    # lax.scan of gradient steps on the weights.
    def descend(module):
        step = lambda v, x: (jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, v,
                                                    jax.grad(lambda v: loss(module, v, x))(v)), None)
        return jax.lax.scan(step, variables, xs)[0]

    for got, want in zip(jax.tree_util.tree_leaves(jax.jit(lambda: descend(conv))()),
                         jax.tree_util.tree_leaves(jax.jit(lambda: descend(reference))())):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


class _TwoConvs(nn.Module):
    conv_impl: str

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(Conv(16, (5, 5), padding="SAME", conv_impl=self.conv_impl, name="conv_0")(x))
        x = nn.relu(Conv(16, (3, 3), padding=1, conv_impl=self.conv_impl, name="conv_1")(x))
        x = Conv(4, (3, 3), strides=2, padding="VALID", conv_impl=self.conv_impl, name="conv_2")(x)
        return nn.Dense(3, name="output")(x.reshape((x.shape[0], -1)))


def test_spectral_norms_see_the_same_linear_maps():
    """diagnostics transposes each layer with jax.linear_transpose: the patches and winograd paths
    (the kernel's too) must be transposable and give the norms of XLA's convolution."""
    shape = (9, 9, 2)
    variables = _TwoConvs("xla").init(jax.random.key(0), jnp.zeros((1, *shape)))
    x = jnp.zeros((1, *shape))
    assert conv_impls(_TwoConvs("winograd"), x) == {
        "conv_0": "patches", "conv_1": "winograd", "conv_2": "patches"}
    assert conv_impls(_TwoConvs("winograd_cpu"), x)["conv_1"] == _KERNEL
    norms = {impl: diagnostics.spectral_norms(_TwoConvs(impl), variables, shape, jax.random.key(1),
                                              num_iters=50)
             for impl in IMPLS}
    for impl in IMPLS[1:]:
        assert set(norms[impl]) == {"conv_0", "conv_1", "conv_2", "output"}
        for name, value in norms["xla"].items():
            np.testing.assert_allclose(norms[impl][name], value, rtol=1e-5)


@pytest.mark.parametrize("kwargs", [
    dict(kernel_dilation=2, padding="SAME"),
    dict(feature_group_count=2, padding="SAME"),
    dict(padding="CIRCULAR"),
])
@pytest.mark.parametrize("conv_impl", IMPLS)
def test_other_configurations_run_nn_conv(kwargs, conv_impl):
    x = _random(0, (2, 7, 7, 4))
    conv = Conv(4, (3, 3), conv_impl=conv_impl, **kwargs)
    variables = nn.Conv(4, (3, 3), **kwargs).init(jax.random.key(1), x)
    np.testing.assert_array_equal(conv.apply(variables, x),
                                  nn.Conv(4, (3, 3), **kwargs).apply(variables, x))
    assert conv.resolved_impl(x.shape) == "xla"
    calls = linear_layer_calls(_OneConv(dict(features=4, kernel_size=(3, 3), conv_impl=conv_impl,
                                              **kwargs)), x)
    assert [path for path, _, _ in calls] == ["conv"]  # nn.Conv's __call__ is not a second layer


class _OneConv(nn.Module):
    conv_kwargs: dict

    @nn.compact
    def __call__(self, x, train=False):
        return Conv(name="conv", **self.conv_kwargs)(x)


def test_resolve_conv_impl():
    wide, narrow = (3, 3, WINOGRAD_MIN_CHANNELS, 8), (3, 3, WINOGRAD_MIN_CHANNELS - 1, 8)
    same, fused = ((1, 1), (1, 1)), (3, 3, 16, 32)
    assert resolve_conv_impl("auto", "cpu") == "patches"  # a layer of unknown shape
    assert resolve_conv_impl("auto", "cpu", wide) == "winograd"
    assert resolve_conv_impl("auto", "cpu", narrow) == "patches"  # padding unknown
    assert resolve_conv_impl("auto", "cpu", narrow, padding=same) == _DIRECT
    assert resolve_conv_impl("auto", "cpu", wide, strides=(2, 2)) == "patches"
    assert resolve_conv_impl("auto", "cpu", (5, 5, 64, 8)) == "patches"
    # "direct_cpu" where neither side has more than 16 channels, and the kernel serves the layer.
    lenet = (5, 5, 6, 16), ((0, 0), (0, 0))
    assert resolve_conv_impl("auto", "cpu", *lenet[:1], padding=lenet[1]) == _DIRECT
    assert resolve_conv_impl("auto", "cpu", (5, 5, 6, 17), padding=lenet[1]) == "patches"
    assert resolve_conv_impl("auto", "cpu", (5, 5, 17, 6), padding=lenet[1]) == "patches"
    assert resolve_conv_impl("auto", "cpu", lenet[0], (2, 2), lenet[1]) == "patches"
    assert resolve_conv_impl("auto", "cpu", (5, 4, 6, 16), padding=lenet[1]) == "patches"
    assert resolve_conv_impl("auto", "cpu", lenet[0], padding=((5, 0), (0, 0))) == "patches"
    assert resolve_conv_impl("auto", "cpu", *lenet[:1], padding=lenet[1],
                             dtype=jnp.bfloat16) == "patches"
    assert resolve_conv_impl("direct_cpu", "cpu", (3, 3, 64, 64), padding=same) == _DIRECT
    assert resolve_conv_impl("direct_cpu", "gpu", (3, 3, 6, 16), padding=same) == "patches"
    assert resolve_conv_impl("direct_cpu", "cpu", (3, 3, 6, 16)) == "patches"  # padding unknown
    assert resolve_conv_impl("auto", "cpu", fused, padding=same) == _KERNEL
    assert resolve_conv_impl("auto", "cpu", fused, padding=((0, 0), (0, 0))) == "winograd"
    assert resolve_conv_impl("auto", "cpu", fused, padding=same, dtype=jnp.bfloat16) == "winograd"
    for backend in ("gpu", "tpu"):
        assert resolve_conv_impl("auto", backend) == "xla"
        assert resolve_conv_impl("auto", backend, wide) == "xla"
        assert resolve_conv_impl("auto", backend, fused, padding=same) == "xla"
    for impl in IMPLS[:3]:
        for backend in ("cpu", "gpu"):
            assert resolve_conv_impl(impl, backend, wide) == impl
    # "winograd_cpu" runs on CPU only, on the layers it serves; elsewhere "winograd".
    assert resolve_conv_impl("winograd_cpu", "cpu", fused, padding=same) == _KERNEL
    assert resolve_conv_impl("winograd_cpu", "gpu", fused, padding=same) == "winograd"
    assert resolve_conv_impl("winograd_cpu", "cpu", wide, padding=same) == "winograd"
    assert resolve_conv_impl("winograd_cpu", "cpu", fused) == "winograd"  # padding unknown
    # "winograd" (and so "winograd_cpu") on a layer it cannot serve runs "patches".
    for backend in ("cpu", "gpu"):
        for impl in ("winograd", "winograd_cpu"):
            assert resolve_conv_impl(impl, backend, narrow) == "winograd"
            assert resolve_conv_impl(impl, backend, (3, 3, 64, 8), (1, 2)) == "patches"
            assert resolve_conv_impl(impl, backend, (5, 5, 64, 8)) == "patches"
            assert resolve_conv_impl(impl, backend) == "patches"
    with pytest.raises(ValueError, match="conv_impl='im2col' is invalid; allowed values"):
        resolve_conv_impl("im2col")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="auto resolves per backend")
def test_conv_impls_reports_each_layer_on_cpu():
    x = np.zeros((1, 28, 28, 1), np.float32)
    assert conv_impls(models.get_model("lenet-5"), x) == {"conv_0": _DIRECT, "conv_1": _DIRECT}
    assert conv_impls(models.get_model("lenet-5", conv_impl="winograd"), x) == {
        "conv_0": "patches", "conv_1": "patches"}
    assert conv_impls(models.get_model("conv-4"), x) == {
        "conv_0": "patches", "conv_1": _KERNEL, "conv_2": _KERNEL, "conv_3": _KERNEL}
    assert conv_impls(models.get_model("conv-4", conv_impl="winograd_cpu"), x) == {
        "conv_0": "winograd", "conv_1": _KERNEL, "conv_2": _KERNEL, "conv_3": _KERNEL}
    assert conv_impls(models.get_model("conv-4", conv_impl="winograd"), x) == {
        f"conv_{i}": "winograd" for i in range(4)}
    assert conv_impls(models.get_model("conv-4", conv_impl="patches"), x) == {
        f"conv_{i}": "patches" for i in range(4)}
    assert conv_impls(models.get_model("conv-4", conv_impl="xla"), x) == {
        f"conv_{i}": "xla" for i in range(4)}
    assert conv_impls(models.get_model("dense-300-100"), x) == {}


def test_models_validate_conv_impl():
    with pytest.raises(ValueError, match="conv_impl='fast' is invalid"):
        models.get_model("lenet-5", conv_impl="fast")
    with pytest.raises(ValueError, match="conv_impl='fast' is invalid"):
        Conv(3, (3, 3), conv_impl="fast")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the auto loop depends on the backend")
@pytest.mark.parametrize("conv_impl, scans", [("auto", True), ("patches", True), ("winograd", True),
                                             ("winograd_cpu", True), ("direct_cpu", True),
                                             ("xla", False)])
def test_config_conv_impl_reaches_the_model_and_picks_the_loop(conv_impl, scans):
    """config.model.conv_impl builds the run's model; "auto" scans unless XLA's convolutions run
    on CPU (their gradients are slow inside a scan)."""
    from experiments.configs import base
    from sparse_robust import data
    from sparse_robust.runs import context

    config = base.get_config()
    config.model.update(name="lenet-5", conv_impl=conv_impl)
    config.data.flatten = False
    config.eval.update(num_examples=32, sanity_examples=0)
    dataset = data.make_synthetic(0, num_train=256, num_val=64, num_test=64,
                                  image_shape=(28, 28, 1))
    ctx = context.from_config(config, dataset)
    want = {"xla": "xla", "auto": _DIRECT, "direct_cpu": _DIRECT}.get(conv_impl, "patches")
    assert ctx.conv_impls == {"conv_0": want, "conv_1": want}
    assert ctx.scan == scans
    assert context.describe_compute(ctx) == (
        f"convolutions on cpu: conv_0 {want}, conv_1 {want}; train loop: "
        + ("lax.scan" if scans else "one jitted call per step"))


def test_describe_compute_says_why_the_kernel_is_missing(monkeypatch):
    from types import SimpleNamespace

    from sparse_robust.runs import context

    ctx = SimpleNamespace(conv_impls={"conv_0": "patches", "conv_1": "winograd"}, scan=True)
    line = f"convolutions on {jax.default_backend()}: conv_0 patches, conv_1 winograd; " \
           "train loop: lax.scan"
    monkeypatch.setattr(winograd_cpu, "_load", lambda: "no C++ compiler: 'c++' is not on PATH")
    want = line + " (no winograd_cpu kernel: no C++ compiler: 'c++' is not on PATH)"
    assert context.describe_compute(ctx) == (want if jax.default_backend() == "cpu" else line)
    monkeypatch.setattr(winograd_cpu, "_load", lambda: None)
    assert context.describe_compute(ctx) == line
