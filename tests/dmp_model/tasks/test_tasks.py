"""Task codecs: a target encoded for training and read back as if the VAE had decoded it is the target."""

from __future__ import annotations

import pytest
import torch

from dmp_model import TASKS, AdapterInfo, get_codec
from dmp_model.tasks.colormaps import colorize, normalize
from dmp_model.tasks.palettes import NUM_CLASSES, palette

DEPTH = AdapterInfo(task="depth", target_scale=8.0)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def unit_normals(shape=(2, 12, 10), seed=0) -> torch.Tensor:
    n = torch.randn(*shape, 3, generator=generator(seed))
    return n / n.norm(dim=-1, keepdim=True)


def test_every_task_has_a_codec_and_unknown_tasks_list_them():
    assert {get_codec(task).name for task in TASKS} == set(TASKS)
    with pytest.raises(ValueError, match=r"task must be one of \('depth', 'normal', 'segmentation', 'albedo', "
                                         r"'shading', 'rgb'\), got 'height'"):
        get_codec("height")


@pytest.mark.parametrize("scale", [8.0, 1.0, 20.0])
def test_depth_round_trip_is_exact_up_to_the_target_scale(scale):
    info = AdapterInfo(task="depth", target_scale=scale)
    depth = torch.rand(2, 9, 11, generator=generator(1)) * scale
    depth[0, 0, 0], depth[1, 0, 0] = 0.0, scale  # both ends of the range
    codec = get_codec("depth")
    encoded = codec.encode_target(depth, info.target_scale)
    assert encoded.shape == (2, 3, 9, 11) and encoded.min() >= -1 and encoded.max() <= 1
    assert torch.equal(encoded[:, 0], encoded[:, 2])  # one channel repeated to RGB (a copy: exact)
    decoded = codec.decode(encoded, info.target_scale)
    assert decoded.shape == (2, 9, 11)
    # Five float32 roundings of values up to the scale: at most ~2e-7 x scale (measured 1e-7 x scale).
    torch.testing.assert_close(decoded, depth, atol=1e-6 * scale, rtol=0)


def test_depth_decode_clamps_at_zero_and_averages_channels():
    codec = get_codec("depth")
    pixels = torch.tensor([-1.5, -1.0, 0.0, 1.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4).clone()
    torch.testing.assert_close(codec.decode(pixels, DEPTH.target_scale)[0, 0], torch.tensor([0.0, 0.0, 4.0, 8.0]))
    rgb = torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1)  # mean 0 -> 4 m
    torch.testing.assert_close(codec.decode(rgb, DEPTH.target_scale), torch.full((1, 1, 1), 4.0))


def test_normal_round_trip_gives_the_same_unit_vectors():
    codec = get_codec("normal")
    info = AdapterInfo(task="normal")
    normals = unit_normals()
    encoded = codec.encode_target(normals, info.target_scale)
    assert encoded.shape == (2, 3, 12, 10)
    decoded = codec.decode(encoded, info.target_scale)
    assert decoded.shape == normals.shape
    torch.testing.assert_close(decoded, normals, atol=1e-5, rtol=0)
    # A decoded image that is not quite unit length comes back renormalised.
    torch.testing.assert_close(codec.decode(encoded * 0.7, info.target_scale).norm(dim=-1), torch.ones(2, 12, 10))


def test_segmentation_round_trip_for_every_class():
    codec = get_codec("segmentation")
    info = AdapterInfo(task="segmentation")
    ids = torch.arange(NUM_CLASSES).view(1, 10, 15)
    encoded = codec.encode_target(ids, info.target_scale)
    assert encoded.shape == (1, 3, 10, 15) and encoded.min() >= -1 and encoded.max() <= 1
    decoded = codec.decode(encoded, info.target_scale)
    assert decoded.dtype == torch.int64
    expected = ids.clone()
    # The DMP palette (like ADE20K's) paints class 48 with the colour of class 6, (140, 140, 140):
    # no decoder can tell them apart; ties resolve to the lower id.
    assert palette("dmp")[48].tolist() == palette("dmp")[6].tolist() == [140, 140, 140]
    expected[ids == 48] = 6
    # Integer ids: the exact palette colours after a [-1, 1] round trip (~1e-7 off) are far nearer their
    # own palette entry than any other (the closest two DMP colours are 7/255 apart in RGB).
    assert torch.equal(decoded, expected)
    duplicates = [i for i in range(NUM_CLASSES) if palette("dmp").tolist().index(palette("dmp")[i].tolist()) != i]
    assert duplicates == [48]


