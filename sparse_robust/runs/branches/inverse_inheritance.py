"""inverse_inheritance: a large network inherits the level's sparse network (the chain's ticket
or the hydra branch's network) in place, the rest filled by a rule, and is adversarially trained
with the train schedule (Wang et al. 2020). With zero filling it starts out computing exactly the
small sparse network's function."""

from __future__ import annotations

import jax

from sparse_robust.pruning import inheritance
from sparse_robust import masks as masks_lib
from sparse_robust.runs.branches import Branch
from sparse_robust.runs.fields import choice, field, number

SOURCES = ("lottery", "hydra")


def large_context(b):
    """The run's context with the model widened by ``width_multiplier`` (the same if 1)."""
    width = b.all_settings["inverse_inheritance"]["width_multiplier"]
    if width == 1.0:
        return b.ctx
    model = b.ctx.model.clone(width_multiplier=b.ctx.model.width_multiplier * width)
    return b.ctx.derive(model=model, model_fn=None)


def large_init(b, ctx):
    """The large network's fresh init: the same draw for scratch_large and the "init" fill."""
    return ctx.init(b.key("large_init"))


def run(b):
    s = b.settings
    source = b.chain(b.level) if s["source"] == "lottery" else b.branch("hydra")
    ctx = large_context(b)
    large_params, large_state = large_init(b, ctx)
    flattened = inheritance.flattened_inputs(b.ctx.model, b.ctx.dataset.train_images[:1])
    params = inheritance.inherit_wider(source.params, source.mask, large_params, fill=s["fill"],
                                       fill_scale=s["fill_scale"], flattened_inputs=flattened)
    if jax.tree_util.tree_leaves(large_state):  # batch statistics: new channels keep init
        large_state = inheritance.inherit_wider(source.model_state, None, large_state,
                                                fill="init")
    trainable, inherited = (
        inheritance.trainable_mask(source.params, source.mask, large_params, which,
                                   flattened_inputs=flattened)
        for which in (s["trainable"], "inherited"))
    mask = masks_lib.create_mask(params)
    return b.train(
        (params, large_state), mask, ctx=ctx, trainable=trainable, source=s["source"],
        source_weights_remaining=masks_lib.weights_remaining(source.mask),
        inherited_weights=masks_lib.weights_remaining(
            masks_lib.map_prunable(lambda _, flags: flags, mask, inherited)),
        width_multiplier=s["width_multiplier"], fill=s["fill"], fill_scale=s["fill_scale"],
        trainable_weights=s["trainable"])


BRANCH = Branch(
    name="inverse_inheritance", run=run,
    doc="A large network inherits the level's sparse network, then trains (Wang et al.).",
    settings=(
        field("source", choice(SOURCES), "The sparse network inherited: the chain's ticket or "
              "the hydra branch's network."),
        field("width_multiplier", number(1), "Width of the large network (1 = same network)."),
        field("fill", choice(inheritance.FILLS),
              "Entries not inherited: zeros, or fill_scale x the large network's fresh init."),
        field("fill_scale", number(), "Scale of the 'init' fill."),
        field("trainable", choice(inheritance.TRAINABLE),
              "Which entries train: all, the inherited ones, or the new ones.")),
    defaults={"source": "lottery", "width_multiplier": 1.0, "fill": "zeros", "fill_scale": 1.0,
              "trainable": "all"},
    requires=lambda s: ("hydra",) if s.get("source") == "hydra" else (),
    steps=lambda b: b.ctx.schedule.num_steps)
