"""The model convention of the library, and the one adapter between its two forms.

- Training and evaluation take ``model_fn(params, model_state, x, train) -> (logits,
  new_model_state)``: ``model_state`` holds the non-trainable collections (batch statistics, or
  an empty dict), ``train`` is a static Python bool. ``training.make_model_fn`` builds one from any
  flax module.
- Attacks take ``logits_fn(x) -> logits``: the model in eval mode with fixed weights, logits of
  shape [batch, classes].
- :func:`as_logits_fn` turns the first into the second. Nothing else converts between them.

A function of the wrong form is reported while it is traced (from shapes, no extra compute) by
one line naming the convention and the adapter.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

ModelFn = Callable[[Any, Any, jax.Array, bool], tuple[jax.Array, Any]]
LogitsFn = Callable[[jax.Array], jax.Array]

MODEL_FN = "model_fn(params, model_state, x, train) -> (logits, model_state)"
LOGITS_FN = "logits_fn(x) -> logits [batch, classes]"
ADAPTER = "sparse_robust.convention.as_logits_fn(model_fn, params, model_state)"


def _describe(out) -> str:
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)}"
    shape = getattr(out, "shape", None)
    return f"an array of shape {tuple(shape)}" if shape is not None else f"a {type(out).__name__}"


def call_model_fn(model_fn: ModelFn, params, model_state, x, train: bool):
    """``model_fn(params, model_state, x, train)``, checked to return ``(logits, model_state)``.

    Raises TypeError (one line naming the convention) when it returns anything else, e.g. bare
    logits, which would otherwise be unpacked along the batch axis.
    """
    out = model_fn(params, model_state, x, train)
    if not isinstance(out, tuple) or len(out) != 2:
        raise TypeError(f"model_fn returned {_describe(out)}; training and evaluation take "
                        f"{MODEL_FN} (training.make_model_fn(module) builds one from a flax module).")
    return out


def as_logits_fn(model_fn: ModelFn, params, model_state) -> LogitsFn:
    """The adapter: ``logits_fn(x)`` of ``model_fn`` in eval mode at fixed ``params`` and
    ``model_state``, the form attacks take.

    Args:
      model_fn: ``model_fn(params, model_state, x, train) -> (logits, model_state)``.
      params: the trainable parameters (a pytree).
      model_state: the non-trainable collections (e.g. batch statistics; {} if none).
    """
    return lambda x: call_model_fn(model_fn, params, model_state, x, False)[0]


def check_logits_fn(logits_fn: LogitsFn, x) -> int:
    """The number of classes of ``logits_fn`` at the batch ``x``, from shapes only (no compute).

    Raises TypeError (one line naming the convention and the adapter) unless ``logits_fn(x)`` is
    one array of shape [batch, classes], e.g. when it returns a ``(logits, model_state)`` pair.
    """
    out = jax.eval_shape(logits_fn, x)
    if not isinstance(out, jax.ShapeDtypeStruct) or len(out.shape) != 2 \
            or out.shape[0] != x.shape[0]:
        raise TypeError(f"logits_fn returned {_describe(out)} for a batch of {x.shape[0]}; attacks "
                        f"take {LOGITS_FN}; for a {MODEL_FN} pass {ADAPTER}.")
    return out.shape[-1]
