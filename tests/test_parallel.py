"""Data parallelism on 8 simulated CPU devices gives the numbers of one device.

XLA's device count is fixed when jax starts, so the 8-device checks run in a subprocess with
``--xla_force_host_platform_device_count=8``; it prints JSON that the tests compare.
"""

import json
import os
import subprocess
import sys
import textwrap

import ml_collections
import pytest

from sparse_robust.runs import context
from sparse_robust.runs.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import json
    import jax, numpy as np, optax
    from sparse_robust import attacks, data, evaluation, masks, models, objectives, parallel
    from sparse_robust import training

    ds = data.make_synthetic(0, num_train=256, image_shape=(8, 8, 1), flatten=True)
    model = models.get_model("lenet-300-100")
    model_fn = training.make_model_fn(model)
    attack = attacks.make_attack(name="pgd", eps=0.1, step_size=0.03, num_steps=3)
    objective = objectives.Objective("mixed", attack, label_smoothing=0.1)
    params, model_state = training.init_variables(model, jax.random.PRNGKey(0), ds.train_images[:1])
    mask = masks.create_mask(params)
    indices = data.batch_indices(jax.random.PRNGKey(2), ds.num_train, 32, 0, 6)
    out = {"devices": jax.device_count()}
    for name, n, scan in (("1", 1, True), ("8", 8, True), ("8_per_step", 8, False)):
        mesh = parallel.make_mesh(jax.devices()[:n])
        rep = parallel.replicated(mesh)
        loop = training.make_train_loop(model_fn, optax.adam(1e-2), objective, None, mesh,
                                        scan=scan)
        state = training.create_train_state(params, model_state, optax.adam(1e-2), mask,
                                            jax.random.PRNGKey(1))
        state, _ = loop(parallel.put(state, rep), parallel.put(ds.train_images, rep),
                        parallel.put(ds.train_labels, rep),
                        parallel.put(indices, parallel.batch_sharded(mesh, 1)))
        replicated = all(x.sharding.is_fully_replicated for x in jax.tree_util.tree_leaves(state))
        clean = evaluation.Evaluator(model_fn, batch_size=40, mesh=mesh).evaluate(
            state.params, state.model_state, ds.test_images, ds.test_labels)
        out[name] = {"params": {k: np.asarray(v).tolist() for k, v in
                             masks.mask_leaves(state.params).items()},
                  "num_devices": len(state.params["output"]["kernel"].sharding.device_set),
                  "state_replicated": replicated, "accuracy": clean["clean_accuracy"]}
        if name == "1":
            reference = jax.device_get((state.params, state.model_state))
    # The same weights evaluated clean and under PGD on 1 and on 8 devices: each batch of 40 is
    # split across the devices (5 rows each), the per-example results gathered.
    for n in (1, 8):
        mesh = parallel.make_mesh(jax.devices()[:n])
        evaluator = evaluation.Evaluator(model_fn, batch_size=40, mesh=mesh)
        params, model_state = reference
        out[f"eval_{n}"] = evaluator.evaluate(params, model_state, ds.test_images,
                                              ds.test_labels, {"pgd": attack},
                                              jax.random.PRNGKey(3))
        x, y = parallel.put((ds.test_images[:40], ds.test_labels[:40]),
                            parallel.batch_sharded(mesh))
        compiled = evaluator.program(attack).lower(
            *parallel.put(reference, parallel.replicated(mesh)), x, y,
            jax.random.PRNGKey(3)).compile()
        x_sharding = compiled.input_shardings[0][2]
        out[f"eval_{n}_layout"] = {
            "x_spec": [str(a) for a in x_sharding.spec], "x_devices": len(x_sharding.device_set),
            "x_shard_rows": [s.data.shape[0] for s in x.addressable_shards]}
    # A batch that does not divide across the 8 devices is refused before anything is built.
    from experiments.configs import base
    from sparse_robust.runs import context, errors
    config = base.get_config()
    config.train.batch_size = 60
    config.eval.update(num_examples=0, sanity_examples=0, batch_size=40)
    try:
        context.from_config(config, ds)
    except errors.ConfigError as err:
        out["indivisible"] = str(err)
    print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def eight_device_run():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def test_eight_devices_train_like_one(eight_device_run):
    import numpy as np
    run = eight_device_run
    assert run["devices"] == 8
    assert run["1"]["num_devices"] == 1 and run["8"]["num_devices"] == 8
    assert run["8"]["state_replicated"]  # params, mask and optimizer state stay replicated
    # Sharded reductions sum in another order; PGD's sign steps can turn such last-bit
    # differences into a different step for a rare pixel, hence the 2e-4 (weights are ~0.1).
    for name, one in run["1"]["params"].items():
        np.testing.assert_allclose(run["8"]["params"][name], one, atol=2e-4, rtol=1e-3)
        np.testing.assert_allclose(run["8_per_step"]["params"][name], one, atol=2e-4, rtol=1e-3)
    assert run["8_per_step"]["num_devices"] == 8 and run["8_per_step"]["state_replicated"]
    # Training moved the params: the comparison is not between two untouched inits.
    assert run["1"]["accuracy"] > 0.3


def test_eight_devices_evaluate_identically_split_across_them(eight_device_run):
    one, eight = eight_device_run["eval_1"], eight_device_run["eval_8"]
    assert set(one) == {"clean_loss", "clean_accuracy", "pgd_loss", "pgd_accuracy", "worst_case_accuracy"}
    assert eight["clean_accuracy"] == one["clean_accuracy"] and eight["pgd_accuracy"] == one["pgd_accuracy"]
    assert eight["worst_case_accuracy"] == one["worst_case_accuracy"]
    assert eight["clean_loss"] == pytest.approx(one["clean_loss"], rel=1e-5)
    assert one["pgd_accuracy"] < one["clean_accuracy"]  # the attack did something
    # The batch is split: 8 devices hold 5 of the 40 rows each; one device holds all 40.
    layout = eight_device_run["eval_8_layout"]
    assert layout == {"x_spec": ["data"], "x_devices": 8, "x_shard_rows": [5] * 8}
    assert eight_device_run["eval_1_layout"]["x_shard_rows"] == [40]


def test_batch_that_does_not_divide_is_a_config_error(eight_device_run):
    assert eight_device_run["indivisible"].startswith("config.train.batch_size = 60 is invalid")
    assert "8 devices" in eight_device_run["indivisible"]


def test_too_many_devices_is_a_config_error():
    import jax
    config = ml_collections.ConfigDict({"num_devices": len(jax.devices()) + 1})
    with pytest.raises(ConfigError, match=r"parallel.num_devices = \d+ is invalid: 1 device\(s\) visible"):
        context.make_mesh(config)
