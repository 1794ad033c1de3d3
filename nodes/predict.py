"""Prediction nodes: one task, or every task of a DMP_MODEL from one VAE encode, on ComfyUI's models."""

from __future__ import annotations

import torch

from ..dmp_model.options import check_option
from ..dmp_model.prediction.ensemble import ENSEMBLES
from ..dmp_model.prediction.predict import DEFAULT_GUIDANCE, PredictOptions, predict_images
from ..dmp_model.sampling import SAMPLERS, SPACINGS
from . import comfy_bridge as bridge
from .adapters import TASK_CHOICES, LoadedAdapter
from .common import CATEGORY, PREDICTION_TOOLTIP, image_out, images_in, mask_out, prompt_inputs, require_prediction
from .native import ComfyBackend

DEFAULTS = PredictOptions()  # the widgets' defaults are the engine's
# The tasks with an output of their own on DMP Predict Tasks, in output order.
OUTPUT_TASKS = ("depth", "normal", "segmentation", "albedo", "shading")

# What the images of a batch are: each on its own, or a clip's frames in order (aligned over time,
# previews and maps on one colour range, so that they do not flicker).
BATCH_KINDS = ("images", "video")

# Core's flag for tuning widgets most users never touch: newer frontends fold them away (older ones ignore it).
# Input names and widget order stay as they were, so saved workflows keep loading.
ADVANCED = {"advanced": True}

# Leading spacing's first timestep is (steps - 1) * (1000 // steps) + 1: 1000 steps would start past
# t = 999, which the engine refuses; 999 is the most either spacing allows.
MAX_STEPS = 999

_TIPS = {
    "steps": f"Sampler steps (UNet calls per image); DMP uses 5. At most {MAX_STEPS}.",
    "sampler": "ddim: the standard DDIM update (DMP's default); oracle: DMP's variant that keeps the "
               "input image's latent as the noise estimate.",
    "spacing": "Timestep spacing: leading (801, 601, ... 1 for 5 steps, as DMP) or trailing "
               "(starts at 999; better for 1-2 steps).",
    "processing_resolution": "Shorter image side while predicting (DMP: 512); the result is resized "
                             "back to the input size. 0 keeps the input size.",
    "batch_size": "Images per UNet batch; lower it if memory runs out on big batches.",
    "prompt": "Optional prompt, used only by adapters trained with captions (the paper's bedroom adapters). "
              "'-notext' adapters ignore any prompt or conditioning (as DMP's disable_prompts); with several "
              "tasks, only the prompted adapters get it.",
    "conditioning": "Optional prompt as a CONDITIONING from an SD 1.x CLIP Text Encode (instead of the "
                    "text); like the text, only adapters trained with captions use it.",
    "guidance_scale": "Classifier-free guidance with a prompt (DMP: 2); 1 = no guidance. Ignored "
                      "without a prompt and by '-notext' adapters.",
    "batch_kind": "images: each image of the batch on its own. video: the batch is a clip's frames in order "
                  "(e.g. from Load Video): depth frames are aligned to the frames before them "
                  "(temporal_alignment) and previews, ControlNet maps and colours use one range for the whole "
                  "clip, so they do not flicker.",
    "temporal_alignment": "video only: how far each depth frame's scale is pulled to the frames before it "
                          "(0 = not at all, 1 = fully); removes the per-frame scale drift that flickers.",
    "tile": "Large images: a global pass, then overlapping tiles of tile_size pixels, each predicted at the "
            "processing resolution and fitted to the global pass, blended without seams. More detail on "
            "images much larger than the processing resolution; one extra pass per tile. Images whose shorter "
            "side fits in one tile are predicted as usual.",
    "tile_size": "Tile side in input pixels; 0 = the processing resolution. A larger tile is shrunk to the "
                 "processing resolution (fewer tiles, less detail).",
    "tile_overlap": "How much neighbouring tiles overlap (and blend), as a fraction of the tile.",
    "ensemble": "flip: predict each image and its mirror in one UNet batch and merge them (a little more "
                "accurate); also gives the uncertainty outputs (where the two disagree). Costs a second "
                "pass in the same batch.",
    "task": "Which adapter of the DMP model runs: the first one of this task; auto = the first adapter "
            "loaded.",
    "vae": "The SD 1.x VAE (e.g. of the same Load Checkpoint as the MODEL).",
    "clip": "The SD 1.x CLIP (e.g. of the same Load Checkpoint): DMP conditions on the empty prompt's "
            "embedding, and prompted adapters on the prompt's.",
}


def _model_inputs(tooltip: str) -> dict:
    return {
        "dmp_model": ("DMP_MODEL", {"tooltip": tooltip}),
        "vae": ("VAE", {"tooltip": _TIPS["vae"]}),
        "clip": ("CLIP", {"tooltip": _TIPS["clip"]}),
    }


