"""Attack throughput: PGD L∞ on dense-300-100 and conv-4, and an ε sweep with vmap vs a loop.

Run: ``python -m benchmarks.attacks`` (a few minutes on 2 CPU cores). Prints images×steps/s,
achieved FLOP/s (XLA's count of one PGD step × steps / time) and its ratio to this machine's
matmul FLOP/s measured in the same run, then the vmap/loop time ratio of an 8-ε sweep.
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import compiled_flops, matmul_flops_per_second, print_rows, time_fn
from sparse_robust import attacks
from sparse_robust.models import get_model

EPS = 0.3
# MNIST-sized inputs; MLPs get them flattened, as in the dense-300-100 experiments.
INPUT_SHAPES = {"dense-300-100": (784,), "conv-4": (28, 28, 1)}


def _setup(model_name: str, batch: int):
    model = get_model(model_name)
    init_key, x_key, y_key = jax.random.split(jax.random.key(0), 3)
    x = jax.random.uniform(x_key, (batch, *INPUT_SHAPES[model_name]))
    y = jax.random.randint(y_key, (batch,), 0, 10)
    variables = model.init(init_key, x[:1])
    return model, variables, x, y


def _pgd_fn(model, num_steps: int, random_start: bool = True):
    """jit((variables, x, y, key, eps) -> x_adv); variables are an argument, not constants."""
    def run(variables, x, y, key, eps):
        logits_fn = lambda z: model.apply(variables, z, train=False)
        return attacks.pgd(logits_fn, x, y, key, eps=eps, step_size=eps / 4, num_steps=num_steps,
                           random_start=random_start)
    return jax.jit(run)


def _dense_step_flops(variables, batch: int) -> float:
    """Analytic FLOPs of one PGD step on an MLP: forward plus the input-gradient backward pass,
    each 2·batch·Σ(fan_in·fan_out) multiply-adds."""
    kernels = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(variables)
               if "kernel" in jax.tree_util.keystr(path)]
    return 4.0 * batch * sum(math.prod(k.shape) for k in kernels)


def pgd_throughput(model_name: str, batch: int, num_steps: int, repeats: int, matmul: float) -> dict:
    model, variables, x, y = _setup(model_name, batch)
    key = jax.random.key(1)
    pgd = _pgd_fn(model, num_steps)
    seconds = time_fn(pgd, variables, x, y, key, EPS, warmup=1, repeats=repeats)
    # One deterministic step: XLA counts a loop body once, so count one step and scale.
    step_flops = compiled_flops(_pgd_fn(model, 1, random_start=False), variables, x, y, key, EPS)
    achieved = num_steps * step_flops / seconds
    row = {
        "model": model_name, "batch": batch, "steps": num_steps, "seconds": seconds,
        "img*steps/s": batch * num_steps / seconds, "GFLOP/step(xla)": step_flops / 1e9,
        "GFLOP/s": achieved / 1e9, "vs_matmul": achieved / matmul,
    }
    if model_name.startswith("dense"):
        row["GFLOP/step(analytic)"] = _dense_step_flops(variables, batch) / 1e9
    return row


def sweep_vmap_vs_loop(model_name: str, batch: int, num_steps: int, num_eps: int, repeats: int) -> dict:
    model, variables, x, y = _setup(model_name, batch)
    key = jax.random.key(2)
    eps_grid = jnp.linspace(0.0, EPS, num_eps)
    pgd = _pgd_fn(model, num_steps)
    swept = jax.jit(jax.vmap(pgd, in_axes=(None, None, None, None, 0)))

    def loop(variables, x, y, key, grid):
        return [pgd(variables, x, y, key, eps) for eps in grid]

    grid = list(np.asarray(eps_grid))  # Host floats: the loop reuses one compiled program.
    vmap_seconds = time_fn(swept, variables, x, y, key, eps_grid, warmup=1, repeats=repeats)
    loop_seconds = time_fn(loop, variables, x, y, key, grid, warmup=1, repeats=repeats)
    return {"model": model_name, "batch": batch, "steps": num_steps, "num_eps": num_eps,
            "vmap_s": vmap_seconds, "loop_s": loop_seconds, "loop/vmap": loop_seconds / vmap_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--conv-batch", type=int, default=50,
                        help="conv-4 batch (smaller: conv-4 PGD-40 at batch 1000 takes many minutes on CPU)")
    parser.add_argument("--conv-steps", type=int, default=10)
    parser.add_argument("--conv-repeats", type=int, default=1)
    parser.add_argument("--sweep-steps", type=int, default=10)
    parser.add_argument("--num-eps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    print(f"backend: {jax.default_backend()}, devices: {jax.devices()}")
    matmul = matmul_flops_per_second(repeats=args.repeats + 2)
    print(f"matmul 2048x2048 float32: {matmul / 1e9:.1f} GFLOP/s\n")

    rows = [pgd_throughput("dense-300-100", args.batch, args.steps, args.repeats, matmul),
            pgd_throughput("conv-4", args.conv_batch, args.conv_steps, args.conv_repeats, matmul)]
    print("PGD L∞ throughput")
    print_rows(rows, ["model", "batch", "steps", "seconds", "img*steps/s", "GFLOP/step(xla)",
                      "GFLOP/step(analytic)", "GFLOP/s", "vs_matmul"])
    print()
    # vmap multiplies the working set by the number of ε values; the second row keeps
    # batch × num_eps equal to --batch, to separate that memory effect from vmap itself.
    print(f"{args.num_eps}-ε sweep: vmap vs Python loop (one compiled program each)")
    print_rows([sweep_vmap_vs_loop("dense-300-100", batch, args.sweep_steps, args.num_eps, args.repeats)
                for batch in (args.batch, max(1, args.batch // args.num_eps))])


if __name__ == "__main__":
    main()
