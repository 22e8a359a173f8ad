"""hydra: HYDRA (Sehwag et al. 2020): train importance scores with the weights of the dense
network frozen (its own phase, ``score_phase/``), keep the top scores of every layer at the
level's weights remaining, then fine-tune the weights under that mask."""

from __future__ import annotations

from sparse_robust.pruning import hydra
from sparse_robust import masks as masks_lib
from sparse_robust.runs import fit as fit_lib
from sparse_robust.runs import store
from sparse_robust.runs.branches import Branch
from sparse_robust.runs.fields import field, integer, number


def _score_context(b, weights_remaining: float):
    return b.ctx.phase(b.settings["num_steps"], b.settings["learning_rate"]).derive(
        model_fn=hydra.make_score_model_fn(b.ctx.model_fn, weights_remaining))


def run(b):
    dense = b.chain(0)
    weights_remaining = masks_lib.weights_remaining(b.chain(b.level).mask)
    phase = b.files.phase("score_phase")
    scores_path, summary_path = phase.extra("final_scores"), phase.extra("score_phase.json")
    like = (hydra.init_scores(dense.params), dense.model_state)
    if not store.exists(scores_path):
        ctx = _score_context(b, weights_remaining)
        state = hydra.create_score_state(dense.params, dense.model_state, like[0], ctx.optimizer,
                                         b.key("hydra_scores", b.level, "train"))
        [outcome] = fit_lib.fit(ctx, [fit_lib.FitJob(
            state=state, data_key=b.key("data"), eval_key=b.key("hydra_scores", b.level, "eval"),
            files=phase, label=f"trial {b.trial} level {b.level} hydra scores")])
        store.write_json(summary_path, {"steps": int(outcome.state.step),
                                        "early_stop_step": outcome.best_step,
                                        "train_seconds": outcome.train_seconds})
        store.save_tree(scores_path, (outcome.state.params,
                                      outcome.state.model_state["model_state"]))
    scores, model_state = store.load_tree(scores_path, like)
    return b.train((dense.params, model_state), hydra.topk_mask(scores, weights_remaining),
                   score_phase=store.read_json(summary_path))


BRANCH = Branch(
    name="hydra", run=run, doc="HYDRA score training, then fine-tuning under the top scores.",
    settings=(field("num_steps", integer(0), "Score-training steps (0 = train.num_steps)."),
              field("learning_rate", number(0),
                    "Score-training learning rate (0 = train.learning_rate).")),
    defaults={"num_steps": 0, "learning_rate": 0.0},
    steps=lambda b: (b.finetune.schedule.num_steps
                     + (b.settings["num_steps"] or b.ctx.schedule.num_steps)))
