"""A model's first dense layer, read from its forward pass, so that an attack whose proposals
change a few input features (Square's windows) can update that layer's output by the changed rows
of its kernel instead of recomputing it: on dense-300-100 the first layer is 88 % of a forward
pass. A layer that runs from its nonzeros (`models.sparse_execution`) is cheap already, and is
not one.

``dense_prefix(logits_fn, x)`` returns ``DensePrefix(kernel, bias, rest)`` when the forward pass
of `logits_fn` on a batch like `x` is ``rest(x.reshape(B, -1) @ kernel + bias)``, and None
otherwise. It does not trust a model's name: it checks, in the traced program, that

- the first `flax.linen.Dense` call is a plain ``nn.Dense`` (default dot product and dtypes, the
  kernel in x's dtype), so its output is ``flat(x) @ kernel + bias``, and it runs as a dense
  product (a ``dot_general``; not a sparse kernel an inner interceptor put in its place);
- that call's input is x through reshapes only (no normalisation, no transpose, no convolution
  before it);
- the logits depend on x only through that call: with its output replaced by ``h``, they are a
  function of ``h`` alone (no skip connection from the input).

Interception works through flax's ``nn.intercept_methods``, so models whose other layers run
through their own interceptors (``models.sparse_execution``) qualify too; a model outside flax, or
one whose forward pass is jitted on its own (the interceptor would not see the call), does not.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
from jax.extend import core

from sparse_robust.attacks.parts import LogitsFn


class DensePrefix(NamedTuple):
    """logits_fn(x) == rest(x.reshape(B, -1) @ kernel + bias)."""

    kernel: jax.Array  # [features of x, width]
    bias: jax.Array  # [width] (zeros for a layer without bias)
    rest: Callable[[jax.Array], jax.Array]  # first layer's output [B, width] -> logits

    def first(self, x: jax.Array) -> jax.Array:
        """The first layer's output on x (any shape [B, ...] with the kernel's features)."""
        return x.reshape(x.shape[0], -1) @ self.kernel + self.bias


class _FirstDense:
    """A flax interceptor on the first nn.Dense call of a forward pass: records its module, input,
    kernel and bias, and returns `output` in place of the call when one is given."""

    def __init__(self, output=None):
        self.output, self.module, self.input, self.weights = output, None, None, None
        self.result = None

    def __call__(self, next_fun, args, kwargs, context):
        module = context.module
        if self.module is None and context.method_name == "__call__" and isinstance(module, nn.Dense):
            self.module = module
            self.input = args[0] if args else kwargs.get("inputs")
            kernel = module.get_variable("params", "kernel")
            bias = module.get_variable("params", "bias") if module.use_bias else None
            self.weights = kernel, bias
            if self.output is not None:
                return self.output
            self.result = next_fun(*args, **kwargs)
            return self.result
        return next_fun(*args, **kwargs)


def _run(logits_fn: LogitsFn, x, output=None):
    probe = _FirstDense(output)
    with nn.intercept_methods(probe):
        logits = logits_fn(x)
    return logits, probe


def _plain(module, kernel, x) -> bool:
    """Whether `module` computes x @ kernel + bias in x's dtype, as DensePrefix.first does."""
    return (type(module) is nn.Dense and module.dot_general is None
            and module.dot_general_cls is None and module.precision is None
            and module.dtype in (None, x.dtype) and kernel.dtype == x.dtype and kernel.ndim == 2)


def _depends(closed: core.ClosedJaxpr, sources: Sequence[bool]) -> list[bool]:
    """Per output of `closed`: whether it depends on one of the inputs flagged in `sources`. An
    equation's outputs all depend on all its inputs (conservative for calls of sub-programs)."""
    jaxpr = closed.jaxpr
    reached = {v for v, flagged in zip(jaxpr.invars, sources) if flagged}
    for eqn in jaxpr.eqns:
        if any(isinstance(v, core.Var) and v in reached for v in eqn.invars):
            reached.update(eqn.outvars)
    return [isinstance(v, core.Var) and v in reached for v in jaxpr.outvars]


def _reshapes_of(producer: dict, var, source) -> bool:
    """Whether `var` is `source` through reshapes only (`producer`: var -> its equation)."""
    while isinstance(var, core.Var) and var in producer:
        eqn = producer[var]
        if eqn.primitive.name != "reshape":
            return False
        var = eqn.invars[0]
    return var is source


def _through_dot(producer: dict, var) -> bool:
    """Whether `var` is computed through a dot_general (`producer`: var -> its equation)."""
    pending, seen = [var], set()
    while pending:
        var = pending.pop()
        eqn = producer.get(var) if isinstance(var, core.Var) else None
        if eqn is None or id(eqn) in seen:
            continue
        if eqn.primitive.name == "dot_general":
            return True
        seen.add(id(eqn))
        pending.extend(eqn.invars)
    return False


def dense_prefix(logits_fn: LogitsFn, x: jax.Array) -> Optional[DensePrefix]:
    """The first dense layer of `logits_fn` and the rest of it, or None (see the module
    docstring). Traces `logits_fn` a few times; computes nothing that XLA does not remove."""
    _, probe = _run(logits_fn, x)
    if probe.module is None:
        return None
    kernel, bias = probe.weights
    features = x.size // x.shape[0]
    if not _plain(probe.module, kernel, x) or kernel.shape[0] != features:
        return None

    def first_call(z):
        # Its input and output as functions of x; both None where the call is not seen when
        # traced again (a forward pass jitted on its own replays its cached program).
        seen = _run(logits_fn, z)[1]
        return seen.input, seen.result

    call = jax.make_jaxpr(first_call)(x).jaxpr
    if len(call.outvars) != 2:
        return None
    producer = {v: eqn for eqn in call.eqns for v in eqn.outvars}
    call_input, call_output = call.outvars
    if not (_reshapes_of(producer, call_input, call.invars[0])
            and _through_dot(producer, call_output)):
        return None
    width = kernel.shape[1]
    h_like = jax.ShapeDtypeStruct((x.shape[0], width), x.dtype)
    program = jax.make_jaxpr(lambda z, h: _run(logits_fn, z, h)[0])(x, h_like)
    if any(_depends(program, [True, False])) or not all(_depends(program, [False, True])):
        return None
    bias = jax.numpy.zeros((width,), x.dtype) if bias is None else bias

    def rest(h):
        # x is dead in this program (checked above): XLA removes its part of the forward pass.
        return _run(logits_fn, x, h)[0]

    return DensePrefix(kernel, bias, rest)
