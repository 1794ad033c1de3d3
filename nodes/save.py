"""Saving raw predictions (NPY, 16-bit depth or 8-bit class-id PNG, EXR) into ComfyUI's output folder."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from ..dmp_model.io import writers
from ..dmp_model.io.writers import DEPTH_PNG_ENCODINGS, RAW_FORMATS
from ..dmp_model.tasks.codecs import TASKS
from . import comfy_bridge as bridge
from .common import CATEGORY, PREDICTION_TOOLTIP, require_prediction


def _arrays(raw) -> list:
    """One numpy array per image of a raw prediction [B, H, W] or [B, H, W, 3] (floats as float32)."""
    raw = raw.detach().cpu()
    raw = raw.float() if raw.is_floating_point() else raw  # numpy has no bfloat16
    return [image.numpy() for image in raw]


class DMPSave:
    """DMP Save: raw prediction values to files, with a preview."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "prediction": ("DMP_PREDICTION", {"tooltip": PREDICTION_TOOLTIP}),
            "filename_prefix": ("STRING", {
                "default": "DMP/%task%",
                "tooltip": "File name prefix inside ComfyUI's output folder; may hold subfolders, ComfyUI's "
                           "%date:...% style variables, %task% and %batch_num%."}),
            "format": (list(RAW_FORMATS), {
                "default": "png",
                "tooltip": "npy: the raw values as a NumPy array (float32 metres, unit normals, ...; "
                           "segmentation as uint8 class ids); png: depth as 16-bit greyscale, segmentation "
                           "as 8-bit class ids (other tasks: use npy or exr); exr: float32 OpenEXR, not for "
                           "segmentation (needs 'pip install openexr')."}),
            "depth_png_encoding": (list(DEPTH_PNG_ENCODINGS), {
                "default": "millimeters",
                "tooltip": "Depth as png only. millimeters: 1 unit = 1 mm (up to 65.5 m); normalized: each "
                           "image's depth range stretched over 0..65535 (the range is stored in the PNG)."}),
        }}

    RETURN_TYPES = ()
    OUTPUT_TOOLTIPS = ()
    OUTPUT_NODE = True
    FUNCTION = "save"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Saves the raw values of a DMP prediction into ComfyUI's output folder with its usual "
                   "counter naming: depth in metres as a 16-bit PNG, segmentation class ids as an 8-bit "
                   "PNG, any task as NPY, any but segmentation as EXR. Every image is checked before any "
                   "file is written. ComfyUI's Save Image would keep only 8 bits of a preview.")

    def save(self, prediction, filename_prefix, format, depth_png_encoding):  # `format`: the widget's name
        result = require_prediction(prediction, TASKS, "DMP Save")
        batch, height, width = result.raw.shape[:3]
        folder, stem, counter, subfolder = bridge.save_path(
            filename_prefix.replace("%task%", result.task), bridge.output_directory(), width, height)
        names = [f"{stem.replace('%batch_num%', str(i))}_{counter + i:05}_.{format}" for i in range(batch)]
        arrays = _arrays(result.raw)
        try:  # 1. every image, so that a bad one leaves no partial batch behind
            for name, array in zip(names, arrays):
                writers.check_raw(result.task, array, format, os.path.join(folder, name))
        except (ValueError, TypeError) as err:
            raise ValueError(f"DMP Save: {err}") from err
        written = []
        try:  # 2. write; should the disk fail midway, the files of this batch go again
            for name, array in zip(names, arrays):
                written.append(writers.write_raw(os.path.join(folder, name), result.task, array, format,
                                                 depth_png_encoding))
        except BaseException:
            for path in written:
                Path(path).unlink(missing_ok=True)
            raise
        files = [{"filename": name, "subfolder": subfolder, "type": "output"} for name in names]
        return {"ui": {"images": self._previews(result.visual), "dmp_files": files}}

    @staticmethod
    def _previews(visual) -> list[dict]:
        """8-bit previews of the prediction in ComfyUI's temp folder, shown on the node."""
        prefix = f"DMP_preview_{secrets.token_hex(3)}"
        folder, stem, counter, subfolder = bridge.save_path(prefix, bridge.temp_directory(), 0, 0)
        previews = []
        for index, image in enumerate(visual):
            name = f"{stem}_{counter + index:05}_.png"
            writers.write_png8(os.path.join(folder, name), image.float().cpu().numpy())
            previews.append({"filename": name, "subfolder": subfolder, "type": "temp"})
        return previews
