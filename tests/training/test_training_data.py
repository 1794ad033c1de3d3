"""Training data: pairing, target kinds per task, resize/flip rules, the sample order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dmp_model.io.writers import exr_available, write_depth_png16, write_exr
from dmp_model.tasks.palettes import palette
from training.config import TrainConfig
from training.data import (
    DataError,
    PairDataset,
    SamplePlan,
    TargetKindError,
    check_pairs,
    find_pairs,
    fit_target,
    flip_target,
    read_captions,
    read_target,
)


def config(tmp_path: Path, **changes) -> TrainConfig:
    values = dict(base=str(tmp_path), train_images=str(tmp_path / "images"),
                  train_targets=str(tmp_path / "targets"), resolution=16)
    values.update(changes)
    return TrainConfig(**values)


def write_rgb(path: Path, size=(16, 16), value=128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value // 2, 255 - value)).save(path)
    return path


def test_pairs_match_by_relative_stem_and_report_the_rest(tmp_path):
    for name in ("a", "b", "sub/c", "lonely"):
        write_rgb(tmp_path / "images" / f"{name}.png")
    for name in ("a", "b", "sub/c", "orphan"):
        (tmp_path / "targets" / name).parent.mkdir(parents=True, exist_ok=True)
        np.save(tmp_path / "targets" / f"{name}.npy", np.ones((16, 16), np.float32))
    pairs, problems = find_pairs(tmp_path / "images", tmp_path / "targets", "depth")
    assert [p.name for p in pairs] == ["a", "b", "sub/c"]
    assert any("lonely" in p and "without a target" in p for p in problems)
    assert any("orphan" in p and "without an image" in p for p in problems)


def test_empty_and_unmatched_folders_are_errors(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "targets").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        find_pairs(tmp_path / "images", tmp_path / "targets", "depth")
    write_rgb(tmp_path / "images" / "x.png")
    with pytest.raises(DataError, match="holds no depth targets"):
        find_pairs(tmp_path / "images", tmp_path / "targets", "depth")
    np.save(tmp_path / "targets" / "y.npy", np.ones((4, 4), np.float32))
    with pytest.raises(DataError, match="no train image has a target of the same name"):
        find_pairs(tmp_path / "images", tmp_path / "targets", "depth")
    with pytest.raises(DataError, match="not found"):
        find_pairs(tmp_path / "missing", tmp_path / "targets", "depth")


def test_wrong_kind_of_target_is_an_error_naming_files(tmp_path):
    write_rgb(tmp_path / "images" / "a.png")
    write_rgb(tmp_path / "targets" / "a.png")  # an 8-bit RGB image is not depth
    pairs, _ = find_pairs(tmp_path / "images", tmp_path / "targets", "depth")
    with pytest.raises(DataError, match=r"not depth targets.*a\.png.*16-bit"):
        check_pairs(pairs, config(tmp_path))


def test_unreadable_and_mismatched_pairs_are_skipped_by_name(tmp_path):
    for name in ("good", "broken", "wide"):
        write_rgb(tmp_path / "images" / f"{name}.png")
    (tmp_path / "targets").mkdir()
    np.save(tmp_path / "targets" / "good.npy", np.full((32, 32), 2.0, np.float32))  # same aspect: fine
    (tmp_path / "targets" / "broken.npy").write_bytes(b"not an array")
    np.save(tmp_path / "targets" / "wide.npy", np.ones((16, 40), np.float32))
    pairs, _ = find_pairs(tmp_path / "images", tmp_path / "targets", "depth")
    usable, problems = check_pairs(pairs, config(tmp_path))
    assert [p.name for p in usable] == ["good"]
    assert any(p.startswith("broken: unreadable") for p in problems)
    assert any(p.startswith("wide:") and "aspect" in p for p in problems)


def test_depth_formats(tmp_path):
    cfg = config(tmp_path)
    depth = np.linspace(0.5, 6, 64, dtype=np.float32).reshape(8, 8)
    np.save(tmp_path / "d.npy", depth)
    np.savez(tmp_path / "d.npz", x=depth, other=depth * 2)
    np.savez(tmp_path / "single.npz", depth)
    write_depth_png16(tmp_path / "d16.png", depth)  # millimetres, with its scale stored
    # Rounded to whole millimetres (0.5 mm at most; truncating would lose up to 1 mm, the whole tolerance).
    Image.fromarray(np.round(depth * 1000).astype(np.uint16)).save(tmp_path / "raw16.png")
    for name in ("d.npy", "d.npz", "single.npz"):  # float32 files read back: exact
        assert torch.equal(read_target(tmp_path / name, "depth", cfg), torch.from_numpy(depth))
    torch.testing.assert_close(read_target(tmp_path / "d16.png", "depth", cfg), torch.from_numpy(depth),
                               atol=1e-3, rtol=0)  # millimetres: 0.5 mm at most
    with pytest.raises(TargetKindError, match="--depth-png-scale"):
        read_target(tmp_path / "raw16.png", "depth", cfg)
    scaled = read_target(tmp_path / "raw16.png", "depth", config(tmp_path, depth_png_scale=0.001))
    torch.testing.assert_close(scaled, torch.from_numpy(depth), atol=1e-3, rtol=0)
    np.save(tmp_path / "bad.npy", np.array([[np.nan, -1.0], [np.inf, 2.0]], np.float32))
    assert read_target(tmp_path / "bad.npy", "depth", cfg).tolist() == [[0, 0], [0, 2]]


def test_normals_are_converted_to_the_adapters_convention(tmp_path):
    # A Marigold-convention wall facing the camera is (0, 0, 1); in Omnidata it is (0, 0, -1).
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[...] = (128, 128, 255)
    Image.fromarray(rgb).save(tmp_path / "n.png")
    normals = read_target(tmp_path / "n.png", "normal", config(tmp_path, normal_convention="marigold"))
    torch.testing.assert_close(normals[0, 0], torch.tensor([0.0, 0.0, -1.0]), atol=0.01, rtol=0)
    with pytest.raises(TargetKindError, match="not a normal map"):
        Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
        read_target(tmp_path / "grey.png", "normal", config(tmp_path))


def test_flipping_normals_negates_x():
    generator = torch.Generator().manual_seed(0)
    normals = torch.nn.functional.normalize(torch.randn(4, 5, 3, generator=generator), dim=-1)
    flipped = flip_target(normals, "normal")  # a mirror and a sign change: exact
    assert torch.equal(flipped[:, 0, 0], -normals[:, -1, 0])
    assert torch.equal(flipped[:, 0, 1:], normals[:, -1, 1:])
    depth = torch.rand(4, 5, generator=generator)
    assert torch.equal(flip_target(depth, "depth"), depth.flip(1))


def test_segmentation_ids_and_palette_images(tmp_path):
    ids = np.array([[0, 3], [7, 149]], np.uint8)
    Image.fromarray(ids).save(tmp_path / "ids.png")
    assert read_target(tmp_path / "ids.png", "segmentation", config(tmp_path)).tolist() == ids.tolist()
    colours = palette("ade20k")[torch.from_numpy(ids).long()].numpy().astype(np.uint8)
    Image.fromarray(colours).save(tmp_path / "colours.png")
    ade = config(tmp_path, segmentation_palette="ade20k")
    snapped = read_target(tmp_path / "colours.png", "segmentation", ade)
    assert snapped.tolist() == ids.tolist()
    with pytest.raises(TargetKindError, match="--segmentation-palette"):
        read_target(tmp_path / "colours.png", "segmentation", config(tmp_path))
    Image.fromarray(np.array([[0, 200]], np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(TargetKindError, match=r"0\.\.149"):
        read_target(tmp_path / "big.png", "segmentation", config(tmp_path))


def test_resize_rules():
    ids = torch.tensor([[1, 2], [3, 4]]).repeat_interleave(8, 0).repeat_interleave(12, 1)  # [16, 24]
    fitted = fit_target(ids, "segmentation", 8, "center")
    assert fitted.dtype == torch.int64 and fitted.shape == (8, 8)
    assert set(fitted.unique().tolist()) <= {1, 2, 3, 4}  # nearest: no invented class ids
    depth = torch.tensor([[1.0, 5.0]]).repeat_interleave(16, 0).repeat_interleave(16, 1)  # [16, 32]
    assert set(fit_target(depth, "depth", 8, "stretch").unique().tolist()) == {1.0, 5.0}
    assert fit_target(depth, "depth", 8, "center").shape == (8, 8)


def test_captions_from_metadata_jsonl_and_txt(tmp_path):
    folder = tmp_path / "images"
    write_rgb(folder / "a.png")
    write_rgb(folder / "b.png")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a bed"}) + "\n")
    (folder / "b.txt").write_text("a lamp\n")
    assert read_captions(folder) == {"a": "a bed", "b": "a lamp"}
    (folder / "metadata.jsonl").write_text("{broken\n")
    with pytest.raises(DataError, match="line 1"):
        read_captions(folder)


def test_dataset_items_are_encoded_by_the_codec(tmp_path):
    write_rgb(tmp_path / "images" / "a.png", size=(24, 16))
    (tmp_path / "targets").mkdir()
    np.save(tmp_path / "targets" / "a.npy", np.full((16, 24), 4.0, np.float32))
    cfg = config(tmp_path, resolution=8)
    pairs, _ = find_pairs(tmp_path / "images", tmp_path / "targets", "depth")
    item = PairDataset(pairs, cfg)[(0, True)]
    assert item["image"].shape == (3, 8, 8) and -1 <= item["image"].min() and item["image"].max() <= 1
    torch.testing.assert_close(item["target"], torch.zeros(3, 8, 8))  # 4 m of 8 m is mid-grey: 0 in [-1, 1]


def test_sample_plan_shards_and_resumes_without_state():
    size = 10
    ranks = [SamplePlan(size, seed=3, batch_size=2, grad_accum=2, num_processes=2, rank=r) for r in (0, 1)]
    seen = [i for step in range(5) for micro in range(2) for plan in ranks
            for i, _ in plan.batch(step, micro)]
    assert sorted(seen[:20]) == sorted(list(range(10)) * 2)  # two epochs, every sample once per epoch
    assert sorted(seen[:10]) == list(range(10))
    fresh = SamplePlan(size, seed=3, batch_size=2, grad_accum=2, num_processes=2, rank=1)
    assert fresh.batch(4, 1) == ranks[1].batch(4, 1)  # a pure function of (seed, step): resume anywhere
    assert SamplePlan(size, seed=4, batch_size=2).batch(0) != SamplePlan(size, seed=3, batch_size=2).batch(0)
    no_flips = SamplePlan(size, seed=3, batch_size=10, flip=False)
    assert not any(flip for _, flip in no_flips.batch(0))


@pytest.mark.skipif(not exr_available(), reason="needs the optional OpenEXR package")
def test_exr_depth_and_normals(tmp_path):
    depth = np.linspace(0.5, 6, 16, dtype=np.float32).reshape(4, 4)
    write_exr(tmp_path / "d.exr", depth)
    # EXR stores float32 losslessly: exact (the unit normals (0, 0, -1) are unchanged by renormalising).
    assert torch.equal(read_target(tmp_path / "d.exr", "depth", config(tmp_path)), torch.from_numpy(depth))
    normals = np.zeros((4, 4, 3), np.float32)
    normals[..., 2] = -1
    write_exr(tmp_path / "n.exr", normals)
    read = read_target(tmp_path / "n.exr", "normal", config(tmp_path))
    assert torch.equal(read, torch.from_numpy(normals))
