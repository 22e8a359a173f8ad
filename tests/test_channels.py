"""Channel (structured) pruning and `compact`: whole filters / neurons go, and the compacted
network computes the same logits with strictly fewer FLOPs."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.flops import matmul_flops
from sparse_robust import masks, pruning
from sparse_robust.models import get_model
from sparse_robust.pruning import channels
from sparse_robust.pruning.compact import compact


def _params(model, input_shape, seed=0):
    """Random kernels and biases of both signs (so removed channels leave constants to fold)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *input_shape)),
                                               train=False))["params"]
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        scale = 1.0 / np.sqrt(np.prod(leaf.shape[:-1])) if path[-1].key == "kernel" else 0.3
        return jnp.asarray(rng.normal(size=leaf.shape) * scale, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


CONV = ("conv-2", {"width_multiplier": 0.25}, (16, 16, 3))
CONV4 = ("conv-4", {"width_multiplier": 0.125}, (16, 16, 3))
MLP = ("lenet-300-100", {"width_multiplier": 0.25}, (8, 8, 1))
MLP_NO_BIAS = ("dense-300-100", {"width_multiplier": 0.25}, (8, 8, 1))


def _setup(case, rate=0.5, seed=0):
    name, kwargs, input_shape = case
    # XLA convolutions: FLOPs counted on the jaxpr are a direct convolution's work.
    model = get_model(name, **kwargs, **({} if name.endswith("-100") else {"conv_impl": "xla"}))
    params = _params(model, input_shape, seed)
    mask = pruning.magnitude_prune(params, masks.create_mask(params), rate, granularity="channel")
    return model, params, mask, input_shape


@pytest.mark.parametrize("case", [CONV, MLP], ids=["conv", "mlp"])
def test_channel_masks_remove_whole_filters_with_the_lowest_l1_norms_and_nothing_else(case):
    model, params, mask, _ = _setup(case, rate=0.5)
    for name, alive in masks.mask_leaves(mask).items():
        kernel = np.asarray(masks.named_leaves(params)[name])
        alive = np.asarray(alive)
        flat_alive = alive.reshape(-1, alive.shape[-1])
        if name.startswith("output"):
            assert flat_alive.all()  # the classes stay
            continue
        # Each channel wholly alive or wholly dead.
        assert np.all(flat_alive.all(axis=0) | ~flat_alive.any(axis=0)), name
        dead = ~flat_alive.any(axis=0)
        assert dead.sum() == round(0.5 * alive.shape[-1]), name
        # The dead ones are those of lowest L1 norm (numpy, independently of the library).
        norms = np.abs(kernel).reshape(-1, kernel.shape[-1]).sum(axis=0)
        assert set(np.flatnonzero(dead)) == set(np.argsort(norms, kind="stable")[:dead.sum()])
    assert channels.is_channel_mask(mask)


def test_channel_rounds_take_a_fraction_of_the_remaining_channels_and_keep_one():
    model, params, mask, _ = _setup(CONV, rate=0.5)
    again = pruning.magnitude_prune(params, mask, 0.5, granularity="channel")
    assert masks.is_subset(again, mask)
    for name, m in masks.mask_leaves(again).items():
        if not name.startswith("output"):
            width = m.shape[-1]
            assert int(channels.channel_alive(m).sum()) == width - round(0.5 * width) - round(
                0.5 * (width - round(0.5 * width)))
    almost_all = pruning.magnitude_prune(params, masks.create_mask(params), 0.99,
                                         granularity="channel")
    for name, m in masks.mask_leaves(almost_all).items():
        assert int(channels.channel_alive(m).sum()) >= 1, name


def test_channel_granularity_works_with_any_score_pytree():
    """HYDRA-style scores: the channel score is the sum of its alive weights' scores."""
    model, params, _, _ = _setup(MLP)
    scores = jax.tree_util.tree_map(lambda p: -p, params)  # signed scores, not magnitudes
    mask = pruning.prune(scores, masks.create_mask(params), 0.25, granularity="channel")
    kernel = np.asarray(params["dense_0"]["kernel"])
    dead = ~np.asarray(mask["dense_0"]["kernel"]).any(axis=0)
    expected = np.argsort(-kernel.sum(axis=0), kind="stable")[:dead.sum()]
    assert set(np.flatnonzero(dead)) == set(expected)


def _logits_and_flops(model, params, x):
    fn = lambda p, x: model.apply({"params": p}, x)
    return np.asarray(fn(params, x)), matmul_flops(fn, params, x)


@pytest.mark.parametrize("case", [CONV, CONV4, MLP, MLP_NO_BIAS],
                         ids=["conv-2", "conv-4", "mlp", "mlp-no-bias"])
def test_compact_gives_the_same_logits_with_strictly_fewer_flops(case):
    model, params, mask, input_shape = _setup(case, rate=0.5)
    x = np.random.default_rng(1).uniform(size=(8, *input_shape)).astype(np.float32)
    dense_logits, dense_flops = _logits_and_flops(model, masks.apply_mask(params, mask), x)
    small = compact(model, params, mask)
    logits, flops = _logits_and_flops(small.model, small.params, x)
    np.testing.assert_allclose(logits, dense_logits, atol=1e-5, rtol=1e-5)
    assert flops < dense_flops
    # Its mask fits its params; weights that read a removed channel went with it (into a bias).
    masks.check_mask(small.params, small.mask)
    assert masks.count(small.mask)[0] <= masks.count(mask)[0]
    assert masks.count(small.mask)[1] < masks.count(mask)[1]
    assert type(model)(**small.model_kwargs) == small.model


LENET5 = ("lenet-5", {}, (28, 28, 1))
VGG16 = ("vgg-16", {"width_multiplier": 0.125}, (32, 32, 3))
VGG16_HYDRA = ("vgg-16-hydra", {"width_multiplier": 0.125}, (32, 32, 3))


RESNET18 = ("resnet-18", {"width_multiplier": 0.125}, (16, 16, 3))
WRN = ("wide-resnet-28", {"widen_factor": 1, "width_multiplier": 0.5}, (16, 16, 3))


def _bn_setup(case, rate=0.5, seed=0):
    """A batch-norm model with random kernels, BN scales/biases of both signs around 1 / 0 and
    random running statistics, and a channel mask: (model, params, mask, batch_stats, shape)."""
    name, kwargs, input_shape = case
    model = get_model(name, **kwargs, conv_impl="xla")
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *input_shape)),
                                               train=False))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        kind = path[-1].key
        if kind == "kernel":
            return rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        if kind == "scale":
            return 1 + 0.3 * rng.normal(size=leaf.shape)
        if kind == "var":
            return rng.uniform(0.5, 1.5, size=leaf.shape)
        return (0.3 if kind == "bias" else 0.2) * rng.normal(size=leaf.shape)  # bias, mean

    variables = jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.asarray(fill(path, leaf), jnp.float32), shapes)
    params, stats = variables["params"], variables["batch_stats"]
    mask = pruning.magnitude_prune(params, masks.create_mask(params), rate, granularity="channel")
    return model, params, mask, stats, input_shape


