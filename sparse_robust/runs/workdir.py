"""Claiming a workdir for a run: inspect it, decide, lock it, and only then change anything.

A directory is a sparse_robust workdir exactly when it holds ``sparse_robust.json`` (the marker,
with the run id). What a run may do with ``--workdir=DIR``:

  DIR absent or empty        start a new run;
  a workdir, same config     resume it;
  a workdir, other config    refuse, or with ``overwrite`` move it aside to DIR.replaced-<time>
                             (never delete it) and start afresh;
  anything else              refuse, with or without ``overwrite``: never touch what we did not
                             create.

`precheck` makes this decision read-only, before any data is loaded or compiled, so a refused
run changes nothing. `claim` makes it again under the lock (another process may have started in
between), then moves aside or writes the marker and config, and verifies that every JSON file and
mask a resume will read is readable.

A run of several processes (see ``hosts``) is one run: process 0 makes these decisions and holds
the lock for all; the others wait for its decision (or its refusal, which they raise too) before
computing anything, then check that they see the workdir it claimed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import shutil
from typing import Iterator, Optional

from sparse_robust.runs import hosts
from sparse_robust.runs import store
from sparse_robust.runs.errors import WorkdirError, DiskError
from sparse_robust.runs.layout import MARKER, Layout
from sparse_robust.runs.lock import WorkdirLock

FORMAT = 1
_MIN_FREE_BYTES = 64 << 20
_OWN_DEBRIS = (".lock",)  # files a claim creates before the marker


def run_id(fields: dict) -> str:
    """A short digest of the result-affecting config: every record of a run carries it."""
    text = json.dumps(store.to_json(fields), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Inspection:
    kind: str                    # "absent" | "empty" | "workdir" | "foreign"
    config: Optional[dict] = None


def inspect(layout: Layout) -> Inspection:
    root = layout.root
    if not os.path.lexists(root):
        return Inspection("absent")
    if not os.path.isdir(root):
        return Inspection("foreign")
    entries = [e for e in os.listdir(root) if e not in _OWN_DEBRIS]
    if not entries:
        return Inspection("empty")
    if not os.path.isfile(layout.marker):
        return Inspection("foreign")
    store.read_json(layout.marker)
    if not os.path.isfile(layout.config):
        raise WorkdirError(f"{layout.config} is missing from the workdir {root}; restore it, or "
                           "choose another --workdir.")
    return Inspection("workdir", store.read_json(layout.config))


def _diff(old, new, prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two nested dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key, "<missing>"), new.get(key, "<missing>"), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def decide(layout: Layout, inspection: Inspection, fields: dict, overwrite: bool) -> str:
    """"new", "resume" or "replace"; WorkdirError for everything a run may not do."""
    if inspection.kind in ("absent", "empty"):
        return "new"
    if inspection.kind == "foreign":
        raise WorkdirError(
            f"{layout.root} exists and is not a sparse_robust workdir (no {MARKER}); choose a new "
            "or empty directory (--overwrite never touches a directory that is not a workdir).")
    differences = _diff(inspection.config, store.to_json(fields))
    if not differences:
        return "resume"
    if not overwrite:
        shown = "; ".join(differences[:6]) + ("; ..." if len(differences) > 6 else "")
        raise WorkdirError(f"{layout.root} holds a run with another config ({shown}); use another "
                           "--workdir, or pass --overwrite to move that run aside and start afresh.")
    return "replace"


def nearest_existing(path: str) -> str:
    """`path` or its nearest ancestor that exists."""
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_writable(layout: Layout) -> None:
    """The workdir (or the folder it will be created in) must be writable with some room."""
    where = nearest_existing(layout.root)
    if not os.path.isdir(where):
        raise WorkdirError(f"cannot create --workdir={layout.root}: {where} is a file, not a "
                           "folder; choose another --workdir.")
    if not os.access(where, os.W_OK | os.X_OK):
        raise DiskError(f"cannot write to {where}: permission denied or read-only; choose another "
                        "--workdir.")
    free = shutil.disk_usage(where).free
    if free < _MIN_FREE_BYTES:
        raise DiskError(f"only {free >> 20} MiB free at {where}; free some space or choose another "
                        "--workdir.")


def precheck(layout: Layout, fields: dict, overwrite: bool) -> str:
    """The decision of `claim`, made read-only (nothing is created or changed) by process 0."""
    def check() -> str:
        decision = decide(layout, inspect(layout), fields, overwrite)
        check_writable(layout)
        return decision

    return hosts.on_primary(check, f"the check of {layout.root}")


def verify_files(layout: Layout) -> None:
    """Every JSON file and mask a resume reads must parse: a damaged one is named now, before any
    compute, rather than after an hour of training."""
    for path in layout.json_files():
        (store.read_jsonl if path.endswith(".jsonl") else store.read_json)(path)
    for *_, files in layout.units():
        if os.path.exists(files.mask):
            store.read_mask_arrays(files.mask)


def _start(layout: Layout, fields: dict) -> None:
    store.write_json(layout.config, fields)
    store.write_json(layout.marker, {"format": FORMAT, "run_id": run_id(fields),
                                     "created": datetime.datetime.now().isoformat(timespec="seconds")})


def _take(layout: Layout, fields: dict, overwrite: bool) -> tuple[WorkdirLock, str]:
    """Lock the workdir and start or resume the run there: (the held lock, the decision)."""
    precheck(layout, fields, overwrite)
    with store.writing(layout.root):
        os.makedirs(layout.root, exist_ok=True)
    lock = WorkdirLock(layout.lock, layout.root).acquire()
    try:
        decision = decide(layout, inspect(layout), fields, overwrite)
        if decision == "replace":
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
            with store.writing(layout.root):
                os.rename(layout.root, layout.replaced(stamp))
                os.makedirs(layout.root)
            old, lock = lock, WorkdirLock(layout.lock, layout.root).acquire()
            old.release()
        if decision == "resume":
            verify_files(layout)
        else:
            _start(layout, fields)
    except BaseException:
        lock.release()
        raise
    return lock, decision


def _check_shared(layout: Layout, fields: dict) -> None:
    """Every process must see the marker process 0 wrote: they read what it writes."""
    if not (os.path.isfile(layout.marker)
            and store.read_json(layout.marker).get("run_id") == run_id(fields)):
        raise WorkdirError(f"{layout.marker}, written by process 0, is not visible here: "
                           "--workdir must be a directory that every process shares (one file "
                           "system).")


@contextlib.contextmanager
def claim(layout: Layout, fields: dict, overwrite: bool = False) -> Iterator[str]:
    """Hold ``layout``'s workdir for a run of ``fields``; yields "new", "resume" or "replace"."""
    held = []

    def take() -> str:
        lock, decision = _take(layout, fields, overwrite)
        held.append(lock)
        return decision

    try:
        decision = hosts.on_primary(take, f"the claim of {layout.root}")
        if hosts.count() > 1:
            hosts.agree(lambda: _check_shared(layout, fields), f"the claim of {layout.root}")
        yield decision
    finally:
        for lock in held:
            lock.release()
