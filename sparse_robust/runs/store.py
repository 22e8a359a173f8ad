"""Reading and writing the workdir's files: JSON records, masks, orbax checkpoints.

Every write is atomic (a temporary file or directory, then a rename), so a kill leaves the old
file or the new one, never half of one. Every failure names the file: a file that cannot be read
is a `CorruptFileError`, a write refused for lack of space or permission a `DiskError`.

In a multi-process run (see ``hosts``) every process calls the same functions in the same order:
process 0 alone writes JSON files and masks, every process saves checkpoints together (as orbax
expects) and every process reads what it needs, each restoring checkpoints in full onto its own
first device, as a single process would.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import sys
import zipfile
from typing import Any, Iterator, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from sparse_robust import masks as masks_lib
from sparse_robust.runs import hosts
from sparse_robust.runs.errors import CorruptFileError, DiskError

_DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied"}


def disk_error(err: BaseException, path: str) -> Optional[DiskError]:
    """A DiskError for ``err`` (or any exception in its cause chain) when it is a full disk or a
    refused permission; None for anything else."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _DISK_ERRNOS:
            where = seen.filename or path
            return DiskError(f"cannot write {where}: {_DISK_ERRNOS[seen.errno]}; free space or fix "
                             "the permissions, then run the same command again to resume.")
        seen = seen.__cause__ or seen.__context__
    return None


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
    """Turns a full disk or a refused write under this block into a DiskError naming ``path``."""
    try:
        yield
    except Exception as err:  # orbax wraps OSErrors in its own exceptions
        converted = disk_error(err, path)
        if converted is None:
            raise
        raise converted from None


def _finite(obj):
    """JSON has no NaN or infinity: non-finite floats become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _plain(obj):
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def to_json(obj: Any) -> Any:
    """``obj`` as plain JSON values (numpy scalars and arrays converted, NaN/inf as None)."""
    return _finite(json.loads(json.dumps(obj, default=_plain)))


def _write_atomically(path: str, tmp: str, write_tmp) -> None:
    """``write_tmp(tmp)``, then rename ``tmp`` to ``path``; by process 0 alone."""
    def write():
        with writing(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_tmp(tmp)
            os.replace(tmp, path)

    hosts.on_primary(write, path)


def _write_text(path: str, text: str) -> None:
    def write_tmp(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _write_atomically(path, f"{path}.tmp", write_tmp)


def write_json(path: str, obj: Any) -> None:
    _write_text(path, json.dumps(to_json(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


def write_jsonl(path: str, records: list) -> None:
    _write_text(path, "".join(json.dumps(to_json(r), allow_nan=False) + "\n" for r in records))


def read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{path} is not valid JSON ({err}); restore it from a backup or "
                               "move it away.") from None


def read_jsonl(path: str) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{path} is not valid JSON lines ({err}); restore it or move it "
                               "away.") from None


def save_safetensors(path: str, arrays: dict, metadata: Optional[dict] = None) -> None:
    """{name: numpy array} as a safetensors file (e.g. a PyTorch state dict), atomically."""
    import safetensors.numpy  # only the export needs it
    _write_atomically(path, f"{path}.tmp",
                      lambda tmp: safetensors.numpy.save_file(arrays, tmp, metadata=metadata))


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """{name: numpy array} of a safetensors file; CorruptFileError when it is not one."""
    import safetensors.numpy
    try:
        return safetensors.numpy.load_file(path)
    except FileNotFoundError:
        raise CorruptFileError(f"{path} does not exist.") from None
    except Exception as err:  # safetensors raises its own SafetensorError for a damaged file
        raise CorruptFileError(f"{path} is not a readable safetensors file "
                               f"({str(err).strip()[:200] or type(err).__name__}).") from None


def save_mask(path: str, mask) -> None:
    arrays = masks_lib.mask_to_numpy(mask)
    # The .npz suffix keeps numpy from appending one to the temporary name.
    _write_atomically(path, f"{path}.tmp.npz", lambda tmp: np.savez_compressed(tmp, **arrays))


def load_mask(path: str, params) -> Any:
    """The mask saved at ``path`` for these params (structure checked)."""
    arrays = read_mask_arrays(path)
    try:
        return masks_lib.mask_from_numpy(params, arrays)
    except ValueError as err:
        raise CorruptFileError(f"{path} is not a readable mask for this model ({err}); move it "
                               "away to recompute it.") from None


def read_mask_arrays(path: str) -> dict[str, np.ndarray]:
    """{leaf name: bool array} of a saved mask, without the params (for the report)."""
    try:
        with np.load(path) as arrays:
            return {name: np.asarray(arrays[name], bool) for name in arrays.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise CorruptFileError(f"{path} is not a readable mask (a zip of boolean arrays: "
                               f"{type(err).__name__}); move it away to recompute it.") from None


def _abstract(tree):
    """What orbax restores ``tree``'s leaves as. Across processes: every leaf whole on this
    process's first device (each process reads the checkpoint in full), as with one process."""
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)
    if hosts.count() == 1:
        return abstract
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=local), abstract)


