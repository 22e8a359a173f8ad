"""One convolution layer, and one 2x2 max-pool, per CPU path: forward and input gradient (what
every attack step takes), warm, in the same run.

Layers: LeNet-5's two convolutions, the first layers of a CIFAR net (3 -> 16 and 3 -> 64), a
1 -> 64 first layer (conv-2/4/6 on MNIST-like inputs) and a narrow 8 -> 8 one; "auto" picks
"direct_cpu" for the ones with at most `conv.DIRECT_MAX_CHANNELS` channels in and out. Pools:
LeNet-5's two, on the kernel (`pool_cpu`) and as the XLA ops it replaces.

Run: ``python -m benchmarks.conv_layers [--batch 113]`` (about a minute on 2 CPU cores). Best of
20 calls each after a warm-up (`benchmarks.common.time_fn`).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.common import print_rows, time_fn
from sparse_robust.models import direct_cpu, pool_cpu
from sparse_robust.models.patches import conv_patches

# (name, input HWC, kernel HWIO, padding)
LAYERS = [
    ("lenet-5 conv_0", (28, 28, 1), (5, 5, 1, 6), ((2, 2), (2, 2))),
    ("lenet-5 conv_1", (14, 14, 6), (5, 5, 6, 16), ((0, 0), (0, 0))),
    ("cifar 3 -> 16", (32, 32, 3), (3, 3, 3, 16), ((1, 1), (1, 1))),
    ("narrow 8 -> 8", (16, 16, 8), (3, 3, 8, 8), ((1, 1), (1, 1))),
    ("mnist 1 -> 64", (28, 28, 1), (3, 3, 1, 64), ((1, 1), (1, 1))),
    ("cifar 3 -> 64", (32, 32, 3), (3, 3, 3, 64), ((1, 1), (1, 1))),
]
POOLS = [("lenet-5 pool_0", (28, 28, 6)), ("lenet-5 pool_1", (10, 10, 16))]


def _forward_and_input_gradient(fn, x, cotangent):
    forward = jax.jit(fn)
    gradient = jax.jit(lambda x, ct: jax.vjp(fn, x)[1](ct)[0])
    return (time_fn(forward, x, repeats=20) * 1e3,
            time_fn(gradient, x, cotangent, repeats=20) * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=113,
                        help="images (113: the rows AutoAttack's Square attacks on lenet-5)")
    args = parser.parse_args()
    if not direct_cpu.available():
        raise SystemExit(f"the kernel cannot run here: {direct_cpu.unavailable_reason()}")
    key_x, key_k, key_c = jax.random.split(jax.random.key(0), 3)
    rows = []
    for name, shape, kernel_shape, padding in LAYERS:
        x = jax.random.uniform(key_x, (args.batch, *shape))
        kernel = jax.random.normal(key_k, kernel_shape) / (kernel_shape[0] * kernel_shape[1])
        paths = {"patches": lambda x: conv_patches(x, kernel, (1, 1), padding),
                 "direct_cpu": lambda x: direct_cpu.conv(x, kernel, padding)}
        cotangent = jax.random.normal(key_c, paths["patches"](x).shape)
        times = {path: _forward_and_input_gradient(fn, x, cotangent) for path, fn in paths.items()}
        (pf, pg), (df, dg) = times["patches"], times["direct_cpu"]
        rows.append({"layer": name, "patches fwd ms": pf, "direct fwd ms": df,
                     "fwd speed-up": pf / df, "patches grad ms": pg, "direct grad ms": dg,
                     "grad speed-up": pg / dg})
    print_rows(rows)
    rows = []
    for name, shape in POOLS:
        x = jax.random.normal(key_x, (args.batch, *shape))
        cotangent = jax.random.normal(key_c, (args.batch, shape[0] // 2, shape[1] // 2, shape[2]))
        paths = {"XLA ops": lambda x: pool_cpu.max_pool(x, (2, 2), use_kernel=False),
                 "kernel": lambda x: pool_cpu.max_pool(x, (2, 2))}
        times = {path: _forward_and_input_gradient(fn, x, cotangent) for path, fn in paths.items()}
        (xf, xg), (kf, kg) = times["XLA ops"], times["kernel"]
        rows.append({"pool": name, "XLA fwd ms": xf, "kernel fwd ms": kf, "fwd speed-up": xf / kf,
                     "XLA grad ms": xg, "kernel grad ms": kg, "grad speed-up": xg / kg})
    print_rows(rows)


if __name__ == "__main__":
    main()
