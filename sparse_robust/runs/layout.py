"""The one owner of the workdir's paths: every writer and the report go through a `Layout`.

::

  WORKDIR/sparse_robust.json       marker: this directory is a sparse_robust workdir
  WORKDIR/config.json              the resolved config (a different one is refused)
  WORKDIR/summary.json             one record per finished unit (trial, level[, branch])
  WORKDIR/.lock                    held by the running process (see lock.py)
  WORKDIR/report/                  tables and plots
  WORKDIR/trial_T/init_params/     θ0 of trial T; rewind_params/: θk for late rewinding
  WORKDIR/trial_T/level_LL/        a level of the pruning chain (a *unit*):
      mask.npz  start_params/  progress/  metrics.jsonl  final_variables/  result.json
  WORKDIR/trial_T/level_LL/branch_NAME/   a branch at that level: the same files, plus its own
                                          phases as sub-units (e.g. score_phase/)

A unit is finished exactly when its result.json exists; JSON files are written atomically.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Iterator, Optional

MARKER = "sparse_robust.json"
_LEVEL = re.compile(r"^level_(\d+)$")
_TRIAL = re.compile(r"^trial_(\d+)$")
_BRANCH = re.compile(r"^branch_([A-Za-z0-9_]+)$")


@dataclasses.dataclass(frozen=True)
class UnitFiles:
    """The files of one trained unit: a chain level, a branch, or a phase inside one."""

    dir: str

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    @property
    def mask(self) -> str:
        return self._path("mask.npz")

    @property
    def start_params(self) -> str:
        return self._path("start_params")

    @property
    def progress(self) -> str:
        return self._path("progress")

    @property
    def metrics(self) -> str:
        return self._path("metrics.jsonl")

    @property
    def final_variables(self) -> str:
        return self._path("final_variables")

    @property
    def result(self) -> str:
        return self._path("result.json")

    def phase(self, name: str) -> "UnitFiles":
        """A sub-unit for one phase of this unit's work (e.g. HYDRA's score training)."""
        return UnitFiles(self._path(name))

    def extra(self, name: str) -> str:
        """Another file of this unit (e.g. a phase's scores)."""
        return self._path(name)


@dataclasses.dataclass(frozen=True)
class TrialFiles:
    dir: str

    @property
    def init_params(self) -> str:
        return os.path.join(self.dir, "init_params")

    @property
    def rewind_params(self) -> str:
        return os.path.join(self.dir, "rewind_params")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Paths of one workdir; nothing here touches the disk except the listing methods."""

    root: str

    def __post_init__(self):
        object.__setattr__(self, "root", os.path.abspath(self.root))

    @property
    def marker(self) -> str:
        return os.path.join(self.root, MARKER)

    @property
    def config(self) -> str:
        return os.path.join(self.root, "config.json")

    @property
    def summary(self) -> str:
        return os.path.join(self.root, "summary.json")

    @property
    def lock(self) -> str:
        return os.path.join(self.root, ".lock")

    @property
    def report_dir(self) -> str:
        return os.path.join(self.root, "report")

    def trial(self, trial: int) -> TrialFiles:
        return TrialFiles(os.path.join(self.root, f"trial_{trial}"))

    def unit(self, trial: int, level: int, branch: Optional[str] = None) -> UnitFiles:
        """A level of the chain (branch None) or a branch at that level."""
        path = os.path.join(self.trial(trial).dir, f"level_{level:02d}")
        return UnitFiles(path if branch is None else os.path.join(path, f"branch_{branch}"))

    def replaced(self, stamp: str) -> str:
        """Where --overwrite moves the previous run: a sibling DIR.replaced-<stamp>."""
        return f"{self.root}.replaced-{stamp}"

    def units(self) -> Iterator[tuple[int, int, Optional[str], UnitFiles]]:
        """(trial, level, branch, files) of every unit folder on disk, sorted."""
        for trial, trial_dir in _numbered(self.root, _TRIAL):
            for level, level_dir in _numbered(trial_dir, _LEVEL):
                yield trial, level, None, UnitFiles(level_dir)
                for name in sorted(os.listdir(level_dir)):
                    match = _BRANCH.match(name)
                    if match and os.path.isdir(os.path.join(level_dir, name)):
                        yield trial, level, match.group(1), UnitFiles(os.path.join(level_dir, name))

    def json_files(self) -> Iterator[str]:
        """Every JSON/JSONL file the engine wrote that a resume reads (for an early check)."""
        for path in (self.config, self.summary, self.marker):
            if os.path.exists(path):
                yield path
        for root, _, files in os.walk(self.root):
            if os.path.commonpath([root, self.report_dir]) == self.report_dir:
                continue
            for name in sorted(files):
                if name in ("result.json", "metrics.jsonl"):
                    yield os.path.join(root, name)


def _numbered(directory: str, pattern: re.Pattern) -> list[tuple[int, str]]:
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        match = pattern.match(name)
        if match and os.path.isdir(os.path.join(directory, name)):
            found.append((int(match.group(1)), os.path.join(directory, name)))
    return sorted(found)
