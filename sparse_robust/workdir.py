"""The workdir of a run: resolved config, one folder per (trial, level), and summary.json.

Layout::

  WORKDIR/config.json                 the resolved config (refuses a different one)
  WORKDIR/summary.json                one record per finished (trial, level)
  WORKDIR/trial_T/...                 per-trial artefacts (θ0, rewind point)
  WORKDIR/trial_T/level_LL/           mask.npz, progress/ (checkpoints), metrics.jsonl, result.json
  WORKDIR/trial_T/METHOD/level_LL/    the same, for runs comparing several methods per level

A level is finished exactly when its result.json exists; every JSON file is written atomically
(temporary file + rename), so a kill never leaves a half-written record.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import numpy as np


class WorkdirError(ValueError):
    """The workdir holds a different run; nothing in it was changed."""


def write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two nested dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key, "<missing>"), new.get(key, "<missing>"), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


class Workdir:
    """Where one experiment writes everything; see the module docstring for the layout."""

    CONFIG = "config.json"
    SUMMARY = "summary.json"

    def __init__(self, path: str):
        self.path = os.path.abspath(path)

    def claim(self, fields: dict, overwrite: bool = False) -> bool:
        """Bind this workdir to a config. Returns True when resuming an existing run.

        A workdir holding a different config is refused (WorkdirError listing the differing
        fields) unless ``overwrite``, which deletes the old run first.
        """
        config_path = os.path.join(self.path, self.CONFIG)
        if os.path.exists(config_path):
            old = read_json(config_path)
            fields_json = json.loads(json.dumps(fields, default=_json_default))
            if old == fields_json:
                return True
            if not overwrite:
                diff = "\n  ".join(_diff(old, fields_json)[:20])
                raise WorkdirError(
                    f"{self.path} holds a run with a different config:\n  {diff}\nUse another "
                    "--workdir, or pass --overwrite to delete that run and start afresh.")
            shutil.rmtree(self.path)
        elif os.path.isdir(self.path) and os.listdir(self.path) and not overwrite:
            raise WorkdirError(f"{self.path} exists and is not a sparse_robust workdir (no "
                               f"{self.CONFIG}); choose an empty or new directory, or pass "
                               "--overwrite.")
        elif os.path.isdir(self.path) and overwrite:
            shutil.rmtree(self.path)
        os.makedirs(self.path, exist_ok=True)
        write_json(config_path, fields)
        return False

    def trial_dir(self, trial: int) -> str:
        path = os.path.join(self.path, f"trial_{trial}")
        os.makedirs(path, exist_ok=True)
        return path

    def level_dir(self, trial: int, level: int, method: str | None = None) -> str:
        """trial_T/level_LL, or trial_T/METHOD/level_LL when a method is given."""
        parts = [self.trial_dir(trial)] + ([method] if method else []) + [f"level_{level:02d}"]
        path = os.path.join(*parts)
        os.makedirs(path, exist_ok=True)
        return path

    def result_path(self, trial: int, level: int, method: str | None = None) -> str:
        return os.path.join(self.level_dir(trial, level, method), "result.json")

    def result(self, trial: int, level: int, method: str | None = None) -> dict | None:
        path = self.result_path(trial, level, method)
        return read_json(path) if os.path.exists(path) else None

    def write_result(self, trial: int, level: int, record: dict,
                     method: str | None = None) -> None:
        write_json(self.result_path(trial, level, method), record)
        self.write_summary()

    def records(self) -> list[dict]:
        """All finished records (trial_T/level_LL and trial_T/METHOD/level_LL), sorted."""
        out = []
        for name in sorted(os.listdir(self.path)):
            trial_path = os.path.join(self.path, name)
            if not (name.startswith("trial_") and os.path.isdir(trial_path)):
                continue
            for entry in sorted(os.listdir(trial_path)):
                entry_path = os.path.join(trial_path, entry)
                if entry.startswith("level_"):
                    level_paths = [entry_path]
                elif os.path.isdir(entry_path):  # a method's folder
                    level_paths = [os.path.join(entry_path, n)
                                   for n in sorted(os.listdir(entry_path)) if n.startswith("level_")]
                else:
                    continue
                out += [read_json(os.path.join(p, "result.json")) for p in level_paths
                        if os.path.exists(os.path.join(p, "result.json"))]
        return sorted(out, key=lambda r: (r["trial"], r.get("method", ""), r["level"]))

    def write_summary(self) -> None:
        write_json(os.path.join(self.path, self.SUMMARY), self.records())
