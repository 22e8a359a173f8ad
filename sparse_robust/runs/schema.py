"""Validation of every config field before anything is claimed, loaded or computed.

`FIELDS` is the table of the engine's fields (path, check, allowed values, one line of doc); each
branch adds its own under ``config.branches.<name>`` (see ``branches/``), and every attack under
``config.attacks.<label>`` is checked by ``attacks.make_attack``. `validate` raises a one-line
`ConfigError` naming the first bad field: unknown fields are named with their full path and the
fields allowed there; missing ones with the config to start from. Checks that need the data or the
devices (batch vs training-set size, evaluation sizes, devices) are made by ``context.build``,
still before the workdir is claimed.
"""

from __future__ import annotations

from typing import Any, Iterator

import ml_collections

from sparse_robust import attacks as attacks_lib
from sparse_robust import data as data_lib
from sparse_robust import models as models_lib
from sparse_robust import objectives as objectives_lib
from sparse_robust import pruning
from sparse_robust.pruning import registry
from sparse_robust.models import sparse_execution
from sparse_robust.runs import branches as branches_lib
from sparse_robust.runs.errors import ConfigError
from sparse_robust.runs.fields import (Field, boolean, choice, comma_list, field, integer, names,
                                       number, text)

OPTIMIZERS = ("adam", "adamw", "sgd")
TRAIN_LOOPS = ("auto", "scan", "per_step")
EARLY_STOP_METRICS = ("objective", "clean_loss", "adv_loss")
DEFAULT_RATE_KEY = "default"  # config.prune.rates' name for pruning.DEFAULT_RATE_KEY
# Fields that change how a run is shown, where it finds data or how it is spread over devices,
# not what it computes (beyond float rounding): they may differ when a workdir is resumed.
NON_RESULT_FIELDS = ("progress", "data.data_dir", "data.download", "parallel.num_devices",
                     "parallel.distributed", "parallel.trials_at_once", "model.sparse_impl")
# Mappings whose keys the user chooses: the attacks by label, the pruning rates by layer.
FREE_MAPPINGS = ("attacks", "prune.rates")

