"""`dmp predict --export-3d`: one asset per image beside the other outputs, re-read independently; bad flags."""

from __future__ import annotations

import logging
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from diffusers import UNet2DConditionModel
from PIL import Image

from asset_readers import Glb, read_ply
from cli_args import predict_argv
from dmp_model.cli import main as cli
from dmp_model.geometry.camera import grid_indices
from factories import write_official_adapter

pytest.importorskip("trimesh")

IMAGES = {"a.png": (16, 24), "b.png": (24, 16), "sub/c.png": (12, 12)}
WIDE = {"odd.png": (41, 57)}


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory) -> dict[str, Path]:
    unet = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet")
    folder = tmp_path_factory.mktemp("asset-adapters")
    return {name: write_official_adapter(unet, folder / name, seed=seed, scale=0.3)
            for seed, name in enumerate(("depth-a-notext", "normal-b-notext"), start=70)}


def write_images(folder: Path, images: dict) -> Path:
    for i, (name, (height, width)) in enumerate(images.items()):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        pixels = (np.random.default_rng(i).random((height, width, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / name)
    return folder


def run(caplog, argv) -> tuple[int, str]:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dmp"):
        code = cli.main(argv)
    return code, "\n".join(r.getMessage() for r in caplog.records)


def expected_points(depth: np.ndarray, rows: np.ndarray, cols: np.ndarray, hfov: float) -> np.ndarray:
    """glTF points [h * w, 3] of the pixels (rows x cols), restated: x = (j + 0.5 - W/2) / f * z, y and z negated."""
    height, width = depth.shape
    f = width / 2 / math.tan(math.radians(hfov) / 2)
    z = depth[np.ix_(rows, cols)].astype(np.float64)
    x = (cols[None, :] + 0.5 - width / 2) / f * z
    y = (rows[:, None] + 0.5 - height / 2) / f * z
    return np.stack([x, -y, -z], -1).reshape(-1, 3)


def test_glb_meshes_are_written_beside_the_outputs_and_read_back_with_the_expected_counts(
        tiny_base, adapters, tmp_path, caplog):
    images, out = write_images(tmp_path / "images", IMAGES), tmp_path / "out"
    # A discontinuity no depth jump reaches keeps every triangle of valid depth: the counts are exact.
    argv = predict_argv(tiny_base, [images], out, adapters.values(), "--processing-resolution", "0", "--steps", "2",
                        "--export-3d", "glb", "--hfov", "70", "--discontinuity", "1e6")
    assert run(caplog, argv)[0] == 0
    assert sorted(str(p.relative_to(out / "3d")) for p in (out / "3d").rglob("*") if p.is_file()) == [
        "a.glb", "b.glb", "sub/c.glb"]
    for name, (height, width) in IMAGES.items():
        stem = Path(name).with_suffix("")
        depth = np.load(out / "depth-a-notext" / f"{stem}.npy")
        normals = np.load(out / "normal-b-notext" / f"{stem}.npy")
        assert (depth > 0).all() and np.isfinite(depth).all()  # so every pixel is a vertex
        glb = Glb(out / "3d" / f"{stem}.glb")
        ((part, primitive),) = glb.primitives()
        positions = glb.accessor(primitive["attributes"]["POSITION"])
        faces = glb.accessor(primitive["indices"]).reshape(-1, 3)
        assert part == "mesh" and len(positions) == height * width and len(faces) == 2 * (height - 1) * (width - 1)
        np.testing.assert_allclose(positions, expected_points(depth, np.arange(height), np.arange(width), 70.0),
                                   rtol=1e-5, atol=1e-6 * depth.max())
        # DMP's normals (Omnidata: y down, z forward) as glTF's (y up, z toward the viewer), unit length.
        vertex_normals = glb.accessor(primitive["attributes"]["NORMAL"])
        turned = normals.reshape(-1, 3) * [1, -1, -1]
        np.testing.assert_allclose(vertex_normals, turned / np.linalg.norm(turned, axis=1, keepdims=True), atol=1e-5)
        with Image.open(images / name) as photo:  # no albedo adapter: the texture is the image itself
            np.testing.assert_array_equal(np.asarray(glb.image().convert("RGB")), np.asarray(photo.convert("RGB")))


def test_tiled_ensemble_predictions_become_a_point_cloud_within_the_budget_and_resume(
        tiny_base, adapters, tmp_path, caplog):
    images, out = write_images(tmp_path / "images", WIDE), tmp_path / "out"
    argv = predict_argv(tiny_base, [images], out, adapters.values(), "--steps", "1", "--processing-resolution", "24",
                        "--tile", "--ensemble", "flip", "--export-3d", "ply", "--vertex-budget", "300")
    assert run(caplog, argv)[0] == 0
    (height, width), = WIDE.values()
    depth = np.load(out / "depth-a-notext" / "odd.npy")
    assert depth.shape == (height, width)
    counts, vertices = read_ply(out / "3d" / "odd.ply")
    rows, cols = (t.numpy() for t in grid_indices(height, width, 300))
    valid = (depth[np.ix_(rows, cols)] > 0).reshape(-1)
    assert len(rows) * len(cols) <= 300 and counts["vertex"] == valid.sum() > 0 and counts.get("face", 0) == 0
    points = np.stack([vertices[k] for k in "xyz"], 1)
    np.testing.assert_allclose(points, expected_points(depth, rows, cols, 60.0)[valid], rtol=1e-5,
                               atol=1e-6 * depth.max())
    assert {"nx", "ny", "nz", "red", "green", "blue"} <= set(vertices.dtype.names)
    # Everything there: nothing recomputed; the asset alone missing: that image is predicted again.
    assert "0 written, 1 skipped" in run(caplog, argv)[1]
    (out / "3d" / "odd.ply").unlink()
    assert "1 written, 0 skipped" in run(caplog, argv)[1] and (out / "3d" / "odd.ply").exists()


@pytest.mark.parametrize("extra, message", [
    (["--export-3d", "glb", "--hfov", "179"], r"--hfov must be a horizontal field of view in degrees in \(1, 179\)"),
    (["--export-3d", "glb", "--hfov", "0.5"], r"--hfov must be .* got 0.5"),
    (["--export-3d", "ply", "--vertex-budget", "3"], "--vertex-budget must be an integer of at least 4"),
    (["--export-3d", "glb", "--discontinuity", "0"], "--discontinuity must be a relative depth jump > 0"),
    (["--export-3d-mode", "mesh"], "--export-3d-mode 'mesh' needs --export-3d glb or ply"),
])
def test_bad_export_flags_exit_2_before_the_model_loads(tiny_base, adapters, tmp_path, caplog, extra, message):
    images, out = write_images(tmp_path / "images", {"a.png": (8, 8)}), tmp_path / "out"
    code, text = run(caplog, predict_argv(tiny_base, [images], out, [tmp_path / "no-such-adapter"], *extra))
    assert code == 2 and re.search(message, text), text
    assert not out.exists()


def test_an_export_without_a_depth_adapter_exits_2_and_writes_nothing(tiny_base, adapters, tmp_path, caplog):
    images, out = write_images(tmp_path / "images", {"a.png": (8, 8)}), tmp_path / "out"
    code, text = run(caplog, predict_argv(tiny_base, [images], out, [adapters["normal-b-notext"]],
                                          "--export-3d", "glb"))
    assert code == 2 and "--export-3d needs a depth adapter among the --adapter paths" in text
    assert "['normal']" in text and not out.exists()


def test_an_export_of_a_video_or_without_trimesh_exits_2_saying_why(tiny_base, adapters, tmp_path, caplog,
                                                                     monkeypatch):
    images, out = write_images(tmp_path / "images", {"a.png": (8, 8)}), tmp_path / "out"
    (images / "clip.mp4").write_bytes(b"")
    code, text = run(caplog, predict_argv(tiny_base, [images], out, adapters.values(), "--export-3d", "glb"))
    assert code == 2 and "--export-3d writes one asset per image and is not available for video inputs" in text
    (images / "clip.mp4").unlink()
    monkeypatch.setitem(sys.modules, "trimesh", None)  # import trimesh raises ImportError
    code, text = run(caplog, predict_argv(tiny_base, [images], out, adapters.values(), "--export-3d", "glb"))
    assert code == 2 and "pip install trimesh" in text and not out.exists()
