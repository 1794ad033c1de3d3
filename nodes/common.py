"""Conversions between ComfyUI's socket types and dmp_model's, shared by the nodes."""

from __future__ import annotations

import logging

import torch

from ..dmp_model.prediction.predict import Prediction

logger = logging.getLogger(__name__)

CATEGORY = "DMP"
MAPS_CATEGORY = "DMP/maps"
PREDICTION_TOOLTIP = "A DMP_PREDICTION from DMP Predict or DMP Predict Tasks."


def images_in(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE [B, H, W, C] in [0, 1] -> dmp_model's [B, C, H, W], float32 on the CPU.

    Cores may hand IMAGE batches over in fp16 (``--fp16-intermediates``) or on the GPU (``--gpu-only``);
    the engine takes them as it takes any image, and moves them to the model's device itself.
    """
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image must be a ComfyUI IMAGE batch [B, H, W, C], got {shape}")
    if not image.is_floating_point():
        raise ValueError(f"image must be a ComfyUI IMAGE of floats in [0, 1], got dtype {image.dtype}")
    return image.detach().to("cpu", torch.float32).movedim(-1, 1)


def image_out(images: torch.Tensor) -> torch.Tensor:
    """An IMAGE for ComfyUI: float32 [B, H, W, 3] in [0, 1], contiguous, on the CPU."""
    return images.detach().float().clamp(0, 1).cpu().contiguous()


def mask_out(masks: torch.Tensor) -> torch.Tensor:
    """A MASK for ComfyUI: float32 [B, H, W] in [0, 1], on the CPU."""
    return masks.detach().float().clamp(0, 1).cpu().contiguous()


def require_prediction(prediction, tasks: tuple[str, ...], node: str) -> Prediction:
    """The prediction, if it is one of `tasks`; else an error saying what to connect instead."""
    wanted = " or ".join(tasks)
    if prediction is None:
        raise ValueError(f"{node}: no prediction is connected; connect the {wanted} output of DMP Predict "
                         "or DMP Predict Tasks")
    if not isinstance(prediction, Prediction):
        raise ValueError(f"{node}: expected a DMP_PREDICTION, got {type(prediction).__name__}")
    if prediction.task not in tasks:
        raise ValueError(f"{node} needs a {wanted} prediction, but got a {prediction.task} prediction "
                         f"(adapter {prediction.adapter!r}); connect the output of a DMP Predict whose task "
                         f"is {wanted}")
    return prediction


def prompt_inputs(prompt: str | None, conditioning) -> tuple[str | None, torch.Tensor | None]:
    """(prompt text or None, prompt embeddings [1, 77k, 768] or None) from the node's inputs.

    ComfyUI's CONDITIONING from an SD 1.x CLIP Text Encode is a list of [embeddings, extras];
    its embeddings equal diffusers' ``text_encoder(ids)[0]``. Only the first entry is used.
    """
    text = prompt if prompt and prompt.strip() else None
    if conditioning is None:
        return text, None
    if text is not None:
        raise ValueError("give either a prompt text or a conditioning, not both (the text box must be empty "
                         "when a CLIP Text Encode output is connected)")
    try:
        embeds = conditioning[0][0]
    except (IndexError, KeyError, TypeError) as err:
        raise ValueError("conditioning must be a CONDITIONING from CLIP Text Encode") from err
    if not isinstance(embeds, torch.Tensor):
        raise ValueError("conditioning must be a CONDITIONING from CLIP Text Encode")
    if len(conditioning) > 1:
        logger.warning("DMP: the conditioning combines %d entries; only the first is used", len(conditioning))
    return None, embeds
