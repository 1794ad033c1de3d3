"""`dmp predict` on video files: each clip streamed in chunks, raw outputs per frame, a preview video.

For a clip ``walk.mp4`` and an adapter ``depth-x`` a run writes, each file atomically:

    <output>/depth-x/walk/frame_000001.npy   (and _depth16.png, .exr as --formats asks), per frame
    <output>/depth-x/walk_visual.mp4         the visual as a video, coloured over one range for the clip

Frames go through ``predict_images`` a chunk (the batch size) at a time, with one ``TemporalAligner``
per depth adapter running over the whole clip, so memory does not grow with the clip's length. An
interrupted clip resumes at its first missing frame: the aligners first replay the frames already
written (read back from their .npy files, which is why clips need npy among the formats), so that
resumed frames continue the same reference. The preview is made last, from the .npy files: one pass
takes a sample of every frame for the clip's colour range, a second colours and encodes the frames.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..adapters import AdapterInfo
from ..io.video import VideoInfo, probe_video, read_frames, write_video
from ..io.writers import prediction_paths, write_prediction
from ..prediction.predict import PredictionBackend, PredictOptions, predict_images, visual_settings
from ..prediction.temporal import TemporalAligner, clip_aligners
from ..tasks.codecs import get_codec
from .report import RunReport

logger = logging.getLogger("dmp")

# Values sampled from a clip's frames for its preview's colour range (see colormaps.batch_percentiles).
_RANGE_SAMPLE = 1 << 18


@dataclass(frozen=True)
class ClipJob:
    """What to predict for every clip of a run, and where to write it.

    Attributes:
        backend: runs the networks (``DMPModel`` in the CLI).
        adapters: {name: AdapterInfo} of the adapters to run.
        output: the output folder; each adapter writes under ``output / name``.
        formats: the CLI's output formats; must hold "npy"; "visual" asks for the preview video.
        options: prediction settings, ``temporal_alignment`` included.
        prompt: text for prompted adapters.
        overwrite: recompute every frame instead of resuming.
    """

    backend: PredictionBackend
    adapters: Mapping[str, AdapterInfo]
    output: Path
    formats: Sequence[str]
    options: PredictOptions
    prompt: str | None = None
    overwrite: bool = False

    def __post_init__(self):
        check_clip_formats(self.formats)

    def frame_paths(self, name: str, stem: Path, index: int, count: int) -> dict[str, Path]:
        """The raw files of frame `index` (0-based) of a clip of `count` frames; the last marks it done."""
        digits = max(6, len(str(count)))
        formats = [f for f in self.formats if f != "visual"]
        return prediction_paths(self.adapters[name].task, stem / f"frame_{index + 1:0{digits}d}",
                                self.output / name, formats)

    def preview_path(self, name: str, stem: Path) -> Path:
        return self.output / name / stem.parent / f"{stem.name}_visual.mp4"


def check_clip_formats(formats: Sequence[str]) -> None:
    """Clips need npy among the output formats (their previews and resuming read the raw frames back)."""
    if "npy" not in formats:
        raise ValueError(f"video inputs need npy among --formats (got {','.join(formats)}): the preview "
                         "video and resuming read the frames' raw values back")


def predict_clips(job: ClipJob, videos: Sequence[Path], stems: Mapping[Path, Path], report: RunReport) -> None:
    """Every video in turn (``predict_clip``), a progress bar each; one outcome per video in `report`
    (a failure names the file and the reason; the frames written before it stay, and a rerun resumes)."""
    from tqdm import tqdm

    for video in videos:
        try:
            with tqdm(desc=f"dmp predict {video.name}", unit="frame", disable=None) as bar:
                done = predict_clip(job, video, stems[video], bar.update)
        except (ValueError, OSError, RuntimeError, MemoryError) as err:  # RuntimeError: out of memory among others
            report.record(video, "failed", " ".join(str(err).split()))
            continue
        outputs = [path for name in job.adapters for path in (job.output / name / stems[video],
                                                              job.preview_path(name, stems[video]))
                   if path.exists()]
        report.record(video, "written" if done else "skipped", None, outputs)


def predict_clip(job: ClipJob, video: str | Path, stem: Path, progress: Callable[[int], None] | None = None) -> bool:
    """Predict the missing frames of one video, then write its previews.

    Args:
        job: settings and outputs (``ClipJob``).
        video: the video file.
        stem: its output name relative to each adapter's folder (e.g. ``Path("walk")``).
        progress: called with the number of frames after each chunk.

    Returns:
        False if the clip was complete already (nothing written), else True.

    Raises:
        ValueError naming the file for a truncated or unreadable video (frames already written stay).
    """
    # 1. The clip, and where an earlier run stopped.
    info = probe_video(video)
    start = 0 if job.overwrite else first_missing_frame(job, stem, info.frames)
    wants_preview = "visual" in job.formats
    previews = [name for name in job.adapters if wants_preview and (
        start < info.frames or job.overwrite or not job.preview_path(name, stem).exists())]
    if start == info.frames and not previews:
        return False
    # 2. The missing frames, then the previews from the raw frames on disk.
    if start < info.frames:
        predict_frames(job, info, stem, start, progress)
    for name in previews:
        write_preview(job, name, stem, info)
    return True


def predict_frames(job: ClipJob, info: VideoInfo, stem: Path, start: int,
                   progress: Callable[[int], None] | None = None) -> None:
    """Frames start.. of a clip, a chunk at a time; the alignment continues from the frames before `start`."""
    aligners = resume_aligners(job, stem, start, info.frames)
    index = start
    for frames in read_frames(info, start, job.options.batch_size):                 # [b, 3, H, W]
        results = predict_images(job.backend, frames, job.adapters, job.options, prompt=job.prompt,
                                 aligners=aligners)
        for i in range(frames.shape[0]):
            for name, prediction in results.items():
                write_prediction(prediction, i, job.frame_paths(name, stem, index + i, info.frames))
        index += frames.shape[0]
        if progress is not None:
            progress(frames.shape[0])


def first_missing_frame(job: ClipJob, stem: Path, count: int) -> int:
    """The first frame (0-based) some adapter has not finished, or `count` when all are there."""
    for index in range(count):
        if not all(list(job.frame_paths(name, stem, index, count).values())[-1].exists() for name in job.adapters):
            return index
    return count


def resume_aligners(job: ClipJob, stem: Path, start: int, count: int) -> dict[str, TemporalAligner]:
    """The clip's aligners, their references rebuilt from frames 0..start-1 as written."""
    aligners: dict[str, TemporalAligner] = {}
    tasks = {name: info.task for name, info in job.adapters.items()}
    for name, aligner in clip_aligners(tasks, job.options.temporal_alignment, aligners).items():
        for index in range(start):
            aligner.observe(torch.from_numpy(np.load(job.frame_paths(name, stem, index, count)["npy"])))
    return aligners


