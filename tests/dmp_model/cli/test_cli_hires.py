"""`dmp predict --tile --ensemble flip --uncertainty`: files, sizes, resuming, bad flags."""

from __future__ import annotations

import logging

import numpy as np
from diffusers import UNet2DConditionModel
from PIL import Image

from cli_args import predict_argv
from dmp_model.cli import main as cli
from factories import write_official_adapter

SIZES = {"odd.png": (41, 57), "wide.png": (40, 64)}


def test_tiled_flip_ensemble_writes_uncertainty_at_the_input_size(tiny_base, tmp_path, caplog):
    unet = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet")
    adapters = [write_official_adapter(unet, tmp_path / name, seed=seed, scale=0.3)
                for seed, name in ((60, "depth-h-notext"), (61, "seg-h-notext"))]
    (tmp_path / "images").mkdir()
    for i, (name, (height, width)) in enumerate(SIZES.items()):
        pixels = (np.random.default_rng(i).random((height, width, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / "images" / name)
    argv = predict_argv(tiny_base, [tmp_path / "images"], tmp_path / "out", adapters, "--steps", "1",
                        "--processing-resolution", "24", "--tile", "--ensemble", "flip", "--uncertainty")
    with caplog.at_level(logging.INFO, logger="dmp"):
        assert cli.main(argv) == 0
    for adapter in ("depth-h-notext", "seg-h-notext"):
        for name, (height, width) in SIZES.items():
            stem = tmp_path / "out" / adapter / name.removesuffix(".png")
            raw = np.load(f"{stem}.npy")
            uncertainty = np.load(f"{stem}_uncertainty.npy")
            assert raw.shape == (height, width) and uncertainty.shape == (height, width)
            # >= 0 exactly, not by rounding luck: a square root (depth), a vote share 1 - k / M (classes), and
            # tiles blended with non-negative weights.
            assert uncertainty.dtype == np.float32 and np.isfinite(uncertainty).all() and uncertainty.min() >= 0
            with Image.open(f"{stem}_uncertainty.png") as preview:
                assert preview.size == (width, height)
    ids = np.load(tmp_path / "out" / "seg-h-notext" / "odd.npy")
    assert ids.min() >= 0 and ids.max() < 150
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dmp"):
        assert cli.main(argv) == 0  # everything there, uncertainty files included: nothing recomputed
    assert "0 written, 2 skipped" in caplog.text


def test_uncertainty_without_an_ensemble_and_small_tiles_exit_2(tiny_base, tmp_path, caplog):
    (tmp_path / "a.png").write_bytes(b"")
    base = ["predict", str(tmp_path / "a.png"), "--base", str(tiny_base), "--adapter", str(tmp_path)]
    for extra, message in ((["--uncertainty"], "--uncertainty needs --ensemble flip"),
                           (["--tile", "--tile-size", "256"], "tile_size must be 0 or at least the processing_res")):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dmp"):
            assert cli.main(base + extra) == 2
        assert message in caplog.text
