"""radmm: RADMM (Ye et al. 2019): adversarial training of the dense network under the ADMM
penalty towards the level's weights remaining (its own phase, ``admm_phase/``), then hard
pruning to Z's support and adversarial fine-tuning under that mask.

At the chain's granularity "channel" (``config.prune.granularity``; the ``scope`` setting must
then be "layerwise", the config check says so) Z is the projection onto whole channels: each
layer keeps as many filters / neurons as the chain's channel mask at that level, those of
largest L2 norm of W + U, and the hard pruning keeps Z's channels."""

from __future__ import annotations

from sparse_robust import masks as masks_lib
from sparse_robust import training
from sparse_robust.pruning import radmm
from sparse_robust.runs.branches import Branch
from sparse_robust.runs.fields import choice, field, integer, number


def _admm_context(b, weights_remaining):
    s = b.settings
    ctx = b.ctx.phase(s["num_steps"], s["learning_rate"])
    steps_per_round = max(1, ctx.schedule.num_steps // s["rounds"])
    objective = radmm.make_objective(b.ctx.objective, weights_remaining, s["scope"], s["rho"],
                                     s["rho_growth"], steps_per_round, b.granularity)
    return ctx.derive(model_fn=radmm.make_model_fn(b.ctx.model_fn), objective=objective)


def target(b):
    """The weights remaining Z is projected onto: the level's fraction; at channel granularity
    each layer's (its fraction of channels kept in the chain's channel mask)."""
    level_mask = b.chain(b.level).mask
    if b.granularity == "channel":
        return masks_lib.layer_weights_remaining(level_mask)
    return masks_lib.weights_remaining(level_mask)


def run(b):
    dense = b.chain(0)
    weights_remaining = target(b)
    scope = b.settings["scope"]
    every = masks_lib.create_mask(dense.params)
    like = (dense.params, radmm.init_state(dense.params, dense.model_state, every,
                                           weights_remaining, scope, b.granularity))

    def start(key):
        ctx = _admm_context(b, weights_remaining)
        return ctx, training.create_train_state(like[0], like[1], ctx.optimizer, every, key)

    def final_residual(outcome):
        state = outcome.state
        return {"final_residual": float(radmm.residual(state.params,
                                                       state.model_state["admm"]))}

    (params, admm_state), summary = b.fit_phase(
        "admm_phase", final="final_admm", summary="admm_phase.json", like=like, tag="radmm",
        start=start, saved=lambda state: (state.params, state.model_state), extra=final_residual)
    mask = radmm.hard_prune_mask(admm_state["admm"], weights_remaining, scope, b.granularity)
    return b.train((params, admm_state["model_state"]), mask, admm_phase=summary)


BRANCH = Branch(
    name="radmm", run=run,
    doc="RADMM: adversarial ADMM training towards the sparsity, hard pruning, fine-tuning.",
    settings=(field("num_steps", integer(0), "ADMM-phase steps (0 = train.num_steps)."),
              field("learning_rate", number(0),
                    "ADMM-phase learning rate (0 = train.learning_rate)."),
              field("rounds", integer(1), "ADMM rounds (Z/U updates) over the ADMM phase."),
              field("rho", number(0, low_open=True), "ADMM penalty ρ of the first round."),
              field("rho_growth", number(1), "ρ's factor per round (1 = constant)."),
              field("scope", choice(radmm.SCOPES),
                    "The sparsity constraint: per layer or over all layers.")),
    defaults={"num_steps": 0, "learning_rate": 0.0, "rounds": 10, "rho": 0.01,
              "rho_growth": 1.3, "scope": "global"},
    steps=lambda b: (b.finetune.schedule.num_steps
                     + (b.settings["num_steps"] or b.ctx.schedule.num_steps)))
