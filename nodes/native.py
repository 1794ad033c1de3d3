"""The engine's prediction path on ComfyUI's own models: a ``PredictionBackend`` over MODEL, VAE and CLIP.

``dmp_model.prediction.predict.predict_images`` does all of DMP (framing, sampler, codecs); this backend
only runs ComfyUI's networks for it: the adapter-patched UNet (called for its raw output, which is
the adapter's parametrisation), the VAE, and the CLIP for the empty prompt and prompts.
"""

from __future__ import annotations

import weakref

import torch

from ..dmp_model.sampling import apply_guidance, sd1_schedule
from . import comfy_bridge as bridge
from .adapters import DMPAdapters

# The empty prompt's embedding per CLIP object, computed once: ComfyUI keeps a loader's CLIP object
# while its inputs do not change, and a CLIP with other patches or layers is another object.
_EMPTY_EMBEDDINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class ComfyDenoiser:
    """``model(z, t) -> output`` for the sampler: one patched MODEL, fixed context, optional CFG.

    The model is loaded by ComfyUI (``load_for_sampling``) on the first call, when the batch shape
    is known, so its memory estimate is the batch's.
    """

    def __init__(self, model, context: torch.Tensor, guidance_scale: float | None):
        self.model, self.context, self.guidance_scale = model, context, guidance_scale
        self.loaded = False

    def __call__(self, z: torch.Tensor, t: int) -> torch.Tensor:
        x = z if self.guidance_scale is None else torch.cat([z, z])               # [b or 2b, 4, h, w]
        if not self.loaded:
            bridge.load_for_sampling(self.model, tuple(x.shape))
            self.loaded = True
        output = bridge.call_unet(self.model, x, t, self.context).to(z.device)
        return output if self.guidance_scale is None else apply_guidance(output, self.guidance_scale)


class ComfyBackend:
    """Runs DMP on the adapters of a DMP_MODEL, with the VAE and CLIP the user wired in."""

    mixes_adapters = False  # ComfyUI patches weights per MODEL clone: one adapter per UNet batch

    def __init__(self, dmp_model: DMPAdapters, vae, clip):
        bridge.check_sd1_vae(vae)
        self.models = {adapter.name: adapter.model for adapter in dmp_model.adapters}
        first = dmp_model.adapters[0].model
        self.latent_format = first.model.latent_format
        self.width = bridge.context_width(first)
        self.device = first.load_device  # the sampler's arithmetic runs where the UNet does
        self.vae, self.clip = vae, clip
        self.schedule = sd1_schedule()

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.latent_format.process_in(bridge.vae_encode(self.vae, pixels)).to(self.device, torch.float32)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return bridge.vae_decode(self.vae, self.latent_format.process_out(latents))

    def empty_embedding(self) -> torch.Tensor:
        empty = _EMPTY_EMBEDDINGS.get(self.clip)
        if empty is None:
            empty = self._check_width(bridge.clip_encode(self.clip, "")).cpu()
            _EMPTY_EMBEDDINGS[self.clip] = empty
        return empty.to(self.device)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        embeddings = [self._check_width(bridge.clip_encode(self.clip, prompt)) for prompt in prompts]
        length = max(e.shape[1] for e in embeddings)  # long prompts are 77k tokens; pad shorter ones alike
        if any(e.shape[1] != length for e in embeddings):
            raise ValueError("the prompts encode to different lengths (some longer than 77 tokens); give prompts "
                             "of similar length or one prompt for every image")
        return torch.cat(embeddings).to(self.device)

    def denoiser(self, adapters, context: torch.Tensor, guidance_scale: float | None) -> ComfyDenoiser:
        (name,) = adapters  # mixes_adapters is False: the engine runs one adapter per batch
        return ComfyDenoiser(self.models[name], context, guidance_scale)

    def _check_width(self, embedding: torch.Tensor) -> torch.Tensor:
        if embedding.shape[-1] != self.width:
            raise ValueError(f"the CLIP gives embeddings of width {embedding.shape[-1]}, but the SD 1.x MODEL "
                             f"expects {self.width}: wire the CLIP of the SD 1.5 checkpoint (not SDXL's or "
                             "Flux's)")
        return embedding
