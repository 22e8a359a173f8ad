"""shootout_fashion_mnist on a convolutional network: LeNet-5 on the unflattened 28x28 images,
the same methods, sparsities, trials, schedules and evaluation. LeNet-5 trains ~10x slower than
dense-300-100 on CPU (wang_fashion_mnist measured 12 vs 1 PGD-5 steps/s at batch 100 there), so
this one is for a machine with more cores or an accelerator."""

from experiments.configs import shootout_fashion_mnist


def get_config():
    config = shootout_fashion_mnist.get_config()
    config.model.name = "lenet-5"
    config.data.flatten = False
    return config
