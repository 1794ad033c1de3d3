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
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

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


_VAE = "first_stage_model."
_TEXT = "cond_stage_model.transformer.text_model."


def _indices(shapes: Mapping[str, Sequence[int]], prefix: str) -> list[int]:
    """The numbers N of 'prefix.N.' keys, sorted."""
    found = {int(k[len(prefix):].split(".", 1)[0]) for k in shapes if k.startswith(prefix)}
    return sorted(found)


def _groups(channels: Sequence[int]) -> int:
    """SD's 32 norm groups where the widths allow it (the file does not record the group count)."""
    return next(g for g in (32, 16, 8, 4, 2, 1) if all(c % g == 0 for c in channels))


def infer_sd1_configs(shapes: Mapping[str, Sequence[int]]) -> dict[str, dict]:
    """diffusers configs (unet, vae, text_encoder) of an SD 1.x-layout checkpoint, from its tensor shapes.

    For checkpoints whose sizes differ from SD 1.x's (e.g. miniature test models). What shapes do
    not record follows SD 1.x's conventions: 8 attention heads per UNet transformer, 32 norm
    groups where the widths allow, 64-wide text-encoder heads.
    """
    down = _indices(shapes, _UNET + "input_blocks.")
    samplers = [i for i in down if _UNET + f"input_blocks.{i}.0.op.weight" in shapes]
    per_level = (samplers[0] - 1) if samplers else len(down) - 1
    firsts = [1 + level * (per_level + 1) for level in range(len(samplers) + 1)]
    widths = [shapes[_UNET + f"input_blocks.{i}.0.out_layers.3.weight"][0] for i in firsts]
    attention = [_UNET + f"input_blocks.{i}.1.proj_in.weight" in shapes for i in firsts]
    context = next(s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight"))
    proj_in = next(s for k, s in shapes.items() if k.endswith(".proj_in.weight") and k.startswith(_UNET))
    unet = {
        "in_channels": shapes[_UNET + "input_blocks.0.0.weight"][1],
        "out_channels": shapes[_UNET + "out.2.weight"][0],
        "block_out_channels": widths,
        "layers_per_block": per_level,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "cross_attention_dim": context,
        "attention_head_dim": 8,
        "use_linear_projection": len(proj_in) == 2,
        "norm_num_groups": _groups(widths),
    }
    levels = _indices(shapes, _VAE + "encoder.down.")
    vae_widths = [shapes[_VAE + f"encoder.down.{i}.block.0.conv2.weight"][0] for i in levels]
    latent = shapes[_VAE + "post_quant_conv.weight"][0]
    vae = {
        "in_channels": shapes[_VAE + "encoder.conv_in.weight"][1],
        "out_channels": shapes[_VAE + "decoder.conv_out.weight"][0],
        "block_out_channels": vae_widths,
        "layers_per_block": len(_indices(shapes, _VAE + "encoder.down.0.block.")),
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "latent_channels": latent,
        "norm_num_groups": _groups(vae_widths),
        "scaling_factor": 0.18215,
    }
    vocab, hidden = shapes[_TEXT + "embeddings.token_embedding.weight"]
    text = {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_act": "quick_gelu",
        "hidden_size": hidden, "projection_dim": hidden, "vocab_size": vocab,
        "intermediate_size": shapes[_TEXT + "encoder.layers.0.mlp.fc1.weight"][0],
        "num_hidden_layers": len(_indices(shapes, _TEXT + "encoder.layers.")),
        "num_attention_heads": max(1, hidden // 64),
        "max_position_embeddings": shapes[_TEXT + "embeddings.position_embedding.weight"][0],
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
    }
    return {"unet": unet, "vae": vae, "text_encoder": text}
