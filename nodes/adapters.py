"""DMP task adapters on core's MODEL: Load DMP Adapter, and the DMP_MODEL socket it feeds.

A DMP adapter is a LoRA; it is applied with ComfyUI's own LoRA patching to a clone of the MODEL a
core loader made (Load Checkpoint, Load Diffusion Model with fp8 weights, ...), so the base's
weights exist once, whatever the number of adapters, and ComfyUI's memory management owns them.
What the prediction nodes also need to know (task, parametrisation, prompts, target scale,
normal convention: the engine's ``AdapterInfo``) travels beside the patched MODEL.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ..dmp_model.adapters import AdapterInfo, OpenedAdapter, adapter_name, open_adapter, portable_lora_state_dict
from ..dmp_model.io.weight_files import CheckpointError
from ..dmp_model.options import check_option
from ..dmp_model.tasks.codecs import TASKS
from . import comfy_bridge as bridge
from .common import CATEGORY

logger = logging.getLogger(__name__)

TASK_CHOICES = ("auto", *TASKS)


@dataclass(frozen=True)
class LoadedAdapter:
    """One adapter on the base: its name in this DMP_MODEL, its facts, the patched MODEL clone."""

    name: str
    info: AdapterInfo
    model: object
    file: str
    strength: float


@dataclass(frozen=True)
class DMPAdapters:
    """What a DMP_MODEL socket carries: adapters, in the order they were added, on one base MODEL."""

    adapters: tuple[LoadedAdapter, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(adapter.name for adapter in self.adapters)

    def get(self, name: str) -> LoadedAdapter:
        return next(adapter for adapter in self.adapters if adapter.name == name)

    def get_models(self) -> list:
        """The patched MODEL clones: how newer cores find the models held by a node's outputs, to keep them
        in use for the whole prompt (``PromptModelTracker``); 0.3.x cores never ask."""
        return [adapter.model for adapter in self.adapters]

    def describe(self) -> str:
        return ", ".join(f"{a.name} ({a.info.task})" for a in self.adapters)

    def find(self, task: str) -> LoadedAdapter | None:
        """The first adapter of `task`, or None."""
        return next((adapter for adapter in self.adapters if adapter.info.task == task), None)

    def adapter_for(self, task: str) -> LoadedAdapter:
        """The first adapter of `task` ('auto': the first adapter); raises listing what there is."""
        check_option("task", task, TASK_CHOICES)
        found = self.adapters[0] if task == "auto" else self.find(task)
        if found is None:
            raise ValueError(f"the DMP model has no {task} adapter (it has: {self.describe()}); add one with "
                             "Load DMP Adapter or pick another task")
        return found

    def with_adapter(self, adapter: LoadedAdapter) -> DMPAdapters:
        """A new DMP_MODEL with `adapter` added, or in place of the one of its name (the input is never
        changed: other nodes may hold it)."""
        if adapter.name in self.names:
            return DMPAdapters(tuple(adapter if a.name == adapter.name else a for a in self.adapters))
        return DMPAdapters((*self.adapters, adapter))

    def name_for(self, opened: OpenedAdapter) -> str:
        """The engine's naming policy (``adapters.adapter_name``) among the adapters of this DMP_MODEL."""
        return adapter_name(opened.name, opened.file, {a.name: a.file for a in self.adapters})


def load_adapter(model, path: str, strength: float, task: str = "auto") -> tuple[OpenedAdapter, bridge.PatchedLoRA]:
    """Open an adapter file (any layout) with its facts, and patch a clone of `model` with it."""
    check_option("task", task, TASK_CHOICES)
    try:
        opened = open_adapter(path, {} if task == "auto" else {"task": task})
    except CheckpointError as err:  # ComfyUI shows an exception's module path: a file path for this pack
        raise ValueError(str(err)) from err
    return opened, bridge.apply_lora(model, portable_lora_state_dict(opened.tensors, opened.metadata), strength)


