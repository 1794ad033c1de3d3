"""The one module of the pack that talks to ComfyUI: model folders, devices, memory, progress.

Every other module of the pack reaches ComfyUI only through these functions, so the pack
imports (and its tests run) without ComfyUI. Where ComfyUI's modules are absent, model lists
are empty and anything that needs ComfyUI raises a RuntimeError saying so.

Memory: a DMP base (UNet + VAE) is handed to ComfyUI's model management as one
``comfy.model_patcher.ModelPatcher``, like ComfyUI's own models, so other models can push it out
of VRAM and it is loaded back (``load_models_gpu``) before every run.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from ..dmp_model.adapters import ADAPTER_EXTENSIONS

try:
    import folder_paths
except ModuleNotFoundError:  # plain Python: no ComfyUI
    folder_paths = None
try:
    import comfy.model_management as model_management
    import comfy.utils as comfy_utils
except ModuleNotFoundError:
    model_management = comfy_utils = None

logger = logging.getLogger(__name__)

ADAPTER_FOLDER = "dmp"
DIFFUSERS_PREFIX = "diffusers/"
# Files that training runs leave beside adapters (accelerate state), never adapters themselves.
_NOT_ADAPTERS = ("optimizer.bin", "scheduler.bin", "scaler.pt", "training_state.pt")


def available() -> bool:
    """Whether ComfyUI's modules could be imported."""
    return folder_paths is not None and model_management is not None


def _require() -> None:
    if not available():
        raise RuntimeError("this DMP node runs inside ComfyUI (folder_paths and comfy.model_management are "
                           "missing); outside ComfyUI use the dmp_model package directly")


# Model folders -------------------------------------------------------------------------------

def register_model_folder() -> None:
    """Register 'dmp' (models/dmp, plus any 'dmp:' paths of extra_model_paths.yaml) for adapters.

    ComfyUI reads extra_model_paths.yaml before custom nodes load, so paths already registered
    under 'dmp' are kept; models/dmp goes first and the list is limited to model extensions.
    """
    if folder_paths is None:
        return
    default = os.path.join(folder_paths.models_dir, ADAPTER_FOLDER)
    entry = folder_paths.folder_names_and_paths.get(ADAPTER_FOLDER)
    paths = list(entry[0]) if entry else []
    if default not in paths:
        paths.insert(0, default)
    folder_paths.folder_names_and_paths[ADAPTER_FOLDER] = (paths, set(folder_paths.supported_pt_extensions))


def adapter_choices() -> list[str]:
    """Adapter files under the 'dmp' folders, as paths relative to them (DMP's layout included:
    'depth-hypersim-notext/pytorch_lora_weights.safetensors')."""
    if folder_paths is None:
        return []
    return [name for name in folder_paths.get_filename_list(ADAPTER_FOLDER)
            if os.path.splitext(name)[1].lower() in ADAPTER_EXTENSIONS
            and os.path.basename(name) not in _NOT_ADAPTERS]


def _diffusers_folders() -> dict[str, Path]:
    """Diffusers model folders (those holding model_index.json) by their path relative to 'diffusers'.

    Linked folders are followed, but every real folder is walked once (a link to a parent folder
    would otherwise be walked over and over), in name order so that of two links to one model the
    same one is always listed; a model folder's own subfolders (unet/, vae/, ...) are not walked.
    """
    found: dict[str, Path] = {}
    visited: set[str] = set()
    for root in folder_paths.get_folder_paths("diffusers"):
        if not os.path.isdir(root):
            continue
        for folder, subfolders, files in os.walk(root, followlinks=True):
            real = os.path.realpath(folder)
            if real in visited or "model_index.json" in files:
                subfolders.clear()  # os.walk descends only into the names left in the list
            else:
                subfolders.sort()
            if real in visited:
                continue
            visited.add(real)
            if "model_index.json" in files:
                relative = os.path.relpath(folder, root).replace(os.sep, "/")
                found.setdefault(relative, Path(folder))
    return found


def base_choices() -> list[str]:
    """Bases: checkpoint files as ComfyUI's Load Checkpoint lists them, then 'diffusers/<folder>'."""
    if folder_paths is None:
        return []
    folders = sorted(DIFFUSERS_PREFIX + name for name in _diffusers_folders())
    return folder_paths.get_filename_list("checkpoints") + folders


def resolve_base(name: str) -> Path:
    """The file or folder of a base listed by ``base_choices``."""
    _require()
    if name.startswith(DIFFUSERS_PREFIX):
        folder = _diffusers_folders().get(name[len(DIFFUSERS_PREFIX):])
        if folder is not None:
            return folder
    path = folder_paths.get_full_path("checkpoints", name)
    if path is None:
        raise FileNotFoundError(
            f"base model {name!r} not found in the checkpoints folders "
            f"{folder_paths.get_folder_paths('checkpoints')} nor as a diffusers folder in "
            f"{folder_paths.get_folder_paths('diffusers')}; put an SD 1.x checkpoint "
            "(e.g. v1-5-pruned-emaonly.safetensors) in models/checkpoints and refresh")
    return Path(path)


