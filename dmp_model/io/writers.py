"""Raw outputs on disk: 16-bit depth PNG, NPY, EXR and 8-bit PNG previews.

Every writer is atomic: it writes a temporary file beside the target, then renames it over the
target with ``os.replace``; on any error the temporary file is removed and no partial output is
left. Parent folders are created. Writers take numpy arrays (call ``.cpu().numpy()`` on tensors)
and reject NaN and infinite values, which always mean an upstream bug in a prediction.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from ..options import check_option

DEPTH_PNG_ENCODINGS = ("millimeters", "normalized")

_UINT16_MAX = 65535
# PNG text chunks telling a reader how to turn the 16-bit values back into floats.
_KEY_ENCODING = "depth_encoding"
_KEY_SCALE = "depth_scale"  # float value = stored integer * scale (metres for millimeters)
_KEY_MIN = "depth_min_m"  # normalized only: the metres that 0 and 65535 stand for
_KEY_MAX = "depth_max_m"
_EXR_CHANNELS = {1: ("Y",), 3: ("R", "G", "B")}


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` on success, else delete it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp{suffix}")
    try:
        yield temp
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _check_array(
    array: np.ndarray, path: str | os.PathLike, arg: str, ndims: tuple[int, ...] | None
) -> None:
    """A real-valued numpy array with an allowed number of dimensions (None: any), all finite."""
    if not isinstance(array, np.ndarray):
        raise TypeError(
            f"{arg} for {os.fspath(path)!r} must be a numpy array (use .cpu().numpy() on a tensor), "
            f"got {type(array).__name__}"
        )
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise TypeError(f"{arg} for {os.fspath(path)!r} must hold real numbers, got dtype {array.dtype}")
    if ndims is not None and array.ndim not in ndims:
        raise ValueError(
            f"{arg} for {os.fspath(path)!r} must have {' or '.join(map(str, ndims))} dimensions, "
            f"got shape {array.shape}"
        )
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        count = int(np.count_nonzero(~np.isfinite(array)))
        raise ValueError(f"{arg} for {os.fspath(path)!r} has {count} NaN or infinite values; expected finite")


def write_depth_png16(
    path: str | os.PathLike, depth: np.ndarray, encoding: str = "millimeters"
) -> Path:
    """Write depth as a 16-bit greyscale PNG (Pillow mode "I;16"), units in PNG text chunks.

    Args:
        path: the PNG file to write.
        depth: float array [H, W], depth in metres, finite.
        encoding: one of DEPTH_PNG_ENCODINGS:
            "millimeters": round(depth * 1000) clipped to 0..65535, so 1 mm steps and at most
                65.535 m (farther depth saturates, negative depth becomes 0);
            "normalized": per-image min-max to 0..65535 (relative depth; a constant image gives
                0); the minimum and maximum in metres are stored too.

    Returns:
        the path written.
    """
    _check_array(depth, path, "depth", (2,))
    check_option("encoding", encoding, DEPTH_PNG_ENCODINGS)
    d = depth.astype(np.float64)
    info = PngImagePlugin.PngInfo()
    info.add_text(_KEY_ENCODING, encoding)
    if encoding == "millimeters":
        scale = 0.001
        counts = np.clip(np.round(d / scale), 0, _UINT16_MAX)
    else:
        low, high = (float(d.min()), float(d.max())) if d.size else (0.0, 0.0)
        scale = 1.0 / _UINT16_MAX
        span = high - low
        counts = np.round((d - low) / span * _UINT16_MAX) if span > 0 else np.zeros_like(d)
        info.add_text(_KEY_MIN, repr(low))
        info.add_text(_KEY_MAX, repr(high))
    info.add_text(_KEY_SCALE, repr(scale))
    image = Image.fromarray(counts.astype(np.uint16))  # mode "I;16"
    with atomic_path(path) as temp, open(temp, "xb") as f:
        image.save(f, format="PNG", pnginfo=info)
    return Path(path)


def read_depth_png16(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Read a PNG written by ``write_depth_png16``.

    Args:
        path: the PNG file.

    Returns:
        (depth, info): float32 array [H, W], metres for "millimeters" or [0, 1] for
        "normalized"; info holds "encoding", "scale" and, for "normalized", "min_m" and
        "max_m" (depth_m = min_m + depth * (max_m - min_m)).
    """
    with Image.open(path) as image:
        text = dict(getattr(image, "text", {}))
        if image.mode not in ("I;16", "I;16B", "I"):
            raise ValueError(
                f"path {os.fspath(path)!r} is a mode {image.mode!r} image, expected 16-bit greyscale"
            )
        counts = np.asarray(image).astype(np.float64)
    encoding = text.get(_KEY_ENCODING)
    if encoding not in DEPTH_PNG_ENCODINGS or _KEY_SCALE not in text:
        raise ValueError(
            f"path {os.fspath(path)!r} has no {_KEY_ENCODING!r}/{_KEY_SCALE!r} text chunks naming one of "
            f"{DEPTH_PNG_ENCODINGS}; it was not written by write_depth_png16"
        )
    info: dict = {"encoding": encoding, "scale": float(text[_KEY_SCALE])}
    if encoding == "normalized":
        info["min_m"] = float(text[_KEY_MIN])
        info["max_m"] = float(text[_KEY_MAX])
    return (counts * info["scale"]).astype(np.float32), info


