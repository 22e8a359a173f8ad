"""Training several trials at once with jax.vmap gives each trial its sequential result."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparse_robust import attacks, data, masks, models, objectives, pruning, training


def test_vmapped_trials_equal_sequential_trials():
    ds = data.make_synthetic(0, num_train=256, image_shape=(8, 8, 1), flatten=True)
    model = models.get_model("lenet-300-100")
    model_fn = training.make_model_fn(model)
    attack = attacks.make_attack(name="pgd", eps=0.1, step_size=0.03, num_steps=3)
    objective = objectives.Objective("mixed", attack, label_smoothing=0.1)
    tx = optax.adam(1e-2)
    states, indices = [], []
    for trial in range(3):  # different inits, masks, attack keys and data orders per trial
        params, model_state = training.init_variables(model, jax.random.PRNGKey(trial),
                                                      ds.train_images[:1])
        mask = pruning.random_prune(jax.random.PRNGKey(10 + trial), masks.create_mask(params), 0.5)
        states.append(training.create_train_state(params, model_state, tx, mask,
                                                  jax.random.PRNGKey(20 + trial)))
        indices.append(data.batch_indices(jax.random.PRNGKey(30 + trial), ds.num_train, 32, 0, 8))
    stacked = training.stack_states(states)  # before the sequential loop donates the states

    sequential = training.make_train_loop(model_fn, tx, objective)
    expected = [sequential(s, ds.train_images, ds.train_labels, i) for s, i in zip(states, indices)]
    vmapped = training.make_train_loop(model_fn, tx, objective, vmap_trials=True)
    state, metrics = vmapped(stacked, ds.train_images, ds.train_labels, np.stack(indices))

    for trial, (want_state, want_metrics) in enumerate(expected):
        got = training.unstack_states(state, 3)[trial]
        got_params = masks.mask_leaves(got.params)
        for name, leaf in masks.mask_leaves(want_state.params).items():
            # batched matmuls round differently: float tolerance, not bit equality
            np.testing.assert_allclose(got_params[name], leaf, atol=2e-5, rtol=1e-4)
        # each trial keeps its own mask: its pruned weights are still exactly zero
        for name, alive in masks.mask_leaves(want_state.mask).items():
            assert np.all(np.asarray(got_params[name])[~np.asarray(alive)] == 0)
        for key, value in want_metrics.items():
            np.testing.assert_allclose(metrics[key][trial], value, rtol=1e-4)
    assert int(state.step[0]) == 8
    # the trials really differ (the comparison is not between three copies of one run)
    assert not jnp.allclose(state.params["output"]["kernel"][0], state.params["output"]["kernel"][1])
