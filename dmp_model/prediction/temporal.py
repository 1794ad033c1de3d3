"""Temporal alignment: the depth frames of a clip brought to one scale, so that they do not flicker.

DMP's sampler is deterministic, so a clip has no noise flicker; but each frame's metric scale is
estimated afresh, and consecutive frames come out slightly scaled against each other.
``TemporalAligner`` fits every frame d (robust least squares, ``alignment.fit_scale``) to a running
reference R built from the frames before it, and moves it toward that fit:

    s          = argmin_s |s * d - R|^2          (robust; on the flattest pixels valid in both, below)
    d_aligned  = (1 - strength) * d + strength * s * d
    R          = momentum * R + (1 - momentum) * d_aligned   (an exponential moving average)

strength 0 leaves every frame as predicted, 1 gives each frame the reference's scale (a fit only:
the shape of a frame is never changed). The first frame has no reference and is kept, so a fully
aligned clip takes the metric scale of its first frames. A fit whose scale is not positive (a scene
cut, or no valid depth) leaves the frame as predicted and restarts the reference from it. The
aligner is stateful: one object per clip and adapter, fed the frames in order in any number of
calls (the CLI streams a long video chunk by chunk through one aligner).

Why scale only, on the flattest pixels. Camera motion moves content between pixels, and a per-pixel
fit reads part of that motion as a change of scale, which the reference carries on to later frames: a
slow drift. Fitting only the quarter of pixels where depth varies least around them (where a pixel of
motion changes depth least; ``FLAT_FRACTION``) cut that drift several-fold on a turning camera
(``benchmarks/bench_video.py``; the figures are in docs/video.md). Flat pixels span too narrow a range
of depths to tell a scale from a shift, so the fit is a scale only; that suits DMP's metric depth,
whose zero is the camera (a scale-and-shift fit on all pixels drifted as much as a scale fit on all
pixels).
``fit="scale_shift"`` (``alignment.fit_scale_shift`` on every valid pixel) remains for relative
depth that really has a free shift, best from a steady camera.

What it cannot know: a real change of the depths in view (the camera moving toward a wall) looks
like drift, so with strength 1 a fast-moving clip slowly departs from metric scale, while its
frame-to-frame flicker still falls (docs/video.md). Lower strengths trade flicker for metric fidelity.

Which tasks (``TEMPORAL_TASKS``): depth only.
- Normals are unit vectors in the camera frame: they have no free scale or shift (any scale is
  removed by renormalising), so there is nothing to align; what changes between frames is the
  prediction itself.
- Albedo and shading are trained on targets min-max normalised per image, so each frame's
  prediction is anchored at both ends of [0, 1] by its own darkest and brightest surfaces. Between
  frames showing the same surfaces those anchors agree and nothing drifts; when a brighter or darker
  surface enters the view, the whole frame is re-normalised, which is what the quantity means (it
  is relative to the frame). Undoing that would need values outside [0, 1], which these tasks'
  raw outputs promise not to hold, so they are not aligned. Metric depth has no such anchor: its
  scale is free to drift, and that is the drift this module removes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..options import check_fraction, check_option
from .alignment import fit_scale, fit_scale_shift

TEMPORAL_TASKS = ("depth",)
TEMPORAL_FITS = ("scale", "scale_shift")
# Weight of the old reference in each update: 0.5 halves a frame's influence per frame, so the
# reference follows a moving camera within a few frames while averaging out single-frame errors.
DEFAULT_MOMENTUM = 0.5
# The fraction of valid pixels fitted: those with the smallest relative depth gradient (see above).
FLAT_FRACTION = 0.25
# One parameter needs few points: larger frames are fitted (and the reference kept) on a regular grid
# of every k-th row and column, so the cost per frame does not grow with the frame (speed only).
_FIT_POINTS = 1 << 16


def _relative_gradient(depth: torch.Tensor) -> torch.Tensor:
    """|d depth / dx| + |d depth / dy| (central differences, 0 across the border) over depth, [H, W]."""
    gradient = torch.zeros_like(depth)
    gradient[:, 1:-1] += (depth[:, 2:] - depth[:, :-2]).abs() / 2
    gradient[1:-1] += (depth[2:] - depth[:-2]).abs() / 2
    return gradient / depth.clamp_min(1e-6)


class TemporalAligner:
    """Aligns a clip's depth frames, in order, to a running reference of the frames before them.

    Args:
        strength: 0 (off: frames unchanged) .. 1 (each frame given the reference's scale); in
            between, the aligned frame is (1 - strength) * d + strength * (s * d + t), t = 0 for "scale".
        momentum: weight of the old reference in its moving average, in [0, 1); 0 makes the
            reference the previous aligned frame.
        fit: one of TEMPORAL_FITS: "scale" (DMP's metric depth) or "scale_shift".

    Attributes:
        reference: float32 [h, w], the running reference on the fitting grid (every k-th row and
            column, k chosen so that it holds at most 2**16 pixels; the full frame when smaller);
            None before the first frame.
        size: the clip's frame size (H, W).
    """

    def __init__(self, strength: float = 1.0, momentum: float = DEFAULT_MOMENTUM, fit: str = "scale"):
        self.strength = check_fraction("strength", strength)
        self.momentum = check_fraction("momentum", momentum, high_open=True)
        check_option("fit", fit, TEMPORAL_FITS)
        self.fit = fit
        self.reference: torch.Tensor | None = None
        self.size: tuple[int, int] | None = None

    def reset(self) -> None:
        """Forget the reference (a new clip starts)."""
        self.reference, self.size = None, None

    def __call__(self, depth: torch.Tensor) -> torch.Tensor:
        """Align a chunk of consecutive frames [B, H, W] (metres, the next B frames of the clip).

        Returns:
            aligned depth [B, H, W], same dtype and device, clamped at 0; the reference advances.
        """
        if not isinstance(depth, torch.Tensor) or not depth.is_floating_point() or depth.ndim != 3:
            raise ValueError(f"depth must be a floating-point tensor [B, H, W], got {_describe(depth)}")
        out = torch.empty_like(depth)
        for i, frame in enumerate(depth):
            out[i] = self.align_frame(frame)
        return out

    def align_frame(self, frame: torch.Tensor) -> torch.Tensor:
        """One frame [H, W] -> the aligned frame; then the reference takes it in (``observe``)."""
        self._check_size(frame)
        aligned = frame
        if self.reference is not None and self.strength > 0:
            scale, shift = self._fit(_grid(frame.detach().float()))
            if math.isfinite(scale) and scale > 0:
                blend_scale, blend_shift = 1 + self.strength * (scale - 1), self.strength * shift
                aligned = (frame * blend_scale + blend_shift).clamp_min(0)
            else:  # a scene cut or no valid depth: start over from this frame
                self.reset()
        self.observe(aligned)
        return aligned

    def observe(self, aligned: torch.Tensor) -> None:
        """Take an already aligned frame [H, W] into the reference (resuming a clip replays its frames)."""
        self._check_size(aligned)
        grid = _grid(aligned.detach().float())
        if self.reference is None:
            self.reference, self.size = grid.clone(), tuple(aligned.shape)
        else:
            self.reference = self.momentum * self.reference.to(grid.device) + (1 - self.momentum) * grid

    def _check_size(self, frame: torch.Tensor) -> None:
        if self.size is not None and self.size != tuple(frame.shape):
            raise ValueError(f"a frame of size {tuple(frame.shape)} does not continue a clip of size "
                             f"{self.size}; use one aligner per clip (or reset() it)")

    def _fit(self, frame: torch.Tensor) -> tuple[float, float]:
        """Robust (scale, shift) of a frame's grid [h, w] onto the reference, on valid pixels (the flattest
        for "scale")."""
        reference = self.reference.to(frame.device)
        d, r = frame.reshape(1, -1), reference.reshape(1, -1)
        valid = (d > 0) & (r > 0)
        if not bool(valid.any()):
            return math.nan, 0.0
        if self.fit == "scale_shift":  # flat pixels span too few depths to pin a scale and a shift apart
            scale, shift = fit_scale_shift(d, r, valid)
            return float(scale[0]), float(shift[0])
        flatness = (_relative_gradient(frame) + _relative_gradient(reference)).reshape(1, -1)
        flat = valid & (flatness <= torch.quantile(flatness[valid], FLAT_FRACTION))
        return float(fit_scale(d, r, flat)[0]), 0.0


def _grid(frame: torch.Tensor) -> torch.Tensor:
    """Every k-th row and column of a frame [H, W], at most _FIT_POINTS pixels (the frame itself when smaller)."""
    step = max(1, math.ceil(math.sqrt(frame.numel() / _FIT_POINTS)))
    return frame[::step, ::step]


def clip_aligners(tasks: Mapping[str, str], strength: float,
                  state: dict[str, TemporalAligner] | None = None) -> dict[str, TemporalAligner]:
    """The aligners of the adapters whose task is aligned (TEMPORAL_TASKS); none when strength is 0.

    Args:
        tasks: {adapter name: task}.
        strength: see ``TemporalAligner`` (``PredictOptions.temporal_alignment``).
        state: a dict the caller keeps across calls for one clip (chunks of a long video): aligners
            found there continue their reference, new ones are stored in it.

    Returns:
        {adapter name: TemporalAligner} for the aligned adapters.
    """
    strength = check_fraction("temporal_alignment", strength)
    if strength == 0:
        return {}
    state = {} if state is None else state
    for name, task in tasks.items():
        if task in TEMPORAL_TASKS and name not in state:
            state[name] = TemporalAligner(strength)
    return {name: state[name] for name in tasks if name in state}


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
