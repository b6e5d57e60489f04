"""The type checks that settings share: a number or an integer, never a bool (True is an int to
Python, and `true` a value to a config), numpy's too. model.py and attention.py, which import
only torch, keep their own."""

from __future__ import annotations

import math
import numbers
from typing import Any


def is_number(value: Any) -> bool:
    """Whether value is a finite real number, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def is_integer(value: Any) -> bool:
    """Whether value is an integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_integer(key: str, value: Any, minimum: int = 0, none: bool = False) -> Any:
    """value, if it is an integer >= minimum (or None, meaning all, where none allows it); else
    a ValueError naming key=value and what is valid."""
    if (value is None and none) or (is_integer(value) and value >= minimum):
        return value
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    raise ValueError(f"{key}={value!r} is invalid: must be {what}" + (", or null for all" * none))
