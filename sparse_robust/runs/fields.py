"""Config fields: a path, a check, and one line of documentation.

A check takes the value and returns None when it is fine, or the description of what is allowed
(used both in the error message and in ``--help``). The engine's schema and each branch's own
settings are tables of `Field`s.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

Check = Callable[[Any], Optional[str]]


@dataclasses.dataclass(frozen=True)
class Field:
    path: str                 # dotted, under ``config.``
    check: Check
    allowed: str              # what the check accepts, in words
    doc: str


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def integer(minimum: int = 0, maximum: Optional[int] = None) -> tuple[Check, str]:
    allowed = f"an integer >= {minimum}" + ("" if maximum is None else f" and <= {maximum}")

    def check(value):
        ok = _is_int(value) and value >= minimum and (maximum is None or value <= maximum)
        return None if ok else allowed

    return check, allowed


def number(low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
           high_open: bool = False) -> tuple[Check, str]:
    """A finite real number in the interval (open or closed ends as given)."""
    parts = []
    if low > -math.inf:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high < math.inf:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    allowed = "a finite number" + (" " + " and ".join(parts) if parts else "")

    def check(value):
        if not _is_number(value) or not math.isfinite(value):
            return allowed
        if value < low or (low_open and value == low) or value > high or (high_open and value == high):
            return allowed
        return None

    return check, allowed


def boolean() -> tuple[Check, str]:
    return (lambda value: None if isinstance(value, bool) else "True or False"), "True or False"


def text() -> tuple[Check, str]:
    return (lambda value: None if isinstance(value, str) else "a string"), "a string"


def choice(values: Sequence) -> tuple[Check, str]:
    allowed = "one of " + ", ".join(repr(v) for v in values)
    return (lambda value: None if value in values else allowed), allowed


def comma_list(text_: str) -> list[str]:
    """"a, b,,c" -> ["a", "b", "c"]."""
    return [part.strip() for part in text_.split(",") if part.strip()]


def names(values: Sequence[str], *, allow_empty: bool, unique: bool = True) -> tuple[Check, str]:
    """A comma-separated list of names from ``values``."""
    allowed = ("" if not allow_empty else "empty, or ") + "comma-separated names from " + \
        ", ".join(values) + (" (each at most once)" if unique else "")

    def check(value):
        if not isinstance(value, str):
            return allowed
        items = comma_list(value)
        bad = (not items and not allow_empty) or any(i not in values for i in items) \
            or (unique and len(set(items)) != len(items))
        return allowed if bad else None

    return check, allowed


def field(path: str, checker: tuple[Check, str], doc: str) -> Field:
    check, allowed = checker
    return Field(path, check, allowed, doc)
