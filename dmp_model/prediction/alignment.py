"""Aligning one prediction to another: least-squares scale (and shift), robust to outliers.

Shared by everything that must make separately predicted maps agree before merging or comparing
them: tiles against the global pass, a clip's frames against a running reference, predictions
against ground truth in evaluation (relative depth is compared after a scale and shift fit).

Robustness: a starting fit from medians, then a few rounds of refitting on the better half of the
points (smallest residuals; this pulls the fit onto the inliers even when up to about half the
points are wrong), then on every point whose residual is within ``OUTLIER_MADS`` scaled median
absolute residuals (so all good points count in the end). An occlusion edge or a wrong object
cannot drag the fit. Every function works per batch row.
"""

from __future__ import annotations

import torch

# Residuals beyond this many (scaled) median absolute deviations are outliers; 1.4826 turns the MAD
# of Gaussian residuals into their standard deviation, so 3 keeps ~99.7 % of well-behaved points.
OUTLIER_MADS = 3.0
_MAD_TO_STD = 1.4826
HALF_ROUNDS, ROBUST_ROUNDS = 3, 2


def _flatten(values: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, ...] values and a [B, ...] boolean mask (all True by default) as [B, N] float64 and bool."""
    flat = values.detach().reshape(values.shape[0], -1).double()
    keep = torch.ones_like(flat, dtype=torch.bool) if mask is None else mask.reshape(values.shape[0], -1).bool()
    return flat, keep & torch.isfinite(flat)


def _weighted_fit(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, with_shift: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares y ~ s * x (+ t) per row with 0/1 weights; rows without points get s = 1, t = 0."""
    n = w.sum(1)
    if with_shift:
        mean_x = (w * x).sum(1) / n.clamp_min(1)
        mean_y = (w * y).sum(1) / n.clamp_min(1)
        dx, dy = x - mean_x[:, None], y - mean_y[:, None]
        var = (w * dx * dx).sum(1)
        scale = torch.where(var > 0, (w * dx * dy).sum(1) / var.clamp_min(1e-300), torch.ones_like(var))
        shift = mean_y - scale * mean_x
    else:
        xx = (w * x * x).sum(1)
        scale = torch.where(xx > 0, (w * x * y).sum(1) / xx.clamp_min(1e-300), torch.ones_like(xx))
        shift = torch.zeros_like(scale)
    empty = n < (2 if with_shift else 1)
    return torch.where(empty, torch.ones_like(scale), scale), torch.where(empty, torch.zeros_like(shift), shift)


def _median_fit(x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor, with_shift: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """A starting fit from medians only (robust to almost half the points being wrong): the scale is the
    ratio of the median absolute deviations (signed by the median co-deviation), or of the medians."""
    xs, ys = torch.where(keep, x, torch.nan), torch.where(keep, y, torch.nan)
    mx, my = xs.nanmedian(dim=1).values, ys.nanmedian(dim=1).values
    if not with_shift:
        scale = torch.where(mx != 0, my / torch.where(mx != 0, mx, torch.ones_like(mx)), torch.ones_like(mx))
        return torch.nan_to_num(scale, nan=1.0), torch.zeros_like(scale)
    dx, dy = xs - mx[:, None], ys - my[:, None]
    spread_x, spread_y = dx.abs().nanmedian(dim=1).values, dy.abs().nanmedian(dim=1).values
    sign = torch.sign((dx * dy).nanmedian(dim=1).values)
    scale = torch.where(spread_x > 0, torch.where(sign == 0, 1.0, sign) * spread_y / spread_x.clamp_min(1e-300),
                        torch.ones_like(spread_x))
    scale = torch.nan_to_num(scale, nan=1.0)
    return scale, torch.nan_to_num(my - scale * mx, nan=0.0)


def _robust_fit(prediction, target, mask, with_shift: bool, robust: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x, keep = _flatten(prediction, mask)
    y, keep_y = _flatten(target, None)
    keep = keep & keep_y
    if not robust:
        return _weighted_fit(x, y, keep.double(), with_shift)
    scale, shift = _median_fit(x, y, keep, with_shift)
    for round_ in range(HALF_ROUNDS + ROBUST_ROUNDS):
        residual = (y - (scale[:, None] * x + shift[:, None])).abs()
        masked = torch.where(keep, residual, torch.nan)
        median = masked.nanmedian(dim=1).values[:, None]
        if round_ < HALF_ROUNDS:  # the better half first: a plain fit may sit far from the inliers
            inliers = keep & (residual <= median)
        else:  # then every point within a few deviations of the (now good) fit
            # A floor relative to the data, so that a perfect fit (zero deviation) keeps its exact points only.
            floor = 1e-9 * (1 + torch.where(keep, y.abs(), torch.nan).nanmedian(dim=1).values)
            limit = torch.maximum(OUTLIER_MADS * _MAD_TO_STD * median[:, 0], floor)
            inliers = keep & (residual <= limit[:, None])
        scale, shift = _weighted_fit(x, y, inliers.double(), with_shift)
    return scale, shift


def fit_scale_shift(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                    robust: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) per row minimising |scale * prediction + shift - target|^2 over the mask.

    Args:
        prediction, target: [B, ...] of one shape; non-finite values are ignored.
        mask: optional [B, ...] booleans, the points to fit on.
        robust: refit without outliers (see the module docstring).

    Returns:
        float64 tensors [B]; a row with fewer than two points gets (1, 0).
    """
    _check_pair(prediction, target, mask)
    return _robust_fit(prediction, target, mask, True, robust)


def fit_scale(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
              robust: bool = True) -> torch.Tensor:
    """The scale per row minimising |scale * prediction - target|^2 over the mask (float64 [B])."""
    _check_pair(prediction, target, mask)
    return _robust_fit(prediction, target, mask, False, robust)[0]


def apply_scale_shift(values: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
    """scale * values + shift with per-row [B] coefficients, in the values' dtype."""
    shape = (-1,) + (1,) * (values.ndim - 1)
    out = values.double() * scale.reshape(shape).to(values.device)
    if shift is not None:
        out = out + shift.reshape(shape).to(values.device)
    return out.to(values.dtype)


def _check_pair(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> None:
    if prediction.shape != target.shape:
        raise ValueError(f"prediction and target must have the same shape, got {tuple(prediction.shape)} "
                         f"and {tuple(target.shape)}")
    if mask is not None and mask.shape != prediction.shape:
        raise ValueError(f"mask must have the prediction's shape {tuple(prediction.shape)}, got {tuple(mask.shape)}")