FIELDS: tuple[Field, ...] = (
    # jax.random.PRNGKey takes a C long; larger seeds would overflow deep in the run.
    field("seed", integer(0, 2**63 - 1), "Seed of every random number of the run."),
    field("num_trials", integer(1), "Independent trials (seeds) of the whole experiment."),
    field("progress", boolean(), "Show progress bars."),
    field("data.name", choice(data_lib.DATASET_NAMES), "Dataset."),
    field("data.source", choice(data_lib.SOURCES),
          "'idx' files, a prepared 'tfds' dataset, or 'auto' (idx when present)."),
    field("data.data_dir", text(), "Where the data are ('' = the source's default)."),
    field("data.download", boolean(), "Let tfds download and prepare the data (needs network)."),
    field("data.validation_size", integer(1),
          "The first N training images are held out for validation (early stopping)."),
    field("data.train_limit", integer(0), "Use only the first N remaining training images (0 = all)."),
    field("data.flatten", boolean(), "Flatten images to vectors (MLPs); conv nets need False."),
    field("model.name", choice(models_lib.available_models()), "Architecture."),
    field("model.width_multiplier", number(0, low_open=True), "Scales every hidden width."),
    field("model.conv_impl", choice(models_lib.CONV_IMPLS),
          "How convolutions run: xla, patches (one matmul over patches), winograd (3x3 stride "
          "1, in XLA ops), winograd_cpu (the same as one fused CPU kernel, built on first use), "
          "direct_cpu (a direct stride-1 convolution as one CPU kernel, for few channels), or "
          "auto (on CPU winograd_cpu, else winograd, where they serve >= 16 input channels, "
          "direct_cpu for stride-1 layers of <= 16 channels in and out, else patches; xla on "
          "GPU/TPU)."),
    field("model.sparse_impl", choice(sparse_execution.SPARSE_IMPLS),
          "How a trained ticket's dense layers run in its final evaluation: dense (masked "
          "weights), sparse (only the nonzeros, a C++ kernel on CPU), or auto (sparse for layers "
          "at most models.sparse_execution.AUTO_MAX_DENSITY alive, on one CPU device)."),
    field("train.optimizer", choice(OPTIMIZERS), "Optimizer (a fresh one at every level)."),
    field("train.learning_rate", number(0, low_open=True), "Learning rate."),
    field("train.weight_decay", number(0), "Weight decay (adamw, sgd)."),
    field("train.momentum", number(0, 1, high_open=True), "Momentum (sgd)."),
    field("train.batch_size", integer(1), "Global batch size (split across devices)."),
    field("train.num_steps", integer(1), "Training steps per level."),
    field("train.label_smoothing", number(0, 1, high_open=True),
          "Label smoothing of the training cross-entropy."),
    field("train.objective", choice(objectives_lib.OBJECTIVES),
          "natural | mixed (Cosentino 50/50) | madry (PGD-AT) | trades."),
    field("train.adv_weight", number(0, 1), "Weight of the adversarial term of 'mixed'."),
    field("train.trades_beta", number(0), "β of 'trades'."),
    field("train.attack", text(), "Label (under config.attacks) of the training attack."),
    field("train.augment", boolean(), "Random crop and flip (image data, not flattened)."),
    field("train.loop", choice(TRAIN_LOOPS),
          "lax.scan over steps, one call per step, or auto (per step for XLA convolutions on CPU)."),
    field("eval.every", integer(1), "Steps between validation/test measurements."),
    field("eval.num_examples", integer(0),
          "Validation and test images of each periodic measurement (0 = all)."),
    field("eval.batch_size", integer(1), "Evaluation batch size (split across devices)."),
    field("eval.attack", text(), "Label of the attack of the periodic measurements."),
    field("eval.attacks", text(), "Comma-separated labels of the final test evaluation's attacks."),
    field("eval.final_examples", integer(0),
          "Test images of the final evaluation (the first N; 0 = the whole test set)."),
    field("eval.early_stop_metric", choice(EARLY_STOP_METRICS),
          "The validation value early stopping minimises."),
    field("eval.sanity_examples", integer(0),
          "Test images of the gradient-masking checks after each unit (0 = off)."),
    field("prune.levels", integer(0), "Pruning rounds after the dense level 0 (or use targets)."),
    field("prune.targets", text(),
          "Comma-separated increasing sparsities the chain must reach, e.g. '0.8,0.95,0.99' "
          "('' = use levels and rates); needs scope 'global'."),
    field("prune.rounds_per_target", integer(1), "Pruning rounds between consecutive targets."),
    field("prune.scope", choice(pruning.SCOPES), "Rank weights per layer or over all layers."),
    field("prune.global_rate", number(0, 1, high_open=True),
          "Fraction of the remaining weights removed per round, scope 'global'."),
    field("prune.criterion", choice(pruning.CRITERIA), "What decides which weights go."),
    field("prune.granularity", choice(pruning.GRANULARITIES),
          "Prune single weights, or whole conv filters / dense neurons ('channel', layerwise)."),
    field("prune.strategy", choice(pruning.RESET_STRATEGIES),
          "What the surviving weights restart from at each level."),
    field("prune.rewind_step", integer(0), "k of 'rewind_step' (weights after k dense steps)."),
    field("branches.levels", text(),
          "Comma-separated chain levels the branches start from ('' = the target levels, or "
          "every pruned level)."),
    field("retrain.num_steps", integer(0),
          "Fine-tuning steps of the one-shot branches (0 = train.num_steps)."),
    field("retrain.learning_rate", number(0), "Their learning rate (0 = train.learning_rate)."),
    field("diagnostics.num_examples", integer(0),
          "Test images of the sparsity-robustness diagnostics of each unit (0 = off)."),
    field("diagnostics.num_iters", integer(1), "Power iterations of the spectral norms."),
    field("parallel.num_devices", integer(0), "Devices of the data-parallel mesh (0 = all)."),
    field("parallel.distributed", boolean(),
          "Multi-process run: join the other processes (detected under SLURM, Open MPI, TPU "
          "pods; or see --coordinator_address)."),
    field("parallel.trials_at_once", integer(1),
          "Trials trained together under jax.vmap (pays on accelerators)."),
    field("checkpoint_every", integer(1), "Steps between checkpoints (a multiple of eval.every)."),
)


def all_fields() -> tuple[Field, ...]:
    """The engine's fields, the registered methods' branch names and every branch's settings
    (read from the method registry when asked, so a method registered later is known)."""
    chosen = field("branches.names", names(registry.branch_names(), allow_empty=True),
                   "Comparison methods run beside the chain's levels.")
    return FIELDS + (chosen,) + branches_lib.setting_fields()


def _get(config, path: str):
    node = config
    for part in path.split("."):
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
            raise ConfigError(f"config.{path} is missing; start your config from "
                              "experiments/configs/base.py (it has every field).")
        node = node[part]
    return node


