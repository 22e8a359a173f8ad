"""The per-step train loop (``make_train_loop(scan=False)``) fed numpy arrays against device
arrays, in the same run.

  python -m benchmarks.numpy_inputs           # ~1 minute on 2 CPU cores
  python -m benchmarks.numpy_inputs --quick

Three ways to run the same steps of dense-300-100 (natural training, batch 60) on a
Fashion-MNIST-sized training set (60,000 x 784 float32, 188 MB):
  device   the loop given device arrays (the reference);
  numpy    the loop given numpy arrays (it puts them on the device once per call);
  old      numpy arrays handed to the jitted step at every step, as the loop did before (each
           call copied the whole dataset).
Printed as ms per step and as a ratio to `device`; `numpy` includes its one copy of the dataset
per call (`copy`, measured alone), spread over the call's steps.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax

from sparse_robust import data, masks, models, objectives, training


def main(quick: bool) -> None:
    steps, old_steps, repeats = (20, 4, 2) if quick else (200, 10, 3)
    num_train, batch = 60_000, 60
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(num_train, 784)).astype(np.float32)
    labels = rng.integers(0, 10, num_train).astype(np.int32)
    model = models.get_model("dense-300-100")
    params, model_state = training.init_variables(model, jax.random.PRNGKey(0), images[:1])
    tx = optax.adam(1.2e-3)
    loop = training.make_train_loop(training.make_model_fn(model), tx,
                                    objectives.Objective("natural"), scan=False)
    indices = np.asarray(data.batch_indices(jax.random.PRNGKey(1), num_train, batch, 0, steps))
    count = {"device": steps, "numpy": steps, "old": old_steps}
    device_images, device_labels = jax.device_put(images), jax.device_put(labels)

    def fresh_state():
        return training.create_train_state(params, model_state, tx, masks.create_mask(params),
                                           jax.random.PRNGKey(2))

    def old_loop(state, x, y, idx):  # the jitted step given host arrays at every step
        for i in range(idx.shape[0]):
            state, _ = loop._step(state, x, y, idx[i])
        return state, None

    ways = {"device": lambda s: loop(s, device_images, device_labels, indices),
            "numpy": lambda s: loop(s, images, labels, indices),
            "old": lambda s: old_loop(s, images, labels, indices[:old_steps])}
    for run in ways.values():  # compile, and warm every path
        jax.block_until_ready(run(fresh_state())[0].params)
    best = {}
    for _ in range(repeats):  # interleaved, best of the repeats
        for name, run in ways.items():
            state = fresh_state()
            jax.block_until_ready(state.params)
            start = time.perf_counter()
            jax.block_until_ready(run(state)[0].params)
            best[name] = min(best.get(name, np.inf), (time.perf_counter() - start) / count[name])
    copy = min(_timed(lambda: jax.device_put(images)) for _ in range(repeats))
    print(f"per-step loop, dense-300-100, batch {batch}, {num_train} x 784 float32 training set, "
          f"{steps} steps ({old_steps} for old), best of {repeats} ({jax.device_count()} {jax.default_backend()} "
          "device(s))")
    for name, seconds in best.items():
        print(f"  {name:7s} {1e3 * seconds:8.2f} ms/step   {seconds / best['device']:6.2f}x device")
    print(f"  copy    {1e3 * copy:8.2f} ms: one device_put of the training set (numpy pays it "
          "once per call)")


def _timed(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    main(parser.parse_args().quick)