@pytest.mark.parametrize("case", [LENET5, VGG16, VGG16_HYDRA, RESNET18, WRN],
                         ids=["lenet-5", "vgg-16", "vgg-16-hydra", "resnet-18", "wrn"])
def test_compact_of_lenet5_and_batch_norm_models_same_eval_logits_fewer_flops(case):
    """lenet-5 (its VALID second conv takes the first's removed constants as bias), the VGGs (a
    removed filter's constant is its BN of zero, with running statistics) and the residual
    networks (inner block channels only): the same eval-mode logits, strictly fewer FLOPs, a
    model rebuilt from the returned fields whose init has the returned shapes."""
    if case is LENET5:
        model, params, mask, input_shape = _setup(case, rate=0.5)
        stats = None
    else:
        model, params, mask, stats, input_shape = _bn_setup(case)
    x = np.random.default_rng(1).uniform(size=(4, *input_shape)).astype(np.float32)

    def logits_and_flops(model, params, stats):
        extra = {} if stats is None else {"batch_stats": stats}
        fn = lambda p, x: model.apply({"params": p, **extra}, x, train=False)
        return np.asarray(fn(params, x)), matmul_flops(fn, params, x)

    dense_logits, dense_flops = logits_and_flops(model, masks.apply_mask(params, mask), stats)
    small = compact(model, params, mask, stats)
    logits, flops = logits_and_flops(small.model, small.params, small.batch_stats)
    np.testing.assert_allclose(logits, dense_logits, atol=1e-5, rtol=1e-5)
    assert flops < dense_flops
    masks.check_mask(small.params, small.mask)
    assert masks.count(small.mask)[1] < masks.count(mask)[1]
    assert type(model)(**small.model_kwargs) == small.model
    # Removed filters took their BN entries and the next layer's inputs with them.
    shapes = jax.eval_shape(lambda: small.model.init(jax.random.PRNGKey(0), x, train=False))
    shape_of = lambda tree: jax.tree_util.tree_map(np.shape, tree)
    assert shape_of(shapes["params"]) == shape_of(small.params)
    if stats is not None:
        assert shape_of(shapes["batch_stats"]) == shape_of(small.batch_stats)


