"""hydra: HYDRA (Sehwag et al. 2020): train importance scores with the weights of the dense
network frozen (its own phase, ``score_phase/``), keep the top scores at the level's weights
remaining, then fine-tune the weights under that mask.

How many weights each layer keeps is the ``allocation`` setting: "level" (default) keeps in every
layer as many as the one-shot magnitude mask of the dense network at the chain's scope (the
random branch's per-layer sizes); "uniform" keeps the same fraction of every layer (the paper's
layer-wise k, which at 1 % leaves dense-300-100's output layer 10 weights and collapses);
"global" ranks all scaled scores together.

At the chain's granularity "channel" (``config.prune.granularity``) the score phase and the final
mask keep whole filters / neurons ranked by their summed scores (``pruning.prune(...,
granularity="channel")``); with allocation "level" each layer keeps as many channels as the
chain's channel mask at that level ("uniform": the level's fraction of every layer's channels;
"global" is refused by the config check: channels are ranked per layer)."""

from __future__ import annotations

from sparse_robust.pruning import hydra
from sparse_robust import masks as masks_lib
from sparse_robust.runs.branches import Branch
from sparse_robust.runs.branches.inherit import one_shot_mask
from sparse_robust.runs.fields import choice, field, integer, number

ALLOCATIONS = ("level", "uniform", "global")


def allocation(b, dense_params):
    """(weights_remaining, scope) of the top-k: per layer or one fraction, as configured."""
    level_mask = b.chain(b.level).mask
    if b.settings["allocation"] == "level" and b.granularity == "channel":
        # The chain's channel mask: a layer's weight fraction is its fraction of channels kept.
        return masks_lib.layer_weights_remaining(level_mask), "layerwise"
    if b.settings["allocation"] == "level":
        return (masks_lib.layer_weights_remaining(one_shot_mask(dense_params, level_mask,
                                                                b.scope)), "layerwise")
    return (masks_lib.weights_remaining(level_mask),
            "global" if b.settings["allocation"] == "global" else "layerwise")


def _score_context(b, weights_remaining, scope: str):
    return b.ctx.phase(b.settings["num_steps"], b.settings["learning_rate"]).derive(
        model_fn=hydra.make_score_model_fn(b.ctx.model_fn, weights_remaining, scope,
                                           b.granularity))


def run(b):
    dense = b.chain(0)
    weights_remaining, scope = allocation(b, dense.params)
    like = (hydra.init_scores(dense.params), dense.model_state)

    def start(key):
        ctx = _score_context(b, weights_remaining, scope)
        return ctx, hydra.create_score_state(dense.params, dense.model_state, like[0],
                                             ctx.optimizer, key)

    (scores, model_state), summary = b.fit_phase(
        "score_phase", final="final_scores", summary="score_phase.json", like=like,
        tag="hydra_scores", start=start,
        saved=lambda state: (state.params, state.model_state["model_state"]))
    mask = hydra.topk_mask(scores, weights_remaining, scope, b.granularity)
    return b.train((dense.params, model_state), mask, score_phase=summary)


BRANCH = Branch(
    name="hydra", run=run, doc="HYDRA score training, then fine-tuning under the top scores.",
    settings=(field("num_steps", integer(0), "Score-training steps (0 = train.num_steps)."),
              field("learning_rate", number(0),
                    "Score-training learning rate (0 = train.learning_rate)."),
              field("allocation", choice(ALLOCATIONS),
                    "Weights kept per layer: those of the one-shot magnitude mask at the "
                    "chain's scope (level), the same fraction everywhere (uniform), or one "
                    "top-k over all layers (global).")),
    defaults={"num_steps": 0, "learning_rate": 0.0, "allocation": "level"},
    steps=lambda b: (b.finetune.schedule.num_steps
                     + (b.settings["num_steps"] or b.ctx.schedule.num_steps)))
