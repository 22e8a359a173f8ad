"""The Cosentino et al. (2019) protocol; other configs start from it and change a few fields.

Every field of the engine is here (``python -m experiments.main --config=... --help_config``
lists them with their allowed values); a field that is not here is refused by name.
"""

import ml_collections

from sparse_robust.runs import branches


def attack_presets() -> ml_collections.ConfigDict:
    """Attacks by label; train.attack / eval.attack / eval.attacks refer to these labels."""
    return ml_collections.ConfigDict({
        # Cosentino et al.: L∞, ε = 0.3, on the model's predicted labels.
        "fgsm": {"name": "fgsm", "eps": 0.3, "label_source": "predicted"},
        "pgd": {"name": "pgd", "eps": 0.3, "step_size": 0.05, "num_steps": 10, "norm": "linf",
                "random_start": True, "restarts": 1, "loss": "ce", "label_source": "predicted"},
        # Stronger evaluators on the true labels.
        "pgd40": {"name": "pgd", "eps": 0.3, "step_size": 0.01, "num_steps": 40, "norm": "linf",
                  "random_start": True, "restarts": 1, "loss": "ce", "label_source": "true"},
        "apgd_ce": {"name": "apgd", "eps": 0.3, "num_steps": 100, "norm": "linf", "loss": "ce",
                    "label_source": "true"},
        "apgd_dlr": {"name": "apgd", "eps": 0.3, "num_steps": 100, "norm": "linf", "loss": "dlr",
                     "label_source": "true"},
        # The standard: APGD-CE -> APGD-T -> FAB-T -> Square, each on the images still robust.
        "autoattack": {"name": "autoattack", "eps": 0.3, "norm": "linf", "label_source": "true"},
    })


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.num_trials = 5
    config.progress = True

    config.data = ml_collections.ConfigDict({
        "name": "fashion_mnist",
        "source": "auto",          # idx files when present (apt-get install dataset-fashion-mnist), else tfds
        "data_dir": "",
        "download": False,         # never download unless asked
        "validation_size": 10_000,  # the first 10,000 training images
        "train_limit": 0,          # 0 = all remaining training images
        "flatten": True,
    })
    config.model = ml_collections.ConfigDict({"name": "dense-300-100", "width_multiplier": 1.0,
                                              "conv_impl": "auto", "sparse_impl": "auto"})

    config.attacks = attack_presets()
    config.train = ml_collections.ConfigDict({
        "optimizer": "adam",
        "learning_rate": 1.2e-3,
        "weight_decay": 0.0,
        "momentum": 0.9,
        "batch_size": 60,
        "num_steps": 50_000,
        "label_smoothing": 0.1,
        "objective": "mixed",      # natural | mixed (0.5 clean + 0.5 adv) | madry | trades
        "adv_weight": 0.5,
        "trades_beta": 6.0,
        "attack": "fgsm",          # a label from config.attacks
        "augment": False,          # random crop + flip (image datasets)
        "loop": "auto",            # scan | per_step | auto: per_step for XLA convolutions on CPU
    })
    config.eval = ml_collections.ConfigDict({
        "every": 1_000,            # steps between validation/test measurements
        "num_examples": 2_000,     # examples of val and test used at each measurement (0 = all)
        "batch_size": 1_000,
        "attack": "fgsm",          # attack of the periodic measurements
        "attacks": "fgsm,pgd,autoattack",  # attacks of the final test evaluation (labels)
        "final_examples": 0,       # test images of the final evaluation (0 = all)
        "early_stop_metric": "objective",  # lowest validation value of: objective | clean_loss | adv_loss
        # Gradient-masking checks on this many test images after each level (0 = off):
        # monotone in ε, ε=0 equals clean, PGD ≤ FGSM, APGD ≤ PGD, large ε reaches chance,
        # cross-entropy PGD within 5 points of APGD-DLR (no saturated-logit masking).
        "sanity_examples": 500,
    })
    config.prune = ml_collections.ConfigDict({
        "levels": 20,              # pruning levels after the dense level 0
        "targets": "",             # or sparsities to reach, e.g. "0.8,0.95" (then levels = 0)
        "rounds_per_target": 1,    # pruning rounds between consecutive targets
        "scope": "layerwise",      # layerwise | global
        "rates": {"default": 0.2, "output": 0.1},  # of the remaining weights, per level
        "global_rate": 0.2,        # used when scope = global
        "criterion": "magnitude",  # magnitude | random
        "granularity": "weight",   # weight | channel (whole filters / neurons; layerwise only)
        "strategy": "rewind_init",  # rewind_init | rewind_step | random_reinit | continue | dense_trained
        "rewind_step": 0,          # k for rewind_step
    })
    # Comparison methods started from chain levels, written beside them (sparse_robust/runs/
    # branches/): the branch names of sparse_robust/pruning/registry.py (inherit, reinit, random,
    # hydra, harp, radmm, inverse_inheritance, scratch_large).
    config.branches = ml_collections.ConfigDict({
        "names": "",
        "levels": "",              # chain levels they start from; "" = the targets' levels
        **branches.default_settings(),
    })
    # Fine-tuning of the one-shot branches (inherit, reinit, random, hydra's weights).
    config.retrain = ml_collections.ConfigDict({"num_steps": 0, "learning_rate": 0.0})  # 0: train.*
    # Sparsity-robustness diagnostics of each unit on the first test images (0 = none).
    config.diagnostics = ml_collections.ConfigDict({"num_examples": 0, "num_iters": 50})
    config.parallel = ml_collections.ConfigDict({
        "num_devices": 0,          # data parallel over this many devices; 0 = all, 1 = no sharding
        "distributed": False,      # multi-process: join the other processes (README)
        "trials_at_once": 1,       # trials trained together under vmap (pays on accelerators)
    })
    config.checkpoint_every = 5_000  # steps; a multiple of eval.every keeps resumes exact
    return config
