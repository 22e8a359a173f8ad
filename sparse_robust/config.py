"""Experiment configs: validation before any compute, and the objects a config describes.

A config is an ``ml_collections.ConfigDict`` (see ``experiments/configs/``). Attacks are defined
once, by label, under ``config.attacks``; training and evaluation refer to them by that label,
so ``--config.train.attack=fgsm`` or ``--config.attacks.pgd.num_steps=40`` are one-field overrides.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections
import optax

from sparse_robust import attacks as attacks_lib
from sparse_robust import data as data_lib
from sparse_robust import inheritance
from sparse_robust import models as models_lib
from sparse_robust import objectives as objectives_lib
from sparse_robust import pruning

OPTIMIZERS = ("adam", "adamw", "sgd")
TRAIN_LOOPS = ("auto", "scan", "per_step")  # see experiment.uses_scan
STRATEGIES = ("rewind_init", "rewind_step", "random_reinit", "continue", "dense_trained")
CRITERIA = ("magnitude", "random")
EARLY_STOP_METRICS = ("objective", "clean_loss", "adv_loss")
# Adversarial pruning methods (sparse_robust.methods), in the order they run within a level.
METHODS = ("lottery", "inherit", "reinit", "random", "hydra", "inverse_inheritance",
           "scratch_large")
RANDOM_MASK_STARTS = ("reinit", "dense_trained")
INHERITANCE_SOURCES = ("lottery", "hydra")
# Fields that change how a run is shown or where it finds data, not what it computes:
# they may differ when a workdir is resumed.
NON_RESULT_FIELDS = ("progress", "data.data_dir", "data.download", "parallel.num_devices",
                     "parallel.distributed")


class ConfigError(ValueError):
    """A config field has a bad value; the message names the field and the allowed values."""


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"config.{field} = {value!r} is invalid: {allowed}.")


def _positive_int(config, field: str, allow_zero: bool = False) -> None:
    value = _get(config, field)
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if allow_zero else 1):
        _fail(field, value, f"expected an integer >= {0 if allow_zero else 1}")


def _get(config, field: str):
    node = config
    for part in field.split("."):
        if part not in node:
            raise ConfigError(f"config.{field} is missing; see experiments/configs/ for a template.")
        node = node[part]
    return node


def attack_settings(config, label: str) -> dict:
    if label not in config.attacks:
        raise ConfigError(f"Attack {label!r} is not defined under config.attacks; defined: "
                          f"{sorted(config.attacks)}.")
    return config.attacks[label].to_dict()


def build_attack(config, label: str):
    try:
        return attacks_lib.make_attack(**attack_settings(config, label))
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config.attacks.{label}: {err}") from None


def _comma_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def eval_attack_labels(config) -> list[str]:
    """``config.eval.attacks`` (comma-separated) as a list."""
    return _comma_list(config.eval.attacks)


def method_names(config) -> list[str]:
    """``config.methods`` (comma-separated) as a list."""
    return _comma_list(config.methods)


def target_sparsities(config) -> list[float]:
    """``config.sparsities`` (comma-separated fractions of pruned weights) as floats."""
    try:
        return [float(s) for s in _comma_list(config.sparsities)]
    except ValueError:
        _fail("sparsities", config.sparsities, "expected comma-separated numbers, e.g. '0.9,0.95'")


def pruning_rates(config):
    """``config.prune.rates`` as the pruning module takes it: a float or {layer or '*': rate}."""
    if config.prune.scope == "global":
        return float(config.prune.global_rate)
    rates = config.prune.rates.to_dict()
    if "default" in rates:
        rates[pruning.DEFAULT_RATE_KEY] = rates.pop("default")
    return rates


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError naming the first bad field; cheap, runs before any data or compute."""
    _choice(config, "data.name", data_lib.DATASET_NAMES)
    _choice(config, "data.source", data_lib.SOURCES)
    _positive_int(config, "data.validation_size", allow_zero=True)
    _positive_int(config, "data.train_limit", allow_zero=True)
    _choice(config, "model.name", models_lib.available_models())
    _positive_int(config, "seed", allow_zero=True)
    _positive_int(config, "num_trials")

    train = _get(config, "train")
    _choice(config, "train.optimizer", OPTIMIZERS)
    if not train.learning_rate > 0:
        _fail("train.learning_rate", train.learning_rate, "must be > 0")
    _positive_int(config, "train.batch_size")
    _positive_int(config, "train.num_steps")
    _choice(config, "train.loop", TRAIN_LOOPS)
    _choice(config, "train.objective", objectives_lib.OBJECTIVES)
    build_objective(config)

    _positive_int(config, "eval.every")
    _positive_int(config, "eval.batch_size")
    _positive_int(config, "eval.num_examples", allow_zero=True)
    _positive_int(config, "eval.sanity_examples", allow_zero=True)
    _positive_int(config, "checkpoint_every")
    _positive_int(config, "parallel.num_devices", allow_zero=True)
    if not isinstance(_get(config, "parallel.distributed"), bool):
        _fail("parallel.distributed", config.parallel.distributed, "expected True or False")
    _choice(config, "eval.early_stop_metric", EARLY_STOP_METRICS)
    if not eval_attack_labels(config):
        _fail("eval.attacks", config.eval.attacks, "name at least one attack from config.attacks")
    for label in eval_attack_labels(config) + [config.eval.attack]:
        build_attack(config, label)

    prune = _get(config, "prune")
    _positive_int(config, "prune.levels", allow_zero=True)
    _choice(config, "prune.scope", pruning.SCOPES)
    _choice(config, "prune.criterion", CRITERIA)
    _choice(config, "prune.strategy", STRATEGIES)
    _positive_int(config, "prune.rewind_step", allow_zero=True)
    if prune.strategy == "rewind_step" and not 0 < prune.rewind_step < train.num_steps:
        _fail("prune.rewind_step", prune.rewind_step,
              f"rewind_step needs 0 < k < train.num_steps ({train.num_steps})")
    rates = pruning_rates(config)
    try:
        values = rates.values() if isinstance(rates, dict) else [rates]
        for rate in values:
            pruning._check_rate(rate, "")
    except ValueError as err:
        raise ConfigError(f"config.prune rates: {err}") from None


