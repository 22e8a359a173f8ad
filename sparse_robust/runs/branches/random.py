"""random: a random mask with the one-shot mask's count in every layer, fine-tuned from a fresh
draw ("reinit") or from the trained dense weights ("dense_trained").

At the chain's granularity "channel" the random mask is of whole filters / neurons: in every layer
as many channels, drawn uniformly, as the chain's channel mask at that level keeps."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_robust.pruning import channels
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


@jax.jit
def shuffled_channels(key: jax.Array, mask):
    """A uniformly random channel mask with exactly ``mask``'s number of alive channels (output
    units, the last axis) in every leaf; each kept channel wholly alive."""
    leaves, treedef = jax.tree_util.tree_flatten(mask)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([
        jnp.broadcast_to(jax.random.permutation(k, channels.channel_alive(m)), jnp.shape(m))
        for k, m in zip(keys, leaves)])


def run(b):
    dense = b.chain(0)
    shuffle = shuffled_channels if b.granularity == "channel" else shuffled_mask
    mask = shuffle(b.key("random_mask", b.level),
                   one_shot_mask(dense.params, b.chain(b.level).mask, b.scope, b.granularity))
    start = fresh_init(b) if b.settings["start"] == "reinit" else (dense.params,
                                                                   dense.model_state)
    return b.train(start, mask, random_mask_start=b.settings["start"])


BRANCH = Branch(
    name="random", run=run, doc="A random mask of the same per-layer counts, fine-tuned.",
    settings=(field("start", choice(STARTS),
                    "Weights under the random mask: a fresh draw or the trained dense ones."),),
    defaults={"start": "reinit"})
