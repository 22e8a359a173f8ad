"""Cross-check against torchattacks: the same weights and images, our attacks and theirs side by
side (robust accuracy, per-example agreement, seconds), AutoAttack included.

Needs the optional extra: ``pip install -e '.[crosscheck]'`` (torch, torchattacks; no test
imports this file). Run: ``python -m benchmarks.crosscheck`` (the model is the one of
``benchmarks/autoattack.py``, trained and cached on first use). On 2 CPU cores the PyTorch side
takes tens of minutes for 1000 images, mostly in Square and AutoAttack; --expensive-images runs
APGD-T, FAB-T, Square and AutoAttack on the first N images only.

Both sides use the reference's standard settings: ε = 0.1 L∞, 100 steps for APGD/APGD-T/FAB-T,
9 targets, Square with 5000 queries on the unrescaled schedule. "AutoAttack (torchattacks
pieces)" chains torchattacks' APGD, APGDT, FAB and Square with these settings, as fra31's
standard version does; "torchattacks.AutoAttack" is their class as shipped (10 steps per
gradient attack, a rescaled Square schedule), listed for reference only. Where the reference
implementation itself is importable (``pip install git+https://github.com/fra31/auto-attack``,
module ``autoattack``), "AutoAttack (fra31)" runs its standard version too. Our times include
XLA compilation.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import time

import jax
import numpy as np
import torch
import torchattacks

from benchmarks.autoattack import EPS, load_or_train
from benchmarks.common import print_rows
from sparse_robust import attacks, data, evaluation, training


def torch_model(params) -> torch.nn.Module:
    """dense-300-100 (no biases, ReLU) in PyTorch with our kernels; it takes NCHW images."""
    kernels = [np.asarray(params[name]["kernel"]) for name in ("dense_0", "dense_1", "output")]
    layers = [torch.nn.Flatten()]
    for i, kernel in enumerate(kernels):
        linear = torch.nn.Linear(*kernel.shape, bias=False)
        linear.weight.data = torch.from_numpy(kernel.T.copy())
        layers += [linear] + ([torch.nn.ReLU()] if i < len(kernels) - 1 else [])
    return torch.nn.Sequential(*layers).eval()


def our_attacks():
    return {
        "FGSM": attacks.make_attack("fgsm", eps=EPS),
        "PGD-40": attacks.make_attack("pgd", eps=EPS, step_size=EPS / 10, num_steps=40),
        "APGD-CE": attacks.make_attack("apgd", eps=EPS, num_steps=100, loss="ce"),
        "APGD-DLR": attacks.make_attack("apgd", eps=EPS, num_steps=100, loss="dlr"),
        "APGD-T": attacks.make_attack("apgd_t", eps=EPS, num_steps=100, n_target_classes=9),
        "FAB-T": attacks.make_attack("fab_t", eps=EPS, num_steps=100, n_target_classes=9),
        "Square": attacks.make_attack("square", eps=EPS, num_queries=5000, rescale_schedule=False),
    }


def their_attacks(model):
    ta = torchattacks
    pieces = [ta.APGD(model, eps=EPS, steps=100, loss="ce", n_restarts=1),
              ta.APGDT(model, eps=EPS, steps=100, n_classes=10, n_restarts=1),
              ta.FAB(model, eps=EPS, steps=100, multi_targeted=True, n_classes=10, n_restarts=1),
              ta.Square(model, eps=EPS, n_queries=5000, resc_schedule=False, n_restarts=1)]
    return {
        "FGSM": ta.FGSM(model, eps=EPS),
        "PGD-40": ta.PGD(model, eps=EPS, alpha=EPS / 10, steps=40, random_start=True),
        "APGD-CE": pieces[0],
        "APGD-DLR": ta.APGD(model, eps=EPS, steps=100, loss="dlr", n_restarts=1),
        "APGD-T": pieces[1], "FAB-T": pieces[2], "Square": pieces[3],
        "AutoAttack": ta.MultiAttack(pieces),
        "torchattacks.AutoAttack": ta.AutoAttack(model, norm="Linf", eps=EPS, version="standard",
                                                 n_classes=10, seed=0),
    }


def run_ours(name, attack, model_fn, params, x, y, key):
    """Robust per example under our attack, through the library's evaluator (AutoAttack stage
    by stage, each stage on the images still robust)."""
    if name.startswith("AutoAttack"):
        attack = attacks.make_attack("autoattack", eps=EPS)
    tic = time.perf_counter()
    robust = evaluation.Evaluator(model_fn, batch_size=len(x)).per_example(
        params, {}, x, y, {"attack": attack}, key)["attack"].correct
    return robust, time.perf_counter() - tic


class Fra31AutoAttack:
    """fra31/auto-attack's standard version (batches of 250, its default), called like a
    torchattacks attack."""

    def __init__(self, model, seed):
        reference = importlib.import_module("autoattack")  # fra31's package, not ours.
        self.adversary = reference.AutoAttack(model, norm="Linf", eps=EPS, version="standard",
                                              seed=seed, device="cpu", verbose=False)

    def __call__(self, images, labels):
        return self.adversary.run_standard_evaluation(images, labels, bs=250)


def run_theirs(attack, model, x, y):
    images = torch.from_numpy(x.reshape(-1, 1, 28, 28))
    labels = torch.from_numpy(y.astype(np.int64))
    tic = time.perf_counter()
    adversarial = attack(images, labels)
    seconds = time.perf_counter() - tic
    with torch.no_grad():
        robust = (model(adversarial).argmax(1) == labels).numpy()
    size = (adversarial - images).abs().flatten(1).max(1).values.max().item()
    assert size <= EPS + 1e-5, f"torchattacks left the ε-ball: {size}"
    return robust, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=os.path.expanduser(
        "~/.cache/sparse_robust/dense-300-100_fashion_mnist_madry_eps0.1.msgpack"))
    parser.add_argument("--train-steps", type=int, default=2500)
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--expensive-images", type=int, default=1000,
                        help="images for APGD-T, FAB-T, Square and AutoAttack")
    parser.add_argument("--only", default="", help="comma-separated attack names (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    dataset = data.load_dataset("fashion_mnist", source="idx", flatten=True)
    model, params = load_or_train(dataset, args.weights, args.train_steps, args.seed)
    model_fn = training.make_model_fn(model)
    images, labels = dataset.test_images[:args.num_images], dataset.test_labels[:args.num_images]
    net = torch_model(params)
    with torch.no_grad():
        theirs = net(torch.from_numpy(images.reshape(-1, 1, 28, 28))).numpy()
    ours = np.asarray(model_fn(params, {}, images, False)[0])
    clean = ours.argmax(1) == labels
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), torchattacks "
          f"{torchattacks.__version__}, jax {jax.__version__} ({jax.default_backend()})")
    print(f"logits agree to {np.abs(ours - theirs).max():.2e}; clean accuracy {clean.mean():.4f} "
          f"(both: {np.mean(theirs.argmax(1) == labels):.4f})\n")

    mine, their = our_attacks(), their_attacks(net)
    if importlib.util.find_spec("autoattack") is not None:
        their["AutoAttack (fra31)"] = Fra31AutoAttack(net, args.seed)
    cheap = {"FGSM", "PGD-40", "APGD-CE", "APGD-DLR"}
    selected = [n for n in their if not args.only or n in args.only.split(",")]
    rows = []
    for name in selected:
        n = args.num_images if name in cheap else min(args.expensive_images, args.num_images)
        x, y = images[:n], labels[:n]
        robust_theirs, seconds_theirs = run_theirs(their[name], net, x, y)
        row = {"attack": name, "images": n, "torch acc": robust_theirs.mean(), "torch s": seconds_theirs}
        if name != "torchattacks.AutoAttack":
            robust_ours, seconds_ours = run_ours(name, mine.get(name), model_fn, params, x, y,
                                                 jax.random.key(args.seed))
            row.update({"ours acc": robust_ours.mean(), "ours s": seconds_ours,
                        "acc diff (pts)": 100 * (robust_ours.mean() - robust_theirs.mean()),
                        "agree": np.mean(robust_ours == robust_theirs),
                        "speedup": seconds_theirs / seconds_ours})
        rows.append(row)
        print_rows([row], ["attack", "images", "torch acc", "ours acc", "acc diff (pts)", "agree",
                           "torch s", "ours s", "speedup"])
    print()
    print_rows(rows, ["attack", "images", "torch acc", "ours acc", "acc diff (pts)", "agree",
                      "torch s", "ours s", "speedup"])


if __name__ == "__main__":
    main()
