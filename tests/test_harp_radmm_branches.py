"""HARP and RADMM as branches, end to end on a tiny synthetic run: their records, masks and
phases; HARP's rates in the record and the report; and a run killed twice (in HARP's score
phase, then in RADMM's ADMM phase) resuming to the same numbers and weights, bit for bit."""

import numpy as np
import pytest

from experiments import report
from sparse_robust.runs import pipeline, store
from sparse_robust.runs.layout import Layout
from test_branches import load_mask, load_params, tiny_config, tiny_dataset
from test_lottery import TIMING_FIELDS

STEPS = 4  # per phase: 2 chunks of 2 steps, so a kill can land inside each phase


def config():
    cfg = tiny_config()
    cfg.branches.names = "harp,radmm"
    cfg.retrain.num_steps = STEPS
    cfg.branches.harp.update(num_steps=STEPS, learning_rate=0.05, gamma=5.0)
    cfg.branches.radmm.update(num_steps=STEPS, rounds=2, rho=0.01)
    return cfg


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("harp_radmm"))
    return path, pipeline.run(config(), path, dataset=tiny_dataset())


def by_branch(records):
    return {r["branch"]: r for r in records if r.get("branch")}


def test_records_carry_each_phase(finished_run):
    _, records = finished_run
    branches = by_branch(records)
    assert set(branches) == {"harp", "radmm"}
    for name, phase in (("harp", "score_phase"), ("radmm", "admm_phase")):
        r = branches[name]
        assert r["level"] == 2 and r["steps"] == STEPS and r[phase]["steps"] == STEPS
        assert 0 <= r["clean_accuracy"] <= 1
    assert branches["radmm"]["admm_phase"]["final_residual"] >= 0


def test_harp_rates_meet_the_level_and_shape_the_mask(finished_run):
    path, records = finished_run
    record = by_branch(records)["harp"]
    rates = record["harp_rates"]
    mask = load_mask(path, "harp")
    sizes = {name.rsplit("/", 1)[0]: m.size for name, m in mask.items()}
    assert set(rates["learned"]) == set(rates["final"]) == set(sizes)
    target = [r for r in records if not r.get("branch") and r["level"] == 2][0][
        "weights_remaining"]
    kept = sum(sizes[l] * k for l, k in rates["final"].items())
    assert kept == pytest.approx(target * sum(sizes.values()), rel=1e-6)
    for name, m in mask.items():  # each layer keeps round(k · n) at its final rate
        assert m.sum() == round(rates["final"][name.rsplit("/", 1)[0]] * m.size), name
    assert record["weights_remaining"] == pytest.approx(
        target, abs=len(sizes) / sum(sizes.values()))


def test_radmm_mask_is_the_global_projection_and_pruned_weights_are_zero(finished_run):
    path, records = finished_run
    mask = load_mask(path, "radmm")
    alive = sum(int(m.sum()) for m in mask.values())
    ticket = load_mask(path, "lottery")
    assert alive == sum(int(m.sum()) for m in ticket.values())  # the level's count (global)
    for name in ("harp", "radmm"):
        params, m = load_params(path, name), load_mask(path, name)
        assert all(not params[n][~m[n]].any() for n in m), name


def test_report_shows_harp_rates(finished_run):
    path, records = finished_run
    table = report.harp_rates_table(report.load_run(path))
    rates = by_branch(records)["harp"]["harp_rates"]
    for layer, k in rates["learned"].items():
        row = [line for line in table.splitlines() if line.startswith(f"| {layer} ")]
        assert row and f"{100 * k:.2f} / {100 * rates['final'][layer]:.2f}" in row[0]
    assert "HARP" in report.methods_table(report.load_run(path)) or "harp" in \
        report.methods_table(report.load_run(path))


def strip_timing(value):
    """The records without wall-clock fields, at any depth (the phases keep their own)."""
    if isinstance(value, dict):
        return {k: strip_timing(v) for k, v in value.items() if k not in TIMING_FIELDS}
    if isinstance(value, list):
        return [strip_timing(v) for v in value]
    return value


def final_weights(path, name):
    params, _ = store.load_tree_raw(Layout(path).unit(0, 2, name).final_variables)
    return params


def test_killed_twice_resumes_bit_identically(finished_run, tmp_path, interrupt_train_loop):
    """Train-loop calls: 6 for the chain (3 levels x 2 chunks), then 2 + 2 for HARP (score
    phase, fine-tuning) and 2 + 2 for RADMM. Kill at HARP's 2nd score chunk (call 8), resume and
    kill at RADMM's 2nd ADMM chunk, resume to the end: the same records and final weights."""
    path, reference = finished_run
    resumed = str(tmp_path / "resumed")
    calls = interrupt_train_loop(at=8)
    with pytest.raises(interrupt_train_loop.error):
        pipeline.run(config(), resumed, dataset=tiny_dataset())
    assert calls["n"] == 8
    # Resumed: HARP's last score chunk from its checkpoint (1), its fine-tuning (2), RADMM's
    # first ADMM chunk (3) and the kill at its second (4).
    calls = interrupt_train_loop(at=4)
    with pytest.raises(interrupt_train_loop.error):
        pipeline.run(config(), resumed, dataset=tiny_dataset())
    records = pipeline.run(config(), resumed, dataset=tiny_dataset())
    assert strip_timing(records) == strip_timing(reference)
    for name in ("harp", "radmm"):
        a, b = final_weights(path, name), final_weights(resumed, name)
        for layer in a:
            for leaf in a[layer]:
                np.testing.assert_array_equal(np.asarray(a[layer][leaf]),
                                              np.asarray(b[layer][leaf]), err_msg=name)
