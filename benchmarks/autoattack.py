"""AutoAttack (standard version, L∞, ε = 0.1) on Fashion-MNIST test images of a dense-300-100
adversarially trained with PGD-10 at ε = 0.1: wall time, images/s and robust accuracy per stage.

Run: ``python -m benchmarks.autoattack`` (a few minutes on 2 CPU cores; the first run also
trains the model, about a minute, and caches its weights at --weights). Each stage attacks only
the points every earlier stage left robust (`sparse_robust.attacks.autoattack.run_stages`). The whole
evaluation runs twice: "cold" includes XLA compilation, "warm" reuses the compiled programs.
Achieved FLOP/s count the matmuls of the stage's forward and input-gradient passes analytically
(Square's as if every chunk used all its queries, an upper bound), next to the matmul FLOP/s of a
2048×2048 product measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import time

import flax
import jax
import numpy as np
import optax

from benchmarks.common import matmul_flops_per_second, print_rows
from sparse_robust import attacks, data, evaluation, masks, models, objectives, training
from sparse_robust.attacks.autoattack import run_stages

EPS = 0.1


def train(dataset, steps: int, seed: int):
    """dense-300-100 trained with PGD-10 adversarial training (Madry) at ε = 0.1: Adam 1e-3,
    batch 128."""
    model = models.get_model("dense-300-100")
    model_fn = training.make_model_fn(model)
    attack = attacks.make_attack("pgd", eps=EPS, step_size=0.025, num_steps=10)
    tx = optax.adam(1e-3)
    params, model_state = training.init_variables(model, jax.random.PRNGKey(seed),
                                                  dataset.train_images[:1])
    state = training.create_train_state(params, model_state, tx, masks.create_mask(params),
                                        jax.random.PRNGKey(seed + 1))
    loop = training.make_train_loop(model_fn, tx, objectives.Objective("madry", attack=attack))
    indices = data.batch_indices(jax.random.PRNGKey(seed + 2), dataset.num_train, 128, 0, steps)
    images, labels = jax.numpy.asarray(dataset.train_images), jax.numpy.asarray(dataset.train_labels)
    for start in range(0, steps, 500):
        state, metrics = loop(state, images, labels, indices[start:start + 500])
        print(f"  step {start + len(indices[start:start + 500])}: "
              + ", ".join(f"{k} {float(v):.3f}" for k, v in metrics.items()))
    return model, state.params


def load_or_train(dataset, path: str, steps: int, seed: int):
    model = models.get_model("dense-300-100")
    template, _ = training.init_variables(model, jax.random.PRNGKey(0), dataset.train_images[:1])
    if os.path.exists(path):
        with open(path, "rb") as f:
            return model, flax.serialization.from_bytes(template, f.read())
    print(f"training dense-300-100 (PGD-10 AT, ε = {EPS}, {steps} steps); caching at {path}")
    tic = time.perf_counter()
    model, params = train(dataset, steps, seed)
    print(f"  trained in {time.perf_counter() - tic:.0f} s")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(flax.serialization.to_bytes(params))
    return model, params


def forward_flops(params) -> float:
    """Matmul FLOPs of one forward pass of one example through the dense layers."""
    return 2.0 * sum(leaf.size for path, leaf in jax.tree_util.tree_leaves_with_path(params)
                     if "kernel" in jax.tree_util.keystr(path))


def passes_per_row(num_steps: int, n_targets: int, num_queries: int) -> dict:
    """Forward-pass equivalents per attacked row and stage (an input-gradient pass = 2 forwards,
    the dense layers' matmuls being the same size backwards)."""
    return {"apgd_ce": 2 * (num_steps + 1) + 1, "apgd_t": n_targets * 2 * (num_steps + 1) + 2,
            "fab_t": n_targets * num_steps * 3 + 2, "square": num_queries + 2}


def evaluate(model_fn, params, images, labels, stages, key, batch_size):
    """Per-stage flags and (seconds, padded rows) per stage, timing each call of the stage: the
    driver and the programs ``evaluation.Evaluator`` runs AutoAttack with."""
    evaluator = evaluation.Evaluator(model_fn, batch_size=batch_size)
    programs = [evaluator.program(attack) for attack in stages.values()]
    seconds, rows = np.zeros(len(stages)), np.zeros(len(stages), np.int64)

    def stage_fn(index, x, y, key):
        tic = time.perf_counter()
        still = np.asarray(programs[index](params, {}, x, y, key)[0])
        seconds[index] += time.perf_counter() - tic
        rows[index] += len(x)
        return still

    clean = evaluator.per_example(params, {}, images, labels)["clean"].correct
    flags = run_stages(stage_fn, images, labels, clean, key, stages=tuple(stages),
                                  batch_size=batch_size)
    return clean, flags, seconds, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=os.path.expanduser(
        "~/.cache/sparse_robust/dense-300-100_fashion_mnist_madry_eps0.1.msgpack"),
        help="where the trained weights are cached (trained and written if missing)")
    parser.add_argument("--train-steps", type=int, default=2500)
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=int, default=2, help="1: cold only; 2: cold and warm")
    args = parser.parse_args()

    print(f"backend: {jax.default_backend()}, devices: {jax.devices()}")
    dataset = data.load_dataset("fashion_mnist", source="idx", flatten=True)
    model, params = load_or_train(dataset, args.weights, args.train_steps, args.seed)
    images = dataset.test_images[:args.num_images]
    labels = dataset.test_labels[:args.num_images]
    stages = attacks.autoattack_stages(EPS, "linf")
    passes = passes_per_row(100, 9, 5000)
    flop_row = forward_flops(params)

    matmul_before = matmul_flops_per_second()
    print(f"matmul 2048x2048 float32: {matmul_before / 1e9:.1f} GFLOP/s\n")
    for run in range(args.runs):
        tic = time.perf_counter()
        clean, flags, seconds, rows = evaluate(training.make_model_fn(model), params, images,
                                               labels, stages,
                                               jax.random.key(args.seed), args.batch_size)
        total = time.perf_counter() - tic
        table, attacked = [], int(clean.sum())
        for index, (name, robust) in enumerate(flags.items()):
            table.append({"stage": name, "images in": attacked, "seconds": seconds[index],
                          "images/s": attacked / seconds[index] if seconds[index] else float("nan"),
                          "robust acc": robust.mean(),
                          "GFLOP/s": rows[index] * passes[name] * flop_row / seconds[index] / 1e9
                          if seconds[index] else float("nan")})
            attacked = int(robust.sum())
        print(f"{'cold (with compilation)' if run == 0 else 'warm'}: {len(images)} images, clean "
              f"accuracy {clean.mean():.4f}, total {total:.1f} s ({len(images) / total:.1f} images/s)")
        print_rows(table)
        print()
    print(f"matmul 2048x2048 float32 at the end: {matmul_flops_per_second() / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
