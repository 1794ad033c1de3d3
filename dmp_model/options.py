"""Checks of arguments, with one wording everywhere.

Every "must be one of" error of the engine, the trainer and the node pack comes from here, and so do
the integer and real-number checks (``check_int``, ``check_real``, ``check_fraction``): each error names
the argument, the bad value and what is expected the same way; ``describe_value`` is how a bad
argument is shown in the other errors.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection


def option_error(name: str, value, valid: Collection) -> ValueError:
    """The ValueError for option `name` given `value`: "<name> must be one of <valid>, got <value!r>"."""
    return ValueError(f"{name} must be one of {valid}, got {value!r}")


def check_option(name: str, value, valid: Collection) -> None:
    """Raise ``option_error`` unless `value` is one of `valid` (a tuple, shown as written)."""
    if value not in valid:
        raise option_error(name, value, valid)


def describe_value(value: object) -> str:
    """Short description of a bad argument for error messages (a tensor by dtype and shape)."""
    import torch  # here, so that option checks need no torch

    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"[:120]


def _expected(kind: str, low, high, low_open: bool, high_open: bool) -> str:
    """'an integer in [1, 1000]', 'a number > 0', 'an integer >= 0'... for error messages."""
    if low is not None and high is not None:
        return f"{kind} in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{kind} {'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{kind} {'<' if high_open else '<='} {high}"
    return kind


def _check_range(name: str, value, expected: str, low, high, low_open: bool, high_open: bool) -> None:
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def check_int(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int; a TypeError unless an integer (bools are not), a ValueError outside [low, high]."""
    expected = _expected("an integer", low, high, False, False)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {expected}, got {describe_value(value)}")
    _check_range(name, value, expected, low, high, False, False)
    return int(value)


def check_real(name: str, value, low: float | None = None, high: float | None = None, *,
               low_open: bool = False, high_open: bool = False) -> float:
    """`value` as a float; a TypeError unless a real number (bools are not), a ValueError unless finite and
    within the bounds (open bounds exclude themselves)."""
    expected = _expected("a finite number", low, high, low_open, high_open)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {describe_value(value)}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    _check_range(name, value, expected, low, high, low_open, high_open)
    return float(value)


def check_fraction(name: str, value, *, high_open: bool = False) -> float:
    """`value` as a float in [0, 1] (or [0, 1) with `high_open`); errors as ``check_real``."""
    return check_real(name, value, 0, 1, high_open=high_open)
