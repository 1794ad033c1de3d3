"""`dmp predict` on image files: output names, batches planned from headers, one outcome per file.

A folder of any size and any mix of image sizes runs in bounded memory: the files' headers are
read first (sizes and frame counts, no pixels), same-size pictures are grouped into batches of
``batch_size``, and a batch's files are decoded only when it runs, straight into the batch tensor.
So at most one batch of decoded images is alive, however many distinct sizes the folder holds.

Nothing about one file stops the run: a file that cannot be read, that is too large for the pixel
limit, that runs out of memory (CPU or GPU) or whose outputs cannot be written fails with a
one-line reason; a batch that fails is retried one image at a time, so the error names its file.
Each file's outputs are written as one set (``writers.write_predictions``).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..images import load_image
from ..io.image_files import ImageReadError, read_header
from ..io.writers import write_predictions
from ..prediction.predict import PredictOptions
from .assets import AssetOutput
from .report import RunReport

logger = logging.getLogger("dmp")

# What a failed prediction raises: bad values, files, torch errors (out of memory among them).
PREDICTION_ERRORS = (ValueError, TypeError, OSError, RuntimeError, MemoryError)


def output_stems(files: Sequence[Path], inputs: Sequence[str]) -> dict[Path, Path]:
    """Output path stem for each input file: its path relative to the folder it was found in, without
    its extension; files that would share a stem (``photo.jpg`` and ``photo.png``; compared without
    case, as macOS and Windows do) keep their extension in it (``photo.jpg``, ``photo.png``).

    Raises:
        ValueError naming the files when they still collide: same-named files passed from different
        folders (pass their common parent folder instead).
    """
    roots = [Path(i) for i in inputs if Path(i).is_dir()]
    named: dict[Path, Path] = {}
    for file in files:
        root = next((r for r in roots if file.is_relative_to(r)), None)
        named[file] = file.relative_to(root) if root else Path(file.name)
    stems = {file: name.with_suffix("") for file, name in named.items()}
    while True:  # extended stems can meet other files' plain ones (photo.jpg.png): again until none do
        extendable = [file for group in _clashes(stems, str.casefold) for file in group if stems[file] != named[file]]
        if not extendable:
            break
        for file in extendable:
            stems[file] = named[file]
    clashes = _clashes(stems, str)  # left: the same relative name from two inputs (names differing in case
    if clashes:                     # only can only both exist where case matters, and stay distinct there)
        listed = "; ".join(" and ".join(str(f) for f in group) for group in clashes[:5])
        raise ValueError(f"input files would write to the same output names: {listed}; pass the folder that "
                         "holds them instead of the files, so that each keeps its path relative to it")
    return stems


def _clashes(stems: Mapping[Path, Path], key: Callable[[str], str]) -> list[list[Path]]:
    groups: dict[str, list[Path]] = {}
    for file, stem in stems.items():
        groups.setdefault(key(str(stem)), []).append(file)
    return [group for group in groups.values() if len(group) > 1]


@dataclass(frozen=True)
class ImageJob:
    """What every image of a run needs.

    Attributes:
        predict: ``predict(images [b, 3, H, W]) -> {adapter name: Prediction}`` (the model's predict_tasks).
        paths: ``paths(adapter name, stem) -> {format: path}`` of one picture's outputs, done marker last.
        names: the adapters, in output order.
        options: prediction settings (``batch_size`` is used here).
        frames: "first" or "all" (io.image_files.FRAMES).
        max_pixels: pixel limit (None: Pillow's, 0: none).
        overwrite: recompute outputs that exist.
        asset: one more output per picture, written with the others as one set (``assets.AssetOutput``,
            --export-3d), or None.
    """

    predict: Callable[[torch.Tensor], dict]
    paths: Callable[[str, Path], dict[str, Path]]
    names: Sequence[str]
    options: PredictOptions
    frames: str = "first"
    max_pixels: int | None = None
    overwrite: bool = False
    asset: AssetOutput | None = None


@dataclass(frozen=True)
class Picture:
    """One picture to predict: a frame of a file, where its outputs go, its size from the header."""

    file: Path
    frame: int
    stem: Path
    size: tuple[int, int]


@dataclass
class _FileState:
    pending: int
    statuses: list[str] = field(default_factory=list)
    reason: str | None = None
    outputs: list[Path] = field(default_factory=list)


class FileTracker:
    """Turns the outcomes of a file's pictures into the file's one outcome, recorded when its last ends:
    failed if any picture failed (the first reason), skipped if all were skipped, else written."""

    def __init__(self, report: RunReport):
        self.report = report
        self.files: dict[Path, _FileState] = {}

    def expect(self, file: Path, pictures: int) -> None:
        self.files[file] = _FileState(pictures)

    def done(self, picture: Picture, status: str, reason: str | None = None, outputs: Sequence[Path] = ()) -> None:
        state = self.files[picture.file]
        state.pending -= 1
        state.statuses.append(status)
        state.outputs.extend(outputs)
        if status == "failed" and state.reason is None:
            state.reason = reason if not picture.frame else f"frame {picture.frame + 1}: {reason}"
        if state.pending == 0:
            del self.files[picture.file]
            final = "failed" if "failed" in state.statuses else \
                "skipped" if set(state.statuses) == {"skipped"} else "written"
            self.report.record(picture.file, final, state.reason, state.outputs)

    def fail_file(self, file: Path, reason: str) -> None:
        self.files.pop(file, None)
        self.report.record(file, "failed", reason)


def predict_image_files(job: ImageJob, files: Sequence[Path], stems: Mapping[Path, Path], report: RunReport,
                        progress: Callable[[int, int], None] | None = None) -> None:
    """Predict and write every image file, recording one outcome per file in `report`.

    Args:
        job: settings and outputs (``ImageJob``).
        files: image files in order; stems: their output stems (``output_stems``).
        report: where outcomes go.
        progress: ``progress(pictures done in the batch, pictures to predict in all)`` after each batch.
    """
    libc = map_large_buffers()
    tracker = FileTracker(report)
    pictures = plan_pictures(job, files, stems, tracker)
    for batch in plan_batches(pictures, job.options.batch_size):
        run_batch(job, batch, tracker)
        if libc is not None:
            libc.malloc_trim(0)  # free pages inside the heap back to the system: the next size starts clean
        if progress is not None:
            progress(len(batch), len(pictures))


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def map_large_buffers(threshold: int = 1 << 20):
    """Have glibc map every buffer above `threshold` bytes on its own and unmap it when freed; returns
    glibc (for ``malloc_trim`` between batches), or None off glibc.

    By default glibc serves buffers below its mmap threshold from its heap and raises the threshold
    to the largest buffer freed so far (up to 32 MiB): images of ever-new sizes then leave holes the
    next sizes do not fit, and the heap only grows. Measured: 48 distinct-size 2000x1072 photos peaked
    at 2.5x the memory of 48 same-size ones without this (docs/batch.md). A fixed threshold ends that;
    nothing is done off glibc or when the user set MALLOC_MMAP_THRESHOLD_ themselves.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
            libc.mallopt(_M_MMAP_THRESHOLD, threshold)
        libc.malloc_trim  # noqa: B018 (glibc has it; musl does not)
    except (OSError, AttributeError):  # not glibc (musl, ...): its allocator, its rules
        logger.debug("mallopt not available: large buffers left to the C library's defaults")
        return None
    return libc


def plan_pictures(job: ImageJob, files: Sequence[Path], stems: Mapping[Path, Path],
                  tracker: FileTracker) -> list[Picture]:
    """The pictures still to predict, sizes from the headers; files already done are recorded as skipped
    (with --frames first without reading them), unreadable ones as failed."""
    pictures = []
    for file in files:
        stem = stems[file]
        if job.frames == "first" and not job.overwrite and _done(job, stem):
            tracker.expect(file, 1)
            tracker.done(Picture(file, 0, stem, (0, 0)), "skipped", outputs=_existing(job, stem))
            continue
        try:
            header = read_header(file, job.max_pixels)
        except ImageReadError as err:
            tracker.fail_file(file, f"cannot read image: {err.reason}")
            continue
        count = header.frames if job.frames == "all" else 1
        if header.frames > 1 and job.frames == "first":
            logger.info("%s: %d frames (%s); predicting the first (--frames all predicts each)", file,
                        header.frames, header.format)
        digits = max(6, len(str(count)))
        mine = [Picture(file, i, stem / f"frame_{i + 1:0{digits}d}" if count > 1 else stem, header.size)
                for i in range(count)]
        tracker.expect(file, len(mine))
        for picture in mine:
            if not job.overwrite and _done(job, picture.stem):
                tracker.done(picture, "skipped", outputs=_existing(job, picture.stem))
            else:
                pictures.append(picture)
    return pictures


def _done(job: ImageJob, stem: Path) -> bool:
    return (all(list(job.paths(name, stem).values())[-1].exists() for name in job.names)
            and (job.asset is None or job.asset.path(stem).exists()))


def _existing(job: ImageJob, stem: Path) -> list[Path]:
    asset = [job.asset.path(stem)] if job.asset is not None else []
    return [path for name in job.names for path in job.paths(name, stem).values() if path.exists()] + \
        [path for path in asset if path.exists()]


def plan_batches(pictures: Sequence[Picture], batch_size: int) -> Iterator[list[Picture]]:
    """Same-size pictures in batches of up to `batch_size`, sizes in order of first appearance."""
    groups: dict[tuple[int, int], list[Picture]] = {}
    for picture in pictures:
        groups.setdefault(picture.size, []).append(picture)
    for group in groups.values():
        for start in range(0, len(group), batch_size):
            yield group[start:start + batch_size]


def run_batch(job: ImageJob, batch: Sequence[Picture], tracker: FileTracker) -> None:
    """Decode a batch's files into one tensor, predict it, write each picture's outputs."""
    try:
        rows = torch.empty(len(batch), 3, *batch[0].size)                   # [b, 3, H, W]
    except PREDICTION_ERRORS as err:
        if len(batch) > 1:  # too large together: one at a time
            for picture in batch:
                run_batch(job, [picture], tracker)
            return
        tracker.done(batch[0], "failed", f"out of memory for its {batch[0].size[1]}x{batch[0].size[0]} pixels "
                                         f"({' '.join(str(err).split())[:200]})")
        return
    kept: list[Picture] = []
    for picture in batch:
        try:
            image = load_image(picture.file, picture.frame, job.max_pixels, out=rows[len(kept)])
        except ImageReadError as err:  # out of memory included
            tracker.done(picture, "failed", f"cannot read image: {err.reason}")
            continue
        if tuple(image.shape[-2:]) == picture.size:
            kept.append(picture)
        else:  # the header's size was not the decoded one (a PNG's late EXIF orientation): alone
            predict_and_write(job, [picture], image[None], tracker)
            del image
    if kept:
        predict_and_write(job, kept, rows[:len(kept)], tracker)


def predict_and_write(job: ImageJob, pictures: Sequence[Picture], images: torch.Tensor,
                      tracker: FileTracker) -> None:
    """Predict images [b, 3, H, W] and write each picture's outputs; a failed batch is retried one by one."""
    try:
        results = job.predict(images)
    except PREDICTION_ERRORS as err:
        _free_memory(err)
        if len(pictures) > 1:
            for index, picture in enumerate(pictures):
                predict_and_write(job, [picture], images[index:index + 1], tracker)
        else:
            tracker.done(pictures[0], "failed", prediction_failure(err, images.shape[-2:]))
        return
    for index, picture in enumerate(pictures):
        tracker.done(picture, *write_outputs(job, picture, results, images, index))


def write_outputs(job: ImageJob, picture: Picture, results: Mapping, images: torch.Tensor, index: int
                  ) -> tuple[str, str | None, list[Path]]:
    """Write one picture's outputs of every adapter (and its 3D asset) as one set: (status, reason, paths
    written). The asset goes first, as the likelier to fail, and is removed if the predictions' files fail."""
    entries = [(results[name], index, job.paths(name, picture.stem)) for name in job.names]
    asset: list[Path] = []
    try:
        if job.asset is not None:
            asset.append(job.asset.write(picture.stem, images, results, index))
        return "written", None, write_predictions(entries) + asset
    except PREDICTION_ERRORS as err:
        _free_memory(err)
        for path in asset:
            path.unlink(missing_ok=True)
        return "failed", f"writing its outputs failed, none were written ({_one_line(err)})", []


def is_out_of_memory(err: BaseException) -> bool:
    """Whether `err` says memory ran out: MemoryError, torch's OutOfMemoryError (a GPU), or an allocator's
    RuntimeError (the CPU: "can't allocate memory", "not enough memory")."""
    text = str(err).lower()  # torch's OutOfMemoryError is a RuntimeError saying "out of memory"
    return isinstance(err, MemoryError) or isinstance(err, RuntimeError) and any(
        words in text for words in ("out of memory", "can't allocate memory", "not enough memory"))


def prediction_failure(err: BaseException, size: Sequence[int]) -> str:
    """One line saying why one picture's prediction failed, with what to try for out of memory."""
    if is_out_of_memory(err):
        return (f"out of memory predicting its {size[1]}x{size[0]} pixels; try --batch-size 1, a lower "
                f"--processing-resolution, or another --device ({_one_line(err)[:160]})")
    return _one_line(err)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if not isinstance(err, ValueError) else text


def _free_memory(err: BaseException) -> None:
    """After running out of memory, give cached blocks back before the next try."""
    if is_out_of_memory(err):
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
