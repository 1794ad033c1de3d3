"""DMPModel: an SD 1.x base with named task adapters, and prediction from images.

    model = DMPModel.from_pretrained("sd15/", device="cpu")
    model.load_adapter("ckpt/depth-hypersim-notext")           # name, task... from the folder
    result = model.predict(images, "depth-hypersim-notext")    # Prediction: raw metres + visual

One VAE encode serves any number of adapters (``predict_tasks``); switching adapter never
reloads the base. An adapter running alone is merged into the UNet's weights until another one
needs the UNet (``denoiser.MergedLora``: exact, no drift), so it runs as fast as the bare UNet.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .. import adapters as adapter_files
from ..adapters import AdapterInfo
from ..prediction.predict import (
    Prediction,
    PredictOptions,
    ProgressCallback,
    StepCounter,
    chunk_rows,
    predict_images,
    prompt_embeddings,
    sample_group,
)
from ..sampling import Denoiser, schedule_from_config
from . import lora
from .denoiser import AdapterDenoiser, MergedLora
from .loading import BaseComponents, load_base
from .text import TextConditioner, cache_file_for

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _LoadedAdapter:
    info: AdapterInfo
    file: Path
    stamp: tuple
    layers: int
    live: bool = False  # registered, not loaded: a trainer's weights, merged for one call at a time


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
        self._merged = MergedLora(self.unet)

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
            name: adapter name (default: ``adapters.adapter_name``: the folder name for DMP's layout, else the
                file stem; '~2', '~3'... appended when another file already holds that name).
            overrides: AdapterInfo fields that take precedence over metadata and name (e.g. task="depth").

        Returns:
            the adapter's AdapterInfo.
        """
        file = adapter_files.resolve_adapter_file(path)
        files = {n: a.file for n, a in self._adapters.items() if not a.live}
        name = name or adapter_files.adapter_name(adapter_files.adapter_name_for(path), file, files)
        stamp = (str(file.resolve()), file.stat().st_size, file.stat().st_mtime_ns)
        loaded = self._adapters.get(name)
        if loaded is not None and loaded.stamp == stamp:
            info = adapter_files.with_overrides(loaded.info, **overrides)
            self._adapters[name] = replace(loaded, info=info)
            return info
        opened = adapter_files.open_adapter(path, overrides)
        info = opened.info
        alpha = adapter_files.peft_alpha(opened.metadata)
        peft_tensors = lora.to_peft_state_dict(opened.tensors, self.unet.config, alpha)
        lora.check_adapter_fits(peft_tensors, self.unet)  # before an adapter it replaces is dropped
        peft_tensors = {k: v.to(self.device, self.dtype) for k, v in peft_tensors.items()}
        if loaded is not None:
            self.remove_adapter(name)
        self._merged.reset()  # peft adds the new adapter's layers next to the original weights
        layers = lora.attach_adapter(self.unet, peft_tensors, name)
        self._adapters[name] = _LoadedAdapter(info, file, stamp, layers)
        logger.info("loaded adapter %r from %s: %d layers, task %s", name, file, layers, info.task)
        return info

    def register_adapter(self, name: str, info: AdapterInfo) -> AdapterInfo:
        """Use an adapter already attached to the UNet by peft (a trainer's ``unet.add_adapter``) by name.

        Its weights stay live: ``predict`` follows them as they train. A live adapter is merged
        into the UNet's weights for the length of one ``predict``/``sample`` call only, so training
        steps between calls always run (and take gradients through) the unmerged LoRA layers.
        Raises if the UNet has no LoRA layers named `name`.
        """
        if not isinstance(info, AdapterInfo):
            raise TypeError(f"info must be an AdapterInfo, got {type(info).__name__}")
        layers = lora.count_adapter_layers(self.unet, name)
        if not layers:
            raise ValueError(f"the UNet has no LoRA layers of adapter {name!r}; attach it first (unet.add_adapter)")
        self._merged.reset()
        self._adapters[name] = _LoadedAdapter(info, Path(), (), layers, live=True)
        return info

    def remove_adapter(self, name: str) -> None:
        """Detach an adapter."""
        self._require_adapter(name)
        self._merged.reset()
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
        """Pixels [B, 3, H, W] in [0, 1] -> latents [B, 4, H/8, W/8]: the distribution's mean, scaled.

        The VAE takes [-1, 1]: scaled here, right before it (in the pixels' own dtype, then cast).
        """
        posterior = self.vae.encode((pixels * 2 - 1).to(self.device, self.dtype)).latent_dist
        return posterior.mean * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, 4, h, w] -> pixels [B, 3, 8h, 8w], nominally in [-1, 1]."""
        return self.vae.decode(latents.to(self.device, self.dtype) / self.vae.config.scaling_factor).sample

    # The backend of ``prediction.predict_images`` ---------------------------------------------

    mixes_adapters = True  # peft runs a different adapter per batch row (``denoiser.mixed_adapters``)

    def empty_embedding(self) -> torch.Tensor:
        """The empty prompt's embedding [1, 77, D] (cached; see ``TextConditioner``)."""
        return self.text.empty_embedding()

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompt embeddings [n, 77, D] from the base's own text encoder and tokenizer."""
        return self.text.encode(prompts)

    def denoiser(self, adapters: Sequence[str], context: torch.Tensor, guidance_scale: float | None) -> Denoiser:
        """The UNet with one adapter merged, or (several, unmerged) adapter-major row blocks of one batch."""
        if len(adapters) == 1:
            self._merged.merge(adapters[0])
            return AdapterDenoiser(self.unet, context, guidance_scale)
        self._merged.unmerge()  # peft mixes adapters per row on the original weights only
        rows_per_adapter = context.shape[0] // len(adapters) // (1 if guidance_scale is None else 2)
        return AdapterDenoiser(self.unet, context, guidance_scale,
                               [name for name in adapters for _ in range(rows_per_adapter)])

    # Prediction -----------------------------------------------------------------------------

    def sample(self, latents: torch.Tensor, adapter: str | None = None, options: PredictOptions | None = None,
               *, prompt: str | Sequence[str] | None = None, prompt_embeds: torch.Tensor | None = None,
               callback: ProgressCallback | None = None, **settings) -> torch.Tensor:
        """Run the DMP sampler from input latents [B, 4, h, w] to prediction latents, one adapter.

        Args:
            latents: input image latents (``encode``'s output).
            adapter: adapter name (optional when only one is loaded).
            options: PredictOptions; keyword `settings` override its fields.
            prompt, prompt_embeds: optional conditioning (see ``prediction.conditioning``).
            callback: ``callback(done, total)`` after every step; may raise to interrupt.

        Returns:
            final latents [B, 4, h, w] (in the model's dtype, on its device).
        """
        options = (options or PredictOptions()).updated(**settings)
        name = self._require_adapter(adapter)
        infos = {name: self._adapters[name].info}
        prompt_embeds = prompt_embeddings(self, infos, latents.shape[0], prompt, prompt_embeds)
        progress = StepCounter(callback, options.steps * math.ceil(latents.shape[0] / options.batch_size))
        latents = latents.to(self.device, self.dtype)
        chunks = []
        with self._live_adapters_unmerged_after():
            for start in range(0, latents.shape[0], options.batch_size):
                x = latents[start:start + options.batch_size]
                chunks += sample_group(self, x, [name], infos, options,
                                       chunk_rows(prompt_embeds, start, x.shape[0]), progress)
        return torch.cat(chunks)

    def predict(self, images, adapter: str | None = None, options: PredictOptions | None = None, *,
                prompt: str | Sequence[str] | None = None, prompt_embeds: torch.Tensor | None = None,
                return_latents: bool = False, callback: ProgressCallback | None = None,
                **settings) -> Prediction:
        """Predict one task for a batch of same-size images.

        Args:
            images: tensor [B, 3, H, W] or [3, H, W] in [0, 1], PIL image(s), numpy array(s) or paths.
            adapter: adapter name (optional when only one is loaded).
            options: PredictOptions; keyword `settings` (steps=..., sampler=...) override its fields.
            prompt, prompt_embeds: optional conditioning (see ``prediction.conditioning``).
            return_latents: also return final and input latents.
            callback: ``callback(done, total)`` after every sampler step; may raise to interrupt.

        Returns:
            a Prediction at the input size.

        Raises:
            ValueError for bad inputs and settings (a file that cannot be read names the file and the
            reason, e.g. a decompression bomb or a truncated file), TypeError for unsupported types.
            Files and PIL images are turned upright by their EXIF orientation alike (docs/batch.md).
        """
        name = self._require_adapter(adapter)
        return self.predict_tasks(images, [name], options, prompt=prompt, prompt_embeds=prompt_embeds,
                                  return_latents=return_latents, callback=callback, **settings)[name]

    def predict_tasks(self, images, adapters: Sequence[str], options: PredictOptions | None = None, *,
                      prompt: str | Sequence[str] | None = None, prompt_embeds: torch.Tensor | None = None,
                      return_latents: bool = False, callback: ProgressCallback | None = None,
                      **settings) -> dict[str, Prediction]:
        """Predict several tasks for the same images, each image encoded once (``prediction.predict_images``).

        Arguments as ``predict``; `adapters` lists adapter names. Returns {name: Prediction}.
        """
        options = (options or PredictOptions()).updated(**settings)
        infos = {name: self._adapters[self._require_adapter(name)].info for name in adapters}
        with self._live_adapters_unmerged_after():
            return predict_images(self, images, infos, options, prompt=prompt, prompt_embeds=prompt_embeds,
                                  return_latents=return_latents, callback=callback)

    @contextlib.contextmanager
    def _live_adapters_unmerged_after(self) -> Iterator[None]:
        """A registered adapter's weights train between calls: unmerge it when the call ends, however it ends."""
        try:
            yield
        finally:
            merged = self._adapters.get(self._merged.name) if self._merged.name else None
            if merged is not None and merged.live:
                self._merged.unmerge()

    def unmerge_adapter(self) -> None:
        """Give the UNet back its original weights now (an adapter running alone stays merged until then).

        Nothing needs this for correctness (``unet.state_dict()`` unmerges by itself); it frees the
        copy of the adapted layers' weights that merging keeps (``denoiser.MergedLora``).
        """
        self._merged.unmerge()

    def to(self, device: str | torch.device) -> DMPModel:
        """Move the models (ComfyUI offloads idle models to the CPU)."""
        self._merged.unmerge()  # move the original weights, and keep no copy behind on the old device
        self.device = torch.device(device)
        self.unet.to(self.device)
        self.vae.to(self.device)
        self.text.to(self.device)
        return self
