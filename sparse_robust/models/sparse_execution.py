"""Sparse execution of unstructured tickets: a ticket's dense layers computed from its nonzeros.

`sparse_model_fn(model, mask, sparse_impl)` is the library's model convention,
``model_fn(params, model_state, x, train) -> (logits, model_state)``, for `model` under `mask`:
the same function of the masked params as `training.make_model_fn(model)` (up to float
rounding), but each `nn.Dense` layer it runs sparse multiplies the input by the kernel's values
at the mask's nonzeros only (`sparse_cpu.matmul`, a C++ kernel on CPU). Attacks, the evaluator
and a training step take it wherever they take a model_fn, and differentiate through it: the
input gradient (attacks) is again a sparse product, and the kernel's gradient (training) is
computed at the nonzeros only and is zero elsewhere (the masked optimizer ignores it there).

Why a function of the mask and not a model field like `conv_impl`: the nonzeros fix the
program's shapes, so they must be known when it is traced, while the params inside a jitted
step are traced values; the mask is concrete where a ticket is evaluated. One function per mask
also keeps the model, its params and checkpoints exactly as they are.

`sparse_impl`: "dense" runs the masked-dense product everywhere; "sparse" every dense layer with
a mask; "auto" (default) those at or below `AUTO_MAX_DENSITY` of their weights alive, on CPU,
on one device and where the kernel could be built (`sparse_impls` reports the choice per layer).
Convolutions stay dense: their unstructured sparsity does not pay on CPU
(benchmarks/README.md, sparse_tickets).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparse_robust import masks as masks_lib
from sparse_robust import training
from sparse_robust.checks import check_choice
from sparse_robust.models import sparse_cpu

SPARSE_IMPLS = ("auto", "dense", "sparse")

# "auto" runs a dense layer sparse at or below this fraction of its weights alive: measured on
# dense-300-100 (benchmarks/sparse_tickets.py, PGD-40 on 1000 images, 2 CPU cores).
AUTO_MAX_DENSITY = 0.2


def _dense_kernels(mask) -> dict[tuple[str, ...], np.ndarray]:
    """{module path: its concrete 2-D kernel mask} of every dense layer's kernel in `mask`."""
    kernels = {}
    for name, leaf in masks_lib.named_leaves(mask).items():
        if leaf is None or name.split("/")[-1] != "kernel" or np.ndim(leaf) != 2:
            continue
        if isinstance(leaf, jax.core.Tracer):
            raise ValueError("sparse execution needs a concrete mask (its nonzeros fix the "
                             "program's shapes), not a traced one: build the model fn outside "
                             "jit / vmap")
        kernels[tuple(name.split("/")[:-1])] = np.asarray(leaf, bool)
    return kernels


def _runs_sparse(sparse_impl: str, density: float) -> bool:
    if sparse_impl == "auto":
        # Across devices XLA's partitioner cannot split an FFI call by batch; it would gather.
        return (density <= AUTO_MAX_DENSITY and jax.default_backend() == "cpu"
                and jax.device_count() == 1 and sparse_cpu.available())
    return sparse_impl == "sparse"


def sparse_impls(mask, sparse_impl: str = "auto") -> dict[str, str]:
    """{dense layer path "a/b": "sparse" or "dense"}: how each dense layer with a kernel mask
    runs under `sparse_model_fn(model, mask, sparse_impl)` here."""
    check_choice("sparse_impl", sparse_impl, SPARSE_IMPLS)
    return {"/".join(path): "sparse" if _runs_sparse(sparse_impl, kernel.mean()) else "dense"
            for path, kernel in _dense_kernels(mask).items()}


def patterns(mask, sparse_impl: str = "auto") -> dict[tuple[str, ...], sparse_cpu.Pattern]:
    """{module path: nonzero pattern} of the dense layers that run sparse."""
    check_choice("sparse_impl", sparse_impl, SPARSE_IMPLS)
    return {path: sparse_cpu.Pattern.of(kernel) for path, kernel in _dense_kernels(mask).items()
            if _runs_sparse(sparse_impl, kernel.mean())}


def _sparse_dense(module: nn.Dense, x, pattern: sparse_cpu.Pattern):
    """`module(x)` with the kernel's values at `pattern` only."""
    kernel = module.get_variable("params", "kernel")
    dtype = jnp.result_type(x, kernel)
    y = sparse_cpu.matmul(x.astype(dtype), pattern.gather(kernel).astype(dtype), pattern)
    if module.use_bias:
        y = y + module.get_variable("params", "bias").astype(dtype)
    return y


def sparse_model_fn(model: nn.Module, mask, sparse_impl: str = "auto"):
    """``model_fn(params, model_state, x, train) -> (logits, model_state)`` of `model` whose
    dense layers run from `mask`'s nonzeros where `sparse_impl` says (see the module docstring).
    `mask` must be concrete; the params passed later are assumed zero where it is False."""
    base = training.make_model_fn(model)
    chosen = patterns(mask, sparse_impl)
    if not chosen:
        return base

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if (context.method_name == "__call__" and isinstance(module, nn.Dense)
                and module.path in chosen):
            return _sparse_dense(module, jnp.asarray(args[0]), chosen[module.path])
        return next_fun(*args, **kwargs)

    def model_fn(params, model_state, x, train):
        with nn.intercept_methods(interceptor):
            return base(params, model_state, x, train)

    return model_fn
