"""Max-pooling over non-overlapping windows as primitives: CPU kernels where they serve, XLA ops
elsewhere.

XLA:CPU runs a pool of few channels at a fraction of memory speed, its gradient worse: LeNet-5's
first pool (113 images, 28x28x6) took 0.15 ms forward and 0.6 ms for its gradient, more than
the convolution before it. `pool_cpu.cc` serves 2x2 windows of at most 16 channels (LeNet-5's)
with vectors that hold a window's column for every channel at once.

Three primitives: `max_pool(x, window)`; `select(x, t)`, the element of `t` at each window's
first maximum of x (the pool's tangent, linear in t); and `scatter(x, ct)`, its transpose in t
(the pool's gradient). x's argmax is piecewise constant, so neither depends differentiably on x:
derivatives of any order, `vmap` (folded into the image axis), `jit` and `scan` work. The tie
rule is `select_and_scatter_add`'s: the first maximum of a window, in row-major order.
`max_pool` binds them where the kernel `serves`; elsewhere it runs as XLA ops: each window's
maximum, and for the tangent the position of its first maximum (found in the forward pass) and
a masked sum, whose transpose is one masked broadcast.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.interpreters import ad, batching

from sparse_robust.models import native

SOURCE = Path(__file__).with_name("pool_cpu.cc")
MAX_CHANNELS = 16


def serves(x, window) -> bool:
    """Whether the kernel runs the pool of `x` by `window`: 2x2 windows of at most 16 float32
    channels, on one CPU device (across devices XLA's partitioner would gather an FFI call's
    operands), where the kernel could be built."""
    return (tuple(window) == (2, 2) and x.shape[-1] <= MAX_CHANNELS
            and x.dtype == jnp.float32 and jax.default_backend() == "cpu"
            and jax.device_count() == 1 and _load() is None)


def _load() -> str | None:
    return native.load(SOURCE, ((max_pool_p, "SparseRobustMaxPool"),
                                (select_p, "SparseRobustPoolSelect"),
                                (scatter_p, "SparseRobustPoolScatter")))


def max_pool(x: jax.Array, window: tuple[int, int], use_kernel: bool | None = None) -> jax.Array:
    """Each window's maximum of NHWC `x`, whose height and width are multiples of `window`; on
    the kernel where `use_kernel` (default: where it `serves`), else as XLA ops."""
    window = tuple(map(int, window))
    if serves(x, window) if use_kernel is None else use_kernel and serves(x, window):
        return max_pool_p.bind(x, wh=window[0], ww=window[1])
    return _xla_pool(x, window)


def _windows(x, wh, ww):
    """(N, H, W, C) -> (N, H/wh, wh, W/ww, ww, C): a free reshape."""
    n, h, w, c = x.shape
    return x.reshape(n, h // wh, wh, w // ww, ww, c)


def _maxima(x, wh, ww):
    """Each window's maximum and the row-major position of its first maximum, both kept as
    (N, H/wh, 1, W/ww, 1, C), and the positions (1, 1, wh, 1, ww, 1)."""
    windows = _windows(x, wh, ww)
    pooled = jnp.max(windows, axis=(2, 4), keepdims=True)
    position = jnp.arange(wh * ww).reshape(1, 1, wh, 1, ww, 1)
    first = jnp.min(jnp.where(windows == pooled, position, wh * ww), axis=(2, 4), keepdims=True)
    return pooled, first, position


def _pick(first, position, t, wh, ww):
    """The element of t at each window's first maximum: a masked sum, whose transpose is one
    masked broadcast."""
    return jnp.sum(jnp.where(position == first, _windows(t, wh, ww), 0), axis=(2, 4))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _xla_pool(x, window):
    return jnp.max(_windows(x, *window), axis=(2, 4))


@_xla_pool.defjvp
def _xla_pool_jvp(window, primals, tangents):
    # The first maxima are found once, in the forward pass; reverse mode keeps them.
    (x,), (x_dot,) = primals, tangents
    pooled, first, position = _maxima(x, *window)
    return pooled[:, :, 0, :, 0], _pick(first, position, x_dot, *window)


# The primitives' lowering where the kernel is not registered: the same XLA ops.
def _reference_pool(x, *, wh, ww):
    return _xla_pool(x, (wh, ww))


def _reference_select(x, t, *, wh, ww):
    _, first, position = _maxima(x, wh, ww)
    return _pick(first, position, t, wh, ww)


def _reference_scatter(x, ct, *, wh, ww):
    aval = jax.ShapeDtypeStruct(x.shape, ct.dtype)
    return jax.linear_transpose(lambda t: _reference_select(x, t, wh=wh, ww=ww), aval)(ct)[0]


def _pooled(x, wh, ww):
    if x.ndim != 4 or x.shape[1] % wh or x.shape[2] % ww:
        raise ValueError(f"pool_cpu takes an NHWC batch whose height and width are multiples of "
                         f"the window {(wh, ww)}, not {x.shape}")
    n, h, w, c = x.shape
    return jax.core.ShapedArray((n, h // wh, w // ww, c), x.dtype)


def _fold_batch(primitive, args, dims, **params):
    """vmap: the mapped axis joins the image axis (every window lies within one image)."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    args = [batching.bdim_at_front(a, d, size) for a, d in zip(args, dims)]
    out = primitive.bind(*(a.reshape((-1,) + a.shape[2:]) for a in args), **params)
    return out.reshape((size, -1) + out.shape[1:]), 0


def _define(name, abstract_eval, reference):
    primitive = native.define_primitive(name, abstract_eval, reference, static=("wh", "ww"))
    batching.primitive_batchers[primitive] = functools.partial(_fold_batch, primitive)
    return primitive


max_pool_p = _define("sparse_robust_max_pool", lambda x, *, wh, ww: _pooled(x, wh, ww),
                     _reference_pool)
select_p = _define("sparse_robust_pool_select",
                   lambda x, t, *, wh, ww: _pooled(x, wh, ww).update(dtype=t.dtype),
                   _reference_select)
scatter_p = _define("sparse_robust_pool_scatter",
                    lambda x, ct, *, wh, ww: jax.core.ShapedArray(x.shape, ct.dtype),
                    _reference_scatter)


def _pool_jvp(primals, tangents, **params):
    (x,), (x_dot,) = primals, tangents
    pooled = max_pool_p.bind(x, **params)
    if type(x_dot) is ad.Zero:
        return pooled, ad.Zero.from_primal_value(pooled)
    return pooled, select_p.bind(x, x_dot, **params)


def _linear_in_second(primitive, transpose):
    """JVP and transpose rules of a primitive linear in its second operand and constant in its
    first (x's argmax does not move under a small change of x)."""
    def jvp(primals, tangents, **params):
        (x, t), (_, t_dot) = primals, tangents
        out = primitive.bind(x, t, **params)
        if type(t_dot) is ad.Zero:
            return out, ad.Zero.from_primal_value(out)
        return out, primitive.bind(x, t_dot, **params)

    def transpose_rule(ct, x, t, **params):
        if type(ct) is ad.Zero:
            return None, ad.Zero(t.aval)
        return None, transpose.bind(x, ct, **params)

    ad.primitive_jvps[primitive] = jvp
    ad.primitive_transposes[primitive] = transpose_rule


ad.primitive_jvps[max_pool_p] = _pool_jvp
_linear_in_second(select_p, scatter_p)
_linear_in_second(scatter_p, select_p)
