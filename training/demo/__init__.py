"""`dmp demo`: DMP's claim tested on a procedural miniature world, on a CPU, in a few minutes.

``world`` renders the labelled scenes, ``prior`` pre-trains and caches the tiny SD-shaped model the
adapters start from, ``run`` trains the adapters with the trainer, scores them and writes the results.

``run_demo`` and ``DemoSettings`` are loaded from ``run`` on first use, so that
``python -m training.demo.prior`` (the process that finishes the prior) does not find its own module
already imported by this package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .run import DemoSettings, run_demo

__all__ = ["DemoSettings", "run_demo"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module(".run", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
