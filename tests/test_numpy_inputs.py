"""The per-step train loop given numpy arrays: the same states as with device arrays, and the
arrays put on the device once per call, never implicitly at every step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparse_robust import data, masks, objectives, training


def _setup(tiny_mlp, make_fgsm, numpy_init):
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(64, 6)).astype(np.float32)
    labels = rng.integers(0, 3, 64).astype(np.int32)
    model = tiny_mlp()
    params = numpy_init(model, images[:1], 0)["params"]
    mask = masks.create_mask(params)
    tx = optax.adam(1e-2)
    loop = training.make_train_loop(training.make_model_fn(model), tx,
                                    objectives.Objective("mixed", attack=make_fgsm(0.1)),
                                    scan=False)
    indices = np.asarray(data.batch_indices(jax.random.PRNGKey(1), 64, 16, 0, 5))

    def fresh():
        return training.create_train_state(params, {}, tx, mask, jax.random.PRNGKey(2))

    return loop, fresh, images, labels, indices


def test_numpy_and_device_arrays_give_identical_states(tiny_mlp, make_fgsm, numpy_init):
    loop, fresh, images, labels, indices = _setup(tiny_mlp, make_fgsm, numpy_init)
    on_device = loop(fresh(), jnp.asarray(images), jnp.asarray(labels), jnp.asarray(indices))
    from_numpy = loop(fresh(), images, labels, indices)
    for a, b in zip(jax.tree_util.tree_leaves(on_device), jax.tree_util.tree_leaves(from_numpy)):
        np.testing.assert_array_equal(a, b)


def test_numpy_arrays_are_not_copied_implicitly_at_each_step(tiny_mlp, make_fgsm, numpy_init):
    loop, fresh, images, labels, indices = _setup(tiny_mlp, make_fgsm, numpy_init)
    loop(fresh(), images, labels, indices[:1])  # compiled outside the guard
    state = fresh()
    with jax.transfer_guard_host_to_device("disallow"):  # explicit device_put only
        state, metrics = loop(state, images, labels, indices)
    assert metrics["loss"].shape == (len(indices),)
