"""Adversarial pruning methods compared at the same sparsities (Wang et al. 2020), from one config.

Per trial, the dense network is adversarially trained once (the lottery pipeline's level 0, in
``trial_T/dense/level_00``) and shared by every method. Level ℓ = 1..n is the ℓ-th target of
``config.sparsities`` (level 0 = dense). ``config.methods`` picks from:

  lottery              iterative *global* magnitude pruning with ``config.prune.strategy`` resets
                       (rewinding by default): ``config.lottery.rounds`` rounds to each target, run by
                       ``lottery.run_trial``; its earlier rounds live in ``lottery/level_LL/rounds``.
  inherit              one-shot global magnitude pruning of the dense trained network, then
                       adversarial fine-tuning of the inherited weights (``config.retrain``).
  reinit               the same mask, re-initialised weights (fresh draw), same schedule.
  random               a random mask with the inherit mask's count per layer; weights from
                       ``config.random_mask.start`` ("reinit": reinit's draw, or "dense_trained").
  hydra                HYDRA score training (weights frozen, ``config.hydra``) from the dense
                       trained weights, then adversarial fine-tuning under the found mask.
  inverse_inheritance  a large network (``config.inheritance.width_multiplier``) inherits the
                       level's lottery ticket or HYDRA network (``config.inheritance.source``, run
                       too if not listed), then adversarial training with the train schedule.
  scratch_large        the same large network from its fresh init (level 0), same schedule.

All phases use the config's adversarial objective. Every unit of work writes
``trial_T/METHOD/level_LL/{mask.npz, progress/, metrics.jsonl, final_variables/, result.json}``;
a unit is finished when its result.json holds a "method" field, so a re-run skips it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sparse_robust import checkpoint as checkpoint_lib
from sparse_robust import config as config_lib
from sparse_robust import diagnostics as diagnostics_lib
from sparse_robust import experiment as experiment_lib
from sparse_robust import hydra
from sparse_robust import inheritance
from sparse_robust import level as level_lib
from sparse_robust import lottery
from sparse_robust import masks as masks_lib
from sparse_robust import pruning
from sparse_robust import training
from sparse_robust import workdir as workdir_lib

METHODS = config_lib.METHODS
DENSE = "dense"


def run(config, workdir: str, overwrite: bool = False, dataset=None) -> list[dict]:
    """Run (or resume) the comparison of ``config`` in ``workdir``; returns the summary records.

    Validates the config and claims the workdir before loading data or compiling anything.
    """
    config_lib.validate_adversarial_pruning(config)
    work = workdir_lib.Workdir(workdir)
    work.claim(config_lib.result_fields(config), overwrite=overwrite)
    exp = experiment_lib.Experiment.build(config, dataset)
    shared = _Shared.build(exp)
    for trial in range(config.num_trials):
        _Trial(shared, work, trial).run()
    work.write_summary()
    return work.records()


@jax.jit
def shuffled_mask(key: jax.Array, mask):
    """A uniformly random mask with exactly ``mask``'s number of alive weights in every leaf."""
    leaves, treedef = jax.tree_util.tree_flatten(mask)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([jax.random.permutation(k, jnp.ravel(m)).reshape(jnp.shape(m))
                              for k, m in zip(keys, leaves)])


def unit_key(key: jax.Array, method: str, level: int) -> jax.Array:
    """The key of (method, level) derived from one of the trial's keys (the dense network's
    lottery level 0 uses ``fold_in(key, 0)``; the method salt keeps these apart)."""
    salt = 1000 + (METHODS.index(method) if method in METHODS else len(METHODS))
    return jax.random.fold_in(jax.random.fold_in(key, salt), level)


# ------------------------------------------------------------------------------------------
# What all trials share: experiments (small and large network), compiled loops, attacks.


