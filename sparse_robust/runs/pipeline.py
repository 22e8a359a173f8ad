"""A config becomes a run: validate, check the workdir and the data, claim, then train the pruning
chain and its branches for every trial.

Order matters: every check that can be made before compute is made before the workdir is claimed
(``schema.validate``, ``workdir.precheck``, ``context.from_config``), so a bad input changes
nothing on disk. The `Plan` is the config's pipeline part as plain values; `execute` runs a plan
with a context and a layout (no config involved).

With ``config.parallel.distributed`` (or after the CLI's ``hosts.join``) the run spans several
processes: each check is made on every process and stops them all when it fails on one, and the
processes must have been given the same config (see ``hosts``).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

import ml_collections

from sparse_robust import data as data_lib
from sparse_robust.runs import branches as branches_lib
from sparse_robust.runs import context as context_lib
from sparse_robust.runs import hosts
from sparse_robust.runs import lottery
from sparse_robust.runs import schema
from sparse_robust.runs import units as units_lib
from sparse_robust.runs import workdir as workdir_lib
from sparse_robust.runs.errors import ConfigError
from sparse_robust.runs.fields import comma_list
from sparse_robust.runs.layout import Layout


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run trains: the chain's arguments, and the branches with their settings."""
    num_trials: int
    rates: tuple                         # per pruned level
    reset: str = "rewind_init"
    scope: str = "layerwise"
    criterion: str = "magnitude"
    granularity: str = "weight"
    rewind_step: Optional[int] = None
    branches: tuple = ()                 # in the order they run (requirements first)
    branch_levels: tuple = ()
    branch_settings: Mapping = dataclasses.field(default_factory=dict)
    retrain: tuple = (0, 0.0)            # fine-tuning (steps, learning rate); 0 = the train's


def chain_rates(config) -> list:
    """The rate of every pruned level: from the targets (global rates reaching each target in
    rounds_per_target equal rounds) or from prune.rates / prune.global_rate."""
    prune = config.prune
    wanted = schema.targets(config)
    if wanted:
        rates, remaining = [], 1.0
        for target in wanted:
            step = ((1.0 - target) / remaining) ** (1.0 / prune.rounds_per_target)
            rates += [1.0 - step] * prune.rounds_per_target
            remaining = 1.0 - target
        return rates
    rate = prune.global_rate if prune.scope == "global" else schema.layer_rates(config)
    return [rate] * prune.levels


def plan_of(config: ml_collections.ConfigDict) -> Plan:
    settings = {name: dict(config.branches[name]) for name in branches_lib.default_settings()}
    prune = config.prune
    return Plan(
        num_trials=config.num_trials, rates=tuple(chain_rates(config)), reset=prune.strategy,
        scope=prune.scope, criterion=prune.criterion, granularity=prune.granularity,
        rewind_step=prune.rewind_step if prune.strategy == "rewind_step" else None,
        branches=tuple(branches_lib.with_requirements(comma_list(config.branches.names),
                                                      settings)),
        branch_levels=tuple(schema.branch_levels(config)) if config.branches.names else (),
        branch_settings=settings,
        retrain=(config.retrain.num_steps, config.retrain.learning_rate))


def _branch_runs(ctx, finetune, layout: Layout, plan: Plan, trial: int):
    for level in [0] + list(plan.branch_levels):
        for name in plan.branches:
            if branches_lib.get(name).at_dense == (level == 0):
                yield branches_lib.BranchRun(ctx=ctx, finetune=finetune, layout=layout,
                                             trial=trial, level=level, name=name,
                                             all_settings=plan.branch_settings, scope=plan.scope,
                                             granularity=plan.granularity)


def _start_progress(ctx, finetune, layout: Layout, plan: Plan) -> None:
    """The run's progress line: every unit's steps, those of finished units done."""
    total = done = 0
    for trial in range(plan.num_trials):
        for level in range(len(plan.rates) + 1):
            steps = ctx.schedule.num_steps
            total += steps
            done += steps if units_lib.finished(layout.unit(trial, level)) else 0
        for run in _branch_runs(ctx, finetune, layout, plan, trial):
            steps = branches_lib.get(run.name).steps(run)
            total += steps
            done += steps if units_lib.finished(run.files) else 0
    ctx.progress.start(total, done)


def execute(ctx, layout: Layout, plan: Plan) -> list[dict]:
    """Train the chain and the branches of every trial (resuming what ``layout`` holds)."""
    finetune = ctx.phase(*plan.retrain)
    ctx.progress.say(context_lib.describe_compute(ctx))
    _start_progress(ctx, finetune, layout, plan)
    try:
        trials = list(range(plan.num_trials))
        size = ctx.trials_at_once
        for group in (trials[i:i + size] for i in range(0, len(trials), size)):
            lottery.run_chain(ctx, layout, {t: lottery.trial_init(ctx, t) for t in group},
                              plan.rates, reset=plan.reset, scope=plan.scope,
                              criterion=plan.criterion, rewind_step=plan.rewind_step,
                              granularity=plan.granularity)
            for trial in group:
                for run in _branch_runs(ctx, finetune, layout, plan, trial):
                    if not units_lib.finished(run.files):
                        branches_lib.get(run.name).run(run)
    finally:
        ctx.progress.close()
    return units_lib.records(layout)


def _result_fields(config: ml_collections.ConfigDict) -> dict:
    schema.validate(config)
    return schema.result_fields(config)


def _checked_fields(config: ml_collections.ConfigDict, overwrite: bool) -> dict:
    """The result fields of a valid config, the same on every process."""
    fields = hosts.agree(lambda: _result_fields(config), "the config check")
    asked = hosts.gather([workdir_lib.run_id(fields), overwrite], "the config check")
    if any(other != asked[0] for other in asked):
        raise ConfigError("the processes of this run were given different configs or "
                          f"--overwrite ([run id, overwrite] by process: {asked}); launch every "
                          "process with the same --config, overrides and flags.")
    return fields


def run(config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = False,
        dataset: Optional[data_lib.Dataset] = None) -> list[dict]:
    """Run (or resume) ``config`` in ``workdir``; returns the summary records."""
    if config.parallel.distributed:
        hosts.join()
    fields = _checked_fields(config, overwrite)
    layout = Layout(workdir)
    workdir_lib.precheck(layout, fields, overwrite)
    ctx = hosts.agree(lambda: context_lib.from_config(config, dataset), "loading the data")
    plan = plan_of(config)
    with workdir_lib.claim(layout, fields, overwrite):
        return execute(ctx, layout, plan)
