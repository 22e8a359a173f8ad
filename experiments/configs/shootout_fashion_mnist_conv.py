"""shootout_fashion_mnist on a convolutional network: LeNet-5 on the unflattened 28x28 images,
the same methods, sparsities, trials, objective, attacks and evaluation, on a quarter of the
MLP's schedules.

A PGD-5 training step of LeNet-5 costs 15-20x one of dense-300-100 on 2 CPU cores (measured ~4
against 50-80 steps/s, batch 128, on a shared machine; its convolutions have 1 and 6 input
channels, so patch extraction and its transpose dominate, not the multiply-adds): the MLP's
schedules would take ~3 hours there. Here every phase has a quarter of them: the dense network
and each lottery level train 250 steps, every one-shot method is fine-tuned 125 steps (the same
budget for all), HYDRA's and HARP's score phases take 75 steps, RADMM's ADMM phase 125 (5
rounds). Periodic measurements every 125 steps; AutoAttack and PGD-20 on the first 200 test
images. Short schedules favour methods that keep the trained weights (random, HYDRA, HARP,
RADMM) over the lottery ticket, which retrains from θ0 in 250 steps: read the lottery's column
with that in mind. `shootout_fashion_mnist` with `--config.model.name=lenet-5
--config.data.flatten=False` is the full-budget run, for a machine with more cores or an
accelerator.

Cost, measured end to end (main at 5d6c96f): 73 min on 2 otherwise idle CPU cores, killed once
and resumed (27 + 46 min), 1,202 s of it training; the table and conclusion are in README.

Run: python -m experiments.main --config=experiments/configs/shootout_fashion_mnist_conv.py
--workdir=/tmp/shootout_conv, then python -m experiments.report /tmp/shootout_conv.
"""

from experiments.configs import shootout_fashion_mnist


def get_config():
    config = shootout_fashion_mnist.get_config()
    config.model.name = "lenet-5"
    config.data.flatten = False
    config.train.num_steps = 250
    config.retrain.num_steps = 125
    config.branches.hydra.num_steps = 75
    config.branches.harp.num_steps = 75
    config.branches.radmm.num_steps = 125
    config.eval.update(every=125, num_examples=500, final_examples=200)
    config.checkpoint_every = 125
    return config
