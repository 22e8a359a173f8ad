r"""A channel-pruned conv ticket, compacted, against its masked-dense original.

  python -m benchmarks.channel_compact            # conv-4 on 32x32x3, ~3 min on an idle machine
  python -m benchmarks.channel_compact --quick    # seconds

Random weights, zero biases (a ticket rewound to its initialisation) and, in one row, random
biases (as after training): a removed filter then outputs the constant relu(bias), which
`compact` folds into a following dense layer but must keep before a padded conv (see
pruning/compact.py), so fewer filters go. Channel masks from magnitude (L1) pruning at rate 0.5
applied k times (50 %, 25 %, 12.5 % of each hidden layer's filters and neurons kept; the output
layer whole).
Masked-dense is what the engine runs: the full network with the pruned weights at zero. Compact
is `sparse_robust.pruning.compact.compact` of the same ticket (same logits, checked here to
1e-5). FLOPs: matmul and convolution FLOPs per image on the jaxpr (XLA convolutions). Times:
best of 5 calls after a compile, `conv_impl="auto"` for both, clean logits of 1000 images and a
PGD-10 evaluation (ε 8/255, step 2/255) of 256; speed-up = masked-dense time / compact time. The
last line is one JSON object {"<model> <channels kept> <biases>": PGD-10 speed-up}.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from sparse_robust import attacks, masks, pruning
from sparse_robust.flops import forward_flops
from sparse_robust.models import get_model
from sparse_robust.pruning.compact import compact

SHAPE = (32, 32, 3)


def _params(model, biases: bool, seed=0, shape=SHAPE):
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape))))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if path[-1].key != "kernel":
            return jnp.asarray(rng.normal(size=leaf.shape) * 0.1 * biases, jnp.float32)
        scale = 1.0 / np.sqrt(np.prod(leaf.shape[:-1]))
        return jnp.asarray(rng.normal(size=leaf.shape) * scale, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes["params"])


def _runners(model, params, images, labels):
    pgd = attacks.make_attack("pgd", eps=8 / 255, step_size=2 / 255, num_steps=10)
    logits = jax.jit(lambda p, x: model.apply({"params": p}, x))
    attack = jax.jit(lambda p, x, y, k: pgd(lambda z: model.apply({"params": p}, z), x, y, k))
    key = jax.random.PRNGKey(1)
    return (lambda: logits(params, images)), (lambda: attack(params, images[:256], labels[:256],
                                                             key))


def channel_ticket(name: str, rounds: int, biases: bool, shape=SHAPE):
    """(model, masked params, mask, compacted): random weights, L1 channel pruning at rate 0.5
    applied `rounds` times (1 / 2**rounds of each hidden layer's channels kept)."""
    model = get_model(name)
    params = _params(model, biases, shape=shape)
    mask = masks.create_mask(params)
    for _ in range(rounds):
        mask = pruning.magnitude_prune(params, mask, 0.5, granularity="channel")
    return model, masks.apply_mask(params, mask), mask, compact(model, params, mask)


def row(name: str, rounds: int, biases: bool, images, labels, repeats: int) -> dict:
    model, dense_params, mask, small = channel_ticket(name, rounds, biases)
    np.testing.assert_allclose(small.model.apply({"params": small.params}, images[:64]),
                               model.apply({"params": dense_params}, images[:64]),
                               atol=1e-5, rtol=1e-5)
    xla = lambda m: m.clone(conv_impl="xla")
    flops_dense = forward_flops(xla(model), {"params": dense_params}, images)
    flops_small = forward_flops(xla(small.model), {"params": small.params}, images)
    times = {}
    for label, (m, p) in {"dense": (model, dense_params), "compact": (small.model,
                                                                      small.params)}.items():
        clean, pgd = _runners(m, p, images, labels)
        times[label] = (common.time_fn(clean, repeats=repeats),
                        common.time_fn(pgd, repeats=repeats))
    return {"model": name, "channels kept": f"{100 / 2**rounds:g}%",
            "biases": "random" if biases else "zero",
            "weights remaining": f"{masks.weights_remaining(mask):.1%}",
            "MFLOPs/img dense": flops_dense / 1e6, "MFLOPs/img compact": flops_small / 1e6,
            "FLOP ratio": flops_dense / flops_small,
            "clean s dense": times["dense"][0], "clean s compact": times["compact"][0],
            "clean speed-up": times["dense"][0] / times["compact"][0],
            "pgd10 s dense": times["dense"][1], "pgd10 s compact": times["compact"][1],
            "pgd10 speed-up": times["dense"][1] / times["compact"][1],
            "widths": str(small.model_kwargs["conv_stages"] + small.model_kwargs["dense_sizes"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="conv-2, one ticket, 2 repeats")
    parser.add_argument("--models", default="conv-4", help="comma-separated ConvNet names")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(1000, *SHAPE)).astype(np.float32)
    labels = rng.integers(0, 10, size=1000)
    names = args.models.split(",")
    cases = [("conv-2", 2, False)] if args.quick else (
        [(m, k, False) for m in names for k in (1, 2, 3)] + [(m, 2, True) for m in names])
    rows = [row(name, k, biases, images, labels, repeats=2 if args.quick else 5)
            for name, k, biases in cases]
    common.print_rows(rows)
    print(json.dumps({f"{r['model']} {r['channels kept']} {r['biases']} biases":
                      round(r["pgd10 speed-up"], 2) for r in rows}))


if __name__ == "__main__":
    main()
