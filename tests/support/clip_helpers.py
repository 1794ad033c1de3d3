"""Synthetic clips for the video tests: ``panning_clip``, depth frames of a room seen by a camera panning
one pixel per frame (the stand-in backend they run through is ``standins.PixelBackend``)."""

from __future__ import annotations

import torch


def panning_clip(frames: int = 32, size: int = 32, side_wall: bool = True) -> torch.Tensor:
    """Depth [frames, size, size] in metres: a window sliding one pixel right per frame over a room.

    The room: a floor receding toward the horizon, a back wall at 6 m, a near box (1 m) that enters
    from the right halfway through and (`side_wall`) a wall receding from the left, whose depth at
    each pixel grows as the camera turns away from it. Frame t + 1 shows at column c what frame t
    showed at column c + 1, so the motion can be undone exactly.
    """
    width = size + frames
    rows = torch.arange(size, dtype=torch.float32)[:, None].expand(size, width)
    cols = torch.arange(width, dtype=torch.float32)[None].expand(size, width)
    horizon = size * 0.4
    far = torch.full_like(rows, 6.0)
    floor = torch.where(rows > horizon, 1.2 * size / (rows - horizon).clamp_min(1e-3), far)
    depth = torch.minimum(floor, far)
    if side_wall:
        depth = torch.minimum(depth, 1.5 + 0.08 * cols)
    box = (rows >= size // 2) & (rows < size * 3 // 4) & (cols >= width - size // 2) & (cols < width - size // 4)
    depth = torch.where(box, torch.ones_like(depth), depth)
    return torch.stack([depth[:, t:t + size] for t in range(frames)])
