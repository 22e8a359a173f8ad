"""wang_cifar10_vgg16 with ResNet-18 (CIFAR variant, batch norm): same attacks and schedules.

Expected cost (an estimate from FLOPs, not a measurement): ResNet-18 forwards ~1.1 GFLOP per
32x32 image, so a PGD-10 epoch (~23 forward-equivalents per image) is ~1.1 PFLOP, ~16-33 s on
one H100: ~9-19 GPU-hours per trial for the ~2,060 epochs of the whole comparison. See
wang_cifar10_vgg16 for the schedule and a smoke-test override.
"""

from experiments.configs import wang_cifar10_vgg16


def get_config():
    config = wang_cifar10_vgg16.get_config()
    config.model.name = "resnet-18"
    return config
