"""The DMP nodes for ComfyUI (V1 node classes): thin layers over ``dmp_model``.

Only ``comfy_bridge`` imports ComfyUI's modules; every node converts ComfyUI's types, makes one
``dmp_model`` call and converts back. DMP runs on core's own MODEL, VAE and CLIP (``native``): the
pack loads no base model and needs no model library beyond what ComfyUI already has.
"""

from __future__ import annotations

from . import comfy_bridge
from .adapters import DMPLoadAdapter
from .geometry import DMPTo3D
from .maps import DMPDepthColorize, DMPDepthToControlNet, DMPIntrinsics, DMPNormalsToControlNet, DMPSegmentation
from .predict import DMPPredict, DMPPredictTasks, DMPUncertainty
from .save import DMPSave

comfy_bridge.register_model_folder()

NODE_CLASS_MAPPINGS = {
    "DMPLoadAdapter": DMPLoadAdapter,
    "DMPPredict": DMPPredict,
    "DMPPredictTasks": DMPPredictTasks,
    "DMPUncertainty": DMPUncertainty,
    "DMPDepthToControlNet": DMPDepthToControlNet,
    "DMPDepthColorize": DMPDepthColorize,
    "DMPNormalsToControlNet": DMPNormalsToControlNet,
    "DMPSegmentation": DMPSegmentation,
    "DMPIntrinsics": DMPIntrinsics,
    "DMPSave": DMPSave,
    "DMPTo3D": DMPTo3D,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "DMPLoadAdapter": "Load DMP Adapter",
    "DMPPredict": "DMP Predict",
    "DMPPredictTasks": "DMP Predict Tasks",
    "DMPUncertainty": "DMP Uncertainty",
    "DMPDepthToControlNet": "DMP Depth → ControlNet",
    "DMPDepthColorize": "DMP Depth Colorize",
    "DMPNormalsToControlNet": "DMP Normals → ControlNet",
    "DMPSegmentation": "DMP Segmentation → ADE20K + Mask",
    "DMPIntrinsics": "DMP Intrinsics (Albedo, Shading)",
    "DMPSave": "DMP Save Prediction",
    "DMPTo3D": "DMP → 3D",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
