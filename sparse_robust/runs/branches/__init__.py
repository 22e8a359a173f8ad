"""Branches: comparison methods that start from a level of the pruning chain and write beside it.

A branch reads what the chain trained (the dense network of level 0, the level's ticket and its
mask, θ0) through the `BranchRun` it is given, trains one unit with ``BranchRun.train``, and its
files live in ``trial_T/level_LL/branch_NAME/`` (see ``layout.py``). Branches never re-run the
chain under a disguised config; the chain never knows about them.

To add a pruning method: write ``branches/NAME.py`` defining ``BRANCH = Branch(...)`` (its run
function, its settings under ``config.branches.NAME`` with their defaults) and name it in the
method's entry of ``sparse_robust/pruning/registry.py``. Nothing else changes: the schema,
``--help`` and the pipeline read that registry (through ``get`` and ``names`` below).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable, Mapping, Optional

from sparse_robust import keys as keys_lib
from sparse_robust.pruning import registry
from sparse_robust.runs import fit as fit_lib
from sparse_robust.runs import store
from sparse_robust.runs import units as units_lib
from sparse_robust.runs.fields import Field
from sparse_robust.runs.layout import Layout, UnitFiles

if typing.TYPE_CHECKING:
    from sparse_robust.runs.context import Context


@dataclasses.dataclass(frozen=True)
class Branch:
    name: str
    doc: str
    run: Callable[["BranchRun"], units_lib.Trained]
    # Its settings, each a Field whose path is relative to config.branches.<name>.
    settings: tuple[Field, ...] = ()
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    at_dense: bool = False        # starts from level 0 (the dense network) only
    # Other branches it reads at the same level, given its settings (run first, always).
    requires: Callable[[Mapping[str, Any]], tuple[str, ...]] = lambda settings: ()
    # Training steps it costs (for the run's progress line and ETA).
    steps: Callable[["BranchRun"], int] = lambda run: run.finetune.schedule.num_steps


@dataclasses.dataclass(frozen=True)
class BranchRun:
    """What a branch at (trial, level) may read and how it trains its unit."""
    ctx: "Context"                 # the run's context
    finetune: "Context"            # the fine-tuning phase of one-shot methods (config.retrain)
    layout: Layout
    trial: int
    level: int
    name: str
    all_settings: Mapping[str, Mapping[str, Any]]   # config.branches.<branch> of every branch
    scope: str                     # the chain's pruning scope
    granularity: str = "weight"    # the chain's pruning granularity (weight | channel)

    @property
    def settings(self) -> Mapping[str, Any]:
        """This branch's settings (config.branches.<name>)."""
        return self.all_settings.get(self.name, {})

    @property
    def files(self) -> UnitFiles:
        return self.layout.unit(self.trial, self.level, self.name)

    def key(self, *names) -> Any:
        """A key of this trial derived from names, e.g. ``run.key("fresh", run.level)``."""
        return keys_lib.derive(self.ctx.trial_key(self.trial), *names)

    def chain(self, level: int) -> units_lib.Trained:
        """The chain's trained network at ``level`` (0: the dense one)."""
        return units_lib.load_trained(self.ctx, self.layout.unit(self.trial, level))

    def branch(self, name: str, ctx: Optional["Context"] = None) -> units_lib.Trained:
        """Another branch's trained network at this level (it runs first, see ``requires``)."""
        return units_lib.load_trained(ctx or self.ctx, self.layout.unit(self.trial, self.level,
                                                                         name))

    def fit_phase(self, folder: str, *, final: str, summary: str, like, tag: str,
                  start: Callable[[Any], tuple["Context", Any]], saved: Callable[[Any], Any],
                  extra: Callable[[Any], dict] = lambda outcome: {}) -> tuple[Any, dict]:
        """Fit this branch's own phase before its fine-tuning (a score or ADMM phase) once, in
        ``folder`` of its unit, and return (its saved tree, read as ``like``; its summary).

        ``start(train_key)`` gives the phase's context and first train state (called only when
        the phase is not done yet); it trains on this trial's data key, evaluated with the key
        (tag, level, "eval") (its train key: (tag, level, "train")) and labelled by the tag in
        progress lines. Its summary — steps,
        early-stop step, train seconds and ``extra(outcome)`` — goes to ``summary`` and
        ``saved(final state)`` to ``final``, written last, which marks the phase done: a resumed
        run loads both instead of fitting again (a killed phase resumes from its checkpoint).
        """
        phase = self.files.phase(folder)
        final_path, summary_path = phase.extra(final), phase.extra(summary)
        if not store.exists(final_path):
            ctx, state = start(self.key(tag, self.level, "train"))
            label = f"trial {self.trial} level {self.level} {tag.replace('_', ' ')}"
            [outcome] = fit_lib.fit(ctx, [fit_lib.FitJob(
                state=state, data_key=self.key("data"), eval_key=self.key(tag, self.level, "eval"),
                files=phase, label=label)])
            store.write_json(summary_path, {"steps": int(outcome.state.step),
                                            "early_stop_step": outcome.best_step,
                                            "train_seconds": outcome.train_seconds,
                                            **extra(outcome)})
            store.save_tree(final_path, saved(outcome.state))
        return store.load_tree(final_path, like), store.read_json(summary_path)

    def train(self, start: tuple, mask, *, ctx: Optional["Context"] = None, trainable=None,
              **extra) -> units_lib.Trained:
        """Train, evaluate and record this branch's unit from ``start`` = (params, model_state)."""
        unit = units_lib.Unit(
            trial=self.trial, level=self.level, branch=self.name, files=self.files,
            start=start, mask=mask, keys=units_lib.UnitKeys.of(self.ctx, self.trial, self.level,
                                                               self.name),
            ctx=ctx or self.finetune, trainable=trainable, extra=extra)
        return units_lib.train_units(self.layout, [unit])[0]


def names() -> tuple[str, ...]:
    """The registered methods that run as branches."""
    return registry.branch_names()


def get(name: str) -> Branch:
    """The branch of the registered method ``name`` (its module is imported on first use)."""
    branch = registry.get(name).load_branch()
    if branch.name != name:
        raise ValueError(f"The registry's method {name!r} names a branch called {branch.name!r}; "
                         "the two names must agree.")
    return branch


def setting_fields() -> tuple[Field, ...]:
    """Every branch's settings, with paths under ``config.`` (``branches.<name>.<field>``)."""
    return tuple(dataclasses.replace(f, path=f"branches.{b.name}.{f.path}")
                 for b in map(get, names()) for f in b.settings)


def default_settings() -> dict:
    """{branch name: {setting: default}} for the branches that have settings."""
    return {b.name: dict(b.defaults) for b in map(get, names()) if b.settings}


def with_requirements(names: list[str], settings: Mapping[str, Mapping]) -> list[str]:
    """``names`` plus the branches they read, in the order they must run."""
    ordered: list[str] = []

    def add(name: str) -> None:
        for needed in get(name).requires(settings.get(name, {})):
            add(needed)
        if name not in ordered:
            ordered.append(name)

    for name in names:
        add(name)
    return ordered
