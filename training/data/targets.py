"""Reading training targets of every task, and the errors of unusable training data.

Each task accepts some kinds of file (``TARGET_EXTENSIONS``, described in ``ACCEPTED_KINDS``);
a target of the wrong kind is a ``TargetKindError`` naming the file and the accepted kinds.
``read_target`` returns a target in its task's raw layout (see ``dmp_model.tasks.codecs``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from dmp_model.images import IMAGE_EXTENSIONS, pil_to_tensor
from dmp_model.tasks.normals import convert_normals, rgb_to_normals
from dmp_model.tasks.palettes import NUM_CLASSES, snap_to_palette

from ..config import TrainConfig

ARRAY_EXTENSIONS = (".npy", ".npz", ".exr")
TARGET_EXTENSIONS = {
    "depth": (".npy", ".npz", ".png", ".exr"),
    "normal": (".png", ".npy", ".npz", ".exr"),
    "segmentation": (".png", ".npy", ".npz"),
    "albedo": IMAGE_EXTENSIONS + ARRAY_EXTENSIONS,
    "shading": IMAGE_EXTENSIONS + ARRAY_EXTENSIONS,
    "rgb": IMAGE_EXTENSIONS + ARRAY_EXTENSIONS,
}
ACCEPTED_KINDS = {
    "depth": "float .npy/.npz arrays in metres, 16-bit PNG (with --depth-png-scale unless written by "
             "dmp_model.io.writers.write_depth_png16) or EXR",
    "normal": "RGB PNG images ((n + 1) / 2 in --normal-convention) or float [H, W, 3] .npy/.npz/.exr vectors",
    "segmentation": "class-id PNG (mode L, P or I, values 0..149) or integer .npy arrays, or colour images "
                    "with --segmentation-palette",
    "albedo": "RGB images or float [H, W, 3] arrays",
    "shading": "grey or RGB images or float arrays",
    "rgb": "RGB images or float [H, W, 3] arrays",
}


class DataError(ValueError):
    """The training data cannot be used as given; the message says which files and why."""


class TargetKindError(DataError):
    """A target file is not of a kind the task accepts (e.g. an 8-bit image as depth)."""


def _read_array(path: Path) -> np.ndarray:
    """A .npy, .npz ('x', as the DMP reference, or its only array) or .exr file as a numpy array."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.keys())
            if "x" in names:
                return archive["x"]
            if len(names) == 1:
                return archive[names[0]]
            raise TargetKindError(f"{path}: .npz holds arrays {names}; expected one array or one named 'x'")
    if suffix == ".exr":
        try:
            import OpenEXR
        except ImportError as err:
            raise TargetKindError(f"{path}: reading EXR needs the optional OpenEXR package "
                                  "(pip install openexr)") from err
        with OpenEXR.File(str(path)) as exr:
            channels = exr.channels()
            names = list(channels)
            order = ([c for c in ("R", "G", "B") if c in names]
                     or [c for c in ("Y", "Z", "depth") if c in names] or names[:1])
            planes = [np.asarray(channels[c].pixels, dtype=np.float32) for c in order]
            return planes[0] if len(planes) == 1 else np.stack(planes, -1)
    raise TargetKindError(f"{path}: unsupported array file extension {suffix!r}")


def _squeeze_plane(array: np.ndarray, path: Path) -> np.ndarray:
    """[H, W], [H, W, 1] or [1, H, W] -> [H, W]."""
    if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
        array = array.reshape(array.shape[1:] if array.shape[0] == 1 else array.shape[:2])
    if array.ndim != 2:
        raise TargetKindError(f"{path}: expected a single-channel [H, W] array, got shape {array.shape}")
    return array


def _read_depth(path: Path, config: TrainConfig) -> torch.Tensor:
    """Depth in metres [H, W]; non-finite and negative values become 0."""
    if path.suffix.lower() == ".png":
        depth = _read_depth_png(path, config)
    else:
        array = _read_array(path)
        if not np.issubdtype(array.dtype, np.floating):
            raise TargetKindError(f"{path}: depth arrays must be float metres, got dtype {array.dtype}")
        depth = _squeeze_plane(array, path).astype(np.float32)
    depth = np.where(np.isfinite(depth) & (depth > 0), depth, 0).astype(np.float32)
    return torch.from_numpy(depth)


def _read_depth_png(path: Path, config: TrainConfig) -> np.ndarray:
    from PIL import Image

    from dmp_model.io.writers import read_depth_png16

    with Image.open(path) as image:
        mode, has_scale = image.mode, "depth_scale" in getattr(image, "text", {})
        if mode not in ("I;16", "I;16B", "I;16L", "I"):
            raise TargetKindError(f"{path}: a mode {mode!r} PNG is not depth; depth PNGs must be 16-bit "
                                  "greyscale")
        if not has_scale:
            if config.depth_png_scale is None:
                raise TargetKindError(f"{path}: a 16-bit depth PNG without a stored scale; pass "
                                      "--depth-png-scale (metres per unit, e.g. 0.001 for millimetres)")
            return np.asarray(image).astype(np.float32) * np.float32(config.depth_png_scale)
    depth, info = read_depth_png16(path)
    if info["encoding"] == "normalized":
        depth = info["min_m"] + depth * (info["max_m"] - info["min_m"])
    return depth.astype(np.float32)


