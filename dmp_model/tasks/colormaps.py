"""Colour maps for depth previews, without a plotting library.

Each map is a short table of RGB stops at evenly spaced positions, interpolated linearly into a
256-entry lookup table once. Sources:

- Spectral: ColorBrewer's 11-class Spectral (Cynthia Brewer, colorbrewer2.org), the 11 colours
  matplotlib builds its "Spectral" from; exact.
- inferno, viridis: 17 stops sampled at positions i / 16 from the 256-entry tables published by
  van der Walt and Smith (BIDS/colormap, as shipped in matplotlib's ``_cm_listed.py``).
- turbo: 17 stops sampled the same way from Google's published 256-entry turbo table
  (Mikhailov, 2019; also in matplotlib).

The 17-stop maps stay within 6.3/255 of the published tables per channel and reproduce their
first and last colours (to 4 decimals): close enough for previews, never for measurements.

Ranges (``RANGE_MODES``): values are mapped to [0, 1] between a low and a high value taken per
image ("image", the default), over the whole batch ("batch": one range for every frame of a clip,
so a frame's colours do not change when other content enters the view), or given ("fixed", e.g.
near and far in metres).
"""

from __future__ import annotations

import functools

import torch

from ..options import check_option, check_real

COLORMAPS = ("Spectral", "inferno", "turbo", "viridis", "gray")
# Where normalisation ranges come from: each image, the whole batch (a clip), or given values.
RANGE_MODES = ("image", "batch", "fixed")
LUT_SIZE = 256

# torch.quantile refuses inputs above 2**24 elements; larger images use a regular subsample.
_QUANTILE_MAX_ELEMENTS = 1 << 24
# Batch (clip) percentiles use a regular subsample above this many values: a quarter million
# samples pin a colour range closely, and the sort's memory stays small however long the clip.
_BATCH_SAMPLE_ELEMENTS = 1 << 18

_STOPS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "Spectral": tuple(
        (r / 255, g / 255, b / 255)
        for r, g, b in (
            (158, 1, 66), (213, 62, 79), (244, 109, 67), (253, 174, 97), (254, 224, 139),
            (255, 255, 191), (230, 245, 152), (171, 221, 164), (102, 194, 165), (50, 136, 189),
            (94, 79, 162),
        )
    ),
    "inferno": (
        (0.0015, 0.0005, 0.0139), (0.0420, 0.0280, 0.1406), (0.1285, 0.0473, 0.2896),
        (0.2370, 0.0366, 0.3956), (0.3399, 0.0618, 0.4292), (0.4393, 0.0986, 0.4317),
        (0.5386, 0.1339, 0.4157), (0.6375, 0.1704, 0.3822), (0.7328, 0.2143, 0.3321),
        (0.8195, 0.2728, 0.2685), (0.8918, 0.3500, 0.1965), (0.9451, 0.4448, 0.1188),
        (0.9774, 0.5526, 0.0380), (0.9879, 0.6692, 0.0596), (0.9759, 0.7909, 0.1973),
        (0.9486, 0.9109, 0.3962), (0.9884, 0.9984, 0.6449),
    ),
    "turbo": (
        (0.1900, 0.0718, 0.2322), (0.2509, 0.2517, 0.6324), (0.2762, 0.4199, 0.8897),
        (0.2594, 0.5777, 0.9986), (0.1602, 0.7332, 0.9252), (0.0927, 0.8634, 0.7655),
        (0.1922, 0.9474, 0.5993), (0.4210, 0.9935, 0.3912), (0.6384, 0.9910, 0.2365),
        (0.7994, 0.9277, 0.2042), (0.9290, 0.8173, 0.2261), (0.9921, 0.6810, 0.2059),
        (0.9853, 0.5018, 0.1324), (0.9253, 0.3229, 0.0577), (0.8230, 0.1909, 0.0195),
        (0.6747, 0.0895, 0.0045), (0.4796, 0.0158, 0.0106),
    ),
    "viridis": (
        (0.2670, 0.0049, 0.3294), (0.2823, 0.0946, 0.4170), (0.2789, 0.1749, 0.4830),
        (0.2593, 0.2507, 0.5244), (0.2302, 0.3213, 0.5455), (0.2000, 0.3864, 0.5545),
        (0.1733, 0.4474, 0.5579), (0.1497, 0.5064, 0.5573), (0.1281, 0.5651, 0.5509),
        (0.1203, 0.6238, 0.5343), (0.1554, 0.6815, 0.5032), (0.2415, 0.7366, 0.4545),
        (0.3629, 0.7867, 0.3866), (0.5081, 0.8292, 0.2992), (0.6694, 0.8622, 0.1954),
        (0.8359, 0.8861, 0.1025), (0.9932, 0.9062, 0.1439),
    ),
    "gray": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


