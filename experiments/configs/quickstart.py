"""The README's main job: find a sparse, robust lottery ticket on the real Fashion-MNIST and prove
it against controls, in a few minutes on 2 CPU cores.

dense-300-100, PGD adversarial training (Madry: the loss on PGD-5 examples, L∞ ε = 0.1, true
labels), 1,500 steps of batch 128 per level. Iterative global magnitude pruning removes 68 % of
the remaining weights per level and rewinds the survivors to θ0: 100 → 32 → 10 → 3.3 → 1.0 % of
the weights. At the sparsest level two controls train the same schedule: the same mask with a
fresh random init (``reinit``) and a random mask of the same per-layer sizes (``random``).

Robust accuracy is the per-image worst case over PGD-20 and AutoAttack (the standard version:
APGD-CE, APGD-T, FAB-T, Square; true labels) on the first 500 test images; the paper's protocol
(ε = 0.3, FGSM/PGD on predicted labels) is experiments/configs/cosentino_fashion_mnist.py.
"""

from experiments.configs import base

EPS = 0.1


def get_config():
    config = base.get_config()
    config.num_trials = 1
    config.data.validation_size = 5_000
    pgd = {"name": "pgd", "eps": EPS, "norm": "linf", "random_start": True, "restarts": 1,
           "loss": "ce", "label_source": "true"}
    apgd = {"name": "apgd", "eps": EPS, "num_steps": 50, "norm": "linf", "label_source": "true"}
    config.attacks = {
        "pgd": dict(pgd, step_size=EPS / 4, num_steps=5),     # training and periodic measurements
        "pgd20": dict(pgd, step_size=EPS / 8, num_steps=20),
        "apgd_ce": dict(apgd, loss="ce"),
        "apgd_dlr": dict(apgd, loss="dlr"),
        "autoattack": {"name": "autoattack", "eps": EPS, "norm": "linf", "label_source": "true"},
    }
    config.train.update(objective="madry", attack="pgd", label_smoothing=0.0, batch_size=128,
                        num_steps=1_500, learning_rate=1e-3)
    config.eval.update(every=250, num_examples=1_000, attack="pgd",
                       attacks="pgd20,autoattack", final_examples=500,
                       early_stop_metric="adv_loss", sanity_examples=0)
    config.prune.update(levels=4, scope="global", global_rate=0.68)
    config.branches.update(names="reinit,random", levels="4")
    config.checkpoint_every = 500
    return config
