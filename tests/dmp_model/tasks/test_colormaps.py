"""Tests for dmp_model.tasks.colormaps: stop tables against published maps, colorize, normalisation."""

import pytest
import torch

from dmp_model.tasks import colormaps
from dmp_model.tasks.colormaps import (
    COLORMAPS,
    RANGE_MODES,
    batch_percentiles,
    colorize,
    normalize,
    per_image_percentiles,
    value_range,
)

# Entries 0, 64, 128, 192 and 255 of the published 256-entry tables (as in matplotlib).
PUBLISHED = {
    "inferno": [
        (0.001462, 0.000466, 0.013866), (0.3415, 0.062325, 0.429425), (0.735683, 0.215906, 0.330245),
        (0.978422, 0.557937, 0.034931), (0.988362, 0.998364, 0.644924),
    ],
    "viridis": [
        (0.267004, 0.004874, 0.329415), (0.229739, 0.322361, 0.545706), (0.127568, 0.566949, 0.550556),
        (0.369214, 0.788888, 0.382914), (0.993248, 0.906157, 0.143936),
    ],
    "turbo": [
        (0.18995, 0.07176, 0.23217), (0.15844, 0.73551, 0.92305), (0.64362, 0.98999, 0.23356),
        (0.9836, 0.49291, 0.12849), (0.4796, 0.01583, 0.01055),
    ],
}
SPECTRAL_ENDS = [(158, 1, 66), (94, 79, 162)]  # ColorBrewer Spectral-11, first and last


def _ends(name):
    return colorize(torch.tensor([[[0.0, 1.0]]]), name)[0, 0]  # [2, 3]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_endpoints_equal_published_colours(name):
    # The stops are the published values rounded to 4 decimals: at most 5e-5 apart by construction.
    expected = torch.tensor([PUBLISHED[name][0], PUBLISHED[name][-1]])
    torch.testing.assert_close(_ends(name), expected, atol=1e-4, rtol=0)


def test_spectral_and_gray_endpoints():
    torch.testing.assert_close(_ends("Spectral"), torch.tensor(SPECTRAL_ENDS).float() / 255)
    torch.testing.assert_close(_ends("gray"), torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))


def colormap_lut(name: str) -> torch.Tensor:
    """The colour map's table [256, 3], read through colorize: value k / 255 looks entry k up."""
    return colorize((torch.arange(256.0) / 255).view(1, 16, 16), name).reshape(256, 3)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_lut_follows_published_table(name):
    lut = colormap_lut(name)
    assert lut.shape == (256, 3) and lut.dtype == torch.float32
    sampled = lut[[0, 64, 128, 192, 255]]
    # 17 stops interpolated (float64, constants only: the same on every machine) stay within 6.3/255 of the
    # 256-entry tables (see the module); at these entries within 0.005.
    torch.testing.assert_close(sampled, torch.tensor(PUBLISHED[name]), atol=0.025, rtol=0)


def test_spectral_passes_through_its_centre_colour():
    lut = colormap_lut("Spectral")
    # Stop 5 of 11 (255, 255, 191) sits at 0.5, between entries 127 and 128.
    centre = torch.tensor([1.0, 1.0, 191 / 255])
    torch.testing.assert_close((lut[127] + lut[128]) / 2, centre, atol=0.01, rtol=0)


def test_gray_is_the_identity():
    values = torch.linspace(0, 1, 256).view(1, 16, 16)
    rgb = colorize(values, "gray")
    for c in range(3):
        torch.testing.assert_close(rgb[..., c], values, atol=1e-6, rtol=0)


def test_colorize_clamps_and_maps_nan_to_zero():
    values = torch.tensor([[[-1.0, 2.0, float("nan"), float("inf")]]])
    rgb = colorize(values, "viridis")
    assert rgb.shape == (1, 1, 4, 3) and rgb.dtype == torch.float32
    first, last = colormap_lut("viridis")[[0, 255]]
    # Exact by construction: colorize looks entries of the same table up (clamped and NaN values give 0 or 255).
    assert torch.equal(rgb[0, 0, 0], first) and torch.equal(rgb[0, 0, 2], first)
    assert torch.equal(rgb[0, 0, 1], last) and torch.equal(rgb[0, 0, 3], last)


def test_colorize_checks_inputs():
    with pytest.raises(ValueError, match="name must be one of"):
        colorize(torch.zeros(1, 2, 2), "jet")
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        colorize(torch.zeros(2, 2))
    with pytest.raises(TypeError, match="values"):
        colorize(torch.zeros(1, 2, 2, dtype=torch.int64))
    assert "Spectral" in COLORMAPS and len(set(COLORMAPS)) == len(COLORMAPS)


def test_image_range_normalises_each_image():
    generator = torch.Generator().manual_seed(0)
    values = torch.rand(2, 8, 8, generator=generator)
    values[1] = values[1] * 100 + 50
    out = normalize(values, "image")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.amin(dim=(1, 2)), torch.zeros(2))
    torch.testing.assert_close(out.amax(dim=(1, 2)), torch.ones(2))
    expected = (values[1] - values[1].min()) / (values[1].max() - values[1].min())
    torch.testing.assert_close(out[1], expected)