def _check_name(name: str) -> None:
    check_option("name", name, COLORMAPS)


@functools.cache
def _lut(name: str) -> torch.Tensor:
    """The 256-entry float32 [256, 3] table of a map: its stops linearly interpolated (CPU)."""
    stops = torch.tensor(_STOPS[name], dtype=torch.float64)  # [S, 3] at positions k / (S - 1)
    pos = torch.linspace(0, 1, LUT_SIZE, dtype=torch.float64) * (len(stops) - 1)
    left = pos.floor().long().clamp(max=len(stops) - 2)
    frac = (pos - left).unsqueeze(1)
    return ((1 - frac) * stops[left] + frac * stops[left + 1]).float()


def colorize(values: torch.Tensor, name: str = "Spectral") -> torch.Tensor:
    """Colour a map of values in [0, 1] with a colour map (nearest of 256 table entries).

    Args:
        values: float tensor [B, H, W], expected in [0, 1]; clamped, NaN gives 0.
        name: one of COLORMAPS; Spectral runs from dark red at 0 to purple at 1.

    Returns:
        float32 tensor [B, H, W, 3], RGB in [0, 1], on values' device.
    """
    _check_values(values)
    _check_name(name)
    index = (values.float().nan_to_num(0.0).clamp(0.0, 1.0) * (LUT_SIZE - 1)).round().long()
    return _lut(name).to(values.device)[index]


