"""The UNet with one task adapter active, seen by the sampler as ``model(z, t) -> output``."""

from __future__ import annotations

import torch

from .sampling import apply_guidance


class AdapterDenoiser:
    """Calls the UNet with fixed text context, with classifier-free guidance when asked.

    Args:
        unet: a diffusers UNet2DConditionModel whose active adapter is already selected.
        context: [B, L, D] text embeddings; with guidance, [2B, L, D] ordered (cond; uncond)
            as the reference batches them.
        guidance_scale: None for a single conditional call per step, else the CFG scale.
    """

    def __init__(self, unet: torch.nn.Module, context: torch.Tensor, guidance_scale: float | None = None):
        self.unet, self.context, self.guidance_scale = unet, context, guidance_scale

    def __call__(self, z: torch.Tensor, t: int) -> torch.Tensor:
        timestep = torch.tensor(t, device=z.device)
        if self.guidance_scale is None:
            return self.unet(z, timestep, encoder_hidden_states=self.context).sample
        output = self.unet(torch.cat([z, z]), timestep, encoder_hidden_states=self.context).sample
        return apply_guidance(output, self.guidance_scale)
