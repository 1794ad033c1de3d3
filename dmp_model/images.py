"""Images in and out of the model: conversion, processing resolution, padding to multiples of 8.

Policy (stated once, here): the image is resized with bicubic (antialiased) interpolation so
that its shorter side equals the processing resolution, as the reference does (0 keeps the
native size); then it is padded on the right and bottom by edge replication up to a multiple
of 8, never stretched, and the padding is cropped off the prediction, which is finally resized
back to the input size.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .io.image_files import (
    ImageReadError,
    decode_frame,
    describe_error,
    orientation_method,
    pillow_warnings_logged,
    upright_size,
)

logger = logging.getLogger(__name__)
LATENT_FACTOR = 8
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Framing:
    """Where a batch was resized and padded, to undo it on the prediction."""

    input_size: tuple[int, int]
    processing_size: tuple[int, int]
    padded_size: tuple[int, int]


def load_image(path: str | os.PathLike, frame: int = 0, max_pixels: int | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """An image file as float32 [3, H, W] in [0, 1], upright by its EXIF orientation as viewers show it.

    Every format Pillow decodes is read (``image_files.readable_extensions``); high-bit-depth and
    float files follow ``pil_to_tensor``'s rules. Memory: the decoded frame (Pillow's, 1-4 bytes a
    pixel) and the result (12 bytes a pixel), converted a band of rows at a time.

    Args:
        path: the file.
        frame: 0-based picture of a multi-frame file (animation frame, MPO view, TIFF page).
        max_pixels: refuse frames with more pixels (None: Pillow's decompression-bomb limit, 0: none).
        out: a float32 [3, H, W] tensor to fill (a row of a batch); used when the image has its size,
            else a new tensor is returned.

    Raises:
        ValueError (``ImageReadError``) naming the file and the reason, whatever went wrong reading it,
        running out of memory included.
    """
    decoded, method = decode_frame(path, frame, max_pixels)
    with decoded, pillow_warnings_logged(path):
        try:
            return _pil_pixels(decoded, method, out, str(path))
        except Exception as err:  # a mode Pillow cannot convert, or out of memory for the pixels
            height, width = upright_size(decoded, method)
            raise ImageReadError(path, f"{describe_error(err)} (converting its {width}x{height} {decoded.mode} "
                                       "pixels)", frame) from err


def pil_to_tensor(image, *, upright: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """A PIL image of any mode as float32 [3, H, W] in [0, 1].

    Rules: transparent pixels are composited onto white, as viewers show them; grey becomes three
    equal channels; 16-bit modes are divided by 65535; 32-bit integer ("I") images too when their
    values lie in 0..65535; float ("F") images are kept when their finite values lie in [0, 1].
    Other integer and float images are normalised by their own range (minimum -> 0, maximum -> 1)
    with a log line: a float TIFF or PFM of any scale can be predicted. Non-finite float pixels
    become 0 (+inf 1), with a log line.

    Args:
        image: the PIL image (its current frame).
        upright: turn it by its EXIF orientation first (as ``load_image`` and ``to_image_batch`` do).
        out: a float32 [3, H, W] tensor to fill when the result has its size.
    """
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image, got {type(image).__name__}")
    name = getattr(image, "filename", "") or "PIL image"
    try:
        image.load()  # a lazily opened file decodes here: its failures are the file's
    except Exception as err:  # any plugin's failure on a damaged file (io.image_files)
        raise ImageReadError(name, describe_error(err)) from err
    with pillow_warnings_logged(name):
        return _pil_pixels(image, orientation_method(image) if upright else None, out, name)


# Rows converted at a time: the temporaries of a band (Pillow's crop and conversion, numpy, alpha)
# stay a few MB whatever the image's size.
_BAND_PIXELS = 1 << 20
_RGB_MODES = ("RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")


def _pil_pixels(image, method, out: torch.Tensor | None, name: str) -> torch.Tensor:
    """A decoded PIL image turned by `method` (None: as stored) into `out` or a new [3, H, W] tensor."""
    height, width = upright_size(image, method)
    if out is None or tuple(out.shape) != (3, height, width) or out.dtype != torch.float32:
        out = torch.empty(3, height, width)
    mode, channels = _band_mode(image)
    rows = max(1, _BAND_PIXELS // image.width)
    for top in range(0, image.height, rows):
        bottom = min(top + rows, image.height)
        band = image.crop((0, top, image.width, bottom))
        band = band.convert(mode) if band.mode != mode else band
        band = band.transpose(method) if method is not None else band
        pixels = _band_tensor(np.asarray(band))                             # [h, w] or [h, w, C]
        _fill(_region(out, method, image.height, top, bottom)[:channels], pixels)
    if image.mode in ("I", "F"):
        _normalise(out[0], image.mode, name)
    if channels == 1:
        out[1:] = out[0]
    return out


def _band_mode(image) -> tuple[str, int]:
    """The mode a band is converted to, and how many channels of the result it fills."""
    mode = image.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        return mode, 1
    if mode in ("LA", "La") or (mode == "L" and "transparency" in image.info):
        return "LA", 1
    if mode in ("RGBA", "RGBa", "PA") or (mode in ("P", "RGB") and "transparency" in image.info):
        return "RGBA", 3
    if mode in ("1", "L"):
        return "L", 1
    return "RGB", 3  # P, RGB, CMYK, YCbCr, LAB, HSV, ...


def _region(out: torch.Tensor, method, stored_height: int, top: int, bottom: int) -> torch.Tensor:
    """Where stored rows top..bottom land in the upright `out` [3, H, W] (see io.image_files._ORIENTATIONS)."""
    from PIL import Image

    T = Image.Transpose
    if method in (None, T.FLIP_LEFT_RIGHT):
        return out[:, top:bottom]
    if method in (T.ROTATE_180, T.FLIP_TOP_BOTTOM):
        return out[:, stored_height - bottom:stored_height - top]
    if method in (T.TRANSPOSE, T.ROTATE_90):  # stored row y is upright column y
        return out[:, :, top:bottom]
    return out[:, :, stored_height - bottom:stored_height - top]  # ROTATE_270, TRANSVERSE: column H-1-y


def _fill(target: torch.Tensor, pixels: torch.Tensor) -> None:
    """Write a band [h, w] or [h, w, C] (uint8, uint16 as 16-bit, int32/float32 raw) into `target` [c, h, w];
    an alpha channel composites onto white."""
    pixels = pixels if pixels.ndim == 3 else pixels[:, :, None]
    colour = pixels[:, :, :target.shape[0]].permute(2, 0, 1)
    if pixels.dtype == torch.uint8:
        target.copy_(colour).div_(255)
    else:
        target.copy_(colour)
    if pixels.shape[2] in (2, 4):  # alpha: c * a + (1 - a)
        alpha = pixels[:, :, -1].float().div_(255)
        target.mul_(alpha).add_(1 - alpha)


def _band_tensor(array: np.ndarray) -> torch.Tensor:
    """A band's pixels as a tensor: uint8 as is, 16-bit as float32 / 65535, 32-bit int and float as float32."""
    if array.dtype == np.uint8:
        return torch.from_numpy(array.copy())  # Pillow's buffer is read-only
    if array.dtype.kind == "u" and array.dtype.itemsize == 2:  # "I;16", "I;16B" (big-endian), ...
        return torch.from_numpy(array.astype(np.float32)).div_(65535)
    return torch.from_numpy(array.astype(np.float32))


def _normalise(values: torch.Tensor, mode: str, name: str) -> None:
    """32-bit integer and float images to [0, 1] in place (rules in ``pil_to_tensor``)."""
    finite = torch.isfinite(values)
    bad = int(values.numel() - finite.sum())
    low, high = (torch.aminmax(values[finite]) if bad else torch.aminmax(values)) if bool(finite.any()) else (0, 0)
    low, high = float(low), float(high)
    if mode == "I" and 0 <= low and high <= 65535:
        values.div_(65535)
        return
    if mode == "F" and 0 <= low and high <= 1:  # already in range: kept, only non-finite pixels replaced
        if bad:
            values.nan_to_num_(0.0, 1.0, 0.0)
            logger.info("%s: %d non-finite pixels set to 0 (+inf to 1)", name, bad)
        return
    span = high - low
    values.sub_(low).div_(span if span > 0 else 1)
    if bad:
        values.nan_to_num_(0.0, 1.0, 0.0)
    logger.info("%s: %s values span %g..%g%s; normalised by their own range to 0..1", name,
                "float" if mode == "F" else "32-bit integer", low, high,
                f" ({bad} non-finite pixels set to 0 and +inf to 1)" if bad else "")


def array_to_tensor(array: np.ndarray) -> torch.Tensor:
    """A numpy image [H, W] or [H, W, C] (uint8, uint16 or float in [0, 1]) as float32 [3, H, W]."""
    if array.dtype == np.uint8:
        array = array / 255.0
    elif array.dtype == np.uint16:
        array = array / 65535.0
    elif not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"image arrays must be uint8, uint16 or float, got {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"image arrays must be [H, W] or [H, W, C] with C in 1..4, got shape {array.shape}")
    channels = array.shape[2]
    if channels in (2, 4):  # grey+alpha or RGBA: composite onto white
        alpha = array[:, :, -1:]
        array = array[:, :, :-1] * alpha + (1.0 - alpha)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float()


def to_image_batch(images) -> torch.Tensor:
    """Any supported input as one float32 batch [B, 3, H, W] in [0, 1].

    Accepts a tensor [B, 3, H, W] or [3, H, W] (float in [0, 1], or uint8), a PIL image, a numpy
    array, a file path, or a list of those (all of one size; a [B, 3, H, W] item brings B images).
    Files and PIL images follow one rule: turned upright by their EXIF orientation (``load_image``,
    ``pil_to_tensor(upright=True)``); a file's first frame is read (a PIL image's current one).
    Tensors and arrays have no orientation: pass ``np.asarray(image)`` to keep a PIL image as stored.
    Raises ValueError (or TypeError for unsupported types) on unreadable files, empty input,
    non-finite pixels or mixed sizes.
    """
    from PIL import Image

    if isinstance(images, torch.Tensor):
        batch = images.unsqueeze(0) if images.ndim == 3 else images
        if batch.ndim != 4 or batch.shape[1] not in (1, 3, 4):
            raise ValueError(f"image tensors must be [B, 3, H, W] or [3, H, W], got shape {tuple(images.shape)}")
        if batch.dtype == torch.uint8:
            batch = batch / 255.0
        elif not batch.is_floating_point():
            raise TypeError(f"image tensors must be float in [0, 1] or uint8, got dtype {images.dtype}")
        batch = batch.float()
        if batch.shape[1] == 1:
            batch = batch.expand(-1, 3, -1, -1)
        elif batch.shape[1] == 4:
            batch = batch[:, :3] * batch[:, 3:] + (1 - batch[:, 3:])
    else:
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        tensors = []
        for item in items:
            if isinstance(item, (str, os.PathLike)):
                tensors.append(load_image(item))
            elif isinstance(item, Image.Image):
                tensors.append(pil_to_tensor(item, upright=True))
            elif isinstance(item, np.ndarray):
                tensors.append(array_to_tensor(item))
            elif isinstance(item, torch.Tensor):
                tensors.extend(to_image_batch(item))  # a [B, 3, H, W] item brings all its B images
            else:
                raise TypeError(f"unsupported image type {type(item).__name__}; "
                                "pass tensors, PIL images, numpy arrays or file paths")
        if not tensors:
            raise ValueError("no images given (empty batch)")
        sizes = sorted({tuple(t.shape[-2:]) for t in tensors})
        if len(sizes) > 1:
            raise ValueError(f"images of different sizes {sizes} cannot share a batch; "
                             "predict them separately (the CLI groups files by size)")
        batch = tensors[0][None] if len(tensors) == 1 else torch.stack(tensors)  # one image: no copy
    low, high = check_image_batch(batch)
    # No copy of a valid float32 batch (not even for layout): a clip's frames stay the caller's one
    # tensor, and prediction frames it chunk by chunk.
    return batch.clamp(0, 1) if low < 0 or high > 1 else batch


def check_image_batch(batch: torch.Tensor) -> tuple[float, float]:
    """Refuse empty batches, zero-sized images, NaN/Inf pixels and 0-255 floats before any work is done.

    Returns:
        the smallest and largest pixel value.
    """
    if batch.shape[0] == 0:
        raise ValueError("no images given (empty batch)")
    if batch.shape[-1] == 0 or batch.shape[-2] == 0:
        raise ValueError(f"images have zero size {tuple(batch.shape[-2:])}")
    if not all(bool(torch.isfinite(image).all()) for image in batch):  # per image: no batch-sized mask
        raise ValueError("images contain NaN or infinite pixel values; clean the input (e.g. clamp to [0, 1])")
    low, high = batch.min().item(), batch.max().item()
    if low < -0.5 or high > 2.0:  # small overshoots from upstream resampling are clamped below
        raise ValueError(f"image values span {low:g}..{high:g}, expected floats in [0, 1] "
                         "(divide 0-255 images by 255)")
    return low, high


def processing_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """(h, w) with the shorter side equal to `resolution` (0: unchanged), as torchvision computes it."""
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)):
        raise TypeError(f"processing_resolution must be an integer number of pixels (0 = native size), "
                        f"got {resolution!r}")
    if resolution < 0 or 0 < resolution < LATENT_FACTOR:
        raise ValueError(f"processing_resolution must be 0 (native) or at least {LATENT_FACTOR}, got {resolution}")
    if resolution == 0:
        return height, width
    short, long = min(height, width), max(height, width)
    new_long = int(resolution * long / short)
    return (resolution, new_long) if height <= width else (new_long, resolution)


