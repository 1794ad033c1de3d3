"""The one module of the pack that talks to ComfyUI: model folders, its MODEL/VAE/CLIP, memory, progress.

Every other module of the pack reaches ComfyUI only through these functions, so the pack imports
(and its tests run) without ComfyUI. Where ComfyUI's modules are absent, lists are empty and
anything that needs ComfyUI raises a RuntimeError saying so.

DMP runs on what ComfyUI loaded: the ``MODEL`` of a core loader (its ``ModelPatcher``: core LoRA
patching, low-VRAM partial loading, fp16/bf16/fp8 weights), the ``VAE`` and the ``CLIP``. Nothing
here loads a model file of its own.

One pack for every core from 0.3.64 on: surfaces that newer cores added are feature-tested where
they are used (``getattr``/``hasattr``), never by version numbers, and an optional module that moved
or vanished (any ``ImportError``) leaves the pack working without it.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from dataclasses import dataclass

import torch

from ..dmp_model.adapters import fit_error, lora_modules, offered_as_adapter, shape_problem

try:
    import folder_paths
except ImportError:  # plain Python: no ComfyUI
    folder_paths = None
try:
    import comfy.lora as comfy_lora
    import comfy.model_management as model_management
    import comfy.utils as comfy_utils
except ImportError:
    comfy_lora = model_management = comfy_utils = None
try:  # converts a few trainers' LoRA layouts before core's key maps apply; optional (any core may move it)
    from comfy.lora_convert import convert_lora
except ImportError:
    convert_lora = None
# Where cores keep the marker for outputs that block their users: graph_utils (0.3.x), graph (newer).
EXECUTION_BLOCKER_MODULES = ("comfy_execution.graph_utils", "comfy_execution.graph")

logger = logging.getLogger(__name__)

ADAPTER_FOLDER = "dmp"
# Adapter files are looked for here too: LoRAs trained with `dmp train` or converted by users.
LORA_FOLDER = "loras"
# ComfyUI's model configuration class of SD 1.x (comfy.supported_models.SD15): DMP's base.
SD1_MODEL_CONFIG = "SD15"


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


def _folders() -> tuple[str, ...]:
    return tuple(name for name in (ADAPTER_FOLDER, LORA_FOLDER) if name in folder_paths.folder_names_and_paths)


def adapter_choices() -> list[str]:
    """Adapter files of models/dmp, then those of models/loras not already listed, as paths relative
    to their folder (DMP's release layout: 'depth-hypersim-notext/pytorch_lora_weights.safetensors').
    Training leftovers (checkpoints/step-*/state.pt, optimizer.bin, ...) are not offered."""
    if folder_paths is None:
        return []
    names: dict[str, None] = {}
    for folder in _folders():
        names.update((name, None) for name in folder_paths.get_filename_list(folder) if offered_as_adapter(name))
    return list(names)


def resolve_adapter(name: str) -> str:
    """The file of an adapter listed by ``adapter_choices`` (models/dmp first)."""
    _require()
    for folder in _folders():
        path = folder_paths.get_full_path(folder, name)
        if path is not None:
            return path
    searched = [p for folder in _folders() for p in folder_paths.get_folder_paths(folder)]
    raise FileNotFoundError(f"DMP adapter {name!r} not found in {searched}; put adapters in models/dmp in DMP's "
                            "layout (e.g. depth-hypersim-notext/pytorch_lora_weights.safetensors) or in "
                            "models/loras, then refresh")


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


# Core's MODEL, VAE and CLIP -------------------------------------------------------------------

def model_family(model) -> str:
    """ComfyUI's name for the family of a MODEL (its model configuration class: SD15, SDXL, Flux, ...)."""
    config = getattr(getattr(model, "model", None), "model_config", None)
    return type(config).__name__ if config is not None else type(model).__name__


def check_sd1_model(model) -> None:
    """Refuse a MODEL that is not an SD 1.x UNet with 4 input channels, naming what it is."""
    if not hasattr(model, "clone") or not hasattr(getattr(model, "model", None), "diffusion_model"):
        raise ValueError(f"expected a MODEL from a core loader (Load Checkpoint, Load Diffusion Model, ...), "
                         f"got {type(model).__name__}")
    family = model_family(model)
    if family != SD1_MODEL_CONFIG:
        raise ValueError(f"DMP needs a Stable Diffusion 1.x model (SD 1.4 or 1.5), but this MODEL is {family}; "
                         "load an SD 1.5 checkpoint (e.g. v1-5-pruned-emaonly) with Load Checkpoint")
    channels = model.model.model_config.unet_config.get("in_channels", 4)
    if channels != 4:
        raise ValueError(f"DMP needs a plain SD 1.x model with 4 input channels; this one has {channels} "
                         "(an inpainting or instruct-pix2pix model): use the base SD 1.5 checkpoint")


def check_sd1_vae(vae) -> None:
    """Refuse a VAE that is not SD 1.x's kind (4 latent channels, 8x downscaling)."""
    if not hasattr(vae, "first_stage_model") or not hasattr(vae, "patcher"):
        raise ValueError(f"expected a VAE from a core loader, got {type(vae).__name__}")
    channels, ratio = getattr(vae, "latent_channels", None), getattr(vae, "downscale_ratio", None)
    if channels != 4 or ratio != 8:
        raise ValueError(f"DMP needs the SD 1.x VAE (4 latent channels, 8x smaller), but this VAE has {channels} "
                         f"channels and ratio {ratio!r} (SDXL/SD3/Flux/video VAEs differ): wire the VAE of the "
                         "SD 1.5 checkpoint")


def context_width(model) -> int:
    """The cross-attention width the MODEL's UNet expects (768 for SD 1.x)."""
    return int(model.model.model_config.unet_config["context_dim"])


@dataclass(frozen=True)
class PatchedLoRA:
    """A MODEL clone carrying one adapter's weight patches, and what was patched."""

    model: object
    patched: int


def apply_lora(model, lora: dict[str, torch.Tensor], strength: float) -> PatchedLoRA:
    """ComfyUI's own LoRA patching (what ``comfy.sd.load_lora_for_models`` does for the model):
    a clone of `model` with the LoRA's weight patches; the base weights are shared, never copied.

    Raises a ValueError when a LoRA module fits no layer of this model or has the wrong shape: ComfyUI
    itself would only log that and silently skip it.
    """
    _require()
    key_map = comfy_lora.model_lora_keys_unet(model.model, {})
    lora = convert_lora(lora) if convert_lora is not None else lora
    patches = comfy_lora.load_lora(lora, key_map, log_missing=False)
    modules = set(lora_modules(lora))
    problems = _shape_problems(model, patches)
    if len(patches) < len(modules) or problems:
        unmatched = sorted(modules - {key for key in key_map if key_map[key] in patches})
        raise fit_error(len(modules), [f"{name}: no such layer in this model" for name in unmatched] + problems)
    clone = model.clone()
    patched = clone.add_patches(patches, strength)
    return PatchedLoRA(clone, len(patched))


def _shape_problems(model, patches: dict) -> list[str]:
    """Patches whose up/down matrices do not fit the weight they patch."""
    shapes = {key: tuple(value.shape) for key, value in model.model.state_dict().items()}
    problems = []
    for key, patch in patches.items():
        weights = getattr(patch, "weights", None)
        if weights is None or key not in shapes or len(shapes[key]) != 2:
            continue
        up, down = weights[0], weights[1]
        if problem := shape_problem(key, down.shape[-1], up.shape[0], shapes[key][1], shapes[key][0]):
            problems.append(problem)
    return problems


def is_out_of_memory(error: BaseException) -> bool:
    """Whether core counts `error` as running out of memory: its ``is_oom`` where the core has one (newer
    cores also count a ``torch.AcceleratorError`` saying so), else its ``OOM_EXCEPTION``."""
    check = getattr(model_management, "is_oom", None)
    if check is not None:
        return bool(check(error))
    return isinstance(error, model_management.OOM_EXCEPTION)


def device_context(device: torch.device):
    """Core's ``cuda_device_context`` (newer cores run VAE and CLIP work in it, so that kernels of a second
    GPU see their own device), or nothing where the core has none."""
    context = getattr(model_management, "cuda_device_context", None)
    return context(device) if context is not None else contextlib.nullcontext()


def is_dynamic(model) -> bool:
    """Whether a patcher loads its weights per operation (newer cores' dynamic VRAM, ``ModelPatcherDynamic``)."""
    return bool(getattr(model, "is_dynamic", lambda: False)())


def compute_dtype(base) -> torch.dtype:
    """The dtype the UNet computes in: the manual-cast dtype for fp8 weights, else the weights' own."""
    if hasattr(base, "get_dtype_inference"):  # newer cores name this rule
        return base.get_dtype_inference()
    return base.manual_cast_dtype if getattr(base, "manual_cast_dtype", None) is not None else base.get_dtype()


def unet_options(model) -> dict:
    """A new ``transformer_options`` dict for one UNet call.

    Never the UNet's own default: core's UNet writes into the dict it gets (block indices, shapes), and
    its default is one dict shared by every call. The MODEL's patches, wrappers and hooks are left out
    on purpose (``ignored_model_options``); only core's dynamic-VRAM prefetch flag goes in, as core's
    ``apply_model`` sets it.
    """
    return {"prefetch_dynamic_vbars": True} if is_dynamic(model) else {}


# The MODEL options that generation nodes add and DMP does not apply (see ``ignored_model_options``).
SAMPLER_MODEL_OPTIONS = ("model_function_wrapper", "sampler_cfg_function", "sampler_post_cfg_function",
                         "sampler_pre_cfg_function", "sampler_calc_cond_batch_function", "denoise_mask_function")
TRANSFORMER_PATCH_OPTIONS = ("patches", "patches_replace", "wrappers", "callbacks")


def ignored_model_options(model) -> list[str]:
    """What a MODEL carries besides weights that DMP leaves out: attention and block patches, wrappers,
    hooks and sampler functions (from IPAdapter, PAG, FreeU, hypernetwork, sampling-shift nodes...).

    DMP's adapters were trained on the plain SD 1.x UNet, and these change what it computes for image
    generation; they also expect core's sampler around them (sigmas, cond/uncond rows in their options),
    which DMP's sampler is not. So DMP calls the bare UNet, and says what it left out.
    """
    options = getattr(model, "model_options", {}) or {}
    transformer = options.get("transformer_options", {}) or {}
    found = [name for name in SAMPLER_MODEL_OPTIONS if options.get(name) is not None]
    found += [f"transformer_options[{name!r}]" for name in TRANSFORMER_PATCH_OPTIONS if transformer.get(name)]
    for attribute in ("wrappers", "callbacks", "hook_patches"):
        if getattr(model, attribute, None):
            found.append(attribute)
    return found


def weight_patch_count(model) -> int:
    """How many weights of a MODEL carry patches already (a LoRA chained before Load DMP Adapter)."""
    return sum(1 for patches in (getattr(model, "patches", None) or {}).values() if patches)


def check_finite(values: torch.Tensor, stage: str, advice: str) -> torch.Tensor:
    """`values`, or a RuntimeError naming the stage when they hold NaN or infinity (a black or garbage map
    otherwise)."""
    if not bool(torch.isfinite(values).all()):
        raise RuntimeError(f"DMP: the {stage} gave NaN or infinite values, so the prediction would be black or "
                           f"garbage. {advice}")
    return values


UNET_ADVICE = ("Try ComfyUI's --disable-dynamic-vram (newer cores), or load the model in fp32 (--force-fp32) or "
               "bf16; check that the checkpoint and adapter are not corrupt.")
VAE_ADVICE = ("Try an fp32 VAE (ComfyUI's --fp32-vae), or --disable-dynamic-vram on newer cores (a known core "
              "issue decodes NaN on warm models).")


def load_for_sampling(model, latent_shape: tuple[int, ...]) -> torch.device:
    """Let ComfyUI load (and patch) `model` for UNet batches of `latent_shape`, freeing others as needed;
    low-VRAM partial loading applies as in core's samplers. Returns the device to compute on."""
    _require()
    # The patcher's estimate where it has one (newer dynamic patchers add their own margin to the model's).
    estimate = getattr(model, "memory_required", None) or model.model.memory_required
    model_management.load_models_gpu([model], memory_required=estimate(latent_shape))
    return model.load_device


def call_unet(model, x: torch.Tensor, t: int, context: torch.Tensor) -> torch.Tensor:
    """The raw UNet output (the adapter's parametrisation) for latents [b, 4, h, w] at integer timestep t.

    ComfyUI's ``apply_model`` would turn the output into a denoised estimate under its own sampling
    (sigmas); DMP's sampler needs the output itself, so the diffusion model is called directly, the
    way ``apply_model`` calls it: inputs in the compute dtype (the manual-cast dtype for fp8
    weights), float timesteps, a transformer_options dict of its own, output as float32.
    """
    base = model.model
    dtype, device = compute_dtype(base), model.load_device
    timesteps = torch.full((x.shape[0],), float(t), device=device)
    with device_context(device):
        output = base.diffusion_model(x.to(device, dtype), timesteps, context=context.to(device, dtype),
                                      transformer_options=unet_options(model))
    return check_finite(output.float(), f"UNet (step at t={t})", UNET_ADVICE)


def vae_encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    """ComfyUI's VAE encode (deterministic: the distribution's mode) of pixels [b, 3, H, W] in [0, 1]."""
    latents = vae.encode(pixels.movedim(1, -1)).float()
    return check_finite(latents, "VAE encoder", VAE_ADVICE)


def vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """ComfyUI's VAE model, loaded by its memory management, decoding [b, 4, h, w] to [b, 3, H, W].

    ``VAE.decode`` clamps its IMAGE to [0, 1], but DMP's task codecs read the decoder's own output
    (depth beyond the target scale, unclamped normals), so the decoder is called here as ``VAE.decode``
    calls it. Out of memory (whatever the core counts as such), the batch is halved; a single image
    falls back to ComfyUI's tiled decode (whose output is clamped: logged).
    """
    _require()
    memory = vae.memory_used_decode(latents.shape, vae.vae_dtype)
    model_management.load_models_gpu([vae.patcher], memory_required=memory,
                                     force_full_load=getattr(vae, "disable_offload", False))
    decoded = None
    try:
        with torch.no_grad(), device_context(vae.device):
            decoded = vae.first_stage_model.decode(latents.to(vae.device, vae.vae_dtype))
    except Exception as error:  # whatever the core counts as out of memory; anything else goes on up
        if not is_out_of_memory(error):
            raise
    if decoded is not None:
        return check_finite(decoded.to(vae.output_device).float(), "VAE decoder", VAE_ADVICE)
    model_management.soft_empty_cache(True)  # the failed batch's tensors were freed with the exception
    if latents.shape[0] > 1:
        half = latents.shape[0] // 2
        return torch.cat([vae_decode(vae, latents[:half]), vae_decode(vae, latents[half:])])
    logger.warning("DMP: out of memory decoding one image; using ComfyUI's tiled VAE decode, which clamps the "
                   "decoded values (depth beyond the adapter's target scale is cut)")
    decoded = vae.decode_tiled(latents).movedim(-1, 1).float() * 2 - 1
    return check_finite(decoded, "VAE decoder (tiled)", VAE_ADVICE)


def clip_encode(clip, text: str) -> torch.Tensor:
    """A prompt's embedding [1, 77k, D] with the CLIP the user wired in (as core's CLIP Text Encode)."""
    return clip.encode_from_tokens(clip.tokenize(text)).float()


# Progress, cancel, blocked outputs ----------------------------------------------------------

class Progress:
    """A ``callback(done, total)`` for dmp_model: ComfyUI's progress bar, and its interrupt."""

    def __init__(self):
        _require()
        model_management.throw_exception_if_processing_interrupted()
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        model_management.throw_exception_if_processing_interrupted()
        if self.bar is None:
            self.bar = comfy_utils.ProgressBar(total)
        self.bar.update_absolute(done, total)


def soft_empty_cache() -> None:
    model_management.soft_empty_cache()


def execution_blocker():
    """Core's ExecutionBlocker class, or None in a core without it."""
    for module in EXECUTION_BLOCKER_MODULES:
        try:
            return importlib.import_module(module).ExecutionBlocker
        except (ImportError, AttributeError):
            continue
    return None


def blocked(message: str):
    """An output that stops the nodes using it with `message` (None in ComfyUI versions without it)."""
    blocker = execution_blocker()
    return blocker(message) if blocker is not None else None
