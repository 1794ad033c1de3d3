"""Validation metrics per task, accumulated over pixels of a whole validation set.

- depth: AbsRel = mean |d - d*| / d* and delta1 = share of pixels with max(d / d*, d* / d) < 1.25,
  over pixels with ground truth d* > 0 (metric depth: no scale or shift alignment, as DMP's
  depth adapters predict metres);
- normal: mean angular error in degrees over pixels with a valid (non-zero) ground-truth normal;
- segmentation: mIoU over the 150 ADE20K classes (classes absent from both prediction and truth
  are left out, as mmsegmentation does), and pixel accuracy;
- albedo, shading, rgb: MSE on [0, 1] values against the target as the codec encodes it (min-max
  normalised for albedo and shading).

Pixels are pooled over the set, so the best constant depth (``best_constant_depth``) is the exact
minimiser of the pooled AbsRel, the baseline the miniature world is judged against.
"""

from __future__ import annotations

import math

import torch

from dmp_model.palettes import NUM_CLASSES

METRICS = {"depth": ("abs_rel", "delta1"), "normal": ("angular_error_deg",),
           "segmentation": ("miou", "pixel_acc"), "albedo": ("mse",), "shading": ("mse",), "rgb": ("mse",)}
# The headline metric of each task (the curves plot draws it). Most are errors (lower is better);
# mIoU, pixel accuracy and delta1 are scores (higher is better): see HIGHER_IS_BETTER.
MAIN_METRIC = {"depth": "abs_rel", "normal": "angular_error_deg", "segmentation": "miou",
               "albedo": "mse", "shading": "mse", "rgb": "mse"}
HIGHER_IS_BETTER = frozenset({"delta1", "miou", "pixel_acc"})


def _minmax(values: torch.Tensor) -> torch.Tensor:
    flat = values.flatten(1)
    low, high = flat.min(1).values, flat.max(1).values
    shape = (-1,) + (1,) * (values.ndim - 1)
    return (values - low.view(shape)) / (high - low).clamp_min(1e-12).view(shape)


class TaskMetrics:
    """Sums over pixels for one task; ``update`` per batch of raw predictions, ``compute`` at the end."""

    def __init__(self, task: str):
        if task not in METRICS:
            raise ValueError(f"task must be one of {tuple(METRICS)}, got {task!r}")
        self.task = task
        self.sums: dict[str, float] = {}
        self.confusion = (torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64) if task == "segmentation"
                          else None)

    def _add(self, **values: float) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)

    def update(self, prediction: torch.Tensor, truth: torch.Tensor) -> None:
        """Raw prediction and ground truth of one batch, same layout (see dmp_model.tasks)."""
        prediction, truth = prediction.detach().cpu(), truth.detach().cpu()
        if prediction.shape != truth.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and truth {tuple(truth.shape)} differ "
                             "in shape")
        if self.task == "depth":
            valid = truth > 0
            d, g = prediction.float()[valid], truth.float()[valid]
            ratio = torch.maximum(d / g, g / d.clamp_min(1e-6))
            self._add(abs_rel=((d - g).abs() / g).sum(), delta1=(ratio < 1.25).sum(), pixels=valid.sum())
        elif self.task == "normal":
            valid = truth.norm(dim=-1) > 0.5
            cosine = torch.nn.functional.cosine_similarity(prediction.float(), truth.float(), dim=-1)[valid]
            self._add(angle=torch.rad2deg(torch.acos(cosine.clamp(-1, 1))).sum(), pixels=valid.sum())
        elif self.task == "segmentation":
            index = truth.long().flatten() * NUM_CLASSES + prediction.long().flatten()
            self.confusion += torch.bincount(index, minlength=NUM_CLASSES**2).view(NUM_CLASSES, NUM_CLASSES)
        else:
            if self.task in ("albedo", "shading"):
                truth = _minmax(truth.float())
            self._add(squared=((prediction.float() - truth.float()) ** 2).sum(), pixels=truth.numel())

    def compute(self) -> dict[str, float]:
        """The task's metrics (NaN before any update)."""
        s = self.sums
        if self.task == "segmentation":
            inter = self.confusion.diag().double()
            union = self.confusion.sum(0).double() + self.confusion.sum(1).double() - inter
            present = union > 0
            total = self.confusion.sum().item()
            return {"miou": (inter[present] / union[present]).mean().item() if present.any() else math.nan,
                    "pixel_acc": inter.sum().item() / total if total else math.nan}
        pixels = s.get("pixels", 0.0)
        if not pixels:
            return {name: math.nan for name in METRICS[self.task]}
        if self.task == "depth":
            return {"abs_rel": s["abs_rel"] / pixels, "delta1": s["delta1"] / pixels}
        if self.task == "normal":
            return {"angular_error_deg": s["angle"] / pixels}
        return {"mse": s["squared"] / pixels}


def best_constant_depth(depth: torch.Tensor) -> float:
    """The constant c minimising the pooled AbsRel sum |c - d| / d over valid pixels (d > 0).

    That is the weighted median of d with weights 1/d: the sum is convex and piecewise linear in
    c, and its slope sum(sign(c - d) / d) changes sign there.
    """
    values = depth[depth > 0].double().flatten()
    if values.numel() == 0:
        raise ValueError("depth has no valid (positive) pixels")
    values, _ = values.sort()
    weights = 1.0 / values
    cumulative = weights.cumsum(0)
    return float(values[int(torch.searchsorted(cumulative, cumulative[-1] / 2))])


def constant_depth_abs_rel(depth: torch.Tensor) -> tuple[float, float]:
    """(best constant, its AbsRel) over the valid pixels of `depth`."""
    c = best_constant_depth(depth)
    valid = depth[depth > 0].double()
    return c, float(((c - valid).abs() / valid).mean())


def best_constant_depth_map(depths: torch.Tensor) -> torch.Tensor:
    """Per pixel, the depth minimising AbsRel over a set of depth maps [N, H, W] (all > 0): the
    weighted median with weights 1/d. Used on training maps, it is a "layout prior" that ignores
    the image: a predictor that reads images should beat it on held-out scenes."""
    if depths.ndim != 3 or not bool((depths > 0).all()):
        raise ValueError(f"depths must be [N, H, W] and positive, got shape {tuple(depths.shape)}")
    values, _ = depths.double().sort(0)
    cumulative = (1.0 / values).cumsum(0)
    index = (cumulative >= cumulative[-1:] / 2).double().argmax(0)  # first position past half the weight
    return values.gather(0, index[None])[0].float()