def test_normalize_constant_image_gives_zeros():
    out = normalize(torch.full((1, 4, 4), 3.0), "image", 2, 85)
    # Exact by construction: an empty range selects the zeros, no division happens.
    assert torch.equal(out, torch.zeros(1, 4, 4))


def test_normalize_percentiles_on_a_ramp():
    ramp = torch.arange(101.0).view(1, 1, 101)  # percentile p of 0..100 is p itself
    out = normalize(ramp, "image", 10, 90)
    # The percentiles are 10 and 90 up to how the quantile's position is rounded (an implementation
    # detail): compare those pixels with a tolerance. Pixels beyond the percentiles are clamped, exactly
    # 0 and 1, however the percentiles round (they stay within far less than a ramp step of 10 and 90).
    torch.testing.assert_close(out[0, 0, [10, 90]], torch.tensor([0.0, 1.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[0, 0, 50], torch.tensor(0.5))
    assert float(out[0, 0, :10].max()) == 0 and float(out[0, 0, 91:].min()) == 1


def test_normalize_ignores_non_finite_values():
    values = torch.tensor([[[0.0, 1.0, 2.0, float("nan"), float("inf")]]])
    out = normalize(values, "image")
    torch.testing.assert_close(out, torch.tensor([[[0.0, 0.5, 1.0, 0.0, 0.0]]]))


def test_percentiles_of_huge_images_use_a_subsample(monkeypatch):
    monkeypatch.setattr(colormaps, "_QUANTILE_MAX_ELEMENTS", 1000)
    ramp = torch.linspace(0, 1, 100 * 100).view(1, 100, 100)
    low, high = per_image_percentiles(ramp, 2, 85)
    assert abs(float(low) - 0.02) < 0.01 and abs(float(high) - 0.85) < 0.01
    low, high = per_image_percentiles(ramp)  # 0 and 100 stay exact: the minimum and maximum themselves
    assert float(low) == float(ramp.min()) and float(high) == float(ramp.max())


def test_percentile_arguments_are_checked():
    values = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="low_pct"):
        normalize(values, "image", 50, 50)
    with pytest.raises(ValueError, match="high_pct"):
        normalize(values, "image", 0, 101)
    with pytest.raises(TypeError, match="low_pct"):
        normalize(values, "image", "2", 85)


def test_batch_range_is_one_range_for_every_image():
    values = torch.stack([torch.linspace(0, 1, 100), torch.linspace(2, 4, 100)]).view(2, 10, 10)
    low, high = value_range(values, "batch")  # the batch's minimum and maximum themselves: exact
    assert torch.equal(low, values.min().expand(2)) and torch.equal(high, values.max().expand(2))
    assert (float(low[0]), float(high[0])) == pytest.approx((0.0, 4.0))
    out = normalize(values, "batch")
    torch.testing.assert_close(out, values / 4)
    assert not torch.equal(out, normalize(values, "image"))  # per image, both would span 0..1
    single = values[1:]
    torch.testing.assert_close(normalize(single, "batch", 2, 98), normalize(single, "image", 2, 98))


def test_batch_percentiles_of_large_batches_use_a_subsample(monkeypatch):
    monkeypatch.setattr(colormaps, "_BATCH_SAMPLE_ELEMENTS", 1000)
    ramp = torch.linspace(0, 1, 4 * 50 * 50).view(4, 50, 50)  # each image a quarter of the ramp
    low, high = batch_percentiles(ramp, 2, 85)
    assert abs(float(low[0]) - 0.02) < 0.01 and abs(float(high[3]) - 0.85) < 0.01
    low, high = batch_percentiles(ramp)  # 0 and 100 stay exact: the minimum and maximum themselves
    assert float(low[2]) == float(ramp.min()) and float(high[0]) == float(ramp.max())


def test_fixed_range_maps_given_values_to_zero_and_one():
    values = torch.tensor([[[1.0, 2.0, 3.0, 5.0]], [[0.0, 2.0, 2.0, 2.0]]])
    out = normalize(values, "fixed", fixed_range=(2.0, 4.0))
    torch.testing.assert_close(out, torch.tensor([[[0.0, 0.0, 0.5, 1.0]], [[0.0, 0.0, 0.0, 0.0]]]))
    low, high = value_range(values, "fixed", 10, 20, fixed_range=(2, 4))  # percentiles are ignored
    # Exact by construction: the given numbers, copied.
    assert low.tolist() == [2.0, 2.0] and high.tolist() == [4.0, 4.0]


def test_range_arguments_are_checked():
    values = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"range_mode must be one of \('image', 'batch', 'fixed'\), got 'clip'"):
        normalize(values, "clip")
    for bad in (None, (4.0, 2.0), (1.0, float("inf")), (1.0,), ("1", 2.0), (True, 2.0)):
        with pytest.raises(ValueError, match="fixed_range must be two finite numbers"):
            normalize(values, "fixed", fixed_range=bad)
    with pytest.raises(ValueError, match="low_pct"):
        normalize(values, "batch", 90, 10)
    assert RANGE_MODES == ("image", "batch", "fixed")
