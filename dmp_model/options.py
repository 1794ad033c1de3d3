"""Checks of options that take one of a fixed set of values, with one wording everywhere.

Every "must be one of" error of the engine, the trainer and the node pack comes from here, so
each names the option, the bad value and the valid values the same way; ``describe_value`` is
how a bad argument is shown in the other errors.
"""

from __future__ import annotations

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
