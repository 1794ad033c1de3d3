"""ADE20K classes and palettes: snap DMP segmentation colours to class ids, repaint, make masks.

DMP's segmentation adapters paint each ADE20K class with the DMP palette (the standard ADE20K
palette with 25 bedroom classes recoloured). A prediction is decoded by snapping every pixel to
the nearest palette colour, measured in CIE L*a*b* as the reference tools do, and repainted with
the standard palette for ControlNet (``control_v11p_sd15_seg``). The data live in
``data/ade20k_palettes.json``.
"""

from __future__ import annotations

import difflib
import functools
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from ..options import check_int, check_option, describe_value

PALETTES = ("dmp", "ade20k")
NUM_CLASSES = 150

_DATA_FILE = Path(__file__).with_name("data") / "ade20k_palettes.json"
_PALETTE_KEYS = {"dmp": "dmp_palette", "ade20k": "ade_palette"}
# Pixels per chunk in snap_to_palette: [chunk, 150] float32 distances (~40 MB) at a time.
_SNAP_CHUNK = 1 << 16

# sRGB primaries to CIE XYZ, and the D65 reference white (IEC 61966-2-1; the rows sum to it).
_SRGB_TO_XYZ = (
    (0.4124564, 0.3575761, 0.1804375),
    (0.2126729, 0.7151522, 0.0721750),
    (0.0193339, 0.1191920, 0.9503041),
)
_D65_WHITE = (0.95047, 1.0, 1.08883)
_LAB_DELTA = 6.0 / 29.0


@functools.cache
def _data() -> dict:
    """The shared ADE20K JSON, read once."""
    with open(_DATA_FILE, encoding="utf-8") as f:
        return json.load(f)


ADE20K_CLASSES: tuple[str, ...] = tuple(_data()["classes"])
BEDROOM_CLASS_IDS: tuple[int, ...] = tuple(_data()["bedroom_classes"])


@functools.cache
def _name_to_id() -> dict[str, int]:
    """Lower-case class name -> class id."""
    return {name.lower(): i for i, name in enumerate(ADE20K_CLASSES)}


def _check_palette_name(value: str, arg: str = "palette_name") -> None:
    check_option(arg, value, PALETTES)


def palette(name: str) -> torch.Tensor:
    """The 150 class colours of an ADE20K palette.

    Args:
        name: one of PALETTES: "dmp" (DMP's segmentation adapters) or "ade20k" (the standard
            palette segmentation ControlNets were trained on).

    Returns:
        uint8 tensor [150, 3] on the CPU, RGB in 0..255, row = class id (a fresh copy).
    """
    _check_palette_name(name, "name")
    return torch.tensor(_data()[_PALETTE_KEYS[name]], dtype=torch.uint8)


def srgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """CIE L*a*b* (D65 white) of sRGB colours, with the standard sRGB and CIE 1976 formulas.

    Args:
        rgb: float tensor [..., 3], sRGB in [0, 1].

    Returns:
        tensor [..., 3] (float32, or float64 for float64 input): L in 0..100, a and b roughly
        -128..128. White gives (100, 0, 0).
    """
    if not isinstance(rgb, torch.Tensor) or not rgb.is_floating_point():
        raise TypeError(f"rgb must be a floating-point torch.Tensor, got {describe_value(rgb)}")
    if rgb.ndim == 0 or rgb.shape[-1] != 3:
        raise ValueError(f"rgb must have shape [..., 3], got {tuple(rgb.shape)}")
    x = rgb if rgb.dtype in (torch.float32, torch.float64) else rgb.float()
    # clamp_min inside the power keeps the unused where-branch free of NaN.
    linear = torch.where(x <= 0.04045, x / 12.92, ((x.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4)
    matrix = torch.tensor(_SRGB_TO_XYZ, dtype=x.dtype, device=x.device)
    white = torch.tensor(_D65_WHITE, dtype=x.dtype, device=x.device)
    t = (linear @ matrix.T) / white  # [..., 3] X/Xn, Y/Yn, Z/Zn
    f = torch.where(
        t > _LAB_DELTA**3,
        t.clamp_min(_LAB_DELTA**3) ** (1.0 / 3.0),
        t / (3 * _LAB_DELTA**2) + 4.0 / 29.0,
    )
    fx, fy, fz = f.unbind(-1)
    return torch.stack((116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)), dim=-1)


@functools.cache
def _unique_palette_lab(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Lab colours [K, 3] float32 of a palette's distinct colours and their lowest class ids [K].

    Dropping repeated colours (keeping the first) makes ties resolve to the lower id exactly,
    whatever the rounding of the distance computation.
    """
    rows = _data()[_PALETTE_KEYS[name]]
    first = [i for i, row in enumerate(rows) if rows.index(row) == i]
    lab = srgb_to_lab(torch.tensor([rows[i] for i in first], dtype=torch.float64) / 255)
    return lab.float(), torch.tensor(first, dtype=torch.int64)


def snap_to_palette(rgb: torch.Tensor, palette_name: str = "dmp") -> torch.Tensor:
    """Class ids of the nearest palette colours by Euclidean distance in CIE Lab.

    Pixels are processed in chunks of 65536, so memory stays bounded (a few [65536, 150]
    float32 buffers) for any image size. Where a palette repeats a colour (both palettes have
    (140, 140, 140) at ids 6 and 48), ties resolve to the lower class id.

    Args:
        rgb: float tensor [B, H, W, 3], sRGB in [0, 1]; clamped to [0, 1] first, NaN read as 0.
        palette_name: one of PALETTES; "dmp" for DMP segmentation predictions.

    Returns:
        int64 tensor [B, H, W] of class ids in 0..149, on rgb's device.
    """
    if not isinstance(rgb, torch.Tensor) or not rgb.is_floating_point():
        raise TypeError(f"rgb must be a floating-point torch.Tensor, got {describe_value(rgb)}")
    if rgb.ndim != 4 or rgb.shape[-1] != 3:
        raise ValueError(f"rgb must have shape [B, H, W, 3], got {tuple(rgb.shape)}")
    _check_palette_name(palette_name)
    pal, pal_ids = (t.to(rgb.device) for t in _unique_palette_lab(palette_name))  # [K, 3], [K]
    pal_sq = (pal * pal).sum(dim=1)  # [K]
    pixels = rgb.reshape(-1, 3)
    ids = torch.empty(pixels.shape[0], dtype=torch.int64, device=rgb.device)
    for start in range(0, pixels.shape[0], _SNAP_CHUNK):
        chunk = pixels[start : start + _SNAP_CHUNK].float().nan_to_num(0.0).clamp(0.0, 1.0)
        lab = srgb_to_lab(chunk)  # [n, 3]
        # |lab - p|^2 - |lab|^2 = |p|^2 - 2 lab.p: same argmin, one matrix product.
        dist = torch.addmm(pal_sq, lab, pal.T, alpha=-2.0)  # [n, K]
        ids[start : start + _SNAP_CHUNK] = pal_ids[dist.argmin(dim=1)]
    return ids.reshape(rgb.shape[:-1])


def _check_ids(ids: torch.Tensor) -> None:
    """Class-id maps: integer tensor [B, H, W] with values in 0..149."""
    integer = isinstance(ids, torch.Tensor) and not (ids.is_floating_point() or ids.is_complex())
    if not integer or ids.dtype == torch.bool:
        raise TypeError(f"ids must be an integer torch.Tensor, got {describe_value(ids)}")
    if ids.ndim != 3:
        raise ValueError(f"ids must have shape [B, H, W], got {tuple(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= NUM_CLASSES):
        raise ValueError(
            f"ids must be ADE20K class ids in 0..{NUM_CLASSES - 1}, "
            f"got values from {int(ids.min())} to {int(ids.max())}"
        )


def paint(ids: torch.Tensor, palette_name: str) -> torch.Tensor:
    """Paint a class-id map with a palette.

    Args:
        ids: integer tensor [B, H, W] of ADE20K class ids in 0..149.
        palette_name: one of PALETTES ("ade20k" for ControlNet, "dmp" for DMP targets).

    Returns:
        float32 tensor [B, H, W, 3], RGB in [0, 1], on ids' device.
    """
    _check_ids(ids)
    _check_palette_name(palette_name)
    colours = palette(palette_name).to(ids.device).float() / 255  # [150, 3]
    return colours[ids.long()]


def class_ids(names: str | Sequence[str]) -> list[int]:
    """ADE20K class ids of class names.

    Args:
        names: a name, a comma-separated string ("bed, lamp") or a sequence of names. Matching
            ignores case and surrounding spaces; empty items are skipped.

    Returns:
        class ids in the order given, without duplicates.
    """
    if isinstance(names, str):
        items = names.split(",")
    elif isinstance(names, Sequence) and all(isinstance(n, str) for n in names):
        items = list(names)
    else:
        raise TypeError(f"names must be a string or a sequence of strings, got {describe_value(names)}")
    lookup = _name_to_id()
    ids: list[int] = []
    for item in items:
        key = " ".join(item.split()).lower()
        if not key:
            continue
        if key not in lookup:
            close = difflib.get_close_matches(key, lookup, n=5, cutoff=0.6)
            hint = f"; close matches: {close}" if close else ""
            raise ValueError(
                f"names: unknown ADE20K class {item.strip()!r}{hint}. "
                "The 150 valid names are in dmp_model.tasks.palettes.ADE20K_CLASSES."
            )
        if lookup[key] not in ids:
            ids.append(lookup[key])
    if not ids:
        raise ValueError(f"names must name at least one ADE20K class, got {names!r}")
    return ids


def class_masks(ids: torch.Tensor, class_ids: Sequence[int]) -> torch.Tensor:
    """Mask of the pixels belonging to any of the given classes.

    Args:
        ids: integer tensor [B, H, W] of class ids in 0..149.
        class_ids: class ids in 0..149 (e.g. from ``class_ids``); empty gives an all-zero mask.

    Returns:
        float32 tensor [B, H, W]: 1 where the pixel's class is in class_ids, else 0.
    """
    _check_ids(ids)
    wanted = list(class_ids)
    for i, c in enumerate(wanted):
        check_int(f"class_ids[{i}]", c, 0, NUM_CLASSES - 1)
    wanted_t = torch.tensor([int(c) for c in wanted], dtype=ids.dtype, device=ids.device)
    return torch.isin(ids, wanted_t).float()


def class_fractions(ids: torch.Tensor) -> list[tuple[int, float]]:
    """Which classes a class-id map holds, and the share of pixels each covers.

    Args:
        ids: integer tensor [B, H, W] of class ids in 0..149 (the whole batch counts together).

    Returns:
        (class id, fraction of pixels) pairs for every class present, largest share first
        (ties by class id); fractions sum to 1, an empty map gives [].
    """
    _check_ids(ids)
    if ids.numel() == 0:
        return []
    counts = torch.bincount(ids.flatten().long().cpu(), minlength=NUM_CLASSES)
    present = [(int(c), int(n)) for c, n in enumerate(counts.tolist()) if n]
    return [(c, n / ids.numel()) for c, n in sorted(present, key=lambda item: (-item[1], item[0]))]
