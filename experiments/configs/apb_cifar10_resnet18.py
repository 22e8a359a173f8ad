"""apb_cifar10_vgg16's protocol on the benchmark's ResNet-18 (the CIFAR ResNet-18 of
pytorch-cifar: 3x3 stem, no max-pool; our "resnet-18"): CIFAR-10, 90 / 95 / 99 %, L∞ ε = 8/255,
AutoAttack standard on the full test set, the same methods and recipes (documented with their
sources there). ResNet-18 forwards ~1.8x VGG-16's FLOPs per image."""

from experiments.configs import apb_cifar10_vgg16


def get_config():
    config = apb_cifar10_vgg16.get_config()
    config.model.name = "resnet-18"
    return config
