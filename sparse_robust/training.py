"""Train state and jitted train steps (``lax.scan`` over batches, or one call per step).

One training loop serves every experiment: it takes any :class:`~sparse_robust.objectives.Objective`
and any optax optimizer, keeps pruned weights at zero through
:func:`~sparse_robust.optim.keep_pruned_at_zero`, and draws each step's randomness from
``fold_in(state.key, state.step)`` so that a run resumed from a checkpoint continues bit for bit.

The model convention of the whole library is ``model_fn(params, model_state, x, train) ->
(logits, new_model_state)`` (:func:`make_model_fn` builds it from any flax module); evaluation
(:mod:`sparse_robust.evaluation`) uses the same function in eval mode, and attacks its
``logits_fn`` (:func:`sparse_robust.convention.as_logits_fn`).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from sparse_robust import masks as masks_lib
from sparse_robust.convention import ModelFn
from sparse_robust import objectives as objectives_lib
from sparse_robust import parallel
from sparse_robust import optim

@flax.struct.dataclass
class TrainState:
    """Everything a training run carries from step to step (a pytree).

    ``key`` is a raw uint32 PRNG key (``jax.random.PRNGKey``) so that checkpoints store it as a
    plain array. The mask lives in the optimizer state (an ``optim.MaskedState``, see
    ``optim.keep_pruned_at_zero``).
    """

    step: jax.Array
    params: Any
    model_state: Any
    opt_state: optax.OptState
    key: jax.Array

    @property
    def mask(self):
        return self.opt_state.mask

    @property
    def variables(self) -> dict:
        return {"params": self.params, **self.model_state}


def takes_train(model: nn.Module) -> bool:
    """Whether the module's ``__call__`` has a ``train`` argument (many flax modules do not)."""
    return "train" in inspect.signature(model.__call__).parameters


def make_model_fn(model: nn.Module) -> ModelFn:
    """``model_fn(params, model_state, x, train) -> (logits, new_model_state)`` for any flax module.

    Args:
      model: a flax module called as ``model.apply(variables, x)``, with a ``train`` argument or
        without one. Without one, the module itself decides how it uses its batch statistics;
        ``train`` then only decides whether their updates are kept.

    ``model_state`` holds the non-trainable collections (e.g. ``batch_stats``, as
    :func:`init_variables` returns them); in train mode they are updated, in eval mode read only.
    """
    with_train = takes_train(model)

    def model_fn(params, model_state, x, train):
        variables = {"params": params, **model_state}
        kwargs = {"train": train} if with_train else {}
        if model_state and (train or not with_train):
            # Without `train` the module may update its statistics in either mode: let it, and
            # keep the updates only when training.
            logits, new_state = model.apply(variables, x, mutable=list(model_state), **kwargs)
            return logits, (dict(new_state) if train else model_state)
        return model.apply(variables, x, **kwargs), model_state

    return model_fn


def init_variables(model: nn.Module, key: jax.Array, sample_input: jax.Array) -> tuple[Any, dict]:
    """``(params, model_state)`` of a freshly initialised flax module (with or without ``train``).

    Args:
      model: any flax module; ``train=False`` is passed only where its ``__call__`` takes it.
      key: the PRNG key of the initialisers.
      sample_input: a batch of the input's shape and dtype (one row is enough).

    ``model_state`` holds every collection but ``params`` (batch statistics where the module has
    them, else it is empty).
    """
    kwargs = {"train": False} if takes_train(model) else {}
    variables = dict(model.init(key, sample_input, **kwargs))
    params = variables.pop("params")
    return params, variables


def create_train_state(params, model_state, tx: optax.GradientTransformation, mask,
                       key: jax.Array) -> TrainState:
    """A fresh state at step 0: masked params, a *fresh* optimizer state holding ``mask``.

    The state owns copies of its inputs: the train loop donates the state's buffers, and the caller
    still needs its params (e.g. to rewind to them), mask and key afterwards.
    """
    if jnp.issubdtype(jnp.result_type(key), jax.dtypes.prng_key):  # a jax.random.key(...)
        key = jax.random.key_data(key)
    params, model_state, mask, key = jax.tree_util.tree_map(
        jnp.array, (params, model_state, mask, jnp.asarray(key, jnp.uint32)))
    params = masks_lib.apply_mask(params, mask)
    opt_state = optim.keep_pruned_at_zero(tx, mask).init(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                      opt_state=opt_state, key=key)


