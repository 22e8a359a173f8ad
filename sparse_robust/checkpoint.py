"""Orbax checkpoints: whole pytrees (θ0, trained weights) and resumable training progress.

Orbax writes each checkpoint to a temporary directory and renames it when complete, so a run
killed at any moment leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp


def _abstract(tree):
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


def save_pytree(path: str, tree: Any) -> None:
    """Save ``tree`` at ``path`` (a directory that must not exist yet), synchronously."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.abspath(path), tree)


def load_pytree(path: str, like: Any) -> Any:
    """Load the pytree at ``path`` with the structure, shapes and dtypes of ``like``."""
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(os.path.abspath(path), _abstract(like))


def exists(path: str) -> bool:
    return os.path.isdir(path)


def save_if_missing(path: str, tree: Any) -> None:
    """Save ``tree`` at ``path`` unless a (complete) checkpoint is already there."""
    if not exists(path):
        save_pytree(path, tree)


class ProgressCheckpointer:
    """Periodic checkpoints of a training run: a pytree (train state and friends) plus JSON.

    Keeps only the newest checkpoint. ``restore_latest(like)`` returns ``(step, tree, extras)`` or
    None when there is nothing to resume from.
    """

    def __init__(self, directory: str):
        options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                               enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                              item_names=("tree", "extras"))

    def save(self, step: int, tree: Any, extras: dict) -> None:
        self._manager.save(step, args=ocp.args.Composite(tree=ocp.args.StandardSave(tree),
                                                         extras=ocp.args.JsonSave(extras)),
                           force=True)

    def restore_latest(self, like: Any) -> Optional[tuple[int, Any, dict]]:
        step = self._manager.latest_step()
        if step is None:
            return None
        restored = self._manager.restore(
            step, args=ocp.args.Composite(tree=ocp.args.StandardRestore(_abstract(like)),
                                          extras=ocp.args.JsonRestore()))
        return step, restored["tree"], restored["extras"]

    def close(self) -> None:
        self._manager.close()


def to_host(tree: Any) -> Any:
    """Device arrays -> numpy, e.g. to keep a copy that later donated buffers cannot invalidate."""
    return jax.tree_util.tree_map(np.asarray, tree)
