"""Write diffusers SD 1.x components back into the original LDM/CompVis single-file key layout.

diffusers only converts LDM -> diffusers (``diffusers.loaders.single_file_utils``). Tests of our
single-file loader need the opposite direction: take a (tiny) diffusers UNet / VAE / CLIP text
encoder and write the ``.safetensors`` / ``.ckpt`` file a ComfyUI user keeps in
``models/checkpoints``, with keys such as

    model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight
    first_stage_model.decoder.up.3.block.0.conv1.weight
    cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight

The mapping is derived from the module structure (walked generically, so any block count,
``layers_per_block`` or attention placement works) and mirrors diffusers' forward converters
(``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``).
Every parameter must be mapped: an unknown key raises instead of being dropped silently.
Works on meta-device models too (only names and shapes are touched, no data is read).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer.text_model."

# diffusers ResnetBlock2D submodule -> LDM ResBlock submodule (UNet).
_UNET_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
# diffusers ResnetBlock2D submodule -> LDM ResnetBlock submodule (VAE).
_VAE_RESNET_NAMES = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
# diffusers Attention submodule -> LDM AttnBlock submodule (VAE); LDM's are 1x1 convs.
_VAE_ATTENTION_NAMES = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


class _PrefixMap:
    """Ordered (diffusers prefix -> LDM prefix, submodule renames) rules; longest prefix wins."""

    def __init__(self) -> None:
        self.rules: dict[str, tuple[str, dict[str, str] | None, bool]] = {}

    def add(self, src: str, dst: str, renames: dict[str, str] | None = None, to_conv: bool = False) -> None:
        self.rules[src] = (dst, renames, to_conv)

    def map_key(self, key: str) -> tuple[str, bool]:
        """LDM key for diffusers `key`, and whether a linear weight must become a 1x1 conv weight."""
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            src = ".".join(parts[:cut])
            if src not in self.rules:
                continue
            dst, renames, to_conv = self.rules[src]
            rest = ".".join(parts[cut:])
            if renames is not None:
                for old, new in renames.items():
                    if rest.startswith(old + "."):
                        rest = new + rest[len(old):]
                        break
                else:
                    raise KeyError(f"no LDM name for submodule of {src!r}: {key!r}")
            return f"{dst}.{rest}", to_conv
        raise KeyError(f"no LDM name for diffusers key {key!r}")


def _as_conv1x1(tensor: torch.Tensor) -> torch.Tensor:
    return tensor[:, :, None, None] if tensor.ndim == 2 else tensor


def _convert(state_dict: dict[str, torch.Tensor], rules: _PrefixMap, prefix: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        ldm_key, to_conv = rules.map_key(key)
        if to_conv and ldm_key.endswith(".weight"):
            tensor = _as_conv1x1(tensor)
        ldm_key = prefix + ldm_key
        if ldm_key in out:
            raise KeyError(f"two diffusers keys map to {ldm_key!r}")
        out[ldm_key] = tensor
    return out


def _unet_rules(unet) -> _PrefixMap:
    rules = _PrefixMap()
    rules.add("time_embedding.linear_1", "time_embed.0")
    rules.add("time_embedding.linear_2", "time_embed.2")
    rules.add("class_embedding.linear_1", "label_emb.0.0")
    rules.add("class_embedding.linear_2", "label_emb.0.2")
    rules.add("add_embedding.linear_1", "label_emb.0.0")
    rules.add("add_embedding.linear_2", "label_emb.0.2")
    rules.add("conv_in", "input_blocks.0.0")
    rules.add("conv_norm_out", "out.0")
    rules.add("conv_out", "out.2")

    # Encoder: input_blocks.N = [resnet, (transformer)] per layer, then [Downsample(op)] per block.
    n = 1
    for b, block in enumerate(unet.down_blocks):
        attentions = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            rules.add(f"down_blocks.{b}.resnets.{j}", f"input_blocks.{n}.0", _UNET_RESNET_NAMES)
            if attentions is not None:
                rules.add(f"down_blocks.{b}.attentions.{j}", f"input_blocks.{n}.1")
            n += 1
        if getattr(block, "downsamplers", None) is not None:
            if len(block.downsamplers) != 1:
                raise ValueError(f"down_blocks.{b}: LDM has exactly one downsampler per level")
            rules.add(f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{n}.0.op")
            n += 1

    # Middle: resnet, (transformer, resnet)*.
    mid = unet.mid_block
    if mid is not None:
        rules.add("mid_block.resnets.0", "middle_block.0", _UNET_RESNET_NAMES)
        for k in range(len(getattr(mid, "attentions", None) or [])):
            rules.add(f"mid_block.attentions.{k}", f"middle_block.{2 * k + 1}")
            rules.add(f"mid_block.resnets.{k + 1}", f"middle_block.{2 * k + 2}", _UNET_RESNET_NAMES)

    # Decoder: output_blocks.N = [resnet, (transformer), (Upsample(conv) on the block's last layer)].
    n = 0
    for b, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None)
        upsamplers = getattr(block, "upsamplers", None)
        for j in range(len(block.resnets)):
            rules.add(f"up_blocks.{b}.resnets.{j}", f"output_blocks.{n}.0", _UNET_RESNET_NAMES)
            slot = 1
            if attentions is not None:
                rules.add(f"up_blocks.{b}.attentions.{j}", f"output_blocks.{n}.1")
                slot = 2
            if upsamplers is not None and j == len(block.resnets) - 1:
                if len(upsamplers) != 1:
                    raise ValueError(f"up_blocks.{b}: LDM has exactly one upsampler per level")
                rules.add(f"up_blocks.{b}.upsamplers.0.conv", f"output_blocks.{n}.{slot}.conv")
            n += 1
    return rules


def _vae_rules(vae) -> _PrefixMap:
    rules = _PrefixMap()
    for side in ("encoder", "decoder"):
        rules.add(f"{side}.conv_in", f"{side}.conv_in")
        rules.add(f"{side}.conv_out", f"{side}.conv_out")
        rules.add(f"{side}.conv_norm_out", f"{side}.norm_out")
        mid = getattr(vae, side).mid_block
        for k in range(len(mid.resnets)):
            rules.add(f"{side}.mid_block.resnets.{k}", f"{side}.mid.block_{k + 1}", _VAE_RESNET_NAMES)
        for k in range(len(mid.attentions or [])):
            if mid.attentions[k] is not None:
                rules.add(f"{side}.mid_block.attentions.{k}", f"{side}.mid.attn_{k + 1}",
                          _VAE_ATTENTION_NAMES, to_conv=True)
    rules.add("quant_conv", "quant_conv")
    rules.add("post_quant_conv", "post_quant_conv")

    for i, block in enumerate(vae.encoder.down_blocks):
        for j in range(len(block.resnets)):
            rules.add(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", _VAE_RESNET_NAMES)
        if getattr(block, "downsamplers", None) is not None:
            rules.add(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv")

    # LDM numbers decoder levels by resolution (up.0 = full resolution, runs last): reversed.
    levels = len(vae.decoder.up_blocks)
    for i, block in enumerate(vae.decoder.up_blocks):
        level = levels - 1 - i
        for j in range(len(block.resnets)):
            rules.add(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}", _VAE_RESNET_NAMES)
        if getattr(block, "upsamplers", None) is not None:
            rules.add(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv")
    return rules


def unet_ldm_names(unet) -> dict[str, str]:
    """diffusers UNet2DConditionModel state-dict key -> full LDM key (``model.diffusion_model.*``)."""
    rules = _unet_rules(unet)
    return {k: UNET_PREFIX + rules.map_key(k)[0] for k in unet.state_dict()}


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    """The UNet's state dict under CompVis keys ``model.diffusion_model.*`` (tensors shared, not copied)."""
    return _convert(unet.state_dict(), _unet_rules(unet), UNET_PREFIX)


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    """The AutoencoderKL's state dict under CompVis keys ``first_stage_model.*``.

    Mid-block attention q/k/v/proj_out weights become 1x1 conv weights [C, C, 1, 1], as in LDM
    (diffusers' converter squeezes them back to [C, C]).
    """
    return _convert(vae.state_dict(), _vae_rules(vae), VAE_PREFIX)


