"""sparse_robust next to PyTorch on the same machine: PGD-40 evaluation and PGD-10 mixed training.

  pip install -e '.[crosscheck]'          # torch and torchattacks (never needed by the tests)
  python -m benchmarks.torch_peer         # ~10 minutes on 2 CPU cores
  python -m benchmarks.torch_peer --quick --rows lenet-5

Both columns are measured in this run, in this process, on the same random images and the same
weights (the PyTorch model is loaded from the JAX parameters; the printed logit difference checks
it), so the ratio is always measured, never remembered. Each row alternates the two sides for
`--rounds` rounds and keeps the best time of each (the least disturbed by other processes); compile
and warm-up are excluded. PyTorch runs with `torch.set_num_threads(os.cpu_count())`. The
"/ matmul" columns divide each side's FLOP/s (the convolutions' and matmuls' own FLOPs, counted on
the jaxpr of the XLA-convolution twin) by the FLOP/s of a 2048² float32 matmul measured at the
start: how close each side runs to this machine's matmul speed.

Rows (the shapes of issue 13):
  * PGD-40 evaluation, images·steps/s: L∞ PGD (ε 0.3, step 0.01, 40 steps, random start) on the
    true labels, then the adversarial logits. JAX: `evaluation.Evaluator(...).program` with
    `attacks.make_attack("pgd", ...)`; PyTorch: `torchattacks.PGD` and a forward pass.
  * PGD-10 mixed adversarial training, steps/s: the Cosentino objective (PGD-10, ε 0.3, step 0.05,
    random start, on the predicted labels; 0.5·CE(clean) + 0.5·CE(adv) with label smoothing 0.1),
    Adam 1.2e-3, pruning mask applied. JAX: `training.make_train_loop` with
    `pruning.keep_pruned_at_zero` (the loop `config.train.loop = "auto"` picks); PyTorch: model
    in eval mode for `torchattacks.PGD` on `argmax` labels, one train-mode pass over the clean and
    adversarial halves, `Adam.step()`, then the mask multiplies the gradients (before the step) and
    the weights (after it).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np
import torch
import torch.nn.functional as F
import torchattacks
from torch import nn

from benchmarks import common
from benchmarks.flops import matmul_flops
from benchmarks.run import setup
from sparse_robust import attacks, evaluation, models, training
from sparse_robust.runs import context

EPS, EVAL_STEP, EVAL_STEPS = 0.3, 0.01, 40
TRAIN_STEP, TRAIN_STEPS, LABEL_SMOOTHING, LR = 0.05, 10, 0.1, 1.2e-3

# (model, "eval" or "train", batch, steps or PGD calls timed per round).
ROWS = {
    "dense-300-100": [("eval", 1000, 1), ("train", 60, 50), ("train", 512, 10)],
    "lenet-5": [("eval", 250, 1), ("train", 60, 20)],
    "conv-4": [("eval", 50, 1), ("train", 60, 2)],
}


# ------------------------------------------------------------------------------------------
# The PyTorch models, built from the JAX parameters (so both sides compute the same function)


def _linear(kernel, bias) -> nn.Linear:
    layer = nn.Linear(*kernel.shape, bias=bias is not None)
    layer.weight.data = torch.tensor(np.asarray(kernel).T.copy())
    if bias is not None:
        layer.bias.data = torch.tensor(np.asarray(bias))
    return layer


def _conv(kernel, bias, padding) -> nn.Conv2d:
    kh, kw, cin, cout = kernel.shape
    layer = nn.Conv2d(cin, cout, (kh, kw), padding=padding, bias=bias is not None)
    layer.weight.data = torch.tensor(np.transpose(np.asarray(kernel), (3, 2, 0, 1)).copy())
    if bias is not None:
        layer.bias.data = torch.tensor(np.asarray(bias))
    return layer


def _nhwc_rows(kernel, feature_shape):
    """A dense kernel fed by a flattened NHWC map, reordered for PyTorch's NCHW flattening."""
    h, w, c = feature_shape
    kernel = np.asarray(kernel)
    return kernel.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1)


