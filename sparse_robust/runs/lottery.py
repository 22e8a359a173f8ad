"""The pruning chain (iterative pruning with resets: the lottery ticket), from explicit arguments.

``run_chain(ctx, layout, inits, rates, reset=...)`` trains level 0 (dense) of every trial, then
for each later level prunes ``rates[level - 1]`` of the remaining weights of the previous level's
trained network and restarts the survivors as the reset strategy says (see
``pruning.RESET_SOURCES``). Each level is a unit (``units.py``): a finished one is read back, an
interrupted one resumes from its checkpoint. No config is involved: a test or a notebook calls it
with a context from ``context.build``.
"""

from __future__ import annotations

import typing
from typing import Any, Mapping, Optional, Sequence

from sparse_robust import keys as keys_lib
from sparse_robust import masks as masks_lib
from sparse_robust import pruning
from sparse_robust.runs import store
from sparse_robust.runs import units as units_lib
from sparse_robust.runs.layout import Layout

if typing.TYPE_CHECKING:
    from sparse_robust.runs.context import Context

Variables = tuple  # (params, model_state)


def trial_init(ctx: Context, trial: int) -> Variables:
    """θ0 of a trial: the initialiser drawn with the trial's "init" key."""
    return ctx.init(keys_lib.derive(ctx.trial_key(trial), "init"))


def run_chain(ctx: Context, layout: Layout, inits: Mapping[int, Variables],
              rates: Sequence[pruning.Rates], *, reset: str = "rewind_init",
              mask: Any = None, scope: str = "layerwise", criterion: str = "magnitude",
              rewind_step: Optional[int] = None,
              granularity: str = "weight") -> dict[int, list[dict]]:
    """Train levels 0..len(rates) of the trials in ``inits`` ({trial: (params, model_state)}).

    Args:
      rates: per pruned level, the rate (float, or {layer or '*': rate} with scope "layerwise").
      reset: the reset strategy, one of ``pruning.RESET_STRATEGIES``.
      mask: the starting mask (default: every prunable weight alive).
      scope, criterion, granularity: how each round prunes (``pruning.prune_by``).
      rewind_step: k of "rewind_step" (the weights after k steps of level 0).

    Returns:
      {trial: [record of level 0, 1, ...]}. Only the dense and the latest level's weights are
      kept in memory; the others are in ``layout``.
    """
    if reset not in pruning.RESET_STRATEGIES:
        raise ValueError(f"reset={reset!r} is invalid; allowed values: {pruning.RESET_STRATEGIES}.")
    if reset == "rewind_step" and not rewind_step:
        raise ValueError("reset='rewind_step' needs rewind_step=k > 0.")
    trials = sorted(inits)
    for trial in trials:
        store.save_tree_if_missing(layout.trial(trial).init_params, inits[trial][0])
    dense: dict[int, units_lib.Trained] = {}
    previous: dict[int, units_lib.Trained] = {}
    records: dict[int, list[dict]] = {trial: [] for trial in trials}

    def keep(trial: int, trained: units_lib.Trained) -> None:
        previous[trial] = trained
        dense.setdefault(trial, trained)
        records[trial].append(trained.record)

    for level in range(len(rates) + 1):
        todo = []
        for trial in trials:
            files = layout.unit(trial, level)
            if units_lib.finished(files):
                keep(trial, units_lib.load_trained(ctx, files))
                continue
            todo.append(_level_unit(ctx, layout, trial, level, inits[trial], previous.get(trial),
                                    dense.get(trial), rates, reset, mask, scope, criterion,
                                    rewind_step, granularity))
        for unit, trained in zip(todo, units_lib.train_units(layout, todo)):
            keep(unit.trial, trained)
            if level == 0 and reset == "rewind_step":
                store.save_tree_if_missing(layout.trial(unit.trial).rewind_params,
                                           trained.snapshot)
    return records


def _level_unit(ctx, layout, trial, level, init, previous, dense, rates, reset, mask, scope,
                criterion, rewind_step, granularity="weight") -> units_lib.Unit:
    """Level ``level`` of a trial, given its previous and its dense level's trained networks."""
    params, model_state = init
    trial_key = ctx.trial_key(trial)
    if level == 0:
        mask = masks_lib.create_mask(params) if mask is None else mask
        start = (params, model_state)
    else:
        mask = pruning.prune_by(keys_lib.derive(trial_key, "prune", level), criterion,
                                previous.params, previous.mask, rates[level - 1], scope=scope,
                                granularity=granularity)
        sources = {"init": params, "previous": previous.params, "dense_trained": dense.params}
        if reset == "random_reinit":
            sources["fresh"] = ctx.init(keys_lib.derive(trial_key, "reinit", level))[0]
        if reset == "rewind_step":
            sources["rewind"] = store.load_tree(layout.trial(trial).rewind_params, params)
        if reset in ("continue", "dense_trained"):  # batch statistics come with the weights
            model_state = (previous if reset == "continue" else dense).model_state
        start = (pruning.reset(reset, sources, mask), model_state)
    return units_lib.Unit(
        trial=trial, level=level, branch=None, files=layout.unit(trial, level), start=start,
        mask=mask, keys=units_lib.UnitKeys.of(ctx, trial, level), ctx=ctx,
        snapshot_step=rewind_step if level == 0 and reset == "rewind_step" else None,
        extra={"strategy": reset})
