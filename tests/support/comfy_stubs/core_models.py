"""Stand-ins for ComfyUI's own MODEL, VAE and CLIP objects and its LoRA key handling, over tiny
diffusers models, for tests that run where ComfyUI is absent (CI).

They keep the contracts the pack relies on, as ComfyUI 0.3.x has them (``comfy/model_patcher.py``,
``comfy/model_base.py``, ``comfy/sd.py``, ``comfy/lora.py``, ``comfy/weight_adapter/lora.py``):

- MODEL: a ``ModelPatcher`` whose ``model`` (BaseModel) has ``diffusion_model(x, timesteps,
  context=...)`` returning the raw UNet output, ``model_config`` (class ``SD15``, ``unet_config``),
  ``latent_format`` (SD 1.x scale 0.18215), ``get_dtype``, ``manual_cast_dtype``, ``memory_required``,
  ``state_dict`` ("diffusion_model." keys). ``clone()`` shares the BaseModel; ``add_patches`` records
  LoRA patches; ``comfy.model_management.load_models_gpu`` applies a clone's patches to the shared
  weights as ComfyUI does (original weights backed up and restored when another clone loads):
  W + strength * (alpha / rank) * up @ down.
- VAE: ``encode(pixels [B, H, W, C] in [0, 1])`` -> unscaled latents (the distribution's mode),
  ``first_stage_model.decode``, ``decode_tiled`` (clamped), ``patcher``, dtypes and devices.
- CLIP: ``tokenize`` and ``encode_from_tokens`` -> [1, 77, D], as ``text_encoder(ids)[0]``.
- ``comfy.lora``: ``model_lora_keys_unet`` (LoRA module names -> weight keys: DMP's official
  ``...processor.to_q`` names and kohya's ``lora_unet_*`` names) and ``load_lora`` (patch objects
  with ``.weights = (up, down, alpha, mid, dora_scale, reshape)``).

The pack's code is never stood in for.
"""

from __future__ import annotations

import torch

CPU = torch.device("cpu")


class SD15:
    """ComfyUI's model configuration class of SD 1.x (only its name and unet_config matter)."""

    def __init__(self, unet_config: dict):
        self.unet_config = unet_config


class SDXL(SD15):
    """Another family: ComfyUI's SDXL configuration class."""


class LatentFormat:
    scale_factor = 0.18215

    def process_in(self, latent):
        return latent * self.scale_factor

    def process_out(self, latent):
        return latent / self.scale_factor


class DiffusionModel(torch.nn.Module):
    """A UNet behind ComfyUI's calling convention (x, timesteps, context=...): a diffusers one, or any
    module taking (x, timesteps, context) such as ``ToyUNet``."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, timesteps, context=None, control=None, transformer_options=None, **kwargs):
        if isinstance(self.unet, ToyUNet):
            return self.unet(x, timesteps, context)
        return self.unet(x, timesteps, encoder_hidden_states=context).sample


class BaseModel(torch.nn.Module):
    def __init__(self, unet, config_class=SD15, in_channels: int = 4):
        super().__init__()
        self.diffusion_model = DiffusionModel(unet)
        self.model_config = config_class({"context_dim": unet.config.cross_attention_dim,
                                          "in_channels": in_channels, "model_channels": 320})
        self.latent_format = LatentFormat()
        self.manual_cast_dtype = None
        self.applied = None  # the patcher whose patches are in the weights
        self.backup: dict[str, torch.Tensor] = {}

    def get_dtype(self):
        return next(self.diffusion_model.parameters()).dtype

    def memory_required(self, input_shape, cond_shapes=None):
        return input_shape[0] * input_shape[2] * input_shape[3] * 1024


class ModelPatcher:
    def __init__(self, model: BaseModel, load_device: torch.device = CPU):
        self.model, self.load_device, self.offload_device = model, load_device, torch.device("cpu")
        self.patches: dict[str, list] = {}

    def clone(self):
        other = ModelPatcher(self.model, self.load_device)
        other.patches = {k: list(v) for k, v in self.patches.items()}
        return other

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        keys = self.model.state_dict()
        added = []
        for key, patch in patches.items():
            if key in keys:
                self.patches.setdefault(key, []).append((strength_patch, patch))
                added.append(key)
        return added

    def apply(self) -> None:
        """What ComfyUI's load_models_gpu does to a clone: restore the backed-up weights, then patch."""
        base = self.model
        if not isinstance(base, BaseModel) or base.applied is self:
            return
        parameters = dict(base.named_parameters())
        with torch.no_grad():
            for key, original in base.backup.items():
                parameters[key].copy_(original)
            base.backup.clear()
            for key, patches in self.patches.items():
                weight = parameters[key]
                base.backup[key] = weight.detach().clone()
                for strength, patch in patches:
                    up, down, alpha = patch.weights[:3]
                    scale = 1.0 if alpha is None else alpha / down.shape[0]
                    weight += strength * scale * (up.float() @ down.float()).to(weight.dtype)
        base.applied = self


