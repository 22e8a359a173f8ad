"""reinit: the inherit branch's mask with re-initialised weights (a fresh draw), fine-tuned."""

from __future__ import annotations

from sparse_robust.runs.branches import Branch
from sparse_robust.runs.branches.inherit import one_shot_mask


def fresh_init(b):
    """The re-initialised weights of this level (shared with the random branch)."""
    return b.ctx.init(b.key("fresh", b.level))


def run(b):
    mask = one_shot_mask(b.chain(0).params, b.chain(b.level).mask, b.scope, b.granularity)
    return b.train(fresh_init(b), mask)


BRANCH = Branch(name="reinit", run=run,
                doc="The one-shot mask with re-initialised weights, fine-tuned.")