def test_records_count_flops_of_the_compacted_batch_norm_network():
    """units.forward_flops (every record's forward_flops) compacts a VGG with its batch_stats."""
    import types
    from sparse_robust import flops as flops_lib
    from sparse_robust.runs import units

    model, params, mask, stats, input_shape = _bn_setup(VGG16)
    images = np.zeros((1, *input_shape), np.float32)
    ctx = types.SimpleNamespace(model=model, dataset=types.SimpleNamespace(train_images=images))
    counted = units.forward_flops(ctx, params, {"batch_stats": stats}, mask)
    small = compact(model, params, mask, stats)
    assert counted == flops_lib.forward_flops(
        small.model, {"params": small.params, "batch_stats": small.batch_stats}, images)
    assert counted < flops_lib.forward_flops(model, {"params": params, "batch_stats": stats},
                                             images)


def test_compact_keeps_a_dead_filter_whose_constant_enters_a_padded_conv():
    """conv-4's conv_0 feeds a 'SAME' conv: a dead filter with a positive bias outputs a constant
    map that zero padding makes position-dependent, so it stays; one with a negative bias goes."""
    model, params, _, input_shape = _setup(CONV4)
    params = jax.tree_util.tree_map(np.asarray, params)
    params["conv_0"]["bias"] = np.array([0.5, -0.5] + [0.1] * 6, np.float32)
    mask = masks.create_mask(params)
    mask["conv_0"]["kernel"] = mask["conv_0"]["kernel"].at[..., :2].set(False)
    small = compact(model, params, mask)
    assert small.params["conv_0"]["kernel"].shape[-1] == 7  # channel 1 (bias -0.5) removed
    x = np.random.default_rng(2).uniform(size=(4, *input_shape)).astype(np.float32)
    np.testing.assert_allclose(_logits_and_flops(small.model, small.params, x)[0],
                               _logits_and_flops(model, masks.apply_mask(params, mask), x)[0],
                               atol=1e-5, rtol=1e-5)


def test_compact_also_removes_channels_nothing_reads():
    model, params, _, _ = _setup(MLP)
    mask = masks.create_mask(params)
    mask["dense_1"]["kernel"] = mask["dense_1"]["kernel"].at[:10, :].set(False)  # rows = inputs
    small = compact(model, params, mask)
    assert small.params["dense_0"]["kernel"].shape[-1] == params["dense_0"]["kernel"].shape[-1] - 10


def test_errors():
    model, params, mask, _ = _setup(MLP)
    with pytest.raises(ValueError, match="granularity='filter' is invalid"):
        pruning.magnitude_prune(params, mask, 0.5, granularity="filter")
    with pytest.raises(ValueError, match="scope must be 'layerwise'"):
        pruning.magnitude_prune(params, mask, 0.5, scope="global", granularity="channel")
    resnet = get_model("resnet-18", width_multiplier=0.125)
    with pytest.raises(ValueError, match="compact supports MLP, ConvNet, .* not Dense"):
        compact(flax.linen.Dense(3), {}, None)
    with pytest.raises(ValueError, match="compact of a ResNet needs its batch_stats"):
        compact(resnet, {}, None)
    vgg, vgg_params, vgg_mask, _, _ = _bn_setup(VGG16)
    with pytest.raises(ValueError, match="needs its batch_stats"):
        compact(vgg, vgg_params, vgg_mask)