def resolve_adapter(name: str) -> Path:
    """The file of an adapter listed by ``adapter_choices``."""
    _require()
    path = folder_paths.get_full_path(ADAPTER_FOLDER, name)
    if path is None:
        raise FileNotFoundError(
            f"DMP adapter {name!r} not found in the dmp model folders "
            f"{folder_paths.get_folder_paths(ADAPTER_FOLDER)}; put adapters there in DMP's layout "
            "(e.g. depth-hypersim-notext/pytorch_lora_weights.safetensors) and refresh")
    return Path(path)


def sd1_tokenizer() -> Path | None:
    """ComfyUI's own SD 1.x CLIP tokenizer folder (comfy/sd1_tokenizer), for text prompts."""
    source = getattr(comfy_utils, "__file__", None)
    if not source:
        return None
    folder = Path(source).parent / "sd1_tokenizer"
    return folder if (folder / "vocab.json").is_file() else None


def output_directory() -> str:
    _require()
    return folder_paths.get_output_directory()


def temp_directory() -> str:
    _require()
    return folder_paths.get_temp_directory()


def save_path(prefix: str, directory: str, width: int, height: int) -> tuple[str, str, int, str]:
    """ComfyUI's counter naming: (folder, file name stem, next counter, subfolder) for a prefix."""
    _require()
    folder, stem, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, directory, width, height)
    return folder, stem, counter, subfolder


# Devices and memory --------------------------------------------------------------------------

def torch_device() -> torch.device:
    """The device ComfyUI computes on (the CPU under --cpu)."""
    _require()
    return model_management.get_torch_device()


def offload_device() -> torch.device:
    _require()
    return model_management.unet_offload_device()


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' as ComfyUI would choose for this device (fp32 on the CPU and where fp16 is unsafe)."""
    if precision != "auto":
        return precision
    if device.type == "cpu":
        return "fp32"
    if model_management.should_use_fp16(device):
        return "fp16"
    if model_management.should_use_bf16(device):
        return "bf16"
    return "fp32"


def free_memory(bytes_needed: int, device: torch.device) -> None:
    """Let ComfyUI unload other models until `bytes_needed` fit on `device` (nothing on the CPU)."""
    if device.type != "cpu":
        model_management.free_memory(bytes_needed + model_management.minimum_inference_memory(), device)


class DMPBaseModules(torch.nn.Module):
    """UNet and VAE of one DMP base as a single module, the unit ComfyUI loads and offloads."""

    def __init__(self, unet: torch.nn.Module, vae: torch.nn.Module, device: torch.device):
        super().__init__()
        self.unet, self.vae = unet, vae
        self.device = device  # ModelPatcher reads and writes it; diffusers' own .device has no setter


def manage(model) -> object | None:
    """A ModelPatcher for a DMPModel's UNet and VAE, or None where ComfyUI has none."""
    try:
        from comfy.model_patcher import ModelPatcher
    except ModuleNotFoundError:
        return None
    modules = DMPBaseModules(model.unet, model.vae, model.device)
    return ModelPatcher(modules, load_device=torch_device(), offload_device=offload_device())


@contextlib.contextmanager
def on_device(model, patcher) -> Iterator[None]:
    """Run a DMPModel on ComfyUI's device, then give memory back.

    Before: ComfyUI loads the base fully onto its device (unloading others as needed). After:
    the text encoder, which ComfyUI does not manage, goes to the offload device and the cache
    is emptied. Raises ComfyUI's interrupt exception if the queue was cancelled meanwhile.
    """
    _require()
    model_management.throw_exception_if_processing_interrupted()
    if patcher is not None:
        model_management.load_models_gpu([patcher], force_full_load=True)
        device = patcher.load_device
    else:
        device = torch_device()
    model.to(device)
    try:
        yield
    finally:
        if model.text.text_encoder is not None:
            model.text.to(offload_device())
        model_management.soft_empty_cache()


class Progress:
    """A ``callback(done, total)`` for dmp_model: ComfyUI's progress bar, and its interrupt."""

    def __init__(self):
        _require()
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        model_management.throw_exception_if_processing_interrupted()
        if self.bar is None:
            self.bar = comfy_utils.ProgressBar(total)
        self.bar.update_absolute(done, total)


def blocked(message: str):
    """An output that stops the nodes using it with `message` (None in ComfyUI versions without it)."""
    try:
        from comfy_execution.graph_utils import ExecutionBlocker
    except ModuleNotFoundError:
        return None
    return ExecutionBlocker(message)
