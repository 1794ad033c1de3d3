"""Task adapters: what an adapter is (``AdapterInfo``) and its files in every common layout.

DMP publishes one rank-4 LoRA per task in the old diffusers attention-processor layout
(``...attn1.processor.to_q_lora.down.weight``). We also read peft/diffusers LoRA files and
kohya-style ones. This module reads and writes them and resolves an adapter's facts without any
model library; attaching one to a diffusers UNet through peft is ``sd/lora.py``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from .io.weight_files import read_state_dict
from .options import check_option, check_real
from .sampling import PREDICTION_TYPES
from .tasks.codecs import DEPTH_TARGET_SCALE, TASKS
from .tasks.normals import NORMAL_CONVENTIONS

logger = logging.getLogger(__name__)

ADAPTER_FORMATS = ("dmp", "peft", "kohya")
ADAPTER_FILE = "pytorch_lora_weights.safetensors"  # DMP's release name, also what the trainer writes
ADAPTER_FILE_NAMES = (ADAPTER_FILE, "pytorch_lora_weights.bin",
                      "adapter_model.safetensors", "adapter_model.bin")
ADAPTER_EXTENSIONS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
METADATA_PREFIX = "dmp."
# The four projections of every attention layer, and their names in the official DMP layout.
ATTENTION_PROJECTIONS = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}

# Adapter names published with the paper start with their task ("depth-hypersim-notext").
_TASK_PREFIXES = (("depth", "depth"), ("normal", "normal"), ("seg", "segmentation"),
                  ("albedo", "albedo"), ("shading", "shading"))


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter predicts and how to run it.

    Attributes:
        task: one of TASKS; selects the codec that decodes its output.
        prediction_type: the UNet's parametrisation, one of PREDICTION_TYPES (DMP: v_prediction).
        uses_prompts: trained with captions (classifier-free guidance at inference) or with "".
        target_scale: depth only: metres represented by a decoded value of 1 (8 for DMP's depth).
        normal_convention: normal only: the camera frame of its normals, one of NORMAL_CONVENTIONS.
        base_model: the base it was trained on (informational).
        rank: LoRA rank found in the weights.
        self_attn_only: only ``attn1`` layers are adapted (a fact of the weights).
        steps_trained: optimisation steps, when the trainer recorded them.
    """

    task: str = "rgb"
    prediction_type: str = "v_prediction"
    uses_prompts: bool = False
    target_scale: float = 1.0
    normal_convention: str = "omnidata"
    base_model: str = "sd1"
    rank: int | None = None
    self_attn_only: bool = False
    steps_trained: int | None = None

    def __post_init__(self):
        check_option("task", self.task, TASKS)
        check_option("prediction_type", self.prediction_type, PREDICTION_TYPES)
        check_option("normal_convention", self.normal_convention, NORMAL_CONVENTIONS)
        check_real("target_scale", self.target_scale, 0, low_open=True)


def infer_info_from_name(name: str) -> dict:
    """Adapter facts implied by DMP's naming: task from the prefix, prompts unless '-notext'."""
    lowered = name.lower()
    task = next((task for prefix, task in _TASK_PREFIXES if lowered.startswith(prefix)), "rgb")
    facts = {"task": task, "uses_prompts": task != "rgb" and not lowered.endswith("-notext")}
    if task == "depth":
        facts["target_scale"] = DEPTH_TARGET_SCALE
    return facts


def info_to_metadata(info: AdapterInfo) -> dict[str, str]:
    """Safetensors metadata (string values) recording an AdapterInfo."""
    return {METADATA_PREFIX + k: json.dumps(v) for k, v in asdict(info).items() if v is not None}


def info_from_metadata(metadata: Mapping[str, str] | None) -> dict:
    """The AdapterInfo fields recorded in safetensors metadata ('dmp.*' keys); unknown keys ignored."""
    known = {f.name for f in fields(AdapterInfo)}
    facts = {}
    for key, raw in (metadata or {}).items():
        field = key[len(METADATA_PREFIX):] if key.startswith(METADATA_PREFIX) else None
        if field in known:
            try:
                facts[field] = json.loads(raw)
            except json.JSONDecodeError:
                facts[field] = raw
    return facts