def write_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write an array as a ``.npy`` file (exactly at ``path``: no suffix is appended).

    Args:
        path: the file to write.
        array: numeric array of any shape (float, or integer such as class ids), finite.

    Returns:
        the path written.
    """
    _check_array(array, path, "array", None)
    with atomic_path(path) as temp, open(temp, "xb") as f:
        np.save(f, array, allow_pickle=False)
    return Path(path)


def exr_available() -> bool:
    """Whether the optional OpenEXR package (``pip install openexr``) can be imported."""
    return importlib.util.find_spec("OpenEXR") is not None


def write_exr(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write a float32 OpenEXR image (ZIP compression) with the optional ``openexr`` package.

    Args:
        path: the EXR file to write.
        array: float array [H, W] or [H, W, 1] (channel "Y", e.g. depth in metres) or
            [H, W, 3] (channels "R", "G", "B", e.g. normals), finite; stored as float32.

    Returns:
        the path written.
    """
    _check_array(array, path, "array", (2, 3))
    if array.ndim == 3 and array.shape[2] not in _EXR_CHANNELS:
        raise ValueError(
            f"array for {os.fspath(path)!r} must have 1 or 3 channels, got shape {array.shape}"
        )
    try:
        import OpenEXR
    except ImportError as error:
        raise ImportError(
            "write_exr needs the optional OpenEXR package: pip install openexr"
        ) from error
    pixels = array.reshape(array.shape[0], array.shape[1], -1).astype(np.float32)  # [H, W, C]
    # OpenEXR reads the raw buffer: channels must be contiguous copies, not strided views.
    channels = {
        name: np.ascontiguousarray(pixels[:, :, i])
        for i, name in enumerate(_EXR_CHANNELS[pixels.shape[2]])
    }
    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
    with atomic_path(path, suffix=".exr") as temp:
        OpenEXR.File(header, channels).write(str(temp))
    return Path(path)