# ---------------------------------------------------------------------------------------------
# The methods at channel granularity (library): HARP's top-k, RADMM's projection, random channels


def _columns(leaf):
    """(fan_in, channels) view of a kernel-shaped array (numpy)."""
    leaf = np.asarray(leaf)
    return leaf.reshape(-1, leaf.shape[-1])


def test_harp_channel_mask_keeps_the_channels_of_highest_summed_score_at_each_rate():
    from conftest import toy_mlp_params
    from sparse_robust.pruning import harp

    scores = jax.tree_util.tree_map(lambda p: p + 0.1, toy_mlp_params(3))  # signed scores
    scores["output"]["bias"] = None
    rates = {"dense_0": {"kernel": 0.25}, "dense_1": {"kernel": 0.6},
             "output": {"kernel": 1.0, "bias": None}}
    mask = jax.jit(harp.topk_at_rates, static_argnums=2)(
        scores, jax.tree_util.tree_map(jnp.asarray, rates), "channel")
    for layer, k in (("dense_0", 0.25), ("dense_1", 0.6), ("output", 1.0)):
        m, summed = _columns(mask[layer]["kernel"]), _columns(scores[layer]["kernel"]).sum(0)
        alive = m.any(axis=0)
        assert (m.all(axis=0) == alive).all(), layer               # whole channels
        assert alive.sum() == max(1, round(k * alive.size)), layer
        assert set(np.flatnonzero(alive)) == set(np.argsort(-summed, kind="stable")[
            :alive.sum()]), layer


def test_harp_at_channel_granularity_keeps_output_whole_and_meets_the_target():
    """The output layer's rate is 1 (no gradient reaches its logit); the final rates meet the
    target with it counted whole; the mask keeps max(1, round(k · channels)) channels."""
    from conftest import TOY_SHAPES, toy_mlp_params
    from sparse_robust.pruning import harp

    params = toy_mlp_params(4)
    scores = harp.init_scores(params)
    target, alpha = 0.4, 0.5
    logits = harp.init_rate_logits(masks.create_mask(params), target, alpha)
    logits = jax.tree_util.tree_map(lambda r, d: r + d, logits,
                                    {"dense_0": {"kernel": 0.7}, "dense_1": {"kernel": -0.4},
                                     "output": {"kernel": -2.0, "bias": None}})
    sizes = tuple(int(np.prod(s)) for s in TOY_SHAPES.values())
    kmin = harp.k_min(target, alpha)
    grad = jax.grad(lambda r: harp.density(r, sizes, kmin, "channel"))(logits)
    assert float(grad["output"]["kernel"]) == 0.0 and float(grad["dense_0"]["kernel"]) > 0
    assert harp.learned_rates(logits, kmin, "channel")["output"] == 1.0
    mask, learned, final = harp.final_mask(scores, logits, target, alpha, "channel")
    layer_sizes = {layer: int(np.prod(s)) for layer, s in TOY_SHAPES.items()}
    assert final["output"] == 1.0
    assert sum(layer_sizes[l] * k for l, k in final.items()) == pytest.approx(
        target * sum(layer_sizes.values()), rel=1e-6)
    assert final["dense_0"] / final["dense_1"] == pytest.approx(
        learned["dense_0"] / learned["dense_1"], rel=1e-6)       # one common factor
    assert channels.is_channel_mask(mask)
    for layer, k in final.items():
        width = TOY_SHAPES[layer][-1]
        assert int(channels.channel_alive(mask[layer]["kernel"]).sum()) == max(1, round(k * width))