def resolve_adapter_file(path: str | os.PathLike) -> Path:
    """The weights file of an adapter given as a file or as a folder (DMP's release layout)."""
    path = Path(path)
    if path.is_dir():
        for name in ADAPTER_FILE_NAMES:
            if (path / name).is_file():
                return path / name
        candidates = sorted(p.name for p in path.iterdir() if p.suffix in ADAPTER_EXTENSIONS)
        if len(candidates) == 1:
            return path / candidates[0]
        raise FileNotFoundError(
            f"adapter folder {path} has no {' or '.join(ADAPTER_FILE_NAMES[:2])}"
            + (f" (found several weight files: {candidates}; pass one of them)" if candidates else "")
        )
    if not path.is_file():
        raise FileNotFoundError(f"adapter not found: {path} (expected a LoRA file or a folder holding one)")
    if path.suffix not in ADAPTER_EXTENSIONS:
        raise ValueError(f"adapter file {path} has extension {path.suffix!r}; expected one of {ADAPTER_EXTENSIONS}")
    return path


def adapter_name_for(path: str | os.PathLike) -> str:
    """DMP names adapters by their folder ('depth-hypersim-notext/pytorch_lora_weights.*')."""
    path = Path(path)
    if path.is_file() and path.name in ADAPTER_FILE_NAMES:
        return path.parent.name
    return path.name if path.is_dir() else path.stem


