"""A run spread over several processes (one per host): every process computes, process 0 decides
and writes.

Every process runs the same program on its devices' share of each global batch, so params,
masks and optimizer state are the same replicated arrays everywhere. The workdir must be on a
file system every process shares, and it changes only at points that every process reaches
together, so every process reads the same state (when it resumes, too):

- a file that only process 0 writes (JSON records, masks, the report) goes through `on_primary`:
  every process waits there until all have arrived, process 0 writes, and every process gets
  the outcome (the value, or process 0's error raised again). A read before that point sees the
  old file on every process, a read after it the new one.
- checkpoints are saved by every process together; orbax coordinates them.
- `agree` runs a check on every process and, when it fails on one, raises on all (a dataset
  missing on one host, a config that differs), so no process is left waiting for one that quit.

With one process, each of these just calls its argument: a single-process run is unchanged.

The processes talk through JAX's distributed runtime (its key-value store and barriers). When a
process dies, the others fail at their next collective operation (its connections close), or
JAX's runtime stops them once it has missed the dead one's heartbeats for the heartbeat timeout.
`lost_contact` recognises the first kind of failure so that the CLI prints one line and exits
with `LOST_EXIT_CODE` instead of waiting for the others at exit.
"""

from __future__ import annotations

import contextvars
import dataclasses
import itertools
import json
import os
import re
import sys
from typing import Any, Callable, Optional, TypeVar

import jax

from sparse_robust import data as data_lib
from sparse_robust import parallel
from sparse_robust.runs import errors

T = TypeVar("T")

LOST_EXIT_CODE = 3
# How long a process waits for the others at a sync point: long, since one may legitimately be
# busy (process 0 writing the report); a dead process is noticed sooner by JAX's heartbeats.
_WAIT_MS = 30 * 60 * 1000
# What collectives (gloo on CPU, NCCL on GPU) and the coordination service say when a peer is gone.
_LOST = re.compile(r"gloo .*failed|nccl|coordination service|heartbeat|barrier timed out|"
                   r"connection (closed|reset)|socket closed", re.IGNORECASE)
# Every sync point gets the next number: each process passes the same points in the same order.
_sync_points = itertools.count()
# True while process 0 runs an `on_primary` function: what it calls runs alone, without syncs.
_alone = contextvars.ContextVar("alone", default=False)


class LostContact(Exception):
    """Waiting for the other processes failed: one of them is gone (or hangs)."""


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process finds the others; None: detected from the launcher's environment (SLURM,
    Open MPI, TPU pods; see ``jax.distributed.initialize``)."""
    coordinator_address: Optional[str] = None   # HOST:PORT of process 0
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    heartbeat_timeout: int = 100                # seconds of silence before a process is dead

    @property
    def explicit(self) -> bool:
        return any(v is not None for v in (self.coordinator_address, self.num_processes,
                                           self.process_id))


def join(launch: Launch = Launch()) -> None:
    """Join the run's other processes (a no-op once joined); before any other JAX call."""
    if jax.distributed.is_initialized():
        return
    try:
        parallel.initialize_distributed(launch.coordinator_address, launch.num_processes,
                                        launch.process_id,
                                        heartbeat_timeout=launch.heartbeat_timeout)
    except (RuntimeError, ValueError, TypeError) as err:
        raise errors.LaunchError(
            f"cannot join the other processes of the run ({_first_line(err)}); give every "
            "process the same --coordinator_address=HOST:PORT and --num_processes=N and its own "
            "--process_id, or launch under SLURM, Open MPI or a TPU pod with "
            "--config.parallel.distributed=True.") from None


def count() -> int:
    return jax.process_count()


def index() -> int:
    return jax.process_index()


def is_primary() -> bool:
    return index() == 0