class LoRAAdapter:
    """comfy.weight_adapter.lora.LoRAAdapter: a patch holding (up, down, alpha, mid, dora_scale, reshape)."""

    name = "lora"

    def __init__(self, weights):
        self.weights = weights


def _module_names(unet) -> dict[str, str]:
    """Module path of every Linear layer of a UNet (diffusers names) -> its weight key in the BaseModel."""
    return {name: f"diffusion_model.unet.{name}.weight" for name, module in unet.named_modules()
            if isinstance(module, torch.nn.Linear)}


def model_lora_keys_unet(model, key_map=None):
    """ComfyUI's LoRA key map for a UNet, on diffusers module names (its own is on LDM names)."""
    key_map = {} if key_map is None else key_map
    for name, weight_key in _module_names(model.diffusion_model.unet).items():
        key_map[f"lora_unet_{name.replace('.', '_')}"] = weight_key
        official = name.replace(".to_", ".processor.to_")
        key_map[official[:-2] if official.endswith(".to_out.0") else official] = weight_key
    return key_map


def load_lora(lora, to_load, log_missing=True):
    patches = {}
    for prefix, weight_key in to_load.items():
        for up, down in ((f"{prefix}_lora.up.weight", f"{prefix}_lora.down.weight"),
                         (f"{prefix}.lora_up.weight", f"{prefix}.lora_down.weight"),
                         (f"{prefix}.lora_B.weight", f"{prefix}.lora_A.weight")):
            if up in lora:
                alpha = lora.get(f"{prefix}.alpha")
                patches[weight_key] = LoRAAdapter((lora[up], lora[down], None if alpha is None else float(alpha),
                                                   None, None, None))
    return patches


