"""Command lines the tests run: `dmp predict` and `dmp train` on the tiny base, written once."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def predict_argv(base, inputs: Iterable, output, adapters: Iterable, *extra: str) -> list[str]:
    """`dmp predict` of `inputs` with `adapters` on the CPU in fp32, the cache beside `output`; `extra` flags."""
    argv = ["predict", *map(str, inputs), "--base", str(base), "-o", str(output), "--device", "cpu",
            "--precision", "fp32", "--cache-dir", str(Path(output).parent / "cache"), *extra]
    for adapter in adapters:
        argv += ["--adapter", str(adapter)]
    return argv


def train_argv(base, world: Path, output, *extra: str) -> list[str]:
    """`dmp train` flags (after "train") for depth on a miniature world: 32 px, batch 2, rank 2, two pairs
    held out, validation only where `extra` asks for it (--val-every); `extra` flags appended."""
    return ["--base", str(base), "--train-images", str(world / "images"), "--train-targets", str(world / "depth"),
            "--output-dir", str(output), "--resolution", "32", "--batch-size", "2", "--val-every", "0",
            "--val-split", "2", "--val-steps", "1", "--rank", "2", *extra]
