"""One codec per task: target -> RGB image for training, decoded RGB -> raw value for prediction.

The VAE's pixel space is [-1, 1]. Every codec speaks it on one side (``encode_target`` returns
it, ``decode`` reads it) and the task's natural unit on the other:

| task         | raw prediction                         | layout        |
|--------------|----------------------------------------|---------------|
| depth        | metres (float)                         | [B, H, W]     |
| normal       | unit vectors, adapter's convention     | [B, H, W, 3]  |
| segmentation | ADE20K class ids (int64)               | [B, H, W]     |
| albedo       | relative albedo in [0, 1]              | [B, H, W, 3]  |
| shading      | relative shading in [0, 1]             | [B, H, W]     |
| rgb          | any RGB target in [0, 1]               | [B, H, W, 3]  |

``encode_target(values, target_scale)`` and ``decode(decoded, target_scale)`` take the adapter's
``target_scale`` (metres encoded as white; only depth uses it, the other codecs ignore it).

``resize`` brings a raw prediction back to the input size the way its values allow (class ids
by nearest neighbour, normals renormalised); ``visualize`` makes a float [B, H, W, 3] preview.

Merging several predictions of one image (flip ensembles, tiles; see ``ensemble.py`` and
``tiling.py``) follows each task's rules, stated here once per task:

| task         | fitted to the reference | mirrored back   | merged               | uncertainty (0 = agree)     |
|--------------|-------------------------|-----------------|----------------------|-----------------------------|
| depth        | robust scale + shift    | flip            | mean                 | std of members, metres      |
| normal       | no                      | flip, x negated | mean, renormalised   | mean angle to merge, degrees|
| segmentation | no                      | flip            | vote (ties: first)   | share of other votes        |
| albedo, rgb  | no                      | flip            | mean                 | std, mean over RGB          |
| shading      | robust scale            | flip            | mean                 | std of members              |

``uncertainty_level`` turns an uncertainty map into [0, 1] for previews and masks on one fixed
scale per task (``uncertainty_scale`` is white), so that a confident image stays dark.
"""

from __future__ import annotations

import torch

from ..images import resize as resize_images
from ..options import check_option
from . import colormaps, palettes
from .normals import normals_to_rgb, rgb_to_normals

TASKS = ("depth", "normal", "segmentation", "albedo", "shading", "rgb")
# DMP's depth adapters encode depth / 8 m (white is 8 m and beyond): their target_scale.
DEPTH_TARGET_SCALE = 8.0


def _to_channels_last(images: torch.Tensor) -> torch.Tensor:
    return images.permute(0, 2, 3, 1)


def _to_channels_first(images: torch.Tensor) -> torch.Tensor:
    return images.permute(0, 3, 1, 2)


def _unit_range(decoded: torch.Tensor) -> torch.Tensor:
    """VAE pixels [B, 3, H, W] in [-1, 1] -> channels-last [0, 1]."""
    return _to_channels_last((decoded.float() / 2 + 0.5).clamp(0, 1))


def _minmax(values: torch.Tensor) -> torch.Tensor:
    """Per-sample min-max normalisation to [0, 1] (constant samples become 0)."""
    flat = values.flatten(1)
    low, high = flat.min(1).values, flat.max(1).values
    scale = (high - low).clamp_min(1e-12)
    shape = (-1,) + (1,) * (values.ndim - 1)
    return (values - low.view(shape)) / scale.view(shape)