def test_radmm_channel_projection_is_the_top_l2_channels_of_numpy():
    """Π_S onto whole channels: per layer, the channels of largest L2 norm (numpy, independent of
    the library), as many as each layer's fraction says; values kept on them, zero elsewhere."""
    from sparse_robust.pruning import radmm

    _, params, _, _ = _setup(CONV)
    mask = masks.create_mask(params)
    widths = {name: m.shape[-1] for name, m in masks.mask_leaves(mask).items()}
    keep = {"conv_0": 3, "conv_1": 5, "dense_0": 17, "dense_1": 9}
    fractions = {layer: keep.get(layer, widths[f"{layer}/kernel"]) / widths[f"{layer}/kernel"]
                 for layer in (masks.layer_name(n) for n in widths)}
    support = radmm.projection_mask(params, mask, fractions, "layerwise", "channel")
    projected = radmm.project(params, mask, fractions, "layerwise", "channel")
    for name in widths:
        layer = masks.layer_name(name)
        values = _columns(masks.named_leaves(params)[name]).astype(np.float64)
        norms = np.sqrt((values ** 2).sum(axis=0))
        k = keep.get(layer, widths[name])
        expected = np.zeros(widths[name], bool)
        expected[np.argsort(-norms, kind="stable")[:k]] = True
        m = _columns(masks.named_leaves(support)[name])
        np.testing.assert_array_equal(m, np.broadcast_to(expected, m.shape), err_msg=name)
        np.testing.assert_array_equal(_columns(masks.named_leaves(projected)[name]),
                                      np.where(expected, values, 0.0).astype(np.float32))
    # L1 would pick other channels here for some layer, so the norm matters (the test can fail).
    l1_differs = any(
        set(np.argsort(-np.abs(_columns(masks.named_leaves(params)[n])).sum(0))[:k])
        != set(np.argsort(-(_columns(masks.named_leaves(params)[n]) ** 2).sum(0))[:k])
        for n, k in ((f"{l}/kernel", k) for l, k in keep.items()))
    assert l1_differs


def test_radmm_channel_updates_keep_whole_channels_and_refuse_global_scope():
    from sparse_robust.pruning import radmm

    _, params, _, _ = _setup(MLP)
    mask = masks.create_mask(params)
    admm = radmm.init_admm(params, mask, 0.5, "layerwise", "channel")
    noisy = jax.tree_util.tree_map(lambda p: p * 1.5 + 0.01, params)
    new = radmm.admm_update(noisy, admm, 0.5, "layerwise", "channel")
    hard = radmm.hard_prune_mask(new, 0.5, "layerwise", "channel")
    assert channels.is_channel_mask(hard)
    for name, m in masks.mask_leaves(hard).items():
        alive = int(channels.channel_alive(m).sum())
        width = m.shape[-1]
        assert alive == (width if name.startswith("output") else width - round(0.5 * width))
        z = _columns(masks.named_leaves(new["z"])[name])
        assert (z[:, ~np.asarray(channels.channel_alive(m))] == 0).all(), name
    with pytest.raises(ValueError, match="scope='global' is invalid with granularity 'channel'"):
        radmm.make_objective(None, 0.5, "global", 0.01, 1.0, 1, "channel")


def test_random_channel_masks_keep_each_layers_channel_count():
    from sparse_robust.runs.branches.random import shuffled_channels

    _, params, mask, _ = _setup(CONV, rate=0.5)
    drawn = [shuffled_channels(jax.random.PRNGKey(seed), mask) for seed in (0, 1)]
    for new in drawn:
        assert channels.is_channel_mask(new)
        for name, m in masks.mask_leaves(new).items():
            assert int(channels.channel_alive(m).sum()) == int(
                channels.channel_alive(masks.mask_leaves(mask)[name]).sum()), name
    # Random: the two draws differ somewhere, and from the magnitude mask.
    differs = lambda a, b: any(not np.array_equal(masks.mask_leaves(a)[n], masks.mask_leaves(b)[n])
                               for n in masks.mask_leaves(a))
    assert differs(drawn[0], drawn[1]) and differs(drawn[0], mask)


# ---------------------------------------------------------------------------------------------
# Through the engine: config.prune.granularity, records' forward_flops, the report's column


