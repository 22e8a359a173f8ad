"""Cosentino et al. (2019) on Fashion-MNIST: dense-300-100, 50,000 steps x 21 levels, 5 trials.

Variants are overrides, e.g.
  --config.train.attack=pgd --config.eval.attack=pgd      (PGD instead of FGSM)
  --config.train.objective=natural                         (natural training)
  --config.prune.strategy=random_reinit | continue | dense_trained
"""

from experiments.configs import base


def get_config():
    return base.get_config()
