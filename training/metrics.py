"""Validation metrics per task, accumulated over pixels of a whole validation set.

- depth: AbsRel = mean |d - d*| / d* and delta1 = share of pixels with max(d / d*, d* / d) < 1.25,
  over pixels with ground truth d* > 0. ``depth_alignment="none"`` (default) compares metres as
  predicted (metric depth, as DMP's depth adapters predict); "scale_shift" first fits each image's
  prediction to its truth by least squares (``dmp_model.prediction.alignment``, plain, not robust, as depth
  benchmarks do for relative depth), in depth, over the valid pixels;
- normal: mean and median angular error in degrees over pixels with a valid (non-zero)
  ground-truth normal, and the share of them under 11.25 degrees (the median from a histogram
  of 0.01-degree bins);
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

from dmp_model.options import check_option
from dmp_model.prediction.alignment import apply_scale_shift, fit_scale_shift
from dmp_model.tasks.palettes import NUM_CLASSES

DEPTH_ALIGNMENTS = ("none", "scale_shift")
_ANGLE_BINS = 18000  # 0.01-degree bins over [0, 180] for the median angular error
METRICS = {"depth": ("abs_rel", "delta1"),
           "normal": ("angular_error_deg", "angular_median_deg", "within_11_25deg"),
           "segmentation": ("miou", "pixel_acc"), "albedo": ("mse",), "shading": ("mse",), "rgb": ("mse",)}
# The headline metric of each task (the curves plot draws it). Most are errors (lower is better);
# mIoU, pixel accuracy and delta1 are scores (higher is better): see HIGHER_IS_BETTER.
MAIN_METRIC = {"depth": "abs_rel", "normal": "angular_error_deg", "segmentation": "miou",
               "albedo": "mse", "shading": "mse", "rgb": "mse"}
HIGHER_IS_BETTER = frozenset({"delta1", "miou", "pixel_acc", "within_11_25deg"})


def _minmax(values: torch.Tensor) -> torch.Tensor:
    flat = values.flatten(1)
    low, high = flat.min(1).values, flat.max(1).values
    shape = (-1,) + (1,) * (values.ndim - 1)
    return (values - low.view(shape)) / (high - low).clamp_min(1e-12).view(shape)


class TaskMetrics:
    """Sums over pixels for one task; ``update`` per batch of raw predictions, ``compute`` at the end."""

    def __init__(self, task: str, depth_alignment: str = "none"):
        check_option("task", task, tuple(METRICS))
        check_option("depth_alignment", depth_alignment, DEPTH_ALIGNMENTS)
        self.task, self.depth_alignment = task, depth_alignment
        self.sums: dict[str, float] = {}
        self.confusion = (torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64) if task == "segmentation"
                          else None)
        self.angles = torch.zeros(_ANGLE_BINS, dtype=torch.int64) if task == "normal" else None

    def _add(self, **values: float) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)

    def update(self, prediction: torch.Tensor, truth: torch.Tensor) -> None:
        """Raw prediction and ground truth of one batch, same layout (see dmp_model.tasks.codecs)."""
        prediction, truth = prediction.detach().cpu(), truth.detach().cpu()
        if prediction.shape != truth.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and truth {tuple(truth.shape)} differ "
                             "in shape")
        if self.task == "depth":
            valid = truth > 0
            if self.depth_alignment == "scale_shift":
                prediction = apply_scale_shift(prediction.float(), *fit_scale_shift(prediction, truth, valid,
                                                                                    robust=False))
            d, g = prediction.float()[valid], truth.float()[valid]
            ratio = torch.maximum(d / g, g / d.clamp_min(1e-6))
            self._add(abs_rel=((d - g).abs() / g).sum(), delta1=(ratio < 1.25).sum(), pixels=valid.sum())
        elif self.task == "normal":
            valid = truth.norm(dim=-1) > 0.5
            cosine = torch.nn.functional.cosine_similarity(prediction.float(), truth.float(), dim=-1)[valid]
            angle = torch.rad2deg(torch.acos(cosine.double().clamp(-1, 1)))
            self.angles += torch.bincount((angle / 180 * _ANGLE_BINS).long().clamp(max=_ANGLE_BINS - 1),
                                          minlength=_ANGLE_BINS)
            self._add(angle=angle.sum(), within=(angle < 11.25).sum(), pixels=valid.sum())
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
            return {"angular_error_deg": s["angle"] / pixels, "angular_median_deg": self._median_angle(),
                    "within_11_25deg": s["within"] / pixels}
        return {"mse": s["squared"] / pixels}


    def _median_angle(self) -> float:
        """The median angle to 0.01 degree: the centre of the bin holding the middle pixel."""
        cumulative = self.angles.cumsum(0)
        middle = int(torch.searchsorted(cumulative, (cumulative[-1] + 1) // 2))
        return (middle + 0.5) * 180 / _ANGLE_BINS


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


def best_constant(task: str, truths: list[torch.Tensor], points: int = 65536) -> torch.Tensor:
    """The constant prediction that scores best on targets [H, W(, C)] (for a baseline row).

    Depth: the pooled AbsRel minimiser (``best_constant_depth``); normal: the normalised mean of the
    valid normals; segmentation: the most frequent class; albedo, shading, rgb: the mean of the
    targets as ``TaskMetrics`` compares them (min-max normalised for albedo and shading), which
    minimises the MSE. Each target contributes an evenly strided subset of about `points` pixels.

    Returns:
        a tensor broadcastable to one target: [] (depth, segmentation, shading) or [3].
    """
    def subset(values: torch.Tensor) -> torch.Tensor:
        stride = max(1, math.ceil(math.sqrt(values.shape[0] * values.shape[1] / points)))
        return values[::stride, ::stride]

    if task == "depth":
        return torch.tensor(best_constant_depth(torch.cat([subset(t).flatten() for t in truths])))
    if task == "normal":
        vectors = torch.cat([subset(t).reshape(-1, 3) for t in truths]).float()
        mean = vectors[vectors.norm(dim=-1) > 0.5].mean(0)
        return torch.nn.functional.normalize(mean, dim=0)
    if task == "segmentation":
        counts = sum(torch.bincount(subset(t).flatten().long(), minlength=NUM_CLASSES) for t in truths)
        return counts.argmax()
    normalised = [_minmax(t[None].float())[0] if task in ("albedo", "shading") else t.float() for t in truths]
    values = torch.cat([subset(t).reshape(-1, *t.shape[2:]) for t in normalised])
    return values.mean(0)
