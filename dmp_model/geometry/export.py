"""DMP predictions of a batch of images -> one 3D file per image (.glb or .ply), checked before anything is written.

Files are written with trimesh (an optional extra: ``pip install trimesh``), imported only here and
only when a file is written. trimesh writes both formats from numpy arrays, embeds the texture in
the .glb as a glTF PBR material, and needs nothing but numpy (and Pillow for the texture, which the
engine already has); pygltflib would cover only glTF and plyfile only PLY.

What each file holds (coordinates in glTF's frame: x right, y up, z toward the viewer, metres):

| mode \\ format | glb                                                      | ply                              |
|---------------|-----------------------------------------------------------|----------------------------------|
| mesh          | triangles, vertex normals, UVs onto the texture (albedo   | triangles, vertex normals, vertex|
|               | if given, else the image) as baseColorTexture, one node   | colours (texture at each vertex) |
|               | per segmentation class when a segmentation is given       |                                  |
| point cloud   | points (mode POINTS) with colours                         | points, colours, DMP normals     |
"""

from __future__ import annotations

import importlib.util
import logging
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..io.writers import atomic_path
from ..options import check_option, describe_value
from ..prediction.predict import Prediction
from .camera import DEFAULT_HFOV_DEGREES, check_hfov, check_vertex_budget
from .cloud import PointCloud, build_point_cloud, check_depth_map
from .mesh import Mesh, build_mesh

logger = logging.getLogger(__name__)

ASSET_MODES = ("mesh", "point cloud")
ASSET_FORMATS = ("glb", "ply")
# What each format holds when the mode is not given (the CLI's --export-3d): glTF for textured meshes
# (ComfyUI's 3D viewer, Blender), PLY for point clouds with normals (MeshLab, CloudCompare, Open3D).
DEFAULT_MODES = {"glb": "mesh", "ply": "point cloud"}
# The predictions an asset is made of: depth (the geometry) and optionally these.
OPTIONAL_TASKS = ("normal", "albedo", "segmentation")
INSTALL_HINT = "pip install trimesh"


@dataclass(frozen=True)
class AssetSettings:
    """How depth becomes a 3D file; the one home of these defaults.

    Attributes:
        hfov_degrees: the camera's horizontal field of view in (1, 179) degrees, principal point at
            the image centre; DMP does not predict it. Default 60: Hypersim's camera, which DMP's
            depth adapters were trained on.
        mode: one of ASSET_MODES.
        file_format: one of ASSET_FORMATS.
        discontinuity: meshes: a triangle whose (max - min) / min depth exceeds it is removed (no rubber
            sheet between a chair and the wall behind it); > 0, default 0.05 (``mesh.py`` says why).
        vertex_budget: at most this many vertices (points); larger images are sampled on a coarser
            pixel grid. Default 1,000,000: a mesh .glb of about 55 MB (32 bytes per vertex,
            12 per triangle, two triangles per vertex); at least 4.
    """

    hfov_degrees: float = DEFAULT_HFOV_DEGREES
    mode: str = "mesh"
    file_format: str = "glb"
    discontinuity: float = 0.05
    vertex_budget: int = 1_000_000

    def __post_init__(self):
        check_hfov(self.hfov_degrees)
        check_option("mode", self.mode, ASSET_MODES)
        check_option("file_format", self.file_format, ASSET_FORMATS)
        check_vertex_budget(self.vertex_budget)
        if isinstance(self.discontinuity, bool) or not isinstance(self.discontinuity, numbers.Real) \
                or not (self.discontinuity > 0 and math.isfinite(self.discontinuity)):
            raise ValueError(f"discontinuity must be a relative depth jump > 0 (0.05: 5 %), got {self.discontinuity!r}")


def trimesh_available() -> bool:
    """Whether the optional trimesh package (``pip install trimesh``) can be imported."""
    return importlib.util.find_spec("trimesh") is not None


