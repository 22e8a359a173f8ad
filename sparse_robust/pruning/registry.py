"""The method registry: every pruning method's name, its library module and its branch module.

A leaf: it imports nothing of the library or the engine at import time. Modules are named by their
dotted path and imported only when asked for (``library``, ``branch``), so the engine's schema,
its context and its branches can all read this table without importing one another.

Adding a method is one library file (``sparse_robust/pruning/NAME.py``: pure functions), one
``Method`` entry below, and, where the method needs its own place in a run, one branch file
(``sparse_robust/runs/branches/NAME.py`` defining ``BRANCH``). Nothing else changes: the config
schema, ``--help``, the pipeline and the report list what this table lists.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType
from typing import Any, Optional


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    doc: str
    library: str                  # dotted path of the module holding its library functions
    branch: Optional[str] = None  # dotted path of the module defining its ``BRANCH``, if it has one

    def load_library(self) -> ModuleType:
        """The module of the method's library functions (imported on first use)."""
        return importlib.import_module(self.library)

    def load_branch(self) -> Any:
        """The method's ``Branch`` (ValueError for methods without a branch, e.g. the chain)."""
        if self.branch is None:
            raise ValueError(f"Method {self.name!r} has no branch; methods with one: "
                             f"{list(branch_names())}.")
        return importlib.import_module(self.branch).BRANCH


_LIB = "sparse_robust.pruning"
_BRANCHES = "sparse_robust.runs.branches"
_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the table (ValueError if its name is taken). Returns it."""
    if method.name in _METHODS:
        raise ValueError(f"A pruning method named {method.name!r} is already registered; "
                         "choose another name.")
    _METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method (for tests that register a toy one)."""
    _METHODS.pop(name, None)


def get(name: str) -> Method:
    """The method registered as ``name`` (ValueError naming the registered ones otherwise)."""
    if name not in _METHODS:
        raise ValueError(f"Unknown pruning method {name!r}; registered: {list(_METHODS)}.")
    return _METHODS[name]


def names() -> tuple[str, ...]:
    """Every registered method, in registration order."""
    return tuple(_METHODS)


def branch_names() -> tuple[str, ...]:
    """The methods that run as branches beside the pruning chain."""
    return tuple(name for name, m in _METHODS.items() if m.branch is not None)


# The pruning chain itself (iterative magnitude pruning with resets: the lottery ticket).
register(Method("lottery", "Iterative magnitude pruning with rewinding (the chain).",
                f"{_LIB}.criteria"))
register(Method("inherit", "One-shot magnitude pruning of the trained dense network, fine-tuned.",
                f"{_LIB}.criteria", f"{_BRANCHES}.inherit"))
register(Method("reinit", "The one-shot mask, fine-tuned from a fresh initialisation.",
                f"{_LIB}.criteria", f"{_BRANCHES}.reinit"))
register(Method("random", "A random mask of the same per-layer counts, fine-tuned.",
                f"{_LIB}.criteria", f"{_BRANCHES}.random"))
register(Method("hydra", "HYDRA (Sehwag et al. 2020): trained scores, then fine-tuning.",
                f"{_LIB}.hydra", f"{_BRANCHES}.hydra"))
register(Method("harp", "HARP (Zhao & Wressnegger 2023): learned scores and per-layer rates.",
                f"{_LIB}.harp", f"{_BRANCHES}.harp"))
register(Method("radmm", "RADMM (Ye et al. 2019): adversarial ADMM training, hard pruning.",
                f"{_LIB}.radmm", f"{_BRANCHES}.radmm"))
register(Method("inverse_inheritance",
                "Inverse weights inheritance (Wang et al.): a sparse network's weights in a "
                "wider one.", f"{_LIB}.inheritance", f"{_BRANCHES}.inverse_inheritance"))
register(Method("scratch_large", "The wider network of inverse inheritance, from scratch.",
                f"{_LIB}.inheritance", f"{_BRANCHES}.scratch_large"))