def test_segmentation_survives_small_colour_noise():
    codec = get_codec("segmentation")
    info = AdapterInfo(task="segmentation")
    ids = torch.randint(0, NUM_CLASSES, (2, 40, 40), generator=generator(2))
    ids[ids == 48] = 6
    encoded = codec.encode_target(ids, info.target_scale)
    noise = (torch.rand(encoded.shape, generator=generator(3)) * 2 - 1) / 255  # +-1/255 in [-1, 1] space
    decoded = codec.decode(encoded + noise, info.target_scale)
    assert (decoded == ids).float().mean() >= 0.99


def test_albedo_shading_and_rgb_round_trips():
    albedo = torch.rand(2, 6, 7, 3, generator=generator(4)) * 3 + 0.5  # any range: min-max normalised
    codec, info = get_codec("albedo"), AdapterInfo(task="albedo")
    decoded = codec.decode(codec.encode_target(albedo, info.target_scale), info.target_scale)
    low = albedo.flatten(1).min(1).values.view(-1, 1, 1, 1)
    high = albedo.flatten(1).max(1).values.view(-1, 1, 1, 1)
    torch.testing.assert_close(decoded, (albedo - low) / (high - low), atol=1e-6, rtol=0)
    # Exact: the minimum becomes (low - low) / s = 0 and the maximum (high - low) / (high - low) = 1, and
    # 0 -> -1 -> 0 and 1 -> 1 -> 1 are exact in the [-1, 1] round trip.
    assert decoded.amin(dim=(1, 2, 3)).tolist() == [0.0, 0.0] and decoded.amax(dim=(1, 2, 3)).tolist() == [1.0, 1.0]

    shading = torch.rand(2, 6, 7, generator=generator(5)) * 10
    codec, info = get_codec("shading"), AdapterInfo(task="shading")
    encoded = codec.encode_target(shading, info.target_scale)
    assert torch.equal(encoded[:, 0], encoded[:, 1])  # one grey channel repeated: exact
    decoded = codec.decode(encoded, info.target_scale)
    low, high = shading.flatten(1).min(1).values.view(-1, 1, 1), shading.flatten(1).max(1).values.view(-1, 1, 1)
    torch.testing.assert_close(decoded, (shading - low) / (high - low), atol=1e-6, rtol=0)
    rgb_shading = shading.unsqueeze(-1).expand(-1, -1, -1, 3)  # RGB shading is averaged to grey
    scale = info.target_scale
    torch.testing.assert_close(codec.decode(codec.encode_target(rgb_shading, scale), scale), decoded, atol=1e-6,
                               rtol=0)

    rgb = torch.rand(2, 6, 7, 3, generator=generator(6))
    codec, info = get_codec("rgb"), AdapterInfo(task="rgb")
    scale = info.target_scale
    torch.testing.assert_close(codec.decode(codec.encode_target(rgb, scale), scale), rgb, atol=1e-6, rtol=0)
    clipped = codec.decode(codec.encode_target(rgb * 2 - 0.5, info.target_scale), info.target_scale)
    torch.testing.assert_close(clipped, (rgb * 2 - 0.5).clamp(0, 1), atol=1e-6, rtol=0)


