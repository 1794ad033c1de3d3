"""DMP → 3D: a depth prediction (with normals, albedo, segmentation) as a .glb or .ply in ComfyUI's output folder."""

from __future__ import annotations

import os

from ..dmp_model.geometry.camera import HFOV_RANGE_DEGREES, MIN_VERTEX_BUDGET
from ..dmp_model.geometry.export import ASSET_FORMATS, ASSET_MODES, AssetSettings, export_assets
from . import comfy_bridge as bridge
from .common import CATEGORY, images_in, require_prediction

DEFAULTS = AssetSettings()  # the widgets' defaults are the engine's
NODE = "DMP → 3D"
_ANY_DMP = "of the same image, from DMP Predict or DMP Predict Tasks"


def _optional(task: str, use: str) -> tuple:
    return ("DMP_PREDICTION", {"tooltip": f"Optional: a {task} prediction {_ANY_DMP}. {use}"})


class DMPTo3D:
    """Depth (+ normals, albedo, segmentation) -> a textured mesh or a point cloud file."""

    @classmethod
    def INPUT_TYPES(cls):
        low, high = HFOV_RANGE_DEGREES
        return {"required": {
            "depth": ("DMP_PREDICTION", {"tooltip": f"A depth prediction (metres) {_ANY_DMP}: the geometry."}),
            "image": ("IMAGE", {"tooltip": "The image that was predicted: the texture when no albedo is connected."}),
            "mode": (list(ASSET_MODES), {"default": DEFAULTS.mode, "tooltip":
                     "mesh: the pixel grid triangulated, textured, cut at depth jumps; point cloud: a coloured "
                     "point per pixel (with DMP's normals in .ply)."}),
            "file_format": (list(ASSET_FORMATS), {"default": DEFAULTS.file_format, "tooltip":
                            "glb: binary glTF, what Preview 3D and Blender open (a mesh with its texture, or "
                            "points with colours); ply: MeshLab, CloudCompare, Blender (vertex colours and "
                            "normals; not shown by Preview 3D of ComfyUI 0.3.64)."}),
            "hfov_degrees": ("FLOAT", {"default": DEFAULTS.hfov_degrees, "min": low + 0.5, "max": high - 0.5,
                                       "step": 0.5, "tooltip":
                                       "The camera's horizontal field of view in degrees (DMP does not predict it): "
                                       "the photo's if known (a phone's main camera: about 65-70); 60 is "
                                       "Hypersim's camera, the data DMP's depth adapters learned from."}),
            "discontinuity": ("FLOAT", {"default": DEFAULTS.discontinuity, "min": 0.001, "max": 10.0, "step": 0.005,
                                        "tooltip": "mesh: a triangle whose depth varies by more than this fraction "
                                        "of its nearest vertex's (0.05: 5 %) is removed, so that no sheet joins "
                                        "a chair to the wall behind it. Raise it if slanted floors get holes."}),
            "vertex_budget": ("INT", {"default": DEFAULTS.vertex_budget, "min": MIN_VERTEX_BUDGET,
                                      "max": 1 << 26, "tooltip":
                                      "At most this many vertices (points): larger images are sampled on a "
                                      "coarser pixel grid (1,000,000: a mesh .glb of about 55 MB)."}),
            "filename_prefix": ("STRING", {"default": "3d/DMP", "tooltip":
                                           "File name prefix inside ComfyUI's output folder (3d/ is where "
                                           "Preview 3D looks); ComfyUI's counter is appended."}),
        }, "optional": {
            "normal": _optional("normal", "Shading normals of the mesh (else computed from the geometry); "
                                          "the points' normals in .ply."),
            "albedo": _optional("albedo", "The base colour (texture) instead of the photo with its lighting "
                                          "baked in: a relightable asset."),
            "segmentation": _optional("segmentation", "mesh as glb: one named part per ADE20K class present."),
        }}

    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("model_file", "filename")
    OUTPUT_TOOLTIPS = ("The first image's file, relative to the output folder (e.g. 3d/DMP_00001_.glb): connect "
                       "it to core's Preview 3D.", "The first image's file name.")
    OUTPUT_NODE = True
    FUNCTION = "export"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Turns DMP's predictions of one image into a 3D asset in ComfyUI's output folder: geometry "
                   "from metric depth through a pinhole camera, shading normals from DMP's normals, base colour "
                   "from DMP's albedo (relightable: not the photo's baked-in light), one part per segmentation "
                   "class. A textured mesh (.glb for Preview 3D and Blender) or a point cloud (.ply or .glb), one "
                   "file per image of the batch. Needs trimesh in ComfyUI's Python: pip install trimesh.")

    def export(self, depth, image, mode, file_format, hfov_degrees, discontinuity, vertex_budget, filename_prefix,
               normal=None, albedo=None, segmentation=None):
        predictions = {"depth": require_prediction(depth, ("depth",), NODE)}
        for task, prediction in (("normal", normal), ("albedo", albedo), ("segmentation", segmentation)):
            if prediction is not None:
                predictions[task] = require_prediction(prediction, (task,), NODE)
        settings = AssetSettings(hfov_degrees, mode, file_format, discontinuity, vertex_budget)
        images = images_in(image)[:, :3]
        folder, stem, counter, subfolder = bridge.save_path(filename_prefix, bridge.output_directory(),
                                                            images.shape[-1], images.shape[-2])
        names = [f"{stem}_{counter + i:05}_.{file_format}" for i in range(images.shape[0])]
        try:
            export_assets([os.path.join(folder, name) for name in names], images, predictions, settings)
        except (ValueError, TypeError, ImportError) as err:
            raise type(err)(f"{NODE}: {err}") from err
        files = [{"filename": name, "subfolder": subfolder, "type": "output"} for name in names]
        model_file = "/".join(part for part in (subfolder.replace(os.sep, "/"), names[0]) if part)
        return {"ui": {"dmp_files": files}, "result": (model_file, names[0])}
