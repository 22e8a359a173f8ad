"""Sparse execution of unstructured tickets against masked-dense, in the same run.

Run: ``python -m benchmarks.sparse_tickets`` (about 8 minutes on 2 shared CPU cores; ``--quick``
for a short run: tiny sizes, dense-300-100 at 1 % only). For dense-300-100 with 10 %, 3.6 % and 1 % of each layer's
weights kept (random masks, random Glorot weights), for conv-2 with 1 % kept (its dense
layers run sparse, its convolutions stay dense; 100 images), and for a conv-2 ticket
channel-pruned to 25 % of each hidden layer's channels then compacted ("conv-2 channel 25%":
benchmarks.channel_compact's ticket, its second path the compacted network; 100 images), it times

* eval:  PGD-40 (L∞, ε = 0.3, step 0.01, random start, random labels) on 1000 images, then the
         per-example correctness, as the evaluator runs it;
* train: one adversarial training step of the paper ("mixed" objective, PGD-10 with ε = 0.3,
         step 0.05, Adam) on a batch of 60;

once with the masked-dense model fn and once with `sparse_model_fn(..., "sparse")` (or the
compacted network), and checks
both give the same per-example results. It prints a table and, as its last line, one JSON
object mapping "<model> <density>" to the evaluation speed-up (masked-dense time / sparse time).
Times are the best of `--repeats` rounds after a compiling call, the two paths timed in turns.
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import channel_compact
from benchmarks.common import matmul_flops_per_second, print_rows, time_fn
from sparse_robust import attacks, masks, objectives, training
from sparse_robust.models import get_model, sparse_execution

EPS = 0.3
INPUT_SHAPES = {"dense-300-100": (784,), "conv-2": (28, 28, 1)}
DENSITIES = (0.1, 0.036, 0.01)
CHANNEL_ROUNDS = 2  # the channel-pruned conv-2 row keeps 25 % of each hidden layer's channels


def random_ticket(model_name: str, density: float, key):
    """(model, params, mask): random Glorot weights with `density` of each prunable layer's
    weights kept at random, the rest zero."""
    model = get_model(model_name)
    init_key, mask_key = jax.random.split(key)
    params, _ = training.init_variables(model, init_key, jnp.zeros((1, *INPUT_SHAPES[model_name])))
    mask = masks.create_mask(params)
    names = [name for name, leaf in masks.named_leaves(mask).items() if leaf is not None]
    keys = dict(zip(names, jax.random.split(mask_key, len(names))))
    mask = masks.from_named_leaves(mask, {
        name: None if leaf is None else jax.random.uniform(keys[name], leaf.shape) < density
        for name, leaf in masks.named_leaves(mask).items()})
    return model, masks.apply_mask(params, mask), mask


def eval_program(model_fn, num_steps: int):
    """jit((params, x, y, key) -> correct [B]) under PGD-`num_steps`."""
    def run(params, x, y, key):
        logits_fn = lambda z: model_fn(params, {}, z, False)[0]
        x_adv = attacks.pgd(logits_fn, x, y, key, eps=EPS, step_size=0.01, num_steps=num_steps)
        return jnp.argmax(logits_fn(x_adv), -1) == y
    return jax.jit(run)


def train_program(model_fn, num_steps: int):
    """jit((state, x, y) -> (state, metrics)): one "mixed" step with PGD-`num_steps`."""
    attack = attacks.make_attack("pgd", eps=EPS, step_size=0.05, num_steps=num_steps)
    objective = objectives.Objective("mixed", attack=attack, label_smoothing=0.1)
    return jax.jit(training.make_train_step(model_fn, optax.adam(1.2e-3), objective))


def paired_times(programs: dict, args: tuple, repeats: int) -> dict:
    """{name: best seconds per call} of each program on `args`, timed in turns (one call of
    each per round, after a compiling call) so that load from other processes hits all alike."""
    for program in programs.values():
        jax.block_until_ready(program(*args))
    times = {name: float("inf") for name in programs}
    for _ in range(repeats):
        for name, program in programs.items():
            times[name] = min(times[name], time_fn(program, *args, warmup=0, repeats=1))
    return times


def _time_paths(paths: dict, x, y, attack_key, *, eval_steps: int, train_batch: int,
                train_steps: int, repeats: int) -> dict:
    """Eval and train columns of a row. `paths`: {"dense" | "sparse": (model fn, params, mask)};
    the "sparse" path is the one measured against masked-dense (sparse kernel or compacted)."""
    evals = {impl: functools.partial(eval_program(fn, eval_steps), params)
             for impl, (fn, params, _) in paths.items()}
    times = paired_times(evals, (x, y, attack_key), repeats)
    correct = {impl: np.asarray(program(x, y, attack_key)) for impl, program in evals.items()}
    row = {"eval dense s": times["dense"], "eval sparse s": times["sparse"],
           "eval speed-up": times["dense"] / times["sparse"],
           "eval differ": int(np.sum(correct["dense"] != correct["sparse"]))}

    steps = {impl: functools.partial(train_program(fn, train_steps), training.create_train_state(
                 params, {}, optax.adam(1.2e-3), mask, jax.random.key(2)))
             for impl, (fn, params, mask) in paths.items()}
    batch = (x[:train_batch], y[:train_batch])
    times = paired_times(steps, batch, repeats)
    losses = {impl: float(step(*batch)[1]["loss"]) for impl, step in steps.items()}
    row.update({"train dense s": times["dense"], "train sparse s": times["sparse"],
                "train speed-up": times["dense"] / times["sparse"],
                "train loss diff": abs(losses["dense"] - losses["sparse"])})
    return row


def _inputs(model_name: str, batch: int):
    """(x, y, attack key): uniform images, random labels."""
    x_key, y_key, attack_key = jax.random.split(jax.random.key(1), 3)
    return (jax.random.uniform(x_key, (batch, *INPUT_SHAPES[model_name])),
            jax.random.randint(y_key, (batch,), 0, 10), attack_key)


def measure(model_name: str, density: float, *, eval_batch: int, eval_steps: int,
            train_batch: int, train_steps: int, repeats: int) -> dict:
    """One table row: times of both paths and whether their results agree."""
    model, params, mask = random_ticket(model_name, density, jax.random.key(0))
    paths = {"dense": (training.make_model_fn(model), params, mask),
             "sparse": (sparse_execution.sparse_model_fn(model, mask, "sparse"), params, mask)}
    return {"model": model_name, "density": density,
            "sparse layers": len(sparse_execution.patterns(mask, "sparse")),
            **_time_paths(paths, *_inputs(model_name, eval_batch), eval_steps=eval_steps,
                          train_batch=train_batch, train_steps=train_steps, repeats=repeats)}


def measure_channel(model_name: str, rounds: int, *, eval_batch: int, eval_steps: int,
                    train_batch: int, train_steps: int, repeats: int) -> dict:
    """The row of a channel-pruned conv ticket (benchmarks.channel_compact's: random weights,
    zero biases, L1 channel pruning at rate 0.5 `rounds` times), its "sparse" path the
    compacted network (pruning.compact) against the masked-dense original."""
    model, params, mask, small = channel_compact.channel_ticket(
        model_name, rounds, biases=False, shape=INPUT_SHAPES[model_name])
    paths = {"dense": (training.make_model_fn(model), params, mask),
             "sparse": (training.make_model_fn(small.model), small.params, small.mask)}
    return {"model": f"{model_name} channel", "density": 0.5 ** rounds,
            "sparse layers": "compact",
            **_time_paths(paths, *_inputs(model_name, eval_batch), eval_steps=eval_steps,
                          train_batch=train_batch, train_steps=train_steps, repeats=repeats)}


def speed_ups(rows) -> dict:
    """{"<model> <density>%": evaluation speed-up} of the table's rows."""
    return {f"{r['model']} {r['density'] * 100:.3g}%": round(r["eval speed-up"], 2) for r in rows}


