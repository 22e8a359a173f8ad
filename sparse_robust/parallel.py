"""Data parallelism over every device the run is given, with ``jax.sharding``.

One mesh axis, ``data``: batches (and the attacks inside the train step, which act per example)
are split along it; params, masks, optimizer state and the in-memory dataset are replicated.
The same config runs unchanged on 1 or N devices, local or across processes (one per host, see
``initialize_distributed``); the global batch size is the config's and must divide evenly across
the devices. Across processes every process holds the same host data and ``put`` hands each
device its own share, so each process feeds only its devices' part of every global batch.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of all hosts)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding that keeps a whole copy on every device of ``mesh`` (params, data)."""
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
    """Split axis ``batch_axis`` over the data axis, replicate the rest."""
    return NamedSharding(mesh, P(*([None] * batch_axis), DATA_AXIS))


def num_shards(mesh: Optional[Mesh]) -> int:
    """How many parts a batch is split into over ``mesh`` (1 without a mesh)."""
    return 1 if mesh is None else mesh.shape[DATA_AXIS]


def check_divisible(batch_size: int, mesh: Optional[Mesh], what: str = "batch size") -> None:
    """Raises ValueError (naming ``what`` and a fix) unless ``batch_size`` splits evenly over
    the devices of ``mesh``."""
    n = num_shards(mesh)
    if batch_size % n:
        raise ValueError(f"The {what} {batch_size} does not divide across {n} devices; choose a "
                         f"multiple of {n} (e.g. {max(n, batch_size // n * n)}).")


def put(tree: Any, sharding: NamedSharding) -> Any:
    """Place a host or device pytree with ``sharding``; works across hosts too.

    Every host must hold the same global values (our data and indices are pure functions of
    the seed, so they do).
    """
    def place(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree_util.tree_map(place, tree)


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, *,
                           heartbeat_timeout: int = 100,
                           initialization_timeout: int = 300) -> None:
    """Join the other processes of a multi-process run: one call per process, before any other
    JAX call. Arguments left ``None`` are detected from the launcher's environment by
    ``jax.distributed.initialize`` (SLURM, Open MPI, TPU pods; ``JAX_COORDINATOR_ADDRESS``).

    A process that sends no heartbeat for ``heartbeat_timeout`` seconds is declared dead and JAX
    stops the others; a process that ends waits as long for the others to end;
    ``initialization_timeout`` bounds the wait for every process to join.
    """
    # Cross-process collectives on CPU need an implementation (gloo ships with jaxlib). The
    # backend is not known before initialisation, so set it unless the platforms exclude CPU.
    if "cpu" in (jax.config.jax_platforms or "cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=initialization_timeout,
                               heartbeat_timeout_seconds=heartbeat_timeout,
                               shutdown_timeout_seconds=heartbeat_timeout)
