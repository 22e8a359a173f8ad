"""FMN's robustness curve against an AutoAttack point, on the network of benchmarks.autoattack
(dense-300-100, PGD-10 adversarial training at ε = 0.1, Fashion-MNIST test images).

Run: ``python -m benchmarks.fmn`` (after ``python -m benchmarks.autoattack`` has cached the
weights, or it trains them). One FMN run (L∞, `--steps` steps) gives every image its smallest
adversarial norm, hence robust accuracy at every ε of a grid; standard AutoAttack gives one
point (ε = 0.1). Both through ``evaluation.Evaluator``, each timed cold (with compilation) and
warm; the ratio printed is AutoAttack's warm time over FMN's. ``evaluation.fmn_check`` says
whether FMN's curve at ε = 0.1 falls below AutoAttack (points AutoAttack missed).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from benchmarks.autoattack import EPS, load_or_train
from sparse_robust import attacks, data, evaluation, training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=os.path.expanduser(
        "~/.cache/sparse_robust/dense-300-100_fashion_mnist_madry_eps0.1.msgpack"))
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--skip-autoattack", action="store_true")
    args = parser.parse_args()

    print(f"backend: {jax.default_backend()}")
    dataset = data.load_dataset("fashion_mnist", source="idx", flatten=True)
    model, params = load_or_train(dataset, args.weights, 2500, 0)
    images, labels = dataset.test_images[:args.num_images], dataset.test_labels[:args.num_images]
    evaluator = evaluation.Evaluator(training.make_model_fn(model), batch_size=1000)
    fmn = attacks.make_attack("fmn", eps=EPS, norm="linf", num_steps=args.steps)
    times = []
    for run in range(2):
        tic = time.perf_counter()
        norms = evaluator.minimal_norms(params, {}, images, labels, fmn)
        times.append(time.perf_counter() - tic)
    grid = np.linspace(0.0, 0.3, 31)
    curve = evaluation.robustness_curve(norms, grid)
    print(f"FMN-{args.steps} L∞ on {len(images)} images: cold {times[0]:.1f} s, warm "
          f"{times[1]:.1f} s; median minimal norm {evaluation.median_norm(norms):.4f}")
    print("curve: " + ", ".join(f"ε {e:.2f}: {a:.3f}" for e, a in zip(grid[::5], curve[::5])))
    at_eps = float(evaluation.robustness_curve(norms, [EPS])[0])
    if args.skip_autoattack:
        return
    autoattack = attacks.make_attack("autoattack", eps=EPS)
    aa_times = []
    for run in range(2):
        tic = time.perf_counter()
        robust = evaluator.evaluate(params, {}, images, labels, {"aa": autoattack},
                                    jax.random.key(0))["aa_accuracy"]
        aa_times.append(time.perf_counter() - tic)
    print(f"AutoAttack at ε = {EPS}: robust {robust:.3f}; cold {aa_times[0]:.1f} s, warm "
          f"{aa_times[1]:.1f} s. FMN at ε = {EPS}: {at_eps:.3f}. AutoAttack warm / FMN warm "
          f"(a whole curve vs one point): {aa_times[1] / times[1]:.2f}x")
    print(evaluation.format_checks([evaluation.fmn_check(at_eps, robust, len(images))]))


if __name__ == "__main__":
    main()
