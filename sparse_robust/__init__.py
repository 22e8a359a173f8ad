"""sparse_robust: neural networks that are both sparse and robust to adversarial examples, in JAX.

``import sparse_robust as sr`` gives every public module as an attribute, imported on first use
(so ``import sparse_robust`` itself stays fast, and a module that reads datasets is only loaded
when used): ``sr.attacks``, ``sr.masks``, ``sr.pruning``, ``sr.optim``, ``sr.objectives``,
``sr.training``, ``sr.evaluation``, ``sr.models``, ``sr.data``, ``sr.convention``, ``sr.losses``,
``sr.diagnostics``, ``sr.keys``, ``sr.parallel``. ``sr.__version__`` is the package version (the
one setup.py reads).

The model convention (one for the whole library):

- Training and evaluation take ``model_fn(params, model_state, x, train) -> (logits,
  new_model_state)``. ``model_state`` holds the non-trainable collections (batch statistics; an
  empty dict for a model without any). ``training.make_model_fn(module)`` builds it from any flax
  module (``train`` is passed only where the module's ``__call__`` takes it).
- Attacks take ``logits_fn(x) -> logits``, a model in eval mode with fixed weights.
- The one adapter between them: ``convention.as_logits_fn(model_fn, params, model_state)``.

Argument order in masks, pruning and optim: PRNG keys first (as in ``jax.random``), then params,
then the mask; optional arguments keyword-only. Attacks are called ``attack(logits_fn, x, y, key,
...)`` with a box ``[clip_min, clip_max]`` (default [0, 1]) their inputs must lie in. Changes
between versions: CHANGELOG.md.
"""

import importlib

from sparse_robust._version import __version__

# Public modules, imported lazily on first attribute access (PEP 562).
_MODULES = ("attacks", "convention", "data", "diagnostics", "evaluation", "keys", "losses",
            "masks", "models", "objectives", "optim", "parallel", "pruning", "training")

__all__ = ["__version__", *_MODULES]


def __getattr__(name):
    if name in _MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module  # Later accesses skip this hook.
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}; its public modules are "
                         f"{', '.join(_MODULES)}.")


def __dir__():
    return sorted(set(globals()) | set(_MODULES))