def _read_image_pixels(path: Path) -> tuple[np.ndarray, str]:
    """An image file as float [H, W, C] in [0, 1] and its PIL mode (16-bit greys scaled by 65535)."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        mode = image.mode
        if mode in ("L", "I;16", "I;16B", "I;16L", "I", "F"):
            return pil_to_tensor(image).permute(1, 2, 0).numpy()[..., :1], mode
        return pil_to_tensor(image).permute(1, 2, 0).numpy(), mode


def read_normals(path: str | os.PathLike, convention: str, adapter_convention: str) -> torch.Tensor:
    """A normal file as unit normals [H, W, 3] (invalid zero vectors stay zero).

    Args:
        path: RGB image ((n + 1) / 2) or float [H, W, 3] .npy/.npz/.exr vectors.
        convention: the camera frame of the file, one of dmp_model.tasks.normals.NORMAL_CONVENTIONS.
        adapter_convention: the frame to return them in (the adapter's, DMP: "omnidata").
    """
    path = Path(path)
    if path.suffix.lower() in ARRAY_EXTENSIONS:
        array = _read_array(path)
        if not np.issubdtype(array.dtype, np.floating) or array.ndim != 3 or array.shape[-1] != 3:
            raise TargetKindError(f"{path}: normal arrays must be float [H, W, 3], got {array.dtype} "
                                  f"{array.shape}")
        normals = torch.from_numpy(np.nan_to_num(array.astype(np.float32)))
        normals = normals / normals.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    else:
        pixels, mode = _read_image_pixels(path)
        if pixels.shape[-1] != 3:
            raise TargetKindError(f"{path}: a mode {mode!r} image is not a normal map; expected RGB")
        normals = rgb_to_normals(torch.from_numpy(pixels).float()[None])[0]
    return convert_normals(normals[None], convention, adapter_convention)[0]


def _read_segmentation(path: Path, config: TrainConfig) -> torch.Tensor:
    """ADE20K class ids int64 [H, W] in 0..149."""
    from PIL import Image

    if path.suffix.lower() in ARRAY_EXTENSIONS:
        array = _squeeze_plane(_read_array(path), path)
        if not np.issubdtype(array.dtype, np.integer):
            raise TargetKindError(f"{path}: class-id arrays must be integers, got dtype {array.dtype}")
        ids = torch.from_numpy(array.astype(np.int64))
    elif config.segmentation_palette is not None:
        pixels, mode = _read_image_pixels(path)
        if pixels.shape[-1] != 3:
            raise TargetKindError(f"{path}: a mode {mode!r} image is not a {config.segmentation_palette} "
                                  "colour map")
        ids = snap_to_palette(torch.from_numpy(pixels).float()[None], config.segmentation_palette)[0]
    else:
        with Image.open(path) as image:
            if image.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise TargetKindError(f"{path}: a mode {image.mode!r} image is not a class-id map; for "
                                      "colour-coded segmentation pass --segmentation-palette dmp or ade20k")
            ids = torch.from_numpy(np.asarray(image).astype(np.int64))
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= NUM_CLASSES):
        raise TargetKindError(f"{path}: class ids must be in 0..{NUM_CLASSES - 1} (ADE20K, 0 = wall), found "
                              f"{int(ids.min())}..{int(ids.max())}; ADE20K's own annotations count from 1 "
                              "with 0 for 'other' and need converting")
    return ids


def _read_image_target(path: Path, grey: bool) -> torch.Tensor:
    """Albedo/rgb [H, W, 3] or shading [H, W] as float (images in [0, 1], arrays as stored)."""
    if path.suffix.lower() in ARRAY_EXTENSIONS:
        array = _read_array(path)
        if not np.issubdtype(array.dtype, np.floating) or array.ndim not in (2, 3):
            raise TargetKindError(f"{path}: expected a float [H, W] or [H, W, 3] array, got {array.dtype} "
                                  f"{array.shape}")
        values = torch.from_numpy(np.nan_to_num(array.astype(np.float32)))
        values = values[..., None] if values.ndim == 2 else values
    else:
        values = torch.from_numpy(_read_image_pixels(path)[0]).float()
    if grey:
        return values.mean(-1)
    return values.expand(-1, -1, 3) if values.shape[-1] == 1 else values[..., :3]


def read_target(path: str | os.PathLike, task: str, config: TrainConfig) -> torch.Tensor:
    """A target file in its task's raw layout (see dmp_model.tasks.codecs): depth [H, W] metres, normals
    [H, W, 3], class ids [H, W], albedo/rgb [H, W, 3], shading [H, W].

    Raises:
        TargetKindError: the file is not a kind this task accepts.
        ValueError/OSError: the file cannot be read.
    """
    path = Path(path)
    if task == "depth":
        return _read_depth(path, config)
    if task == "normal":
        return read_normals(path, config.normal_convention, config.adapter_normal_convention)
    if task == "segmentation":
        return _read_segmentation(path, config)
    return _read_image_target(path, grey=task == "shading")
