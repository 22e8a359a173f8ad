"""Argument checks shared by the library: each error names the argument, its value and what is
allowed, before any compute starts."""

import numbers
from typing import Any, Collection


def check_choice(name: str, value: Any, allowed: Collection) -> None:
    """Raises ValueError unless `value` is one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is invalid; allowed values: {tuple(allowed)}.")


def check_int(name: str, value: Any, minimum: int) -> None:
    """Raises ValueError unless `value` is an integer (not a bool) >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid; allowed values: integers >= {minimum}.")


def check_positive_int(name: str, value: Any) -> None:
    """Raises ValueError unless `value` is an integer >= 1."""
    check_int(name, value, 1)
