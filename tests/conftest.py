"""Shared fixtures: tiny SD 1.x models built in code, never anything from the network."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# Tiny models gain nothing from threads, and OpenMP threads on a busy 2-core machine spin-wait
# for each other (a 30 ms UNet call took 6 s): one thread keeps the suite fast and steady.
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
# Helpers the tests, benchmarks and the e2e import (factories, stand-ins, ComfyUI stubs) live in support/.
SUPPORT = ROOT / "tests" / "support"
for path in (ROOT, ROOT / "tests", SUPPORT):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from factories import write_official_adapter  # noqa: E402


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny SD 1.x diffusers folder (with a character-level tokenizer)."""
    from dmp_model.sd.tiny import save_tiny_sd

    return save_tiny_sd(tmp_path_factory.mktemp("tiny") / "base", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_base):
    """A DMPModel on the tiny base with a depth and a normal adapter (official layout). Do not mutate."""
    from dmp_model import DMPModel

    model = DMPModel.from_pretrained(tiny_base, device="cpu", precision="fp32")
    folder = tiny_base.parent / "adapters"
    model.load_adapter(write_official_adapter(model.unet, folder / "depth-test-notext", seed=1))
    model.load_adapter(write_official_adapter(model.unet, folder / "normal-test-notext", seed=2))
    return model