def per_image_percentiles(
    values: torch.Tensor, low_pct: float = 0.0, high_pct: float = 100.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Low and high percentiles of each image, ignoring non-finite values.

    Percentiles interpolate linearly (``torch.quantile``); 0 and 100 are the exact minimum and
    maximum. Above 2**24 pixels per image (about 16.7 megapixels, torch.quantile's limit) other
    percentiles come from a regular subsample of every k-th pixel, so they are approximate there.

    Args:
        values: float tensor [B, H, W].
        low_pct, high_pct: percentiles, 0 <= low_pct < high_pct <= 100.

    Returns:
        (low, high), float32 tensors [B]; NaN for an image without finite values.
    """
    _check_values(values)
    _check_percentiles(low_pct, high_pct)
    flat = values.flatten(1).float()  # [B, H*W]
    flat = torch.where(flat.isfinite(), flat, torch.nan)
    lows, highs = [flat.new_empty(0)], [flat.new_empty(0)]  # concatenated: [B] even for B = 0
    for image in flat:  # per image: quantile's size limit applies to its whole input
        if image.numel() > _QUANTILE_MAX_ELEMENTS and (low_pct > 0 or high_pct < 100):
            image = image[:: -(-image.numel() // _QUANTILE_MAX_ELEMENTS)]
        lows.append(_percentile(image, low_pct).view(1))
        highs.append(_percentile(image, high_pct).view(1))
    return torch.cat(lows), torch.cat(highs)


def _percentile(image: torch.Tensor, pct: float) -> torch.Tensor:
    """One percentile of a flat float32 image with NaN marking ignored pixels ([] tensor)."""
    finite = ~image.isnan()
    if not bool(finite.any()):
        return image.new_tensor(float("nan"))
    if pct == 0:
        return image[finite].min()
    if pct == 100:
        return image[finite].max()
    return torch.nanquantile(image, pct / 100)


def batch_percentiles(
    values: torch.Tensor, low_pct: float = 0.0, high_pct: float = 100.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Low and high percentiles of all finite values of a batch together (a clip's frames as one).

    Above 2**18 values, percentiles other than 0 and 100 come from a regular subsample of every
    k-th value (each image contributes alike), so that a long clip needs no clip-sized sort; 0 and
    100 are the exact extremes, found image by image.

    Args:
        values: float tensor [B, H, W].
        low_pct, high_pct: percentiles, 0 <= low_pct < high_pct <= 100.

    Returns:
        (low, high), float32 tensors [B] holding the same value for every image; NaN without finite values.
    """
    _check_values(values)
    _check_percentiles(low_pct, high_pct)
    flat = values.reshape(-1)
    if flat.numel() > _BATCH_SAMPLE_ELEMENTS:
        flat = flat[:: -(-flat.numel() // _BATCH_SAMPLE_ELEMENTS)]
    flat = flat.float()
    flat = torch.where(flat.isfinite(), flat, torch.nan)
    low, high = _percentile(flat, low_pct), _percentile(flat, high_pct)
    if low_pct == 0 or high_pct == 100:
        lows, highs = per_image_percentiles(values[:0])  # empty [0] tensors, for B = 0
        for image in values:  # one image at a time: no batch-sized copy
            image_low, image_high = per_image_percentiles(image[None])
            lows, highs = torch.cat([lows, image_low]), torch.cat([highs, image_high])
        low = _nan_reduce(lows, torch.min) if low_pct == 0 else low
        high = _nan_reduce(highs, torch.max) if high_pct == 100 else high
    count = values.shape[0]
    return low.expand(count).clone(), high.expand(count).clone()


def _nan_reduce(values: torch.Tensor, reduce) -> torch.Tensor:
    """min or max of the non-NaN entries of a flat tensor ([] tensor; NaN when there are none)."""
    finite = values[~values.isnan()]
    return reduce(finite) if finite.numel() else values.new_tensor(float("nan"))


def value_range(
    values: torch.Tensor,
    range_mode: str = "image",
    low_pct: float = 0.0,
    high_pct: float = 100.0,
    fixed_range: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The values that normalisation maps to 0 and 1, for each image.

    Args:
        values: float tensor [B, H, W].
        range_mode: one of RANGE_MODES: "image" (each image's own percentiles), "batch" (the
            percentiles of the whole batch, the same for every image: use it for a clip's frames; a
            batch of one gives the "image" result) or "fixed" (`fixed_range`, percentiles ignored).
        low_pct, high_pct: percentiles for "image" and "batch", 0 <= low_pct < high_pct <= 100.
        fixed_range: (low, high) in the values' units (e.g. near and far in metres), finite,
            low < high; needed by "fixed" only (ignored otherwise).

    Returns:
        (low, high), float32 tensors [B].
    """
    check_option("range_mode", range_mode, RANGE_MODES)
    if range_mode == "image":
        return per_image_percentiles(values, low_pct, high_pct)
    if range_mode == "batch":
        return batch_percentiles(values, low_pct, high_pct)
    _check_values(values)
    low, high = check_fixed_range(fixed_range)
    return torch.full((values.shape[0],), low), torch.full((values.shape[0],), high)


def check_fixed_range(fixed_range, arg: str = "fixed_range") -> tuple[float, float]:
    """(low, high) as floats, or a ValueError naming `arg` unless two finite numbers with low < high."""
    error = ValueError(f"{arg} must be two finite numbers (low, high) with low < high for range_mode 'fixed', "
                       f"got {fixed_range!r}")
    if not (isinstance(fixed_range, (tuple, list)) and len(fixed_range) == 2):
        raise error
    try:
        low, high = (check_real(f"{arg}[{i}]", v) for i, v in enumerate(fixed_range))
    except (TypeError, ValueError) as err:
        raise error from err
    if not low < high:
        raise error
    return low, high


def normalize_between(values: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """(v - low) / (high - low) per image, clamped to [0, 1].

    Args:
        values: float tensor [B, H, W]; low, high: tensors [B] (e.g. from ``value_range``).

    Returns:
        float32 tensor [B, H, W] in [0, 1]. Non-finite values, and every pixel of an image whose
        low and high coincide (or are NaN), give 0, never NaN.
    """
    low, high = low.float().view(-1, 1, 1).to(values.device), high.float().view(-1, 1, 1).to(values.device)
    span = high - low
    ok = span > 0  # False for constant images and NaN percentiles
    out = (values.float() - low) / torch.where(ok, span, torch.ones_like(span))
    out = torch.where(ok & out.isfinite(), out, torch.zeros_like(out))
    return out.clamp(0.0, 1.0)


def normalize(
    values: torch.Tensor,
    range_mode: str = "image",
    low_pct: float = 0.0,
    high_pct: float = 100.0,
    fixed_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Min-max normalisation to [0, 1] between a range per image, over the batch or fixed.

    Args as ``value_range`` (`range_mode` one of RANGE_MODES, default per image).

    Returns:
        float32 tensor [B, H, W] in [0, 1] (see ``normalize_between``).
    """
    return normalize_between(values, *value_range(values, range_mode, low_pct, high_pct, fixed_range))


def _check_values(values: torch.Tensor) -> None:
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        got = f"{values.dtype} tensor" if isinstance(values, torch.Tensor) else type(values).__name__
        raise TypeError(f"values must be a floating-point torch.Tensor, got {got}")
    if values.ndim != 3:
        raise ValueError(f"values must have shape [B, H, W], got {tuple(values.shape)}")


def _check_percentiles(low_pct: float, high_pct: float) -> None:
    check_real("low_pct", low_pct, 0, 100)
    check_real("high_pct", high_pct, 0, 100)
    if not low_pct < high_pct:
        raise ValueError(
            f"low_pct and high_pct must satisfy 0 <= low_pct < high_pct <= 100, got {low_pct}, {high_pct}"
        )