def resize(images: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Resize [B, C, H, W]; a no-op at the same size. Bicubic is antialiased when shrinking."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    if mode == "nearest":
        return F.interpolate(images, size=size, mode="nearest-exact")
    dtype = images.dtype
    out = F.interpolate(images.float(), size=size, mode=mode, align_corners=False, antialias=True)
    return out.to(dtype)


def frame_batch(images: torch.Tensor, resolution: int) -> tuple[torch.Tensor, Framing]:
    """Images [B, 3, H, W] in [0, 1] -> the backend's input, still in [0, 1], resized and padded to multiples of 8."""
    height, width = images.shape[-2:]
    proc = processing_size(height, width, resolution)
    pixels = resize(images, proc)
    pad_h, pad_w = (-proc[0]) % LATENT_FACTOR, (-proc[1]) % LATENT_FACTOR
    if pad_h or pad_w:
        pixels = F.pad(pixels, (0, pad_w, 0, pad_h), mode="replicate")
    framing = Framing((height, width), proc, (proc[0] + pad_h, proc[1] + pad_w))
    return pixels, framing


def unframe(decoded: torch.Tensor, framing: Framing) -> torch.Tensor:
    """Crop the padding off a decoded batch [B, C, H, W] (resizing back is the codec's job)."""
    return decoded[..., : framing.processing_size[0], : framing.processing_size[1]]


@dataclass(frozen=True)
class InputFiles:
    """What a search of inputs found: files to predict, and files passed over with the reason."""

    files: list[Path]
    ignored: list[tuple[Path, str]]


def find_inputs(inputs: Sequence[str | os.PathLike], extensions: Sequence[str] | None = None,
                exclude: Sequence[str | os.PathLike] = ()) -> InputFiles:
    """Files among `inputs`: files named are taken whatever their extension; folders are searched
    recursively for `extensions` (default: every format Pillow decodes, ``readable_extensions``).

    In folders, files of other extensions, hidden files (names starting with "."), anything that is
    not a regular file, and everything under an `exclude` folder (the output folder) are passed over
    and listed with the reason; sub-folders are searched whatever their names (``fake.jpg/`` too).
    Results are sorted and de-duplicated.

    Raises:
        FileNotFoundError for an input that does not exist.
    """
    from .io.image_files import readable_extensions

    extensions = tuple(e.lower() for e in (readable_extensions() if extensions is None else extensions))
    excluded = {Path(e).resolve() for e in exclude}
    found: list[Path] = []
    ignored: list[tuple[Path, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            _search(path, extensions, excluded, found, ignored)
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"input not found: {path}")
    files = sorted(dict.fromkeys(found))
    taken = set(files)
    return InputFiles(files, sorted({p: r for p, r in ignored if p not in taken}.items()))


def _search(folder: Path, extensions: tuple[str, ...], excluded: set[Path], found: list[Path],
            ignored: list[tuple[Path, str]]) -> None:
    """Walk `folder` (links to folders not followed: they can loop), sorting what it holds into `found`
    and `ignored`; the output folder is skipped without a word (it holds outputs, not inputs)."""
    for root, folders, names in os.walk(folder):
        here = Path(root)
        for name in list(folders):
            sub = here / name
            if sub.resolve() in excluded or name.startswith(".") or sub.is_symlink():
                folders.remove(name)
                if sub.resolve() not in excluded:
                    ignored.append((sub, "a hidden folder, not searched" if name.startswith(".")
                                    else "a link to a folder, not followed (pass its target to predict it)"))
        for name in names:
            path = here / name
            if name.startswith("."):
                ignored.append((path, "a hidden file (its name starts with '.')"))
            elif path.is_dir():  # a link to a folder
                ignored.append((path, "a link to a folder, not followed (pass its target to predict it)"))
            elif not path.is_file():
                ignored.append((path, "not a regular file (a broken link, a device or a pipe)"))
            elif path.suffix.lower() not in extensions:
                ignored.append((path, f"not an image or video format this installation reads "
                                      f"(extension {path.suffix or 'none'!r})"))
            else:
                found.append(path)


def list_images(inputs: Sequence[str | os.PathLike], extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Image files among `inputs` (files, or folders searched recursively for `extensions`), sorted,
    de-duplicated; see ``find_inputs`` for what is passed over."""
    return find_inputs(inputs, extensions).files
