"""Training pairs: finding them, reading targets of every task, and a reproducible sample order.

Layout: a folder of input images and a folder of targets, matched by their path relative to the
folder without the extension (``images/a/001.png`` pairs with ``targets/a/001.npy``). Captions
come from ``metadata.jsonl`` in the images folder (Hugging Face ImageFolder: one JSON object per
line with "file_name" and "text") or from a ``.txt`` file beside each image.

Every pair is read once before training starts: targets of the wrong kind for the task are an
error naming the files and the accepted kinds; unreadable or mismatched pairs (one side missing,
different aspect ratios) are skipped and reported by name, never silently.

Resize policy (``crop``): "center" resizes the shorter side to the training resolution and cuts
the centre square (the aspect ratio is kept, the sides are lost); "stretch" resizes to the square.
Images and image-like targets (albedo, shading, rgb) are resized bicubically with antialiasing;
depth, normals and class ids by nearest neighbour, so no pixel mixes two surfaces.

Flips: a horizontal flip mirrors image and target; for normals the x component (image-horizontal
in every supported convention) is negated, so a flipped normal map stays a true one. The paper
does not flip normals; flipping with x negated is geometrically equivalent, and ``flip_normals=False``
(or ``flip=False``) reproduces the paper's recipe for normals.

Depth targets are clamped to [0, target_scale] before encoding (``encode_raw_target``): a
deliberate deviation from the reference, which encodes depth / target_scale unclamped, so that
pixels farther than target_scale (8 m for DMP) give a white target inside the VAE's [-1, 1]
instead of values beyond it; a prediction saturates at target_scale either way.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dmp_model.adapters import AdapterInfo
from dmp_model.normals import convert_normals, rgb_to_normals
from dmp_model.imageproc import IMAGE_EXTENSIONS, load_image, pil_to_tensor, processing_size, resize
from dmp_model.palettes import NUM_CLASSES, snap_to_palette
from dmp_model.tasks import get_codec

from .config import TrainConfig

logger = logging.getLogger(__name__)

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
             "dmp_model.writers.write_depth_png16) or EXR",
    "normal": "RGB PNG images ((n + 1) / 2 in --normal-convention) or float [H, W, 3] .npy/.npz/.exr vectors",
    "segmentation": "class-id PNG (mode L, P or I, values 0..149) or integer .npy arrays, or colour images "
                    "with --segmentation-palette",
    "albedo": "RGB images or float [H, W, 3] arrays",
    "shading": "grey or RGB images or float arrays",
    "rgb": "RGB images or float [H, W, 3] arrays",
}
# Nearest-neighbour resizing for targets whose values must not be mixed between surfaces.
_NEAREST_TASKS = ("depth", "normal", "segmentation")


class DataError(ValueError):
    """The training data cannot be used as given; the message says which files and why."""


class TargetKindError(DataError):
    """A target file is not of a kind the task accepts (e.g. an 8-bit image as depth)."""


@dataclass(frozen=True)
class Pair:
    """One training example: `name` is the relative path without extension."""

    name: str
    image: Path
    target: Path
    caption: str = ""


# Finding pairs --------------------------------------------------------------------------------

def _index_files(folder: Path, extensions: tuple[str, ...], role: str) -> tuple[dict[str, Path], list[str]]:
    """{relative stem: file} for the files with these extensions; duplicates are reported."""
    if not folder.is_dir():
        raise DataError(f"{role} folder not found: {folder}")
    index: dict[str, Path] = {}
    duplicates = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in extensions and not path.name.startswith("."):
            stem = path.relative_to(folder).with_suffix("").as_posix()
            if stem in index:
                duplicates.append(f"{stem} ({index[stem].name} and {path.name})")
            else:
                index[stem] = path
    return index, duplicates


def read_captions(images_dir: Path) -> dict[str, str]:
    """Captions by relative stem, from metadata.jsonl ("file_name" + "text" or "caption") or .txt files."""
    captions: dict[str, str] = {}
    metadata = images_dir / "metadata.jsonl"
    if metadata.is_file():
        for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name, text = row["file_name"], row.get("text", row.get("caption"))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DataError(f"{metadata}, line {number}: expected a JSON object with 'file_name' and "
                                f"'text', got {line[:80]!r} ({err})") from err
            if not isinstance(text, str):
                raise DataError(f"{metadata}, line {number}: 'text' must be a string, got {text!r}")
            captions[Path(name).with_suffix("").as_posix()] = text
    for path in sorted(images_dir.rglob("*.txt")):
        captions.setdefault(path.relative_to(images_dir).with_suffix("").as_posix(),
                            path.read_text(encoding="utf-8").strip())
    return captions


def find_pairs(images_dir: str | os.PathLike, targets_dir: str | os.PathLike, task: str,
               with_captions: bool = False, role: str = "train") -> tuple[list[Pair], list[str]]:
    """Match images and targets by relative stem.

    Returns:
        (pairs sorted by name, problems: one readable line per skipped file).
    Raises:
        DataError: a folder is missing or empty, or no name matches.
    """
    images_dir, targets_dir = Path(images_dir), Path(targets_dir)
    images, image_dups = _index_files(images_dir, IMAGE_EXTENSIONS, f"{role} images")
    targets, target_dups = _index_files(targets_dir, TARGET_EXTENSIONS[task], f"{role} targets")
    if not images:
        raise DataError(f"{role} images folder {images_dir} holds no images (extensions {IMAGE_EXTENSIONS})")
    if not targets:
        raise DataError(f"{role} targets folder {targets_dir} holds no {task} targets "
                        f"(extensions {TARGET_EXTENSIONS[task]}; expected {ACCEPTED_KINDS[task]})")
    common = sorted(set(images) & set(targets))
    if not common:
        raise DataError(f"no {role} image has a target of the same name: images are named like "
                        f"{sorted(images)[:3]}, targets like {sorted(targets)[:3]} "
                        f"(in {images_dir} and {targets_dir})")
    lonely, orphans = sorted(images.keys() - targets), sorted(targets.keys() - images)
    problems = [f"{name}: image without a target in {targets_dir}" for name in lonely]
    problems += [f"{name}: target without an image in {images_dir}" for name in orphans]
    problems += [f"{d}: several files share this name; skipped" for d in image_dups + target_dups]
    duplicated = {d.split(" (")[0] for d in image_dups + target_dups}
    captions = read_captions(images_dir) if with_captions else {}
    missing_captions = [name for name in common if with_captions and name not in captions]
    if missing_captions:
        logger.warning("%d %s images have no caption and are trained with the empty prompt, e.g. %s",
                       len(missing_captions), role, missing_captions[:5])
    pairs = [Pair(name, images[name], targets[name], captions.get(name, "")) for name in common
             if name not in duplicated]
    return pairs, problems


# Reading targets ------------------------------------------------------------------------------

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

    from dmp_model.writers import read_depth_png16

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
        convention: the camera frame of the file, one of dmp_model.normals.NORMAL_CONVENTIONS.
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
    """A target file in its task's raw layout (see dmp_model.tasks): depth [H, W] metres, normals
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


