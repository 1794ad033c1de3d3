"""Tests for dmp_model.tasks.palettes: ADE20K data, sRGB -> Lab, snapping, painting, names and masks."""

import pytest
import torch

from dmp_model.tasks import palettes
from dmp_model.tasks.palettes import (
    ADE20K_CLASSES,
    BEDROOM_CLASS_IDS,
    PALETTES,
    class_ids,
    class_masks,
    paint,
    palette,
    snap_to_palette,
    srgb_to_lab,
)

GREY_DUPLICATE = (6, 48)  # both palettes repeat (140, 140, 140) at these ids


def _random_ids(shape, seed=0):
    return torch.randint(0, 150, shape, generator=torch.Generator().manual_seed(seed))


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _near_ties(rgb, name="dmp", margin=0.1):
    """Pixels [B, H, W] whose two nearest palette colours lie within `margin` (squared Lab distance, in
    float64) of each other: float32 rounding, which varies with batch shape and SIMD path, may pick either.
    The rounding of the float32 distances is ~1e-3 (|p|^2 up to ~1e4, times 1e-7), so 0.1 is ample."""
    lab = srgb_to_lab(rgb.double().clamp(0, 1).reshape(-1, 3))
    colours = srgb_to_lab(palette(name).unique(dim=0).double() / 255)
    nearest = torch.cdist(lab, colours).square().topk(2, dim=1, largest=False).values
    return (nearest[:, 1] - nearest[:, 0] < margin).reshape(rgb.shape[:-1])


def test_ade20k_data():
    assert len(ADE20K_CLASSES) == 150
    assert ADE20K_CLASSES[:4] == ("wall", "building", "sky", "floor")
    assert ADE20K_CLASSES[7] == "bed"
    assert len(BEDROOM_CLASS_IDS) == 29
    assert all(0 <= i < 150 for i in BEDROOM_CLASS_IDS)


@pytest.mark.parametrize("name", PALETTES)
def test_palette_shape_and_fresh_copy(name):
    colours = palette(name)
    assert colours.shape == (150, 3) and colours.dtype == torch.uint8
    assert colours[0].tolist() == [120, 120, 120]
    assert colours[6].tolist() == colours[48].tolist() == [140, 140, 140]
    colours[0] = 0
    assert palette(name)[0].tolist() == [120, 120, 120]


def test_palettes_differ_only_on_recoloured_classes():
    differ = (palette("dmp") != palette("ade20k")).any(dim=1)
    assert int(differ.sum()) == 25
    assert bool(differ[7])  # bed is recoloured
    assert not bool(differ[0])  # wall is not


def test_palette_rejects_unknown_name():
    with pytest.raises(ValueError, match="name must be one of"):
        palette("cityscapes")


def test_srgb_to_lab_white_black_grey():
    lab = srgb_to_lab(torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.5]]))
    torch.testing.assert_close(lab[0], torch.tensor([100.0, 0.0, 0.0]), atol=1e-3, rtol=0)
    torch.testing.assert_close(lab[1], torch.tensor([0.0, 0.0, 0.0]), atol=1e-4, rtol=0)
    assert abs(float(lab[2, 0]) - 53.389) < 0.01  # sRGB 0.5 is 21.4 % luminance
    assert lab[2, 1:].abs().max() < 1e-3


