"""What the speed benchmarks compare: DMPModel, bare loops doing the same maths, and Marigold.

Every network is built from ONE set of random SD 1.x-shaped weights (no download), shared in
memory where they are equal:

- ``model``: ``DMPModel`` (diffusers + peft) with a random rank-4 depth adapter and a second one
  (``OTHER``) to switch to;
- ``merged_unet``: a plain diffusers UNet whose attention weights are W + up @ down, merged here by
  hand from the adapter's tensors (no peft, no engine code): the algorithm's limit on this stack;
- ``peft_unet``: the same base with the adapter attached by peft and left unmerged (the engine's
  path before merging existed), to show what merging buys per UNet call;
- ``marigold``: diffusers' ``MarigoldDepthPipeline`` on the same base with its UNet widened to 8
  input channels as Marigold does (conv_in weights repeated and halved), DDIM with trailing spacing.

The bare loops (``bare_dmp``, ``bare_marigold``) restate the maths with nothing around it: VAE
encode (the latent mean), the DDIM steps, VAE decode, the depth codec.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "tests", ROOT / "tests" / "support"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from dmp_model import DMPModel  # noqa: E402
from dmp_model.sampling import SD1_SCHEDULER_CONFIG, get_timesteps  # noqa: E402
from dmp_model.sd.loading import SD1_CONFIG_DIR, BaseComponents  # noqa: E402
from dmp_model.sd.tiny import tiny_unet_config, tiny_vae_config  # noqa: E402
from dmp_model.tasks.codecs import DEPTH_TARGET_SCALE  # noqa: E402
from factories import official_state_dict, random_lora  # noqa: E402

ADAPTER = "depth-bench-notext"
OTHER = "normal-bench-notext"
DEPTH_SCALE = DEPTH_TARGET_SCALE  # DMP's depth adapters: a decoded value of 1 is 8 m


@dataclass
class Models:
    model: DMPModel
    merged_unet: torch.nn.Module
    peft_unet: torch.nn.Module
    marigold: object
    vae: torch.nn.Module
    context: torch.Tensor          # [1, 77, D]: the empty-prompt embedding DMP uses (random here)
    alphas_cumprod: torch.Tensor   # [1000]
    final_alpha: torch.Tensor      # alphas_cumprod[0]: set_alpha_to_one = False


def sd1_configs(shape: str) -> tuple[dict, dict, dict]:
    """UNet, VAE and scheduler configs: the real SD 1.x ones, or the tiny test shape."""
    scheduler = dict(SD1_SCHEDULER_CONFIG)
    if shape == "tiny":
        return tiny_unet_config(), tiny_vae_config(), scheduler
    if shape != "sd1":
        raise ValueError(f"shape must be one of ('tiny', 'sd1'), got {shape!r}")
    unet = json.loads((SD1_CONFIG_DIR / "unet" / "config.json").read_text())
    vae = json.loads((SD1_CONFIG_DIR / "vae" / "config.json").read_text())
    return unet, vae, scheduler


def unet_like(config: dict, state: dict[str, torch.Tensor], **changes) -> torch.nn.Module:
    """A UNet built on the meta device and given `state`'s tensors themselves (no copy)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config({**config, **changes})
    unet.load_state_dict(state, assign=True, strict=True)
    return unet.eval().requires_grad_(False)


def write_adapter(lora: dict, folder: Path, info: dict) -> Path:
    """A random adapter as DMP publishes it (official layout), facts in the metadata."""
    from safetensors.torch import save_file

    from dmp_model.adapters import ADAPTER_FILE, AdapterInfo, info_to_metadata

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in official_state_dict(lora).items()}
    save_file(state, str(folder / ADAPTER_FILE),
              metadata={"format": "pt", **info_to_metadata(AdapterInfo(**info))})
    return folder


