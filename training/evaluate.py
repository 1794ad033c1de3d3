"""`dmp evaluate`: predict a labelled folder with a grid of settings; quality against time.

    dmp evaluate --base sd15/ --adapter ckpt/depth-hypersim-notext --images data/images \\
        --targets data/depth -o eval/ --steps 1 5 --spacing leading trailing --ensemble none flip

Data: the folder layout and target formats of ``dmp train``, read by its code
(``data.find_pairs``, ``data.check_pairs``, ``data.read_target``); metrics: the trainer's
``metrics.TaskMetrics``. Every pair is read once before any prediction: a folder without
targets, or targets of the wrong kind for the adapter's task, end the run naming the files.

Grid: every combination of the values given for each axis of GRID_AXES; every value is checked up
front (a bad one is named with the valid ones). Each setting predicts every image at its own size
(same-size images batched) and compares with the target at the target's size. Seconds per image
are the wall time of the predict calls only (no file reading), after one warm-up prediction.

Outputs in the output folder: ``results.json`` (settings, metrics, seconds; rewritten atomically
after every setting), ``results.csv`` (the same table) and ``quality.png`` (the task's main metric
against seconds per image). A rerun of the same evaluation skips the settings already in
``results.json``, so an interrupted run resumes per setting. The row "constant" is the best
constant prediction, computed from the targets themselves (an oracle no real predictor can use):
a predictor that reads the images should beat it.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dmp_model.adapters import AdapterInfo
from dmp_model.images import load_image
from dmp_model.io.writers import atomic_path
from dmp_model.prediction.ensemble import ENSEMBLES
from dmp_model.prediction.predict import Prediction, PredictOptions
from dmp_model.sampling import SAMPLERS, SPACINGS
from dmp_model.tasks.codecs import get_codec

from .config import TrainConfig
from .data import Pair, check_pairs, find_pairs, read_target
from .metrics import HIGHER_IS_BETTER, MAIN_METRIC, METRICS, TaskMetrics, best_constant
from .plot import plot_points

logger = logging.getLogger(__name__)

TILE_CHOICES = ("off", "on")
GRID_AXES = ("steps", "spacing", "sampler", "processing_resolution", "tile", "ensemble")
_CHOICES = {"spacing": SPACINGS, "sampler": SAMPLERS, "tile": TILE_CHOICES, "ensemble": ENSEMBLES}
RESULTS_JSON, RESULTS_CSV, QUALITY_PNG = "results.json", "results.csv", "quality.png"
BASELINE = "constant"
# predict(images [b, 3, H, W] in [0, 1], options, prompts or None) -> Prediction at the images' size
Predictor = Callable[[torch.Tensor, PredictOptions, list[str] | None], Prediction]


_DEFAULTS = PredictOptions()


@dataclass(frozen=True)
class Setting:
    """One point of the grid (defaults: the engine's)."""

    steps: int = _DEFAULTS.steps
    spacing: str = _DEFAULTS.spacing
    sampler: str = _DEFAULTS.sampler
    processing_resolution: int = _DEFAULTS.processing_resolution
    tile: str = "off"
    ensemble: str = _DEFAULTS.ensemble

    @property
    def key(self) -> str:
        """A readable identity, e.g. 'steps=5 spacing=leading ... ensemble=none' (rows are matched by it)."""
        return " ".join(f"{name}={value}" for name, value in asdict(self).items())

    def options(self, base: PredictOptions) -> PredictOptions:
        changes = asdict(self)
        changes["tile"] = self.tile == "on"
        return base.updated(**changes)


def _grid_value(axis: str, value) -> int | str:
    """One grid value converted and checked; the error names the axis, the value and the valid values."""
    if axis in ("steps", "processing_resolution"):
        text = str(value).strip()
        number = int(text) if text.isdigit() and not isinstance(value, bool) else None
        if number is None or (number < 1 if axis == "steps" else 0 < number < 8):
            valid = "integers >= 1" if axis == "steps" else "0 (native size) or integers >= 8"
            raise ValueError(f"grid setting {axis}={value!r} is invalid; valid values: {valid}")
        return number
    if str(value) not in _CHOICES[axis]:
        raise ValueError(f"grid setting {axis}={value!r} is invalid; valid values: {_CHOICES[axis]}")
    return str(value)


def parse_grid(axes: Mapping[str, Sequence], base: PredictOptions) -> list[Setting]:
    """Every combination of the given values (axes left out keep Setting's default), each checked.

    Args:
        axes: {axis in GRID_AXES: values} (strings as typed, or typed values).
        base: the options every setting starts from (tile size, overlap, batch size, ...).
    """
    unknown = set(axes) - set(GRID_AXES)
    if unknown:
        raise ValueError(f"unknown grid axes {sorted(unknown)}; valid axes: {GRID_AXES}")
    values = [[_grid_value(axis, v) for v in axes.get(axis) or [getattr(Setting, axis)]] for axis in GRID_AXES]
    settings = list(dict.fromkeys(Setting(**dict(zip(GRID_AXES, combination)))
                                  for combination in itertools.product(*values)))
    for setting in settings:
        try:
            setting.options(base)
        except (ValueError, TypeError) as err:
            raise ValueError(f"grid setting '{setting.key}' is invalid: {err}") from err
    return settings


# Data -------------------------------------------------------------------------------------------

def load_pairs(images: str | os.PathLike, targets: str | os.PathLike, config: TrainConfig,
               limit: int | None = None) -> list[Pair]:
    """The evaluation pairs, read once by ``dmp train``'s checks (wrong kinds raise, naming the files)."""
    pairs, problems = find_pairs(images, targets, config.task, with_captions=config.captions, role="evaluation")
    pairs, more = check_pairs(pairs[:limit] if limit else pairs, config, "evaluation")
    for problem in problems + more:
        logger.warning("skipped: %s", problem)
    return pairs


def reading_config(base: str, images: str, targets: str, info: AdapterInfo, **reading) -> TrainConfig:
    """The TrainConfig that reads targets for this adapter: its task, target scale, normal convention
    and prompting; `reading`: depth_png_scale, normal_convention, segmentation_palette as for training."""
    return TrainConfig(base=base, train_images=str(images), train_targets=str(targets), task=info.task,
                       target_scale=info.target_scale if info.task == "depth" else None,
                       adapter_normal_convention=info.normal_convention, captions=info.uses_prompts,
                       **{k: v for k, v in reading.items() if v is not None})


def size_batches(pairs: Sequence[Pair], batch_size: int) -> Iterator[tuple[list[Pair], torch.Tensor]]:
    """(pairs, images [b, 3, H, W]) of up to batch_size images of one size, in file order per size."""
    pending: dict[tuple[int, int], list[tuple[Pair, torch.Tensor]]] = {}
    for pair in pairs:
        image = load_image(pair.image)
        group = pending.setdefault(tuple(image.shape[-2:]), [])
        group.append((pair, image))
        if len(group) == batch_size:
            yield [p for p, _ in group], torch.stack([i for _, i in group])
            group.clear()
    for group in pending.values():
        if group:
            yield [p for p, _ in group], torch.stack([i for _, i in group])


def _compare(metrics: TaskMetrics, raw: torch.Tensor, truth: torch.Tensor) -> None:
    """One image's raw prediction against its target, at the target's size (the codec's resize)."""
    if raw.shape[:2] != truth.shape[:2]:
        raw = get_codec(metrics.task).resize(raw[None], tuple(truth.shape[:2]))[0]
    metrics.update(raw[None], truth[None])


# Evaluation -------------------------------------------------------------------------------------

def evaluate_setting(predict: Predictor, pairs: Sequence[Pair], config: TrainConfig, options: PredictOptions,
                     depth_alignment: str = "none") -> dict:
    """Metrics and seconds per image of one setting over all pairs."""
    metrics = TaskMetrics(config.task, depth_alignment)
    seconds = 0.0
    for batch, images in size_batches(pairs, options.batch_size):
        prompts = [pair.caption for pair in batch] if config.captions else None
        started = time.perf_counter()
        prediction = predict(images, options, prompts)
        seconds += time.perf_counter() - started
        for k, pair in enumerate(batch):
            _compare(metrics, prediction.raw[k], read_target(pair.target, config.task, config))
    return {**metrics.compute(), "seconds_per_image": seconds / max(len(pairs), 1), "images": len(pairs)}


def evaluate_constant(pairs: Sequence[Pair], config: TrainConfig, depth_alignment: str = "none") -> dict:
    """The metrics of the best constant prediction (``metrics.best_constant`` over all targets)."""
    truths = [read_target(pair.target, config.task, config) for pair in pairs]
    constant = best_constant(config.task, truths)
    metrics = TaskMetrics(config.task, depth_alignment)
    for truth in truths:
        metrics.update(constant.expand_as(truth)[None], truth[None])
    return {**metrics.compute(), "seconds_per_image": 0.0, "images": len(pairs)}


def run_evaluation(predict: Predictor, pairs: Sequence[Pair], config: TrainConfig, settings: Sequence[Setting],
                   base: PredictOptions, output: str | os.PathLike, identity: Mapping,
                   depth_alignment: str = "none", overwrite: bool = False) -> list[dict]:
    """Evaluate every setting not yet in ``output/results.json``; tables written after each.

    Args:
        predict: the predictor (``Predictor``); pairs: from ``load_pairs``; config: ``reading_config``.
        settings: from ``parse_grid``; base: the options the settings start from.
        identity: what makes two runs the same evaluation (adapter, data, fixed options); a results
            file of another evaluation is refused unless `overwrite`.

    Returns:
        all rows (the baseline first, then the settings in grid order).
    """
    output = Path(output)
    identity = {**identity, "task": config.task, "depth_alignment": depth_alignment, "pairs": len(pairs)}
    rows = _previous_rows(output, identity, overwrite)
    if BASELINE not in rows:
        rows[BASELINE] = {"setting": BASELINE, **evaluate_constant(pairs, config, depth_alignment)}
        write_results(output, identity, list(rows.values()), config.task)
    todo = [s for s in settings if s.key not in rows]
    if todo:  # one untimed prediction first: lazy set-up (text embedding, kernels) is not a setting's cost
        batch, images = next(size_batches(pairs[:1], 1))
        predict(images, todo[0].options(base), [batch[0].caption] if config.captions else None)
    for number, setting in enumerate(todo, 1):
        logger.info("setting %d/%d: %s", number, len(todo), setting.key)
        row = {"setting": setting.key, **asdict(setting),
               **evaluate_setting(predict, pairs, config, setting.options(base), depth_alignment)}
        rows[setting.key] = row
        write_results(output, identity, list(rows.values()), config.task)
    ordered = [rows[BASELINE]] + [rows[s.key] for s in settings]
    plot_quality(output / QUALITY_PNG, ordered, config.task)
    return ordered


def _previous_rows(output: Path, identity: Mapping, overwrite: bool) -> dict[str, dict]:
    """Rows of an earlier run of the same evaluation by setting key (none with overwrite)."""
    path = output / RESULTS_JSON
    if overwrite or not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        previous, rows = saved["evaluation"], saved["rows"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a results file of dmp evaluate ({err}); pass --overwrite or choose "
                         "another --output") from err
    differences = [f"{key}: {previous.get(key)!r} -> {value!r}" for key, value in identity.items()
                   if previous.get(key) != value]
    if differences:
        raise ValueError(f"{path} holds another evaluation ({'; '.join(differences)}); pass --overwrite to "
                         "replace it or choose another --output")
    logger.info("resuming: %d settings already in %s", sum(r["setting"] != BASELINE for r in rows), path)
    return {row["setting"]: row for row in rows}


# Tables and plot --------------------------------------------------------------------------------

def table_columns(task: str) -> list[str]:
    return ["setting", *GRID_AXES, *METRICS[task], "seconds_per_image", "images"]


def write_results(output: Path, identity: Mapping, rows: list[dict], task: str) -> None:
    """results.json and results.csv, each replaced atomically."""
    with atomic_path(output / RESULTS_JSON) as temp:
        temp.write_text(json.dumps({"evaluation": dict(identity), "rows": rows}, indent=2) + "\n", encoding="utf-8")
    text = io.StringIO()
    writer = csv.DictWriter(text, table_columns(task), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(output / RESULTS_CSV) as temp:
        temp.write_text(text.getvalue(), encoding="utf-8")


def _cell(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def format_table(rows: Sequence[dict], task: str) -> str:
    """A fixed-width text table: the grid axes, the task's metrics (arrows: which way is better), s/image."""
    names = [c for c in table_columns(task) if c not in ("setting", "images")]
    arrows = {m: " ↑" if m in HIGHER_IS_BETTER else " ↓" for m in METRICS[task]}
    header = [("resolution" if n == "processing_resolution" else "s/image" if n == "seconds_per_image" else n)
              + arrows.get(n, "") for n in names]
    cells = [[_cell(row.get(n, "")) if row["setting"] != BASELINE or n not in GRID_AXES else
              (BASELINE if n == "steps" else "") for n in names] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def plot_quality(path: Path, rows: Sequence[dict], task: str) -> Path:
    """The task's main metric against seconds per image, one labelled point per setting."""
    metric = MAIN_METRIC[task]
    points = [(_short_label(row), row["seconds_per_image"], row[metric]) for row in rows
              if row["setting"] != BASELINE and math.isfinite(row.get(metric, math.nan))]
    baseline = next((row[metric] for row in rows if row["setting"] == BASELINE), None)
    direction = "higher" if metric in HIGHER_IS_BETTER else "lower"
    return plot_points(path, f"{task}: {metric} ({direction} is better) against seconds per image",
                       points, x_label="seconds per image", reference=(BASELINE, baseline))


def _short_label(row: Mapping) -> str:
    """e.g. '5 leading ddim 512px tile flip'."""
    resolution = f"{row['processing_resolution']}px" if row["processing_resolution"] else "native"
    return (f"{row['steps']} {row['spacing']} {row['sampler']} {resolution}"
            + (" tile" if row["tile"] == "on" else "") + (f" {row['ensemble']}" if row["ensemble"] != "none" else ""))