def text_encoder_to_ldm(text_encoder, position_ids: bool = True) -> dict[str, torch.Tensor]:
    """The CLIPTextModel's state dict under ``cond_stage_model.transformer.text_model.*``.

    Works whether or not the transformers version wraps the model in ``.text_model`` (flattened in
    transformers >= 5.6). With `position_ids`, adds the int64 ``embeddings.position_ids`` [1, P]
    buffer that real SD 1.x checkpoints carry (transformers no longer saves it).
    """
    inner = getattr(text_encoder, "text_model", text_encoder)
    out = {TEXT_ENCODER_PREFIX + key: tensor for key, tensor in inner.state_dict().items()}
    key = TEXT_ENCODER_PREFIX + "embeddings.position_ids"
    if position_ids and key not in out:
        positions = inner.embeddings.position_embedding.weight.shape[0]
        out[key] = torch.arange(positions, dtype=torch.int64).unsqueeze(0)
    elif not position_ids:
        out.pop(key, None)
    return out


def ldm_state_dict(unet=None, vae=None, text_encoder=None, dtype: torch.dtype | None = None,
                   position_ids: bool = True) -> dict[str, torch.Tensor]:
    """One CompVis-layout state dict of the given components (any may be None to leave it out).

    `dtype` casts floating tensors (e.g. torch.float16, as most distributed checkpoints are);
    integer buffers such as position_ids stay int64.
    """
    sd: dict[str, torch.Tensor] = {}
    if unet is not None:
        sd.update(unet_to_ldm(unet))
    if vae is not None:
        sd.update(vae_to_ldm(vae))
    if text_encoder is not None:
        sd.update(text_encoder_to_ldm(text_encoder, position_ids=position_ids))
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    return sd


