"""harp: HARP (Zhao & Wressnegger 2023): with the dense network's weights frozen, learn scores and
per-layer keep rates under the rate penalty (its own phase, ``score_phase/``), keep each layer's
top scores at the learned rates (scaled to the level's weights remaining), then fine-tune the
weights under that mask. The record carries the learned and final rates per layer.

At the chain's granularity "channel" (``config.prune.granularity``) the scores and the final mask
are of whole filters / neurons: each layer keeps the channels of highest summed score, its
learned rate being the fraction of its channels kept; ``output`` stays whole (rate 1)."""

from __future__ import annotations

from sparse_robust import masks as masks_lib
from sparse_robust.pruning import harp
from sparse_robust.runs.branches import Branch
from sparse_robust.runs.fields import field, integer, number


def _score_context(b, target: float, scores):
    s = b.settings
    ctx = b.ctx.phase(s["num_steps"], s["learning_rate"])
    objective = harp.make_objective(b.ctx.objective, scores, target, s["alpha"], s["gamma"],
                                    ctx.schedule.num_steps, b.granularity)
    rates_tx = ctx.make_optimizer(s["rate_learning_rate"])
    return ctx.derive(model_fn=harp.make_score_model_fn(b.ctx.model_fn,
                                                        harp.k_min(target, s["alpha"]),
                                                        b.granularity),
                      objective=objective,
                      optimizer=harp.score_optimizer(ctx.optimizer, rates_tx))


def run(b):
    dense = b.chain(0)
    target = masks_lib.weights_remaining(b.chain(b.level).mask)
    s = b.settings
    scores = harp.init_scores(dense.params)
    logits = harp.init_rate_logits(masks_lib.create_mask(dense.params), target, s["alpha"])
    like = ({"scores": scores, "rate_logits": logits}, dense.model_state)

    def start(key):
        ctx = _score_context(b, target, scores)
        return ctx, harp.create_score_state(dense.params, dense.model_state, scores, logits,
                                            ctx.optimizer, key)

    (learned, model_state), summary = b.fit_phase(
        "score_phase", final="final_scores", summary="score_phase.json", like=like,
        tag="harp_scores", start=start,
        saved=lambda state: (state.params, state.model_state["model_state"]))
    mask, learned_rates, final_rates = harp.final_mask(learned["scores"], learned["rate_logits"],
                                                       target, s["alpha"], b.granularity)
    return b.train((dense.params, model_state), mask, score_phase=summary,
                   harp_rates={"learned": learned_rates, "final": final_rates})


BRANCH = Branch(
    name="harp", run=run,
    doc="HARP: learned scores and per-layer keep rates, then fine-tuning under that mask.",
    settings=(field("num_steps", integer(0), "Score-phase steps (0 = train.num_steps)."),
              field("learning_rate", number(0),
                    "Score-phase learning rate (0 = train.learning_rate)."),
              field("rate_learning_rate", number(0, low_open=True),
                    "Learning rate of the rate logits (their own optimizer of train.optimizer's "
                    "kind: a logit must move several units over the score phase)."),
              field("alpha", number(0, 1, high_open=True),
                    "k_min = alpha * target: the lowest keep rate a layer may learn."),
              field("gamma", number(0),
                    "Weight of the rate penalty at the end of the score phase (it rises "
                    "linearly from 0).")),
    defaults={"num_steps": 0, "learning_rate": 0.0, "rate_learning_rate": 0.02, "alpha": 0.1,
              "gamma": 10.0},
    steps=lambda b: (b.finetune.schedule.num_steps
                     + (b.settings["num_steps"] or b.ctx.schedule.num_steps)))
