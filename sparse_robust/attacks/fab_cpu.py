"""FAB's projection as one CPU kernel: `project(points, w, b, norm, clip_min, clip_max)` is
`fab.project_to_hyperplane_in_box`, computed row by row in `fab_cpu.cc`.

In XLA ops the projection (a water-filling over each row) reads and writes [2B, D] arrays about
fifteen times per FAB step, and costs more than the model's passes on a small network; the kernel
keeps a row in cache from start to end. On 608 rows of dense-300-100 (`benchmarks/
fab_projection.py`, 2 CPU cores): one projection 1.0 ms against 4.0 ms, one FAB-T pass 0.51 s
against 0.78 s.

`project` binds a primitive whose lowering is the XLA-ops form, except on CPU for float32 where
the kernel could be built (`native`, cached like the model kernels); rows are independent, so
`vmap` runs the batch as more rows. Same algorithm, same stopping rule; the sums run in another
order, so results agree with the XLA form to float rounding. No derivative: FAB does not
differentiate through its projection (the inputs are stop-gradiented).
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from sparse_robust.models import native

SOURCE = Path(__file__).with_name("fab_cpu.cc")


def _reference(points, w, b, *, norm, clip_min, clip_max):
    from sparse_robust.attacks.fab import project_to_hyperplane_in_box
    return project_to_hyperplane_in_box(points, w, b, norm, clip_min, clip_max)


def _on_cpu(points, w, b, *, norm, clip_min, clip_max):
    """The CPU lowering: the kernel for float32, the XLA-ops form for anything else."""
    if any(a.dtype != jnp.float32 for a in (points, w, b)):
        return _reference(points, w, b, norm=norm, clip_min=clip_min, clip_max=clip_max)
    return jax.ffi.ffi_call("sparse_robust_fab_projection",
                            jax.ShapeDtypeStruct(points.shape, points.dtype))(
        points, w, b, l2=np.int32(norm == "l2"), clip_min=np.float32(clip_min),
        clip_max=np.float32(clip_max))


def _batch(args, dims, **params):
    """vmap: the mapped axis becomes more rows."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    points, w, b = (batching.bdim_at_front(a, d, size) for a, d in zip(args, dims))
    _, rows, dim = points.shape
    out = project_p.bind(points.reshape(-1, dim), w.reshape(-1, dim), b.reshape(-1), **params)
    return out.reshape(size, rows, dim), 0


@functools.cache
def _compiled(**params):
    return jax.jit(functools.partial(project_p.bind, **params))


project_p = Primitive("sparse_robust_fab_projection")
project_p.def_impl(lambda *args, **params: _compiled(**params)(*args))
project_p.def_abstract_eval(lambda points, w, b, **_: jax.core.ShapedArray(points.shape,
                                                                            points.dtype))
batching.primitive_batchers[project_p] = _batch
mlir.register_lowering(project_p, mlir.lower_fun(_reference, multiple_results=False))


@functools.cache
def _load() -> str | None:
    """Builds, loads and registers the kernel (once); None, or why it cannot run here."""
    return native.load(SOURCE, ((project_p, "SparseRobustFabProjection", _on_cpu),))


def available() -> bool:
    """Whether the kernel is built and registered with XLA (builds it on the first call)."""
    return _load() is None


def project(points, w, b, norm: str, clip_min: float = 0.0, clip_max: float = 1.0):
    """`fab.project_to_hyperplane_in_box(points, w, b, norm, clip_min, clip_max)` for points,
    w [N, D] and b [N]; the kernel on CPU where it can run, else the XLA-ops form."""
    _load()  # the CPU lowering is the kernel's once it is registered
    points, w, b = (jax.lax.stop_gradient(a) for a in (points, w, b))
    return project_p.bind(points, w, b, norm=norm, clip_min=float(clip_min),
                          clip_max=float(clip_max))