def _leaf_paths(node, prefix: str = "") -> Iterator[str]:
    for key in node.keys():
        path = f"{prefix}{key}"
        if path in FREE_MAPPINGS:
            yield path
            continue
        value = node[key]
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            yield from _leaf_paths(value, f"{path}.")
        else:
            yield path


def unknown_field(path: str, known: set[str]) -> str:
    """The message for a field path that is not in ``known``: the fields allowed there."""
    parent = path.rsplit(".", 1)[0] if "." in path else ""
    for mapping in FREE_MAPPINGS:
        if path.startswith(mapping + "."):
            key = path[len(mapping) + 1:].split(".")[0]
            return (f"config.{mapping}.{key} is not defined; add it in a config file "
                    "(command-line overrides can only change existing fields).")
    sections = {p.rsplit(".", 1)[0] for p in known if "." in p} | {""}
    while parent not in sections:
        parent = parent.rsplit(".", 1)[0] if "." in parent else ""
    siblings = sorted({p[len(parent) + 1 if parent else 0:].split(".")[0] for p in known
                       if not parent or p.startswith(parent + ".")})
    where = f"config.{parent}" if parent else "config"
    return f"config.{path} is not a field; fields of {where}: {', '.join(siblings)}."


def known_paths() -> set[str]:
    return {spec.path for spec in all_fields()} | set(FREE_MAPPINGS)


def _check_unknown(config, known: set[str]) -> None:
    for path in _leaf_paths(config):
        if path not in known:
            raise ConfigError(unknown_field(path, known))


def _fail(path: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"config.{path} = {value!r} is invalid; allowed: {allowed}.")


def attack_labels(config) -> list[str]:
    """``config.eval.attacks`` as a list of labels."""
    return comma_list(config.eval.attacks)


def build_attack(config, label: str, where: str) -> attacks_lib.Attack:
    """The attack labelled ``label`` under config.attacks (``where`` names the referring field)."""
    if label not in config.attacks:
        raise ConfigError(f"config.{where} = {label!r} is invalid: no attack has that label; "
                          f"defined under config.attacks: {', '.join(sorted(config.attacks))}.")
    settings = config.attacks[label]
    if not isinstance(settings, (ml_collections.ConfigDict, dict)):
        raise ConfigError(f"config.attacks.{label} = {settings!r} is invalid; allowed: a mapping "
                          "of attack settings, e.g. {'name': 'pgd', 'eps': 0.3, ...}.")
    try:
        return attacks_lib.make_attack(**dict(settings))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config.attacks.{label}: {err}") from None


def targets(config) -> list[float]:
    """``config.prune.targets`` as sparsities (fractions of prunable weights removed)."""
    try:
        return [float(t) for t in comma_list(config.prune.targets)]
    except ValueError:
        _fail("prune.targets", config.prune.targets,
              "comma-separated numbers, e.g. '0.8,0.95,0.99'")


def layer_rates(config) -> dict:
    """``config.prune.rates`` for ``pruning.prune``: {layer or '*': rate}."""
    rates = dict(config.prune.rates)
    if DEFAULT_RATE_KEY in rates:
        rates[pruning.DEFAULT_RATE_KEY] = rates.pop(DEFAULT_RATE_KEY)
    return rates


def _check_prune(config) -> None:
    prune = config.prune
    for layer, rate in dict(prune.rates).items():
        try:
            pruning.check_rate(rate)
        except ValueError:
            _fail(f"prune.rates.{layer}", rate, "a number in [0, 1) (of the remaining weights)")
    wanted = targets(config)
    if wanted:
        if any(not 0 < t < 1 for t in wanted) or sorted(set(wanted)) != wanted:
            _fail("prune.targets", prune.targets, "increasing sparsities in (0, 1), e.g. '0.8,0.95'")
        if prune.levels:
            raise ConfigError(f"config.prune.levels = {prune.levels} and config.prune.targets = "
                              f"{prune.targets!r} are both set; set levels to 0 (the targets "
                              "decide the levels) or targets to ''.")
        if prune.scope != "global":
            _fail("prune.scope", prune.scope, "'global' when config.prune.targets is set")
    if prune.granularity == "channel" and prune.scope != "layerwise":
        _fail("prune.granularity", prune.granularity,
              "'weight' with scope 'global' or targets (channels are ranked per layer)")
    if prune.strategy == "rewind_step" and not 0 < prune.rewind_step < config.train.num_steps:
        _fail("prune.rewind_step", prune.rewind_step,
              f"0 < k < config.train.num_steps ({config.train.num_steps}) for strategy 'rewind_step'")