def _savable(tree):
    """Across processes, orbax saves numpy arrays and global arrays but refuses arrays on one
    process's device; those (identical on every process) are saved from the host."""
    if hosts.count() == 1:
        return tree
    return jax.tree_util.tree_map(
        lambda x: np.asarray(x) if isinstance(x, jax.Array) and x.is_fully_addressable else x,
        tree)


def exists(path: str) -> bool:
    return os.path.isdir(path)


def save_tree(path: str, tree: Any) -> None:
    """Save ``tree`` at ``path`` (a directory that must not exist yet), synchronously."""
    with writing(path), ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.abspath(path), _savable(tree))


def save_tree_if_missing(path: str, tree: Any) -> None:
    if not exists(path):
        save_tree(path, tree)


def _silence_closed_loop_callbacks() -> None:
    """After a failed orbax restore, tensorstore's other pending reads finish into the asyncio
    loop orbax already closed; Python then prints their "Event loop is closed" as unraisable
    tracebacks, after our one-line error. Drop exactly those (every other report passes)."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_callbacks", False):
        return

    def hook(unraisable):
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_closed_loop_callbacks = True
    sys.unraisablehook = hook


def _unreadable(path: str, err: Exception) -> CorruptFileError:
    _silence_closed_loop_callbacks()
    reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    return CorruptFileError(f"the checkpoint {path} cannot be restored ({reason}); move it away "
                            "and run again to recompute it.")


def load_tree(path: str, like: Any) -> Any:
    """The pytree at ``path`` with the structure, shapes and dtypes of ``like``."""
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(os.path.abspath(path), _abstract(like))
    except Exception as err:  # orbax/tensorstore raise many types for a damaged checkpoint
        raise _unreadable(path, err) from None


def load_tree_raw(path: str) -> Any:
    """The pytree at ``path`` as saved (no template), e.g. for the report; read by this process
    alone (the report is process 0's)."""
    options = {}
    if hosts.count() > 1:  # no barriers with processes that are not reading
        options["multiprocessing_options"] = ocp.options.MultiprocessingOptions(
            primary_host=hosts.index(), active_processes={hosts.index()})
    try:
        with ocp.StandardCheckpointer(**options) as checkpointer:
            return checkpointer.restore(os.path.abspath(path))
    except Exception as err:
        raise _unreadable(path, err) from None


def to_host(tree: Any) -> Any:
    """Device arrays -> numpy, e.g. to keep a copy that later donated buffers cannot invalidate."""
    return jax.tree_util.tree_map(np.asarray, tree)


class ProgressCheckpointer:
    """Periodic checkpoints of a training run: a pytree (train state and friends) plus JSON.

    Keeps only the newest checkpoint. ``restore_latest(like)`` returns ``(step, tree, extras)`` or
    None when there is nothing to resume from.
    """

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                               enable_async_checkpointing=False)
        with writing(self.directory):
            self._manager = ocp.CheckpointManager(self.directory, options=options,
                                                  item_names=("tree", "extras"))

    def save(self, step: int, tree: Any, extras: dict) -> None:
        with writing(self.directory):
            self._manager.save(step, args=ocp.args.Composite(
                tree=ocp.args.StandardSave(_savable(tree)),
                extras=ocp.args.JsonSave(to_json(extras))),
                force=True)

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def restore_latest(self, like: Any) -> Optional[tuple[int, Any, dict]]:
        step = self._manager.latest_step()
        if step is None:
            return None
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(tree=ocp.args.StandardRestore(_abstract(like)),
                                              extras=ocp.args.JsonRestore()))
        except Exception as err:
            raise _unreadable(os.path.join(self.directory, str(step)), err) from None
        return step, restored["tree"], restored["extras"]

    def close(self) -> None:
        self._manager.close()
