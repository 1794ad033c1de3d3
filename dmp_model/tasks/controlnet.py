"""ControlNet-ready condition maps from DMP predictions: one place per ControlNet convention.

- Depth for ``control_v11f1p_sd15_depth``: grey, near is white.
- Normals for ``control_v11p_sd15_normalbae``: rgb = (n + 1) / 2 in the BAE frame (x toward
  image left, y up, z toward the viewer); a wall facing the camera is (0.5, 0.5, 1), a floor green.
- Segmentation for ``control_v11p_sd15_seg``: class ids painted with the standard ADE20K palette.

All maps are channels-last float32 [B, H, W, 3] in [0, 1], on the input's device. The camera
conventions of normals, and converting between them, live in ``normals.py``.
"""

from __future__ import annotations

import torch

from ..options import check_option, check_real, describe_value
from .colormaps import RANGE_MODES, normalize, normalize_between, value_range
from .normals import NORMAL_CONVENTIONS, convert_normals, normals_to_rgb, rgb_to_normals
from .palettes import paint

__all__ = ["DEPTH_CONTROL_MODES", "NORMAL_CONVENTIONS", "convert_normals", "depth_to_control", "normals_to_control",
           "normals_to_rgb", "rgb_to_normals", "segmentation_to_control"]  # the normal names: kept importable

DEPTH_CONTROL_MODES = ("percentile", "disparity")

# Depth floor (metres) before taking 1 / z, so zero depth (DMP clamps at 0) stays finite.
_MIN_DEPTH = 1e-3


def depth_to_control(
    depth: torch.Tensor,
    mode: str = "percentile",
    invert: bool = False,
    low_pct: float = 2.0,
    high_pct: float = 85.0,
    range_mode: str = "image",
    near: float | None = None,
    far: float | None = None,
) -> torch.Tensor:
    """ControlNet depth condition (``control_v11f1p_sd15_depth``, near is white) from metric depth.

    Args:
        depth: float tensor [B, H, W], depth z in metres, finite.
        mode: one of DEPTH_CONTROL_MODES:
            "percentile": v = clip(1 - (z - P_low(z)) / (P_high(z) - P_low(z)), 0, 1);
            "disparity": 1 / max(z, 1 mm), min-max normalised to [0, 1].
        invert: return 1 - v (near is black).
        low_pct, high_pct: the percentiles of "percentile" mode (default P2 and P85: the nearest
            2 % of the image are white, the farthest 15 % black); ignored by "disparity".
        range_mode: where the range comes from, one of RANGE_MODES: "image" (each image's own,
            the default), "batch" (the whole batch's percentiles, or its disparity minimum and
            maximum: one range for all frames of a clip, so maps of consecutive frames do not
            flicker as content enters or leaves the view) or "fixed" (`near` white, `far` black).
        near, far: metres, 0 < near < far; "fixed" only (ignored otherwise). In "disparity" mode
            1 / far maps to 0 and 1 / near to 1.

    Returns:
        float32 tensor [B, H, W, 3], v repeated to grey RGB in [0, 1]. A constant range (a
        constant-depth image, per image or batch) gives v = 0 everywhere (1 with invert), never NaN.
    """
    if not isinstance(depth, torch.Tensor) or not depth.is_floating_point():
        raise TypeError(f"depth must be a floating-point torch.Tensor, got {describe_value(depth)}")
    if depth.ndim != 3:
        raise ValueError(f"depth must have shape [B, H, W], got {tuple(depth.shape)}")
    check_option("mode", mode, DEPTH_CONTROL_MODES)
    check_option("range_mode", range_mode, RANGE_MODES)
    fixed = _near_far(near, far) if range_mode == "fixed" else None
    if not bool(depth.isfinite().all()):
        raise ValueError("depth must be finite, got NaN or infinite values")
    z = depth.float()
    if mode == "percentile":
        low, high = value_range(z, range_mode, low_pct, high_pct, fixed)
        ok = (high > low).view(-1, 1, 1)  # False for a constant range
        v = torch.where(ok, 1 - normalize_between(z, low, high), torch.zeros_like(z))
    else:
        disparity_range = None if fixed is None else (1 / fixed[1], 1 / fixed[0])  # far is the smaller one
        v = normalize(1.0 / z.clamp_min(_MIN_DEPTH), range_mode, fixed_range=disparity_range)
    if invert:
        v = 1 - v
    return v.unsqueeze(-1).repeat(1, 1, 1, 3)


def _near_far(near, far) -> tuple[float, float]:
    """Checked (near, far) in metres for range_mode "fixed"."""
    error = ValueError(f"near and far must be depths in metres with 0 < near < far for range_mode 'fixed', "
                       f"got near={near!r}, far={far!r}")
    try:
        near, far = check_real("near", near, 0, low_open=True), check_real("far", far, 0, low_open=True)
    except (TypeError, ValueError) as err:
        raise error from err
    if not near < far:
        raise error
    return near, far


def normals_to_control(
    normals: torch.Tensor,
    convention: str = "omnidata",
    flip_x: bool = False,
    flip_y: bool = False,
    flip_z: bool = False,
) -> torch.Tensor:
    """ControlNet normal condition (``control_v11p_sd15_normalbae``) from normals.

    An Omnidata wall facing the camera, n = (0, 0, -1) (rgb (0.5, 0.5, 0)), becomes
    (0.5, 0.5, 1); an Omnidata floor, n = (0, -1, 0) (rgb (0.5, 0, 0.5)), becomes green
    (0.5, 1, 0.5).

    Args:
        normals: float tensor [B, H, W, 3], unit normals in ``convention``.
        convention: one of NORMAL_CONVENTIONS; DMP's normal adapters predict "omnidata".
        flip_x, flip_y, flip_z: invert that channel (rgb' = 1 - rgb) after conversion, for
            models whose axis signs differ (the x sign of the Omnidata frame was derived from
            published images).

    Returns:
        float32 tensor [B, H, W, 3], rgb = (n + 1) / 2 in the BAE frame, in [0, 1].
    """
    n = convert_normals(normals, convention, "bae").float()
    flips = torch.tensor([-1.0 if f else 1.0 for f in (flip_x, flip_y, flip_z)], device=n.device)
    return normals_to_rgb(n * flips)


def segmentation_to_control(ids: torch.Tensor) -> torch.Tensor:
    """ControlNet segmentation condition (``control_v11p_sd15_seg``): the ADE20K palette.

    Args:
        ids: integer tensor [B, H, W] of ADE20K class ids in 0..149 (e.g. from
            ``palettes.snap_to_palette``).

    Returns:
        float32 tensor [B, H, W, 3], RGB in [0, 1].
    """
    return paint(ids, "ade20k")