# Resizing, flipping, encoding -----------------------------------------------------------------

def _channels_first(raw: torch.Tensor) -> torch.Tensor:
    """Raw target -> [C, H, W] (planes get C = 1)."""
    return raw[None] if raw.ndim == 2 else raw.permute(2, 0, 1)


def _channels_back(planes: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return planes[0] if like.ndim == 2 else planes.permute(1, 2, 0)


def fit(planes: torch.Tensor, resolution: int, crop: str, mode: str = "bicubic") -> torch.Tensor:
    """[C, H, W] -> [C, R, R] by the crop policy (see the module docstring)."""
    height, width = planes.shape[-2:]
    if crop == "stretch":
        return resize(planes[None].float(), (resolution, resolution), mode)[0]
    size = processing_size(height, width, resolution)
    resized = resize(planes[None].float(), size, mode)[0]
    top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return resized[:, top:top + resolution, left:left + resolution]


def fit_target(raw: torch.Tensor, task: str, resolution: int, crop: str) -> torch.Tensor:
    """A raw target brought to the training resolution by the task's rule."""
    mode = "nearest" if task in _NEAREST_TASKS else "bicubic"
    out = _channels_back(fit(_channels_first(raw), resolution, crop, mode), raw)
    if task == "segmentation":
        return out.round().long()
    if task in ("albedo", "shading", "rgb"):
        return out.clamp(min=0)
    return out


def flip_target(raw: torch.Tensor, task: str) -> torch.Tensor:
    """Mirror a raw target left-right; normals also get their x component negated."""
    flipped = raw.flip(1)  # W is dim 1 in [H, W] and [H, W, C]
    if task == "normal":
        flipped = flipped * torch.tensor([-1.0, 1.0, 1.0], dtype=flipped.dtype)
    return flipped


def adapter_info(config: TrainConfig, steps_trained: int | None = None) -> AdapterInfo:
    """The facts of the adapter this configuration trains (stored in its metadata)."""
    return AdapterInfo(task=config.task, prediction_type=config.prediction_type, uses_prompts=config.captions,
                       target_scale=config.resolved_target_scale,
                       normal_convention=config.adapter_normal_convention,
                       base_model=config.base_name or Path(config.base).name, rank=config.rank,
                       self_attn_only=config.self_attn_only, steps_trained=steps_trained)


def encode_raw_target(raw: torch.Tensor, info: AdapterInfo) -> torch.Tensor:
    """Raw targets [B, H, W(, C)] -> target images [B, 3, H, W] in [-1, 1] through info.task's codec.

    Depth is clamped to [0, info.target_scale] first: a deliberate deviation from the reference,
    which does not clamp (see the module docstring).
    """
    if info.task == "depth":
        raw = raw.clamp(0, info.target_scale)
    return get_codec(info.task).encode_target(raw, info.target_scale)


def encode_target(raw: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """Raw target [H, W(, C)] -> target image [3, H, W] in [-1, 1] (``encode_raw_target``)."""
    return encode_raw_target(raw[None], adapter_info(config))[0]


# Checking pairs and the dataset ---------------------------------------------------------------

def check_pairs(pairs: list[Pair], config: TrainConfig, role: str = "train") -> tuple[list[Pair], list[str]]:
    """Read every pair once; returns (usable pairs, problems of the skipped ones).

    Raises:
        DataError: some targets are of the wrong kind for the task (all of them are listed, up to 5),
            or no pair is usable.
    """
    usable, problems, wrong_kind = [], [], []
    for pair in pairs:
        try:
            image = load_image(pair.image)
            target = read_target(pair.target, config.task, config)
        except TargetKindError as err:
            wrong_kind.append(str(err))
            continue
        except (ValueError, OSError, EOFError, RuntimeError) as err:
            problems.append(f"{pair.name}: unreadable ({err})")
            continue
        (h, w), (th, tw) = image.shape[-2:], target.shape[:2]
        if abs(h / w - th / tw) > 0.01:
            problems.append(f"{pair.name}: image is {w}x{h} but target {tw}x{th} (aspect ratios differ)")
            continue
        if config.task == "depth" and float(target.max()) > config.resolved_target_scale:
            logger.debug("%s: depth beyond target_scale is clamped", pair.name)
        usable.append(pair)
    if wrong_kind:
        raise DataError(f"{len(wrong_kind)} {role} targets are not {config.task} targets; "
                        f"{config.task} takes {ACCEPTED_KINDS[config.task]}: " + "; ".join(wrong_kind[:5]))
    if not usable:
        raise DataError(f"no usable {role} pairs: " + "; ".join(problems[:5]))
    return usable, problems


class PairDataset(torch.utils.data.Dataset):
    """Pairs at the training resolution; items are addressed as (index, flip).

    Returns dicts with "image" [3, R, R] and "target" [3, R, R] (both in [-1, 1], the target through
    the task codec), "raw" (the raw target at R, for metrics) and "caption".
    """

    def __init__(self, pairs: list[Pair], config: TrainConfig):
        self.pairs, self.config = pairs, config

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image [3, R, R] in [0, 1], raw target at R), unflipped."""
        pair, config = self.pairs[index], self.config
        image = fit(load_image(pair.image), config.resolution, config.crop).clamp(0, 1)
        target = read_target(pair.target, config.task, config)
        return image, fit_target(target, config.task, config.resolution, config.crop)

    def __getitem__(self, item: tuple[int, bool]) -> dict:
        index, flip = item
        image, raw = self.load(index)
        if flip:
            image, raw = image.flip(-1), flip_target(raw, self.config.task)
        return {"image": image * 2 - 1, "target": encode_target(raw, self.config), "raw": raw,
                "caption": self.pairs[index].caption, "index": index, "flip": flip}


# Sample order ---------------------------------------------------------------------------------

class SamplePlan:
    """Which samples every process reads at every step: a pure function of (seed, step).

    The training set is read as an endless stream of epochs, each a seeded random permutation with
    seeded flips. Sample number ``((step * grad_accum + micro) * num_processes + rank) * batch + i``
    of that stream goes to process `rank`, so processes get disjoint shards, and resuming at a step
    needs no state: it skips straight to that batch.
    """

    def __init__(self, size: int, seed: int, batch_size: int, grad_accum: int = 1, num_processes: int = 1,
                 rank: int = 0, flip: bool = True):
        self.size, self.seed, self.flip = size, seed, flip
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.num_processes, self.rank = num_processes, rank
        self._epoch, self._order = -1, None

    def epoch_order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(permutation [N], flips [N] bool) of an epoch."""
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0x0DA7A))
            order = torch.randperm(self.size, generator=generator)
            flips = torch.rand(self.size, generator=generator) < 0.5
            self._epoch, self._order = epoch, (order, flips & self.flip)
        return self._order

    def batch(self, step: int, micro: int = 0) -> list[tuple[int, bool]]:
        """The (index, flip) items of this process's micro-batch `micro` of optimiser step `step`."""
        first = ((step * self.grad_accum + micro) * self.num_processes + self.rank) * self.batch_size
        items = []
        for position in range(first, first + self.batch_size):
            order, flips = self.epoch_order(position // self.size)
            k = position % self.size
            items.append((int(order[k]), bool(flips[k])))
        return items

    def epoch_of(self, step: int) -> float:
        """Epochs completed at the start of `step` (for logs)."""
        return step * self.grad_accum * self.num_processes * self.batch_size / self.size


class PlanSampler(torch.utils.data.Sampler):
    """Batches of (index, flip) for steps start..stop-1 of a SamplePlan, micro-batches in order."""

    def __init__(self, plan: SamplePlan, start: int, stop: int):
        self.plan, self.start, self.stop = plan, start, stop

    def __iter__(self):
        for step in range(self.start, self.stop):
            for micro in range(self.plan.grad_accum):
                yield self.plan.batch(step, micro)

    def __len__(self) -> int:
        return (self.stop - self.start) * self.plan.grad_accum


def mix_seed(*values: int) -> int:
    """One 63-bit seed from several integers (numpy's SeedSequence hashing)."""
    sequence = np.random.SeedSequence([int(v) & 0xFFFFFFFFFFFFFFFF for v in values])
    return int(sequence.generate_state(1, np.uint64)[0] >> np.uint64(1))


def collate(items: list[dict]) -> dict:
    """Stack tensors, keep captions/indices/flips as lists."""
    out = {key: torch.stack([item[key] for item in items]) for key in ("image", "target", "raw")}
    out.update({key: [item[key] for item in items] for key in ("caption", "index", "flip")})
    return out
