"""The sparse-ticket benchmark's core on a tiny size: both paths run, agree, and the last line's
JSON names each row (the timings themselves are not asserted)."""

import json

import jax
import numpy as np

from benchmarks import sparse_tickets
from sparse_robust import masks

TINY = dict(eval_batch=8, eval_steps=1, train_batch=4, train_steps=1, repeats=1)


def test_random_ticket_keeps_the_density_in_every_layer():
    _, params, mask = sparse_tickets.random_ticket("dense-300-100", 0.05, jax.random.key(0))
    for name, fraction in masks.layer_weights_remaining(mask).items():
        assert 0.03 < fraction < 0.07, name
    for p, m in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(mask)):
        assert not np.any(np.asarray(p)[~np.asarray(m)])


def test_a_row_times_both_paths_which_agree(capsys):
    row = sparse_tickets.measure("dense-300-100", 0.02, **TINY)
    assert row["sparse layers"] == 3
    assert row["eval differ"] == 0 and row["train loss diff"] < 1e-5
    for column in ("eval dense s", "eval sparse s", "train dense s", "train sparse s"):
        assert 0 < row[column] < float("inf")
    assert row["eval speed-up"] == row["eval dense s"] / row["eval sparse s"]
    assert sparse_tickets.speed_ups([row]) == {"dense-300-100 2%": round(row["eval speed-up"], 2)}
    json.dumps(sparse_tickets.speed_ups([row]))


def test_the_channel_row_compares_the_compacted_conv_ticket_with_its_masked_dense_original():
    row = sparse_tickets.measure_channel("conv-2", 2, **TINY)
    assert row["model"] == "conv-2 channel" and row["density"] == 0.25
    # Compact computes the same logits (to 1e-5), so the verdicts and the loss agree.
    assert row["eval differ"] == 0 and row["train loss diff"] < 1e-4
    for column in ("eval dense s", "eval sparse s", "train dense s", "train sparse s"):
        assert 0 < row[column] < float("inf")
    assert sparse_tickets.speed_ups([row]) == {"conv-2 channel 25%": round(row["eval speed-up"], 2)}
