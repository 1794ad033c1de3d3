"""Nodes turning DMP predictions into ControlNet conditions, previews, masks and intrinsics."""

from __future__ import annotations

from ..dmp_model.options import check_option
from ..dmp_model.prediction.predict import PredictOptions
from ..dmp_model.tasks import colormaps, controlnet, palettes
from ..dmp_model.tasks.codecs import get_codec
from ..dmp_model.tasks.colormaps import COLORMAPS, RANGE_MODES
from ..dmp_model.tasks.controlnet import DEPTH_CONTROL_MODES
from ..dmp_model.tasks.normals import NORMAL_CONVENTIONS
from ..dmp_model.tasks.palettes import ADE20K_CLASSES, PALETTES
from . import comfy_bridge as bridge
from .common import MAPS_CATEGORY, PREDICTION_TOOLTIP, image_out, mask_out, require_prediction

# The engine's depth preview: the same colours and percentiles as a prediction's visual output.
_DEPTH_COLORMAP = PredictOptions().colormap
_NEAR_PCT, _FAR_PCT = get_codec("depth").visual_percentiles


def _prediction(task: str) -> tuple:
    return ("DMP_PREDICTION", {"tooltip": f"A {task} prediction. {PREDICTION_TOOLTIP}"})


def _percentile(default: float, tooltip: str) -> tuple:
    return ("FLOAT", {"default": default, "min": 0.0, "max": 100.0, "step": 0.5, "tooltip": tooltip})


# "auto": the range the prediction's own preview used (one range for a clip's frames, else per image).
DEPTH_RANGES = ("auto", *RANGE_MODES)


def _range_inputs() -> dict:
    metres = "range fixed: the depth in metres that becomes the {} end."
    return {
        "range_mode": (list(DEPTH_RANGES), {
            "default": "auto",
            "tooltip": "Over what the percentiles are taken: image (each image its own range), batch (one range "
                       "for the whole batch: a video's frames do not flicker), fixed (near and far in metres); "
                       "auto: batch for predictions made with batch_kind video, else image."}),
        "near": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1000.0, "step": 0.1, "tooltip": metres.format("near")}),
        "far": ("FLOAT", {"default": 10.0, "min": 0.0, "max": 1000.0, "step": 0.1, "tooltip": metres.format("far")}),
    }


def _range_mode(prediction, range_mode: str) -> str:
    check_option("range_mode", range_mode, DEPTH_RANGES)
    return prediction.visual_range if range_mode == "auto" else range_mode


class DMPDepthToControlNet:
    """Depth -> ControlNet depth map (near is white)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "prediction": _prediction("depth"),
            "mode": (list(DEPTH_CONTROL_MODES), {
                "default": "percentile",
                "tooltip": "percentile: 1 - (z - P_low) / (P_high - P_low), clipped to [0, 1]; "
                           "disparity: 1 / z, min-max normalised. Per image."}),
            "invert": ("BOOLEAN", {"default": False, "tooltip": "Near is black instead of white."}),
            "low_percentile": _percentile(2.0, "percentile mode: the depth percentile that becomes white."),
            "high_percentile": _percentile(85.0, "percentile mode: the depth percentile that becomes black."),
            **_range_inputs(),
        }}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("control_image",)
    OUTPUT_TOOLTIPS = ("Grey depth map, near white, for the SD 1.5 depth ControlNet "
                       "(control_v11f1p_sd15_depth).",)
    FUNCTION = "convert"
    CATEGORY = MAPS_CATEGORY
    DESCRIPTION = "Turns DMP metric depth into the condition image of depth ControlNets (near is white)."

    def convert(self, prediction, mode, invert, low_percentile, high_percentile, range_mode="auto", near=0.5,
                far=10.0):
        result = require_prediction(prediction, ("depth",), "DMP Depth → ControlNet")
        control = controlnet.depth_to_control(result.raw, mode, invert, low_percentile, high_percentile,
                                              _range_mode(result, range_mode), near, far)
        return (image_out(control),)


class DMPDepthColorize:
    """Depth -> coloured preview."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "prediction": _prediction("depth"),
            "colormap": (list(COLORMAPS), {"default": _DEPTH_COLORMAP, "tooltip": "Colours from near to far."}),
            "low_percentile": _percentile(_NEAR_PCT, "The depth percentile shown as the first colour (near)."),
            "high_percentile": _percentile(_FAR_PCT, "The depth percentile shown as the last colour (far)."),
            "reverse": ("BOOLEAN", {"default": False, "tooltip": "Run the colour map from far to near."}),
            **_range_inputs(),
        }}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("Depth coloured per image between the two percentiles.",)
    FUNCTION = "colorize"
    CATEGORY = MAPS_CATEGORY
    DESCRIPTION = "Colours DMP depth with a colour map, each image normalised between two depth percentiles."

    def colorize(self, prediction, colormap, low_percentile, high_percentile, reverse, range_mode="auto",
                 near=0.5, far=10.0):
        result = require_prediction(prediction, ("depth",), "DMP Depth Colorize")
        values = colormaps.normalize(result.raw, _range_mode(result, range_mode), low_percentile, high_percentile,
                                     (near, far))
        return (image_out(colormaps.colorize(1 - values if reverse else values, colormap)),)


