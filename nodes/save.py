"""Saving raw predictions (16-bit depth PNG, NPY, EXR) into ComfyUI's output folder."""

from __future__ import annotations

import os
import secrets

from ..dmp_model import writers
from ..dmp_model.writers import DEPTH_PNG_ENCODINGS
from . import comfy_bridge as bridge
from .common import CATEGORY, PREDICTION_TOOLTIP, require_prediction

SAVE_FORMATS = ("png16", "npy", "exr")
_ALL_TASKS = ("depth", "normal", "segmentation", "albedo", "shading", "rgb")


def _write(path: str, raw, file_format: str, encoding: str) -> None:
    """One image's raw values [H, W] or [H, W, 3] to `path` in `file_format`."""
    array = raw.cpu().numpy()
    if file_format == "png16":
        writers.write_depth_png16(path, array, encoding)
    elif file_format == "npy":
        writers.write_npy(path, array)
    else:
        writers.write_exr(path, array.astype("float32"))


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
            "format": (list(SAVE_FORMATS), {
                "default": "png16",
                "tooltip": "png16: 16-bit greyscale PNG (depth only); npy: the raw values (metres, unit "
                           "normals, class ids, ...) as a NumPy array; exr: float32 OpenEXR (needs "
                           "'pip install openexr')."}),
            "depth_png_encoding": (list(DEPTH_PNG_ENCODINGS), {
                "default": "millimeters",
                "tooltip": "png16 only. millimeters: 1 unit = 1 mm (up to 65.5 m); normalized: each image's "
                           "depth range stretched over 0..65535 (the range is stored in the PNG)."}),
        }}

    RETURN_TYPES = ()
    OUTPUT_TOOLTIPS = ()
    OUTPUT_NODE = True
    FUNCTION = "save"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Saves the raw values of a DMP prediction into ComfyUI's output folder with its usual "
                   "counter naming: depth in metres as a 16-bit PNG, NPY or EXR, any task as NPY or EXR. "
                   "ComfyUI's Save Image would keep only 8 bits of a preview.")

    def save(self, prediction, filename_prefix, format, depth_png_encoding):  # noqa: A002 - the widget's name
        result = require_prediction(prediction, _ALL_TASKS, "DMP Save")
        if format == "png16" and result.task != "depth":
            raise ValueError(f"DMP Save: png16 holds depth only; save this {result.task} prediction as "
                             "npy or exr")
        if format == "exr" and not writers.exr_available():
            raise ValueError("DMP Save: EXR needs the optional OpenEXR package (pip install openexr in "
                             "ComfyUI's Python); or choose npy or png16")
        batch, height, width = result.raw.shape[:3]
        folder, stem, counter, subfolder = bridge.save_path(
            filename_prefix.replace("%task%", result.task), bridge.output_directory(), width, height)
        files = []
        for index in range(batch):
            name = f"{stem.replace('%batch_num%', str(index))}_{counter + index:05}_.{format[:3]}"
            _write(os.path.join(folder, name), result.raw[index], format, depth_png_encoding)
            files.append({"filename": name, "subfolder": subfolder, "type": "output"})
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
