"""Adversarial attacks as pure jittable functions, one module per family:

- `parts`: settings checks, objectives, norm-ball geometry, keeping the worst result per example;
- `pgd`: FGSM and PGD (L∞ / L2);
- `apgd`: APGD and APGD-T (Croce & Hein 2020, as the reference implementation runs them);
- `fab`: FAB-T (`fab_cpu`: its projection as one CPU kernel); `square`: the Square attack
  (`dense_prefix`: a network's first dense layer, which Square updates by window);
  `fmn`: FMN, the minimum-norm attack;
- `autoattack`: standard AutoAttack (its stages, the single-program version and the stage driver
  that attacks only the points still robust);
- `registry`: `make_attack` and the hashable `Attack` it returns.

An attack is a pure function ``(logits_fn, x, y, key, **settings) -> x_adv`` where
``logits_fn(x) -> logits`` closes over a model in eval mode (``convention.as_logits_fn`` makes
one from a ``model_fn``), ``x`` is a batch [B, ...] lying in the box [clip_min, clip_max] (a
setting, default [0, 1]; an input outside it is an error, not projected) and ``y`` holds integer
labels [B]. ``key`` is positional in every attack (None only where the attack draws nothing). ``eps`` and ``step_size`` may
be traced values (so ``jax.vmap`` over an ε grid compiles once); every other setting is a static
Python value, validated before anything is traced. The result always lies in the ε-ball around
``x`` (L∞ or L2) and in [clip_min, clip_max], and is returned under ``lax.stop_gradient``.

``make_attack(name, **settings)`` bundles validated settings into a hashable `Attack`, callable as
``attack(logits_fn, x, y, key, *, eps=None, step_size=None)``.

The package exports the attack functions under their names, so ``attacks.square`` and
``attacks.autoattack`` are the functions; import the modules of those two names with
``from sparse_robust.attacks.square import ...`` / ``from sparse_robust.attacks.autoattack import
...``.
"""

from sparse_robust.attacks import parts
from sparse_robust.attacks.apgd import apgd, apgd_checkpoints, apgd_t
from sparse_robust.attacks.autoattack import (AUTOATTACK_STAGES, autoattack, autoattack_stages,
                                              autoattack_with_flags)
from sparse_robust.attacks.fab import fab_t
from sparse_robust.attacks.fmn import fmn, fmn_min_norm
from sparse_robust.attacks.parts import NORMS, LogitsFn
from sparse_robust.attacks.pgd import fgsm, pgd
from sparse_robust.attacks.registry import ATTACK_NAMES, Attack, make_attack, predicted_labels
from sparse_robust.attacks.square import square, square_schedule
from sparse_robust.losses import dlr_loss, margin_parts

__all__ = ["NORMS", "ATTACK_NAMES", "AUTOATTACK_STAGES", "Attack", "make_attack", "fgsm", "pgd",
           "apgd", "apgd_checkpoints", "apgd_t", "fab_t", "fmn", "fmn_min_norm", "square", "square_schedule", "autoattack",
           "autoattack_with_flags", "autoattack_stages", "predicted_labels", "margin_parts",
           "dlr_loss", "parts", "LogitsFn"]