def _settings_inputs() -> dict:
    """Sampler and processing widgets shared by both prediction nodes."""
    return {
        "steps": ("INT", {"default": DEFAULTS.steps, "min": 1, "max": MAX_STEPS, "tooltip": _TIPS["steps"]}),
        "sampler": (list(SAMPLERS), {"default": DEFAULTS.sampler, "tooltip": _TIPS["sampler"], **ADVANCED}),
        "spacing": (list(SPACINGS), {"default": DEFAULTS.spacing, "tooltip": _TIPS["spacing"], **ADVANCED}),
        "processing_resolution": ("INT", {"default": DEFAULTS.processing_resolution, "min": 0, "max": 4096,
                                          "step": 8, "tooltip": _TIPS["processing_resolution"]}),
        "batch_size": ("INT", {"default": DEFAULTS.batch_size, "min": 1, "max": 64, "tooltip": _TIPS["batch_size"],
                               **ADVANCED}),
        "batch_kind": (list(BATCH_KINDS), {"default": "images", "tooltip": _TIPS["batch_kind"]}),
        "temporal_alignment": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05,
                                         "tooltip": _TIPS["temporal_alignment"], **ADVANCED}),
    }


def _optional_inputs() -> dict:
    """Prompting, then large images and ensembles (optional: workflows saved before them keep working)."""
    return {
        "prompt": ("STRING", {"default": "", "multiline": True, "tooltip": _TIPS["prompt"]}),
        "conditioning": ("CONDITIONING", {"tooltip": _TIPS["conditioning"]}),
        "guidance_scale": ("FLOAT", {"default": DEFAULT_GUIDANCE, "min": 1.0, "max": 20.0, "step": 0.1,
                                     "tooltip": _TIPS["guidance_scale"], **ADVANCED}),
        "tile": ("BOOLEAN", {"default": DEFAULTS.tile, "tooltip": _TIPS["tile"]}),
        "tile_size": ("INT", {"default": DEFAULTS.tile_size, "min": 0, "max": 8192, "step": 8,
                              "tooltip": _TIPS["tile_size"], **ADVANCED}),
        "tile_overlap": ("FLOAT", {"default": DEFAULTS.tile_overlap, "min": 0.05, "max": 0.5, "step": 0.05,
                                   "tooltip": _TIPS["tile_overlap"], **ADVANCED}),
        "ensemble": (list(ENSEMBLES), {"default": DEFAULTS.ensemble, "tooltip": _TIPS["ensemble"]}),
    }


def _options(steps, sampler, spacing, processing_resolution, batch_size, guidance_scale, batch_kind="images",
             temporal_alignment=1.0, tile=DEFAULTS.tile, tile_size=DEFAULTS.tile_size,
             tile_overlap=DEFAULTS.tile_overlap, ensemble=DEFAULTS.ensemble) -> PredictOptions:
    check_option("batch_kind", batch_kind, BATCH_KINDS)
    video = batch_kind == "video"
    return PredictOptions(steps=steps, sampler=sampler, spacing=spacing, batch_size=batch_size,
                          processing_resolution=processing_resolution, guidance_scale=float(guidance_scale),
                          temporal_alignment=float(temporal_alignment) if video else 0.0,
                          visual_range="batch" if video else "image", tile=bool(tile), tile_size=int(tile_size),
                          tile_overlap=float(tile_overlap), ensemble=ensemble)


def uncertainty_outputs(prediction, node: str) -> tuple:
    """(IMAGE, MASK) of a prediction's uncertainty (grey: black = the ensemble agrees, white = the task's
    uncertainty scale), or outputs that stop the nodes using them when it has none."""
    if prediction.uncertainty_visual is None:
        message = (f"{node}: this {prediction.task} prediction has no uncertainty; set ensemble to 'flip' on "
                   "DMP Predict (the uncertainty is where the image and its mirror disagree)")
        return bridge.blocked(message), bridge.blocked(message)
    return image_out(prediction.uncertainty_visual), mask_out(prediction.uncertainty_visual[..., 0])


def run(dmp_model, vae, clip, image, adapters: list[LoadedAdapter], options: PredictOptions, prompt,
        conditioning) -> dict:
    """{name: Prediction} of `adapters` on ComfyUI's models, with its progress bar and Cancel."""
    text, embeds = prompt_inputs(prompt, conditioning)
    backend = ComfyBackend(dmp_model, vae, clip)
    try:
        return predict_images(backend, images_in(image), {a.name: a.info for a in adapters}, options,
                              prompt=text, prompt_embeds=embeds, callback=bridge.Progress())
    finally:
        bridge.soft_empty_cache()


