"""Tests for dmp_model.tasks.controlnet (depth, normal and segmentation condition maps) and dmp_model.tasks.normals."""

import itertools

import pytest
import torch

from clip_helpers import panning_clip
from dmp_model.tasks.controlnet import (
    DEPTH_CONTROL_MODES,
    depth_to_control,
    normals_to_control,
    segmentation_to_control,
)
from dmp_model.tasks.normals import NORMAL_CONVENTIONS, convert_normals, normals_to_rgb, rgb_to_normals
from dmp_model.tasks.palettes import paint

# Omnidata (OpenCV camera frame): a wall facing the camera points at it, -z; a floor points up, -y.
OMNIDATA_WALL = torch.tensor([0.0, 0.0, -1.0]).view(1, 1, 1, 3)
OMNIDATA_FLOOR = torch.tensor([0.0, -1.0, 0.0]).view(1, 1, 1, 3)


def _unit_normals(seed=0, shape=(2, 5, 7)):
    n = torch.randn(*shape, 3, generator=torch.Generator().manual_seed(seed))
    return n / n.norm(dim=-1, keepdim=True)


def test_depth_percentile_rule_on_a_ramp():
    z = torch.linspace(1.0, 11.0, 1001).view(1, 7, 143)  # P2 = z[20], P85 = z[850]
    control = depth_to_control(z)
    assert control.shape == (1, 7, 143, 3) and control.dtype == torch.float32
    assert torch.equal(control[..., 0], control[..., 1]) and torch.equal(control[..., 0], control[..., 2])  # copies
    v = control[..., 0].flatten()
    torch.testing.assert_close(v[20], torch.tensor(1.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(v[850], torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(v[435], torch.tensor(0.5), atol=1e-5, rtol=0)  # halfway between
    # Exact by construction: depths beyond the percentiles (a ramp step, 0.01 m, beyond them) are clamped.
    assert torch.equal(v[:20], torch.ones(20)) and torch.equal(v[851:], torch.zeros(150))
    assert bool((v[21:850].diff() < 0).all())  # strictly decreasing: far is darker


def test_depth_percentile_is_per_image_and_invertible():
    z = torch.linspace(1.0, 11.0, 1001).view(1, 7, 143)
    both = depth_to_control(torch.cat([z, z * 3 + 2]), low_pct=5, high_pct=95)
    torch.testing.assert_close(both[0], both[1], atol=1e-5, rtol=0)
    inverted = depth_to_control(z, invert=True)
    torch.testing.assert_close(inverted, 1 - depth_to_control(z))


def test_depth_disparity_mode():
    control = depth_to_control(torch.tensor([[[1.0, 2.0, 4.0]]]), mode="disparity")
    # 1/z = 1, 0.5, 0.25, min-max normalised.
    torch.testing.assert_close(control[0, 0, :, 0], torch.tensor([1.0, 1 / 3, 0.0]))
    zero = depth_to_control(torch.tensor([[[0.0, 1.0, 2.0]]]), mode="disparity")
    # The maximum maps to (max - min) / (max - min), which is exactly 1 in IEEE arithmetic.
    assert bool(zero.isfinite().all()) and float(zero[0, 0, 0, 0]) == 1


@pytest.mark.parametrize("mode", DEPTH_CONTROL_MODES)
def test_depth_constant_image_has_no_nan(mode):
    control = depth_to_control(torch.full((2, 4, 4), 2.5), mode=mode)
    # Exact by construction: an empty range selects constants, no division happens.
    assert torch.equal(control, torch.zeros(2, 4, 4, 3))
    inverted = depth_to_control(torch.full((1, 4, 4), 2.5), mode=mode, invert=True)
    assert torch.equal(inverted, torch.ones(1, 4, 4, 3))


def test_depth_checks_inputs():
    with pytest.raises(ValueError, match="finite"):
        depth_to_control(torch.tensor([[[1.0, float("nan")]]]))
    with pytest.raises(ValueError, match="mode must be one of"):
        depth_to_control(torch.ones(1, 2, 2), mode="log")
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        depth_to_control(torch.ones(2, 2))
    with pytest.raises(TypeError, match="depth"):
        depth_to_control(torch.ones(1, 2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="low_pct"):
        depth_to_control(torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(0)), low_pct=90, high_pct=10)


def test_normals_to_control_wall_and_floor():
    wall = normals_to_control(OMNIDATA_WALL)
    floor = normals_to_control(OMNIDATA_FLOOR)
    assert wall.dtype == torch.float32 and wall.shape == (1, 1, 1, 3)
    torch.testing.assert_close(wall.flatten(), torch.tensor([0.5, 0.5, 1.0]))
    torch.testing.assert_close(floor.flatten(), torch.tensor([0.5, 1.0, 0.5]))
    # Their Omnidata colours are the olive and purple of the method's table.
    torch.testing.assert_close(normals_to_rgb(OMNIDATA_WALL).flatten(), torch.tensor([0.5, 0.5, 0.0]))
    torch.testing.assert_close(normals_to_rgb(OMNIDATA_FLOOR).flatten(), torch.tensor([0.5, 0.0, 0.5]))


def test_normals_to_control_equals_inverting_channels():
    n = _unit_normals()
    omnidata_rgb = normals_to_rgb(n)
    torch.testing.assert_close(normals_to_control(n, "omnidata"), 1 - omnidata_rgb)
    marigold = normals_to_control(n, "marigold")
    torch.testing.assert_close(marigold[..., 0], 1 - omnidata_rgb[..., 0])  # red inverted only
    torch.testing.assert_close(marigold[..., 1:], omnidata_rgb[..., 1:])
    torch.testing.assert_close(normals_to_control(n, "bae"), omnidata_rgb)


def test_normals_flips_invert_one_channel_after_conversion():
    n = _unit_normals(seed=1)
    base = normals_to_control(n)
    for axis, flips in enumerate(({"flip_x": True}, {"flip_y": True}, {"flip_z": True})):
        flipped = normals_to_control(n, **flips)
        torch.testing.assert_close(flipped[..., axis], 1 - base[..., axis])
        others = [c for c in range(3) if c != axis]  # multiplied by +1.0: exact
        assert torch.equal(flipped[..., others], base[..., others])
    wall = normals_to_control(OMNIDATA_WALL, flip_z=True)
    torch.testing.assert_close(wall.flatten(), torch.tensor([0.5, 0.5, 0.0]))


@pytest.mark.parametrize("source, target", list(itertools.permutations(NORMAL_CONVENTIONS, 2)))
def test_convert_normals_round_trip(source, target):
    n = _unit_normals(seed=2)
    there = convert_normals(n, source, target)
    assert not torch.equal(there, n)  # every pair of conventions differs in some axis
    # Exact by construction: conversions multiply by +-1, which never rounds.
    assert torch.equal(convert_normals(there, target, source), n)


def test_convert_normals_omnidata_to_marigold():
    n = torch.tensor([0.6, 0.0, -0.8]).view(1, 1, 1, 3)
    converted = convert_normals(n, "omnidata", "marigold")
    torch.testing.assert_close(converted.flatten(), torch.tensor([0.6, 0.0, 0.8]))
    with pytest.raises(ValueError, match="target must be one of"):
        convert_normals(n, "omnidata", "opengl")


def test_rgb_normals_round_trip_and_zero_vectors():
    n = _unit_normals(seed=3)
    torch.testing.assert_close(rgb_to_normals(normals_to_rgb(n)), n, atol=1e-6, rtol=0)
    rgb = torch.tensor([[[[0.5, 0.5, 0.5], [1.0, 0.5, 0.5], [1.0, 1.0, 0.5]]]])
    back = rgb_to_normals(rgb)
    assert bool(back.isfinite().all())
    assert torch.equal(back[0, 0, 0], torch.zeros(3))  # 2 * 0.5 - 1 is exactly 0, and stays 0
    torch.testing.assert_close(back[0, 0, 2], torch.tensor([2**-0.5, 2**-0.5, 0.0]))
    with pytest.raises(ValueError, match=r"rgb must have shape \[B, H, W, 3\]"):
        rgb_to_normals(torch.rand(4, 4, 3, generator=torch.Generator().manual_seed(0)))


def test_segmentation_to_control_uses_ade20k_palette():
    ids = torch.tensor([[[0, 7], [48, 149]]])
    control = segmentation_to_control(ids)
    torch.testing.assert_close(control, paint(ids, "ade20k"))
    torch.testing.assert_close(control[0, 0, 1], torch.tensor([204, 5, 255]) / 255)  # bed
    with pytest.raises(ValueError, match="0..149"):
        segmentation_to_control(torch.tensor([[[150]]]))


def test_depth_batch_range_keeps_one_range_across_frames():
    z = torch.linspace(1.0, 11.0, 1001).view(1, 7, 143)
    frames = torch.cat([z, z * 2])  # the second frame twice as far: per image the maps are equal
    per_image = depth_to_control(frames)
    torch.testing.assert_close(per_image[0], per_image[1], atol=1e-5, rtol=0)
    batch = depth_to_control(frames, range_mode="batch")
    assert float(batch[1].mean()) < float(batch[0].mean()) - 0.2  # farther is darker, as it should be
    torch.testing.assert_close(depth_to_control(z, range_mode="batch"), depth_to_control(z))  # a batch of one
    disparity = depth_to_control(frames, mode="disparity", range_mode="batch")
    # max maps to exactly 1 (x / x); the far frame's nearest disparity 1 / 2 maps to (1/2 - 1/22) / (1 - 1/22) = 0.476.
    assert float(disparity.max()) == 1 and float(disparity[1].max()) < 0.51  # 1 / (2 z) at most half of 1 / z


def test_depth_fixed_near_and_far():
    z = torch.tensor([[[0.5, 1.0, 2.0, 3.0, 4.0]]])
    v = depth_to_control(z, range_mode="fixed", near=1.0, far=3.0)[0, 0, :, 0]
    torch.testing.assert_close(v, torch.tensor([1.0, 1.0, 0.5, 0.0, 0.0]))
    d = depth_to_control(z, mode="disparity", range_mode="fixed", near=1.0, far=2.0)[0, 0, :, 0]
    torch.testing.assert_close(d, torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0]))  # 1/z from 1/2 (far) to 1 (near)
    # near and far are ignored unless the range is fixed
    torch.testing.assert_close(depth_to_control(z, near=1.0, far=3.0), depth_to_control(z))


def test_depth_range_arguments_are_checked():
    z = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(0)) + 1
    with pytest.raises(ValueError, match=r"range_mode must be one of \('image', 'batch', 'fixed'\)"):
        depth_to_control(z, range_mode="clip")
    for near, far in ((None, 3.0), (0.0, 3.0), (3.0, 1.0), (1.0, float("nan"))):
        with pytest.raises(ValueError, match=f"0 < near < far .* got near={near!r}, far={far!r}"):
            depth_to_control(z, range_mode="fixed", near=near, far=far)


@pytest.mark.parametrize("mode", DEPTH_CONTROL_MODES)
def test_batch_range_stops_normalisation_flicker_on_a_panning_clip(mode):
    """One room, the camera panning a pixel per frame, a near box entering halfway.

    Measure: the mean absolute change between consecutive ControlNet maps once the known one-pixel
    motion is undone (frame t + 1 at column c against frame t at column c + 1), so that all that is
    left is the change of normalisation. Per image, the percentiles move as the box and the receding
    wall come into view (about 0.02 of full scale per frame); over the batch they cannot (0).
    Without undoing the motion both modes change by about 0.017 per frame: that part is the motion.
    """
    clip = panning_clip(frames=32, size=32)

    def flicker(range_mode: str) -> float:
        v = depth_to_control(clip, mode=mode, range_mode=range_mode)[..., 0]
        return float((v[1:, :, :-1] - v[:-1, :, 1:]).abs().mean())

    per_image, batch = flicker("image"), flicker("batch")
    assert per_image > 0.01  # 0.020 in both modes (elementwise maths and sorting: the same on every machine)
    # 0 by construction over the batch: one range for all frames, and the compared pixels hold the same
    # depth (the clip is a sliding window), so both go through the same elementwise float ops.
    assert batch < 1e-6
