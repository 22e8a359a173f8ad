"""The Adversarial Pruning Benchmark's protocol (Piras et al. 2024, "Adversarial Pruning: A Survey
and Benchmark of Pruning Methods for Adversarial Robustness", github.com/pralab/
AdversarialPruningBenchmark) on its VGG-16: CIFAR-10, 90 / 95 / 99 % sparsity (weights),
L∞ ε = 8/255, AutoAttack (standard version: APGD-CE, APGD-T, FAB-T, Square; true labels) on the
full test set. Model "vgg-16-hydra" is the benchmark's VGG-16 (HYDRA's vgg16_bn: four max-pools,
2x2 adaptive average pool, classifier 2048 → 256 → 256 → 10); apb_cifar10_resnet18 is the same
protocol on the CIFAR ResNet-18.

Recipes (epochs of 45,000 training images, batch 128; every phase PGD-10 adversarial training,
ε = 8/255, step 2/255, random start; SGD momentum 0.9, weight decay 5e-4, random crop + flip):

- Dense network: 100 epochs of PGD-AT, as HARP's and HYDRA's pre-training (HARP README: "100
  epochs in adversarial pre-training for small-scale datasets"; Sehwag et al. 2020, §4).
  Deviation: a constant learning rate of 0.05 (the engine has no decay schedule yet; HYDRA uses
  0.1 with cosine decay).
- HYDRA (Sehwag et al. 2020): scores 20 epochs at 0.1 from the scaled initialisation, then 100
  epochs of fine-tuning at 0.01 (the paper's prune / fine-tune phases); allocation "uniform",
  the paper's layer-wise k, as the benchmark ran it (our default "level" keeps the one-shot
  magnitude mask's per-layer sizes instead; see sparse_robust/runs/branches/hydra.py).
- HARP (Zhao & Wressnegger 2023): scores and per-layer rates 20 epochs (HARP README: "20 epochs
  in the pruning stage"), then 100 epochs of fine-tuning (README: harp_finetune --epochs 100).
  Deviation: γ rises linearly from 0 to 10 over the score phase (the authors' code raises it
  step-wise with factor 0.01), α = 0.1; the learning rate of the score phase is HYDRA's 0.1,
  the rate logits' 0.02 (our default, chosen with Adam on Fashion-MNIST; not tuned for SGD).
- RADMM (Ye et al. 2019): 50 epochs of ADMM adversarial training in 10 rounds, ρ = 0.01 growing
  1.3x per round, global sparsity constraint, then hard pruning and 100 epochs of fine-tuning.
  These are our settings, not checked against the authors' code.
- Lottery ticket (the chain, the engine's own baseline): one round of global magnitude pruning
  per target with rewinding to θ0, 100 epochs per level; random: a random mask of the one-shot
  mask's per-layer sizes, fine-tuned like the others.

Fine-tuning of every one-shot method: 100 epochs at 0.01 (config.retrain), the same budget for
all. Cost: ~8 runs of 100 epochs per target and trial (see wang_cifar10_vgg16 for a FLOP-based
estimate per epoch); it needs CIFAR-10 through tfds (--config.data.download=True once) and an
accelerator. Smoke test: --config.train.num_steps=200 --config.retrain.num_steps=100
--config.branches.hydra.num_steps=100 --config.branches.harp.num_steps=100
--config.branches.radmm.num_steps=100 --config.eval.every=100 --config.checkpoint_every=100.
"""

from experiments.configs import wang_base

EPS = 8 / 255
STEPS_PER_EPOCH = 45_000 // 128  # 50,000 training images minus 5,000 for validation


def get_config():
    config = wang_base.get_config()
    config.num_trials = 1
    config.data.update(name="cifar10", source="tfds", validation_size=5_000, flatten=False)
    config.model.name = "vgg-16-hydra"

    config.attacks.fgsm.update(eps=EPS, label_source="true")
    config.attacks.pgd.update(eps=EPS, step_size=2 / 255, num_steps=10, random_start=True,
                              label_source="true")
    config.attacks.apgd_ce.eps = EPS
    config.attacks.apgd_dlr.eps = EPS
    config.attacks.autoattack.eps = EPS

    config.train.update(optimizer="sgd", learning_rate=0.05, momentum=0.9, weight_decay=5e-4,
                        batch_size=128, num_steps=100 * STEPS_PER_EPOCH, augment=True)
    config.prune.update(levels=0, targets="0.9,0.95,0.99", rounds_per_target=1, scope="global",
                        strategy="rewind_init")
    config.branches.names = "random,hydra,harp,radmm"
    config.retrain.update(num_steps=100 * STEPS_PER_EPOCH, learning_rate=0.01)
    config.branches.hydra.update(num_steps=20 * STEPS_PER_EPOCH, learning_rate=0.1,
                                 allocation="uniform")
    config.branches.harp.update(num_steps=20 * STEPS_PER_EPOCH, learning_rate=0.1,
                                rate_learning_rate=0.02, alpha=0.1, gamma=10.0)
    config.branches.radmm.update(num_steps=50 * STEPS_PER_EPOCH, learning_rate=0.01, rounds=10,
                                 rho=0.01, rho_growth=1.3, scope="global")
    config.branches.random.start = "dense_trained"
    config.eval.update(attack="pgd", attacks="autoattack", every=5 * STEPS_PER_EPOCH,
                       num_examples=1_000, batch_size=500, final_examples=0, sanity_examples=0)
    config.checkpoint_every = 5 * STEPS_PER_EPOCH
    config.diagnostics.num_examples = 0
    return config
