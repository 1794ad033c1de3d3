"""The UNet with its task adapters, seen by the sampler as ``model(z, t) -> output``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from .sampling import apply_guidance


@contextlib.contextmanager
def mixed_adapters(unet: torch.nn.Module, rows: Sequence[str]) -> Iterator[None]:
    """Inside the block, batch row i of every UNet call goes through adapter ``rows[i]``.

    peft's LoRA layers can mix adapters within one batch (their ``adapter_names`` argument);
    the UNet does not pass that argument down, so forward pre-hooks hand it to every layer.
    """
    from peft.tuners.lora import LoraLayer

    def add_rows(module, args, kwargs):
        return args, {**kwargs, "adapter_names": list(rows)}

    handles = [m.register_forward_pre_hook(add_rows, with_kwargs=True)
               for m in unet.modules() if isinstance(m, LoraLayer)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class AdapterDenoiser:
    """Calls the UNet with fixed text context, with classifier-free guidance when asked.

    Args:
        unet: a diffusers UNet2DConditionModel; its active adapter is already selected, unless
            `rows` names an adapter per batch row (several tasks in one batch).
        context: [B, L, D] text embeddings; with guidance, [2B, L, D] ordered (cond; uncond)
            as the reference batches them.
        guidance_scale: None for a single conditional call per step, else the CFG scale.
        rows: optional adapter name for each of the B latents.
    """

    def __init__(self, unet: torch.nn.Module, context: torch.Tensor, guidance_scale: float | None = None,
                 rows: Sequence[str] | None = None):
        self.unet, self.context, self.guidance_scale = unet, context, guidance_scale
        self.rows = None if rows is None else list(rows) * (1 if guidance_scale is None else 2)

    def __call__(self, z: torch.Tensor, t: int) -> torch.Tensor:
        timestep = torch.tensor(t, device=z.device)
        with mixed_adapters(self.unet, self.rows) if self.rows else contextlib.nullcontext():
            if self.guidance_scale is None:
                return self.unet(z, timestep, encoder_hidden_states=self.context).sample
            output = self.unet(torch.cat([z, z]), timestep, encoder_hidden_states=self.context).sample
        return apply_guidance(output, self.guidance_scale)