def require_trimesh():
    """The trimesh module, or an ImportError saying how to install it."""
    try:
        import trimesh
    except ImportError as error:
        raise ImportError(f"writing 3D files (.glb, .ply) needs the optional trimesh package: {INSTALL_HINT} "
                          "(or pip install 'dmp-dense-prediction[3d]')") from error
    return trimesh


# Inputs ---------------------------------------------------------------------------------------------

def asset_predictions(predictions: Mapping[str, Prediction]) -> dict[str, Prediction]:
    """The predictions an asset uses, by task: exactly one depth, at most one of each OPTIONAL_TASKS
    (other tasks, such as shading, are not used)."""
    by_task: dict[str, Prediction] = {}
    for name, prediction in predictions.items():
        if not isinstance(prediction, Prediction):
            raise TypeError(f"predictions[{name!r}] must be a Prediction, got {describe_value(prediction)}")
        if prediction.task not in ("depth", *OPTIONAL_TASKS):
            continue
        if prediction.task in by_task:
            raise ValueError(f"two {prediction.task} predictions ({by_task[prediction.task].adapter!r} and "
                             f"{prediction.adapter!r}): a 3D asset takes one of each task; pass one")
        by_task[prediction.task] = prediction
    if "depth" not in by_task:
        found = sorted({p.task for p in predictions.values()})
        raise ValueError(f"a 3D asset needs a depth prediction (its geometry), got only {found or 'none'}; "
                         "predict with a depth adapter too")
    return by_task


