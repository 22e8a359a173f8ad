"""Cosentino et al. (2019) on MNIST (tfds: prepare it once with --config.data.download=True)."""

from experiments.configs import base


def get_config():
    config = base.get_config()
    config.data.name = "mnist"
    return config