def _client():
    # JAX's distributed client has no public accessor; orbax reaches it the same way.
    from jax._src import distributed
    return distributed.global_state.client


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def _wait(call: Callable[[], T], what: str) -> T:
    try:
        return call()
    except jax.errors.JaxRuntimeError as err:
        raise LostContact(f"waiting for the other processes at {what}: {_first_line(err)}") \
            from None


def _user_errors() -> dict:
    """The errors the CLI prints as one line, by class name (to raise one again elsewhere)."""
    found, todo = {}, [errors.UserError, data_lib.DataError]
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo += cls.__subclasses__()
    return found


def _outcome(err: BaseException) -> dict:
    """What the other processes learn of an error raised here."""
    name = type(err).__name__
    if name in _user_errors():
        return {"error": name, "message": str(err)}
    return {"error": None, "message": f"{name}: {_first_line(err)}"}


def _raise_remote(outcome: dict, process: int) -> None:
    """Raise here the error that ``process`` reported."""
    if outcome["error"] is None:  # not the user's mistake: its traceback is in that process's log
        raise errors.ProcessError(f"process {process} of {count()} stopped: {outcome['message']}")
    raise _user_errors()[outcome["error"]](outcome["message"])


def on_primary(fn: Callable[[], T], what: str) -> T:
    """``fn()`` run by process 0 only, once every process has arrived here; every process
    returns its value (JSON) or raises its error. ``fn`` may call `on_primary` (it then runs
    directly) but no collective operation."""
    if count() == 1 or _alone.get():
        return fn()
    key, client = f"sparse_robust/{next(_sync_points)}", _client()
    _wait(lambda: client.wait_at_barrier(f"{key}/arrived", _WAIT_MS), what)
    if is_primary():
        token = _alone.set(True)
        try:
            value = fn()
        except BaseException as err:
            client.key_value_set(key, json.dumps(_outcome(err)))
            raise
        finally:
            _alone.reset(token)
        client.key_value_set(key, json.dumps({"value": value}))
        return value
    outcome = json.loads(_wait(lambda: client.blocking_key_value_get(key, _WAIT_MS), what))
    if "value" not in outcome:
        _raise_remote(outcome, 0)
    return outcome["value"]


def gather(value: Any, what: str) -> list:
    """The JSON ``value`` of every process, in process order."""
    if count() == 1:
        return [value]
    key, client = f"sparse_robust/{next(_sync_points)}", _client()
    client.key_value_set(f"{key}/{index()}", json.dumps(value))
    return [json.loads(_wait(lambda i=i: client.blocking_key_value_get(f"{key}/{i}", _WAIT_MS),
                             what))
            for i in range(count())]


def agree(fn: Callable[[], T], what: str) -> T:
    """``fn()`` on every process; when it raises on any, every process raises (the first
    failing process's error, named after it)."""
    if count() == 1:
        return fn()
    try:
        value, own = fn(), None
    except Exception as err:  # reported to the others, then raised here as it was
        value, own = None, err
    outcomes = gather({"ok": True} if own is None else _outcome(own), what)
    for process, outcome in enumerate(outcomes):
        if "ok" not in outcome:
            if process == index():
                raise own
            if outcome["error"] is not None:
                outcome["message"] = f"on process {process} of {count()}: {outcome['message']}"
            _raise_remote(outcome, process)
    return value


def lost_contact(err: BaseException) -> Optional[str]:
    """The one-line message when ``err`` means that another process of the run is gone."""
    if not jax.distributed.is_initialized():
        return None
    seen = err
    while seen is not None:
        if isinstance(seen, LostContact) or _LOST.search(str(seen)):
            return (f"process {index()} of {count()} lost contact with the other processes of "
                    f"this run (one has probably died: see its log): {_first_line(seen)}; run "
                    "the same command on every process to resume.")
        seen = seen.__cause__ or seen.__context__
    return None


def abandon(code: int) -> None:
    """Exit now, without waiting for the other processes at JAX's shutdown barrier (the run is
    broken: they will not come)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