def build(shape: str, device: str, dtype: torch.dtype, workdir: Path, seed: int = 0) -> Models:
    """Every network of the comparison from one set of random weights (see the module docstring)."""
    from diffusers import AutoencoderKL, DDIMScheduler, MarigoldDepthPipeline, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging

    from dmp_model.sd.lora import attach_adapter, to_peft_state_dict

    diffusers_logging.set_verbosity_error()  # casting random models is intended: no warnings about it
    unet_config, vae_config, scheduler_config = sd1_configs(shape)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(unet_config).eval().requires_grad_(False).to(device, dtype)
    vae = AutoencoderKL.from_config(vae_config).eval().requires_grad_(False).to(device, dtype)
    state = dict(unet.state_dict())                                     # the original tensors
    loras = {name: random_lora(unet, seed=index + 1) for index, name in enumerate((ADAPTER, OTHER))}
    # 1. The plain UNet with the adapter merged by hand: W + up @ down (fp32 maths, then the dtype).
    merged = dict(state)
    for module, (down, up) in loras[ADAPTER].items():
        key = f"{module}.weight"
        merged[key] = (state[key].float() + up.to(device) @ down.to(device)).to(dtype)
    merged_unet = unet_like(unet_config, merged)
    # 2. The same base with the adapter unmerged in peft's layers.
    peft_unet = unet_like(unet_config, state)
    official = official_state_dict(loras[ADAPTER])
    attach_adapter(peft_unet, {k: v.to(device, dtype) for k, v in to_peft_state_dict(official, unet_config).items()},
                   ADAPTER)
    # 3. Marigold's UNet: conv_in takes [image latent; prediction latent], weights repeated and halved.
    wide = dict(state, **{"conv_in.weight": state["conv_in.weight"].repeat(1, 2, 1, 1) * 0.5})
    marigold_unet = unet_like(unet_config, wide, in_channels=8)
    scheduler = DDIMScheduler.from_config(scheduler_config, timestep_spacing="trailing",
                                          prediction_type="v_prediction")
    marigold = MarigoldDepthPipeline(marigold_unet, vae, scheduler, None, None, prediction_type="depth",
                                     default_denoising_steps=4, default_processing_resolution=768)
    marigold.set_progress_bar_config(disable=True)
    # 4. DMPModel on the very same UNet and VAE objects.
    components = BaseComponents(unet, vae, lambda: None, lambda: None, scheduler_config, workdir,
                                torch.device(device), dtype)
    model = DMPModel(components)
    context = torch.randn(1, 77, unet_config["cross_attention_dim"],
                          generator=torch.Generator().manual_seed(seed)).to(device, dtype)
    model.text._empty = context  # skip the text encoder: it is not what is compared
    # Marigold encodes "" without padding: 2 tokens (BOS, EOS) where DMP uses all 77.
    marigold.empty_text_embedding = context[:, :2]
    for name in (ADAPTER, OTHER):
        model.load_adapter(write_adapter(loras[name], workdir / shape / name,
                                         {"task": name.split("-")[0], "target_scale": DEPTH_SCALE}))
    alphas_cumprod = model.schedule.alphas_cumprod.to(device)
    return Models(model, merged_unet, peft_unet, marigold, vae, context, alphas_cumprod, alphas_cumprod[0])


@torch.no_grad()
def ddim_loop(unet, z: torch.Tensor, context: torch.Tensor, timesteps: list[int], models: Models,
              image_latent: torch.Tensor | None = None) -> torch.Tensor:
    """v-prediction DDIM (eta 0) by hand; with `image_latent`, Marigold's [image; z] UNet input."""
    ratio = models.alphas_cumprod.shape[0] // len(timesteps)
    for t in timesteps:
        a = models.alphas_cumprod[t]
        a_prev = models.alphas_cumprod[t - ratio] if t - ratio >= 0 else models.final_alpha
        net_in = z if image_latent is None else torch.cat([image_latent, z], dim=1)
        v = unet(net_in, torch.tensor(t, device=z.device), encoder_hidden_states=context).sample
        y_hat = a.sqrt() * z - (1 - a).sqrt() * v
        x_hat = a.sqrt() * v + (1 - a).sqrt() * z
        z = a_prev.sqrt() * y_hat + (1 - a_prev).sqrt() * x_hat
    return z


@torch.no_grad()
def bare_dmp(models: Models, images: torch.Tensor, steps: int = 5, spacing: str = "leading",
             unet: torch.nn.Module | None = None) -> torch.Tensor:
    """DMP with nothing around it: images [B, 3, H, W] in [0, 1] (H, W multiples of 8) -> metres [B, H, W]."""
    vae, dtype = models.vae, models.context.dtype
    pixels = (images * 2 - 1).to(models.context.device, dtype)
    x = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor                 # [B, 4, h, w]
    z = ddim_loop(unet or models.merged_unet, x, models.context.expand(x.shape[0], -1, -1),
                  get_timesteps(steps, spacing), models)
    decoded = vae.decode(z / vae.config.scaling_factor).sample                        # [B, 3, H, W]
    return ((decoded.float().mean(dim=1) / 2 + 0.5).clamp(min=0) * DEPTH_SCALE).cpu()


@torch.no_grad()
def bare_marigold(models: Models, images: torch.Tensor, steps: int = 4, seed: int = 0) -> torch.Tensor:
    """Marigold with nothing around it: noise -> affine-invariant depth [B, H, W] in [0, 1]."""
    vae, dtype = models.vae, models.context.dtype
    pixels = (images * 2 - 1).to(models.context.device, dtype)
    x = vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor
    noise = torch.randn(x.shape, generator=torch.Generator(x.device).manual_seed(seed), device=x.device,
                        dtype=dtype)
    timesteps = get_timesteps(steps, "trailing")
    z = ddim_loop(models.marigold.unet, noise, models.context[:, :2].expand(x.shape[0], -1, -1), timesteps,
                  models, image_latent=x)
    decoded = vae.decode(z / vae.config.scaling_factor).sample
    return ((decoded.float().mean(dim=1).clamp(-1, 1) + 1) / 2).cpu()


def run_marigold(models: Models, images: torch.Tensor, steps: int, seed: int = 0) -> torch.Tensor:
    """diffusers' MarigoldDepthPipeline at processing resolution = the images' longer side; [B, H, W]."""
    generator = torch.Generator(models.context.device).manual_seed(seed)
    out = models.marigold(images, num_inference_steps=steps, processing_resolution=max(images.shape[-2:]),
                          batch_size=images.shape[0], generator=generator, output_type="pt")
    return out.prediction[:, 0].float().cpu()


def run_dmp(models: Models, images: torch.Tensor, steps: int = 5, spacing: str = "leading") -> torch.Tensor:
    """DMPModel.predict at processing resolution = the images' shorter side; metres [B, H, W]."""
    return models.model.predict(images, ADAPTER, steps=steps, spacing=spacing,
                                processing_resolution=min(images.shape[-2:]), batch_size=images.shape[0]).raw