def test_constant_min_max_targets_become_zero_not_nan():
    for task, target in (("albedo", torch.full((1, 4, 4, 3), 0.3)), ("shading", torch.full((1, 4, 4), 2.0))):
        codec, info = get_codec(task), AdapterInfo(task=task)
        encoded = codec.encode_target(target, info.target_scale)
        # Exact: every value minus the minimum is 0, so 0 / 1e-12 * 2 - 1 = -1.
        assert torch.isfinite(encoded).all() and torch.equal(encoded, torch.full_like(encoded, -1.0))


def test_segmentation_resize_uses_nearest_neighbours():
    codec = get_codec("segmentation")
    ids = torch.randint(0, NUM_CLASSES, (2, 13, 17), generator=generator(7))
    for size in ((5, 7), (40, 31)):
        resized = codec.resize(ids, size)
        assert resized.shape == (2, *size) and resized.dtype == torch.int64
        for b in range(2):
            assert set(resized[b].unique().tolist()) <= set(ids[b].unique().tolist())
    up = codec.resize(ids, (26, 34))  # exact 2x: every pixel becomes a 2x2 block
    assert torch.equal(up[:, ::2, ::2], ids) and torch.equal(up[:, 1::2, 1::2], ids)


def test_normal_resize_stays_unit_length():
    codec = get_codec("normal")
    normals = unit_normals((1, 9, 9), seed=8)
    for size in ((4, 5), (20, 13)):
        resized = codec.resize(normals, size)
        assert resized.shape == (1, *size, 3)
        torch.testing.assert_close(resized.norm(dim=-1), torch.ones(1, *size), atol=1e-5, rtol=0)


def test_depth_resize_never_goes_negative_where_bicubic_overshoots():
    codec = get_codec("depth")
    depth = torch.zeros(1, 8, 8)
    depth[:, :, 4:] = 5.0  # a sharp edge: bicubic rings below 0 next to it
    raw = torch.nn.functional.interpolate(depth[:, None], size=(8, 20), mode="bicubic", align_corners=False)
    assert raw.min() < 0  # the situation the clamp exists for
    resized = codec.resize(depth, (8, 20))
    assert resized.shape == (1, 8, 20) and resized.min() >= 0 and resized.max() > 4.9


def test_albedo_and_shading_resize_stay_in_range():
    albedo = (torch.rand(1, 8, 8, 3, generator=generator(9)) > 0.5).float()
    resized = get_codec("albedo").resize(albedo, (5, 21))
    assert resized.shape == (1, 5, 21, 3) and resized.min() >= 0 and resized.max() <= 1
    shading = (torch.rand(1, 8, 8, generator=generator(10)) > 0.5).float()
    resized = get_codec("shading").resize(shading, (21, 5))
    assert resized.shape == (1, 21, 5) and resized.min() >= 0 and resized.max() <= 1


def test_visuals_are_rgb_previews_in_unit_range():
    depth = torch.rand(2, 6, 7, generator=generator(11)) * 8
    visual = get_codec("depth").visualize(depth)
    assert visual.shape == (2, 6, 7, 3) and visual.min() >= 0 and visual.max() <= 1
    torch.testing.assert_close(visual, colorize(normalize(depth, "image", 2, 98), "Spectral"))
    assert not torch.equal(get_codec("depth").visualize(depth, colormap="gray"), visual)
    normals = unit_normals((1, 4, 4), seed=12)
    torch.testing.assert_close(get_codec("normal").visualize(normals), (normals + 1) / 2)
    ids = torch.tensor([[[0, 6], [48, 149]]])
    painted = get_codec("segmentation").visualize(ids)
    torch.testing.assert_close(painted, palette("dmp")[ids].float() / 255)
    shading = torch.rand(1, 3, 4, generator=generator(13))
    shaded = get_codec("shading").visualize(shading)  # previews of values in [0, 1]: copies, exact
    assert shaded.shape == (1, 3, 4, 3) and all(torch.equal(shaded[..., c], shading) for c in range(3))
    albedo = torch.rand(1, 3, 4, 3, generator=generator(14))
    assert torch.equal(get_codec("albedo").visualize(albedo), albedo)
