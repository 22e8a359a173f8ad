"""Benchmark suite: training, evaluation, level overhead, vmapped trials, devices, memory.

  python -m benchmarks.run            # ~5 minutes on 2 CPU cores
  python -m benchmarks.run --quick    # fewer steps, for a smoke check

Every throughput is printed with the matmul FLOPs it implies (counted on the jaxpr with loop trip
counts, see benchmarks/flops.py) as a fraction of the matmul FLOP/s measured in the same run, so
figures compare across machines. Results and their reading: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from benchmarks.flops import matmul_flops
from sparse_robust import attacks, data, evaluation, masks, models, objectives, pruning, training
from sparse_robust.runs import store

PGD10 = dict(name="pgd", eps=0.3, step_size=0.05, num_steps=10, label_source="predicted")
FGSM = dict(name="fgsm", eps=0.3, label_source="predicted")

# The Cosentino et al. objectives: clean only, and the 50/50 mix with FGSM or PGD-10 (ε = 0.3).
OBJECTIVES = {
    "natural": lambda: objectives.Objective("natural", label_smoothing=0.1),
    "FGSM mixed": lambda: objectives.Objective("mixed", attacks.make_attack(**FGSM),
                                               label_smoothing=0.1),
    "PGD-10 mixed": lambda: objectives.Objective("mixed", attacks.make_attack(**PGD10),
                                                 label_smoothing=0.1),
}


def setup(model_name: str, batch: int, steps: int, seed: int = 0, image_shape=(28, 28, 1),
          objective: str = "PGD-10 mixed", model_kwargs=None):
    """A model (`models.get_model(model_name, **model_kwargs)`), a train loop's parts (`objective`
    from OBJECTIVES), a state and index chunk, on random data."""
    rng = np.random.default_rng(seed)
    images = rng.random((max(4 * batch, 2048),) + image_shape, dtype=np.float32)
    labels = rng.integers(0, 10, len(images)).astype(np.int32)
    model = models.get_model(model_name, **(model_kwargs or {}))
    model_fn = training.make_model_fn(model)
    objective = OBJECTIVES[objective]()
    tx = optax.adam(1.2e-3)
    params, model_state = training.init_variables(model, jax.random.PRNGKey(seed), images[:1])
    mask = masks.create_mask(params)
    state = training.create_train_state(params, model_state, tx, mask, jax.random.PRNGKey(1))
    indices = data.batch_indices(jax.random.PRNGKey(2), len(images), batch, 0, steps)
    return dict(model=model, model_fn=model_fn, objective=objective, tx=tx, params=params,
                model_state=model_state, mask=mask, state=state, images=jnp.asarray(images),
                labels=jnp.asarray(labels), indices=indices)


def time_loop(loop, state, images, labels, indices, repeats: int = 3) -> tuple[float, object]:
    """Best seconds per call of a donating train loop (the state is threaded through)."""
    state, _ = loop(state, images, labels, indices)  # compile
    jax.block_until_ready(state)
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        state, metrics = loop(state, images, labels, indices)
        jax.block_until_ready(metrics)
        best = min(best, time.perf_counter() - tic)
    return best, state


def train_throughput(model_name, batch, steps, matmul, repeats=3, objective="PGD-10 mixed",
                     scan=True):
    """Steps/s of the scanned train loop, or of the per-step one (``scan=False``); FLOPs and
    memory are the scanned program's (the same steps)."""
    s = setup(model_name, batch, steps, objective=objective)
    loop = training.make_train_loop(s["model_fn"], s["tx"], s["objective"])
    args = (s["state"], s["images"], s["labels"], s["indices"])
    flops = matmul_flops(loop, *args)
    memory = loop.lower(*args).compile().memory_analysis() if scan else None
    if not scan:
        loop = training.make_train_loop(s["model_fn"], s["tx"], s["objective"], scan=False)
    seconds, _ = time_loop(loop, *args, repeats)
    return {"what": f"train {objective}, {model_name}, batch {batch}" + ("" if scan else ", per step"),
            "steps/s": steps / seconds, "ms/step": 1e3 * seconds / steps,
            "images/s": steps * batch / seconds,
            "GFLOP/step": flops / steps / 1e9, "FLOP ratio": flops / seconds / matmul,
            "temp MiB": memory.temp_size_in_bytes / 2**20 if memory else float("nan")}