def test_a_channel_pruned_chain_records_shrinking_flops_and_the_report_shows_them(tmp_path):
    from conftest import set_field
    from experiments import report
    from experiments.configs import base
    from sparse_robust import data
    from sparse_robust.runs import pipeline, store
    from sparse_robust.runs.layout import Layout

    config = base.get_config()
    for dotted, value in {"progress": False, "num_trials": 1, "model.name": "lenet-300-100",
                          "train.objective": "natural", "train.num_steps": 10,
                          "train.batch_size": 20, "eval.every": 10, "eval.num_examples": 0,
                          "eval.batch_size": 60, "eval.attacks": "fgsm",
                          "eval.sanity_examples": 0, "checkpoint_every": 10,
                          "prune.levels": 2, "prune.granularity": "channel",
                          "parallel.num_devices": 1}.items():
        set_field(config, dotted, value)
    dataset = data.make_synthetic(0, num_train=120, num_val=60, num_test=60,
                                  image_shape=(8, 8, 1), flatten=True)
    records = pipeline.run(config, str(tmp_path), dataset=dataset)
    flops = [r["forward_flops"] for r in records]
    assert flops[0] == 2 * (64 * 300 + 300 * 100 + 100 * 10)  # the dense lenet-300-100
    assert flops[0] > flops[1] > flops[2]
    for level in (1, 2):
        arrays = store.read_mask_arrays(Layout(str(tmp_path)).unit(0, level).mask)
        assert channels.is_channel_mask({name: jnp.asarray(a) for name, a in arrays.items()})
    table = report.paper_table(report.load_run(str(tmp_path)))
    assert "FLOPs (M)" in table and f"{flops[2] / 1e6:.2f}" in table


def run_channel_chain(path, settings: dict) -> list[dict]:
    """A tiny channel-granularity chain (lenet-300-100 x0.1 on synthetic 8x8 images, one level
    at 60 % of the channels) with the branches and settings given, run end to end in ``path``."""
    from conftest import set_field
    from experiments.configs import base
    from sparse_robust import data
    from sparse_robust.runs import pipeline

    config = base.get_config()
    for dotted, value in {"progress": False, "num_trials": 1, "model.name": "lenet-300-100",
                          "model.width_multiplier": 0.1, "train.objective": "natural",
                          "train.num_steps": 4, "train.batch_size": 20, "eval.num_examples": 0,
                          "eval.batch_size": 60, "eval.attacks": "fgsm",
                          "eval.sanity_examples": 0, "prune.levels": 1,
                          "prune.rates.default": 0.6, "prune.granularity": "channel",
                          "retrain.num_steps": 2, "parallel.num_devices": 1, **settings}.items():
        set_field(config, dotted, value)
    dataset = data.make_synthetic(0, num_train=120, num_val=60, num_test=60,
                                  image_shape=(8, 8, 1), flatten=True)
    return pipeline.run(config, str(path), dataset=dataset)


def test_the_hydra_branch_at_channel_granularity_keeps_the_channels_of_highest_summed_score(
        tmp_path):
    """config.prune.granularity = 'channel' reaches the hydra branch: its mask removes whole
    neurons and nothing else, as many per layer as the chain's channel mask at that level, and
    the kept ones are those of highest summed (saved, learned) score — checked in numpy."""
    from sparse_robust.runs import store
    from sparse_robust.runs.layout import Layout

    run_channel_chain(tmp_path, {"eval.every": 4, "checkpoint_every": 4, "branches.names": "hydra",
                                 "branches.hydra.num_steps": 3,
                                 "branches.hydra.learning_rate": 0.1})
    layout = Layout(str(tmp_path))
    chain = store.read_mask_arrays(layout.unit(0, 1).mask)
    files = layout.unit(0, 1, "hydra")
    mask = store.read_mask_arrays(files.mask)
    scores, _ = store.load_tree_raw(files.phase("score_phase").extra("final_scores"))
    assert set(mask) == set(chain)
    for name, m in mask.items():
        layer = name.split("/")[0]
        column = m.reshape(-1, m.shape[-1])
        alive = column.any(axis=0)
        assert (column.all(axis=0) == alive).all(), name          # whole neurons only
        chain_alive = chain[name].reshape(-1, m.shape[-1]).any(axis=0)
        assert alive.sum() == chain_alive.sum(), name               # the chain's channel count
        if layer == "output":
            assert alive.all()                                      # the classes stay
            continue
        assert 0 < alive.sum() < alive.size, name
        summed = np.asarray(scores[layer]["kernel"], np.float64).reshape(-1, m.shape[-1]).sum(0)
        assert summed[alive].min() > summed[~alive].max(), name     # the top summed scores
    # The learned scores, not the initial magnitudes, decided (the score phase ran).
    assert store.read_json(files.phase("score_phase").extra("score_phase.json"))["steps"] == 3