class FirstStage(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def decode(self, z):
        return self.vae.decode(z).sample


class VAE:
    def __init__(self, vae, latent_channels: int = 4):
        self.first_stage_model = FirstStage(vae)
        self.patcher = ModelPatcher(self.first_stage_model)  # loaded, never patched
        self.latent_channels, self.downscale_ratio = latent_channels, 8
        self.vae_dtype = next(vae.parameters()).dtype
        self.device = self.output_device = torch.device("cpu")
        self.memory_used_decode = lambda shape, dtype: shape[0] * shape[2] * shape[3] * 2048
        self.encoded = 0

    def encode(self, pixels):
        self.encoded += pixels.shape[0]
        with torch.no_grad():
            return self.first_stage_model.vae.encode(pixels.movedim(-1, 1) * 2 - 1).latent_dist.mode()

    def decode_tiled(self, latents):
        return ((self.first_stage_model.decode(latents) + 1) / 2).clamp(0, 1).movedim(1, -1)


class CLIP:
    def __init__(self, text_encoder, tokenizer):
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.encoded: list[str] = []

    def tokenize(self, text):
        return {"text": text}

    def encode_from_tokens(self, tokens, return_pooled=False):
        self.encoded.append(tokens["text"])
        ids = self.tokenizer([tokens["text"]], padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        with torch.no_grad():
            return self.text_encoder(ids)[0]


def core_objects(unet, vae, text_encoder, tokenizer, config_class=SD15) -> tuple:
    """(MODEL, VAE, CLIP) as core's Load Checkpoint returns them, over diffusers models."""
    return ModelPatcher(BaseModel(unet, config_class)), VAE(vae), CLIP(text_encoder, tokenizer)


# Models in plain torch, for a process where diffusers, peft and transformers cannot be imported ---

class ToyAttention(torch.nn.Module):
    def __init__(self, width: int, context_width: int):
        super().__init__()
        self.to_q = torch.nn.Linear(width, width, bias=False)
        self.to_k = torch.nn.Linear(context_width, width, bias=False)
        self.to_v = torch.nn.Linear(context_width, width, bias=False)
        self.to_out = torch.nn.ModuleList([torch.nn.Linear(width, width)])

    def forward(self, tokens, context):
        weights = (self.to_q(tokens) @ self.to_k(context).transpose(1, 2)).softmax(-1)
        return self.to_out[0](weights @ self.to_v(context))


class ToyUNet(torch.nn.Module):
    """One transformer block (self- and cross-attention) under diffusers' module names, in plain torch."""

    def __init__(self, width: int = 8, context_width: int = 8):
        super().__init__()
        self.config = type("Config", (), {"cross_attention_dim": context_width})()
        self.conv_in = torch.nn.Conv2d(4, width, 1)
        block = torch.nn.Module()
        block.attn1, block.attn2 = ToyAttention(width, width), ToyAttention(width, context_width)
        attention = torch.nn.Module()
        attention.transformer_blocks = torch.nn.ModuleList([block])
        self.mid_block = torch.nn.Module()
        self.mid_block.attentions = torch.nn.ModuleList([attention])
        self.conv_out = torch.nn.Conv2d(width, 4, 1)

    def forward(self, x, timesteps, context):
        h = self.conv_in(x) + torch.sin(timesteps.float() / 100)[:, None, None, None]
        b, c, height, width = h.shape
        tokens = h.flatten(2).transpose(1, 2)
        block = self.mid_block.attentions[0].transformer_blocks[0]
        tokens = tokens + block.attn1(tokens, tokens)
        tokens = tokens + block.attn2(tokens, context)
        return self.conv_out(tokens.transpose(1, 2).reshape(b, c, height, width))


class ToyAutoencoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder, self.decoder = torch.nn.Conv2d(3, 8, 8, stride=8), torch.nn.Conv2d(4, 3, 1)

    def encode(self, pixels):
        return type("Encoded", (), {"latent_dist": _Mode(self.encoder(pixels))})()

    def decode(self, z):
        return type("Decoded", (), {"sample": torch.nn.functional.interpolate(self.decoder(z), scale_factor=8)})()


class _Mode:
    def __init__(self, moments):
        self.moments = moments

    def mode(self):
        return self.moments[:, :4]


class ToyTextEncoder(torch.nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.embedding = torch.nn.Embedding(49408, width)

    def forward(self, ids):
        return (self.embedding(ids).cumsum(1),)


def toy_tokenizer(texts, **kwargs):
    ids = [[49406] + [min(ord(ch), 49405) for ch in text][:75] for text in texts]
    return type("Tokens", (), {"input_ids": torch.tensor([row + [49407] * (77 - len(row)) for row in ids])})()


def toy_core_objects() -> tuple:
    """(MODEL, VAE, CLIP) in plain torch (seeded), and no model library imported."""
    torch.manual_seed(0)
    return ModelPatcher(BaseModel(ToyUNet())), VAE(ToyAutoencoder()), CLIP(ToyTextEncoder(), toy_tokenizer)
