"""Image files as Pillow reads them, for inputs that may be anything: every failure one clear error.

A photo library holds more than photos: truncated downloads, files with the wrong extension,
formats Pillow knows but does not implement in full, decompression bombs (a small file whose
header promises gigapixels). Pillow's plugins signal these with many exception types (OSError,
SyntaxError, NotImplementedError, EOFError, struct.error, ...), some only when the pixels are
decoded long after ``Image.open``. Here every one of them becomes an ``ImageReadError`` (a
ValueError) naming the file and the reason in one line, and Pillow's warnings become log lines
naming the file.

Rules (docs/batch.md states them for users):

- Pixel limit: a file whose frame has more pixels than ``max_pixels`` is refused before it is
  decoded. The default is the size at which Pillow itself refuses a file as a decompression bomb
  (2 x ``PIL.Image.MAX_IMAGE_PIXELS``, 178,956,970 pixels as shipped); 0 lifts the limit.
- Frames: ``frame_count`` counts the pictures in a file (animation frames, MPO views, TIFF pages);
  Photoshop files count as one picture (their composite; Pillow's "frames" there are layers).
- Orientation: ``orientation_method`` is the transpose that turns a frame upright by its EXIF
  orientation, as ``PIL.ImageOps.exif_transpose`` applies it and as viewers show the file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFile

logger = logging.getLogger(__name__)

FRAMES = ("first", "all")  # which pictures of a multi-frame file are predicted
# Formats Pillow opens but cannot decode pixels of: MPEG (header only) and the stub plugins (BUFR,
# GRIB, HDF5, WMF), which need a handler registered from outside.
_UNDECODABLE = ("MPEG",)
# Formats whose Pillow "frames" are not pictures of the scene: Photoshop layers.
_LAYERED = ("PSD",)
# EXIF orientation (1..8) -> the transpose that shows the image upright (as ImageOps.exif_transpose).
_ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = (Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270, Image.Transpose.TRANSVERSE,
               Image.Transpose.ROTATE_90)
_EXIF_ORIENTATION = 0x0112
_LIMIT_LOCK = threading.RLock()  # reads nest: a bomb's header is read under the read's lock


class ImageReadError(ValueError):
    """An image file that cannot be read: str() is one line naming the file and the reason.

    Attributes:
        path: the file (or a PIL image's name); reason: why, one line; frame: the 0-based frame.
    """

    def __init__(self, path: str | os.PathLike, reason: str = "", frame: int = 0):
        self.path, self.reason, self.frame = path, reason, frame
        super().__init__(f"cannot read image {path}{f' (frame {frame + 1})' if frame else ''}: {reason}")


class _Refused(Exception):
    """A frame refused before decoding (the pixel limit, no pixels): the reason."""


@dataclass(frozen=True)
class ImageHeader:
    """What a file's header tells without decoding its pixels.

    Attributes:
        size: (H, W) of the first frame as it is shown, EXIF orientation applied (for a PNG whose
            orientation sits after its pixel data, as stored: decoding tells the truth).
        frames: pictures in the file (``frame_count``).
        format: Pillow's format name ("JPEG", "PNG", ...).
        mode: Pillow's pixel mode of the first frame ("RGB", "I;16", "F", ...).
    """

    size: tuple[int, int]
    frames: int
    format: str
    mode: str


def readable_extensions() -> tuple[str, ...]:
    """File extensions (lower case, with the dot) of every format this Pillow can decode, sorted."""
    Image.init()
    decodable = {name for name, (factory, _) in Image.OPEN.items()
                 if name not in _UNDECODABLE
                 and not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))}
    decodable.add("MPO")  # opened by the JPEG plugin, registered under its own name
    return tuple(sorted(ext for ext, name in Image.registered_extensions().items() if name in decodable))


def default_max_pixels() -> int | None:
    """The pixel count above which Pillow refuses a file as a decompression bomb (None: no limit)."""
    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else 2 * int(limit)


def resolve_max_pixels(max_pixels: int | None) -> int | None:
    """`max_pixels` as a limit: None -> Pillow's (``default_max_pixels``), 0 -> None (no limit)."""
    if max_pixels is None:
        return default_max_pixels()
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 0:
        raise ValueError(f"max_pixels must be a number of pixels (0 = no limit, None = Pillow's limit), "
                         f"got {max_pixels!r}")
    return max_pixels or None


@contextlib.contextmanager
def _pillow_limit(limit: int | None) -> Iterator[None]:
    """Pillow's own bomb checks (at open, seek and load, inside its plugins) refuse above `limit` for
    the length of one read. Pillow reads a module global, so a limit other than its own is set under
    a lock and restored; at Pillow's limit (the default) nothing is touched."""
    if limit == default_max_pixels():
        yield
        return
    with _LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None if limit is None else -(-limit // 2)  # Pillow refuses above 2x this
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


@contextlib.contextmanager
def pillow_warnings_logged(name: str | os.PathLike) -> Iterator[None]:
    """Pillow's warnings while reading `name` as log lines naming it (not as warnings showing Pillow's
    source lines); decompression-bomb warnings are dropped, the pixel limit decides instead."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            seen = set()
            for warning in caught:
                text = " ".join(str(warning.message).split())
                if not issubclass(warning.category, Image.DecompressionBombWarning) and text not in seen:
                    seen.add(text)
                    logger.warning("%s: %s", name, text)


def bomb_message(size: tuple[int, int], limit: int) -> str:
    """Why a frame of `size` (W, H) is refused, and what to do when it is a genuine image."""
    width, height = size
    return (f"{width}x{height} pixels ({width * height / 1e6:.1f} megapixels) is above the limit of "
            f"{limit / 1e6:.1f} megapixels that guards against decompression bombs; if it is a genuine image, "
            f"raise the limit (dmp predict --max-pixels {width * height}, or max_pixels=) and consider tiling (--tile)")


def describe_error(err: BaseException) -> str:
    """One line saying why a file could not be read, from whatever Pillow (or the system) raised."""
    text = " ".join(str(err).split())
    if isinstance(err, Image.DecompressionBombError):
        return (f"refused as a possible decompression bomb ({text}); if it is a genuine image, raise the "
                f"limit with --max-pixels (or max_pixels=)")
    if isinstance(err, Image.UnidentifiedImageError):
        return "not an image file Pillow can identify (an unknown format, or a damaged header)"
    if isinstance(err, MemoryError) or isinstance(err, RuntimeError) and "allocate memory" in text:
        return "out of memory while decoding it"
    if isinstance(err, IsADirectoryError):
        return "is a folder, not a file"
    if isinstance(err, FileNotFoundError):
        return "file not found"
    if isinstance(err, NotImplementedError):
        return f"this variant of the format is not implemented by Pillow ({text or 'no details'})"
    if isinstance(err, OSError) and "truncated" in text:
        return f"the file is truncated ({text})"
    return f"damaged or unsupported file ({type(err).__name__}: {text or 'no details'})"


def frame_count(image: Image.Image) -> int:
    """Pictures in an open file: frames of an animation, views of an MPO, pages of a TIFF; 1 for a
    Photoshop file (its composite) and for files without frames."""
    if image.format in _LAYERED:
        return 1
    return max(1, int(getattr(image, "n_frames", 1)))


def orientation_method(image: Image.Image, decoded: bool = True) -> Image.Transpose | None:
    """The transpose that shows `image` upright by its EXIF orientation (None: upright as stored).

    With ``decoded=False`` nothing is decoded to find out: a PNG keeps its EXIF after the pixels at
    times, where only decoding reaches it; that case reads as upright.
    """
    if not decoded and image.format == "PNG" and "exif" not in image.info:
        return None
    try:
        value = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception as err:  # damaged EXIF blocks raise anything; the pixels may be fine
        logger.warning("%s: unreadable EXIF data, shown as stored (%s)", getattr(image, "filename", "image"),
                       " ".join(str(err).split()))
        return None
    return _ORIENTATIONS.get(value) if isinstance(value, int) else None


def upright_size(image: Image.Image, method: Image.Transpose | None) -> tuple[int, int]:
    """(H, W) of `image` once turned by `method`."""
    width, height = image.size
    return (width, height) if method in _SWAPS_AXES else (height, width)


def _check_pixels(image: Image.Image, limit: int | None) -> None:
    width, height = image.size
    if limit is not None and width * height > limit:
        raise _Refused(bomb_message(image.size, limit))
    if width == 0 or height == 0:
        raise _Refused(f"it has no pixels ({width}x{height})")


def _open(path: Path, limit: int | None) -> Image.Image:
    """Image.open with our pixel limit, and our message for a bomb Pillow refuses at open."""
    try:
        with _pillow_limit(limit):
            image = Image.open(path)
    except Image.DecompressionBombError:
        with _pillow_limit(None):  # the header only, to say how large: nothing is decoded
            with Image.open(path) as image:
                size = image.size
        raise _Refused(bomb_message(size, limit)) from None
    try:
        _check_pixels(image, limit)
    except _Refused:
        image.close()
        raise
    return image


def read_header(path: str | os.PathLike, max_pixels: int | None = None) -> ImageHeader:
    """Size (upright), frame count, format and mode of an image file, its pixels not decoded.

    Raises:
        ImageReadError naming the file when it is not a readable image or exceeds the pixel limit.
    """
    path, limit = Path(path), resolve_max_pixels(max_pixels)
    try:
        with pillow_warnings_logged(path), _open(path, limit) as image:
            size = upright_size(image, orientation_method(image, decoded=False))
            return ImageHeader(size, frame_count(image), str(image.format), image.mode)
    except _Refused as err:
        raise ImageReadError(path, str(err)) from None
    except Exception as err:  # any plugin's failure on a damaged file: see the module doc
        raise ImageReadError(path, describe_error(err)) from err


def decode_frame(path: str | os.PathLike, frame: int = 0, max_pixels: int | None = None
                 ) -> tuple[Image.Image, Image.Transpose | None]:
    """One frame of an image file, decoded: (the frame, its ``orientation_method``).

    Use the frame in a ``with`` block (it holds the file open for multi-frame formats). Any failure
    to open, seek or decode it, the pixel limit and running out of memory included, is an
    ImageReadError naming the file; a decoded frame needs the file no more (crops and conversions
    read the pixels in memory).

    Args:
        path: the image file.
        frame: 0-based picture index (see ``frame_count``).
        max_pixels: pixel limit (None: Pillow's, 0: none); see the module doc.
    """
    path, limit = Path(path), resolve_max_pixels(max_pixels)
    image = None
    try:
        with pillow_warnings_logged(path), _pillow_limit(limit):
            image = _open(path, limit)
            if frame:
                image.seek(frame)  # frames may differ in size (TIFF pages): checked again
                _check_pixels(image, limit)
            image.load()
            return image, orientation_method(image)
    except _Refused as err:
        _close(image)
        raise ImageReadError(path, str(err), frame) from None
    except Exception as err:  # any plugin's failure on a damaged file: see the module doc
        _close(image)
        raise ImageReadError(path, describe_error(err), frame) from err


def _close(image: Image.Image | None) -> None:
    if image is not None:
        image.close()
