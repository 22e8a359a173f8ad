"""Fields of the adversarial-pruning comparison (Wang et al. 2020); dataset configs start here.

PGD adversarial training (Madry) in every phase. The chain prunes globally by magnitude and
rewinds to θ0, reaching each target sparsity in ``prune.rounds_per_target`` rounds; at each
target level the branches compare the other methods (sparse_robust/runs/branches/).
"""

import ml_collections

from experiments.configs import base


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.prune.update(levels=0, targets="0.9,0.95,0.99", rounds_per_target=3, scope="global")
    config.branches.names = "inherit,reinit,random,hydra,inverse_inheritance,scratch_large"
    config.train.objective = "madry"     # or "trades" (config.train.trades_beta)
    config.train.label_smoothing = 0.0
    config.train.attack = "pgd"
    config.eval.attack = "pgd"
    config.eval.early_stop_metric = "adv_loss"
    # Sparsity-robustness diagnostics on the first test examples (0 = none).
    config.diagnostics = ml_collections.ConfigDict({"num_examples": 1000, "num_iters": 50})
    return config
