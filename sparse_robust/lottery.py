"""Iterative magnitude pruning with reset strategies (the lottery ticket), as pure pieces.

A level is train → prune → reset. The pieces here are pure functions of pytrees; the driver
:func:`run` composes them with the workdir (resume, skip finished levels) for a config.

Reset strategies (what the surviving weights start from at the next level):
  rewind_init    their values at initialisation θ0: the lottery ticket;
  rewind_step    their values after k training steps of level 0 (late rewinding);
  random_reinit  a fresh draw of the initializer;
  continue       the trained values of the previous level;
  dense_trained  the trained *dense* (level 0) values: what the original Cosentino code did.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax

from sparse_robust import checkpoint as checkpoint_lib
from sparse_robust import config as config_lib
from sparse_robust import experiment as experiment_lib
from sparse_robust import level as level_lib
from sparse_robust import masks as masks_lib
from sparse_robust import pruning
from sparse_robust import training
from sparse_robust import workdir as workdir_lib

STRATEGIES = config_lib.STRATEGIES


def next_mask(trained_params, mask, rates, *, scope: str = "layerwise",
              criterion: str = "magnitude", key: jax.Array | None = None):
    """The mask of the next level: prune a fraction of the remaining weights."""
    if criterion == "magnitude":
        return pruning.magnitude_prune(trained_params, mask, rates, scope=scope)
    if criterion == "random":
        if key is None:
            raise ValueError("Random pruning needs a PRNG key.")
        return pruning.random_prune(key, mask, rates, scope=scope)
    raise ValueError(f"Unknown pruning criterion {criterion!r}; choose 'magnitude' or 'random'.")


def reset(strategy: str, mask, sources: Mapping[str, Any]):
    """The next level's starting params: ``sources[...]`` chosen by ``strategy``, under ``mask``.

    ``sources`` maps "init" (θ0), "rewind" (θk), "fresh" (a new draw), "previous" (trained at
    the previous level) and "dense_trained" (trained at level 0) to param pytrees; only the one
    the strategy needs must be present.
    """
    source = {"rewind_init": "init", "rewind_step": "rewind", "random_reinit": "fresh",
              "continue": "previous", "dense_trained": "dense_trained"}.get(strategy)
    if source is None:
        raise ValueError(f"Unknown reset strategy {strategy!r}; choose one of {STRATEGIES}.")
    if source not in sources:
        raise ValueError(f"Strategy {strategy!r} needs the {source!r} params.")
    return masks_lib.apply_mask(sources[source], mask)


def run(config, workdir: str, overwrite: bool = False, dataset=None) -> list[dict]:
    """Run (or resume) the lottery-ticket experiment of ``config`` in ``workdir``.

    Validates the config and claims the workdir before loading data or compiling anything.
    Finished levels are skipped; an interrupted level resumes from its last checkpoint.
    Returns the summary records.
    """
    config_lib.validate(config)
    work = workdir_lib.Workdir(workdir)
    work.claim(config_lib.result_fields(config), overwrite=overwrite)
    exp = experiment_lib.Experiment.build(config, dataset)
    for trial in range(config.num_trials):
        run_trial(exp, work, trial)
    work.write_summary()
    return work.records()


def run_trial(exp, work, trial: int) -> None:
    """All levels of one trial; see :func:`run`."""
    cfg = exp.config
    prune_cfg = cfg.prune
    keys = experiment_lib.trial_keys(cfg.seed, trial)
    init_params, init_state = exp.init(keys["init"])
    trial_dir = work.trial_dir(trial)
    checkpoint_lib.save_if_missing(os.path.join(trial_dir, "init_params"), init_params)
    rewind_path = os.path.join(trial_dir, "rewind_params")
    snapshot_step = prune_cfg.rewind_step if prune_cfg.strategy == "rewind_step" else None
    rates = config_lib.pruning_rates(cfg)

    mask = masks_lib.create_mask(init_params)
    previous = dense_trained = None  # (params, model_state) trained at the previous level / level 0
    for level in range(prune_cfg.levels + 1):
        if level > 0:
            mask = next_mask(previous[0], mask, rates, scope=prune_cfg.scope,
                             criterion=prune_cfg.criterion,
                             key=jax.random.fold_in(keys["prune"], level))
        level_dir = work.level_dir(trial, level)
        final_path = os.path.join(level_dir, "final_variables")
        if work.result(trial, level) is not None:
            previous = checkpoint_lib.load_pytree(final_path, (init_params, init_state))
            dense_trained = previous if level == 0 else dense_trained
            continue

        sources = {"init": init_params, "previous": previous and previous[0],
                   "dense_trained": dense_trained and dense_trained[0]}
        model_state = init_state
        if level > 0 and prune_cfg.strategy == "random_reinit":
            sources["fresh"] = exp.init(jax.random.fold_in(keys["init"], level))[0]
        if level > 0 and prune_cfg.strategy == "rewind_step":
            sources["rewind"] = checkpoint_lib.load_pytree(rewind_path, init_params)
        if level > 0 and prune_cfg.strategy in ("continue", "dense_trained"):
            model_state = (previous if prune_cfg.strategy == "continue" else dense_trained)[1]
        start = init_params if level == 0 else reset(prune_cfg.strategy, mask, sources)
        experiment_lib.save_mask(os.path.join(level_dir, "mask.npz"), mask)
        # The weights this level starts from: the ticket, for rewinding strategies.
        checkpoint_lib.save_if_missing(os.path.join(level_dir, "start_params"), start)

        state = training.create_train_state(start, model_state, exp.optimizer, mask,
                                            jax.random.fold_in(keys["train"], level))
        outcome = level_lib.train_level(
            exp.level_spec(snapshot_step if level == 0 else None), state, keys["data"],
            jax.random.fold_in(keys["eval"], level), level_dir,
            level_lib.describe(trial, level, mask))
        final_variables = (outcome.state.params, outcome.state.model_state)
        checkpoint_lib.save_if_missing(final_path, final_variables)
        if level == 0 and snapshot_step:
            checkpoint_lib.save_if_missing(rewind_path, outcome.snapshot)
        eval_key = jax.random.fold_in(keys["final_eval"], level)
        final, best = exp.final_and_best_accuracies(outcome, eval_key)
        checks = exp.sanity_checks(*final_variables, jax.random.fold_in(eval_key, 1))
        work.write_result(trial, level, experiment_lib.level_record(
            trial, level, mask, outcome, final, best, strategy=prune_cfg.strategy,
            sanity_checks=checks))
        previous = checkpoint_lib.to_host(final_variables)  # what a resumed run loads from disk
        dense_trained = previous if level == 0 else dense_trained
