"""Images in and out of the model: conversion, processing resolution, padding to multiples of 8.

Policy (stated once, here): the image is resized with bicubic (antialiased) interpolation so
that its shorter side equals the processing resolution, as the reference does (0 keeps the
native size); then it is padded on the right and bottom by edge replication up to a multiple
of 8, never stretched, and the padding is cropped off the prediction, which is finally resized
back to the input size.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

LATENT_FACTOR = 8
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Framing:
    """Where a batch was resized and padded, to undo it on the prediction."""

    input_size: tuple[int, int]
    processing_size: tuple[int, int]
    padded_size: tuple[int, int]


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """An image file as float32 [3, H, W] in [0, 1], turned upright by its EXIF orientation as viewers show it."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return pil_to_tensor(ImageOps.exif_transpose(image))
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err


def pil_to_tensor(image) -> torch.Tensor:
    """A PIL image of any common mode (RGBA, grey, 16-bit, palette) as float32 [3, H, W] in [0, 1]."""
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64) / 65535.0
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
    else:
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            # Transparent pixels carry arbitrary colour: composite onto white, as viewers show them.
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        array = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    return array_to_tensor(array)


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
    Raises on empty input, non-finite pixels or mixed sizes.
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
                tensors.append(pil_to_tensor(item))
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
        batch = torch.stack(tensors)
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


def list_images(inputs: Sequence[str | os.PathLike], extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Image files among `inputs` (files, or folders searched recursively for `extensions`), sorted, de-duplicated."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.extend(p for p in sorted(path.rglob("*")) if p.suffix.lower() in extensions)
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"input not found: {path}")
    return sorted(dict.fromkeys(found))