def write_png8(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write an 8-bit RGB PNG, for previews and ControlNet maps.

    Args:
        path: the PNG file to write.
        image: float array [H, W, 3], RGB in [0, 1] (clipped), finite.

    Returns:
        the path written.
    """
    _check_array(image, path, "image", (3,))
    if image.shape[2] != 3:
        raise ValueError(f"image for {os.fspath(path)!r} must have shape [H, W, 3], got {image.shape}")
    if not np.issubdtype(image.dtype, np.floating):
        raise TypeError(f"image for {os.fspath(path)!r} must be float in [0, 1], got dtype {image.dtype}")
    rgb8 = np.round(np.clip(image.astype(np.float64), 0.0, 1.0) * 255).astype(np.uint8)
    with atomic_path(path) as temp, open(temp, "xb") as f:
        Image.fromarray(rgb8).save(f, format="PNG")
    return Path(path)


def write_class_png(path: str | os.PathLike, class_ids: np.ndarray) -> Path:
    """Write class ids [H, W] (0..255) as an 8-bit greyscale PNG, the usual label-map format.

    Args:
        path: the PNG file to write.
        class_ids: integer array [H, W] with values in 0..255 (ADE20K ids are 0..149).

    Returns:
        the path written.
    """
    if not isinstance(class_ids, np.ndarray) or class_ids.ndim != 2 or not np.issubdtype(class_ids.dtype, np.integer):
        raise ValueError(f"class ids for {os.fspath(path)!r} must be an integer array [H, W]")
    if class_ids.size and (class_ids.min() < 0 or class_ids.max() > 255):
        raise ValueError(f"class ids for {os.fspath(path)!r} must lie in 0..255, "
                         f"got {class_ids.min()}..{class_ids.max()}")
    with atomic_path(path) as temp, open(temp, "xb") as f:
        Image.fromarray(class_ids.astype(np.uint8)).save(f, format="PNG")
    return Path(path)


# Raw predictions: which file formats can hold each task's values, and how. --------------------

RAW_FORMATS = ("npy", "png", "exr")
_PNG_TASKS = ("depth", "segmentation")  # 16-bit depth, 8-bit class ids: no other task fits a PNG losslessly


def raw_formats(task: str) -> tuple[str, ...]:
    """The RAW_FORMATS that can hold a task's raw values (EXR holds floats, so not class ids)."""
    return tuple(f for f in RAW_FORMATS
                 if f == "npy" or (f == "png" and task in _PNG_TASKS) or (f == "exr" and task != "segmentation"))


def check_raw(task: str, raw: np.ndarray, file_format: str, path: str | os.PathLike = "") -> None:
    """Raise before writing anything if `raw` cannot be written as `file_format` (see ``write_raw``)."""
    check_option("file format", file_format, RAW_FORMATS)
    if file_format not in raw_formats(task):
        raise ValueError(f"a {task} prediction cannot be saved as {file_format}; use one of {raw_formats(task)}")
    if file_format == "exr" and not exr_available():
        raise ValueError("EXR needs the optional OpenEXR package: pip install openexr (or use npy)")
    _check_array(raw, path, "raw prediction", None)
    if task == "segmentation" and raw.size and (raw.min() < 0 or raw.max() > 255):
        raise ValueError(f"class ids for {os.fspath(path)!r} must lie in 0..255, got {raw.min()}..{raw.max()}")


def write_raw(path: str | os.PathLike, task: str, raw: np.ndarray, file_format: str,
              depth_png_encoding: str = "millimeters") -> Path:
    """Write one image's raw prediction in one of its ``raw_formats``, atomically.

    npy keeps the values (float32; class ids as uint8); png is 16-bit depth (``write_depth_png16``
    with `depth_png_encoding`) or 8-bit class ids; exr is float32.

    Args:
        path: the file to write (the caller chooses the name).
        task: the prediction's task (dmp_model.tasks.codecs.TASKS).
        raw: numpy array of one image's raw values ([H, W] or [H, W, 3]).
        file_format: one of RAW_FORMATS.
        depth_png_encoding: one of DEPTH_PNG_ENCODINGS, for depth as png.
    """
    check_raw(task, raw, file_format, path)
    if task == "segmentation":
        ids = raw.astype(np.uint8)
        return write_npy(path, ids) if file_format == "npy" else write_class_png(path, ids)
    if file_format == "png":
        return write_depth_png16(path, raw, depth_png_encoding)
    values = raw.astype(np.float32)
    return write_npy(path, values) if file_format == "npy" else write_exr(path, values)


_PNG_SUFFIX = {"depth": "_depth16.png", "segmentation": "_classes.png"}


def prediction_paths(task: str, stem: Path, folder: Path, formats: Sequence[str],
                     uncertainty: bool = False) -> dict[str, Path]:
    """The files one image's prediction is written to, in writing order (the last one marks it done)."""
    base = folder / stem
    suffixes = {"npy": ".npy", "png": _PNG_SUFFIX.get(task), "exr": ".exr"}
    paths = {f: base.with_name(base.name + suffixes[f]) for f in raw_formats(task) if f in formats}
    if uncertainty:
        paths.update({f"uncertainty_{ext}": base.with_name(f"{base.name}_uncertainty.{ext}") for ext in ("npy", "png")})
    if "visual" in formats:
        paths["visual"] = base.with_name(base.name + "_visual.png")
    return paths


def write_prediction(prediction, index: int, paths: dict[str, Path]) -> list[Path]:
    """Write one image of a Prediction to `paths` (from ``prediction_paths``) as one set (``write_predictions``)."""
    return write_predictions([(prediction, index, paths)])


def write_predictions(entries: Sequence[tuple[object, int, dict[str, Path]]]) -> list[Path]:
    """Write one image's predictions, all files or none: (Prediction, row, paths) per adapter.

    Every file is first written to a hidden temporary name beside its target; only when all are
    written are they renamed onto their targets, each entry's last path (its done marker, see
    ``prediction_paths``) after all the others. On any failure (a full disk, out of memory, an
    interruption) the temporary files are removed and no target is touched, so an image never
    ends with some outputs and not others.

    Returns:
        the paths written, in the order they were committed.
    """
    staged: list[tuple[Path, Path, bool]] = []  # (temporary, target, is a done marker)
    try:
        for prediction, index, paths in entries:
            raw = prediction.raw[index].numpy()
            for position, (file_format, path) in enumerate(paths.items()):
                temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.part")
                staged.append((temp, path, position == len(paths) - 1))
                _write_output(prediction, index, raw, file_format, temp)
        staged.sort(key=lambda item: item[2])  # stable: the markers last, each group in writing order
        for temp, path, _ in staged:
            os.replace(temp, path)
    except BaseException:
        for temp, _, _ in staged:
            temp.unlink(missing_ok=True)
        raise
    return [path for _, path, _ in staged]


def _write_output(prediction, index: int, raw: np.ndarray, file_format: str, path: Path) -> None:
    if file_format == "visual":
        write_png8(path, prediction.visual[index].numpy())
    elif file_format == "uncertainty_npy":
        write_npy(path, prediction.uncertainty[index].numpy())
    elif file_format == "uncertainty_png":
        write_png8(path, prediction.uncertainty_visual[index].numpy())
    else:
        write_raw(path, prediction.task, raw, file_format)