def conv_grad_in_loop() -> list[dict]:
    """The XLA:CPU pitfall behind ``make_train_loop(scan=False)``: the weight gradient of one
    3x3 convolution (conv-4's second layer, batch 60), at the top level and inside a lax.scan."""
    x = jax.random.normal(jax.random.PRNGKey(0), (60, 28, 28, 64))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 64, 64))
    conv = lambda w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
    grad = jax.grad(lambda w: jnp.sum(conv(w) ** 2))
    in_scan = lambda w: jax.lax.scan(lambda c, _: (c - 1e-6 * grad(c), None), w, None, length=1)[0]
    top = common.time_fn(jax.jit(grad), w, repeats=3)
    looped = common.time_fn(jax.jit(in_scan), w, repeats=3)
    return [{"what": "conv weight gradient, top level", "seconds": top},
            {"what": "conv weight gradient, inside lax.scan", "seconds": looped,
             "slowdown": looped / top}]


def eval_throughput(matmul, batch=1000):
    s = setup("dense-300-100", batch, 1)
    eval_fn = evaluation.Evaluator(s["model_fn"], batch_size=batch).program(
        attacks.make_attack(**PGD10))
    x, y = s["images"][:batch], s["labels"][:batch]
    args = (s["state"].params, s["state"].model_state, x, y, jax.random.PRNGKey(0))
    flops = matmul_flops(eval_fn, *args)
    seconds = common.time_fn(eval_fn, *args, repeats=3)
    return {"what": f"eval clean+PGD-10, dense-300-100, batch {batch}", "images/s": batch / seconds,
            "GFLOP/step": flops / 1e9, "FLOP ratio": flops / seconds / matmul}


