"""The README's main job: a small adversarial lottery-ticket run on the real Fashion-MNIST.

PGD adversarial training (the Cosentino 50/50 mix), rewinding to θ0, 4 levels after the dense one,
one trial, a few thousand steps per level: minutes on 2 CPU cores.

The final evaluation adds APGD-DLR (100 steps, true labels) to the paper's FGSM and PGD: at
ε = 0.3 this short training leaves the cross-entropy attacks overestimating robustness (the
`ce_and_dlr_agree` sanity check says so), and the worst-case column is the number to trust.
"""

from experiments.configs import base


def get_config():
    config = base.get_config()
    config.num_trials = 1
    config.train.num_steps = 1_500
    config.train.attack = "pgd"
    config.attacks.pgd.num_steps = 5
    config.attacks.pgd.step_size = 0.1
    config.eval.every = 500
    config.eval.num_examples = 1_000
    config.eval.attack = "pgd"
    config.eval.attacks = "fgsm,pgd,apgd_dlr"
    config.prune.levels = 4
    config.checkpoint_every = 500
    return config