class DMPPredict:
    """DMP Predict: one task for a batch of images."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **_model_inputs("From Load DMP Adapter."),
                "image": ("IMAGE", {"tooltip": "Images to predict for (a batch of one size), from any "
                                               "source, e.g. an SDXL or Flux generation."}),
                "task": (list(TASK_CHOICES), {"default": "auto", "tooltip": _TIPS["task"]}),
                **_settings_inputs(),
            },
            "optional": _optional_inputs(),
        }

    RETURN_TYPES = ("IMAGE", "DMP_PREDICTION", "IMAGE", "MASK")
    RETURN_NAMES = ("visual", "prediction", "uncertainty", "uncertainty_mask")
    OUTPUT_TOOLTIPS = (
        "A preview of the prediction (depth coloured near-to-far, normals as RGB, segmentation in DMP's "
        "palette, albedo, shading).",
        "The raw result (metres, unit normals, class ids, albedo, shading) for the DMP map, intrinsics "
        "and save nodes.",
        "With ensemble 'flip': where the image and its mirror disagree, grey (black = agree, white = a "
        "10 % depth spread, 20 degrees of normals, half the votes, 0.1 of albedo/shading).",
        "The same uncertainty as a mask (1 = uncertain), e.g. to inpaint or mask where DMP is unsure.",
    )
    FUNCTION = "predict"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Runs one DMP task adapter on a batch of images: depth (metres), surface normals, "
                   "ADE20K segmentation, albedo or shading. Deterministic; the progress bar advances per "
                   "sampler step.")

    def predict(self, dmp_model, vae, clip, image, task, steps, sampler, spacing, processing_resolution,
                batch_size=DEFAULTS.batch_size, batch_kind="images", temporal_alignment=1.0, prompt="",
                conditioning=None, guidance_scale=DEFAULT_GUIDANCE, **large_images):
        adapter = dmp_model.adapter_for(task)
        options = _options(steps, sampler, spacing, processing_resolution, batch_size, guidance_scale, batch_kind,
                           temporal_alignment, **large_images)
        result = run(dmp_model, vae, clip, image, [adapter], options, prompt, conditioning)[adapter.name]
        return (image_out(result.visual), result, *uncertainty_outputs(result, "DMP Predict"))


class DMPPredictTasks:
    """DMP Predict Tasks: every task of a DMP model from one VAE encode."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **_model_inputs("From Load DMP Adapter (chained), with an adapter per task."),
                "image": ("IMAGE", {"tooltip": "Images to predict for (a batch of one size)."}),
                **_settings_inputs(),
            },
            "optional": _optional_inputs(),
        }

    RETURN_TYPES = ("DMP_PREDICTION",) * len(OUTPUT_TASKS) + ("IMAGE",)
    RETURN_NAMES = (*OUTPUT_TASKS, "previews")
    OUTPUT_TOOLTIPS = tuple(
        f"The {task} prediction (nodes using it stop with an error if the DMP model has no {task} adapter)."
        for task in OUTPUT_TASKS) + (
        "Previews of every task predicted, task after task (depth, normal, segmentation, albedo, shading), "
        "each a batch as large as the input.",)
    FUNCTION = "predict"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Runs every task adapter of the DMP model on the same images, encoding them only once: "
                   "one prediction output per task (the first adapter of each task is used).")

    def predict(self, dmp_model, vae, clip, image, steps, sampler, spacing, processing_resolution,
                batch_size=DEFAULTS.batch_size, batch_kind="images", temporal_alignment=1.0, prompt="",
                conditioning=None, guidance_scale=DEFAULT_GUIDANCE, **large_images):
        found = {task: dmp_model.find(task) for task in OUTPUT_TASKS}
        wanted = [adapter for adapter in found.values() if adapter is not None]
        if not wanted:
            raise ValueError(f"the DMP model has no adapter for any of {OUTPUT_TASKS} (it has: "
                             f"{dmp_model.describe()}); add them with Load DMP Adapter")
        options = _options(steps, sampler, spacing, processing_resolution, batch_size, guidance_scale, batch_kind,
                           temporal_alignment, **large_images)
        results = run(dmp_model, vae, clip, image, wanted, options, prompt, conditioning)
        outputs = tuple(results[adapter.name] if adapter is not None else bridge.blocked(
            f"DMP Predict Tasks has no {task} prediction: the DMP model has no {task} adapter "
            f"(it has: {dmp_model.describe()}); add one with Load DMP Adapter") for task, adapter in found.items())
        previews = image_out(torch.cat([results[adapter.name].visual for adapter in wanted]))
        return (*outputs, previews)


class DMPUncertainty:
    """DMP Uncertainty: the uncertainty map of any prediction made with ensemble 'flip'."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"prediction": ("DMP_PREDICTION", {"tooltip": PREDICTION_TOOLTIP + " Made with "
                                                                          "ensemble 'flip'."})}}

    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("uncertainty", "uncertainty_mask")
    OUTPUT_TOOLTIPS = DMPPredict.OUTPUT_TOOLTIPS[2:]
    FUNCTION = "uncertainty"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Where a flip ensemble's two predictions disagree, as a grey image and a mask: for the "
                   "outputs of DMP Predict Tasks (DMP Predict has these outputs itself).")

    def uncertainty(self, prediction):
        prediction = require_prediction(prediction, OUTPUT_TASKS, "DMP Uncertainty")
        if prediction.uncertainty_visual is None:
            raise ValueError(f"DMP Uncertainty: this {prediction.task} prediction has no uncertainty; set "
                             "ensemble to 'flip' on the DMP Predict (Tasks) node that made it")
        return uncertainty_outputs(prediction, "DMP Uncertainty")
