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


def check_number(name: str, value: Any, low: float, high: float = float("inf"), *,
                 low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float; ValueError unless it is a real number (not a bool) in the interval
    from `low` to `high` (open at the ends marked so)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        v = float(value)
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name}={value!r} is invalid; allowed values: a number in {interval}.")
    return float(value)
