"""Cross-check against torchattacks: the same weights and images, our attacks and theirs side by
side (robust accuracy, per-example agreement, seconds), AutoAttack included.

Needs the optional extra: ``pip install -e '.[crosscheck]'`` (torch, torchattacks; no test
imports this file). Run: ``python -m benchmarks.crosscheck`` (the model is one of
``benchmarks/autoattack.py``'s, --model dense-300-100, ticket-1% or lenet-5, trained and cached on
first use). ``--autoattack-stages`` runs only standard AutoAttack, stage by stage on both sides,
with our cold and warm times per stage. ``--model-passes`` times one forward pass and one
forward-and-input-gradient pass of the network on both sides: the passes every attack is made of,
so their ratio bounds what an attack doing the same passes can gain. On 2 CPU cores the PyTorch side
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
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torchattacks

from benchmarks.autoattack import (EPS, NETWORKS, add_sparse_impl_flag, default_steps, evaluate,
                                   network, our_model_fn)
from benchmarks.common import print_rows, time_fn
from benchmarks.torch_peer import torch_model
from sparse_robust import attacks, evaluation, losses


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


# The reference chain's stages, named as ours (`attacks.autoattack_stages`).
STAGES = {"apgd_ce": "APGD-CE", "apgd_t": "APGD-T", "fab_t": "FAB-T", "square": "Square"}


def autoattack_stages(model_fn, params, net, images, labels, seed: int, runs: int) -> None:
    """Standard AutoAttack stage by stage on both sides, on the same images: ours through the
    evaluator's stage driver (each stage on the points still robust, APGD-T and FAB-T target by
    target on them; `runs` times: cold with compilation, then warm), the reference chain of
    torchattacks pieces, each piece on the points its earlier pieces left robust (as fra31's
    standard version and torchattacks.MultiAttack do). Prints per stage the robust accuracy of
    both, the share of images on which they agree and the seconds and their ratio."""
    stages = attacks.autoattack_stages(EPS, "linf")
    logits_fn = lambda z: model_fn(params, {}, z, False)[0]  # One object: warm runs reuse programs.
    ours, evaluator = [], evaluation.Evaluator(model_fn, batch_size=len(images))
    for _ in range(runs):
        tic = time.perf_counter()
        clean, flags, seconds, _ = evaluate(model_fn, params, images, labels, stages,
                                            jax.random.key(seed), len(images), logits_fn,
                                            evaluator)
        ours.append((flags, seconds, time.perf_counter() - tic))
    pieces = dict(zip(STAGES, their_attacks(net)["AutoAttack"].attacks))
    x = torch.from_numpy(np.asarray(images).reshape(-1, 1, 28, 28))
    y = torch.from_numpy(np.asarray(labels).astype(np.int64))
    tic = time.perf_counter()
    with torch.no_grad():
        robust = (net(x).argmax(1) == y).numpy()
    theirs = {}
    for stage, piece in pieces.items():
        rows = np.flatnonzero(robust)
        start = time.perf_counter()
        if len(rows):
            adversarial = piece(x[rows], y[rows])
            with torch.no_grad():
                robust[rows] = (net(adversarial).argmax(1) == y[rows]).numpy()
        theirs[stage] = (robust.copy(), time.perf_counter() - start)
    their_total = time.perf_counter() - tic
    table = []
    for index, stage in enumerate(STAGES):
        row = {"stage": STAGES[stage], "ours acc": ours[0][0][stage].mean(),
               "torch acc": theirs[stage][0].mean(),
               "agree": np.mean(ours[-1][0][stage] == theirs[stage][0]),
               "torch s": theirs[stage][1], "ours cold s": ours[0][1][index]}
        row["cold ratio"] = row["torch s"] / row["ours cold s"]
        if runs > 1:
            row.update({"ours warm s": ours[-1][1][index]})
            row["warm ratio"] = row["torch s"] / row["ours warm s"]
        table.append(row)
    total = {"stage": "total (with clean pass)", "ours acc": ours[0][0]["square"].mean(),
             "torch acc": theirs["square"][0].mean(),
             "agree": np.mean(ours[-1][0]["square"] == theirs["square"][0]),
             "torch s": their_total, "ours cold s": ours[0][2],
             "cold ratio": their_total / ours[0][2]}
    if runs > 1:
        total.update({"ours warm s": ours[-1][2], "warm ratio": their_total / ours[-1][2]})
    same_runs = all(np.array_equal(ours[0][0][s], run[0][s]) for run in ours for s in STAGES)
    print(f"AutoAttack standard, L∞ ε {EPS}, true labels, {len(images)} images, clean accuracy "
          f"{clean.mean():.4f}; our runs agree with each other per image: {same_runs}")
    print_rows(table + [total], ["stage", "ours acc", "torch acc", "agree", "torch s",
                                 "ours cold s", "cold ratio", "ours warm s", "warm ratio"])


def model_passes(model_fn, params, net, images, labels, rows_list) -> None:
    """Milliseconds of one forward pass (logits) and one forward-and-input-gradient pass (of the
    summed cross-entropy) at each row count, ours (jitted, warm) beside the reference's model,
    both timed alike (`time_fn`: the best of 20 calls after a warm-up)."""
    logits = jax.jit(lambda x: model_fn(params, {}, x, False)[0])
    grad = jax.jit(jax.grad(lambda x, y: jnp.sum(losses.cross_entropy(logits(x), y))))
    table = []
    for rows in rows_list:
        x, y = np.asarray(images[:rows]), np.asarray(labels[:rows]).astype(np.int32)
        tx = torch.from_numpy(x.reshape(-1, 1, 28, 28))
        ty = torch.from_numpy(y.astype(np.int64))

        def their_forward():
            with torch.no_grad():
                net(tx)

        def their_gradient():
            z = tx.clone().requires_grad_()
            torch.autograd.grad(torch.nn.functional.cross_entropy(net(z), ty, reduction="sum"), z)

        row = {"rows": len(x), "ours fwd ms": 1e3 * time_fn(logits, x, repeats=20),
               "torch fwd ms": 1e3 * time_fn(their_forward, repeats=20),
               "ours fwd+grad ms": 1e3 * time_fn(grad, x, y, repeats=20),
               "torch fwd+grad ms": 1e3 * time_fn(their_gradient, repeats=20)}
        row["fwd ratio"] = row["torch fwd ms"] / row["ours fwd ms"]
        row["fwd+grad ratio"] = row["torch fwd+grad ms"] / row["ours fwd+grad ms"]
        table.append(row)
    print("one pass of the network, warm, best of repeats")
    print_rows(table, ["rows", "torch fwd ms", "ours fwd ms", "fwd ratio", "torch fwd+grad ms",
                       "ours fwd+grad ms", "fwd+grad ratio"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dense-300-100", choices=NETWORKS,
                        help="the network of benchmarks/autoattack.py (trained and cached there)")
    parser.add_argument("--train-steps", type=int, default=None)
    parser.add_argument("--autoattack-stages", action="store_true",
                        help="only standard AutoAttack, stage by stage, on --expensive-images "
                        "images: ours (cold, then warm) beside the torchattacks chain")
    parser.add_argument("--model-passes", default="",
                        help="only time one forward and one forward+input-gradient pass on both "
                        "sides, at these comma-separated row counts (e.g. 128,1000)")
    parser.add_argument("--runs", type=int, default=2, help="our runs with --autoattack-stages "
                        "(1: cold only; 2: cold and warm)")
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--expensive-images", type=int, default=1000,
                        help="images for APGD-T, FAB-T, Square and AutoAttack")
    parser.add_argument("--only", default="", help="comma-separated attack names (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    add_sparse_impl_flag(parser)
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="PyTorch's intra-op threads (default: its own, one per core); on a "
                        "machine loaded by other processes 1 thread can be faster")
    args = parser.parse_args()

    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    torch.manual_seed(args.seed)
    model, params, dataset = network(args.model, default_steps(args.model, args.train_steps),
                                     args.seed)
    model_fn = our_model_fn(args.model, model, params, args.sparse_impl)
    images, labels = dataset.test_images[:args.num_images], dataset.test_labels[:args.num_images]
    net = torch_model(args.model.replace("ticket-1%", "dense-300-100"), params).eval()
    with torch.no_grad():
        theirs = net(torch.from_numpy(images.reshape(-1, 1, 28, 28))).numpy()
    ours = np.asarray(model_fn(params, {}, images, False)[0])
    clean = ours.argmax(1) == labels
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), torchattacks "
          f"{torchattacks.__version__}, jax {jax.__version__} ({jax.default_backend()})")
    print(f"logits agree to {np.abs(ours - theirs).max():.2e}; clean accuracy {clean.mean():.4f} "
          f"(both: {np.mean(theirs.argmax(1) == labels):.4f})\n")

    if args.model_passes:
        model_passes(model_fn, params, net, images, labels,
                     [int(rows) for rows in args.model_passes.split(",")])
        return
    if args.autoattack_stages:
        n = min(args.expensive_images, args.num_images)
        autoattack_stages(model_fn, params, net, images[:n], labels[:n], args.seed, args.runs)
        return
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
