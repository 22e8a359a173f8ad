"""The whole adversarial-pruning comparison, small: Fashion-MNIST, dense-300-100, 2 trials.

PGD adversarial training (Madry, L∞ ε = 0.1, 5 steps of 0.025) in every phase; targets of 80, 95
and 99% sparsity; the chain reaches each target in 2 rounds of global magnitude pruning with
rewinding to θ0 (levels 2, 4 and 6 are the targets, where the branches start); inverse
inheritance: the dense network of the same architecture inheriting each ticket (zeros elsewhere,
all weights trainable) vs the same network trained from scratch.
Evaluation: FGSM, PGD-10 and AutoAttack (the standard version) on the first 1,000 test images
(robust = worst case). dense-300-100 because
lenet-5 trains ~10x slower on CPU (measured: 12 vs 1 PGD-5 steps/s at batch 100).

Schedules are tiny (400 steps of batch 100 for the dense network, tickets and large networks;
200 for fine-tuning and for HYDRA's scores): enough to order the methods, not to converge.
"""

from experiments.configs import wang_base

EPS = 0.1


def get_config():
    config = wang_base.get_config()
    config.num_trials = 2
    config.prune.update(targets="0.8,0.95,0.99", rounds_per_target=2)
    config.data.validation_size = 5_000
    config.attacks.fgsm.eps = EPS
    config.attacks.fgsm.label_source = "true"
    config.attacks.pgd.update(eps=EPS, step_size=EPS / 4, num_steps=5, label_source="true")
    config.attacks.pgd10 = {"name": "pgd", "eps": EPS, "step_size": EPS / 4, "num_steps": 10,
                            "norm": "linf", "random_start": True, "restarts": 1, "loss": "ce",
                            "label_source": "true"}
    config.train.batch_size = 100
    config.train.num_steps = 400
    config.eval.every = 200
    config.eval.num_examples = 1_000
    config.eval.update(attacks="fgsm,pgd10,autoattack", final_examples=1_000)
    config.attacks.autoattack.eps = EPS
    config.checkpoint_every = 200
    config.retrain.num_steps = 200
    config.branches.hydra.num_steps = 200
    config.branches.hydra.learning_rate = 2e-4  # Adam moves every score by ~lr per step: gently
    config.diagnostics.num_examples = 500
    config.diagnostics.num_iters = 30
    return config
