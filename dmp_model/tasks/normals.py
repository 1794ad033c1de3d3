"""Surface normals: the camera conventions DMP meets, converting between them, and normal <-> RGB.

A normal map's image is rgb = (n + 1) / 2 in some camera frame; the frames differ by the signs of
their axes (see ``NORMAL_CONVENTIONS``). DMP's normal adapters predict "omnidata"; ControlNet's
normalbae model wants "bae" (``controlnet.normals_to_control``).

All tensors are channels-last [B, H, W, 3].
"""

from __future__ import annotations

import torch

from ..options import check_option, describe_value

# Per-axis signs taking each convention's normals into the BAE frame (and back: signs are +-1).
_NORMAL_AXIS_SIGNS: dict[str, tuple[float, float, float]] = {
    "omnidata": (-1.0, -1.0, -1.0),  # OpenCV camera frame: x right, y down, z into the scene
    "bae": (1.0, 1.0, 1.0),  # ControlNet normalbae: x toward image left, y up, z toward viewer
    "marigold": (-1.0, 1.0, 1.0),  # x right, y up, z toward the viewer
}
NORMAL_CONVENTIONS = tuple(_NORMAL_AXIS_SIGNS)

_NORMAL_EPS = 1e-12


def convert_normals(normals: torch.Tensor, source: str, target: str) -> torch.Tensor:
    """Express normals given in one camera convention in another (per-axis sign flips).

    Args:
        normals: float tensor [B, H, W, 3] of normal vectors in the ``source`` convention.
        source, target: each one of NORMAL_CONVENTIONS.

    Returns:
        tensor [B, H, W, 3] of normals in the ``target`` convention, same dtype.
    """
    _check_normals(normals, "normals")
    for arg, value in (("source", source), ("target", target)):
        check_option(arg, value, NORMAL_CONVENTIONS)
    signs = [s * t for s, t in zip(_NORMAL_AXIS_SIGNS[source], _NORMAL_AXIS_SIGNS[target])]
    return normals * torch.tensor(signs, dtype=normals.dtype, device=normals.device)


def normals_to_rgb(normals: torch.Tensor) -> torch.Tensor:
    """rgb = (n + 1) / 2, clamped to [0, 1] (no change of convention).

    Args:
        normals: float tensor [B, H, W, 3], unit normals (components in [-1, 1]).

    Returns:
        tensor [B, H, W, 3] in [0, 1], same dtype.
    """
    _check_normals(normals, "normals")
    return ((normals + 1) / 2).clamp(0.0, 1.0)


def rgb_to_normals(rgb: torch.Tensor) -> torch.Tensor:
    """n = 2 * rgb - 1, renormalised to unit length; zero vectors stay zero (finite).

    Args:
        rgb: float tensor [B, H, W, 3] in [0, 1].

    Returns:
        tensor [B, H, W, 3] of unit (or zero) vectors, same dtype.
    """
    _check_normals(rgb, "rgb")
    n = 2 * rgb - 1
    return n / n.norm(dim=-1, keepdim=True).clamp_min(_NORMAL_EPS)


def _check_normals(value: torch.Tensor, arg: str) -> None:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise TypeError(f"{arg} must be a floating-point torch.Tensor, got {describe_value(value)}")
    if value.ndim != 4 or value.shape[-1] != 3:
        raise ValueError(f"{arg} must have shape [B, H, W, 3], got {tuple(value.shape)}")