def chain_levels(config) -> int:
    """Pruning rounds after the dense level: prune.levels, or the targets' rounds."""
    return len(targets(config)) * config.prune.rounds_per_target or config.prune.levels


def branch_levels(config) -> list[int]:
    """The chain levels the branches start from."""
    given = comma_list(config.branches.levels)
    if given:
        try:
            return [int(level) for level in given]
        except ValueError:
            _fail("branches.levels", config.branches.levels, "comma-separated level numbers")
    rounds = config.prune.rounds_per_target
    if targets(config):
        return [rounds * (i + 1) for i in range(len(targets(config)))]
    return list(range(1, chain_levels(config) + 1))


def _check_branches(config) -> None:
    chosen = comma_list(config.branches.names)
    if not chosen:
        return
    levels = branch_levels(config)
    top = chain_levels(config)
    if not levels or any(not 1 <= level <= top for level in levels) or len(set(levels)) != len(levels):
        _fail("branches.levels", config.branches.levels,
              f"distinct chain levels in 1..{top} (the pruned levels of this config)")
    settings = {name: dict(config.branches[name]) for name in branches_lib.default_settings()}
    if ("hydra" in branches_lib.with_requirements(chosen, settings)
            and config.prune.granularity == "channel"
            and config.branches.hydra.allocation == "global"):
        _fail("branches.hydra.allocation", config.branches.hydra.allocation,
              "'level' or 'uniform' with config.prune.granularity = 'channel' (channels are "
              "ranked per layer)")
    if ("radmm" in branches_lib.with_requirements(chosen, settings)
            and config.prune.granularity == "channel"
            and config.branches.radmm.scope != "layerwise"):
        _fail("branches.radmm.scope", config.branches.radmm.scope,
              "'layerwise' with config.prune.granularity = 'channel' (channels are ranked per "
              "layer)")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError naming the first bad field; cheap, runs before any data or compute."""
    known = all_fields()
    for spec in known:
        value = _get(config, spec.path)
        if spec.check(value) is not None:
            _fail(spec.path, value, spec.allowed)
    for path in FREE_MAPPINGS:
        if not isinstance(_get(config, path), (ml_collections.ConfigDict, dict)):
            _fail(path, _get(config, path), "a mapping")
    _check_unknown(config, known_paths())

    for label in config.attacks:
        build_attack(config, label, f"attacks.{label}")
    if config.train.objective != "natural":
        build_attack(config, config.train.attack, "train.attack")
    build_attack(config, config.eval.attack, "eval.attack")
    labels = attack_labels(config)
    if not labels or len(set(labels)) != len(labels):
        _fail("eval.attacks", config.eval.attacks,
              "distinct comma-separated labels from config.attacks, at least one")
    for label in labels:
        build_attack(config, label, "eval.attacks")
    if config.checkpoint_every % config.eval.every:
        _fail("checkpoint_every", config.checkpoint_every,
              f"a multiple of config.eval.every ({config.eval.every})")
    if config.train.augment and config.data.flatten:
        _fail("train.augment", True, "False when config.data.flatten is True (crops need images)")
    _check_prune(config)
    _check_branches(config)


def result_fields(config: ml_collections.ConfigDict) -> dict:
    """The config as a plain dict without the fields that do not change results."""
    fields = config.to_dict()
    for dotted in NON_RESULT_FIELDS:
        *parents, leaf = dotted.split(".")
        node = fields
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    return fields


def describe(config: ml_collections.ConfigDict) -> str:
    """Every field with its value in ``config`` (e.g. the defaults), allowed values and doc."""
    lines = []
    for spec in all_fields():
        try:
            value = _get(config, spec.path)
        except ConfigError:
            value = "<missing>"
        lines.append(f"  config.{spec.path} = {value!r}\n      {spec.doc} Allowed: {spec.allowed}.")
    for label in sorted(config.attacks):
        lines.append(f"  config.attacks.{label} = {dict(config.attacks[label])!r}")
    lines.append("      Attacks by label (settings of attacks.make_attack); train.attack, eval.attack "
                 "and eval.attacks name them.")
    lines.append(f"  config.prune.rates = {dict(config.prune.rates)!r}\n      Per-round rates by "
                 "layer name ('default' for the others), scope 'layerwise'.")
    return "\n".join(lines)
