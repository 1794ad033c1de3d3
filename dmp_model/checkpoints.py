"""Reading weight files safely, and telling an SD 1.x checkpoint from everything it is not.

Safetensors is preferred; pickled files (.ckpt, .pt, .bin) are only ever opened with
``torch.load(weights_only=True)``, which refuses arbitrary code. Errors name the file and say
what to do, because a truncated download is the most common way these fail.
"""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from pathlib import Path
from collections.abc import Mapping, Sequence

import torch

CHECKPOINT_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
MODEL_FAMILIES = ("sd1", "sd1-inpainting", "sd1-instruct", "sd2", "sdxl", "sd3", "flux",
                  "lora", "vae", "diffusers-weights", "unknown")

_UNET = "model.diffusion_model."
_FAMILY_NAMES = {
    "sd1": "Stable Diffusion 1.x",
    "sd1-inpainting": "an SD 1.x inpainting model (UNet with 9 input channels)",
    "sd1-instruct": "an InstructPix2Pix-style SD 1.x model (UNet with 8 input channels)",
    "sd2": "Stable Diffusion 2.x (OpenCLIP text encoder, 1024-d cross-attention)",
    "sdxl": "Stable Diffusion XL",
    "sd3": "Stable Diffusion 3",
    "flux": "Flux",
    "lora": "a LoRA adapter, not a base model (load it as an adapter instead)",
    "vae": "a VAE on its own, not a full checkpoint",
    "diffusers-weights": "one component of a diffusers folder (pass the whole diffusers folder instead)",
    "unknown": "not a Stable Diffusion checkpoint",
}


class CheckpointError(ValueError):
    """A weight file that cannot be used; the message says why and what to do."""


def describe_family(family: str) -> str:
    """A readable name for a MODEL_FAMILIES entry."""
    return _FAMILY_NAMES[family]


def _unwrap(state: object, path: Path) -> dict:
    """CompVis checkpoints nest the weights under 'state_dict' (sometimes twice)."""
    while isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"{path} does not hold a dictionary of named tensors")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def read_state_dict(path: str | os.PathLike, prefixes: Sequence[str] | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and (safetensors) metadata of a weight file, on the CPU.

    Args:
        path: a .safetensors file, or a pickled .ckpt/.pt/.pth/.bin (read with weights_only=True).
        prefixes: keep only keys starting with one of these (saves memory for big files).

    Returns:
        (tensors by name, metadata strings; empty for pickles).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes); the download or copy did not finish")
    keep = (lambda k: k.startswith(tuple(prefixes))) if prefixes else (lambda k: True)
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys() if keep(k)}
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(
                f"cannot read {path} as safetensors ({err}); the file is corrupt or truncated: "
                "download it again") from err
        return tensors, metadata
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} contains Python objects other than tensors, which are not loaded for safety, "
            f"or is corrupt ({_unpickling_detail(err)}); convert it to .safetensors or download it again") from err
    # Damaged pickles fail deep inside the unpickler with any of these (seen with random bytes).
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError, IndexError,
            struct.error) as err:
        raise CheckpointError(f"cannot read {path} ({type(err).__name__}: {err}); the file is corrupt or truncated: "
                              "download it again"
                              ) from err
    return {k: v for k, v in _unwrap(state, path).items() if keep(k)}, {}


def _unpickling_detail(err: Exception) -> str:
    """The informative line of torch's long weights_only message (the refused global or opcode)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0] if lines else "")


def _is_zip(path: Path) -> bool:
    """torch's zip format can be memory-mapped; legacy pickles cannot."""
    return zipfile.is_zipfile(path)


def read_key_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes, without reading the data of a safetensors file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file() and path.stat().st_size > 0:
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(
                f"cannot read {path} as safetensors ({err}); the file is corrupt or truncated: "
                "download it again") from err
    tensors, _ = read_state_dict(path)
    return {k: tuple(v.shape) for k, v in tensors.items()}


def detect_family(shapes: Mapping[str, Sequence[int]]) -> str:
    """Which kind of model a single-file checkpoint holds, from its key names and shapes."""
    keys = list(shapes)
    # kohya (lora_unet_*.lora_down), peft (.lora_A.), old diffusers (.lora.down.), DMP's own (to_q_lora.down.)
    if any(".lora_" in k or "_lora." in k or ".lora." in k or "lora_down" in k or "lora_A" in k
           or k.startswith("lora_") for k in keys):
        return "lora"
    if any("double_blocks." in k for k in keys):
        return "flux"
    if any("joint_blocks." in k for k in keys):
        return "sd3"
    if any(k.startswith("conditioner.embedders.") or k.startswith(_UNET + "label_emb.") for k in keys):
        return "sdxl"
    conv_in = shapes.get(_UNET + "input_blocks.0.0.weight")
    if conv_in is None:
        if any(k.startswith(_UNET) for k in keys):
            return "unknown"  # an SD-layout UNet without its input convolution: incomplete
        if any(k.startswith(("encoder.", "decoder.", "first_stage_model.")) for k in keys):
            return "vae"
        if any(k.startswith(("down_blocks.", "mid_block.", "text_model.", "encoder.layers.")) for k in keys):
            return "diffusers-weights"
        return "unknown"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    context_dims = {s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight") and len(s) == 2}
    if context_dims & {1024, 1280, 2048}:
        return "sd2" if 1024 in context_dims else "sdxl"
    in_channels = conv_in[1] if len(conv_in) == 4 else None
    return {4: "sd1", 9: "sd1-inpainting", 8: "sd1-instruct"}.get(in_channels, "unknown")


def check_sd1(path: str | os.PathLike, shapes: Mapping[str, Sequence[int]]) -> None:
    """Raise a CheckpointError unless the file is an SD 1.x checkpoint with its text encoder."""
    family = detect_family(shapes)
    if family != "sd1":
        raise CheckpointError(
            f"{path} is {describe_family(family)}; DMP needs a Stable Diffusion 1.x checkpoint "
            "(SD 1.4 or 1.5, e.g. v1-5-pruned-emaonly.safetensors)")
    missing = [p for p in ("first_stage_model.", "cond_stage_model.transformer.")
               if not any(k.startswith(p) for k in shapes)]
    if missing:
        raise CheckpointError(
            f"{path} is an SD 1.x UNet without {' and '.join(missing)} weights (VAE / text encoder); "
            "use a full checkpoint")