def detect_adapter_format(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Which of ADAPTER_FORMATS the keys use: 'dmp' (attention processors), 'peft' or 'kohya'."""
    keys = list(state_dict)
    if any(k.startswith(("lora_unet_", "lora_te_")) for k in keys):
        return "kohya"
    if any("_lora.down." in k or "_lora.up." in k for k in keys):
        return "dmp"
    if any(".lora_A." in k or ".lora.down." in k for k in keys):
        return "peft"
    raise ValueError(
        "no LoRA weights found: expected keys like '...attn1.processor.to_q_lora.down.weight' (DMP), "
        f"'...to_q.lora_A.weight' (peft) or 'lora_unet_...lora_down.weight' (kohya); got e.g. {keys[:3]}"
    )


def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the wrappers peft and diffusers put in front of UNet module names."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("base_model.model.", "unet."):
            key = key.removeprefix(prefix)
        out[key] = value
    return out


@dataclass(frozen=True)
class OpenedAdapter:
    """An adapter file read in any layout: its natural name, the file, its facts, its tensors and metadata."""

    name: str
    file: Path
    info: AdapterInfo
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


def open_adapter(path: str | os.PathLike, overrides: Mapping | None = None) -> OpenedAdapter:
    """Open an adapter file or folder (DMP, peft or kohya layout; pickles only with weights_only=True).

    Its name comes from the path (``adapter_name_for``); its facts from (lowest to highest priority) that
    name, the file's metadata (and a peft ``adapter_config.json`` beside it) and `overrides`.
    """
    file = resolve_adapter_file(path)
    tensors, metadata = read_state_dict(file)
    config_file = file.parent / "adapter_config.json"
    if file.name.startswith("adapter_model") and config_file.is_file():
        metadata = {**metadata, "peft_config": config_file.read_text(encoding="utf-8")}
    name = adapter_name_for(path)
    return OpenedAdapter(name, file, resolve_info(name, metadata, tensors, overrides), tensors, metadata)


def adapter_name(natural: str, file: str | os.PathLike, loaded: Mapping[str, str | os.PathLike]) -> str:
    """The name an adapter file gets beside the `loaded` ones ({name: file}), for the library and the nodes.

    Its natural name; the same file keeps the name it has (loading it again replaces it); another file
    of a name already taken gets 'natural~2', '~3'...
    """
    name, number = natural, 1
    while name in loaded and Path(loaded[name]).resolve() != Path(file).resolve():
        number += 1
        name = f"{natural}~{number}"
    return name


def peft_alpha(metadata: Mapping[str, str]) -> float | None:
    """lora_alpha recorded by peft ('adapter_config.json') or diffusers ('lora_adapter_metadata')."""
    for key in ("peft_config", "lora_adapter_metadata"):
        if key in metadata:
            config = json.loads(metadata[key])
            if config.get("alpha_pattern") or config.get("rank_pattern"):
                raise ValueError("LoRA files with per-layer rank or alpha patterns are not supported")
            return config.get("lora_alpha")
    return None


# The down projection of one LoRA module in each layout: DMP's, kohya's, peft's, diffusers' older one.
LORA_DOWN_SUFFIXES = ("_lora.down.weight", ".lora_down.weight", ".lora_A.weight", ".lora.down.weight")


def lora_modules(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{module name as the file writes it: its down projection [rank, in]} for LoRA weights of any layout."""
    modules = {}
    for key, value in tensors.items():
        for suffix in LORA_DOWN_SUFFIXES:
            if key.endswith(suffix):
                modules[key[: -len(suffix)]] = value
    return modules


def fold_alpha(up: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """An up projection [out, rank] with a LoRA's alpha / rank scale folded in, so the update is up @ down."""
    rank = up.shape[1]
    return up if alpha is None or alpha == rank else up * (alpha / rank)


def shape_problem(name: str, down_in: int, up_out: int, layer_in: int, layer_out: int) -> str | None:
    """Why a LoRA module mapping down_in -> up_out features does not fit a layer (None when it does)."""
    if (down_in, up_out) == (layer_in, layer_out):
        return None
    return f"{name}: adapter maps {down_in}->{up_out} features, the layer {layer_in}->{layer_out}"


def fit_error(total: int, problems: list[str]) -> ValueError:
    """The error for an adapter of which some of `total` LoRA layers fit no layer of the model, one wording."""
    return ValueError(
        f"adapter does not fit this model: {total - len(problems)} of {total} LoRA layers fit (e.g. {problems[:3]}). "
        "It was probably made for another base model (SD 2.x, SDXL, ...): DMP adapters need SD 1.x")


def lora_rank_and_scope(tensors: Mapping[str, torch.Tensor]) -> tuple[int | None, bool]:
    """(rank, self-attention only) read off LoRA weights of any layout (DMP, peft, kohya).

    The rank is the largest first dimension of the down projections; "self-attention only" means every
    weight belongs to an ``attn1`` layer (DMP's ``self_attn_only`` variant).
    """
    rank = max((v.shape[0] for v in lora_modules(tensors).values()), default=None)
    weights = [k for k in tensors if k.endswith(".weight")]
    return rank, bool(weights) and all("attn1" in k for k in weights)


def resolve_info(name: str, metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor],
                 overrides: Mapping | None = None) -> AdapterInfo:
    """AdapterInfo from (lowest to highest priority) the name, the file's metadata, the caller.

    `tensors` in any layout: rank and self-attention-only are read off the weights, never guessed.
    """
    facts = infer_info_from_name(name)
    facts.update(info_from_metadata(metadata))
    facts["rank"], facts["self_attn_only"] = lora_rank_and_scope(tensors)
    unknown = set(overrides or {}) - {f.name for f in fields(AdapterInfo)}
    if unknown:
        raise TypeError(f"unknown adapter settings {sorted(unknown)}; valid: {[f.name for f in fields(AdapterInfo)]}")
    facts.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if facts["task"] == "rgb" and "task" not in info_from_metadata(metadata) and "task" not in (overrides or {}):
        logger.warning("adapter %r: no task in its metadata or name (depth-*, normal-*, seg*, albedo*, shading*); "
                       "decoding its output as plain RGB (pass task=... to say which)", name)
    return AdapterInfo(**facts)


def portable_lora_state_dict(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
                             ) -> dict[str, torch.Tensor]:
    """The adapter in a layout that every SD LoRA loader reads (ComfyUI's, A1111's), scale folded in.

    DMP's official layout and kohya's ``lora_unet_*`` names are read as they are; peft/diffusers keys
    (``{prefix}down_blocks.0....to_q.lora_A.weight``) become kohya names (module path with "_"), with a
    peft ``lora_alpha`` folded into the up weights. Pure key surgery: no model library needed.
    """
    fmt = detect_adapter_format(tensors)
    if any(k.startswith("lora_te") for k in tensors):
        raise ValueError("this LoRA also adapts the text encoder; DMP adapters adapt the UNet only")
    if fmt != "peft":
        return dict(tensors)
    alpha = peft_alpha(metadata)
    out = {}
    for key, value in strip_prefixes(tensors).items():
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B|lora\.down|lora\.up)\.weight", key)
        if match is None:
            raise ValueError(f"unsupported LoRA tensor {key!r} (DoRA, biases or other adapter types)")
        module, kind = match.groups()
        up = kind in ("lora_B", "lora.up")
        if up:
            value = fold_alpha(value, alpha)
        out[f"lora_unet_{module.replace('.', '_')}.{'lora_up' if up else 'lora_down'}.weight"] = value
    return out