def test_random_harp_radmm_and_inherit_branches_at_channel_granularity(tmp_path):
    """config.prune.granularity = 'channel' reaches the random, harp, radmm and inherit branches:
    each final mask has whole neurons only and the output layer whole; random, inherit and radmm
    keep the chain's channel count per layer (inherit: those of highest L1 norm of the dense
    weights; radmm: the top L2 norms of its saved Z), harp max(1, round(k · width)) at its final
    rates, the channels of highest summed saved score. Checked in numpy against saved trees."""
    from sparse_robust.runs import store
    from sparse_robust.runs.layout import Layout

    records = run_channel_chain(tmp_path, {
        "eval.every": 2, "checkpoint_every": 2, "branches.names": "random,harp,radmm,inherit",
        "branches.harp.num_steps": 4, "branches.harp.learning_rate": 0.05,
        "branches.radmm.num_steps": 4, "branches.radmm.rounds": 2,
        "branches.radmm.scope": "layerwise"})
    layout = Layout(str(tmp_path))
    chain = store.read_mask_arrays(layout.unit(0, 1).mask)
    dense, _ = store.load_tree_raw(layout.unit(0, 0).final_variables)
    harp_record = [r for r in records if r.get("branch") == "harp"][0]
    harp_scores, _ = store.load_tree_raw(
        layout.unit(0, 1, "harp").phase("score_phase").extra("final_scores"))
    _, admm_state = store.load_tree_raw(
        layout.unit(0, 1, "radmm").phase("admm_phase").extra("final_admm"))

    def top(values, k):
        return set(np.argsort(-values, kind="stable")[:k])

    for branch in ("random", "harp", "radmm", "inherit"):
        files = layout.unit(0, 1, branch)
        mask = store.read_mask_arrays(files.mask)
        params, _ = store.load_tree_raw(files.final_variables)
        assert set(mask) == set(chain), branch
        for name, m in mask.items():
            layer, where = name.split("/")[0], f"{branch} {name}"
            column = m.reshape(-1, m.shape[-1])
            alive = column.any(axis=0)
            assert (column.all(axis=0) == alive).all(), where          # whole neurons only
            assert not np.asarray(params[layer]["kernel"])[~m].any(), where  # pruned: zero
            if layer == "output":
                assert alive.all(), where                               # the classes stay
                continue
            k = int(alive.sum())
            chain_k = int(chain[name].reshape(-1, m.shape[-1]).any(axis=0).sum())
            assert 0 < chain_k < alive.size
            if branch == "harp":
                rate = harp_record["harp_rates"]["final"][layer]
                assert k == max(1, round(rate * alive.size)), where
                summed = np.asarray(harp_scores["scores"][layer]["kernel"]).sum(axis=0)
                assert set(np.flatnonzero(alive)) == top(summed, k), where
                continue
            assert k == chain_k, where                                  # the chain's count
            if branch == "inherit":
                l1 = np.abs(np.asarray(dense[layer]["kernel"])).sum(axis=0)
                assert set(np.flatnonzero(alive)) == top(l1, k), where
            if branch == "radmm":
                z = np.asarray(admm_state["admm"]["z"][layer]["kernel"], np.float64)
                assert set(np.flatnonzero(alive)) == top(np.sqrt((z ** 2).sum(axis=0)), k), where
    assert harp_record["harp_rates"]["final"]["output"] == 1.0
