"""inherit: one-shot magnitude pruning of the trained dense network to the level's sparsity,
then adversarial fine-tuning of the inherited weights (Wang et al.'s weights inheritance).

At the chain's granularity "channel" the one-shot mask keeps, in every layer, as many whole
filters / neurons (those of highest L1 norm) as the chain's channel mask at that level."""

from __future__ import annotations

from sparse_robust import masks as masks_lib
from sparse_robust import pruning
from sparse_robust.runs.branches import Branch


def one_shot_mask(params, level_mask, scope: str, granularity: str = "weight"):
    """Magnitude pruning of ``params`` in one round to ``level_mask``'s count of alive weights:
    per layer (scope "layerwise") or overall ("global"). With granularity "channel" (layerwise
    only) whole channels go: a channel mask's weight fraction in a layer is its channel fraction,
    so each layer keeps as many channels as ``level_mask`` does."""
    dense = masks_lib.create_mask(params)
    if scope == "global":
        alive, total = masks_lib.count(level_mask)
        return pruning.magnitude_prune(params, dense, 1.0 - alive / total, scope="global")
    rates = {layer: 1.0 - remaining
             for layer, remaining in masks_lib.layer_weights_remaining(level_mask).items()}
    return pruning.magnitude_prune(params, dense, rates, scope="layerwise",
                                   granularity=granularity)


def run(b):
    dense = b.chain(0)
    mask = one_shot_mask(dense.params, b.chain(b.level).mask, b.scope, b.granularity)
    return b.train((dense.params, dense.model_state), mask)


BRANCH = Branch(name="inherit", run=run,
                doc="One-shot magnitude pruning of the trained dense network, fine-tuned.")