def offered_as_adapter(relative_path: str) -> bool:
    """Whether a file under a model folder is offered as an adapter in pickers (the nodes' dropdowns).

    Any ``.safetensors``, and pickled files only under the names DMP and peft give adapters
    (``pytorch_lora_weights.bin``, ``adapter_model.bin``): a training run's folder also holds
    ``checkpoints/step-*/state.pt``, accelerate's ``optimizer.bin`` and the like, which are not adapters.
    """
    name = relative_path.replace("\\", "/").rsplit("/", 1)[-1]
    return name.lower().endswith(".safetensors") or name in ADAPTER_FILE_NAMES


def with_overrides(info: AdapterInfo, **overrides) -> AdapterInfo:
    """A copy of `info` with some fields replaced (and validated)."""
    return replace(info, **{k: v for k, v in overrides.items() if v is not None})


def _official_key(peft_key: str) -> str | None:
    """'...attn1.to_q.lora_A.weight' -> '...attn1.processor.to_q_lora.down.weight' (None if not representable)."""
    module, kind = peft_key.removesuffix(".weight").rsplit(".", 1)
    for projection, official in ATTENTION_PROJECTIONS.items():
        if module.endswith("." + projection):
            parent = module[: -len(projection) - 1]
            return f"{parent}.processor.{official}.{'down' if kind == 'lora_A' else 'up'}.weight"
    return None


def save_adapter(path: str | os.PathLike, peft_state_dict: Mapping[str, torch.Tensor], info: AdapterInfo,
                 lora_scale: float = 1.0) -> Path:
    """Write an adapter as one .safetensors with its AdapterInfo in the metadata (atomically).

    Attention-only adapters are written in the official DMP layout, which this engine, the
    reference implementation and ComfyUI's LoRA loader all read; others in the peft layout
    (``unet.{module}.lora_A.weight``). The LoRA scale (alpha / rank) is folded into the up
    weights, so either layout means exactly W + up @ down.

    Args:
        path: destination .safetensors file.
        peft_state_dict: ``peft.get_peft_model_state_dict(unet, adapter_name=...)`` output.
        info: the adapter's facts, stored as 'dmp.*' metadata.
        lora_scale: alpha / rank of the trained adapter.
    """
    from safetensors.torch import save_file

    from .io.writers import atomic_path

    tensors = {key: (t.detach().float().cpu() * (lora_scale if ".lora_B." in key else 1.0)).contiguous()
               for key, t in peft_state_dict.items()}
    official = {_official_key(key): t for key, t in tensors.items()}
    out = official if None not in official else {f"unet.{key}": t for key, t in tensors.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(out, str(tmp), metadata={"format": "pt", **info_to_metadata(info)})
    return path
