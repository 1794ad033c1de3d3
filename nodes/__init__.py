"""The DMP nodes for ComfyUI (V1 node classes): thin layers over ``dmp_model``.

Only ``comfy_bridge`` imports ComfyUI's modules; every node converts ComfyUI's types, makes one
``dmp_model`` call and converts back.
"""

from __future__ import annotations

from . import comfy_bridge
from .maps import (DMPDepthColorize, DMPDepthToControlNet, DMPIntrinsics, DMPNormalsToControlNet,
                   DMPSegmentation)
from .models import DMPLoader
from .predict import DMPPredict, DMPPredictTasks
from .save import DMPSave

comfy_bridge.register_model_folder()

NODE_CLASS_MAPPINGS = {
    "DMPLoader": DMPLoader,
    "DMPPredict": DMPPredict,
    "DMPPredictTasks": DMPPredictTasks,
    "DMPDepthToControlNet": DMPDepthToControlNet,
    "DMPDepthColorize": DMPDepthColorize,
    "DMPNormalsToControlNet": DMPNormalsToControlNet,
    "DMPSegmentation": DMPSegmentation,
    "DMPIntrinsics": DMPIntrinsics,
    "DMPSave": DMPSave,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "DMPLoader": "Load DMP Model",
    "DMPPredict": "DMP Predict",
    "DMPPredictTasks": "DMP Predict Tasks",
    "DMPDepthToControlNet": "DMP Depth → ControlNet",
    "DMPDepthColorize": "DMP Depth Colorize",
    "DMPNormalsToControlNet": "DMP Normals → ControlNet",
    "DMPSegmentation": "DMP Segmentation → ADE20K + Mask",
    "DMPIntrinsics": "DMP Intrinsics (Albedo, Shading)",
    "DMPSave": "DMP Save Prediction",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
