"""Flip ensembles: an image and its mirror in one UNet batch, merged per task, with an uncertainty map.

DMP's sampler is deterministic, so an ensemble must come from transformations of the input.
The horizontal mirror is the one every task allows (the paper trains with random flips, normals
aside): the mirror's prediction is brought back to the image's frame (normals: x negated), fitted
to the image's own prediction where the task needs it (depth: scale and shift), and merged by the
task's rule, which also says how far apart the two were (see the table in ``tasks/codecs.py``).

A "pass" here is any function ``run(images [n, 3, H, W] in [0, 1], cond) -> {name: (raw, uncertainty)}``
returning each adapter's raw values at the images' size (uncertainty [n, H, W] or None); the
prediction path (``prediction.predict_pass``) is one, a flip ensemble wraps one, and tiling
(``tiling.py``) wraps either. Nothing here imports a model library.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from ..tasks.codecs import get_codec
from .alignment import apply_scale_shift, fit_scale, fit_scale_shift

ENSEMBLES = ("none", "flip")
# Alignment fits use a strided subset of about this many pixels: a robust fit over a 12-megapixel
# map would cost seconds and gigabytes, and 16K evenly spread points pin two numbers down as well.
FIT_POINTS = 16384

Passes = dict[str, tuple[torch.Tensor, torch.Tensor | None]]
PassFn = Callable[[torch.Tensor, torch.Tensor | None], Passes]


def fit_subset(values: torch.Tensor) -> torch.Tensor:
    """Every k-th row and column of maps [B, H, W], k chosen so that about FIT_POINTS remain."""
    stride = max(1, math.ceil(math.sqrt(values.shape[-2] * values.shape[-1] / FIT_POINTS)))
    return values[..., ::stride, ::stride]


def align(codec, values: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fit predictions [B, H, W] to a reference of the same shape by the task's rule (``codec.alignment``).

    Depth gets a robust least-squares scale and shift (``alignment.fit_scale_shift``); a fit with a
    scale <= 0 (a pass whose depth runs against the reference's) falls back to a scale alone,
    which is positive for positive depths. Shading gets a scale; other tasks are returned as they are.

    Returns:
        (aligned values, the fitted scale float64 [B], or None without alignment).
    """
    if codec.alignment is None:
        return values, None
    x, y = fit_subset(values), fit_subset(reference)
    if codec.alignment == "scale_shift":
        scale, shift = fit_scale_shift(x, y)
        upside_down = scale <= 0
        if upside_down.any():
            scale = torch.where(upside_down, fit_scale(x, y), scale)
            shift = torch.where(upside_down, torch.zeros_like(shift), shift)
    else:
        scale, shift = fit_scale(x, y), None
    return codec.project(apply_scale_shift(values, scale, shift)), scale


def merge_members(task: str, members: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge predictions of one batch [B, H, W(, C)], all in the image's frame; the first is the reference.

    Returns:
        (merged raw values, uncertainty float32 [B, H, W]; see the table in ``tasks/codecs.py``).
    """
    codec = get_codec(task)
    aligned = [members[0]] + [align(codec, member, members[0])[0] for member in members[1:]]
    return codec.merge(torch.stack(aligned))


def predict_flip(run: PassFn, images: torch.Tensor, cond: torch.Tensor | None, tasks: Mapping[str, str]) -> Passes:
    """Predict images [b, 3, H, W] and their mirrors in one pass (rows [images; mirrors]), then merge.

    Args:
        run: the pass to ensemble (see the module docstring).
        cond: prompt embeddings [1 or b, L, D] or None; repeated for the mirrors.
        tasks: {adapter name: task}.

    Returns:
        {name: (merged raw [b, H, W(, C)], uncertainty [b, H, W])}.
    """
    if cond is not None and cond.shape[0] > 1:
        cond = torch.cat([cond, cond])
    out = run(torch.cat([images, images.flip(-1)]), cond)
    merged = {}
    for name, (raw, _) in out.items():
        original, mirrored = raw.chunk(2)
        merged[name] = merge_members(tasks[name], [original, get_codec(tasks[name]).mirror(mirrored)])
    return merged


def uncertainty_visual(task: str, uncertainty: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """Grey preview [B, H, W, 3] in [0, 1] of an uncertainty map [B, H, W]: black = the members agree,
    white = the task's ``uncertainty_scale`` or more (a fixed scale, so confident images stay dark)."""
    return get_codec(task).uncertainty_level(uncertainty, raw).unsqueeze(-1).expand(-1, -1, -1, 3).contiguous()
