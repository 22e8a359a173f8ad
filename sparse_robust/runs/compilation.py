"""The persistent XLA compilation cache the CLI turns on: a program one process compiled (a train
step, an attack's stage at one chunk size) is read from disk by the next process that needs it, a
resumed run or the next config, instead of being compiled again.

It changes no number: JAX keys each entry by the program, its compile options, the devices and the
jax/XLA versions, and stores the executable XLA would build again. Entries are JAX's own files
(``*-cache``, ``*-atime``); past ``MAX_BYTES`` JAX deletes the least recently used of them, and
nothing else in the folder.
"""

from __future__ import annotations

import os
from typing import Optional

import jax

from sparse_robust.models import native
from sparse_robust.runs.errors import UserError
from sparse_robust.runs.workdir import nearest_existing

FLAG = "--compilation_cache"
# Programs that compile faster than this are not worth a file (JAX's default is 1 s; an
# attack's stage or a train step takes 1-6 s on 2 CPU cores, an evaluation's small programs less).
MIN_COMPILE_SECS = 0.1
MAX_BYTES = 4 << 30


def default_dir() -> str:
    """$JAX_COMPILATION_CACHE_DIR where set, else `xla` in the folder the CPU kernels are kept in
    (`models.native.cache_dir()`: ~/.cache/sparse_robust by default)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    return str(native.cache_dir() / "xla")


def use_compilation_cache(path: str) -> Optional[str]:
    """Point JAX's persistent compilation cache at the folder `path` (created if missing) and
    return it; an empty `path` turns the cache off and returns None. Call it before anything
    compiles. A folder that cannot be created or written is a `UserError` naming the fix, raised
    before anything is created."""
    if not path:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    path = os.path.abspath(os.path.expanduser(path))
    where = nearest_existing(path)
    if not os.path.isdir(where):
        raise UserError(f"cannot create {FLAG}={path}: {where} is a file, not a folder; choose "
                        f"another {FLAG}, or pass {FLAG}= to compile without a cache.")
    if not os.access(where, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {FLAG}={path} ({where} is read-only or not yours); "
                        f"choose another {FLAG}, or pass {FLAG}= to compile without a cache.")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
    if jax.config.jax_compilation_cache_max_size == -1:  # unbounded unless the user chose a size
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path
