"""Tests for sparse_robust.evaluation: the one evaluator against direct computations, padded
partial batches, keys derived from attack names, vmapped ε sweeps, and sanity checks that pass on
a real model and flag a broken attack."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_robust import attacks, evaluation, keys
from test_attacks import fast_key, make_data, train_mlp

EPS = 0.05
NUM_TEST = 300


@pytest.fixture(scope="module")
def trained():
    """(model_fn, variables, images, labels) of a naturally trained tiny MLP."""
    x, y = make_data(0, 512)
    model, variables = train_mlp(x, y, jax.random.key(0))
    images, labels = make_data(1, NUM_TEST)
    model_fn = lambda params, state, z, train: (model.apply(params, z), state)
    return model_fn, variables, images, labels


def evaluator(trained, batch_size=NUM_TEST):
    return evaluation.Evaluator(trained[0], batch_size=batch_size)


# Deterministic attacks (no random start): results cannot depend on how the data are batched.
DETERMINISTIC = {
    "fgsm": attacks.make_attack("fgsm", eps=EPS),
    "pgd": attacks.make_attack("pgd", eps=EPS, step_size=EPS / 4, num_steps=8, random_start=False),
}


def correct_under(trained, x_adv):
    model_fn, variables, _, labels = trained
    return np.argmax(np.asarray(model_fn(variables, {}, x_adv, False)[0]), -1) == labels


def test_accuracies_match_direct_computation_and_worst_case_is_per_example(trained):
    model_fn, variables, images, labels = trained
    results = evaluator(trained, 100).evaluate(variables, {}, images, labels, DETERMINISTIC,
                                               fast_key(0))
    assert set(results) == {"clean_accuracy", "clean_loss", "fgsm_accuracy", "fgsm_loss",
                            "pgd_accuracy", "pgd_loss", "worst_case_accuracy"}
    logits_fn = lambda z: model_fn(variables, {}, z, False)[0]
    clean = correct_under(trained, images)
    fgsm = correct_under(trained, attacks.fgsm(logits_fn, images, labels, None, eps=EPS))
    pgd = correct_under(trained, attacks.pgd(logits_fn, images, labels, None, eps=EPS,
                                             step_size=EPS / 4, num_steps=8, random_start=False))
    assert results["clean_accuracy"] == pytest.approx(clean.mean())
    assert results["fgsm_accuracy"] == pytest.approx(fgsm.mean())
    assert results["pgd_accuracy"] == pytest.approx(pgd.mean())
    assert results["worst_case_accuracy"] == pytest.approx((clean & fgsm & pgd).mean())
    assert results["pgd_accuracy"] < results["clean_accuracy"] - 0.1  # The attacks do something.
    assert results["pgd_loss"] > results["clean_loss"]


def test_partial_last_batch_is_padded_masked_and_compiled_once(trained):
    _, variables, images, labels = trained
    divides = evaluator(trained, 100).evaluate(variables, {}, images, labels, DETERMINISTIC,
                                               fast_key(0))
    by_128 = evaluator(trained, 128)
    partial = by_128.evaluate(variables, {}, images, labels, DETERMINISTIC, fast_key(0))
    assert by_128.program(DETERMINISTIC["pgd"])._cache_size() == 1  # 128, 128, 44 (+84 pad)
    assert partial == pytest.approx(divides, rel=1e-6)
    # A batch larger than the data set shrinks to it instead of padding.
    whole = evaluator(trained, 50).evaluate(variables, {}, images[:50], labels[:50],
                                            DETERMINISTIC, fast_key(0))
    first = by_128.evaluate(variables, {}, images[:50], labels[:50], DETERMINISTIC, fast_key(0))
    assert whole == pytest.approx(first, rel=1e-6)


def test_attack_keys_come_from_names_not_positions(trained):
    """An attack's numbers depend on its label: reordering the attacks changes nothing, and batch
    b of the attack labelled n uses fold_in(derive(key, n), b)."""
    model_fn, variables, images, labels = trained
    random_pgd = attacks.make_attack("pgd", eps=EPS, step_size=EPS / 4, num_steps=3)
    ev = evaluator(trained, 100)
    one = ev.per_example(variables, {}, images, labels, {"a": random_pgd, "b": DETERMINISTIC["fgsm"]},
                         fast_key(5))
    other = ev.per_example(variables, {}, images, labels,
                           {"b": DETERMINISTIC["fgsm"], "a": random_pgd}, fast_key(5))
    np.testing.assert_array_equal(one["a"].correct, other["a"].correct)
    logits_fn = lambda z: model_fn(variables, {}, z, False)[0]
    x_adv = np.concatenate([random_pgd(logits_fn, images[i:i + 100], labels[i:i + 100],
                                       jax.random.fold_in(keys.derive(fast_key(5), "a"), b))
                            for b, i in enumerate(range(0, NUM_TEST, 100))])
    np.testing.assert_array_equal(one["a"].correct, correct_under(trained, x_adv))
    renamed = ev.per_example(variables, {}, images, labels, {"c": random_pgd}, fast_key(5))
    assert not np.array_equal(renamed["c"].correct, one["a"].correct)  # another name, other keys


def test_adversarial_examples_are_the_attacks(trained):
    model_fn, variables, images, labels = trained
    x_adv = evaluator(trained, 128).adversarial_examples(variables, {}, images, labels,
                                                         DETERMINISTIC["fgsm"], fast_key(0))
    logits_fn = lambda z: model_fn(variables, {}, z, False)[0]
    np.testing.assert_allclose(x_adv, attacks.fgsm(logits_fn, images, labels, None, eps=EPS), atol=1e-6)


def test_progress_bar_only_when_asked(trained, capsys):
    _, variables, images, labels = trained
    ev = evaluator(trained, 100)
    ev.evaluate(variables, {}, images, labels, DETERMINISTIC, fast_key(0))
    assert "pgd" not in capsys.readouterr().err
    ev.evaluate(variables, {}, images, labels, DETERMINISTIC, fast_key(0), progress=True)
    assert "pgd" in capsys.readouterr().err


def test_epsilon_sweep_matches_per_eps_attacks(trained):
    model_fn, variables, images, labels = trained
    attack = attacks.make_attack("pgd", eps=0.1, step_size=0.025, num_steps=5)
    eps_grid = np.array([0.0, 0.02, 0.05, 0.1, 1.0], np.float32)
    key = fast_key(3)
    sweep = evaluator(trained).sweep(variables, {}, images, labels, attack, eps_grid, key)
    # Reference: one batch, so its key is fold_in(key, 0); step = (0.025 / 0.1) · ε by default.
    logits_fn = lambda z: model_fn(variables, {}, z, False)[0]
    run = jax.jit(lambda e: attack(logits_fn, images, labels, jax.random.fold_in(key, 0), eps=e,
                                   step_size=0.25 * e))
    expected = [correct_under(trained, run(e)).mean() for e in eps_grid]
    np.testing.assert_allclose(sweep, expected, atol=1.0 / NUM_TEST)
    assert sweep[0] == pytest.approx(correct_under(trained, images).mean())
    assert sweep[-1] < 0.05


def test_epsilon_sweep_partial_batches_and_explicit_ratio(trained):
    _, variables, images, labels = trained
    eps_grid = [0.0, 0.03, 0.06]
    pgd = DETERMINISTIC["pgd"]
    full = evaluator(trained).sweep(variables, {}, images, labels, pgd, eps_grid, fast_key(0),
                                    step_size_ratio=0.5)
    partial = evaluator(trained, 128).sweep(variables, {}, images, labels, pgd, eps_grid,
                                            fast_key(0), step_size_ratio=0.5)
    np.testing.assert_array_equal(full, partial)
    assert np.all(np.diff(full) <= 0)


def test_sanity_checks_pass_on_a_trained_model(trained):
    _, variables, images, labels = trained
    checks = evaluation.run_sanity_checks(evaluator(trained), variables, {}, images, labels,
                                          fast_key(1), eps=EPS, num_steps=10, sweep_points=3)
    assert [c.name for c in checks] == ["monotone_in_eps", "eps0_equals_clean", "pgd_not_weaker_than_fgsm",
                                        "apgd_not_weaker_than_pgd", "large_eps_reaches_chance",
                                        "ce_and_dlr_agree", "deterministic_at_evaluation",
                                        "few_zero_gradients"]
    assert all(c.passed for c in checks), evaluation.format_checks(checks)
    assert evaluation.format_checks(checks).count("PASS") == len(checks)


def test_sanity_checks_flag_saturated_logits_that_hide_from_cross_entropy(trained, caplog):
    """Scaling the logits by 1e4 changes no prediction, but rounds the softmax to one-hot in float32
    so cross-entropy gradients vanish (gradient masking); the scale-invariant DLR loss still finds
    the same adversarial examples, so only the loss-agreement check can catch it."""
    model_fn, variables, images, labels = trained
    saturated = lambda p, s, z, train: (1e4 * model_fn(p, s, z, train)[0], s)
    run = lambda fn: evaluation.run_sanity_checks(
        evaluation.Evaluator(fn, batch_size=NUM_TEST), variables, {}, images, labels, fast_key(1),
        eps=EPS, num_steps=10, sweep_points=3)
    honest = {c.name: c for c in run(model_fn)}
    with caplog.at_level(logging.INFO):
        masked = {c.name: c for c in run(saturated)}
    assert honest["ce_and_dlr_agree"].passed
    assert not masked["ce_and_dlr_agree"].passed
    assert "overestimate" in masked["ce_and_dlr_agree"].detail
    assert any("ce_and_dlr_agree" in r.getMessage() for r in caplog.records)
    # DLR is scale-invariant: the same key gives the same accuracy as on the honest model.
    accuracy = lambda check: float(check.detail.split("apgd_dlr ")[1].split(" %")[0]) / 100
    assert accuracy(masked["ce_and_dlr_agree"]) == pytest.approx(accuracy(honest["ce_and_dlr_agree"]),
                                                                abs=2 / NUM_TEST)


def test_sanity_checks_flag_an_identity_attack_posing_as_pgd(trained, caplog):
    _, variables, images, labels = trained
    identity = attacks.make_attack("pgd", eps=EPS, step_size=0.0, num_steps=1, random_start=False)
    eps_grid = np.array([0.0, EPS / 2, EPS, 1.0])
    sweep = evaluator(trained).sweep(variables, {}, images, labels, identity, eps_grid, fast_key(0))
    real = evaluator(trained, 100).evaluate(variables, {}, images, labels, DETERMINISTIC,
                                            fast_key(0))
    with caplog.at_level(logging.INFO):
        checks = evaluation.sanity_checks(
            clean_accuracy=real["clean_accuracy"],
            attack_accuracies={"fgsm": real["fgsm_accuracy"], "pgd": sweep[2],
                               "apgd": real["pgd_accuracy"]},
            eps_grid=eps_grid, sweep_accuracies=sweep, num_examples=NUM_TEST, num_classes=4)
    failed = {c.name for c in checks if not c.passed}
    assert failed == {"pgd_not_weaker_than_fgsm", "large_eps_reaches_chance"}
    report = evaluation.format_checks(checks)
    assert "FAIL  pgd_not_weaker_than_fgsm" in report and "FAIL  large_eps_reaches_chance" in report
    assert sum("FAILED" in r.getMessage() for r in caplog.records) == 2


def test_sanity_checks_flag_non_monotone_sweep_and_eps0_mismatch():
    checks = evaluation.sanity_checks(
        clean_accuracy=0.9, attack_accuracies={"fgsm": 0.5, "pgd": 0.4, "apgd": 0.45},
        eps_grid=[0.0, 0.1, 0.2, 1.0], sweep_accuracies=[0.8, 0.5, 0.6, 0.2], num_examples=100,
        num_classes=10)
    by_name = {c.name: c for c in checks}
    assert not by_name["monotone_in_eps"].passed and "0.1->0.2" in by_name["monotone_in_eps"].detail
    assert not by_name["eps0_equals_clean"].passed
    assert not by_name["apgd_not_weaker_than_pgd"].passed
    assert not by_name["large_eps_reaches_chance"].passed
    assert by_name["pgd_not_weaker_than_fgsm"].passed
    # Within one example of tolerance, nothing fails.
    checks = evaluation.sanity_checks(
        clean_accuracy=0.9, attack_accuracies={"fgsm": 0.5, "pgd": 0.51, "apgd": 0.52},
        eps_grid=[0.0, 0.1, 1.0], sweep_accuracies=[0.91, 0.92, 0.1], num_examples=100, num_classes=10)
    assert all(c.passed for c in checks), evaluation.format_checks(checks)


@pytest.mark.parametrize("dlr,apgd_passes,agree_passes", [
    (0.50, True, True),    # APGD-CE is weaker than PGD, but APGD-DLR is as strong: the stronger counts.
    (0.44, True, False),   # DLR finds 6 points more than cross-entropy PGD: more than the 5-point slack.
    (0.55, False, True),   # Both APGD losses weaker than PGD.
])
def test_apgd_checks_use_the_stronger_loss_and_flag_a_loss_gap(dlr, apgd_passes, agree_passes):
    checks = evaluation.sanity_checks(
        clean_accuracy=0.9, attack_accuracies={"fgsm": 0.6, "pgd": 0.5, "apgd": 0.55, "apgd_dlr": dlr},
        eps_grid=[0.0, 0.1, 1.0], sweep_accuracies=[0.9, 0.5, 0.1], num_examples=100, num_classes=10)
    by_name = {c.name: c for c in checks}
    assert by_name["apgd_not_weaker_than_pgd"].passed == apgd_passes
    assert by_name["ce_and_dlr_agree"].passed == agree_passes
    assert f"apgd_dlr {100 * dlr:.2f} %" in by_name["apgd_not_weaker_than_pgd"].detail


@pytest.mark.parametrize("kwargs,message", [
    (dict(attacks={"clean": DETERMINISTIC["fgsm"]}), "attacks['clean']"),
    (dict(attacks={"fgsm": "fgsm"}), "attacks['fgsm']"),
    (dict(attacks=DETERMINISTIC, key=None), "key=None"),
    (dict(labels=np.zeros(3, np.int32)), "labels"),
    (dict(labels=np.zeros(NUM_TEST, np.float32)), "integers"),
])
def test_evaluate_rejects_bad_input(trained, kwargs, message):
    _, variables, images, labels = trained

    def never_called(*args):
        raise AssertionError("model_fn must not run on invalid input")

    arguments = dict(images=images, labels=labels, attacks=DETERMINISTIC, key=fast_key(0))
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        evaluation.Evaluator(never_called).evaluate(variables, {}, **arguments)
    with pytest.raises(ValueError, match="batch_size=0"):
        evaluation.Evaluator(never_called, batch_size=0)


def test_sweep_and_sanity_inputs_are_validated(trained):
    _, variables, images, labels = trained
    apgd = attacks.make_attack("apgd", eps=0.1, num_steps=3)
    ev = evaluator(trained)
    with pytest.raises(ValueError, match="eps_grid"):
        ev.sweep(variables, {}, images, labels, apgd, [0.1, -0.1], fast_key(0))
    with pytest.raises(ValueError, match="step_size_ratio"):
        ev.sweep(variables, {}, images, labels, apgd, [0.1], fast_key(0), step_size_ratio=0.25)
    with pytest.raises(ValueError, match="eps_grid"):
        evaluation.sanity_checks(clean_accuracy=1.0, attack_accuracies={"fgsm": 1, "pgd": 1, "apgd": 1},
                                 eps_grid=[0.1, 0.2], sweep_accuracies=[1.0, 1.0], num_examples=10,
                                 num_classes=2)
    with pytest.raises(ValueError, match="attacks lacks"):
        evaluation.run_sanity_checks(ev, variables, {}, images, labels, fast_key(0), eps=0.1,
                                     attacks={"pgd": apgd})


def test_without_adversarial_loss_only_images_correct_clean_are_attacked(trained):
    """adversarial_loss=False: the attack's program sees only the images correct clean
    (compacted: its traced batch is the count of those, not the dataset), the others count as
    not robust, the result says so, and per image the verdict is the full run's (a
    deterministic attack, so keys and batching do not matter)."""
    model_fn, variables, images, labels = trained
    labels = labels.copy()
    labels[::3] = (labels[::3] + 1) % 2  # A third of the images wrong clean.
    traced = []

    def counting_model_fn(params, state, z, train):
        traced.append(z.shape[0])
        return model_fn(params, state, z, train)

    ev = evaluation.Evaluator(counting_model_fn, batch_size=len(images))
    full = ev.per_example(variables, {}, images, labels, DETERMINISTIC, fast_key(0))
    clean = full["clean"].correct
    traced.clear()
    skipped = ev.per_example(variables, {}, images, labels, DETERMINISTIC, fast_key(0),
                             adversarial_loss=False)
    assert 0.4 < clean.mean() < 0.8
    assert max(traced) < len(images) and max(traced) <= clean.sum()  # never the whole dataset
    for name in DETERMINISTIC:
        np.testing.assert_array_equal(skipped[name].correct, full[name].correct & clean)
        assert skipped[name].attacked == "clean_correct" and full[name].attacked == "all"
        assert np.all(np.isnan(skipped[name].loss))
    summary = ev.evaluate(variables, {}, images, labels, DETERMINISTIC, fast_key(0),
                          adversarial_loss=False)
    assert "pgd_loss" not in summary and summary["pgd_attacked_clean_correct_only"] == 1.0
    assert summary["pgd_accuracy"] == pytest.approx((full["pgd"].correct & clean).mean())


def test_randomness_warning_fires_with_dropout_left_on_and_not_on_a_deterministic_model(trained):
    """Dropout on the inputs left on at evaluation (a fixed key, so the same batch gives the
    same output, but an image's mask depends on its position): the check fires; the plain
    model passes."""
    model_fn, variables, images, _ = trained

    def dropout_on(params, state, z, train):
        keep = jax.random.bernoulli(jax.random.key(0), 0.5, z.shape)
        return model_fn(params, state, z * keep / 0.5, train)

    honest = evaluation.randomness_check(evaluator(trained), variables, {}, images)
    noisy = evaluation.randomness_check(evaluation.Evaluator(dropout_on, batch_size=NUM_TEST),
                                        variables, {}, images)
    assert honest.passed and honest.name == "deterministic_at_evaluation"
    assert not noisy.passed and "randomised" in noisy.detail


def test_zero_gradient_warning_fires_on_a_model_that_rounds_its_input(trained):
    model_fn, variables, images, labels = trained
    rounding = lambda params, state, z, train: model_fn(params, state, jnp.round(z * 4) / 4, train)
    honest = evaluation.zero_gradient_check(evaluator(trained), variables, {}, images, labels)
    masked = evaluation.zero_gradient_check(
        evaluation.Evaluator(rounding, batch_size=NUM_TEST), variables, {}, images, labels)
    assert honest.passed and honest.name == "few_zero_gradients"
    assert not masked.passed and f"{NUM_TEST} of {NUM_TEST} images" in masked.detail
