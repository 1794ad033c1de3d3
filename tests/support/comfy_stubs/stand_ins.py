"""Stand-ins for ComfyUI's own modules (folder_paths, comfy.model_management, comfy.utils, comfy.lora,
comfy_execution.graph_utils), and loading the pack the way ComfyUI does. Its MODEL, VAE and CLIP
objects are in ``core_models``. They have the surfaces of ComfyUI 0.3.64; tests of newer cores add
the newer surfaces (``is_oom``, ``cuda_device_context``, ...) where they need them.

Only ComfyUI's modules are stood in for, never the pack's code: the pack is imported from its
folder by path, under a module name that is not a valid identifier, like ComfyUI's
``load_custom_node`` does (``sys_module_name`` is the folder path).
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch

PACK_ROOT = Path(__file__).resolve().parents[3]
STAND_IN_NAMES = ("folder_paths", "comfy", "comfy.model_management", "comfy.utils", "comfy.lora",
                  "comfy_execution", "comfy_execution.graph_utils")
_counter = itertools.count()


@dataclass
class Calls:
    """What the pack asked of ComfyUI, for assertions."""

    progress: list[tuple[int, int]] = field(default_factory=list)
    freed: list[tuple[int, torch.device]] = field(default_factory=list)
    loaded: list[list] = field(default_factory=list)
    memory_required: list[int] = field(default_factory=list)
    emptied: int = 0
    interrupted: bool = False


class InterruptProcessingException(Exception):
    """ComfyUI's interrupt exception (comfy.model_management)."""


class ExecutionBlocker:
    """ComfyUI's marker for outputs that block their users (comfy_execution.graph_utils)."""

    def __init__(self, message):
        self.message = message


def _folder_paths(base: Path) -> types.ModuleType:
    """folder_paths with ComfyUI's folders under `base` (models/, output/, temp/)."""
    module = types.ModuleType("folder_paths")
    exts = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
    models = base / "models"
    module.supported_pt_extensions = exts
    module.models_dir = str(models)
    module.folder_names_and_paths = {
        "checkpoints": ([str(models / "checkpoints")], exts),
        "controlnet": ([str(models / "controlnet")], exts),
        "loras": ([str(models / "loras")], exts),
    }

    def get_folder_paths(name):
        return list(module.folder_names_and_paths[name][0])

    def get_filename_list(name):
        paths, extensions = module.folder_names_and_paths[name]
        found = set()
        for root in paths:
            for folder, _dirs, files in os.walk(root):
                for file in files:
                    relative = os.path.relpath(os.path.join(folder, file), root)
                    if not extensions or os.path.splitext(file)[1].lower() in extensions:
                        found.add(relative)
        return sorted(found)

    def get_full_path(name, filename):
        for root in module.folder_names_and_paths[name][0]:
            candidate = os.path.join(root, filename)
            if os.path.isfile(candidate):
                return candidate
        return None

    def get_save_image_path(prefix, output_dir, width=0, height=0):
        normalized = os.path.normpath(prefix)
        subfolder, stem = os.path.dirname(normalized), os.path.basename(normalized)
        folder = os.path.join(output_dir, subfolder)
        os.makedirs(folder, exist_ok=True)
        numbers = [int(f[len(stem) + 1:].split("_")[0]) for f in os.listdir(folder)
                   if f.startswith(stem + "_") and f[len(stem) + 1:].split("_")[0].isdigit()]
        return folder, stem, max(numbers, default=0) + 1, subfolder, prefix

    for function in (get_folder_paths, get_filename_list, get_full_path, get_save_image_path):
        setattr(module, function.__name__, function)
    module.get_output_directory = lambda: str(base / "output")
    module.get_temp_directory = lambda: str(base / "temp")
    return module


def _model_management(calls: Calls) -> types.ModuleType:
    module = types.ModuleType("comfy.model_management")
    module.InterruptProcessingException = InterruptProcessingException
    module.get_torch_device = lambda: torch.device("cpu")
    module.unet_offload_device = lambda: torch.device("cpu")
    module.should_use_fp16 = lambda device=None, **kw: False
    module.should_use_bf16 = lambda device=None, **kw: False
    module.minimum_inference_memory = lambda: 0
    module.free_memory = lambda required, device, keep_loaded=(): calls.freed.append((required, device))
    module.OOM_EXCEPTION = torch.cuda.OutOfMemoryError

    def load_models_gpu(models, memory_required=0, force_full_load=False, **kwargs):
        calls.loaded.append(list(models))
        calls.memory_required.append(memory_required)
        for model in models:  # patch the weights of the clone being loaded, as ComfyUI does
            getattr(model, "apply", lambda: None)()

    module.load_models_gpu = load_models_gpu

    def soft_empty_cache(force=False):
        calls.emptied += 1

    def throw_exception_if_processing_interrupted():
        if calls.interrupted:
            calls.interrupted = False  # ComfyUI resets the flag when it raises
            raise InterruptProcessingException()

    module.soft_empty_cache = soft_empty_cache
    module.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    return module


def _utils(calls: Calls) -> types.ModuleType:
    module = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total, self.current = total, 0

        def update_absolute(self, value, total=None, preview=None):
            self.total = total if total is not None else self.total
            self.current = value
            calls.progress.append((value, self.total))

    module.ProgressBar = ProgressBar
    return module


def _lora() -> types.ModuleType:
    from .core_models import load_lora, model_lora_keys_unet

    module = types.ModuleType("comfy.lora")
    module.model_lora_keys_unet, module.load_lora = model_lora_keys_unet, load_lora
    return module


def install(base: Path) -> Calls:
    """Put ComfyUI stand-ins into sys.modules (folders under `base`); returns the call record."""
    calls = Calls()
    comfy = types.ModuleType("comfy")
    comfy.model_management, comfy.utils, comfy.lora = _model_management(calls), _utils(calls), _lora()
    execution = types.ModuleType("comfy_execution")
    execution.graph_utils = types.ModuleType("comfy_execution.graph_utils")
    execution.graph_utils.ExecutionBlocker = ExecutionBlocker
    modules = {"folder_paths": _folder_paths(base), "comfy": comfy,
               "comfy.model_management": comfy.model_management, "comfy.utils": comfy.utils, "comfy.lora": comfy.lora,
               "comfy_execution": execution, "comfy_execution.graph_utils": execution.graph_utils}
    sys.modules.update(modules)
    return calls


def uninstall() -> None:
    """Remove the stand-ins (and nothing else) from sys.modules."""
    for name in STAND_IN_NAMES:
        sys.modules.pop(name, None)


def load_pack(root: Path = PACK_ROOT, name: str | None = None) -> types.ModuleType:
    """Import the pack folder as a package by path, as ComfyUI does, under a non-identifier name."""
    name = name or f"{root}-under-test-{next(_counter)}"  # e.g. '/work/main-under-test-0'
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def unload_pack(module: types.ModuleType) -> None:
    """Forget a loaded pack and its submodules."""
    for key in [k for k in sys.modules if k == module.__name__ or k.startswith(module.__name__ + ".")]:
        del sys.modules[key]
