"""Fields of the adversarial-pruning comparison (Wang et al. 2020); dataset configs start here.

PGD adversarial training (Madry) in every phase; see sparse_robust/methods.py for the methods.
"""

import ml_collections

from experiments.configs import base


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.experiment = "adversarial_pruning"
    config.methods = "lottery,inherit,reinit,random,hydra,inverse_inheritance,scratch_large"
    config.sparsities = "0.9,0.95,0.99"  # fractions of prunable weights removed; level 0 = dense
    config.train.objective = "madry"     # or "trades" (config.train.trades_beta)
    config.train.label_smoothing = 0.0
    config.train.attack = "pgd"
    config.eval.attack = "pgd"
    config.eval.early_stop_metric = "adv_loss"
    # Lottery: iterative global magnitude pruning, config.prune.strategy resets (rewind to θ0).
    config.lottery = ml_collections.ConfigDict({"rounds": 3})  # rounds to reach each target
    # Fine-tuning after one-shot pruning (inherit, reinit, random) and after HYDRA's score phase.
    config.retrain = ml_collections.ConfigDict({"num_steps": 0, "learning_rate": 0.0})  # 0: train.*
    # HYDRA's score phase (weights frozen); Sehwag et al. train scores with SGD at lr 0.1.
    config.hydra = ml_collections.ConfigDict({"num_steps": 0, "learning_rate": 0.0})    # 0: train.*
    config.random_mask = ml_collections.ConfigDict({"start": "reinit"})  # or "dense_trained"
    # Inverse weights inheritance: the large network, its fill rule and which weights train.
    config.inheritance = ml_collections.ConfigDict({
        "source": "lottery",        # lottery | hydra: the small sparse network of each level
        "width_multiplier": 1.0,    # 1: the same architecture, dense; e.g. 2: twice as wide
        "fill": "zeros",            # zeros | init (fill_scale x the large network's fresh init)
        "fill_scale": 1.0,
        "trainable": "all",         # all | inherited | new
    })
    # Sparsity-robustness diagnostics on the first test examples (0 = none).
    config.diagnostics = ml_collections.ConfigDict({"num_examples": 1000, "num_iters": 50})
    return config
