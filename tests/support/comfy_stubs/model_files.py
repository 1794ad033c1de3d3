"""ComfyUI model folders holding tiny DMP adapters, as the node tests use them.

Adapters sit in DMP's release layout (``models/dmp/<name>/pytorch_lora_weights.safetensors``)
under the names the example workflows use, for the tiny SD 1.x UNet of ``build_tiny_components``
(seed 0); beside them, files a user may have that must be refused or not offered.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dmp_model.adapters import ADAPTER_FILE
from factories import official_state_dict, random_lora

# Task -> adapter folder name, as in example_workflows/.
ADAPTERS = {"depth": "depth-hypersim-notext", "normal": "normal-scene100-notext",
            "segmentation": "segmentation", "albedo": "albedo", "shading": "shading"}


def adapter_choice(task: str) -> str:
    """The adapter dropdown's value of the adapter of `task`."""
    return f"{ADAPTERS[task]}/{ADAPTER_FILE}"


def official_lora(unet: torch.nn.Module, seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """Rank-4 LoRA weights for every attention projection of `unet`, in DMP's release layout
    (``...attn1.processor.to_q_lora.down.weight``); the same as ``factories.write_official_adapter``'s."""
    return official_state_dict(random_lora(unet, seed, rank=4, scale=scale))


def write_official_adapter(unet: torch.nn.Module, folder: Path, seed: int, scale: float = 0.1,
                           metadata: dict[str, str] | None = None) -> Path:
    """`folder`/pytorch_lora_weights.safetensors as DMP published them; returns the file."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(official_lora(unet, seed, scale), str(folder / ADAPTER_FILE), metadata=metadata)
    return folder / ADAPTER_FILE


def write_sdxl_lora(path: Path) -> Path:
    """A kohya LoRA of SDXL's UNet (LDM block names), a file a user may pick by mistake. Like a real one,
    it partly matches SD 1.x's names: block 0's self-attention fits an SD 1.5 layer, its cross-attention
    key has SDXL's 2048-wide text input, and block 1 does not exist in SD 1.x."""
    from safetensors.torch import save_file

    prefix = "lora_unet_input_blocks_4_1_transformer_blocks"
    shapes = {f"{prefix}_0_attn1_to_q": (640, 640), f"{prefix}_0_attn2_to_k": (2048, 640),
              f"{prefix}_1_attn1_to_q": (640, 640)}
    tensors = {}
    for module, (features_in, features_out) in shapes.items():
        tensors[f"{module}.lora_down.weight"] = torch.zeros(4, features_in)
        tensors[f"{module}.lora_up.weight"] = torch.zeros(features_out, 4)
        tensors[f"{module}.alpha"] = torch.tensor(4.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def write_tiny_models(models: Path, unet: torch.nn.Module, adapter_folder: str = "") -> dict[str, Path]:
    """Fill a ComfyUI models/ folder with adapters for `unet` and files that must be refused.

    Args:
        models: the models/ folder.
        unet: the tiny diffusers UNet the adapters are made for.
        adapter_folder: subfolder of models/dmp for the adapters ('' for models/dmp itself).

    Returns:
        the paths written by role: one per task; 'lora' (a normal adapter with its facts in the
        metadata, in models/loras); 'other_base_adapter' (made for another UNet); 'sdxl_lora';
        'run' (a `dmp train` output folder with its checkpoints, whose state files are no adapters).
    """
    from dmp_model.adapters import AdapterInfo, info_to_metadata
    from dmp_model.sd.tiny import build_tiny_components

    adapters = models / "dmp" / adapter_folder
    paths = {task: write_official_adapter(unet, adapters / name, seed)
             for seed, (task, name) in enumerate(ADAPTERS.items(), start=1)}
    other_unet = build_tiny_components(seed=0, unet_width=16)[0]
    paths["other_base_adapter"] = write_official_adapter(other_unet, adapters / "depth-other-base", 9)
    paths["sdxl_lora"] = write_sdxl_lora(models / "loras" / "sdxl_detail_lora.safetensors")
    facts = {"format": "pt", **info_to_metadata(AdapterInfo(task="normal"))}
    paths["lora"] = write_official_adapter(unet, models / "loras" / "my-normals", 7, metadata=facts)
    run = adapters / "runs" / "depth-run"
    write_official_adapter(unet, run, 8, metadata={"format": "pt", **info_to_metadata(AdapterInfo(task="depth"))})
    step = run / "checkpoints" / "step-000010"
    write_official_adapter(unet, step, 8)
    (step / "state.pt").write_bytes(b"\0" * 16)
    (run / "optimizer.bin").write_bytes(b"\0" * 16)
    paths["run"] = run
    return paths
