"""`dmp predict --export-3d glb|ply`: a 3D asset per image, from that image's predictions, beside the other outputs.

    dmp predict photos/ --base sd15.safetensors --adapter depth-hypersim-notext --adapter normal-scene100-notext \
        --adapter albedo --export-3d glb --hfov 65 -o out/      # -> out/3d/<image>.glb

The asset is built by ``dmp_model.geometry`` from the depth adapter's prediction (the geometry) and,
where given, the normal, albedo and segmentation adapters' (shading normals, base colour, parts),
whatever produced them (``--tile``, ``--ensemble``: every prediction is at the input size). Its file
is OUTPUT/3d/<the image's output stem>.<format>; an image counts as done only when its asset is there
too, so adding --export-3d to a finished run predicts the images again.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..geometry.camera import HFOV_RANGE_DEGREES, MIN_VERTEX_BUDGET
from ..geometry.export import (
    ASSET_FORMATS,
    ASSET_MODES,
    DEFAULT_MODES,
    INSTALL_HINT,
    AssetSettings,
    export_assets,
    require_trimesh,
)
from ..io.video import is_video
from ..prediction.predict import Prediction

ASSET_DEFAULTS = AssetSettings()  # the engine's defaults are the flags'
ASSET_FOLDER = "3d"  # inside the output folder, as ComfyUI's output/3d/
# AssetSettings' fields as the flags that set them, so that an error names what the user typed.
FLAGS = {"hfov_degrees": "--hfov", "discontinuity": "--discontinuity", "vertex_budget": "--vertex-budget"}


def add_export_3d_arguments(parser: argparse.ArgumentParser) -> None:
    """--export-3d and its camera and mesh options, as one argument group of `dmp predict`."""
    low, high = HFOV_RANGE_DEGREES
    group = parser.add_argument_group("3D export", "a 3D asset per image from the depth adapter's prediction, with "
                                      "the normal, albedo and segmentation adapters' where given (docs/3d.md)")
    group.add_argument("--export-3d", choices=ASSET_FORMATS,
                       help=f"also write OUTPUT/{ASSET_FOLDER}/<image>.glb (textured mesh) or .ply (point cloud with "
                            f"colours and normals); needs a depth adapter and trimesh ({INSTALL_HINT})")
    group.add_argument("--export-3d-mode", choices=ASSET_MODES,
                       help="default: " + ", ".join(f"{mode} for {fmt}" for fmt, mode in DEFAULT_MODES.items()))
    group.add_argument("--hfov", type=float, default=ASSET_DEFAULTS.hfov_degrees, metavar="DEGREES",
                       help=f"the camera's horizontal field of view, in ({low:g}, {high:g}) (default: %(default)g, "
                            "Hypersim's; DMP does not predict it)")
    group.add_argument("--discontinuity", type=float, default=ASSET_DEFAULTS.discontinuity, metavar="FRACTION",
                       help="mesh: remove triangles whose (max - min) / min depth exceeds it (default: %(default)g)")
    group.add_argument("--vertex-budget", type=int, default=ASSET_DEFAULTS.vertex_budget, metavar="N",
                       help=f"at most N vertices (points) per image, >= {MIN_VERTEX_BUDGET}; larger images are "
                            "sampled on a coarser pixel grid (default: %(default)d)")


def asset_settings(args: argparse.Namespace, files: Iterable[Path]) -> AssetSettings | None:
    """The export's settings from the parsed flags for these input `files`; None without --export-3d.

    Raises:
        ValueError: a flag out of range (--hfov, --discontinuity, --vertex-budget), named by its flag;
            --export-3d-mode without --export-3d; a video among the inputs.
        ImportError: trimesh is not installed (the message says how to install it).
    """
    if args.export_3d is None:
        if args.export_3d_mode is not None:
            raise ValueError(f"--export-3d-mode {args.export_3d_mode!r} needs --export-3d glb or ply (the file format)")
        return None
    videos = [str(file) for file in files if is_video(file)]
    if videos:
        raise ValueError(f"--export-3d writes one asset per image and is not available for video inputs, got "
                         f"{videos[:3]}; predict the clip without it (or export some of its frames as images)")
    require_trimesh()
    try:
        return AssetSettings(hfov_degrees=args.hfov, mode=args.export_3d_mode or DEFAULT_MODES[args.export_3d],
                             file_format=args.export_3d, discontinuity=args.discontinuity,
                             vertex_budget=args.vertex_budget)
    except ValueError as err:  # "hfov_degrees must be ..." -> "--hfov must be ..."
        field = str(err).split(" ", 1)[0]
        raise ValueError(str(err).replace(field, FLAGS[field], 1) if field in FLAGS else str(err)) from None


def check_asset_tasks(settings: AssetSettings | None, tasks: Iterable[str]) -> None:
    """An export needs a depth adapter among the loaded ones (the tasks of --adapter); raise ValueError otherwise."""
    tasks = sorted(set(tasks))
    if settings is not None and "depth" not in tasks:
        raise ValueError(f"--export-3d needs a depth adapter among the --adapter paths (the asset's geometry), got "
                         f"adapters of {tasks}; add one (e.g. depth-hypersim-notext)")


@dataclass(frozen=True)
class AssetOutput:
    """The 3D asset as one more output of each image in `dmp predict`'s image loop (``batch.ImageJob``)."""

    settings: AssetSettings
    output: Path  # the run's output folder; assets go to its ASSET_FOLDER

    def path(self, stem: Path) -> Path:
        """Where the asset of the image with output stem `stem` goes: OUTPUT/3d/<stem>.<format>."""
        return Path(self.output) / ASSET_FOLDER / Path(f"{stem}.{self.settings.file_format}")

    def write(self, stem: Path, images: torch.Tensor, predictions: Mapping[str, Prediction], index: int) -> Path:
        """Write the asset of image `index` of a predicted batch, atomically; returns the file.

        Args:
            images: float [B, 3, H, W] in [0, 1], the batch predicted; predictions: adapter name ->
                Prediction of that batch (``DMPModel.predict_tasks``).
            index: the image's row in the batch.
        """
        one = {name: replace(p, raw=p.raw[index:index + 1]) for name, p in predictions.items()}  # [1, H, W(, C)]
        (written,) = export_assets([self.path(stem)], images[index:index + 1], one, self.settings)
        return written
