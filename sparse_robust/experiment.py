"""What every experiment shares: data on device, the model, compiled steps, final evaluation.

Built once per run from a validated config, so that all levels and trials reuse the same
compiled train loop and evaluation functions (no recompilation between levels).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparse_robust import config as config_lib
from sparse_robust import data as data_lib
from sparse_robust import evaluation
from sparse_robust import level as level_lib
from sparse_robust import masks as masks_lib
from sparse_robust import parallel
from sparse_robust import training

KEY_NAMES = ("init", "data", "train", "eval", "prune", "final_eval")


def trial_keys(seed: int, trial: int) -> dict[str, jax.Array]:
    """Independent raw PRNG keys for each use within a trial, derived from (seed, trial)."""
    trial_key = jax.random.fold_in(jax.random.PRNGKey(seed), trial)
    return dict(zip(KEY_NAMES, jax.random.split(trial_key, len(KEY_NAMES))))


@dataclasses.dataclass
class Experiment:
    config: Any
    dataset: data_lib.Dataset
    model: Any
    model_fn: Any
    apply_fn: Any  # (variables, x) -> logits in eval mode; one object, so evaluation jits once
    optimizer: Any
    objective: Any
    train_loop: Any
    eval_batch: Any
    final_attacks: dict
    train_images: Any
    train_labels: Any
    mesh: Any
    scan: bool  # lax.scan over steps, or one jitted call per step (see uses_scan)

    @classmethod
    def build(cls, config, dataset: data_lib.Dataset | None = None,
              width_multiplier: float | None = None) -> "Experiment":
        """Everything a run needs; the batch-size checks come before any data is loaded."""
        mesh = make_mesh(config)
        dataset = config_lib.load_data(config) if dataset is None else dataset
        model = config_lib.build_model(config, dataset.num_classes, width_multiplier)
        model_fn = training.make_model_fn(model)
        optimizer = config_lib.build_optimizer(config)
        objective = config_lib.build_objective(config)
        scan = uses_scan(config, model, dataset.train_images[:1])
        return cls(
            config=config, dataset=dataset, model=model, model_fn=model_fn,
            apply_fn=functools.partial(model.apply, train=False), optimizer=optimizer,
            objective=objective,
            train_loop=_train_loop(config, model_fn, optimizer, objective, mesh, scan),
            eval_batch=training.make_eval_fn(
                model_fn, config_lib.build_attack(config, config.eval.attack), mesh),
            final_attacks={label: config_lib.build_attack(config, label)
                           for label in config_lib.eval_attack_labels(config)},
            train_images=parallel.put(dataset.train_images, parallel.replicated(mesh)),
            train_labels=parallel.put(dataset.train_labels, parallel.replicated(mesh)), mesh=mesh,
            scan=scan)

    def make_train_loop(self, model_fn, tx):
        """A train loop like ``self.train_loop`` for another model function or optimizer."""
        return _train_loop(self.config, model_fn, tx, self.objective, self.mesh, self.scan)

    def init(self, key: jax.Array) -> tuple[Any, dict]:
        """(params, model_state) of a fresh model."""
        return training.init_variables(self.model, key, jnp.asarray(self.dataset.train_images[:1]))

    def level_spec(self, snapshot_step: int | None = None) -> level_lib.LevelSpec:
        cfg = self.config
        n = cfg.eval.num_examples or None
        ds = self.dataset
        return level_lib.LevelSpec(
            train_loop=self.train_loop, eval_batch=self.eval_batch,
            train_images=self.train_images, train_labels=self.train_labels,
            val=(ds.val_images[:n], ds.val_labels[:n]), test=(ds.test_images[:n], ds.test_labels[:n]),
            batch_size=cfg.train.batch_size, num_steps=cfg.train.num_steps,
            eval_every=cfg.eval.every, eval_batch_size=cfg.eval.batch_size,
            checkpoint_every=cfg.checkpoint_every, early_stop_value=self.early_stop_value,
            progress=cfg.progress, snapshot_step=snapshot_step, mesh=self.mesh)

    def early_stop_value(self, val: dict) -> float:
        metric = self.config.eval.early_stop_metric
        if metric == "clean_loss":
            return val["loss"]
        if metric == "adv_loss":
            return val["adv_loss"]
        objective = self.objective
        if objective.name == "natural":
            return val["loss"]
        if objective.name == "mixed":
            return (1 - objective.adv_weight) * val["loss"] + objective.adv_weight * val["adv_loss"]
        return val["adv_loss"]  # madry, and trades (whose KL term is not measured here)

    def test_accuracies(self, params, model_state, key: jax.Array) -> dict:
        """Clean, per-attack and worst-case accuracy on the whole test set."""
        variables = {"params": params, **model_state}
        return evaluation.evaluate_robustness(
            self.apply_fn, variables, self.dataset.test_images, self.dataset.test_labels,
            self.final_attacks, key, batch_size=self.config.eval.batch_size,
            progress=self.config.progress)

    def final_and_best_accuracies(self, outcome: level_lib.LevelOutcome,
                                  key: jax.Array) -> tuple[dict, dict]:
        """``test_accuracies`` of a level's final weights and of its early-stopping weights; when
        the last step was the best they are the same weights, evaluated once."""
        final = self.test_accuracies(outcome.state.params, outcome.state.model_state, key)
        if outcome.best_step == int(outcome.state.step):
            return final, final
        return final, self.test_accuracies(outcome.best_params, outcome.best_model_state, key)

    def sanity_checks(self, params, model_state, key: jax.Array) -> dict | None:
        """Gradient-masking checks (see ``evaluation.run_sanity_checks``) on a test-set prefix,
        at the ε of ``config.eval.attack``; None when ``config.eval.sanity_examples`` is 0."""
        n = self.config.eval.sanity_examples
        if not n:
            return None
        settings = config_lib.attack_settings(self.config, self.config.eval.attack)
        checks = evaluation.run_sanity_checks(
            self.apply_fn, {"params": params, **model_state}, self.dataset.test_images[:n],
            self.dataset.test_labels[:n], key, eps=settings["eps"],
            norm=settings.get("norm", "linf"), batch_size=min(n, self.config.eval.batch_size))
        return {c.name: {"passed": bool(c.passed), "detail": c.detail} for c in checks}


def _train_loop(config, model_fn, tx, objective, mesh, scan: bool):
    augment = data_lib.augment_crop_flip if config.train.augment else None
    return training.make_train_loop(model_fn, tx, objective, augment, mesh, scan=scan)


def uses_scan(config, model, sample_input) -> bool:
    """``config.train.loop``: "scan", "per_step", or "auto", which steps one by one for
    convolutional networks on CPU (see ``training.make_train_loop``)."""
    if config.train.loop != "auto":
        return config.train.loop == "scan"
    return not (jax.default_backend() == "cpu" and training.uses_convolutions(model, sample_input))


def make_mesh(config):
    """The data-parallel mesh of ``config.parallel``.

    Always a mesh, also of one device: fixed input shardings keep every level on one compiled
    train loop (arguments that arrive committed or not would otherwise compile it anew).
    """
    par = config.parallel
    parallel.initialize_distributed(par.distributed)
    devices = jax.devices()
    if par.num_devices > len(devices):
        raise config_lib.ConfigError(
            f"config.parallel.num_devices = {par.num_devices} but only {len(devices)} devices are "
            "visible; use 0 for all of them.")
    mesh = parallel.make_mesh(devices[:par.num_devices] if par.num_devices else devices)
    for field, size in (("train.batch_size", config.train.batch_size),
                        ("eval.batch_size", config.eval.batch_size)):
        try:
            parallel.check_divisible(size, mesh, f"config.{field}")
        except ValueError as err:
            raise config_lib.ConfigError(str(err)) from None
    return mesh


def level_record(trial: int, level: int, mask, outcome: level_lib.LevelOutcome,
                 final: dict, best: dict, **extra) -> dict:
    """The summary.json record of a finished level (DESIGN.md fields first)."""
    robust = lambda acc: {k: v for k, v in acc.items() if k != "clean"}
    steps = int(outcome.state.step)
    return {
        "trial": trial,
        "level": level,
        "weights_remaining": masks_lib.weights_remaining(mask),
        "clean_accuracy": final["clean"],
        "robust_accuracy": robust(final),
        "early_stop_step": outcome.best_step,
        "early_stop_clean_accuracy": best["clean"],
        "early_stop_robust_accuracy": robust(best),
        "layer_weights_remaining": masks_lib.layer_weights_remaining(mask),
        "steps": steps,
        "train_seconds": outcome.train_seconds,
        "steps_per_second": steps / max(outcome.train_seconds, 1e-9),
        **extra,
    }


def save_mask(path: str, mask) -> None:
    np.savez_compressed(path, **masks_lib.mask_to_numpy(mask))