def _number(config, field: str, minimum: float = -math.inf) -> None:
    value = _get(config, field)
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or not math.isfinite(value) or value < minimum):
        _fail(field, value, "expected a finite number"
              + (f" >= {minimum}" if minimum > -math.inf else ""))


def _choice(config, field: str, allowed) -> None:
    if _get(config, field) not in allowed:
        _fail(field, _get(config, field), f"choose one of {tuple(allowed)}")


def validate_adversarial_pruning(config: ml_collections.ConfigDict) -> None:
    """:func:`validate`, plus the fields of the adversarial-pruning comparison (methods.py)."""
    validate(config)
    _get(config, "methods"), _get(config, "sparsities")  # present, or a clear error
    methods = method_names(config)
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown or len(set(methods)) != len(methods):
        _fail("methods", config.methods, f"name each of {METHODS} at most once, comma-separated")
    sparsities = target_sparsities(config)
    increasing = sorted(set(sparsities)) == sparsities
    if not sparsities or not increasing or any(not 0 < s < 1 for s in sparsities):
        _fail("sparsities", config.sparsities,
              "expected increasing fractions of pruned weights in (0, 1), e.g. '0.9,0.95,0.99'")
    _positive_int(config, "lottery.rounds")
    for phase in ("retrain", "hydra"):
        _positive_int(config, f"{phase}.num_steps", allow_zero=True)  # 0: train.num_steps
        _number(config, f"{phase}.learning_rate", 0.0)                # 0: train.learning_rate
    _choice(config, "random_mask.start", RANDOM_MASK_STARTS)
    _choice(config, "inheritance.source", INHERITANCE_SOURCES)
    _number(config, "inheritance.width_multiplier", 1.0)
    _choice(config, "inheritance.fill", inheritance.FILLS)
    _number(config, "inheritance.fill_scale")
    _choice(config, "inheritance.trainable", inheritance.TRAINABLE)
    _positive_int(config, "diagnostics.num_examples", allow_zero=True)  # 0: no diagnostics
    _positive_int(config, "diagnostics.num_iters")


def build_objective(config) -> objectives_lib.Objective:
    train = config.train
    attack = None if train.objective == "natural" else build_attack(config, train.attack)
    try:
        return objectives_lib.Objective(name=train.objective, attack=attack,
                                        adv_weight=train.adv_weight, trades_beta=train.trades_beta,
                                        label_smoothing=train.label_smoothing)
    except ValueError as err:
        raise ConfigError(f"config.train: {err}") from None


def build_optimizer(config, learning_rate: float | None = None) -> optax.GradientTransformation:
    """``config.train``'s optimizer, optionally with another learning rate (e.g. fine-tuning)."""
    train = config.train
    lr = train.learning_rate if learning_rate is None else learning_rate
    if train.optimizer == "adam":
        return optax.adam(lr)
    if train.optimizer == "adamw":
        return optax.adamw(lr, weight_decay=train.weight_decay)
    return optax.chain(optax.add_decayed_weights(train.weight_decay),
                       optax.sgd(lr, momentum=train.momentum))


def build_model(config, num_classes: int, width_multiplier: float | None = None):
    kwargs = {}
    width = config.model.width_multiplier if width_multiplier is None else width_multiplier
    if width != 1.0:
        kwargs["width_multiplier"] = width
    return models_lib.get_model(config.model.name, num_classes=num_classes,
                                **kwargs)


def load_data(config) -> data_lib.Dataset:
    data = config.data
    return data_lib.load_dataset(data.name, source=data.source, data_dir=data.data_dir or None,
                                 validation_size=data.validation_size, flatten=data.flatten,
                                 download=data.download, train_limit=data.train_limit or None)


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
