"""Tests for dmp_model.io.writers: round trips, atomic writes, validation."""

import sys

import numpy as np
import pytest
from PIL import Image

from dmp_model.io import writers
from dmp_model.io.writers import (
    exr_available,
    read_depth_png16,
    write_depth_png16,
    write_exr,
    write_npy,
    write_png8,
)


def _depth(seed=0, shape=(24, 32), high=60.0):
    return np.random.default_rng(seed).uniform(0.0, high, shape)


def _fail_after_partial_write(monkeypatch, owner, name):
    """Make owner.name write a few bytes to its file argument, then raise."""

    def fail(*args, **kwargs):
        target = next(a for a in args if hasattr(a, "write"))
        target.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(owner, name, fail)


def test_png16_millimeters_round_trip(tmp_path):
    depth = _depth()
    path = write_depth_png16(tmp_path / "depth.png", depth)
    with Image.open(path) as image:
        assert image.mode == "I;16" and image.size == (32, 24)
    back, info = read_depth_png16(path)
    assert back.dtype == np.float32 and back.shape == depth.shape
    assert info == {"encoding": "millimeters", "scale": 0.001}
    # Half a millimetre of rounding, plus the float32 result's own rounding (under one float32 ulp at 60 m).
    assert np.abs(back - depth).max() <= 0.0005 + np.spacing(np.float32(60.0))


def test_png16_millimeters_saturates_at_65_535_m(tmp_path):
    depth = np.array([[-1.0, 0.0, 65.535, 70.0]])
    back, _ = read_depth_png16(write_depth_png16(tmp_path / "d.png", depth))
    # float32 metres: 65535 mm is 65.535 within one float32 ulp (7.6e-6), not within 1e-6.
    np.testing.assert_allclose(back, [[0.0, 0.0, 65.535, 65.535]], atol=np.spacing(np.float32(65.535)), rtol=0)


def test_png16_normalized_round_trip(tmp_path):
    depth = _depth(seed=1) + 2.0
    back, info = read_depth_png16(write_depth_png16(tmp_path / "n.png", depth, "normalized"))
    assert info["encoding"] == "normalized"
    assert back.min() == 0 and back.max() == 1  # exact: (min - min) / span = 0 and span / span = 1
    assert info["min_m"] == depth.min() and info["max_m"] == depth.max()
    metres = info["min_m"] + back * (info["max_m"] - info["min_m"])
    assert np.abs(metres - depth).max() <= (depth.max() - depth.min()) / 65535


def test_png16_normalized_constant_depth(tmp_path):
    back, info = read_depth_png16(write_depth_png16(tmp_path / "c.png", np.full((4, 4), 3.0), "normalized"))
    assert np.array_equal(back, np.zeros((4, 4))) and info["min_m"] == info["max_m"] == 3.0


def test_png16_rejects_nan_wrong_ndim_and_types(tmp_path):
    depth = _depth()
    depth[3, 4] = np.nan
    with pytest.raises(ValueError, match="bad.png.*1 NaN"):
        write_depth_png16(tmp_path / "bad.png", depth)
    with pytest.raises(ValueError, match="2 dimensions"):
        write_depth_png16(tmp_path / "bad.png", np.ones((1, 4, 4)))
    with pytest.raises(ValueError, match="encoding must be one of"):
        write_depth_png16(tmp_path / "bad.png", np.ones((4, 4)), "meters")
    with pytest.raises(TypeError, match="numpy array"):
        write_depth_png16(tmp_path / "bad.png", [[1.0]])
    assert list(tmp_path.iterdir()) == []


def test_read_depth_png16_rejects_foreign_png(tmp_path):
    Image.fromarray(np.zeros((4, 4), dtype=np.uint16)).save(tmp_path / "plain.png")
    with pytest.raises(ValueError, match="depth_encoding"):
        read_depth_png16(tmp_path / "plain.png")


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    _fail_after_partial_write(monkeypatch, Image.Image, "save")
    with pytest.raises(RuntimeError, match="disk full"):
        write_depth_png16(tmp_path / "depth.png", _depth())
    with pytest.raises(RuntimeError, match="disk full"):
        write_png8(tmp_path / "preview.png", np.zeros((4, 4, 3)))
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = write_npy(tmp_path / "a.npy", np.arange(3))
    _fail_after_partial_write(monkeypatch, np, "save")
    with pytest.raises(RuntimeError):
        write_npy(path, np.arange(5))
    assert [p.name for p in tmp_path.iterdir()] == ["a.npy"]
    assert np.array_equal(np.load(path), np.arange(3))