@dataclasses.dataclass
class _Shared:
    exp: experiment_lib.Experiment              # the (small) network of the config
    large: experiment_lib.Experiment            # the inverse-inheritance network (may be exp)
    norm: str                                   # of the evaluation attack, for diagnostics
    loops: dict = dataclasses.field(default_factory=dict)
    adversarial: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def build(cls, exp):
        cfg = exp.config
        width = cfg.model.width_multiplier * cfg.inheritance.width_multiplier
        needs_large = {"inverse_inheritance", "scratch_large"} & set(config_lib.method_names(cfg))
        large = (experiment_lib.Experiment.build(cfg, exp.dataset, width_multiplier=width)
                 if needs_large and cfg.inheritance.width_multiplier != 1.0 else exp)
        attack = config_lib.build_attack(cfg, cfg.eval.attack)
        return cls(exp=exp, large=large, norm=dict(attack.options).get("norm", "linf"))

    def optimizer(self, exp, phase: Optional[str]) -> tuple[Any, int]:
        """(optimizer, steps) of a phase: "retrain", "hydra" or None (the train schedule)."""
        cfg = exp.config
        steps = (cfg[phase].num_steps if phase else 0) or cfg.train.num_steps
        lr = (cfg[phase].learning_rate if phase else 0.0) or cfg.train.learning_rate
        tx = exp.optimizer if lr == cfg.train.learning_rate else config_lib.build_optimizer(cfg, lr)
        return tx, steps

    def schedule(self, exp, phase: Optional[str]) -> tuple[Any, Any, int]:
        """(train loop, optimizer, steps) of a phase; loops compile once per network and rate."""
        tx, steps = self.optimizer(exp, phase)
        if tx is exp.optimizer:
            return exp.train_loop, tx, steps
        key = (id(exp), phase)
        if key not in self.loops:
            self.loops[key] = exp.make_train_loop(exp.model_fn, tx)
        return self.loops[key], tx, steps

    def adversarial_images(self, exp, variables, images, labels, key):
        """The periodic evaluation attack on a sample (for the adversarial logit margin)."""
        if id(exp) not in self.adversarial:
            attack = config_lib.build_attack(exp.config, exp.config.eval.attack)
            apply_fn = exp.apply_fn
            self.adversarial[id(exp)] = jax.jit(
                lambda v, x, y, k: attack(lambda z: apply_fn(v, z), x, y, k))
        return self.adversarial[id(exp)](variables, images, labels, key)


# ------------------------------------------------------------------------------------------
# One trial.


class _ChainWorkdir(workdir_lib.Workdir):
    """The lottery pipeline's view of one lottery chain: its level 0 is the shared dense network,
    its last round is the lottery method's level folder, earlier rounds live inside that."""

    def __init__(self, path: str, dirs: dict, rounds_dir: Optional[str]):
        super().__init__(path)
        self._dirs, self._rounds_dir = dirs, rounds_dir

    def level_dir(self, trial: int, level: int, method: str | None = None) -> str:
        path = self._dirs.get(level) or os.path.join(self._rounds_dir, f"level_{level:02d}")
        os.makedirs(path, exist_ok=True)
        return path


@dataclasses.dataclass
class _Unit:
    """A trained network: (params, model_state) and its mask."""
    params: Any
    model_state: Any
    mask: Any


