"""The adversarial-pruning comparison at full scale: CIFAR-10, VGG-16 (batch norm), 90/95/99%.

Training: PGD adversarial training (Madry) with L∞ ε = 8/255, 10 steps of 2/255 from a random
start, in every phase; SGD (momentum 0.9, weight decay 5e-4, batch 128), random crop + flip.
Evaluation on the whole test set: PGD-20 and AutoAttack (the standard version, true labels);
robust accuracy = worst case over the two.

Schedules (constant learning rates: config.train.optimizer has no decay schedule yet):
  dense network, lottery rounds, inverse inheritance, large from scratch: 100 epochs at 0.05;
  fine-tuning (inherit, reinit, random, HYDRA's weights): 50 epochs at 0.01;
  HYDRA's scores: 20 epochs at 0.1 (Sehwag et al.).
Per trial that is 1 + 3x3 + 3 + 1 = 14 runs of 100 epochs, 12 of 50 and 3 of 20: ~2,060 epochs.

Expected cost (an estimate from FLOPs, not a measurement: this was written without a GPU): a
PGD-10 training step costs ~23 forward passes (10 attack steps of forward + input gradient, then
forward + backward); VGG-16 forwards ~0.63 GFLOP per 32x32 image, so an epoch is ~0.65 PFLOP,
~10-20 s on one H100 in float32/TF32 at 35-70 TFLOP/s effective: ~5-11 GPU-hours per trial,
plus ~1-2 minutes of PGD-20/AutoAttack evaluation per trained network. ResNet-18
(wang_cifar10_resnet18) costs about twice as much. Check the real steps/s in each result.json ("steps_per_second") after the
first level and scale. Smaller smoke test: --config.train.num_steps=200 --config.retrain.num_steps=100
--config.branches.hydra.num_steps=100 --config.eval.every=100.

CIFAR-10 comes through tfds: prepare it once with --config.data.download=True (needs the network
and `pip install sparse_robust[tf]`).
"""

from experiments.configs import wang_base

EPS = 8 / 255
STEPS_PER_EPOCH = 45_000 // 128  # 50,000 training images minus 5,000 for validation


def get_config():
    config = wang_base.get_config()
    config.num_trials = 1
    config.prune.targets = "0.9,0.95,0.99"
    config.data.update(name="cifar10", source="tfds", validation_size=5_000, flatten=False)
    config.model.name = "vgg-16"

    pgd = {"name": "pgd", "norm": "linf", "eps": EPS, "random_start": True, "restarts": 1,
           "loss": "ce", "label_source": "true"}
    config.attacks.fgsm.update(eps=EPS, label_source="true")
    config.attacks.pgd.update(eps=EPS, step_size=2 / 255, num_steps=10, label_source="true")
    config.attacks.pgd20 = dict(pgd, step_size=2 / 255, num_steps=20)
    config.attacks.apgd_ce.eps = EPS
    config.attacks.apgd_dlr.eps = EPS
    config.attacks.autoattack.eps = EPS

    config.train.update(optimizer="sgd", learning_rate=0.05, momentum=0.9, weight_decay=5e-4,
                        batch_size=128, num_steps=100 * STEPS_PER_EPOCH, augment=True)
    config.retrain.update(num_steps=50 * STEPS_PER_EPOCH, learning_rate=0.01)
    config.branches.hydra.update(num_steps=20 * STEPS_PER_EPOCH, learning_rate=0.1)
    config.eval.update(every=5 * STEPS_PER_EPOCH, num_examples=1_000, batch_size=500,
                       attacks="pgd20,autoattack")
    config.checkpoint_every = 5 * STEPS_PER_EPOCH
    config.prune.rounds_per_target = 3
    config.diagnostics.update(num_examples=500, num_iters=30)
    return config