def test_writers_create_parent_folders(tmp_path):
    path = write_png8(tmp_path / "a" / "b" / "p.png", np.zeros((2, 2, 3)))
    assert path.is_file()


def test_npy_round_trip_at_exact_path(tmp_path):
    depth = _depth().astype(np.float32)
    ids = np.arange(12, dtype=np.int64).reshape(3, 4)
    assert np.array_equal(np.load(write_npy(tmp_path / "depth.npy", depth)), depth)
    path = write_npy(tmp_path / "ids.raw", ids)
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["depth.npy", "ids.raw"]
    loaded = np.load(path)
    assert loaded.dtype == np.int64 and np.array_equal(loaded, ids)
    with pytest.raises(ValueError, match="x.npy"):
        write_npy(tmp_path / "x.npy", np.array([1.0, np.inf]))


def test_png8_round_trip(tmp_path):
    image = np.random.default_rng(2).uniform(-0.2, 1.2, (5, 6, 3))
    with Image.open(write_png8(tmp_path / "v.png", image)) as saved:
        assert saved.mode == "RGB"
        pixels = np.asarray(saved)
    # Exact by construction: the writer's own float64 formula (clip, x 255, round half to even) on the same values.
    assert np.array_equal(pixels, np.round(np.clip(image, 0, 1) * 255).astype(np.uint8))
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        write_png8(tmp_path / "v.png", np.zeros((5, 6, 4)))
    with pytest.raises(TypeError, match="float"):
        write_png8(tmp_path / "v.png", np.zeros((5, 6, 3), dtype=np.uint8))


def test_exr_missing_dependency_names_the_pip_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "OpenEXR", None)  # makes `import OpenEXR` raise ImportError
    with pytest.raises(ImportError, match="pip install openexr"):
        write_exr(tmp_path / "d.exr", np.ones((2, 2)))
    assert list(tmp_path.iterdir()) == []


def test_exr_round_trip(tmp_path):
    openexr = pytest.importorskip("OpenEXR")
    assert exr_available()
    depth = _depth().astype(np.float32)
    normals = np.random.default_rng(3).standard_normal((24, 32, 3)).astype(np.float32)
    write_exr(tmp_path / "depth.exr", depth)
    write_exr(tmp_path / "normals.exr", normals)  # channel slices are strided views: must survive
    assert sorted(p.name for p in tmp_path.iterdir()) == ["depth.exr", "normals.exr"]
    channels = openexr.File(str(tmp_path / "depth.exr"), separate_channels=True).channels()
    assert list(channels) == ["Y"] and np.array_equal(channels["Y"].pixels, depth)
    channels = openexr.File(str(tmp_path / "normals.exr"), separate_channels=True).channels()
    back = np.stack([channels[c].pixels for c in "RGB"], axis=-1)
    assert np.array_equal(back, normals)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        write_exr(tmp_path / "x.exr", np.ones((2, 2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        write_exr(tmp_path / "x.exr", np.full((2, 2), np.nan, dtype=np.float32))


def test_exr_failure_leaves_nothing(tmp_path, monkeypatch):
    openexr = pytest.importorskip("OpenEXR")

    class FailingFile:
        def __init__(self, *args):
            pass

        def write(self, path):
            with open(path, "wb") as f:
                f.write(b"partial")
            raise RuntimeError("disk full")

    monkeypatch.setattr(openexr, "File", FailingFile)
    with pytest.raises(RuntimeError, match="disk full"):
        write_exr(tmp_path / "d.exr", np.ones((2, 2), dtype=np.float32))
    assert list(tmp_path.iterdir()) == []
    assert writers.exr_available()
