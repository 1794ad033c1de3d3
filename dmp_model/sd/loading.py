"""Loading an SD 1.x base offline: a diffusers folder or a single-file LDM checkpoint.

Single files are converted by diffusers' own ``from_single_file`` with a config folder shipped
in this package (``configs/sd1``, shared by SD 1.4 and 1.5), so nothing is looked up on a hub.
The text encoder is not loaded here: ``TextConditioner`` loads it when it is first needed.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..io.weight_files import CheckpointError, check_sd1, infer_sd1_configs, read_key_shapes, read_state_dict
from ..options import check_option
from ..sampling import SD1_SCHEDULER_CONFIG

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
SD1_CONFIG_DIR = Path(__file__).parent / "configs" / "sd1"
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."


@dataclass
class BaseComponents:
    """What ``load_base`` returns: models on their device, lazy text parts, schedule constants."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    load_text_encoder: Callable[[], torch.nn.Module]
    load_tokenizer: Callable[[], object]
    scheduler_config: dict
    source: Path
    device: torch.device
    dtype: torch.dtype


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; anything else must name an available device."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for but CUDA is not available; use device='cpu'")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was asked for but MPS is not available; use device='cpu'")
    return device


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """fp16 on accelerators for 'auto', fp32 on the CPU; fp16 on the CPU falls back to fp32."""
    check_option("precision", precision, PRECISIONS)
    if precision == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if precision == "fp16" and device.type == "cpu":
        warnings.warn("fp16 is not supported for these models on the CPU; using fp32", stacklevel=3)
        return torch.float32
    return _DTYPES[precision]


def check_diffusers_folder(folder: Path) -> None:
    """Raise a CheckpointError unless `folder` is a diffusers SD 1.x model (UNet and VAE)."""
    index_file = folder / "model_index.json"
    pipeline_class = json.loads(index_file.read_text(encoding="utf-8")).get("_class_name", "") \
        if index_file.is_file() else ""
    if (folder / "transformer").is_dir() or "XL" in pipeline_class:
        kind = pipeline_class or "a transformer-based model (SD3, Flux, ...)"
        raise CheckpointError(f"{folder} holds {kind}; DMP needs Stable Diffusion 1.x")
    for part in ("unet", "vae"):
        if not (folder / part / "config.json").is_file():
            raise CheckpointError(
                f"{folder} is not a diffusers SD 1.x folder: {part}/config.json is missing "
                "(expected unet/, vae/, text_encoder/, scheduler/ subfolders)")
    unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    problems = []
    if unet.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        problems.append(f"its UNet is a {unet['_class_name']}")
    if unet.get("in_channels") != 4:
        problems.append(f"its UNet takes {unet.get('in_channels')} input channels (4 expected; 9 is inpainting)")
    if unet.get("addition_embed_type"):
        problems.append("its UNet has SDXL's added conditioning")
    if unet.get("cross_attention_dim") in (1024, 1280, 2048):
        problems.append(f"its cross-attention width is {unet['cross_attention_dim']} (SD 2.x/SDXL), not SD 1.x's 768")
    if problems:
        raise CheckpointError(f"{folder} is not Stable Diffusion 1.x: " + "; ".join(problems))


def _load_scheduler_config(folder: Path | None) -> dict:
    """The folder's scheduler constants when it has them, else SD 1.x's."""
    candidate = folder / "scheduler" / "scheduler_config.json" if folder else None
    if candidate is not None and candidate.is_file():
        return json.loads(candidate.read_text(encoding="utf-8"))
    return dict(SD1_SCHEDULER_CONFIG)


def _tokenizer_loader(*candidates: Path | None) -> Callable[[], object]:
    """A function loading the CLIP tokenizer from the first existing folder, or returning None."""
    def load():
        from transformers import CLIPTokenizer

        for folder in candidates:
            if folder is not None and (Path(folder) / "vocab.json").is_file():
                return CLIPTokenizer.from_pretrained(str(folder))
        return None

    for folder in candidates[:1]:
        if folder is not None and not (Path(folder) / "vocab.json").is_file():
            raise FileNotFoundError(f"tokenizer folder {folder} has no vocab.json (and merges.txt)")
    return load


