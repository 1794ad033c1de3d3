"""Adapter files built in code, in the layouts people actually have on disk."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from dmp_model.adapters import ADAPTER_FILE, ATTENTION_PROJECTIONS


def attention_layers(unet, self_attn_only: bool = False) -> dict[str, torch.nn.Linear]:
    """The adaptable projections of a UNet by module name ('...attn1.to_q' -> Linear)."""
    layers = {}
    for name, module in unet.named_modules():
        if name.endswith(".attn1") or (name.endswith(".attn2") and not self_attn_only):
            for projection in ATTENTION_PROJECTIONS:
                layers[f"{name}.{projection}"] = module.get_submodule(projection)
    return layers


def random_lora(unet, seed: int, rank: int = 4, scale: float = 0.1, self_attn_only: bool = False
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (down [r, in], up [out, r])} with reproducible random weights."""
    generator = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(rank, layer.in_features, generator=generator) * scale,
                   torch.randn(layer.out_features, rank, generator=generator) * scale)
            for name, layer in attention_layers(unet, self_attn_only).items()}


def official_state_dict(lora: dict) -> dict[str, torch.Tensor]:
    """DMP's release layout: '{attn}.processor.to_q_lora.down.weight' and '.up.weight'."""
    out = {}
    for module, (down, up) in lora.items():
        attention, projection = module.split(".to_", 1)
        key = f"{attention}.processor.{ATTENTION_PROJECTIONS['to_' + projection]}"
        out[f"{key}.down.weight"], out[f"{key}.up.weight"] = down, up
    return out


def write_official_adapter(unet, folder: Path, seed: int, fmt: str = "safetensors", rank: int = 4,
                           self_attn_only: bool = False, scale: float = 0.1) -> Path:
    """Write `folder/pytorch_lora_weights.{safetensors,bin}` as DMP published them; returns the folder."""
    state = official_state_dict(random_lora(unet, seed, rank, scale, self_attn_only))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(folder / ADAPTER_FILE))
    else:
        torch.save(state, folder / Path(ADAPTER_FILE).with_suffix(".bin"))
    return folder


def merged_unet(unet, lora):
    """A plain copy of the base UNet with W += up @ down merged by hand (no peft involved)."""
    merged = copy.deepcopy(unet)
    if hasattr(merged, "peft_config"):
        merged.disable_adapters()
    with torch.no_grad():
        for name, (down, up) in lora.items():
            layer = merged.get_submodule(name)
            layer = getattr(layer, "base_layer", layer)
            layer.weight += up @ down
    return merged
