"""A coloured point cloud from metric depth: one point per pixel of the sampled grid with valid depth."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..tasks.normals import convert_normals
from .camera import GLTF_FRAME, back_project, grid_indices, opencv_to_gltf, pixel_rays


@dataclass(frozen=True)
class PointCloud:
    """Points in glTF's frame (x right, y up, z toward the viewer; the camera at the origin), metres.

    Attributes:
        points: float32 [N, 3].
        colors: float32 [N, 3] in [0, 1] (albedo or image at each point's pixel).
        normals: float32 [N, 3] unit vectors in glTF's frame (DMP's normals), or None.
        pixels: int64 [N, 2], (row, column) of each point's pixel.
    """

    points: torch.Tensor
    colors: torch.Tensor
    normals: torch.Tensor | None
    pixels: torch.Tensor


def check_depth_map(depth: torch.Tensor) -> torch.Tensor:
    """The valid-depth mask [H, W] (finite and > 0) of a depth map, which must hold some valid depth."""
    if not isinstance(depth, torch.Tensor) or not depth.is_floating_point() or depth.ndim != 2:
        shape = tuple(depth.shape) if isinstance(depth, torch.Tensor) else type(depth).__name__
        raise ValueError(f"depth must be a floating-point depth map [H, W] in metres, got {shape}")
    if depth.numel() == 0:
        raise ValueError(f"depth is empty ({tuple(depth.shape)}): there is nothing to turn into 3D")
    valid = torch.isfinite(depth) & (depth > 0)
    if not valid.any():
        raise ValueError(f"depth holds no valid value (finite and > 0 metres) among its {depth.numel()} pixels: "
                         f"range {depth.nan_to_num().min().item():g}..{depth.nan_to_num().max().item():g}; "
                         "connect a depth prediction of this image")
    return valid


def sample_normals(normals: torch.Tensor, convention: str, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """DMP normals [H, W, 3] in `convention` at the sampled pixels, in glTF's frame, renormalised: [h, w, 3]
    (zero vectors stay zero)."""
    picked = normals[rows][:, cols].float().unsqueeze(0)
    turned = convert_normals(picked, convention, GLTF_FRAME)[0]
    return turned / turned.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def build_point_cloud(depth: torch.Tensor, colors: torch.Tensor, hfov_degrees: float, vertex_budget: int,
                      normals: torch.Tensor | None = None, normal_convention: str = "omnidata") -> PointCloud:
    """Back-project every sampled pixel with valid depth.

    Args:
        depth: float [H, W], metres (camera z); pixels without a finite, positive depth are skipped.
        colors: float [H, W, 3] in [0, 1]: the albedo, or the image.
        hfov_degrees: horizontal field of view (``camera.check_hfov``).
        vertex_budget: at most this many points (``camera.grid_indices``).
        normals: float [H, W, 3], DMP's normals in `normal_convention` (tasks.normals), or None.

    Returns:
        a PointCloud, points in row-major pixel order.
    """
    valid = check_depth_map(depth)
    height, width = depth.shape
    rows, cols = grid_indices(height, width, vertex_budget)
    keep = valid[rows][:, cols].flatten()  # [h * w]
    points = back_project(depth[rows][:, cols].float(), pixel_rays(height, width, hfov_degrees, rows, cols))
    grid_rows, grid_cols = torch.meshgrid(rows, cols, indexing="ij")
    pixels = torch.stack([grid_rows, grid_cols], -1).reshape(-1, 2)[keep]
    turned = None if normals is None else sample_normals(normals, normal_convention, rows, cols).reshape(-1, 3)[keep]
    return PointCloud(points=opencv_to_gltf(points.reshape(-1, 3)[keep]),
                      colors=colors[rows][:, cols].float().reshape(-1, 3)[keep].clamp(0, 1),
                      normals=turned, pixels=pixels)