def load_base(path: str | os.PathLike, device: str | torch.device = "auto", precision: str = "auto",
              config: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None
              ) -> BaseComponents:
    """Load UNet and VAE of an SD 1.x base; the text encoder and tokenizer stay lazy.

    Args:
        path: a diffusers folder, or a single .safetensors/.ckpt file in the original layout.
        device: 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.
        precision: one of PRECISIONS.
        config: diffusers config folder for single files (default: the bundled SD 1.x configs, or for
            files of other sizes, such as miniature test models, configs read off the tensor shapes).
        tokenizer: optional CLIP tokenizer folder (a diffusers folder brings its own).

    Returns:
        BaseComponents with the models in eval mode, frozen, on `device` in the chosen dtype.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    path = Path(path)
    device = resolve_device(device)
    dtype = resolve_dtype(precision, device)
    tokenizer_dir = Path(tokenizer) if tokenizer is not None else None
    if path.is_dir():
        check_diffusers_folder(path)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype)
        load_text_encoder = _folder_text_encoder_loader(path, dtype)
        load_tokenizer = _tokenizer_loader(tokenizer_dir, path / "tokenizer")
        scheduler_config = _load_scheduler_config(path)
    elif path.is_file():
        shapes = read_key_shapes(path)
        check_sd1(path, shapes)
        config_dir = Path(config) if config is not None else _single_file_config(path, shapes)
        checkpoint, _ = read_state_dict(path, prefixes=("model.diffusion_model.", "first_stage_model."))
        options = dict(config=str(config_dir), local_files_only=True, torch_dtype=dtype)
        unet = _from_single_file(UNet2DConditionModel, checkpoint, path, "unet", options)
        vae = _from_single_file(AutoencoderKL, checkpoint, path, "vae", options)
        del checkpoint
        load_text_encoder = _single_file_text_encoder_loader(path, config_dir, dtype)
        load_tokenizer = _tokenizer_loader(tokenizer_dir, config_dir / "tokenizer")
        scheduler_config = _load_scheduler_config(config_dir)
    else:
        raise FileNotFoundError(f"base model not found: {path} (expected a diffusers folder or a checkpoint file)")
    for model in (unet, vae):
        _check_loaded(model, path)
        model.to(device).eval().requires_grad_(False)
    return BaseComponents(unet, vae, load_text_encoder, load_tokenizer, scheduler_config, path, device, dtype)


_CLASS_NAMES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel"}


def _single_file_config(path: Path, shapes: dict) -> Path:
    """The bundled SD 1.x configs when the file has SD 1.x's sizes, else configs read off its shapes."""
    inferred = infer_sd1_configs(shapes)
    conventions = ("attention_head_dim", "norm_num_groups", "num_attention_heads", "bos_token_id",
                   "eos_token_id", "pad_token_id", "projection_dim")
    bundled = {part: json.loads((SD1_CONFIG_DIR / part / "config.json").read_text(encoding="utf-8"))
               for part in inferred}
    if all(bundled[part].get(k, v) == v for part, config in inferred.items()
           for k, v in config.items() if k not in conventions):
        return SD1_CONFIG_DIR
    folder = Path(tempfile.mkdtemp(prefix="dmp-config-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    for part, config in inferred.items():
        (folder / part).mkdir()
        (folder / part / "config.json").write_text(json.dumps({"_class_name": _CLASS_NAMES[part], **config}))
    logger.info("%s is not SD 1.x-sized; using the architecture read off its tensor shapes: UNet widths %s, "
                "context %d", path, inferred["unet"]["block_out_channels"], inferred["unet"]["cross_attention_dim"])
    return folder


def _from_single_file(cls, checkpoint: dict, path: Path, subfolder: str, options: dict) -> torch.nn.Module:
    """diffusers' from_single_file, with its failures on damaged files turned into a CheckpointError.

    diffusers 0.42 leaves weights missing from the file on the meta device and then fails moving
    them ("Cannot copy out of meta tensor"); shapes that do not fit the config raise a ValueError.
    """
    try:
        return cls.from_single_file(checkpoint, subfolder=subfolder, **options)
    except NotImplementedError as err:  # a meta tensor: some weights were not in the file
        raise CheckpointError(
            f"{path}: some {subfolder.upper()} weights ({cls.__name__}) are missing from the file; the checkpoint "
            "is incomplete (a partial download or a stripped file): download it again") from err
    except ValueError as err:
        if "expected shape" not in str(err):
            raise
        raise CheckpointError(
            f"{path}: {cls.__name__} weight shapes do not fit the config in {options['config']} "
            f"({str(err).split(' If you want', 1)[0]}); DMP needs an SD 1.x checkpoint "
            "and the matching config") from err


def _check_loaded(model: torch.nn.Module, path: Path) -> None:
    """Weights left on the meta device were missing from the file: refuse instead of running garbage."""
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} {type(model).__name__} weights are missing "
                              f"(e.g. {missing[:3]}); the checkpoint is incomplete")


def _folder_text_encoder_loader(folder: Path, dtype: torch.dtype) -> Callable[[], torch.nn.Module]:
    def load():
        from transformers import CLIPTextModel

        if not (folder / "text_encoder" / "config.json").is_file():
            raise CheckpointError(f"{folder} has no text_encoder/ subfolder; DMP needs it for the prompt embedding")
        return CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype)

    return load


def _single_file_text_encoder_loader(path: Path, config_dir: Path, dtype: torch.dtype
                                     ) -> Callable[[], torch.nn.Module]:
    def load():
        from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
        from transformers import CLIPTextModel

        checkpoint, _ = read_state_dict(path, prefixes=(_TEXT_ENCODER_PREFIX,))
        model = create_diffusers_clip_model_from_ldm(
            CLIPTextModel, checkpoint, subfolder="text_encoder", config=str(config_dir),
            torch_dtype=dtype, local_files_only=True)
        _check_loaded(model, path)
        return model

    return load

