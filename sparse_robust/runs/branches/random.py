"""random: a random mask with the one-shot mask's count in every layer, fine-tuned from a fresh
draw ("reinit") or from the trained dense weights ("dense_trained")."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_robust.runs.branches import Branch
from sparse_robust.runs.branches.inherit import one_shot_mask
from sparse_robust.runs.branches.reinit import fresh_init
from sparse_robust.runs.fields import choice, field

STARTS = ("reinit", "dense_trained")


@jax.jit
def shuffled_mask(key: jax.Array, mask):
    """A uniformly random mask with exactly ``mask``'s number of alive weights in every leaf."""
    leaves, treedef = jax.tree_util.tree_flatten(mask)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([jax.random.permutation(k, jnp.ravel(m)).reshape(jnp.shape(m))
                              for k, m in zip(keys, leaves)])


def run(b):
    dense = b.chain(0)
    mask = shuffled_mask(b.key("random_mask", b.level),
                         one_shot_mask(dense.params, b.chain(b.level).mask, b.scope))
    start = fresh_init(b) if b.settings["start"] == "reinit" else (dense.params,
                                                                   dense.model_state)
    return b.train(start, mask, random_mask_start=b.settings["start"])


BRANCH = Branch(
    name="random", run=run, doc="A random mask of the same per-layer counts, fine-tuned.",
    settings=(field("start", choice(STARTS),
                    "Weights under the random mask: a fresh draw or the trained dense ones."),),
    defaults={"start": "reinit"})
