"""Key -> shape tables in the layouts real weight files have, and writers of such files (test helpers).

Weight-file detection works on key names and shapes only; ``write_keys`` writes a file with these
keys and tiny tensors (only the shapes detection reads are real).
"""

from __future__ import annotations

import torch
from safetensors.torch import save_file

U = "model.diffusion_model."
VAE_KEYS = {"first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
            "first_stage_model.decoder.conv_out.weight": (3, 128, 3, 3)}
SD1_TEXT = {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
            "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,)}


def unet_keys(in_channels: int = 4, context: int = 768) -> dict[str, tuple[int, ...]]:
    return {U + "input_blocks.0.0.weight": (320, in_channels, 3, 3),
            U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, context),
            U + "out.2.weight": (4, 320, 3, 3)}


SD1 = {**unet_keys(), **VAE_KEYS, **SD1_TEXT}
SD2 = {**unet_keys(context=1024), **VAE_KEYS,
       "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3072, 1024),
       "cond_stage_model.model.token_embedding.weight": (49408, 1024)}
SDXL = {**unet_keys(context=2048), **VAE_KEYS, U + "label_emb.0.0.weight": (1280, 2816),
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
        "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280)}
SD3 = {U + "joint_blocks.0.context_block.attn.qkv.weight": (4608, 1536), U + "x_embedder.proj.weight": (1536, 16, 2, 2),
       **VAE_KEYS}
FLUX = {"double_blocks.0.img_attn.qkv.weight": (9216, 3072), "single_blocks.0.linear1.weight": (21504, 3072),
        "img_in.weight": (3072, 64)}
INPAINTING = {**unet_keys(in_channels=9), **VAE_KEYS, **SD1_TEXT}
INSTRUCT = {**unet_keys(in_channels=8), **VAE_KEYS, **SD1_TEXT}
KOHYA_LORA = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320),
              "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": (320, 4),
              "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": ()}
DMP_LORA = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight": (4, 320),
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight": (320, 4)}
PEFT_LORA = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": (4, 320),
             "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": (320, 4)}
OLD_DIFFUSERS_LORA = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight": (4, 320),
                      "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight": (320, 4)}
VAE_ONLY = {"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_out.weight": (3, 128, 3, 3),
            "quant_conv.weight": (8, 8, 1, 1)}
DIFFUSERS_UNET = {"conv_in.weight": (320, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3),
                  "mid_block.resnets.0.conv1.weight": (1280, 1280, 3, 3)}
DIFFUSERS_TEXT = {"text_model.embeddings.token_embedding.weight": (49408, 768),
                  "text_model.encoder.layers.0.mlp.fc1.weight": (3072, 768)}
RANDOM = {"weight": (3, 3), "bias": (3,), "layers.0.kernel": (2, 2)}

# What a user must read in the error for each family: the name of what they passed.
FOUND = {"sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL", "sd3": "Stable Diffusion 3", "flux": "Flux",
         "sd1-inpainting": "inpainting", "sd1-instruct": "InstructPix2Pix", "lora": "LoRA adapter",
         "vae": "VAE on its own", "diffusers-weights": "one component of a diffusers folder",
         "unknown": "not a Stable Diffusion checkpoint"}


def write_keys(path, shapes) -> str:
    """A safetensors file with these key names; tensors are zeros of the given shapes (tiny ones shrunk)."""
    tensors = {k: torch.zeros(s if (k.endswith("input_blocks.0.0.weight") or "attn2.to_k" in k) else
                              tuple(min(d, 2) for d in s)) for k, s in shapes.items()}
    save_file(tensors, str(path))
    return str(path)


class Payload:
    """Unpickling this would create `path`: proof that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))
