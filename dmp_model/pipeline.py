"""DMPModel: an SD 1.x base with named task adapters, and prediction from images.

    model = DMPModel.from_pretrained("sd15/", device="cpu")
    model.load_adapter("ckpt/depth-hypersim-notext")           # name, task... from the folder
    result = model.predict(images, "depth-hypersim-notext")    # Prediction: raw metres + visual

One VAE encode serves any number of adapters (``predict_tasks``); switching adapter never
reloads the base.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from collections.abc import Callable, Sequence

import torch

from . import adapters as adapter_files
from .adapters import AdapterInfo
from .colormaps import COLORMAPS
from .denoiser import AdapterDenoiser
from .imageproc import frame_batch, processing_size, to_image_batch, unframe
from .loading import BaseComponents, load_base
from .sampling import (FINAL_OUTPUTS, PREDICTION_TYPES, SAMPLERS, schedule_from_config,
                       get_timesteps, sample_dmp)
from .tasks import get_codec
from .text import TextConditioner, cache_file_for

logger = logging.getLogger(__name__)

DEFAULT_GUIDANCE = 2.0
# Several tasks at once: adapters in turn on the same latents, or all in one UNet batch.
TASK_BATCHING = ("sequential", "batched")
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class PredictOptions:
    """Sampler and processing settings.

    Attributes:
        steps: UNet calls per image (per guidance pair), 1..1000; DMP uses 5.
        sampler: "ddim" (standard, the reference's default) or "oracle" (x_hat = input latent).
        spacing: "leading" (801, 601, ... for 5 steps, as the reference) or "trailing" (999 first).
        processing_resolution: shorter side in pixels during prediction (reference: 512); 0 = native.
        guidance_scale: classifier-free guidance with a prompt (None: 2.0, as DMP).
        final_output: "z" (the reference's last latent) or "y_hat" (the last step's estimate of y).
        batch_size: images per UNet batch.
        prediction_type: override the adapter's parametrisation (one of PREDICTION_TYPES).
        colormap: depth visual colormap (one of COLORMAPS).
        task_batching: for several adapters, "sequential" (one after the other) or "batched"
            (all in the same UNet batch, peft's mixed-adapter LoRA; adapters must share a
            prediction type).
    """

    steps: int = 5
    sampler: str = "ddim"
    spacing: str = "leading"
    processing_resolution: int = 512
    guidance_scale: float | None = None
    final_output: str = "z"
    batch_size: int = 4
    prediction_type: str | None = None
    colormap: str = "Spectral"
    task_batching: str = "sequential"

    def __post_init__(self):
        get_timesteps(self.steps, self.spacing)
        processing_size(8, 8, self.processing_resolution)
        adapter_files.check_option("sampler", self.sampler, SAMPLERS)
        adapter_files.check_option("final_output", self.final_output, FINAL_OUTPUTS)
        adapter_files.check_option("colormap", self.colormap, COLORMAPS)
        adapter_files.check_option("task_batching", self.task_batching, TASK_BATCHING)
        if self.prediction_type is not None:
            adapter_files.check_option("prediction_type", self.prediction_type, PREDICTION_TYPES)
        if self.guidance_scale is not None and not (
                isinstance(self.guidance_scale, (int, float)) and math.isfinite(self.guidance_scale)):
            raise ValueError(f"guidance_scale must be a finite number or None, got {self.guidance_scale!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")

    def updated(self, **changes) -> PredictOptions:
        """A copy with some settings changed; unknown names raise a TypeError listing the valid ones."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"unknown prediction settings {sorted(unknown)}; valid: {[f.name for f in fields(self)]}")
        return replace(self, **changes)


@dataclass
class Prediction:
    """One adapter's result for a batch of images, at the input size, on the CPU.

    Attributes:
        adapter: the adapter's name; ``info`` its facts (task, conventions).
        raw: the task's values (see ``tasks.py``: metres, unit normals, class ids, ...).
        visual: float32 [B, H, W, 3] in [0, 1], a preview of raw.
        latents: final latents [B, 4, h, w] when asked for (``return_latents=True``).
        input_latents: the input image latents [B, 4, h, w] when asked for.
    """

    adapter: str
    info: AdapterInfo
    raw: torch.Tensor
    visual: torch.Tensor
    latents: torch.Tensor | None = None
    input_latents: torch.Tensor | None = None

    @property
    def task(self) -> str:
        return self.info.task


@dataclass(frozen=True)
class _LoadedAdapter:
    info: AdapterInfo
    file: Path
    stamp: tuple
    layers: int


class DMPModel:
    """An SD 1.x base (UNet, VAE, lazy text encoder) carrying named DMP task adapters."""

    def __init__(self, components: BaseComponents, cache_dir: str | os.PathLike | None = None):
        self.unet, self.vae = components.unet, components.vae
        self.source = components.source
        self.device, self.dtype = components.device, components.dtype
        self.scheduler_config = components.scheduler_config
        self.schedule = schedule_from_config(components.scheduler_config)
        self.text = TextConditioner(components.load_text_encoder, components.load_tokenizer, self.device,
                                    self.dtype, cache_file_for(components.source, cache_dir))
        self._adapters: dict[str, _LoadedAdapter] = {}

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "auto",
                        precision: str = "auto", config: str | os.PathLike | None = None,
                        tokenizer: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                        adapters: Sequence[str | os.PathLike] = ()) -> DMPModel:
        """Load a base (diffusers folder or single SD 1.x file) and optionally some adapters.

        Args:
            path: diffusers folder, or .safetensors/.ckpt in the original layout.
            device: 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'.
            precision: 'auto' (fp16 on GPU, fp32 on CPU), 'fp32', 'fp16', 'bf16'.
            config: diffusers config folder for a single file (default: bundled SD 1.x configs).
            tokenizer: CLIP tokenizer folder; only prompts need one.
            cache_dir: where the empty-prompt embedding is cached between runs (None: memory only).
            adapters: adapter files or folders to load, named after them.
        """
        model = cls(load_base(path, device, precision, config, tokenizer), cache_dir)
        for adapter in adapters:
            model.load_adapter(adapter)
        return model

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """The base's alphas_cumprod [1000] (what training's interpolation uses too)."""
        return self.schedule.alphas_cumprod

    # Adapters -------------------------------------------------------------------------------

    @property
    def adapters(self) -> dict[str, AdapterInfo]:
        """Loaded adapters by name."""
        return {name: loaded.info for name, loaded in self._adapters.items()}

    def load_adapter(self, path: str | os.PathLike, name: str | None = None, **overrides) -> AdapterInfo:
        """Attach an adapter (DMP, peft or kohya layout); reloading the same file is free.

        Args:
            path: adapter file or folder.
            name: adapter name (default: the folder name for DMP's layout, else the file stem).
            overrides: AdapterInfo fields that take precedence over metadata and name (e.g. task="depth").

        Returns:
            the adapter's AdapterInfo.
        """
        file = adapter_files.resolve_adapter_file(path)
        natural_name = adapter_files.adapter_name_for(path)  # DMP's names carry the task: read them off the path
        name = name or natural_name
        stamp = (str(file.resolve()), file.stat().st_size, file.stat().st_mtime_ns)
        loaded = self._adapters.get(name)
        if loaded is not None and loaded.stamp == stamp:
            info = adapter_files.with_overrides(loaded.info, **overrides)
            self._adapters[name] = replace(loaded, info=info)
            return info
        tensors, metadata, file = adapter_files.read_adapter(file)
        peft_tensors = adapter_files.to_peft_state_dict(tensors, self.unet.config, adapter_files.peft_alpha(metadata))
        info = adapter_files.resolve_info(natural_name, metadata, peft_tensors, overrides)
        adapter_files.check_adapter_fits(peft_tensors, self.unet)  # before an adapter it replaces is dropped
        peft_tensors = {k: v.to(self.device, self.dtype) for k, v in peft_tensors.items()}
        if loaded is not None:
            self.remove_adapter(name)
        layers = adapter_files.attach_adapter(self.unet, peft_tensors, name)
        self._adapters[name] = _LoadedAdapter(info, file, stamp, layers)
        logger.info("loaded adapter %r from %s: %d layers, task %s", name, file, layers, info.task)
        return info

    def register_adapter(self, name: str, info: AdapterInfo) -> AdapterInfo:
        """Use an adapter already attached to the UNet by peft (a trainer's ``unet.add_adapter``) by name.

        Its weights stay live: ``predict`` follows them as they train. Raises if the UNet has no
        LoRA layers named `name`.
        """
        if not isinstance(info, AdapterInfo):
            raise TypeError(f"info must be an AdapterInfo, got {type(info).__name__}")
        layers = adapter_files.count_adapter_layers(self.unet, name)
        if not layers:
            raise ValueError(f"the UNet has no LoRA layers of adapter {name!r}; attach it first (unet.add_adapter)")
        self._adapters[name] = _LoadedAdapter(info, Path(), (), layers)
        return info

    def remove_adapter(self, name: str) -> None:
        """Detach an adapter."""
        self._require_adapter(name)
        self.unet.delete_adapters(name)
        del self._adapters[name]

    def _require_adapter(self, name: str | None) -> str:
        if name is None:
            if len(self._adapters) == 1:
                return next(iter(self._adapters))
            raise ValueError(f"name the adapter to use; loaded: {sorted(self._adapters) or 'none'}")
        if name not in self._adapters:
            hint = f"loaded: {sorted(self._adapters)}" if self._adapters else "no adapter is loaded (load_adapter)"
            raise ValueError(f"unknown adapter {name!r}; {hint}")
        return name

    # Stages ---------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, H, W] in [-1, 1] -> latents [B, 4, H/8, W/8]: the distribution's mean, scaled."""
        posterior = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        return posterior.mean * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, 4, h, w] -> pixels [B, 3, 8h, 8w], nominally in [-1, 1]."""
        return self.vae.decode(latents.to(self.device, self.dtype) / self.vae.config.scaling_factor).sample

    def context(self, info: AdapterInfo, batch: int, prompt: str | Sequence[str] | None = None,
                prompt_embeds: torch.Tensor | None = None, guidance_scale: float | None = None
                ) -> tuple[torch.Tensor, float | None]:
        """Text context for the UNet and the guidance scale (None: a single call per step).

        `-notext` adapters (``uses_prompts`` False) always get the empty-prompt embedding, one call
        per step, as the reference's ``disable_prompts``; so do prompted adapters when no prompt is
        given. With a prompt (text, or embeddings [1 or B, L, D] such as ComfyUI's CLIP Text Encode
        output) a prompted adapter gets (cond; uncond) for classifier-free guidance (DMP: scale 2).
        """
        empty = self.text.empty_embedding()
        if (prompt is None and prompt_embeds is None) or not info.uses_prompts:
            return empty.expand(batch, -1, -1), None
        if prompt is not None:
            cond = self.text.encode([prompt] if isinstance(prompt, str) else list(prompt))
        else:
            cond = prompt_embeds
        cond = cond.to(self.device, self.dtype).expand(batch, -1, -1)
        scale = DEFAULT_GUIDANCE if guidance_scale is None else float(guidance_scale)
        if scale == 1.0:
            return cond, None
        uncond = empty.repeat(1, cond.shape[1] // empty.shape[1], 1).expand(batch, -1, -1)
        return torch.cat([cond, uncond]), scale

    def _check_conditioning(self, names: Sequence[str], batch: int, prompt, prompt_embeds) -> None:
        """Refuse prompt counts or embedding shapes that do not fit the batch, before any work."""
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass either prompt or prompt_embeds, not both")
        if prompt is not None:
            count = 1 if isinstance(prompt, str) else len(prompt)
            if count not in (1, batch):
                raise ValueError(f"give one prompt or one per image ({batch}), got {count}")
        if prompt_embeds is not None:
            width, length = self.unet.config.cross_attention_dim, self.text.empty_embedding().shape[1]
            if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.ndim != 3:
                raise ValueError("prompt_embeds must be a tensor [B, L, D]")
            if prompt_embeds.shape[-1] != width or prompt_embeds.shape[1] % length:
                raise ValueError(f"prompt_embeds of shape {tuple(prompt_embeds.shape)} do not fit this model, "
                                 f"which expects [B, {length}*k, {width}] (an SD 1.x CLIP text encoder output)")
            if prompt_embeds.shape[0] not in (1, batch):
                raise ValueError(f"prompt_embeds must have 1 or {batch} rows, got {prompt_embeds.shape[0]}")
        prompted = prompt is not None or prompt_embeds is not None
        for name in names:
            if prompted != self._adapters[name].info.uses_prompts:
                logger.info("adapter %r %s", name, "takes no prompt (trained without); the prompt is not used"
                            if prompted else "was trained with prompts; none given, using the empty prompt")

    def sample(self, latents: torch.Tensor, adapter: str | None = None, options: PredictOptions | None = None,
               *, prompt: str | Sequence[str] | None = None, prompt_embeds: torch.Tensor | None = None,
               callback: ProgressCallback | None = None, **settings) -> torch.Tensor:
        """Run the DMP sampler from input latents [B, 4, h, w] to prediction latents, one adapter.

        Args:
            latents: input image latents (``encode``'s output).
            adapter: adapter name (optional when only one is loaded).
            options: PredictOptions; keyword `settings` override its fields.
            prompt, prompt_embeds: optional conditioning (see ``context``).
            callback: ``callback(done, total)`` after every step; may raise to interrupt.

        Returns:
            final latents [B, 4, h, w] (in the model's dtype, on its device).
        """
        options = (options or PredictOptions()).updated(**settings)
        name = self._require_adapter(adapter)
        self._check_conditioning([name], latents.shape[0], prompt, prompt_embeds)
        progress = _Progress(callback, options.steps * math.ceil(latents.shape[0] / options.batch_size))
        latents = latents.to(self.device, self.dtype)
        return self._sample(latents, [name], options, prompt, prompt_embeds, progress)[0]

    def _sample(self, latents, names, options, prompt, prompt_embeds, progress) -> list[torch.Tensor]:
        """Final latents for each adapter in `names`, which run together in one batch if several."""
        infos = [self._adapters[name].info for name in names]
        prediction_type = options.prediction_type or infos[0].prediction_type
        schedule = self.schedule
        timesteps = get_timesteps(options.steps, options.spacing, schedule.alphas_cumprod.shape[0],
                                  schedule.steps_offset)
        if len(names) == 1:
            self.unet.set_adapter(names[0])
        outputs = []
        for start in range(0, latents.shape[0], options.batch_size):
            x = latents[start:start + options.batch_size]                          # [b, 4, h, w]
            context, scale = self.context(infos[0], x.shape[0], _rows(prompt, start, x.shape[0]),
                                          _rows(prompt_embeds, start, x.shape[0]), options.guidance_scale)
            rows = [name for name in names for _ in range(x.shape[0])] if len(names) > 1 else None
            if rows:  # adapter-major rows: [a1 x b; a2 x b; ...], the context likewise per half
                halves = context.chunk(1 if scale is None else 2)
                context = torch.cat([half.repeat(len(names), 1, 1) for half in halves])
            denoiser = AdapterDenoiser(self.unet, context, scale, rows)
            y = sample_dmp(denoiser, x.repeat(len(names), 1, 1, 1), timesteps, schedule, prediction_type,
                           options.sampler == "oracle", options.final_output, callback=progress.step)
            outputs.append(y.chunk(len(names)))
        return [torch.cat(parts) for parts in zip(*outputs)]

    # Prediction -----------------------------------------------------------------------------

    def predict(self, images, adapter: str | None = None, options: PredictOptions | None = None, *,
                prompt: str | Sequence[str] | None = None, prompt_embeds: torch.Tensor | None = None,
                return_latents: bool = False, callback: ProgressCallback | None = None,
                **settings) -> Prediction:
        """Predict one task for a batch of same-size images.

        Args:
            images: tensor [B, 3, H, W] or [3, H, W] in [0, 1], PIL image(s), numpy array(s) or paths.
            adapter: adapter name (optional when only one is loaded).
            options: PredictOptions; keyword `settings` (steps=..., sampler=...) override its fields.
            prompt, prompt_embeds: optional conditioning (see ``context``).
            return_latents: also return final and input latents.
            callback: ``callback(done, total)`` after every sampler step; may raise to interrupt.

        Returns:
            a Prediction at the input size.
        """
        name = self._require_adapter(adapter)
        return self.predict_tasks(images, [name], options, prompt=prompt, prompt_embeds=prompt_embeds,
                                  return_latents=return_latents, callback=callback, **settings)[name]

    def predict_tasks(self, images, adapters: Sequence[str], options: PredictOptions | None = None, *,
                      prompt: str | Sequence[str] | None = None, prompt_embeds: torch.Tensor | None = None,
                      return_latents: bool = False, callback: ProgressCallback | None = None,
                      **settings) -> dict[str, Prediction]:
        """Predict several tasks for the same images from one VAE encode (adapters run in turn).

        Arguments as ``predict``; `adapters` lists adapter names. Returns {name: Prediction}.
        """
        # 1. Check everything before any work.
        options = (options or PredictOptions()).updated(**settings)
        names = [self._require_adapter(name) for name in adapters]
        if not names:
            raise ValueError("no adapters given")
        groups = self._task_groups(names, options)
        batch = to_image_batch(images)
        self._check_conditioning(names, batch.shape[0], prompt, prompt_embeds)
        chunks = math.ceil(batch.shape[0] / options.batch_size)
        progress = _Progress(callback, options.steps * chunks * len(groups))
        # 2. Resize, pad and encode once.                                   # [B, 3, Hp, Wp] in [-1, 1]
        pixels, framing = frame_batch(batch, options.processing_resolution)
        x = torch.cat([self.encode(pixels[i:i + options.batch_size])
                       for i in range(0, pixels.shape[0], options.batch_size)])  # [B, 4, h, w]
        results = {}
        for group in groups:
            # 3. Sample the tasks' latents, decode, crop the padding, decode each task's values.
            for name, y in zip(group, self._sample(x, group, options, prompt, prompt_embeds, progress)):
                results[name] = self._finish(y, x, name, framing, options, return_latents)
        return {name: results[name] for name in names}

    def _task_groups(self, names: list[str], options: PredictOptions) -> list[list[str]]:
        """Adapters that sample together: one each, or (batched) those sharing prediction type and prompting."""
        if options.task_batching == "sequential":
            return [[n] for n in names]
        groups: dict[tuple, list[str]] = {}
        for name in names:
            info = self._adapters[name].info
            groups.setdefault((options.prediction_type or info.prediction_type, info.uses_prompts), []).append(name)
        return list(groups.values())

    def _finish(self, y, x, name, framing, options, return_latents) -> Prediction:
        info = self._adapters[name].info
        codec = get_codec(info.task)
        raws = []
        for start in range(0, y.shape[0], options.batch_size):
            decoded = unframe(self.decode(y[start:start + options.batch_size]), framing)  # [b, 3, h', w']
            raws.append(codec.resize(codec.decode(decoded, info), framing.input_size).cpu())
        raw = torch.cat(raws)
        visual = codec.visualize(raw, colormap=options.colormap).float().contiguous()
        latents = (y.float().cpu(), x.float().cpu()) if return_latents else (None, None)
        return Prediction(name, info, raw, visual, *latents)

    def to(self, device: str | torch.device) -> DMPModel:
        """Move the models (ComfyUI offloads idle models to the CPU)."""
        self.device = torch.device(device)
        self.unet.to(self.device)
        self.vae.to(self.device)
        self.text.to(self.device)
        return self


class _Progress:
    """Counts sampler steps across images, chunks and adapters for one progress callback."""

    def __init__(self, callback: ProgressCallback | None, total: int):
        self.callback, self.total, self.done = callback, total, 0

    def step(self, i: int, num_steps: int, z: torch.Tensor) -> None:
        self.done += 1
        if self.callback is not None:
            self.callback(self.done, self.total)


def _rows(value, start: int, count: int):
    """The rows of a per-image prompt list or embedding batch that belong to one chunk."""
    if value is None or isinstance(value, str):
        return value
    if len(value) == 1:
        return value
    return value[start:start + count]