def warn_about_extras(model) -> None:
    """Log what a MODEL carries that DMP's adapters were not trained with: weight patches change every
    prediction; patches, wrappers and hooks are not applied (``comfy_bridge.ignored_model_options``)."""
    patched = bridge.weight_patch_count(model)
    if patched:
        logger.warning("DMP: this MODEL already carries weight patches on %d weights (a LoRA chained before Load "
                       "DMP Adapter?). They change every DMP prediction: DMP adapters were trained on the plain "
                       "SD 1.x base, so wire the checkpoint loader's MODEL to Load DMP Adapter.", patched)
    ignored = bridge.ignored_model_options(model)
    if ignored:
        logger.warning("DMP: this MODEL carries %s; DMP runs the bare UNet and does not apply them (they are made "
                       "for image generation, and DMP's adapters were trained without them).", ", ".join(ignored))


class DMPLoadAdapter:
    """Load DMP Adapter: a task adapter applied to core's MODEL with ComfyUI's LoRA patching."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "An SD 1.x MODEL from a core loader (Load Checkpoint, Load "
                                               "Diffusion Model, ...): the same one your generation uses. "
                                               "Wire the loader's own MODEL: a LoRA chained before this node "
                                               "changes every prediction (DMP adapters were trained on the "
                                               "plain base); patches and wrappers (IPAdapter, PAG, FreeU, "
                                               "...) are not applied to DMP."}),
                "adapter": (bridge.adapter_choices(), {
                    "tooltip": "A DMP task adapter from models/dmp (DMP's layout: depth-hypersim-notext/"
                               "pytorch_lora_weights.safetensors) or models/loras. Its task comes from the "
                               "file's metadata or its folder name (depth..., normal..., seg..., albedo..., "
                               "shading...)."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.05,
                                       "tooltip": "LoRA strength; DMP's adapters were trained for 1."}),
                "task": (list(TASK_CHOICES), {
                    "default": "auto",
                    "tooltip": "What the adapter predicts; auto reads it from the file's metadata or name. Set "
                               "it for a renamed file without metadata."}),
            },
            "optional": {
                "dmp_model": ("DMP_MODEL", {"tooltip": "Adapters loaded before on the same MODEL: this one is "
                                                       "added to them (for DMP Predict Tasks)."}),
            },
        }

    RETURN_TYPES = ("DMP_MODEL",)
    RETURN_NAMES = ("dmp_model",)
    OUTPUT_TOOLTIPS = ("The MODEL with this adapter (and the ones before), for DMP Predict and DMP Predict "
                       "Tasks.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Applies a DMP task adapter (a LoRA: depth, normals, segmentation, albedo or shading) to an "
                   "SD 1.x MODEL with ComfyUI's own LoRA patching. The base is not copied: every adapter is a "
                   "patch on the MODEL your checkpoint loader already holds. Chain several through dmp_model.")

    def load(self, model, adapter, strength, task="auto", dmp_model=None):
        bridge.check_sd1_model(model)
        warn_about_extras(model)
        if dmp_model is not None and dmp_model.adapters[0].model.model is not model.model:
            raise ValueError("the dmp_model input holds adapters on another MODEL; chain adapters of one base "
                             "model only (wire the same checkpoint loader's MODEL to every Load DMP Adapter)")
        path = bridge.resolve_adapter(adapter)
        opened, patched = load_adapter(model, path, strength, task)
        previous = dmp_model or DMPAdapters(())
        loaded = LoadedAdapter(previous.name_for(opened), opened.info, patched.model, path, strength)
        return (previous.with_adapter(loaded),)

    @classmethod
    def IS_CHANGED(cls, adapter, **_widgets):
        """The adapter file's size and modification time, so that a replaced file is read again
        (ComfyUI passes the widget values only)."""
        try:
            status = os.stat(bridge.resolve_adapter(adapter))
            return f"{adapter}:{status.st_size}:{status.st_mtime_ns}"
        except (OSError, RuntimeError):
            return adapter  # load() reports the problem
