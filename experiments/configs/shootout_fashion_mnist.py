"""The shoot-out: which pruning method gives the most robust sparse network? Real Fashion-MNIST,
dense-300-100, 90 / 95 / 99 % sparsity, 3 trials; shootout_fashion_mnist_conv is the same on
LeNet-5.

Every phase is PGD adversarial training (Madry: the loss on PGD-5 examples, L∞ ε = 0.1, step
0.025, random start, true labels), Adam at 1e-3, batch 128. The dense network trains 1,000
steps; the methods start from it at each target:

- lottery: the chain, one round of global magnitude pruning per target with rewinding to θ0,
  1,000 steps per level (the lottery ticket, LTH with rewinding);
- random: a random mask with the one-shot magnitude mask's per-layer sizes, on the dense weights;
- hydra: 300 steps of score training (allocation "level": the same per-layer sizes);
- harp: 300 steps of scores and per-layer rates (α = 0.1, γ rising to 10, rate logits at Adam
  0.02: with the scores' 1e-3 they stay at the target and HARP collapses as uniform HYDRA did);
- radmm: 500 steps of ADMM adversarial training (5 rounds, ρ = 0.01 growing 1.3x, global);
- inverse_inheritance: the dense network inheriting the ticket (dense, for reference), and
  scratch_large: the same network from scratch.

Fine-tuning: 500 steps at 1e-3 for every one-shot method (the same budget for all; the chain's
levels train 1,000 steps from θ0, as the lottery ticket does).

Evaluation: AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square; true labels) and PGD-20 on the
first 500 test images; robust = the per-image worst case. Periodic measurements (early stopping on
the validation adversarial loss) every 250 steps on 1,000 images.

Run: python -m experiments.main --config=experiments/configs/shootout_fashion_mnist.py
--workdir=/tmp/shootout_mlp, then python -m experiments.report /tmp/shootout_mlp.
Cost, measured: 84 min 33 s on 2 CPU cores shared with other jobs (README has the table); 584 s
of it training (42,000 steps), the rest evaluation (AutoAttack and PGD-20 on 500 images for each
of the 60 units, and the periodic measurements).
"""

from experiments.configs import wang_base

EPS = 0.1


def get_config():
    config = wang_base.get_config()
    config.num_trials = 3
    config.data.validation_size = 5_000
    config.model.name = "dense-300-100"
    pgd = {"name": "pgd", "eps": EPS, "norm": "linf", "random_start": True, "restarts": 1,
           "loss": "ce", "label_source": "true"}
    config.attacks.pgd.update(eps=EPS, step_size=EPS / 4, num_steps=5, label_source="true")
    config.attacks.pgd20 = dict(pgd, step_size=EPS / 8, num_steps=20)
    config.attacks.fgsm.update(eps=EPS, label_source="true")
    config.attacks.apgd_ce.eps = EPS
    config.attacks.apgd_dlr.eps = EPS
    config.attacks.autoattack.eps = EPS

    config.train.update(optimizer="adam", learning_rate=1e-3, batch_size=128, num_steps=1_000,
                        objective="madry", attack="pgd")
    config.prune.update(levels=0, targets="0.9,0.95,0.99", rounds_per_target=1, scope="global",
                        strategy="rewind_init")
    config.branches.names = "random,hydra,harp,radmm,inverse_inheritance,scratch_large"
    config.retrain.update(num_steps=500, learning_rate=1e-3)
    config.branches.random.start = "dense_trained"
    config.branches.hydra.update(num_steps=300, learning_rate=1e-3, allocation="level")
    config.branches.harp.update(num_steps=300, learning_rate=1e-3, rate_learning_rate=0.02,
                                alpha=0.1, gamma=10.0)
    config.branches.radmm.update(num_steps=500, learning_rate=1e-3, rounds=5, rho=0.01,
                                 rho_growth=1.3, scope="global")
    config.eval.update(every=250, num_examples=1_000, attack="pgd", attacks="pgd20,autoattack",
                       final_examples=500, early_stop_metric="adv_loss", sanity_examples=0)
    config.checkpoint_every = 250
    config.diagnostics.num_examples = 0
    return config
