"""One set of names and rules: the attack names of the configs and AutoAttack's stages, one
ε-override rule for Attack and Evaluator.sweep, one key for clean accuracy, one argument order."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_robust import attacks, evaluation, masks, pruning
from experiments.configs import base

W = jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)), jnp.float32)


def logits_fn(x):
    return x @ W


def model_fn(params, model_state, x, train):
    return x @ params["w"], model_state


def _data(n=16):
    rng = np.random.default_rng(1)
    return rng.uniform(size=(n, 6)).astype(np.float32), rng.integers(0, 4, n).astype(np.int32)


# Config labels that are attack names (pgd40 is a label for PGD with other settings).
CONFIG_ATTACKS = {label: {k: v for k, v in settings.items() if k != "name"}
                  for label, settings in base.get_config().attacks.to_dict().items()
                  if label != "pgd40"}
STAGES = {stage: dict(eps=0.1, **({"num_steps": 5} if stage.startswith("apgd") else {}))
          for stage in attacks.AUTOATTACK_STAGES}


@pytest.mark.parametrize("name", sorted({**STAGES, **CONFIG_ATTACKS}))
def test_make_attack_takes_every_stage_name_and_config_label(name):
    """Every config label that names an attack, and every AutoAttack stage name, builds it."""
    attack = attacks.make_attack(name, **{**STAGES, **CONFIG_ATTACKS}[name])
    assert attack.name in attacks.ATTACK_NAMES


def test_aliases_fix_their_setting():
    assert attacks.make_attack("apgd_dlr", eps=0.1, num_steps=5) == \
        attacks.make_attack("apgd", eps=0.1, num_steps=5, loss="dlr")
    assert attacks.make_attack("apgd_ce", eps=0.1, num_steps=5, loss="ce") == \
        attacks.make_attack("apgd", eps=0.1, num_steps=5)
    with pytest.raises(ValueError) as err:
        attacks.make_attack("apgd_ce", eps=0.1, num_steps=5, loss="dlr")
    assert str(err.value) == ("loss='dlr' is invalid for 'apgd_ce', which fixes loss='ce'; use "
                              "name='apgd' to choose it.")


def test_the_eps_override_scales_the_step_size():
    """attack(eps=e) is the attack built at ε = e with the step scaled by e / ε."""
    x, y = _data()
    pgd = attacks.make_attack("pgd", eps=0.1, step_size=0.04, num_steps=3, random_start=False)
    for eps in (0.05, 0.3):
        rebuilt = attacks.make_attack("pgd", eps=eps, step_size=0.04 * (eps / 0.1), num_steps=3,
                                      random_start=False)
        np.testing.assert_array_equal(pgd(logits_fn, x, y, None, eps=eps),
                                      rebuilt(logits_fn, x, y, None))
    # An explicit step size wins; an attack stored at ε = 0 has no ratio to scale.
    np.testing.assert_array_equal(
        pgd(logits_fn, x, y, None, eps=0.3, step_size=0.04),
        attacks.make_attack("pgd", eps=0.3, step_size=0.04, num_steps=3,
                            random_start=False)(logits_fn, x, y, None))
    zero = attacks.make_attack("pgd", eps=0.0, step_size=0.0, num_steps=3, random_start=False)
    with pytest.raises(ValueError, match="needs step_size= for attack 'pgd' stored with eps=0"):
        zero(logits_fn, x, y, None, eps=0.1)


def test_sweep_follows_the_same_rule_as_the_attack():
    x, y = _data(32)
    pgd = attacks.make_attack("pgd", eps=0.1, step_size=0.04, num_steps=3, random_start=False)
    grid = np.array([0.0, 0.05, 0.2], np.float32)
    swept = evaluation.Evaluator(model_fn, batch_size=32).sweep(
        {"w": W}, {}, x, y, pgd, grid, jax.random.key(0))
    for eps, accuracy in zip(grid, swept):
        x_adv = jax.jit(lambda e: pgd(logits_fn, x, y, None, eps=e))(eps)
        direct = np.mean(np.argmax(np.asarray(logits_fn(x_adv)), -1) == y)
        assert abs(accuracy - direct) <= 1 / len(y) + 1e-9  # float rounding may flip one image


def test_clean_accuracy_has_the_summary_key():
    x, y = _data()
    results = evaluation.Evaluator(model_fn).evaluate({"w": W}, {}, x, y)
    assert set(results) == {"clean_accuracy", "clean_loss"}
    assert results["clean_accuracy"] == np.mean(np.argmax(np.asarray(logits_fn(x)), -1) == y)


def _parameters(fn):
    return list(inspect.signature(fn).parameters)


def test_one_argument_order_keys_first_then_params_then_mask():
    functions = [masks.apply_mask, masks.check_mask, masks.mask_from_numpy, pruning.prune_by,
                 pruning.magnitude_prune, pruning.random_prune, pruning.reset, pruning.prune]
    for fn in functions:
        names = _parameters(fn)
        if "key" in names:
            assert names[0] == "key", fn.__name__
        params_like = [n for n in ("params", "scores", "sources") if n in names]
        if params_like and "mask" in names:
            assert names.index(params_like[0]) < names.index("mask"), fn.__name__
    table = inspect.signature(masks.summary_table).parameters["params"]
    assert table.kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("name", attacks.ATTACK_NAMES)
def test_every_attack_takes_a_required_positional_key(name):
    fn = getattr(attacks, name) if name != "autoattack" else attacks.autoattack
    names = _parameters(fn)
    assert names[:4] == ["logits_fn", "x", "y", "key"]
    assert inspect.signature(fn).parameters["key"].default is inspect.Parameter.empty
