"""Argument checks shared by the library: each error names the argument, its value and what is
allowed, before any compute starts."""

import numbers
from typing import Any, Collection

import numpy as np


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
def check_labels(labels: Any, num_examples: int, name: str = "y") -> None:
    """Raises ValueError unless ``labels`` are integer class labels of shape [num_examples].

    Reads only the shape and dtype, so it works on traced arrays before any compute. One-hot
    (or soft) labels [N, classes] are named as such, with the fix.
    """
    shape, dtype = tuple(np.shape(labels)), np.dtype(labels.dtype)
    if len(shape) == 2 and shape[0] == num_examples and shape[1] > 1:
        raise ValueError(f"{name} has shape {shape}: one-hot labels? {name} must hold integer "
                         f"class labels of shape ({num_examples},); pass argmax({name}, axis=-1).")
    if shape != (num_examples,):
        raise ValueError(f"{name} has shape {shape}; it must hold one integer class label per "
                         f"example along the batch axis, shape ({num_examples},).")
    if not np.issubdtype(dtype, np.integer):
        raise ValueError(f"{name} has dtype {dtype}; class labels must be integers (e.g. "
                         f"{name}.astype(int32)).")