class DMPNormalsToControlNet:
    """Normals -> ControlNet normal map (BAE frame)."""

    @classmethod
    def INPUT_TYPES(cls):
        flip = "Invert the {} channel of the result, for ControlNets whose {} axis points the other way."
        return {"required": {
            "prediction": _prediction("normal"),
            "convention": (["auto", *NORMAL_CONVENTIONS], {
                "default": "auto",
                "tooltip": "Camera frame of the predicted normals; auto = the adapter's (DMP: omnidata)."}),
            "flip_x": ("BOOLEAN", {"default": False, "tooltip": flip.format("red", "x")}),
            "flip_y": ("BOOLEAN", {"default": False, "tooltip": flip.format("green", "y")}),
            "flip_z": ("BOOLEAN", {"default": False, "tooltip": flip.format("blue", "z")}),
        }}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("control_image",)
    OUTPUT_TOOLTIPS = ("Normal map in the BAE frame (a wall facing the camera is (0.5, 0.5, 1), a floor "
                       "green) for control_v11p_sd15_normalbae.",)
    FUNCTION = "convert"
    CATEGORY = MAPS_CATEGORY
    DESCRIPTION = "Turns DMP surface normals into the condition image of the SD 1.5 normalbae ControlNet."

    def convert(self, prediction, convention, flip_x, flip_y, flip_z):
        result = require_prediction(prediction, ("normal",), "DMP Normals → ControlNet")
        source = result.info.normal_convention if convention == "auto" else convention
        return (image_out(controlnet.normals_to_control(result.raw, source, flip_x, flip_y, flip_z)),)


class DMPSegmentation:
    """Segmentation -> ADE20K colours, a mask of chosen classes, the classes found."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "prediction": _prediction("segmentation"),
            "classes": ("STRING", {
                "default": "", "multiline": False,
                "tooltip": "ADE20K class names for the mask, comma-separated (e.g. 'wall, floor'); empty "
                           "gives an empty mask. classes_found lists what the image holds."}),
            "palette": (list(PALETTES), {
                "default": "ade20k",
                "tooltip": "ade20k: the standard palette of the SD 1.5 seg ControlNet "
                           "(control_v11p_sd15_seg); dmp: DMP's own colours."}),
        }}

    RETURN_TYPES = ("IMAGE", "MASK", "STRING")
    RETURN_NAMES = ("colors", "mask", "classes_found")
    OUTPUT_TOOLTIPS = ("The class map painted with the palette (ControlNet-ready with ade20k).",
                       "1 where a pixel belongs to one of the chosen classes, else 0.",
                       "The classes in the prediction with their share of pixels, largest first.")
    FUNCTION = "convert"
    CATEGORY = MAPS_CATEGORY
    DESCRIPTION = ("Paints a DMP segmentation with the ADE20K palette for ControlNet, makes a mask of the "
                   "classes you name (e.g. for inpainting) and lists the classes found.")

    def convert(self, prediction, classes, palette):
        ids = require_prediction(prediction, ("segmentation",), "DMP Segmentation").raw
        try:
            wanted = palettes.class_ids(classes) if classes.strip() else []
        except ValueError as err:
            raise ValueError(f"DMP Segmentation: {err} All valid names: {', '.join(ADE20K_CLASSES)}") from err
        found = "\n".join(f"{ADE20K_CLASSES[c]}: {share:.1%}" for c, share in palettes.class_fractions(ids))
        return (image_out(palettes.paint(ids, palette)), mask_out(palettes.class_masks(ids, wanted)), found)


class DMPIntrinsics:
    """Albedo and shading predictions -> images."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {},
                "optional": {"albedo": _prediction("albedo"), "shading": _prediction("shading")}}

    RETURN_TYPES = ("IMAGE", "IMAGE")
    RETURN_NAMES = ("albedo", "shading")
    OUTPUT_TOOLTIPS = ("Relative albedo (reflectance) as RGB in [0, 1] (needs the albedo input).",
                       "Relative shading as grey RGB in [0, 1] (needs the shading input).")
    FUNCTION = "convert"
    CATEGORY = MAPS_CATEGORY
    DESCRIPTION = "Turns DMP's intrinsic-image predictions into images: albedo (colour) and shading (light)."

    def convert(self, albedo=None, shading=None):
        if albedo is None and shading is None:
            raise ValueError("DMP Intrinsics: connect an albedo and/or a shading prediction")
        outputs = []
        for task, prediction in (("albedo", albedo), ("shading", shading)):
            if prediction is None:
                outputs.append(bridge.blocked(f"DMP Intrinsics has no {task} input connected"))
                continue
            result = require_prediction(prediction, (task,), f"DMP Intrinsics ({task} input)")
            outputs.append(image_out(get_codec(task).visualize(result.raw)))
        return tuple(outputs)
