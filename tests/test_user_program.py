"""Written as a user's program would be: the library imported as `sr`, the user's own flax module
(no `train` argument), own optax chain with gradient clipping and the mask inside it, global
pruning, a jitted PGD adversarial-training step, a vmapped ε sweep, and a second pruning round
applied with `replace_mask` inside the chain. Params are never masked by hand: the optimizer's
updates must leave every pruned weight at exactly zero."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import sparse_robust as sr


class MyMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(32, name="hidden")(x))
        return nn.Dense(10, name="head")(x)


def pruned_values(params, mask):
    """Every pruned weight's value, as one flat array."""
    named = sr.masks.named_leaves(params)
    return np.concatenate([np.asarray(named[name])[~np.asarray(alive)]
                           for name, alive in sr.masks.mask_leaves(mask).items()])


def test_a_user_program_keeps_pruned_weights_at_exactly_zero():
    dataset = sr.data.make_synthetic(0, num_train=256, num_val=0, num_test=64)
    model = MyMLP()
    params, model_state = sr.training.init_variables(model, jax.random.PRNGKey(0),
                                                     dataset.train_images[:1])
    model_fn = sr.training.make_model_fn(model)

    mask = sr.pruning.magnitude_prune(params, sr.masks.create_mask(params), 0.5, scope="global")
    assert np.all(pruned_values(params, mask) != 0)  # the params themselves are left unmasked
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     sr.optim.keep_pruned_at_zero(optax.adamw(1e-2, weight_decay=1e-3), mask))
    opt_state = tx.init(params)
    pgd = sr.attacks.make_attack("pgd", eps=0.1, step_size=0.04, num_steps=3)

    @jax.jit
    def pgd_at_step(params, opt_state, x, y, key):
        x_adv = pgd(sr.convention.as_logits_fn(model_fn, params, model_state), x, y, key)

        def loss(p):
            logits, _ = model_fn(p, model_state, x_adv, True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    def train(params, opt_state, first_step, num_steps):
        for step in range(first_step, first_step + num_steps):
            rows = np.arange(step * 32, step * 32 + 32) % 256
            params, opt_state, _ = pgd_at_step(params, opt_state, dataset.train_images[rows],
                                               dataset.train_labels[rows],
                                               jax.random.PRNGKey(100 + step))
        return params, opt_state

    params, opt_state = train(params, opt_state, 0, 1)
    assert np.all(pruned_values(params, mask) == 0.0)  # one update was enough
    params, opt_state = train(params, opt_state, 1, 9)
    assert np.all(pruned_values(params, mask) == 0.0)

    # A second round of global pruning, applied to the optimizer inside the chain.
    second = sr.pruning.magnitude_prune(params, mask, 0.5, scope="global")
    assert sr.masks.is_subset(second, mask) and sr.masks.weights_remaining(second) < 0.3
    assert np.any(pruned_values(params, second) != 0)  # newly pruned, still nonzero
    opt_state = sr.optim.replace_mask(opt_state, second)
    params, opt_state = train(params, opt_state, 10, 5)
    assert np.all(pruned_values(params, second) == 0.0)
    alive = np.concatenate([np.asarray(sr.masks.named_leaves(params)[n])[np.asarray(m)]
                            for n, m in sr.masks.mask_leaves(second).items()])
    assert np.all(alive != 0)  # and the survivors still train

    # A vmapped ε sweep: one compile for the grid, equal to a Python loop over it.
    x, y = dataset.test_images, dataset.test_labels
    logits_fn = sr.convention.as_logits_fn(model_fn, params, model_state)
    key = jax.random.PRNGKey(7)

    def accuracy_at(eps):
        x_adv = pgd(logits_fn, x, y, key, eps=eps)  # the step scales with ε (the one rule)
        return jnp.mean(jnp.argmax(logits_fn(x_adv), -1) == y)

    eps_grid = jnp.linspace(0.0, 0.3, 4)
    swept = np.asarray(jax.jit(jax.vmap(accuracy_at))(eps_grid))
    looped = np.array([float(jax.jit(accuracy_at)(e)) for e in eps_grid])
    np.testing.assert_allclose(swept, looped, atol=1.5 / len(y))  # float rounding may flip one
    clean = float(jnp.mean(jnp.argmax(logits_fn(x), -1) == y))
    assert swept[0] == clean and swept[-1] < clean
