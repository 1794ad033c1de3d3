"""A miniature SD 1.x: the same architecture and key layout at a few thousandths of the size.

Real SD weights are gigabytes and cannot ship; tests, benchmarks, the CLI's self-check and the
training demo build this model in code instead. Its UNet has the same 16 transformer blocks as
SD 1.x (so official DMP adapter keys address it unchanged), its VAE downsamples by 8, and its
CLIP text encoder keeps the real vocabulary size and 77 positions, so the SD token ids
(49406 start, 49407 end and padding) are valid.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..sampling import SD1_SCHEDULER_CONFIG

MODEL_INDEX_PATH = Path(__file__).parent / "configs" / "sd1" / "model_index.json"


def tiny_unet_config(width: int = 32, cross_attention_dim: int = 32) -> dict:
    """UNet2DConditionModel config with SD 1.x's block structure at `width` base channels."""
    return {
        "act_fn": "silu",
        "attention_head_dim": 4,
        "block_out_channels": [width, 2 * width, 2 * width, 2 * width],
        "cross_attention_dim": cross_attention_dim,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 8,
        "sample_size": 8,
    }


def tiny_vae_config(width: int = 16) -> dict:
    """AutoencoderKL config with SD's 8x downsampling and 4 latent channels."""
    return {
        "block_out_channels": [width, 2 * width, 2 * width, 2 * width],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": 64,
        "scaling_factor": 0.18215,
    }


def tiny_text_encoder_config(hidden_size: int = 32) -> dict:
    """CLIPTextConfig keeping SD 1.x's vocabulary, special token ids and 77 positions."""
    return {
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "max_position_embeddings": 77,
        "vocab_size": 49408,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
        "hidden_act": "quick_gelu",
        "projection_dim": hidden_size,
    }


def build_tiny_components(seed: int = 0, unet_width: int = 32, vae_width: int = 16, text_width: int = 32):
    """Randomly initialised (unet, vae, text_encoder), reproducible from `seed`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(unet_width, text_width))
    vae = AutoencoderKL(**tiny_vae_config(vae_width))
    text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_text_encoder_config(text_width)))
    return unet.eval(), vae.eval(), text_encoder.eval()


def _byte_symbols() -> list[str]:
    """CLIP's printable stand-ins for the 256 byte values (its ``bytes_to_unicode``)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = list(printable)
    for b in range(256):
        if b not in printable:
            codes.append(256 + len(codes) - len(printable))
    return [chr(c) for c in codes]


def write_tiny_tokenizer(folder: str | os.PathLike) -> Path:
    """A character-level CLIP tokenizer with SD's special token ids (no BPE merges).

    Enough to exercise the prompt path offline: '' tokenizes to 49406 then 49407 x 76, as SD's.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": 256 + i for i, s in enumerate(symbols)})
    vocab.update({"<|startoftext|>": 49406, "<|endoftext|>": 49407})
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 77, "tokenizer_class": "CLIPTokenizer", **special}), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    return folder


def save_tiny_sd(folder: str | os.PathLike, seed: int = 0, with_tokenizer: bool = True,
                 components=None) -> Path:
    """Write a tiny SD 1.x as a diffusers folder (unet/, vae/, text_encoder/, scheduler/, tokenizer/).

    Args:
        folder: destination, created if missing.
        seed: initialisation seed (ignored when `components` is given).
        with_tokenizer: also write the character-level tokenizer.
        components: optional (unet, vae, text_encoder) to save instead of fresh random ones.

    Returns:
        the folder path.
    """
    folder = Path(folder)
    unet, vae, text_encoder = components or build_tiny_components(seed)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD1_SCHEDULER_CONFIG, indent=2),
                                                                encoding="utf-8")
    index = json.loads(MODEL_INDEX_PATH.read_text(encoding="utf-8"))
    if with_tokenizer:
        write_tiny_tokenizer(folder / "tokenizer")
    else:
        index["tokenizer"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return folder


def save_random_adapter(unet, path: str | os.PathLike, seed: int = 0, task: str = "depth", rank: int = 4,
                        scale: float = 0.1) -> Path:
    """A random rank-`rank` adapter on every attention projection, saved like a trained one.

    For examples and benchmarks that need an adapter but no trained weights. Returns the file.
    """
    from ..adapters import ATTENTION_PROJECTIONS, AdapterInfo, infer_info_from_name, save_adapter

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in unet.named_modules():
        if name.endswith((".attn1", ".attn2")):
            for projection in ATTENTION_PROJECTIONS:
                layer = module.get_submodule(projection)
                layer = getattr(layer, "base_layer", layer)
                tensors[f"{name}.{projection}.lora_A.weight"] = torch.randn(rank, layer.in_features,
                                                                            generator=generator) * scale
                tensors[f"{name}.{projection}.lora_B.weight"] = torch.randn(layer.out_features, rank,
                                                                            generator=generator) * scale
    facts = {**infer_info_from_name(task), "task": task, "rank": rank, "uses_prompts": False}
    return save_adapter(path, tensors, AdapterInfo(**facts))