def write_single_file(path: str | os.PathLike, unet=None, vae=None, text_encoder=None, fmt: str | None = None,
                      dtype: torch.dtype | None = None, position_ids: bool = True,
                      ckpt_extra: dict | None = None) -> Path:
    """Write the components as one original-layout SD checkpoint, like those in ComfyUI's models/checkpoints.

    Args:
        path: destination file (parents created).
        unet, vae, text_encoder: diffusers/transformers modules; None leaves that component out.
        fmt: "safetensors" (safetensors.torch.save_file) or "ckpt" (torch.save of
            ``{"state_dict": sd}``, the CompVis .ckpt layout); default from the suffix
            (".safetensors" -> safetensors, anything else -> ckpt). diffusers picks the reader by
            the file's extension, so keep the suffix consistent with `fmt`.
        dtype: cast floating tensors to this dtype (e.g. torch.float16).
        position_ids: include ``cond_stage_model.transformer.text_model.embeddings.position_ids``.
        ckpt_extra: extra top-level entries of a .ckpt (e.g. ``{"global_step": 840000}``).

    Returns:
        the path written.
    """
    path = Path(path)
    if fmt is None:
        fmt = "safetensors" if path.suffix == ".safetensors" else "ckpt"
    sd = ldm_state_dict(unet, vae, text_encoder, dtype=dtype, position_ids=position_ids)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    elif fmt == "ckpt":
        torch.save({**(ckpt_extra or {}), "state_dict": sd}, path)
    else:
        raise ValueError(f"fmt must be 'safetensors' or 'ckpt', not {fmt!r}")
    return path
