"""Training one level: resuming after an interruption keeps the early-stopping weights."""

import jax
import numpy as np
import optax
import pytest

from sparse_robust import level as level_lib
from sparse_robust import masks, training
from sparse_robust.objectives import Objective

NUM_STEPS, EVAL_EVERY = 30, 10


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def parts(tiny_mlp, numpy_init):
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(120, 6)).astype(np.float32)
    labels = np.argmax((images - 0.5) @ rng.normal(size=(6, 3)), axis=-1).astype(np.int32)
    model = tiny_mlp(hidden=(8, 6), num_classes=3)
    model_fn = training.make_model_fn(model)
    tx = optax.adam(5e-2)
    variables = numpy_init(model, np.zeros((1, 6), np.float32), 0)
    params = variables.pop("params")
    return dict(images=images, labels=labels, model_fn=model_fn, tx=tx, params=params,
                model_state=variables,
                loop=training.make_train_loop(model_fn, tx, Objective("natural")),
                eval_batch=training.make_eval_fn(model_fn))


def spec(parts, train_loop):
    images, labels = parts["images"], parts["labels"]
    return level_lib.LevelSpec(
        train_loop=train_loop, eval_batch=parts["eval_batch"], train_images=images,
        train_labels=labels, val=(images[:40], labels[:40]), test=(images[40:], labels[40:]),
        batch_size=20, num_steps=NUM_STEPS, eval_every=EVAL_EVERY, eval_batch_size=40,
        checkpoint_every=EVAL_EVERY,
        # Training lowers the validation loss, so its negative makes the *first* evaluation the
        # best one: the early-stopping weights are then not the last ones.
        early_stop_value=lambda val: -val["loss"], progress=False)


def train(parts, level_dir, train_loop):
    state = training.create_train_state(parts["params"], parts["model_state"], parts["tx"],
                                        masks.create_mask(parts["params"]),
                                        jax.random.PRNGKey(1))
    return level_lib.train_level(spec(parts, train_loop), state, jax.random.PRNGKey(2),
                                 jax.random.PRNGKey(3), str(level_dir), "test")


def test_resume_restores_the_early_stopping_weights(parts, tmp_path):
    reference = train(parts, tmp_path / "reference", parts["loop"])
    assert reference.best_step == EVAL_EVERY < NUM_STEPS  # an early step is the best

    calls = {"n": 0}

    def interrupting_loop(*args):
        calls["n"] += 1
        if calls["n"] == 3:  # the last chunk, after the checkpoint at step 20
            raise Interrupt
        return parts["loop"](*args)

    with pytest.raises(Interrupt):
        train(parts, tmp_path / "resumed", interrupting_loop)
    resumed = train(parts, tmp_path / "resumed", parts["loop"])

    assert resumed.best_step == reference.best_step
    for got, want in zip(jax.tree_util.tree_leaves((resumed.best_params, resumed.best_model_state)),
                         jax.tree_util.tree_leaves((reference.best_params,
                                                    reference.best_model_state))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # The early-stopping accuracies, measured on the restored best weights, are the same too.
    test_images, test_labels = parts["images"][40:], parts["labels"][40:]
    accuracies = [training.evaluate(parts["eval_batch"], outcome.best_params,
                                    outcome.best_model_state, test_images, test_labels,
                                    jax.random.PRNGKey(4))
                  for outcome in (reference, resumed)]
    assert accuracies[0] == accuracies[1]
    # And the best weights are not the final ones, so a stale copy could not pass by accident.
    assert not np.array_equal(np.asarray(resumed.best_params["output"]["kernel"]),
                              np.asarray(resumed.state.params["output"]["kernel"]))
