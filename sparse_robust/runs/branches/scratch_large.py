"""scratch_large: the inverse-inheritance branch's large network trained from its fresh init
with the train schedule: the control that inverse inheritance must beat. Runs once per trial,
beside the dense level 0."""

from __future__ import annotations

from sparse_robust import masks as masks_lib
from sparse_robust.runs.branches import Branch
from sparse_robust.runs.branches.inverse_inheritance import large_context, large_init


def run(b):
    ctx = large_context(b)
    params, model_state = large_init(b, ctx)
    return b.train((params, model_state), masks_lib.create_mask(params), ctx=ctx,
                   width_multiplier=b.all_settings["inverse_inheritance"]["width_multiplier"])


BRANCH = Branch(name="scratch_large", run=run, at_dense=True,
                doc="The large network of inverse inheritance, trained from scratch.",
                steps=lambda b: b.ctx.schedule.num_steps)
