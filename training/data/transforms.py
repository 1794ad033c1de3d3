"""Bringing a pair to the training resolution, flipping it, and encoding its target for the VAE.

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

from pathlib import Path

import torch

from dmp_model.adapters import AdapterInfo
from dmp_model.images import processing_size, resize
from dmp_model.tasks.codecs import get_codec

from ..config import TrainConfig

# Nearest-neighbour resizing for targets whose values must not be mixed between surfaces.
_NEAREST_TASKS = ("depth", "normal", "segmentation")


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
