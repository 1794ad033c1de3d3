"""Loading DMP models: one cached base per (path, files' identity, precision, device), adapters added to it.

A ``DMP_MODEL`` socket carries a ``DMPModelView``: the shared base and the names of the adapters
its loader asked for. Loading never removes or replaces an adapter another view uses, so two
loader nodes on one base never change each other's results; each adds its adapters under its
own names, and a base is loaded only once.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..dmp_model import DMPModel
from ..dmp_model import adapters as adapter_files
from ..dmp_model.adapters import AdapterInfo
from ..dmp_model.checkpoints import CheckpointError
from ..dmp_model.loading import PRECISIONS, estimate_base_bytes
from ..dmp_model.tasks import TASKS
from . import comfy_bridge as bridge

logger = logging.getLogger(__name__)

# Bases kept loaded for new loader runs; older ones are dropped once no DMP_MODEL uses them.
MAX_CACHED_BASES = 2
MAX_ADAPTERS = 5
NO_ADAPTER = "none"
TASK_CHOICES = ("auto", *TASKS)
# The parts of a diffusers folder a base is loaded from (the text encoder loads lazily, later).
_BASE_SUBFOLDERS = ("unet", "vae")


@dataclass(eq=False)
class BaseHandle:
    """A loaded base shared by every DMP_MODEL on it.

    Attributes:
        key: (resolved path, files' identity, precision, device), the cache key.
        model: the DMPModel (UNet, VAE, lazy text encoder, attached adapters).
        patcher: ComfyUI's ModelPatcher managing its memory (None outside ComfyUI).
        files: adapter name -> resolved file it was loaded from.
    """

    key: tuple[str, tuple, str, str]
    model: DMPModel
    patcher: object | None
    files: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DMPModelView:
    """What a DMP_MODEL socket carries: a shared base and this loader's adapters, in order."""

    base: BaseHandle
    adapters: tuple[str, ...]

    @property
    def model(self) -> DMPModel:
        return self.base.model

    def info(self, name: str) -> AdapterInfo:
        return self.base.model.adapters[name]

    def describe(self) -> str:
        return ", ".join(f"{name} ({self.info(name).task})" for name in self.adapters)

    def adapter_for(self, task: str) -> str:
        """The first adapter of `task` ('auto': the first adapter); raises listing what there is."""
        if task not in TASK_CHOICES:
            raise ValueError(f"task must be one of {TASK_CHOICES}, got {task!r}")
        if task == "auto":
            return self.adapters[0]
        for name in self.adapters:
            if self.info(name).task == task:
                return name
        raise ValueError(f"the DMP model has no {task} adapter (it has: {self.describe()}); "
                         f"add one in Load DMP Model or pick another task")

    def find(self, task: str) -> str | None:
        """The first adapter of `task`, or None."""
        return next((name for name in self.adapters if self.info(name).task == task), None)


_BASES: OrderedDict[tuple[str, tuple, str, str], BaseHandle] = OrderedDict()


@contextlib.contextmanager
def _plain_errors() -> Iterator[None]:
    """dmp_model's CheckpointError as a ValueError: ComfyUI shows an exception's full module path,
    which for a pack loaded by path is a file path."""
    try:
        yield
    except CheckpointError as err:
        raise ValueError(str(err)) from err


def _stamp(file: Path) -> tuple[int, int]:
    status = file.stat()
    return status.st_size, status.st_mtime_ns


def base_identity(path: Path) -> tuple:
    """What changes when a base's weights are replaced: (size, mtime_ns) of a single file, or of
    every file under a diffusers folder's unet/ and vae/ (by relative path, sorted)."""
    path = Path(path)
    if not path.is_dir():
        return _stamp(path)
    stamps = []
    for sub in _BASE_SUBFOLDERS:
        for folder, _subfolders, files in os.walk(path / sub):
            for name in files:
                file = Path(folder, name)
                stamps.append((file.relative_to(path).as_posix(), *_stamp(file)))
    return tuple(sorted(stamps))


def get_base(path: Path, precision: str) -> BaseHandle:
    """The cached base for (path, its files' identity, precision, ComfyUI's device), loading it
    after freeing memory; a base whose files were replaced is loaded again and the old copy dropped."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = bridge.torch_device()
    resolved = bridge.resolve_precision(precision, device)
    try:
        identity = base_identity(path)
    except OSError as err:
        raise FileNotFoundError(f"base model {os.fspath(path)!r} cannot be read: {err}") from err
    key = (str(Path(path).resolve()), identity, resolved, str(device))
    if key in _BASES:
        _BASES.move_to_end(key)
        return _BASES[key]
    for stale in [k for k in _BASES if (k[0], k[2], k[3]) == (key[0], key[2], key[3])]:
        del _BASES[stale]  # replaced files: models already handed out keep their copy until they go
    bridge.free_memory(estimate_base_bytes(path, resolved), device)
    tokenizer = bridge.sd1_tokenizer() if Path(path).is_file() else None
    with _plain_errors():
        model = DMPModel.from_pretrained(path, device=device, precision=resolved, tokenizer=tokenizer)
    handle = BaseHandle(key, model, bridge.manage(model))
    _BASES[key] = handle
    while len(_BASES) > MAX_CACHED_BASES:
        _BASES.popitem(last=False)
    logger.info("DMP: loaded base %s (%s on %s)", path, resolved, device)
    return handle


def attach_adapter(base: BaseHandle, file: Path) -> str:
    """Attach an adapter file to a base (free if already there) and return its name on the base.

    Adapters are named as DMP names them (their folder). Should another file already hold that
    name on this base, this one gets a numbered name ('depth-hypersim-notext~2'), so the other
    adapter stays as it is; the engine reads its facts (task, prompts) off its path, not its name.
    """
    resolved = str(Path(file).resolve())
    natural = adapter_files.adapter_name_for(file)
    name, number = natural, 1
    while base.files.get(name, resolved) != resolved:
        number += 1
        name = f"{natural}~{number}"
    with _plain_errors():
        base.model.load_adapter(file, name=name)
    base.files[name] = resolved
    return name


class DMPLoader:
    """Load DMP model: an SD 1.x base with up to five task adapters."""

    @classmethod
    def INPUT_TYPES(cls):
        adapters = bridge.adapter_choices()
        optional = {
            f"adapter_{i}": ([NO_ADAPTER, *adapters], {
                "default": NO_ADAPTER,
                "tooltip": "Another task adapter from models/dmp on the same base ('none' for no more)."})
            for i in range(2, MAX_ADAPTERS + 1)
        }
        return {
            "required": {
                "base": (bridge.base_choices(), {
                    "tooltip": "Stable Diffusion 1.x base (SD 1.4 or 1.5): a checkpoint from "
                               "models/checkpoints, or a diffusers folder from models/diffusers (listed as "
                               "'diffusers/<folder>')."}),
                "adapter": (adapters, {
                    "tooltip": "A DMP task adapter from models/dmp, e.g. depth-hypersim-notext/"
                               "pytorch_lora_weights.safetensors. Its task comes from the file's metadata "
                               "or its folder name (depth..., normal..., seg..., albedo..., shading...)."}),
                "precision": (list(PRECISIONS), {
                    "default": "auto",
                    "tooltip": "Weights precision; 'auto' follows ComfyUI (fp16 or bf16 on GPUs, fp32 on "
                               "the CPU)."}),
            },
            "optional": optional,
        }

    RETURN_TYPES = ("DMP_MODEL",)
    RETURN_NAMES = ("dmp_model",)
    OUTPUT_TOOLTIPS = ("The base with its adapters, for DMP Predict and DMP Predict Tasks.",)
    FUNCTION = "load"
    CATEGORY = "DMP"
    DESCRIPTION = ("Loads a Stable Diffusion 1.x base and DMP task adapters (one LoRA per task: depth, "
                   "normals, segmentation, albedo, shading). The base is loaded once and shared: other "
                   "loaders on the same base, or adding an adapter here, do not load it again.")

    def load(self, base, adapter, precision, **more_adapters):
        names = [adapter] + [more_adapters[key] for key in sorted(more_adapters)
                             if more_adapters[key] not in (None, "", NO_ADAPTER)]
        handle = get_base(bridge.resolve_base(base), precision)
        attached = [attach_adapter(handle, bridge.resolve_adapter(name)) for name in names]
        return (DMPModelView(handle, tuple(dict.fromkeys(attached))),)

    @classmethod
    def IS_CHANGED(cls, base, adapter, precision, **more_adapters):
        """The files' identities (sizes, modification times), so that a replaced file is loaded again."""
        files = [(bridge.resolve_base, base_identity, base), (bridge.resolve_adapter, _stamp, adapter)]
        files += [(bridge.resolve_adapter, _stamp, v) for v in more_adapters.values() if v != NO_ADAPTER]
        stamps = []
        for resolve, identity, name in files:
            try:
                stamps.append((name, identity(resolve(name))))
            except (OSError, ValueError, RuntimeError):
                stamps.append((name, None))  # load() reports the problem
        return repr(stamps)