class _Trial:
    def __init__(self, shared: _Shared, work: workdir_lib.Workdir, trial: int):
        self.shared, self.work, self.trial = shared, work, trial
        self.exp, self.cfg = shared.exp, shared.exp.config
        self.keys = experiment_lib.trial_keys(self.cfg.seed, trial)
        # Shapes and dtypes of the network, for loading checkpoints (nothing computed).
        self.like = jax.eval_shape(self.exp.init, self.keys["init"])
        self.units: dict[tuple[str, int], _Unit] = {}

    def run(self) -> None:
        requested = config_lib.method_names(self.cfg)
        todo = set(requested)
        if "inverse_inheritance" in todo:
            todo.add(self.cfg.inheritance.source)
        self.dense = self._dense()
        if "scratch_large" in todo:
            self._scratch_large()
        for level, sparsity in enumerate(config_lib.target_sparsities(self.cfg), start=1):
            for method in [m for m in METHODS if m in todo and m != "scratch_large"]:
                getattr(self, f"_{method}")(level, sparsity)

    # --- the dense network and the lottery chains (lottery.run_trial)

    def _lottery_config(self, levels: int, sparsity: float):
        cfg = self.cfg.copy_and_resolve_references()
        cfg.prune.scope, cfg.prune.levels = "global", levels
        # `levels` equal global rounds reach the target: (1 - rate) ** levels = 1 - sparsity.
        cfg.prune.global_rate = 1.0 - (1.0 - sparsity) ** (1.0 / levels) if levels else 0.0
        return cfg

    def _run_chain(self, level: int, sparsity: float) -> _Unit:
        """Level 0 only (the dense network) or one lottery chain; augments its last record."""
        method, rounds = (DENSE, 0) if level == 0 else ("lottery", self.cfg.lottery.rounds)
        unit_dir = self.work.level_dir(self.trial, level, method)
        record = self.work.result(self.trial, level, method)
        if record is None or "method" not in record:
            dirs = {0: self.work.level_dir(self.trial, 0, DENSE), rounds: unit_dir}
            chain = _ChainWorkdir(self.work.path, dirs, os.path.join(unit_dir, "rounds"))
            exp = dataclasses.replace(self.exp, config=self._lottery_config(rounds, sparsity))
            lottery.run_trial(exp, chain, self.trial)
        unit = self._load(unit_dir)
        if record is None or "method" not in record:
            record = self.work.result(self.trial, level, method)
            extra = {"target_sparsity": sparsity}
            if rounds:
                extra["lottery_rounds"] = rounds
                extra["rounds_train_seconds"] = sum(
                    chain.result(self.trial, r)["train_seconds"] for r in range(1, rounds + 1))
            record.update(level=level, method=method, **extra,
                          diagnostics=self._diagnostics(self.exp, unit, method, level))
            self.work.write_result(self.trial, level, record, method)
        return unit

    def _dense(self) -> _Unit:
        return self._run_chain(0, 0.0)

    def _lottery(self, level: int, sparsity: float) -> None:
        self.units["lottery", level] = self._run_chain(level, sparsity)

    # --- one-shot masks from the dense network

    def _magnitude_mask(self, sparsity: float):
        return _global_magnitude_mask(self.dense.params, sparsity)

    def _fresh(self, level: int) -> tuple[Any, Any]:
        """The re-initialised weights of a level (shared by reinit and random)."""
        return self.exp.init(unit_key(self.keys["init"], "reinit", level))

    def _dense_start(self) -> tuple[Any, Any]:
        return self.dense.params, self.dense.model_state

    def _inherit(self, level: int, sparsity: float) -> None:
        self._train("inherit", level, sparsity, self._dense_start,
                    lambda _: self._magnitude_mask(sparsity), phase="retrain")

    def _reinit(self, level: int, sparsity: float) -> None:
        self._train("reinit", level, sparsity, lambda: self._fresh(level),
                    lambda _: self._magnitude_mask(sparsity), phase="retrain")

    def _random(self, level: int, sparsity: float) -> None:
        start = (lambda: self._fresh(level)) if self.cfg.random_mask.start == "reinit" \
            else self._dense_start
        mask = lambda _: shuffled_mask(unit_key(self.keys["prune"], "random", level),
                                       self._magnitude_mask(sparsity))
        self._train("random", level, sparsity, start, mask, phase="retrain",
                    random_mask_start=self.cfg.random_mask.start)

    # --- HYDRA

    def _hydra(self, level: int, sparsity: float) -> None:
        if self._finished("hydra", level):
            return
        density = 1.0 - sparsity
        score_dir = os.path.join(self.work.level_dir(self.trial, level, "hydra"), "score_phase")
        scores_path = os.path.join(score_dir, "final_scores")
        scores_like = (hydra.init_scores(self.dense.params), self.dense.model_state)
        if not checkpoint_lib.exists(scores_path):
            os.makedirs(score_dir, exist_ok=True)
            score_fn = hydra.make_score_model_fn(self.exp.model_fn, density)
            tx, steps = self.shared.optimizer(self.exp, "hydra")
            attack = config_lib.build_attack(self.cfg, self.cfg.eval.attack)
            spec = dataclasses.replace(
                self.exp.level_spec(), num_steps=steps,
                train_loop=self.exp.make_train_loop(score_fn, tx),
                eval_batch=training.make_eval_fn(score_fn, attack, self.exp.mesh))
            score_key = lambda name: unit_key(jax.random.fold_in(self.keys[name], 1), "hydra",
                                              level)
            state = hydra.create_score_state(self.dense.params, self.dense.model_state,
                                             scores_like[0], tx, score_key("train"))
            outcome = level_lib.train_level(
                spec, state, self.keys["data"], score_key("eval"),
                score_dir, f"trial {self.trial} hydra scores level {level}")
            workdir_lib.write_json(os.path.join(score_dir, "score_phase.json"), {
                "steps": int(outcome.state.step), "early_stop_step": outcome.best_step,
                "train_seconds": outcome.train_seconds})
            checkpoint_lib.save_if_missing(scores_path, (outcome.state.params,
                                                         outcome.state.model_state["model_state"]))
        scores, model_state = checkpoint_lib.load_pytree(scores_path, scores_like)
        self._train("hydra", level, sparsity, lambda: (self.dense.params, model_state),
                    lambda _: hydra.topk_mask(scores, density), phase="retrain",
                    score_phase=workdir_lib.read_json(os.path.join(score_dir, "score_phase.json")))

    # --- inverse weights inheritance and its from-scratch comparison

    def _large_init(self) -> tuple[Any, Any]:
        """The large network's fresh init: the same draw for scratch_large and the "init" fill."""
        return self.shared.large.init(unit_key(self.keys["init"], "scratch_large", 0))

    def _scratch_large(self) -> None:
        self._train("scratch_large", 0, 0.0, self._large_init, masks_lib.create_mask,
                    exp=self.shared.large,
                    width_multiplier=self.cfg.inheritance.width_multiplier)

    def _inverse_inheritance(self, level: int, sparsity: float) -> None:
        if self._finished("inverse_inheritance", level):
            return
        inh = self.cfg.inheritance
        source = self.units[inh.source, level]
        large_params, large_state = self._large_init()
        flattened = inheritance.flattened_inputs(self.exp.model, self.exp.dataset.train_images[:1])
        params = inheritance.inherit_wider(source.params, source.mask, large_params, fill=inh.fill,
                                           fill_scale=inh.fill_scale, flattened_inputs=flattened)
        if jax.tree_util.tree_leaves(large_state):  # batch statistics: new channels keep init
            large_state = inheritance.inherit_wider(source.model_state, None, large_state,
                                                    fill="init")
        trainable, inherited = (
            inheritance.trainable_mask(source.params, source.mask, large_params, which,
                                       flattened_inputs=flattened)
            for which in (inh.trainable, "inherited"))
        self._train("inverse_inheritance", level, sparsity, lambda: (params, large_state),
                    masks_lib.create_mask, exp=self.shared.large,
                    trainable=trainable, source=inh.source,
                    source_weights_remaining=masks_lib.weights_remaining(source.mask),
                    inherited_weights=masks_lib.weights_remaining(
                        _prunable_part(inherited, masks_lib.create_mask(params))),
                    width_multiplier=inh.width_multiplier, fill=inh.fill,
                    fill_scale=inh.fill_scale, trainable_weights=inh.trainable)

    # --- shared machinery

    def _finished(self, method: str, level: int) -> bool:
        """Whether (method, level) is done; if so its trained network is loaded for later use."""
        record = self.work.result(self.trial, level, method)
        if record is None or "method" not in record:
            return False
        if method in config_lib.INHERITANCE_SOURCES:
            self.units[method, level] = self._load(self.work.level_dir(self.trial, level, method))
        return True

    def _load(self, unit_dir: str) -> _Unit:
        params, model_state = checkpoint_lib.load_pytree(os.path.join(unit_dir, "final_variables"),
                                                         self.like)
        with np.load(os.path.join(unit_dir, "mask.npz")) as arrays:
            mask = masks_lib.mask_from_numpy(dict(arrays), params)
        return _Unit(params, model_state, mask)

    def _train(self, method: str, level: int, sparsity: float, start, make_mask, *, exp=None,
               phase: Optional[str] = None, trainable=None, **extra) -> None:
        """Unless finished: train (params, model_state) = ``start()`` under ``make_mask(params)``
        (schedule: ``phase`` or train), evaluate and record the unit."""
        if self._finished(method, level):
            return
        exp = exp or self.exp
        params, model_state = start()
        mask = make_mask(params)
        unit_dir = self.work.level_dir(self.trial, level, method)
        experiment_lib.save_mask(os.path.join(unit_dir, "mask.npz"), mask)
        loop, tx, steps = self.shared.schedule(exp, phase)
        key = unit_key(self.keys["train"], method, level)
        if trainable is None:
            state = training.create_train_state(params, model_state, tx, mask, key)
        else:
            state = inheritance.create_train_state(params, model_state, tx, trainable, key)
        spec = dataclasses.replace(exp.level_spec(), train_loop=loop, num_steps=steps)
        outcome = level_lib.train_level(
            spec, state, self.keys["data"], unit_key(self.keys["eval"], method, level), unit_dir,
            f"trial {self.trial} {method} level {level} "
            f"({masks_lib.weights_remaining(mask):6.1%} left)")
        unit = _Unit(*checkpoint_lib.to_host((outcome.state.params, outcome.state.model_state)),
                     mask)
        checkpoint_lib.save_if_missing(os.path.join(unit_dir, "final_variables"),
                                       (unit.params, unit.model_state))
        eval_key = unit_key(self.keys["final_eval"], method, level)
        final, best = exp.final_and_best_accuracies(outcome, eval_key)
        record = experiment_lib.level_record(
            self.trial, level, mask, outcome, final, best, method=method,
            target_sparsity=sparsity, **extra,
            diagnostics=self._diagnostics(exp, unit, method, level))
        self.work.write_result(self.trial, level, record, method)
        if method in config_lib.INHERITANCE_SOURCES:
            self.units[method, level] = unit

    def _diagnostics(self, exp, unit: _Unit, method: str, level: int) -> Optional[dict]:
        """diagnostics.compute_diagnostics on the first test examples (None when switched off)."""
        n = self.cfg.diagnostics.num_examples
        if not n:
            return None
        images = jnp.asarray(exp.dataset.test_images[:n])
        labels = jnp.asarray(exp.dataset.test_labels[:n])
        key = unit_key(jax.random.fold_in(self.keys["final_eval"], 1), method, level)
        variables = {"params": unit.params, **unit.model_state}
        adversarial = self.shared.adversarial_images(exp, variables, images, labels, key)
        return diagnostics_lib.compute_diagnostics(
            exp.model, variables, unit.mask, images, labels, key, adversarial_images=adversarial,
            norm=self.shared.norm, num_iters=self.cfg.diagnostics.num_iters)


@functools.partial(jax.jit, static_argnums=1)
def _global_magnitude_mask(params, sparsity: float):
    """One-shot global magnitude pruning of every kernel to ``sparsity``."""
    return pruning.magnitude_prune(params, masks_lib.create_mask(params), sparsity, scope="global")


def _prunable_part(flags, mask):
    """``flags`` (a bool array per leaf) restricted to the mask's prunable leaves."""
    return jax.tree_util.tree_map(lambda m, f: None if m is None else f, mask, flags,
                                  is_leaf=masks_lib._is_none)