def torch_model(name: str, params) -> nn.Module:
    """The PyTorch twin of `models.get_model(name)` with the weights `params` (NCHW inputs)."""
    p = {layer: (np.asarray(v["kernel"]), v.get("bias")) for layer, v in params.items()}
    if name == "dense-300-100":
        return nn.Sequential(nn.Flatten(), _linear(*p["dense_0"]), nn.ReLU(),
                             _linear(*p["dense_1"]), nn.ReLU(), _linear(*p["output"]))
    if name == "lenet-5":
        conv_1 = p["dense_0"][0].shape[0] // 25
        return nn.Sequential(
            _conv(*p["conv_0"], padding=2), nn.ReLU(), nn.MaxPool2d(2),
            _conv(*p["conv_1"], padding=0), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            _linear(_nhwc_rows(p["dense_0"][0], (5, 5, conv_1)), p["dense_0"][1]), nn.ReLU(),
            _linear(*p["dense_1"]), nn.ReLU(), _linear(*p["output"]))
    if name == "conv-4":
        channels = p["conv_3"][0].shape[-1]
        return nn.Sequential(
            _conv(*p["conv_0"], padding=1), nn.ReLU(), _conv(*p["conv_1"], padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            _conv(*p["conv_2"], padding=1), nn.ReLU(), _conv(*p["conv_3"], padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
            _linear(_nhwc_rows(p["dense_0"][0], (7, 7, channels)), p["dense_0"][1]), nn.ReLU(),
            _linear(*p["dense_1"]), nn.ReLU(), _linear(*p["output"]))
    raise ValueError(f"No PyTorch twin for model {name!r}; allowed: {sorted(ROWS)}.")


def _nchw(images) -> torch.Tensor:
    return torch.tensor(np.transpose(np.asarray(images), (0, 3, 1, 2)).copy())


# ------------------------------------------------------------------------------------------
# The two sides of each row


def _best_of_alternating(jax_fn, torch_fn, rounds: int) -> tuple[float, float]:
    """Best seconds of each side, alternating them `rounds` times after one warm-up call each."""
    jax_fn(), torch_fn()
    jax_best = torch_best = float("inf")
    for _ in range(rounds):
        tic = time.perf_counter()
        jax_fn()
        jax_best = min(jax_best, time.perf_counter() - tic)
        tic = time.perf_counter()
        torch_fn()
        torch_best = min(torch_best, time.perf_counter() - tic)
    return jax_best, torch_best


def _flop_ratios(flops: float, jax_s: float, torch_s: float, matmul: float) -> dict:
    """Each side's convolution and matmul FLOP/s over the machine's matmul FLOP/s."""
    return {"JAX / matmul": flops / jax_s / matmul, "PyTorch / matmul": flops / torch_s / matmul}


def _xla_twin(name: str, batch: int, steps: int):
    """The row's setup with XLA's convolutions: its jaxpr counts a convolution's own FLOPs (the
    patches path multiplies zeros too, which is not work)."""
    return setup(name, batch, steps, model_kwargs={"conv_impl": "xla"})


def eval_row(name: str, batch: int, calls: int, rounds: int, model_kwargs, matmul) -> dict:
    s = setup(name, batch, 1, model_kwargs=model_kwargs)
    x, y = s["images"][:batch], s["labels"][:batch]
    attack = attacks.make_attack("pgd", eps=EPS, step_size=EVAL_STEP, num_steps=EVAL_STEPS)
    program = lambda model_fn: evaluation.Evaluator(model_fn, batch_size=batch).program(attack)
    eval_batch, key = program(s["model_fn"]), jax.random.PRNGKey(3)
    flops = calls * matmul_flops(program(_xla_twin(name, batch, 1)["model_fn"]),
                                 s["params"], s["model_state"], x, y, key)

    def jax_fn():
        for _ in range(calls):
            jax.block_until_ready(eval_batch(s["params"], s["model_state"], x, y, key))

    model = torch_model(name, s["params"]).eval()
    tx, ty = _nchw(x), torch.tensor(np.asarray(y), dtype=torch.long)
    pgd = torchattacks.PGD(model, eps=EPS, alpha=EVAL_STEP, steps=EVAL_STEPS, random_start=True)

    def torch_fn():
        for _ in range(calls):
            adv = pgd(tx, ty)
            with torch.no_grad():
                model(adv)

    with torch.no_grad():
        logit_gap = float(np.max(np.abs(model(tx).numpy() - np.asarray(
            s["model"].apply({"params": s["params"]}, x)))))
    jax_s, torch_s = _best_of_alternating(jax_fn, torch_fn, rounds)
    work = calls * batch * EVAL_STEPS
    return {"what": f"{name}, PGD-40 evaluation, batch {batch} (images·steps/s)",
            "sparse_robust": work / jax_s, "PyTorch": work / torch_s, "ratio": torch_s / jax_s,
            **_flop_ratios(flops, jax_s, torch_s, matmul), "logits |Δ|": logit_gap}


def _torch_train_step(model, optimizer, masks, x, y):
    model.eval()
    with torch.no_grad():
        predicted = model(x).argmax(1)
    pgd = torchattacks.PGD(model, eps=EPS, alpha=TRAIN_STEP, steps=TRAIN_STEPS, random_start=True)
    adv = pgd(x, predicted)
    model.train()
    logits = model(torch.cat([x, adv]))
    clean, adversarial = logits.chunk(2)
    loss = 0.5 * F.cross_entropy(clean, y, label_smoothing=LABEL_SMOOTHING) + \
        0.5 * F.cross_entropy(adversarial, y, label_smoothing=LABEL_SMOOTHING)
    optimizer.zero_grad()
    loss.backward()
    with torch.no_grad():
        for weight, mask in masks:
            weight.grad.mul_(mask)
        optimizer.step()
        for weight, mask in masks:
            weight.mul_(mask)


def train_row(name: str, batch: int, steps: int, rounds: int, model_kwargs, matmul) -> dict:
    s = setup(name, batch, steps, objective="PGD-10 mixed", model_kwargs=model_kwargs)
    scan = context.uses_scan("auto", models.conv_impls(s["model"], s["images"][:1]))
    loop = training.make_train_loop(s["model_fn"], s["tx"], s["objective"], scan=scan)
    twin = _xla_twin(name, batch, steps)
    flops = matmul_flops(training.make_train_loop(twin["model_fn"], twin["tx"], twin["objective"]),
                         twin["state"], twin["images"], twin["labels"], twin["indices"])
    state = [s["state"]]

    def jax_fn():
        state[0], metrics = loop(state[0], s["images"], s["labels"], s["indices"])
        jax.block_until_ready(metrics)

    model = torch_model(name, s["params"])
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    masks = [(m.weight, torch.ones_like(m.weight)) for m in model.modules()
             if isinstance(m, (nn.Linear, nn.Conv2d))]
    images = _nchw(s["images"])
    labels = torch.tensor(np.asarray(s["labels"]), dtype=torch.long)
    indices = [torch.tensor(np.asarray(i), dtype=torch.long) for i in s["indices"]]

    def torch_fn():
        for idx in indices:
            _torch_train_step(model, optimizer, masks, images[idx], labels[idx])

    jax_s, torch_s = _best_of_alternating(jax_fn, torch_fn, rounds)
    return {"what": f"{name}, PGD-10 mixed training step, batch {batch} ({'scan' if scan else 'per step'}, steps/s)",
            "sparse_robust": steps / jax_s, "PyTorch": steps / torch_s, "ratio": torch_s / jax_s,
            **_flop_ratios(flops, jax_s, torch_s, matmul)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=list(ROWS))
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per side (best kept)")
    parser.add_argument("--quick", action="store_true", help="one round (smoke check)")
    parser.add_argument("--conv-impl", default=None,
                        help="conv_impl of the JAX conv models (default: the model's default)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    rounds = 1 if args.quick else args.rounds

    matmul = common.matmul_flops_per_second()
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads, torchattacks {torchattacks.__version__}; "
          f"matmul reference {matmul / 1e9:.1f} GFLOP/s")
    rows = []
    for name in args.rows:
        kwargs = {} if args.conv_impl is None else {"conv_impl": args.conv_impl}
        impls = models.conv_impls(models.get_model(name, **kwargs), np.zeros((1, 28, 28, 1)))
        if impls:
            print(f"{name}: convolutions run as {impls}")
        for kind, batch, n in ROWS[name]:
            row_fn = eval_row if kind == "eval" else train_row
            rows.append(row_fn(name, batch, n, rounds, kwargs, matmul))
            print(f"  {rows[-1]['what']}: {rows[-1]['ratio']:.2f}x", flush=True)
    print()
    common.print_rows(rows, ["what", "sparse_robust", "PyTorch", "ratio", "JAX / matmul",
                             "PyTorch / matmul", "logits |Δ|"])
    print(f"\nmatmul reference at the end: {common.matmul_flops_per_second() / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