def make_train_step(model_fn: ModelFn, tx: optax.GradientTransformation,
                    objective: objectives_lib.Objective,
                    augment: Optional[Callable[[jax.Array, jax.Array], jax.Array]] = None):
    """``train_step(state, x, y) -> (state, metrics)``: one masked optimizer step (not jitted).

    The optimizer's update also gets ``value=loss``, which optimizers such as
    ``optax.contrib.reduce_on_plateau`` read and every other one ignores.
    """
    masked_tx = optim.keep_pruned_at_zero(tx)

    def train_step(state: TrainState, x, y):
        step_key = jax.random.fold_in(state.key, state.step)
        augment_key, attack_key = jax.random.split(step_key)
        if augment is not None:
            x = augment(augment_key, x)
        grad_fn = jax.value_and_grad(objective, argnums=1, has_aux=True)
        (loss, (model_state, metrics)), grads = grad_fn(model_fn, state.params,
                                                        state.model_state, x, y, attack_key)
        updates, opt_state = masked_tx.update(grads, state.opt_state, state.params, value=loss)
        new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                  model_state=model_state, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_train_loop(model_fn: ModelFn, tx: optax.GradientTransformation,
                    objective: objectives_lib.Objective, augment=None, mesh=None,
                    vmap_trials: bool = False, scan: bool = True):
    """A jitted ``loop(state, images, labels, indices) -> (state, metrics)``.

    ``indices`` is an int array [num_steps, batch] (see ``data.batch_indices``); the batches are
    gathered on device inside a ``lax.scan``, so a chunk of steps costs one dispatch. ``metrics``
    holds every step's values, stacked: [num_steps] per name (a divergence can be traced to its
    step). The state's buffers are donated.

    With ``scan=False`` each step is its own jitted call, dispatched from Python, with the same
    results; numpy ``images``, ``labels`` and ``indices`` are put on the device once per call, so
    they cost what device arrays cost. Use it for convolutional networks on CPU: XLA:CPU computes convolution weight
    gradients several times slower inside a loop than at the top level of a program (7x for
    conv-4, see benchmarks/README.md), while one dispatch costs well under a millisecond.

    With a ``mesh`` (see :mod:`sparse_robust.parallel`) the batch axis of ``indices`` is split
    over the devices and everything else is replicated: each device gathers, attacks and
    differentiates its share of the batch, and XLA all-reduces the gradients.

    With ``vmap_trials`` the loop trains several independent trials at once: every leaf of
    ``state`` (params, masks, optimizer state, keys) and ``indices`` gain a leading trial axis
    (see :func:`stack_states`), the dataset is shared, and each trial gets the numbers it would
    get alone.
    """
    train_step = make_train_step(model_fn, tx, objective, augment)

    def gather_and_step(state, images, labels, idx):
        x, y = images[idx], labels[idx]
        if mesh is not None:
            x = jax.lax.with_sharding_constraint(x, parallel.batch_sharded(mesh))
            y = jax.lax.with_sharding_constraint(y, parallel.batch_sharded(mesh))
        return train_step(state, x, y)

    def loop(state, images, labels, indices):
        body = lambda carry, idx: gather_and_step(carry, images, labels, idx)
        return jax.lax.scan(body, state, indices)

    fn = loop if scan else gather_and_step
    if vmap_trials:
        fn = jax.vmap(fn, in_axes=(0, None, None, 0))
    if mesh is None:
        jitted = jax.jit(fn, donate_argnums=0)
    else:
        rep = parallel.replicated(mesh)
        batch_axis = int(scan) + int(vmap_trials)  # of indices: [trials,] [steps,] batch
        jitted = jax.jit(fn, donate_argnums=0, out_shardings=(rep, rep),
                         in_shardings=(rep, rep, rep, parallel.batch_sharded(mesh, batch_axis)))
    return jitted if scan else _SteppedLoop(jitted, vmap_trials, mesh)


class _SteppedLoop:
    """The loop of ``make_train_loop(scan=False)``: one jitted call per step."""

    def __init__(self, step, vmap_trials: bool, mesh=None):
        self._step, self._step_axis, self._mesh = step, int(vmap_trials), mesh

    def _on_device(self, images, labels, indices):
        """Host (numpy) arrays put on the device(s) once per call, not once per step: a jitted
        call copies a host argument every time (the whole dataset, every step)."""
        def place(x, sharding):
            if isinstance(x, jax.Array):
                return x
            return jax.device_put(x) if sharding is None else parallel.put(x, sharding)

        rep = batch = None
        if self._mesh is not None:
            rep = parallel.replicated(self._mesh)
            batch = parallel.batch_sharded(self._mesh, self._step_axis + 1)
        return place(images, rep), place(labels, rep), place(indices, batch)

    def __call__(self, state, images, labels, indices):
        images, labels, indices = self._on_device(images, labels, indices)
        step_metrics = []
        for i in range(indices.shape[self._step_axis]):
            # Sliced where it lies: a batch-sharded array of several processes keeps its sharding
            # (a host copy could not be sharded again across them).
            step_indices = jax.lax.index_in_dim(indices, i, self._step_axis, keepdims=False)
            state, metrics = self._step(state, images, labels, step_indices)
            step_metrics.append(metrics)
        return state, jax.tree_util.tree_map(
            lambda *m: jnp.stack(m, axis=self._step_axis), *step_metrics)

    def _cache_size(self) -> int:
        return self._step._cache_size()


def stack_states(states: list) -> Any:
    """Stack same-structured pytrees (e.g. one TrainState per trial) along a new leading axis."""
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *states)


def unstack_states(stacked: Any, num: int) -> list:
    """Inverse of :func:`stack_states`."""
    return [jax.tree_util.tree_map(lambda x: x[i], stacked) for i in range(num)]
