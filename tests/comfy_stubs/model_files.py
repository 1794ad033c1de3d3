"""ComfyUI model folders holding tiny DMP models, as the node tests and the e2e run use them.

Adapters sit in DMP's release layout (``models/dmp/<name>/pytorch_lora_weights.safetensors``)
under the names the example workflows use; the base is a tiny SD 1.x diffusers folder.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Task -> adapter folder name, as in example_workflows/.
ADAPTERS = {"depth": "depth-hypersim-notext", "normal": "normal-scene100-notext",
            "segmentation": "segmentation", "albedo": "albedo", "shading": "shading"}
ADAPTER_FILE = "pytorch_lora_weights.safetensors"
TINY_BASE = "tiny-sd1"  # listed by the loader as 'diffusers/tiny-sd1'


def adapter_choice(task: str) -> str:
    """The loader's dropdown value of the adapter of `task`."""
    return f"{ADAPTERS[task]}/{ADAPTER_FILE}"


def write_official_adapter(unet: torch.nn.Module, folder: Path, seed: int, scale: float = 0.1) -> Path:
    """A rank-4 adapter for `unet` in DMP's release layout (``...processor.to_q_lora.down.weight``)."""
    from safetensors.torch import save_file

    official = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in unet.named_modules():
        if not name.endswith((".attn1", ".attn2")):
            continue
        for projection, key in official.items():
            layer = module.get_submodule(projection)
            prefix = f"{name}.processor.{key}"
            tensors[f"{prefix}.down.weight"] = torch.randn(4, layer.in_features, generator=generator) * scale
            tensors[f"{prefix}.up.weight"] = torch.randn(layer.out_features, 4, generator=generator) * scale
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / ADAPTER_FILE))
    return folder / ADAPTER_FILE


def write_sdxl_like_checkpoint(path: Path) -> Path:
    """A small file with SDXL's key layout: something a user might pick by mistake as the base."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
               "model.diffusion_model.label_emb.0.0.weight": torch.zeros(8, 16),
               "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(8)},
              str(path))
    return path


def write_tiny_models(models: Path, adapter_folder: str = "") -> dict[str, Path]:
    """Fill a ComfyUI models/ folder: a tiny diffusers base, adapters, and files that must be refused.

    Args:
        models: the models/ folder.
        adapter_folder: subfolder of models/dmp for the adapters ('' for models/dmp itself).

    Returns:
        the paths written by role: 'base', one per task, 'other_base_adapter' (made for another
        UNet), 'sdxl' (a checkpoint of the wrong family), 'not_an_adapter' (training state).
    """
    from dmp_model.tiny import build_tiny_components, save_tiny_sd

    components = build_tiny_components(seed=0)
    paths = {"base": save_tiny_sd(models / "diffusers" / TINY_BASE, components=components)}
    adapters = models / "dmp" / adapter_folder
    for seed, (task, name) in enumerate(ADAPTERS.items(), start=1):
        paths[task] = write_official_adapter(components[0], adapters / name, seed)
    other_unet = build_tiny_components(seed=0, unet_width=16)[0]
    paths["other_base_adapter"] = write_official_adapter(other_unet, adapters / "depth-other-base", 9)
    paths["sdxl"] = write_sdxl_like_checkpoint(models / "checkpoints" / "sdxl_base_1.0.safetensors")
    paths["not_an_adapter"] = adapters / ADAPTERS["depth"] / "optimizer.bin"
    paths["not_an_adapter"].write_bytes(b"\0" * 16)
    return paths
