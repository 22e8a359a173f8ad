"""FAB's projection on CPU: the C++ kernel (`attacks.fab_cpu`) against the XLA-ops form it
replaces (`fab.project_to_hyperplane_in_box`), alone and inside one FAB-T pass (100 steps), on
the first test images of benchmarks/autoattack.py's adversarially trained dense-300-100.

Run: ``python -m benchmarks.fab_projection`` (about a minute on 2 CPU cores; trains and caches
the network first if needed). Best of 5 warm calls each, both in the same run.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.autoattack import default_steps, network, our_model_fn
from benchmarks.common import print_rows, time_fn
from sparse_robust.attacks import fab, fab_cpu

OPTIONS = dict(eps=0.1, num_steps=100, norm="linf", n_target_classes=9, alpha_max=0.1, eta=1.05,
               beta=0.9, clip_min=0.0, clip_max=1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=608, help="test images (a FAB-T chunk)")
    args = parser.parse_args()
    if not fab_cpu.available():
        raise SystemExit(f"the kernel cannot run here: {fab_cpu._load()}")
    model, params, dataset = network("dense-300-100", default_steps("dense-300-100"), 0)
    model_fn = our_model_fn("dense-300-100", model, params)
    logits_fn = lambda z: model_fn(params, {}, z, False)[0]  # noqa: E731
    x = jnp.asarray(dataset.test_images[:args.rows])
    y = jnp.asarray(dataset.test_labels[:args.rows])
    # A FAB step's projection: both the iterate and the clean point, on the margin's hyperplane.
    w = jax.grad(lambda z: jnp.sum(logits_fn(z)[:, 1] - logits_fn(z)[:, 0]))(x)
    points, normals = jnp.concatenate([x, x]), jnp.concatenate([w, w])
    offsets = jnp.sum(normals * points, axis=1) - 0.5
    projections = {"kernel": fab_cpu.project, "XLA ops": fab.project_to_hyperplane_in_box}
    rows, chosen = [], fab._projection
    try:
        for name, project in projections.items():
            alone = jax.jit(lambda p, n, o, project=project: project(p, n, o, "linf"))
            fab._projection = lambda project=project: project  # what the FAB-T pass steps with
            one_pass = jax.jit(lambda x, y: fab.fab_pass(logits_fn, x, y, 0, **OPTIONS))
            rows.append({"projection": name,
                         f"one projection [{2 * args.rows}, 784] ms": 1e3 * time_fn(
                             alone, points, normals, offsets),
                         "one FAB-T pass s": time_fn(one_pass, x, y)})
    finally:
        fab._projection = chosen
    print_rows(rows)
    for column in list(rows[0])[1:]:
        print(f"{column}: XLA ops / kernel = {rows[1][column] / rows[0][column]:.2f}x")


if __name__ == "__main__":
    main()