class _MergeRules:
    """Defaults of the merge rules (see the table in the module docstring): no alignment, mean, std."""

    alignment: str | None = None  # None, "scale" or "scale_shift" (``alignment.fit_*``)
    votes = False  # merged by a vote over members instead of a weighted mean
    uncertainty_scale = 0.1  # the uncertainty shown as white by ``uncertainty_level``

    def mirror(self, raw: torch.Tensor) -> torch.Tensor:
        """A prediction of the mirrored image [B, H, W(, C)] brought back to the image's frame."""
        return raw.flip(2)

    def project(self, values: torch.Tensor) -> torch.Tensor:
        """Averaged values back onto the task's valid set (unit normals, [0, 1], depth >= 0)."""
        return values

    def merge(self, members: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Aligned members [M, B, H, W(, C)] -> (merged [B, H, W(, C)], uncertainty float32 [B, H, W])."""
        members = members.float()
        mean = members.mean(0)
        spread = ((members - mean) ** 2).mean(0).sqrt()  # the members' standard deviation
        return self.project(mean), spread.mean(-1) if spread.ndim == 4 else spread

    def uncertainty_level(self, uncertainty: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """Uncertainty [B, H, W] -> [0, 1] on the task's fixed scale (``uncertainty_scale`` = 1)."""
        return (uncertainty.float() / self.uncertainty_scale).clamp(0, 1)


class DepthCodec(_MergeRules):
    """Metric depth; training targets are depth / target_scale as grey, decoded by the channel mean."""

    name = "depth"
    # Passes are fitted in depth (metres), not disparity: the codec is affine in the VAE's output, so
    # a pass that saw less context (a tile) is off by an affine map of depth, which a fit in depth
    # recovers exactly; a fit in disparity would also weigh near pixels far more than far ones.
    alignment = "scale_shift"
    uncertainty_scale = 0.1  # relative: white where the std is 10 % of the depth

    def project(self, values: torch.Tensor) -> torch.Tensor:
        return values.clamp(min=0)

    def uncertainty_level(self, uncertainty: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """Std relative to the depth (std / depth, white at 10 %), so near and far look alike."""
        relative = uncertainty.float() / raw.float().clamp_min(1e-6)
        return (relative / self.uncertainty_scale).clamp(0, 1)

    def encode_target(self, depth: torch.Tensor, target_scale: float = 1.0) -> torch.Tensor:
        """Depth in metres [B, H, W] -> [B, 3, H, W] in [-1, 1] (for depth <= target_scale metres)."""
        grey = depth.float() / target_scale * 2 - 1
        return grey.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()

    def decode(self, decoded: torch.Tensor, target_scale: float = 1.0) -> torch.Tensor:
        """Mean over RGB, /2 + 0.5, clamp at 0, times target_scale: metres [B, H, W]."""
        return (decoded.float().mean(dim=1) / 2 + 0.5).clamp(min=0) * target_scale

    def resize(self, depth: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return resize_images(depth.unsqueeze(1), size).squeeze(1).clamp(min=0)

    visual_percentiles = (2.0, 98.0)

    def visualize(self, depth: torch.Tensor, colormap: str = "Spectral", range_mode: str = "image",
                  fixed_range: tuple[float, float] | None = None, bounds: tuple[float, float] | None = None,
                  **options) -> torch.Tensor:
        """Near-to-far colours from the 2nd to the 98th percentile of depth, per image by default.

        `range_mode` and `fixed_range` (metres) as ``colormaps.value_range``: "batch" keeps one
        range for every frame of a clip. `bounds`: a range computed beforehand for all images (a
        clip's, coloured a chunk at a time), used as given (equal or NaN bounds colour all alike).
        """
        if bounds is not None:
            low, high = (torch.full((depth.shape[0],), float(b)) for b in bounds)
            values = colormaps.normalize_between(depth, low, high)
        else:
            values = colormaps.normalize(depth, range_mode, *self.visual_percentiles, fixed_range)
        return colormaps.colorize(values, colormap)


class NormalCodec(_MergeRules):
    """Surface normals; the image is (n + 1) / 2 of the unit normal, so in VAE space it is n."""

    name = "normal"
    uncertainty_scale = 20.0  # degrees between the members and their merge

    def mirror(self, normals: torch.Tensor) -> torch.Tensor:
        """Flip and negate x: horizontal in every supported convention (see normals.NORMAL_CONVENTIONS)."""
        return normals.flip(2) * torch.tensor([-1.0, 1.0, 1.0], dtype=normals.dtype)

    def project(self, values: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(values, dim=-1)

    def merge(self, members: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean direction; uncertainty = mean angle (degrees) between the members and it."""
        merged = self.project(members.float().mean(0))
        cosine = (members.float() * merged).sum(-1).clamp(-1, 1)
        return merged, torch.rad2deg(torch.acos(cosine)).mean(0)

    def encode_target(self, normals: torch.Tensor, target_scale: float = 1.0) -> torch.Tensor:
        """Unit normals [B, H, W, 3] -> [B, 3, H, W] in [-1, 1]."""
        return _to_channels_first(normals.float()).contiguous()

    def decode(self, decoded: torch.Tensor, target_scale: float = 1.0) -> torch.Tensor:
        """n = 2 * rgb - 1, renormalised: unit vectors [B, H, W, 3]."""
        return rgb_to_normals(_to_channels_last(decoded.float() / 2 + 0.5))

    def resize(self, normals: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        resized = _to_channels_last(resize_images(_to_channels_first(normals), size))
        return torch.nn.functional.normalize(resized, dim=-1)

    def visualize(self, normals: torch.Tensor, **options) -> torch.Tensor:
        return normals_to_rgb(normals)


class SegmentationCodec(_MergeRules):
    """ADE20K classes painted in the DMP palette; decoded by the nearest palette colour in CIE Lab."""

    name = "segmentation"
    # Class ids are voted on, never averaged: a blend of two classes' colours could snap to a third
    # class that no pass predicted. A vote only ever returns ids some pass predicted.
    votes = True
    uncertainty_scale = 0.5  # two members that disagree: half the votes for another class

    def merge(self, members: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Majority vote of members [M, B, H, W] (ties: the earlier member); uncertainty = share of
        the members that voted for another class."""
        agree = (members[:, None] == members[None]).sum(1)  # [M, B, H, W]: members agreeing with each
        best = agree.argmax(0, keepdim=True)  # the first of the largest
        share = agree.gather(0, best)[0].float() / members.shape[0]
        return members.gather(0, best)[0], 1 - share

    def encode_target(self, class_ids: torch.Tensor, target_scale: float = 1.0) -> torch.Tensor:
        """Class ids [B, H, W] -> [B, 3, H, W] in [-1, 1]."""
        return _to_channels_first(palettes.paint(class_ids, "dmp")) * 2 - 1

    def decode(self, decoded: torch.Tensor, target_scale: float = 1.0) -> torch.Tensor:
        """Nearest DMP palette colour: class ids int64 [B, H, W]."""
        return palettes.snap_to_palette(_unit_range(decoded), "dmp")

    def resize(self, class_ids: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return resize_images(class_ids.unsqueeze(1).float(), size, mode="nearest").squeeze(1).long()

    def visualize(self, class_ids: torch.Tensor, **options) -> torch.Tensor:
        return palettes.paint(class_ids, "dmp")


class AlbedoCodec(_MergeRules):
    """Relative albedo: the target image min-max normalised to [0, 1] per image."""

    name = "albedo"

    def project(self, values: torch.Tensor) -> torch.Tensor:
        return values.clamp(0, 1)

    def encode_target(self, albedo: torch.Tensor, target_scale: float = 1.0) -> torch.Tensor:
        """RGB [B, H, W, 3] (any range) -> [B, 3, H, W] in [-1, 1]."""
        return _to_channels_first(_minmax(albedo.float())) * 2 - 1

    def decode(self, decoded: torch.Tensor, target_scale: float = 1.0) -> torch.Tensor:
        return _unit_range(decoded)

    def resize(self, albedo: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return _to_channels_last(resize_images(_to_channels_first(albedo), size)).clamp(0, 1)

    def visualize(self, albedo: torch.Tensor, **options) -> torch.Tensor:
        return albedo


class ShadingCodec(_MergeRules):
    """Relative shading: a grey image min-max normalised to [0, 1], repeated to RGB."""

    name = "shading"
    # Shading is min-max normalised per training image, so a pass that saw another part of the
    # scene has another brightness: a scale fits it (the rule; black stays black).
    alignment = "scale"

    def project(self, values: torch.Tensor) -> torch.Tensor:
        return values.clamp(0, 1)

    def encode_target(self, shading: torch.Tensor, target_scale: float = 1.0) -> torch.Tensor:
        """Grey [B, H, W] or RGB [B, H, W, 3] (averaged) -> [B, 3, H, W] in [-1, 1]."""
        grey = shading.float().mean(dim=-1) if shading.ndim == 4 else shading.float()
        return (_minmax(grey) * 2 - 1).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()

    def decode(self, decoded: torch.Tensor, target_scale: float = 1.0) -> torch.Tensor:
        return (decoded.float().mean(dim=1) / 2 + 0.5).clamp(0, 1)

    def resize(self, shading: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return resize_images(shading.unsqueeze(1), size).squeeze(1).clamp(0, 1)

    def visualize(self, shading: torch.Tensor, **options) -> torch.Tensor:
        return shading.unsqueeze(-1).expand(-1, -1, -1, 3)


class RGBCodec(AlbedoCodec):
    """Any RGB target in [0, 1], taken as is (for custom adapters)."""

    name = "rgb"

    def encode_target(self, rgb: torch.Tensor, target_scale: float = 1.0) -> torch.Tensor:
        return _to_channels_first(rgb.float().clamp(0, 1)) * 2 - 1


_CODECS = {codec.name: codec for codec in
           (DepthCodec(), NormalCodec(), SegmentationCodec(), AlbedoCodec(), ShadingCodec(), RGBCodec())}


def get_codec(task: str):
    """The codec of a task in TASKS."""
    check_option("task", task, TASKS)
    return _CODECS[task]