def test_srgb_to_lab_primaries_match_published_values():
    # Published CIE Lab (D65) of the sRGB primaries (e.g. Bruce Lindbloom's calculator).
    rgb = torch.eye(3, dtype=torch.float64)
    expected = torch.tensor(
        [[53.2408, 80.0925, 67.2032], [87.7347, -86.1827, 83.1793], [32.2970, 79.1875, -107.8602]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(srgb_to_lab(rgb), expected, atol=0.1, rtol=0)


def test_srgb_to_lab_keeps_leading_shape():
    lab = srgb_to_lab(_rand(2, 3, 4, 3))
    assert lab.shape == (2, 3, 4, 3) and lab.dtype == torch.float32
    with pytest.raises(ValueError, match=r"\[\.\.\., 3\]"):
        srgb_to_lab(_rand(2, 4))
    with pytest.raises(TypeError, match="rgb"):
        srgb_to_lab(torch.zeros(2, 3, dtype=torch.uint8))


@pytest.mark.parametrize("name", PALETTES)
def test_snap_recovers_exact_palette_colours(name):
    ids = _random_ids((2, 32, 32))
    snapped = snap_to_palette(paint(ids, name), name)
    assert snapped.dtype == torch.int64 and snapped.shape == ids.shape
    expected = torch.where(ids == 48, torch.full_like(ids, 6), ids)  # tie -> lower id
    # Exact ids: each pixel is a palette colour (distance ~0, only rounding); the next colour is >= 7/255
    # away. The duplicate grey is one palette entry (the palette's Lab is deduplicated): no rounding tie.
    assert torch.equal(snapped, expected)


def test_snap_recovers_ids_under_small_colour_noise():
    ids = _random_ids((4, 64, 64), seed=1)
    generator = torch.Generator().manual_seed(2)
    expected = torch.where(ids == 48, torch.full_like(ids, 6), ids)
    for amplitude, min_accuracy in ((1, 0.995), (3, 0.975)):
        noise = (torch.rand(ids.shape + (3,), generator=generator) * 2 - 1) * amplitude / 255
        snapped = snap_to_palette(paint(ids, "dmp") + noise)
        # Lab distance is the reference's choice; a few palette colours lie ~10/255 apart
        # (e.g. (0, 0, 255) and (10, 0, 255)), so noise of 3/255 confuses ~2 % of pixels.
        assert (snapped == expected).float().mean() >= min_accuracy


def test_snap_ties_resolve_to_lower_id():
    grey = torch.full((1, 1, 1, 3), 140 / 255)
    for name in PALETTES:
        assert int(snap_to_palette(grey, name)) == GREY_DUPLICATE[0]


def test_snap_chunks_do_not_change_the_result(monkeypatch):
    generator = torch.Generator().manual_seed(3)
    rgb = torch.rand(2, 9, 11, 3, generator=generator)
    whole = snap_to_palette(rgb)
    monkeypatch.setattr(palettes, "_SNAP_CHUNK", 7)  # 198 pixels: many chunks, ragged last one
    # Other chunk shapes take other float32 paths (SIMD or scalar pow, another matrix-product blocking), so
    # a pixel all but equidistant from two colours may go either way; every other pixel must agree.
    ties = _near_ties(rgb)
    assert ties.float().mean() < 0.05  # (none at all among these pixels)
    assert ((snap_to_palette(rgb) == whole) | ties).all()


def test_snap_clamps_and_reads_nan_as_zero():
    rgb = torch.tensor([[[[1.5, 2.0, 1.2], [float("nan"), -1.0, 0.0]]]])
    expected = snap_to_palette(torch.tensor([[[[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]]]))
    assert torch.equal(snap_to_palette(rgb), expected)  # the same clamped floats in the same shape: exact


def test_snap_checks_inputs():
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        snap_to_palette(_rand(4, 4, 3))
    with pytest.raises(TypeError, match="rgb"):
        snap_to_palette(torch.zeros(1, 2, 2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="palette_name"):
        snap_to_palette(_rand(1, 2, 2, 3), "coco")


def test_paint_values():
    painted = paint(torch.tensor([[[0, 2], [7, 149]]]), "ade20k")
    assert painted.shape == (1, 2, 2, 3) and painted.dtype == torch.float32
    expected = torch.tensor([[120, 120, 120], [6, 230, 230], [204, 5, 255], [92, 0, 255]]) / 255
    torch.testing.assert_close(painted.reshape(4, 3), expected.float())
    assert not torch.equal(paint(torch.tensor([[[7]]]), "dmp"), paint(torch.tensor([[[7]]]), "ade20k"))


def test_paint_rejects_bad_ids():
    with pytest.raises(ValueError, match="0..149"):
        paint(torch.tensor([[[0, 150]]]), "ade20k")
    with pytest.raises(ValueError, match="-1"):
        paint(torch.tensor([[[-1, 3]]]), "dmp")
    with pytest.raises(TypeError, match="integer"):
        paint(torch.zeros(1, 2, 2), "dmp")
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        paint(torch.zeros(2, 2, dtype=torch.int64), "dmp")


def test_class_ids_from_names():
    assert class_ids("Bed, lamp") == [7, 36]
    assert class_ids([" WALL ", "chest  of drawers"]) == [0, 44]
    assert class_ids("bed,bed, ,floor") == [7, 3]  # duplicates and empty items dropped
    assert class_ids(("sky",)) == [2]


def test_class_ids_unknown_name_suggests_close_matches():
    with pytest.raises(ValueError, match="'beds'") as info:
        class_ids("wall, beds")
    assert "'bed'" in str(info.value) and "ADE20K_CLASSES" in str(info.value)
    with pytest.raises(ValueError, match="at least one"):
        class_ids(" , ")
    with pytest.raises(TypeError, match="names"):
        class_ids(7)


def test_class_masks():
    ids = _random_ids((2, 16, 16), seed=4)
    mask = class_masks(ids, [7, 36])
    assert mask.dtype == torch.float32 and mask.shape == ids.shape
    assert torch.equal(mask, ((ids == 7) | (ids == 36)).float())
    assert 0 < float(mask.sum()) < ids.numel()
    assert float(class_masks(ids, []).sum()) == 0
    with pytest.raises(ValueError, match="class_ids"):
        class_masks(ids, [150])
