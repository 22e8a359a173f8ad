"""An exclusive lock on a workdir, held by the running process.

``fcntl.flock`` on ``WORKDIR/.lock``: the kernel releases it when the holder exits, even by
``kill -9``, so a lock left by a dead process is simply taken over by the next run. The file
holds the holder's pid, host and start time, so a refused process can name it.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from typing import Optional

from absl import logging

from sparse_robust.runs.errors import WorkdirError


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since "
            f"{holder.get('started', '?')}")


class WorkdirLock:
    """``with WorkdirLock(path):`` holds the lock, or raises WorkdirError naming the holder."""

    def __init__(self, path: str, workdir: str):
        self.path, self.workdir = path, workdir
        self._file = None

    def _read_holder(self) -> Optional[dict]:
        try:
            self._file.seek(0)
            text = self._file.read()
            return json.loads(text) if text.strip() else None
        except (OSError, ValueError):
            return None

    def acquire(self) -> "WorkdirLock":
        self._file = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read_holder() or {}
            self._file.close()
            self._file = None
            raise WorkdirError(f"{self.workdir} is in use by another run ({_describe(holder)}); "
                               "wait for it to finish or stop it, or choose another --workdir."
                               ) from None
        previous = self._read_holder()
        if previous:  # The kernel dropped the lock when that process died.
            logging.warning("Taking over %s: the lock of %s was left by a process that is no "
                            "longer running.", self.workdir, _describe(previous))
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().isoformat(timespec="seconds")}
        self._file.seek(0)
        self._file.truncate()
        self._file.write(json.dumps(holder))
        self._file.flush()
        return self

    def release(self) -> None:
        if self._file is not None:
            # Empty the file first: a holder found there later means the process died.
            self._file.seek(0)
            self._file.truncate()
            self._file.flush()
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
