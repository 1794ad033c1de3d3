"""A pinhole camera with its principal point at the image centre: pixel rays, back-projection, frames.

Pixel (row i, column j) is the square [j, j + 1] x [i, i + 1]; its ray goes through its centre
(j + 0.5, i + 0.5), as the miniature world's renderer (``training/demo/world.py``) casts them. With the
horizontal field of view ``hfov`` the focal length in pixels is f = W / 2 / tan(hfov / 2), and the
point of depth z (the camera's z coordinate, what DMP's depth predicts, not the ray length) at that
pixel is, in the OpenCV camera frame (x right, y down, z forward),

    X = (j + 0.5 - W / 2) / f * z,   Y = (i + 0.5 - H / 2) / f * z,   Z = z.

The files use glTF's frame (x right, y up, z toward the viewer: the camera looks down -z), metres.
The two frames differ by the signs of y and z, the same flip that takes Omnidata normals into
Marigold's (``tasks.normals``): points and normals change frame alike.
"""

from __future__ import annotations

import math
import numbers

import torch

from ..tasks.normals import convert_normals

# Hypersim's camera (60 degrees across), the data DMP's depth adapters were trained on.
DEFAULT_HFOV_DEGREES = 60.0
# Open interval: 0 and 180 degrees have no finite focal length.
HFOV_RANGE_DEGREES = (1.0, 179.0)
# The camera frames of tasks.normals that the geometry uses: the pixel grid's (OpenCV) and glTF's.
OPENCV_FRAME = "omnidata"  # x right, y down, z forward
GLTF_FRAME = "marigold"  # x right, y up, z toward the viewer


def check_hfov(hfov_degrees: float) -> float:
    """The horizontal field of view in degrees as a float, if it lies in HFOV_RANGE_DEGREES (open)."""
    low, high = HFOV_RANGE_DEGREES
    if isinstance(hfov_degrees, bool) or not isinstance(hfov_degrees, numbers.Real) \
            or not low < hfov_degrees < high:
        raise ValueError(f"hfov_degrees must be a horizontal field of view in degrees in ({low:g}, {high:g}), "
                         f"got {hfov_degrees!r}; DMP does not predict the camera: give the photo's (a phone's "
                         f"main camera is about 65-70 degrees), or {DEFAULT_HFOV_DEGREES:g} (Hypersim's)")
    return float(hfov_degrees)


def focal_length(width: int, hfov_degrees: float) -> float:
    """Focal length in pixels of an image `width` pixels wide seen across `hfov_degrees`."""
    return width / 2 / math.tan(math.radians(check_hfov(hfov_degrees)) / 2)


def pixel_rays(height: int, width: int, hfov_degrees: float, rows: torch.Tensor | None = None,
               cols: torch.Tensor | None = None) -> torch.Tensor:
    """Rays through pixel centres, scaled to z = 1, in the OpenCV camera frame.

    Args:
        height, width: the image size in pixels (the principal point is its centre).
        hfov_degrees: horizontal field of view, in HFOV_RANGE_DEGREES.
        rows, cols: integer tensors [h], [w] of the pixels to use (default: all).

    Returns:
        float32 [h, w, 3]: (x / z, y / z, 1) of each pixel's ray.
    """
    f = focal_length(width, hfov_degrees)
    rows = torch.arange(height) if rows is None else rows
    cols = torch.arange(width) if cols is None else cols
    y = (rows.double() + 0.5 - height / 2) / f
    x = (cols.double() + 0.5 - width / 2) / f
    grid_y, grid_x = torch.meshgrid(y, x, indexing="ij")
    return torch.stack([grid_x, grid_y, torch.ones_like(grid_x)], -1).float()


def back_project(depth: torch.Tensor, rays: torch.Tensor) -> torch.Tensor:
    """Points [..., 3] in the OpenCV camera frame, metres: each ray [..., 3] (z = 1) times its depth [...]."""
    return rays * depth.unsqueeze(-1)


def opencv_to_gltf(vectors: torch.Tensor) -> torch.Tensor:
    """Points or normals [..., 3] from the OpenCV camera frame into glTF's (y and z negated)."""
    flat = vectors.reshape(1, 1, -1, 3)
    return convert_normals(flat, OPENCV_FRAME, GLTF_FRAME).reshape(vectors.shape)


# The fewest vertices a budget may allow: one quad of the pixel grid (two triangles).
MIN_VERTEX_BUDGET = 4


def check_vertex_budget(vertex_budget: int) -> int:
    """The vertex budget, if it is an integer of at least MIN_VERTEX_BUDGET."""
    if isinstance(vertex_budget, bool) or not isinstance(vertex_budget, numbers.Integral) \
            or vertex_budget < MIN_VERTEX_BUDGET:
        raise ValueError(f"vertex_budget must be an integer of at least {MIN_VERTEX_BUDGET} (a 2 x 2 grid: one "
                         f"quad), got {vertex_budget!r}; it bounds the vertices (or points) of the asset")
    return int(vertex_budget)


def grid_indices(height: int, width: int, vertex_budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pixel rows and columns sampled so that the grid holds at most `vertex_budget` vertices.

    Every pixel when the image fits; else about sqrt(budget / (H * W)) of the rows and of the
    columns, evenly spread from the first to the last. The samples are pixels, not averages: a
    vertex never takes a depth halfway between a chair and the wall behind it.

    Returns:
        int64 tensors rows [h], cols [w], increasing, with h * w <= vertex_budget.
    """
    budget = check_vertex_budget(vertex_budget)
    if height * width <= budget:
        return torch.arange(height), torch.arange(width)
    scale = math.sqrt(budget / (height * width))
    h = min(height, max(2, math.floor(height * scale)))
    w = min(width, max(2, budget // h))
    h = min(h, budget // w)  # a very thin image: the short side took 2 and the long side the rest
    return _spread(height, h), _spread(width, w)


def _spread(size: int, count: int) -> torch.Tensor:
    """`count` distinct indices of 0..size-1 from the first to the last, as even as integers allow."""
    if count == 1:
        return torch.zeros(1, dtype=torch.long)
    return torch.round(torch.linspace(0, size - 1, count, dtype=torch.float64)).long()