def run(quick: bool = False, repeats: int = 3, densities=DENSITIES, conv: bool = True) -> list:
    sizes = (dict(eval_batch=64, eval_steps=2, train_batch=16, train_steps=2) if quick else
             dict(eval_batch=1000, eval_steps=40, train_batch=60, train_steps=10))
    rows = [measure("dense-300-100", d, **sizes, repeats=repeats) for d in densities]
    if conv:  # convolutions dominate its time; a smaller batch keeps the run in minutes
        conv_sizes = {**sizes, "eval_batch": min(sizes["eval_batch"], 100)}
        rows.append(measure("conv-2", 0.01, **conv_sizes, repeats=repeats))
        rows.append(measure_channel("conv-2", CHANNEL_ROUNDS, **conv_sizes, repeats=repeats))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, dense-300-100 at 1 %% only (unless --densities): "
                             "about half a minute, mostly compilation")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (best is kept)")
    parser.add_argument("--densities", type=float, nargs="+", default=None,
                        help="fractions of dense-300-100's weights kept")
    parser.add_argument("--no-conv", action="store_true",
                        help="skip the conv-2 rows (unstructured 1 %%, channel 25 %% compacted)")
    args = parser.parse_args(argv)
    densities = args.densities or ((0.01,) if args.quick else DENSITIES)
    rows = run(args.quick, 1 if args.quick else args.repeats, densities,
               not (args.no_conv or args.quick))
    print(f"{jax.device_count()} {jax.default_backend()} device(s); sparse kernel: "
          f"{sparse_execution.sparse_cpu.unavailable_reason() or 'built'}; 1024^2 matmul "
          f"{matmul_flops_per_second(1024) / 1e9:.0f} GFLOP/s (the machine's load)")
    print_rows(rows)
    print(json.dumps(speed_ups(rows)))


if __name__ == "__main__":
    main()
