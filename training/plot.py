"""The training log (log.jsonl): reading it, and line plots of it drawn with Pillow alone (no matplotlib)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from dmp_model.io.writers import atomic_path

from .metrics import HIGHER_IS_BETTER, MAIN_METRIC

_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))
_PANEL = (520, 260)
_MARGIN = (64, 28, 16, 36)  # left, top, right, bottom


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    return [low + (high - low) * i / (count - 1) for i in range(count)]


def _label(value: float) -> str:
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.4g}"
    return f"{value:.2e}"


def _draw_panel(draw, font, origin: tuple[int, int], title: str, series: dict[str, list[tuple[float, float]]],
                log_y: bool) -> None:
    x0, y0 = origin
    left, top, right, bottom = _MARGIN
    width, height = _PANEL[0] - left - right, _PANEL[1] - top - bottom
    box = (x0 + left, y0 + top, x0 + left + width, y0 + top + height)
    draw.text((x0 + left, y0 + 6), title, fill=(0, 0, 0), font=font)
    points = [(x, y) for values in series.values() for x, y in values
              if math.isfinite(y) and (y > 0 or not log_y)]
    draw.rectangle(box, outline=(0, 0, 0))
    if not points:
        draw.text((box[0] + 8, box[1] + 8), "no data", fill=(120, 120, 120), font=font)
        return
    fy = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    xs, ys = [p[0] for p in points], [fy(p[1]) for p in points]
    x_low, x_high = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y_low, y_high = min(ys), max(ys)
    if y_high - y_low < 1e-12:
        y_low, y_high = y_low - 0.5, y_high + 0.5

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        return (box[0] + (x - x_low) / (x_high - x_low) * width,
                box[3] - (fy(y) - y_low) / (y_high - y_low) * height)

    for tick in _ticks(y_low, y_high):
        py = box[3] - (tick - y_low) / (y_high - y_low) * height
        draw.line((box[0], py, box[2], py), fill=(225, 225, 225))
        draw.text((x0 + 4, py - 6), _label(10**tick if log_y else tick), fill=(0, 0, 0), font=font)
    for tick in _ticks(x_low, x_high):
        px = box[0] + (tick - x_low) / (x_high - x_low) * width
        draw.text((px - 10, box[3] + 6), f"{tick:.0f}", fill=(0, 0, 0), font=font)
    for i, (name, values) in enumerate(series.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        line = [to_pixel(x, y) for x, y in values if math.isfinite(y) and (y > 0 or not log_y)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for px, py in line if len(line) < 30 else []:
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)
        draw.text((box[2] - 150, box[1] + 6 + 14 * i), name, fill=colour, font=font)


def plot_curves(path: str | os.PathLike,
                panels: Sequence[tuple[str, dict[str, list[tuple[float, float]]], bool]]) -> Path:
    """Write a PNG with one panel per (title, {series name: [(step, value)]}, log_y) stacked vertically."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (_PANEL[0], _PANEL[1] * max(1, len(panels))), (255, 255, 255))
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    for i, (title, series, log_y) in enumerate(panels):
        _draw_panel(draw, font, (0, i * _PANEL[1]), title, series, log_y)
    with atomic_path(path) as temp:
        image.save(temp, format="PNG")
    return Path(path)


def moving_average(values: list[tuple[float, float]], window: int = 10) -> list[tuple[float, float]]:
    """Trailing mean over `window` points, for noisy loss curves."""
    out, total = [], 0.0
    for i, (x, y) in enumerate(values):
        total += y
        if i >= window:
            total -= values[i - window][1]
        out.append((x, total / min(i + 1, window)))
    return out


def plot_points(path: str | os.PathLike, title: str, points: Sequence[tuple[str, float, float]],
                x_label: str = "", reference: tuple[str, float | None] | None = None) -> Path:
    """Write a PNG scatter plot: one labelled dot per (label, x, y); `reference` = (name, y) a dashed line."""
    from PIL import Image, ImageDraw, ImageFont

    width, height, (left, top, right, bottom) = 760, 420, (64, 28, 16, 40)
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    box = (left, top, width - right, height - bottom)
    draw.text((left, 6), title, fill=(0, 0, 0), font=font)
    draw.text((box[2] - 6 * len(x_label), box[3] + 22), x_label, fill=(0, 0, 0), font=font)
    draw.rectangle(box, outline=(0, 0, 0))
    ys = [y for _, _, y in points] + ([reference[1]] if reference and reference[1] is not None else [])
    if not points:
        draw.text((box[0] + 8, box[1] + 8), "no data", fill=(120, 120, 120), font=font)
    else:
        x_low, x_high = 0.0, max(x for _, x, _ in points) * 1.05 or 1.0
        y_low, y_high = min(ys), max(ys)
        pad = (y_high - y_low) * 0.08 or 0.5
        y_low, y_high = y_low - pad, y_high + pad

        def to_pixel(x: float, y: float) -> tuple[float, float]:
            return (box[0] + (x - x_low) / (x_high - x_low) * (box[2] - box[0]),
                    box[3] - (y - y_low) / (y_high - y_low) * (box[3] - box[1]))

        for tick in _ticks(y_low, y_high):
            draw.text((4, to_pixel(0, tick)[1] - 6), _label(tick), fill=(0, 0, 0), font=font)
        for tick in _ticks(x_low, x_high):
            draw.text((to_pixel(tick, 0)[0] - 10, box[3] + 6), _label(tick), fill=(0, 0, 0), font=font)
        if reference and reference[1] is not None:
            py = to_pixel(0, reference[1])[1]
            for px in range(box[0], box[2], 12):
                draw.line((px, py, min(px + 6, box[2]), py), fill=(150, 150, 150))
            draw.text((box[0] + 4, py - 13), reference[0], fill=(120, 120, 120), font=font)
        for i, (label, x, y) in enumerate(points):
            px, py = to_pixel(x, y)
            colour = _COLOURS[i % len(_COLOURS)]
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colour)
            draw.text((px + 5, py - 6), label, fill=colour, font=font)
    with atomic_path(path) as temp:
        image.save(temp, format="PNG")
    return Path(path)


def read_log(path: str | os.PathLike) -> list[dict]:
    """The records of a run's log.jsonl."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_log(log_path: str | os.PathLike, png_path: str | os.PathLike, task: str) -> Path:
    """Loss (raw and smoothed, log scale) and the task's main validation metric against the step."""
    records = read_log(log_path)
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    metric = MAIN_METRIC[task]
    values = [(r["step"], r["val"].get(metric, math.nan)) for r in records if "val" in r]
    panels = [("training loss", {"loss": losses, "moving average": moving_average(losses)}, True),
              (f"validation {metric} ({'higher' if metric in HIGHER_IS_BETTER else 'lower'} is better)",
               {metric: values}, False)]
    return plot_curves(png_path, panels)
