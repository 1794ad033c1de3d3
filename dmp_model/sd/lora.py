"""Task adapters on a diffusers UNet through peft: converting any LoRA layout to peft keys, checking it
fits, and attaching it as a named adapter with ``unet.load_lora_adapter(..., prefix=None)``.

Whatever the layout, the weights are converted to peft keys with diffusers' own converters, any
alpha/rank scale is folded into the up-projection (so every adapter is simply W + up @ down),
checked against the UNet's layer shapes, and attached as a named peft adapter. Reading the files
and the adapter's facts live in ``dmp_model.adapters``, which needs no model library.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping

import torch

from ..adapters import detect_adapter_format, fit_error, fold_alpha, shape_problem, strip_prefixes


def to_peft_state_dict(state_dict: Mapping[str, torch.Tensor], unet_config, lora_alpha: float | None = None
                       ) -> dict[str, torch.Tensor]:
    """Convert any supported layout to peft keys ('{module}.lora_A.weight'), scale folded into lora_B.

    Args:
        state_dict: the adapter file's tensors.
        unet_config: the target UNet's config (kohya files may use the original LDM block names).
        lora_alpha: alpha of a peft adapter whose config records one (scale alpha / rank).

    Returns:
        peft-layout tensors whose update is exactly lora_B @ lora_A.
    """
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    fmt = detect_adapter_format(state_dict)
    alphas: dict[str, float] = {}
    if fmt == "kohya":
        if any(k.startswith("lora_te") for k in state_dict):
            raise ValueError("this LoRA also adapts the text encoder; DMP adapters adapt the UNet only")
        converted, network_alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(
            dict(state_dict), unet_config=unet_config)
        state_dict = converted
        alphas = {k.removesuffix(".alpha"): float(v) for k, v in (network_alphas or {}).items()}
    tensors = convert_unet_state_dict_to_peft(strip_prefixes(state_dict))
    alphas = {convert_unet_state_dict_to_peft({k: None}).popitem()[0]: v
              for k, v in strip_prefixes(alphas).items()}
    unsupported = [k for k in tensors if not re.search(r"\.lora_[AB]\.weight$", k)]
    if unsupported:
        raise ValueError(f"unsupported LoRA tensors (DoRA, biases or other adapter types): {unsupported[:3]}")
    for key in [k for k in tensors if k.endswith(".lora_B.weight")]:
        tensors[key] = fold_alpha(tensors[key], alphas.get(key.replace(".lora_B.", ".lora_A."), lora_alpha))
    return tensors


def check_adapter_fits(tensors: Mapping[str, torch.Tensor], unet: torch.nn.Module) -> list[str]:
    """The UNet modules an adapter patches; raises if any layer is missing or of the wrong shape."""
    modules = dict(unet.named_modules())
    targets = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
    problems = []
    for name in targets:
        down, up = tensors.get(f"{name}.lora_A.weight"), tensors.get(f"{name}.lora_B.weight")
        module = modules.get(name)
        module = getattr(module, "base_layer", module)  # layers already carrying another adapter
        if down is None or up is None:
            problems.append(f"{name}: has only one of lora_A/lora_B")
        elif module is None:
            problems.append(f"{name}: no such layer in this UNet")
        elif not isinstance(module, torch.nn.Linear):
            problems.append(f"{name}: is a {type(module).__name__}, only Linear layers are supported")
        elif problem := shape_problem(name, down.shape[1], up.shape[0], module.in_features, module.out_features):
            problems.append(problem)
    if problems:
        raise fit_error(len(targets), problems)
    return targets


def count_adapter_layers(unet: torch.nn.Module, adapter_name: str) -> int:
    """How many layers carry LoRA weights for `adapter_name`."""
    from peft.tuners.lora import LoraLayer

    return sum(1 for m in unet.modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A)


def attach_adapter(unet, tensors: Mapping[str, torch.Tensor], adapter_name: str) -> int:
    """Attach peft-layout LoRA tensors to `unet` as adapter `adapter_name`; returns layers patched.

    Every layer gets the same rank and alpha = rank (scale 1): the file's scale is already folded
    into lora_B, and diffusers infers exactly that config from equal-rank tensors.
    """
    targets = check_adapter_fits(tensors, unet)
    ranks = {tensors[f"{t}.lora_A.weight"].shape[0] for t in targets}
    rank = max(ranks)
    # Ranks that differ per layer: pad smaller ones with zeros, which adds nothing to the update.
    padded = {}
    for target in targets:
        down, up = tensors[f"{target}.lora_A.weight"], tensors[f"{target}.lora_B.weight"]
        r = down.shape[0]
        padded[f"{target}.lora_A.weight"] = torch.cat([down, down.new_zeros(rank - r, down.shape[1])])
        padded[f"{target}.lora_B.weight"] = torch.cat([up, up.new_zeros(up.shape[0], rank - r)], dim=1)
    with warnings.catch_warnings():  # several adapters on one UNet is the point, not an accident
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        unet.load_lora_adapter(padded, prefix=None, adapter_name=adapter_name)
    patched = count_adapter_layers(unet, adapter_name)
    if patched != len(targets):
        unet.delete_adapters(adapter_name)
        raise ValueError(f"adapter {adapter_name!r}: {len(targets)} layers in the file but {patched} patched")
    return patched