def check_asset_inputs(images: torch.Tensor, by_task: Mapping[str, Prediction]) -> None:
    """Every prediction covers the same images [B, 3, H, W] at the same size; raise naming the mismatch."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else describe_value(images)
        raise ValueError(f"images must be an RGB batch [B, 3, H, W] in [0, 1], got {shape}")
    batch, _, height, width = images.shape
    for task, prediction in by_task.items():
        shape = tuple(prediction.raw.shape)
        if shape[:3] != (batch, height, width):
            raise ValueError(f"the {task} prediction ({prediction.adapter!r}) is {shape[0]} x {shape[1]} x "
                             f"{shape[2]} (images x H x W) but the images are {batch} x {height} x {width}: "
                             "give the predictions of these very images, at their size")


# Building and writing ---------------------------------------------------------------------------------

def build_asset(image: torch.Tensor, by_task: Mapping[str, Prediction], index: int,
                settings: AssetSettings) -> Mesh | PointCloud:
    """The mesh or point cloud of image `index` of the predictions (``asset_predictions``).

    Args:
        image: float [3, H, W] in [0, 1], the texture when there is no albedo prediction.
    """
    depth = by_task["depth"].raw[index].float()
    texture = by_task["albedo"].raw[index] if "albedo" in by_task else image.permute(1, 2, 0)
    normal = by_task.get("normal")
    normals = None if normal is None else normal.raw[index]
    convention = "omnidata" if normal is None else normal.info.normal_convention
    if settings.mode == "point cloud":
        return build_point_cloud(depth, texture, settings.hfov_degrees, settings.vertex_budget, normals, convention)
    classes = by_task["segmentation"].raw[index] if "segmentation" in by_task else None
    return build_mesh(depth, texture, settings.hfov_degrees, settings.vertex_budget, settings.discontinuity,
                      normals, convention, classes)


def _rgb8(colors: torch.Tensor) -> np.ndarray:
    return torch.round(colors.clamp(0, 1) * 255).to(torch.uint8).numpy()


def _glb_scene(trimesh, asset: Mesh | PointCloud):
    """A trimesh Scene: a point cloud, or one mesh node per part sharing one textured material."""
    from PIL import Image

    scene = trimesh.Scene()
    if isinstance(asset, PointCloud):
        scene.add_geometry(trimesh.PointCloud(asset.points.numpy(), colors=_rgb8(asset.colors)), geom_name="points",
                           node_name="points")
        return scene
    # Rough and not metallic: the albedo is a diffuse base colour, lit by the viewer's lights.
    material = trimesh.visual.material.PBRMaterial(name="dmp", baseColorTexture=Image.fromarray(_rgb8(asset.texture)),
                                                   metallicFactor=0.0, roughnessFactor=1.0)
    for name, faces in asset.parts():
        part_faces = asset.faces[faces]
        used = torch.unique(part_faces)  # sorted: the part's vertices, renumbered below
        renumber = torch.full((len(asset.vertices),), -1, dtype=torch.long)
        renumber[used] = torch.arange(len(used))
        uvs = asset.uvs[used].numpy().copy()
        uvs[:, 1] = 1 - uvs[:, 1]  # trimesh's UVs are OpenGL's (v up); it flips them into glTF's on export
        mesh = trimesh.Trimesh(vertices=asset.vertices[used].numpy(), faces=renumber[part_faces].numpy(),
                               vertex_normals=asset.normals[used].numpy(), process=False, validate=False,
                               visual=trimesh.visual.TextureVisuals(uv=uvs, material=material))
        scene.add_geometry(mesh, geom_name=name, node_name=name)
    return scene


def asset_bytes(asset: Mesh | PointCloud, file_format: str) -> bytes:
    """The file of an asset in one of ASSET_FORMATS (see the module docstring for what each holds)."""
    check_option("file_format", file_format, ASSET_FORMATS)
    trimesh = require_trimesh()
    if file_format == "glb":
        return trimesh.exchange.gltf.export_glb(_glb_scene(trimesh, asset), include_normals=True)
    if isinstance(asset, PointCloud):
        vertices, faces, normals, colors = asset.points, np.zeros((0, 3), np.int64), asset.normals, asset.colors
    else:
        vertices, faces, normals = asset.vertices, asset.faces.numpy(), asset.normals
        colors = asset.texture[asset.pixels[:, 0], asset.pixels[:, 1]]
    mesh = trimesh.Trimesh(vertices=vertices.numpy(), faces=faces, process=False, validate=False,
                           vertex_normals=None if normals is None else normals.numpy(), vertex_colors=_rgb8(colors))
    return trimesh.exchange.ply.export_ply(mesh, encoding="binary", vertex_normal=normals is not None)


def write_asset(path: str | os.PathLike, asset: Mesh | PointCloud, file_format: str) -> Path:
    """Write an asset atomically (a temporary file renamed onto `path`)."""
    data = asset_bytes(asset, file_format)
    with atomic_path(path) as temp:
        temp.write_bytes(data)
    return Path(path)


def export_assets(paths: Sequence[str | os.PathLike], images: torch.Tensor, predictions: Mapping[str, Prediction],
                  settings: AssetSettings | None = None) -> list[Path]:
    """Write one 3D file per image from its DMP predictions.

    Geometry from the depth prediction (metres), shading normals from a normal prediction, the
    base colour from an albedo prediction (else the image: its lighting baked in) and one mesh part
    per ADE20K class from a segmentation prediction, where given. Everything is checked before the
    first file is written; each file is written atomically, and should one fail, the files this call
    wrote are removed.

    Args:
        paths: one file per image (the suffix is not changed: give .glb or .ply to match the format).
        images: float [B, 3, H, W] in [0, 1], the images predicted.
        predictions: name -> Prediction of these images (``asset_predictions``: one depth, at most
            one normal, albedo and segmentation; others are not used).
        settings: AssetSettings (default: a textured .glb mesh).

    Returns:
        the paths written.
    """
    settings = settings or AssetSettings()
    # 1. Everything that can be checked before any work: the library, the predictions, their sizes.
    require_trimesh()
    by_task = asset_predictions(predictions)
    check_asset_inputs(images, by_task)
    if len(paths) != images.shape[0]:
        raise ValueError(f"give one path per image: {len(paths)} paths for {images.shape[0]} images")
    for index in range(images.shape[0]):
        check_depth_map(by_task["depth"].raw[index])
    # 2. Build and write image by image (one asset in memory at a time).
    written: list[Path] = []
    try:
        for index, path in enumerate(paths):
            asset = build_asset(images[index].float().cpu(), by_task, index, settings)
            written.append(write_asset(path, asset, settings.file_format))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written