def write_preview(job: ClipJob, name: str, stem: Path, info: VideoInfo) -> Path:
    """Encode one adapter's visual of a whole clip from its .npy frames, a chunk at a time."""
    codec = get_codec(job.adapters[name].task)
    files = [job.frame_paths(name, stem, index, info.frames)["npy"] for index in range(info.frames)]
    settings = visual_settings(codec, _clip_sample(files), "batch") if hasattr(codec, "visual_percentiles") else {}
    path = job.preview_path(name, stem)
    with write_video(path, info.fps) as write:
        for start in range(0, len(files), job.options.batch_size):
            raw = torch.from_numpy(np.stack([np.load(f) for f in files[start:start + job.options.batch_size]]))
            raw = raw.long() if not raw.is_floating_point() else raw  # class ids
            write(codec.visualize(raw, colormap=job.options.colormap, **settings))
    return path


def _clip_sample(files: Sequence[Path]) -> torch.Tensor:
    """A regular sample of a clip's values, about _RANGE_SAMPLE in all, as [1, 1, K]; one frame read at a time."""
    per_frame = max(1, _RANGE_SAMPLE // len(files))
    parts = []
    for file in files:
        values = np.load(file, mmap_mode="r").reshape(-1)
        parts.append(np.asarray(values[:: max(1, values.size // per_frame)], dtype=np.float32))
    return torch.from_numpy(np.concatenate(parts)).view(1, 1, -1)