def level_overhead(step_seconds: float) -> list[dict]:
    """prune + reset + fresh state + checkpoints of one level, against a level's training time."""
    s = setup("dense-300-100", 60, 1)
    trained = jax.tree_util.tree_map(lambda p: p + 0.01, s["params"])
    with tempfile.TemporaryDirectory() as tmp:
        tic = time.perf_counter()
        mask = pruning.prune_by(None, "magnitude", trained, s["mask"], {"*": 0.2, "output": 0.1})
        start = pruning.reset("rewind_init", {"init": s["params"]}, mask)
        state = training.create_train_state(start, s["model_state"], s["tx"], mask,
                                            jax.random.PRNGKey(0))
        jax.block_until_ready(state)
        prune_reset = time.perf_counter() - tic
        tic = time.perf_counter()
        store.save_mask(os.path.join(tmp, "mask.npz"), mask)
        store.save_tree(os.path.join(tmp, "start"), start)
        store.save_tree(os.path.join(tmp, "final"), (trained, s["model_state"]))
        level_saves = time.perf_counter() - tic
        saver = store.ProgressCheckpointer(os.path.join(tmp, "progress"))
        tic = time.perf_counter()
        saver.save(1000, {"state": state, "best_params": trained, "snapshot": trained},
                   {"history": []})
        progress_save = time.perf_counter() - tic
        saver.close()
    rows = []
    for steps, every, label in ((50_000, 5_000, "Cosentino level, 50,000 steps"),
                                (1_500, 500, "quickstart level, 1,500 steps")):
        level = steps * step_seconds
        overhead = prune_reset + level_saves + (steps // every) * progress_save
        rows.append({"what": f"prune+reset+checkpoints, {label}", "seconds": overhead,
                     "level seconds": level, "overhead %": 100 * overhead / level})
    return rows


def vmapped_trials(matmul, trials=4, steps=20):
    s = setup("dense-300-100", 60, steps)
    states, indices = [], []
    for t in range(trials):
        params, model_state = training.init_variables(s["model"], jax.random.PRNGKey(t),
                                                      s["images"][:1])
        states.append(training.create_train_state(params, model_state, s["tx"], s["mask"],
                                                  jax.random.PRNGKey(10 + t)))
        indices.append(data.batch_indices(jax.random.PRNGKey(20 + t), len(s["images"]), 60, 0, steps))
    loop = training.make_train_loop(s["model_fn"], s["tx"], s["objective"])
    vloop = training.make_train_loop(s["model_fn"], s["tx"], s["objective"], vmap_trials=True)
    stacked = training.stack_states(states)
    sequential = 0.0
    for state, idx in zip(states, indices):
        seconds, _ = time_loop(loop, state, s["images"], s["labels"], idx)
        sequential += seconds
    vmapped, _ = time_loop(vloop, stacked, s["images"], s["labels"], np.stack(indices))
    flops = trials * matmul_flops(loop, states[0], s["images"], s["labels"], indices[0])
    return [{"what": f"{trials} trials sequentially, dense-300-100 b60", "seconds": sequential,
             "FLOP ratio": flops / sequential / matmul},
            {"what": f"{trials} trials vmapped", "seconds": vmapped,
             "FLOP ratio": flops / vmapped / matmul, "speedup": sequential / vmapped}]


DEVICES_SCRIPT = textwrap.dedent("""
    import json, sys, jax
    from benchmarks.run import setup, time_loop
    from sparse_robust import parallel, training
    s = setup("dense-300-100", 512, int(sys.argv[1]))
    out = {}
    for n in (1, 8):
        mesh = parallel.make_mesh(jax.devices()[:n])
        rep = parallel.replicated(mesh)
        loop = training.make_train_loop(s["model_fn"], s["tx"], s["objective"], None, mesh)
        state = training.create_train_state(s["params"], s["model_state"], s["tx"], s["mask"],
                                            jax.random.PRNGKey(1))
        seconds, _ = time_loop(loop, parallel.put(state, rep), parallel.put(s["images"], rep),
                               parallel.put(s["labels"], rep),
                               parallel.put(s["indices"], parallel.batch_sharded(mesh, 1)))
        out[n] = int(sys.argv[1]) / seconds
    print("RESULT" + json.dumps(out))
""")


def devices(steps):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", DEVICES_SCRIPT, str(steps)], env=env,
                          capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1][6:])
    return [{"what": f"train b512 on {n} simulated CPU device(s)", "steps/s": result[str(n)],
             "speedup": result[str(n)] / result["1"]} for n in (1, 8)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (smoke check)")
    args = parser.parse_args()
    steps = 5 if args.quick else 20

    print(f"devices: {jax.devices()}")
    matmul = common.matmul_flops_per_second()
    print(f"matmul reference: {matmul / 1e9:.1f} GFLOP/s (2048x2048 float32, best of 5)\n")
    rows = [train_throughput("dense-300-100", 60, steps, matmul),
            train_throughput("dense-300-100", 512, steps, matmul),
            train_throughput("dense-300-100", 60, steps, matmul, objective="natural"),
            train_throughput("dense-300-100", 60, steps, matmul, objective="FGSM mixed"),
            # XLA:CPU computes conv weight gradients ~7x slower inside a loop (lax.scan) than
            # outside (benchmarks/README.md): scanned, one step timed once; then per step.
            train_throughput("conv-4", 60, 1, matmul, repeats=1),
            train_throughput("conv-4", 60, 2, matmul, repeats=1, scan=False),
            eval_throughput(matmul)]
    common.print_rows(rows, ["what", "steps/s", "ms/step", "images/s", "GFLOP/step", "FLOP ratio",
                             "temp MiB"])
    print()
    common.print_rows(conv_grad_in_loop(), ["what", "seconds", "slowdown"])
    print()
    common.print_rows(level_overhead(1 / rows[0]["steps/s"]),
                      ["what", "seconds", "level seconds", "overhead %"])
    print()
    common.print_rows(vmapped_trials(matmul, steps=steps), ["what", "seconds", "FLOP ratio", "speedup"])
    print()
    common.print_rows(devices(steps), ["what", "steps/s", "speedup"])
    matmul_end = common.matmul_flops_per_second()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"\nmatmul reference at the end: {matmul_end / 1e9:.1f} GFLOP/s; "
          f"peak host memory (RSS): {peak:.0f} MiB")


if __name__ == "__main__":
    main()
