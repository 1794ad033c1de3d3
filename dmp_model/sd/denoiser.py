"""The UNet with its task adapters, seen by the sampler as ``model(z, t) -> output``.

One adapter at a time runs merged into the UNet's weights (``MergedLora``); several adapters in
one batch run through peft's unmerged layers (``mixed_adapters``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from ..sampling import apply_guidance


@contextlib.contextmanager
def mixed_adapters(unet: torch.nn.Module, rows: Sequence[str]) -> Iterator[None]:
    """Inside the block, batch row i of every UNet call goes through adapter ``rows[i]``.

    peft's LoRA layers can mix adapters within one batch (their ``adapter_names`` argument);
    the UNet does not pass that argument down, so forward pre-hooks hand it to every layer.
    """
    def add_rows(module, args, kwargs):
        return args, {**kwargs, "adapter_names": list(rows)}

    handles = [m.register_forward_pre_hook(add_rows, with_kwargs=True) for m in _lora_layers(unet)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class MergedLora:
    """Keeps at most one adapter's LoRA merged into the UNet's weights, and undoes it exactly.

    Merged, an adapter costs nothing per UNet call; unmerged, peft adds two small matmuls to each
    adapted projection (128 pairs per SD 1.x call), which weigh most on a GPU. Merging writes
    W + scale * up @ down into a new tensor and keeps the original W; unmerging puts the original
    tensor back, so after any number of switches the weights are the originals bit for bit (peft's
    own unmerge subtracts the update again and drifts by rounding). The price: a second copy of the
    adapted layers' weights while an adapter is merged (``extra_bytes``; SD 1.x: 94M parameters,
    0.19 GB in fp16). Reading or loading the UNet's state_dict unmerges first, so merged weights
    are never saved. Call ``reset`` whenever adapters are added to or removed from the UNet; toggle
    adapters on the UNet itself (``disable_adapters``) only after ``unmerge``.
    """

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet
        self.name: str | None = None
        self._originals: dict[torch.nn.Module, torch.Tensor] = {}  # LoRA layer -> its base weight
        self._layers: list[torch.nn.Module] | None = None  # every LoRA layer, found once per reset
        unet.register_state_dict_pre_hook(lambda *args: self.unmerge())
        unet.register_load_state_dict_pre_hook(lambda *args: self.unmerge())

    @property
    def extra_bytes(self) -> int:
        """Memory held by the kept original weights (0 when nothing is merged)."""
        return sum(w.numel() * w.element_size() for w in self._originals.values())

    @torch.no_grad()
    def merge(self, name: str) -> bool:
        """Make `name` the active adapter, merged; False if it cannot be merged plainly (DoRA, LoRA biases)."""
        if self.name == name and all(layer.merged_adapters == [name] for layer in self._originals) \
                and all(layer.active_adapters == [name] for layer in self._layers):
            return True  # unless someone switched adapters on the UNet itself since
        self.unmerge()
        if self._layers is None:
            self._layers = _lora_layers(self.unet)
        for layer in self._layers:  # what unet.set_adapter does, without walking every module again
            layer.set_adapter(name)
        layers = [layer for layer in self._layers if name in layer.lora_A]
        if any(name in getattr(layer, "lora_variant", {}) or getattr(layer, "lora_bias", {}).get(name)
               for layer in layers):
            return False
        for layer in layers:
            weight = layer.get_base_layer().weight
            self._originals[layer] = weight.data
            # Added in float32 and rounded once: fp16 weights get the nearest value to W + update.
            weight.data = (weight.data.float() + layer.get_delta_weight(name).float()).to(weight.dtype)
            layer.merged_adapters.append(name)  # peft's bookkeeping: it refuses per-row adapters now
            # Merged, peft's forward only calls the base layer, after checks that cost ~9 us per
            # layer and call (1 ms per SD 1.x UNet call: launch-bound GPU batches feel it).
            layer.forward = layer.get_base_layer().forward
        self.name = name
        return True

    def unmerge(self) -> None:
        """Put the original weights back (nothing to do when no adapter is merged)."""
        for layer, original in self._originals.items():
            weight = layer.get_base_layer().weight
            weight.data = original.to(weight.device, weight.dtype)  # a no-op unless the UNet was moved
            if self.name in layer.merged_adapters:
                layer.merged_adapters.remove(self.name)
            layer.__dict__.pop("forward", None)  # peft's own forward again
        self._originals.clear()
        self.name = None

    def reset(self) -> None:
        """Unmerge and forget the LoRA layers found (adapters are about to be added or removed)."""
        self.unmerge()
        self._layers = None


def _lora_layers(unet: torch.nn.Module) -> list[torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in unet.modules() if isinstance(m, LoraLayer)]


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
