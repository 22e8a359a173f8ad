"""AutoAttack (standard version, L∞, ε = 0.1) on Fashion-MNIST test images of a network
adversarially trained with PGD-10 at ε = 0.1 (--model: dense-300-100, its 1 % ticket, lenet-5):
wall time, images/s and robust accuracy per stage.

Run: ``python -m benchmarks.autoattack`` (a few minutes on 2 CPU cores; the first run also
trains the model, about a minute, and caches its weights under ~/.cache/sparse_robust). Each stage attacks only
the points every earlier stage left robust (`sparse_robust.attacks.autoattack.run_stages`). The whole
evaluation runs twice: "cold" includes XLA compilation, "warm" reuses the compiled programs.
Achieved FLOP/s count the matmuls of the stage's forward and input-gradient passes analytically
(Square's as if every chunk used all its queries and every query ran a whole forward pass: since
Square updates a first dense layer by the changed window's rows only (`attacks.dense_prefix`), its
figure is an effective rate that can exceed the machine's; dense networks only), next to
the matmul FLOP/s of a 2048×2048 product measured in the same run. ``benchmarks/crosscheck.py
--autoattack-stages`` runs the same stages beside the PyTorch reference.
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
from sparse_robust import attacks, data, evaluation, masks, models, objectives, pruning, training
from sparse_robust.attacks import passes
from sparse_robust.attacks.autoattack import run_stages
from sparse_robust.models import sparse_execution

EPS = 0.1


NETWORKS = ("dense-300-100", "ticket-1%", "lenet-5")
# The 1 % ticket: dense-300-100's weights pruned by magnitude, layer by layer, to 1 % of the hidden
# layers' weights and 10 % of the output layer's (1.03 % overall), then fine-tuned briefly.
TICKET_RATES = {"*": 0.99, "output": 0.9}
TICKET_STEPS = 500


def train(dataset, steps: int, seed: int, model_name: str = "dense-300-100", params=None,
          mask=None):
    """`model_name` trained with PGD-10 adversarial training (Madry) at ε = 0.1: Adam 1e-3,
    batch 128; from `params` with only `mask`'s weights alive when given (a ticket's
    fine-tuning), else from a fresh initialisation."""
    model = models.get_model(model_name)
    model_fn = training.make_model_fn(model)
    attack = attacks.make_attack("pgd", eps=EPS, step_size=0.025, num_steps=10)
    tx = optax.adam(1e-3)
    if params is None:
        params, _ = training.init_variables(model, jax.random.PRNGKey(seed),
                                            dataset.train_images[:1])
    state = training.create_train_state(params, {}, tx, masks.create_mask(params) if mask is None
                                        else mask, jax.random.PRNGKey(seed + 1))
    # Convolutions on XLA:CPU run faster step by step than inside a scan (benchmarks/README.md).
    loop = training.make_train_loop(model_fn, tx, objectives.Objective("madry", attack=attack),
                                    scan=model_name == "dense-300-100")
    indices = data.batch_indices(jax.random.PRNGKey(seed + 2), dataset.num_train, 128, 0, steps)
    images, labels = jax.numpy.asarray(dataset.train_images), jax.numpy.asarray(dataset.train_labels)
    for start in range(0, steps, 500):
        state, metrics = loop(state, images, labels, indices[start:start + 500])
        print(f"  step {start + len(indices[start:start + 500])}: "
              + ", ".join(f"{k} {float(np.asarray(v).reshape(-1)[-1]):.3f}" for k, v in metrics.items()))
    return model, state.params


def cache_path(network: str) -> str:
    return os.path.expanduser(f"~/.cache/sparse_robust/{network.replace('%', '')}"
                              "_fashion_mnist_madry_eps0.1.msgpack")


def load_or_train(dataset, path: str, steps: int, seed: int, model_name: str = "dense-300-100",
                  initial=None):
    """The weights cached at `path`, else `train(...)` from `initial` = (params, mask) or from
    scratch, cached there."""
    model = models.get_model(model_name)
    template, _ = training.init_variables(model, jax.random.PRNGKey(0), dataset.train_images[:1])
    if os.path.exists(path):
        with open(path, "rb") as f:
            return model, flax.serialization.from_bytes(template, f.read())
    print(f"training {model_name} (PGD-10 AT, ε = {EPS}, {steps} steps); caching at {path}")
    tic = time.perf_counter()
    model, params = train(dataset, steps, seed, model_name, *(initial or ()))
    print(f"  trained in {time.perf_counter() - tic:.0f} s")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(flax.serialization.to_bytes(params))
    return model, params


def default_steps(name: str, steps=None) -> int:
    return steps if steps is not None else 600 if name == "lenet-5" else 2500


def network(name: str, train_steps: int, seed: int):
    """(model, params, dataset) of one of `NETWORKS`, trained and cached on first use:
    dense-300-100 (`train_steps` steps), its 1 % ticket (`TICKET_RATES`, fine-tuned
    `TICKET_STEPS` steps) or lenet-5 (`train_steps` steps, on [28, 28, 1] images)."""
    if name not in NETWORKS:
        raise ValueError(f"--model={name!r} is invalid; allowed values: {NETWORKS}.")
    dataset = data.load_dataset("fashion_mnist", source="idx", flatten=name != "lenet-5")
    if name == "lenet-5":
        return (*load_or_train(dataset, cache_path(name), train_steps, seed, name), dataset)
    model, params = load_or_train(dataset, cache_path("dense-300-100"), train_steps, seed)
    if name == "dense-300-100":
        return model, params, dataset
    mask = pruning.magnitude_prune(params, masks.create_mask(params), TICKET_RATES)
    return (*load_or_train(dataset, cache_path(name), TICKET_STEPS, seed, "dense-300-100",
                           initial=(params, mask)), dataset)


def our_model_fn(name: str, model, params, sparse_impl: str = "auto"):
    """The model fn our side evaluates `name` with: the ticket's through
    `sparse_execution.sparse_model_fn` on its nonzeros (as the engine evaluates a ticket;
    "auto" runs its layers at <= 20 % density from their nonzeros), else the plain one."""
    if name != "ticket-1%":
        return training.make_model_fn(model)
    mask = masks.map_prunable(lambda _, p: p != 0, masks.create_mask(params), params)
    print(f"the ticket's dense layers run: {sparse_execution.sparse_impls(mask, sparse_impl)}")
    return sparse_execution.sparse_model_fn(model, mask, sparse_impl)


def add_sparse_impl_flag(parser) -> None:
    parser.add_argument("--sparse-impl", default="auto", choices=sparse_execution.SPARSE_IMPLS,
                        help="how our side runs ticket-1%%'s dense layers (the engine's "
                        "model.sparse_impl, default auto: from their nonzeros where <= 20 %% "
                        "alive); the reference runs the masked-dense network")


def forward_flops(params) -> float:
    """Matmul FLOPs of one forward pass of one example through the dense layers."""
    return 2.0 * sum(leaf.size for path, leaf in jax.tree_util.tree_leaves_with_path(params)
                     if "kernel" in jax.tree_util.keystr(path))


def passes_per_row(num_steps: int, n_targets: int, num_queries: int) -> dict:
    """Forward-pass equivalents per attacked row and stage (an input-gradient pass = 2 forwards,
    the dense layers' matmuls being the same size backwards)."""
    return {"apgd_ce": 2 * (num_steps + 1) + 1, "apgd_t": n_targets * 2 * (num_steps + 1) + 2,
            "fab_t": n_targets * num_steps * 3 + 2, "square": num_queries + 2}


def evaluate(model_fn, params, images, labels, stages, key, batch_size, logits_fn=None,
             evaluator=None):
    """Per-stage flags and (seconds, padded rows) per stage, timing each call of the stage: the
    driver ``evaluation.Evaluator`` runs AutoAttack with. With `logits_fn` (the model on params,
    one object across runs so its programs are reused), APGD-T and FAB-T run target by target on
    the points still robust (`attacks.passes.compacted`, as the evaluator); without, every target
    on every point of the chunk (one program per stage, as before issue 24). Pass the same
    `evaluator` to every run: its compiled programs are what a warm run reuses."""
    evaluator = evaluator or evaluation.Evaluator(model_fn, batch_size=batch_size)
    stage_attacks = list(stages.values())
    programs = [evaluator.program(attack) for attack in stage_attacks]
    seconds, rows = np.zeros(len(stages)), np.zeros(len(stages), np.int64)

    def stage_fn(index, x, y, key):
        tic = time.perf_counter()
        if logits_fn is not None and passes.num_passes(stage_attacks[index]) > 1:
            still = passes.compacted(stage_attacks[index], logits_fn, x, y, key)
        else:
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
    parser.add_argument("--model", default="dense-300-100", choices=NETWORKS,
                        help="the network (trained and cached under ~/.cache/sparse_robust)")
    parser.add_argument("--train-steps", type=int, default=None,
                        help="training steps (default 2500 for dense-300-100, 600 for lenet-5)")
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=int, default=2, help="1: cold only; 2: cold and warm")
    parser.add_argument("--mode", default="both", choices=["both", "compacted", "whole_batch"],
                        help="APGD-T/FAB-T target by target on the points still robust, every "
                        "target on every point (before issue 24), or both in one run")
    add_sparse_impl_flag(parser)
    args = parser.parse_args()

    print(f"backend: {jax.default_backend()}, devices: {jax.devices()}")
    model, params, dataset = network(args.model, default_steps(args.model, args.train_steps),
                                     args.seed)
    images = dataset.test_images[:args.num_images]
    labels = dataset.test_labels[:args.num_images]
    stages = attacks.autoattack_stages(EPS, "linf")
    per_row = passes_per_row(100, 9, 5000)
    # Counted for the dense layers only: lenet-5's convolutions are not in it.
    flop_row = forward_flops(params) if args.model != "lenet-5" else float("nan")

    matmul_before = matmul_flops_per_second()
    print(f"matmul 2048x2048 float32: {matmul_before / 1e9:.1f} GFLOP/s\n")
    model_fn = our_model_fn(args.model, model, params, args.sparse_impl)
    logits_fn = lambda z: model_fn(params, {}, z, False)[0]
    modes = {"compacted": logits_fn, "whole batch": None}
    if args.mode != "both":
        modes = {args.mode.replace("_", " "): modes[args.mode.replace("_", " ")]}
    results = {}
    evaluators = {mode: evaluation.Evaluator(model_fn, batch_size=args.batch_size) for mode in modes}
    for run, (mode, mode_logits) in [(r, m) for m in modes.items() for r in range(args.runs)]:
        tic = time.perf_counter()
        clean, flags, seconds, rows = evaluate(model_fn, params, images, labels, stages,
                                               jax.random.key(args.seed), args.batch_size,
                                               mode_logits, evaluators[mode])
        total = time.perf_counter() - tic
        results[mode, run] = (flags, seconds, total)
        table, attacked = [], int(clean.sum())
        for index, (name, robust) in enumerate(flags.items()):
            table.append({"stage": name, "images in": attacked, "seconds": seconds[index],
                          "images/s": attacked / seconds[index] if seconds[index] else float("nan"),
                          "robust acc": robust.mean(),
                          "GFLOP/s": rows[index] * per_row[name] * flop_row / seconds[index] / 1e9
                          if seconds[index] else float("nan")})
            attacked = int(robust.sum())
        print(f"{mode}, {'cold (with compilation)' if run == 0 else 'warm'}: {len(images)} images, clean "
              f"accuracy {clean.mean():.4f}, total {total:.1f} s ({len(images) / total:.1f} images/s)")
        print_rows(table)
        print()
    if len(modes) == 2:  # the same verdict per image, and what skipping broken points saves
        run = args.runs - 1
        (new, new_s, new_total), (old, old_s, old_total) = (results["compacted", run],
                                                          results["whole batch", run])
        same = all(np.array_equal(new[s], old[s]) for s in new)
        print(f"per-image verdicts identical: {same}; whole batch / compacted "
              f"({'warm' if run else 'cold'}): total {old_total / new_total:.2f}x, "
              + ", ".join(f"{s} {o / n:.2f}x" for s, o, n in zip(new, old_s, new_s) if n))
    print(f"matmul 2048x2048 float32 at the end: {matmul_flops_per_second() / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
