"""Video files in and out, through PyAV (an optional extra: ``pip install 'dmp-dense-prediction[video]'``).

Frames are decoded and encoded in chunks, never the whole clip at once: ``read_frames`` yields
[b, 3, H, W] float32 chunks, ``write_video`` takes frames as they come. A file whose frames stop
before its header says they should (a truncated download, an interrupted copy) is refused with a
ValueError naming it, before any prediction is made when that can be seen up front.

    info = probe_video("clip.mp4")                      # frames, size, frame rate, checked
    for chunk in read_frames(info, start=0, chunk=8):   # [b, 3, H, W] in [0, 1]
        ...
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from .writers import atomic_path

VIDEO_EXTENSIONS = (".mp4", ".mov", ".webm", ".mkv")
INSTALL_HINT = "pip install 'dmp-dense-prediction[video]' (or: pip install av)"
DEFAULT_FPS = Fraction(24)
# Encoders for previews by container, the first one this PyAV build has is used.
_ENCODERS = {".webm": ("libvpx-vp9", "libvpx"), "": ("libx264", "h264", "mpeg4")}


def require_av():
    """The ``av`` module, or an ImportError saying how to install it."""
    try:
        import av
    except ImportError as err:
        raise ImportError(f"reading and writing video files needs PyAV, an optional extra: {INSTALL_HINT}") from err
    return av


def is_video(path: str | os.PathLike) -> bool:
    """Whether a path names a video file by its extension (VIDEO_EXTENSIONS)."""
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


@dataclass(frozen=True)
class VideoInfo:
    """A checked video file: its path, frame count, frame size and frame rate."""

    path: Path
    frames: int
    height: int
    width: int
    fps: Fraction


@contextlib.contextmanager
def _open_video(path: Path):
    """(container, its first video stream), with every way of failing to open it as a ValueError."""
    av = require_av()
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as err:
        raise ValueError(f"cannot read video {path}: {err} (a truncated or damaged file?)") from err
    with container:
        if not container.streams.video:
            raise ValueError(f"cannot read video {path}: it has no video stream (a truncated or damaged file?)")
        yield container, container.streams.video[0]


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Frame count (by reading every packet, not trusting the header), size and rate of a video.

    Raises:
        ValueError naming the file if it cannot be opened, has no frames, or holds fewer frames
        than its header promises (by count or by duration times frame rate): a truncated file.
    """
    path = Path(path)
    av = require_av()
    with _open_video(path) as (container, stream):
        try:
            counted = sum(1 for packet in container.demux(stream) if packet.size)
        except av.error.FFmpegError as err:
            raise ValueError(f"cannot read video {path}: {err} (a truncated or damaged file?)") from err
        fps = Fraction(stream.average_rate or stream.guessed_rate or DEFAULT_FPS)
        duration = container.duration / 1_000_000 if container.duration else 0.0  # microseconds
        expected = stream.frames or round(duration * fps)
        height, width = stream.codec_context.height, stream.codec_context.width
    # A header's duration may round a frame either way; anything more missing is a cut-off file.
    if counted == 0 or counted < expected - max(1, expected // 100):
        raise ValueError(f"video {path} is truncated or damaged: its header promises {expected} frames, "
                         f"{counted} are there; re-copy or re-encode it")
    return VideoInfo(path, counted, height, width, fps)


def read_frames(info: VideoInfo, start: int = 0, chunk: int = 8) -> Iterator[torch.Tensor]:
    """Decode frames start, start + 1, ... in chunks, at the video's size.

    Args:
        info: from ``probe_video``.
        start: first frame to yield (0-based); earlier frames are decoded and dropped (exact for any codec).
        chunk: frames per yielded tensor (the last may hold fewer).

    Yields:
        float32 tensors [b, 3, H, W] in [0, 1].

    Raises:
        ValueError naming the file if decoding fails or the frames end before ``info.frames``.
    """
    av = require_av()
    index, pending = 0, []
    with _open_video(info.path) as (container, stream):
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                if index >= start:
                    pending.append(frame.to_ndarray(format="rgb24", width=info.width, height=info.height))
                index += 1
                if len(pending) == chunk:
                    yield _to_tensor(pending)
                    pending = []
        except av.error.FFmpegError as err:
            raise ValueError(f"video {info.path} is damaged at frame {index + 1}: {err}") from err
    if pending:
        yield _to_tensor(pending)
    if index < info.frames:
        raise ValueError(f"video {info.path} ended after {index} of {info.frames} frames: a truncated file?")


def _to_tensor(frames: list[np.ndarray]) -> torch.Tensor:
    """uint8 frames [H, W, 3] -> float32 [b, 3, H, W] in [0, 1]."""
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float().div_(255)


@contextlib.contextmanager
def write_video(path: str | os.PathLike, fps: Fraction | float = DEFAULT_FPS):
    """Encode a video atomically (nothing at `path` unless every frame was written).

    Yields ``write(frames)`` taking float [b, H, W, 3] in [0, 1] (tensor or array) or uint8 arrays;
    every frame must have the first one's size. Odd sizes are padded by one edge pixel (the
    yuv420p pixel format needs even sizes). H.264 for .mp4/.mov/.mkv (MPEG-4 part 2 without
    libx264), VP9 for .webm.
    """
    av = require_av()
    path = Path(path)
    names = _ENCODERS.get(path.suffix.lower(), _ENCODERS[""])
    codec = next((name for name in names if name in av.codecs_available), names[-1])
    with atomic_path(path, suffix=path.suffix) as temp, av.open(str(temp), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(100_000))
        stream.pix_fmt = "yuv420p"
        size: list[tuple[int, int]] = []

        def write(frames) -> None:
            for image in _as_uint8(frames):
                image = np.pad(image, ((0, image.shape[0] % 2), (0, image.shape[1] % 2), (0, 0)), mode="edge")
                if not size:
                    size.append(image.shape[:2])
                    stream.height, stream.width = image.shape[:2]
                if image.shape[:2] != size[0]:
                    raise ValueError(f"frames of {path} must keep one size {size[0]}, got {image.shape[:2]}")
                container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))

        yield write
        container.mux(stream.encode())  # flush the encoder


def _as_uint8(frames) -> np.ndarray:
    """Frames [b, H, W, 3] (float in [0, 1], tensor or array; or uint8) as a contiguous uint8 array."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"video frames must be [b, H, W, 3], got shape {tuple(frames.shape)}")
    if frames.dtype != np.uint8:
        frames = np.round(np.clip(frames.astype(np.float32), 0, 1) * 255).astype(np.uint8)
    return np.ascontiguousarray(frames)
