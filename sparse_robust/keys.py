"""PRNG keys derived from names.

``derive(key, "init")`` folds a stable 32-bit hash of the name (CRC-32 of its UTF-8 bytes) into
the key; integers are folded in as they are. A key therefore depends on *what it is for* (a
trial's "init", the branch "hydra", the attack "pgd"), never on the position of a name in some
tuple: reordering methods, attacks or config fields changes no random number.
"""

from __future__ import annotations

import zlib
from typing import Union

import jax

Name = Union[str, int]


def _as_int(name: Name) -> int:
    if isinstance(name, bool) or not isinstance(name, (str, int)):
        raise ValueError(f"key name {name!r} is invalid; allowed values: strings or integers >= 0.")
    if isinstance(name, str):
        return zlib.crc32(name.encode("utf-8"))
    if name < 0:
        raise ValueError(f"key name {name!r} is invalid; allowed values: integers >= 0.")
    return name


def derive(key: jax.Array, *names: Name) -> jax.Array:
    """``fold_in`` each name in turn: ``derive(k, "trial", 3, "init")``; same names, same key."""
    for name in names:
        key = jax.random.fold_in(key, _as_int(name))
    return key
