"""DMP's training objective on VAE latents, shared by the trainer and the demo's prior.

x and y are VAE latents (a sample of the latent distribution times the scaling factor 0.18215),
t is uniform over the schedule's steps, a = alphas_cumprod[t], z_t = interpolate(y, x, a), and the
UNet regresses training_target(y, x, a) under an MSE loss in float32 — every formula from
``dmp_model.sampling``, so training and inference share them (DMP_METHOD.md, "Training").

The trainer calls it with x = the input image's latent and y = the target's; the demo's prior
(``training.demo.prior``) with x = Gaussian noise and y = an image latent, which is exactly SD's
text-free diffusion pre-training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dmp_model.sampling import expand_alpha, interpolate, training_target


@torch.no_grad()
def latent_moments(vae: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the VAE's latent distribution for pixels [B, 3, H, W] in [-1, 1]."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return dist.mean.float(), dist.std.float()


def sample_latents(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator,
                   scaling_factor: float) -> torch.Tensor:
    """A sample of the latent distribution, as ``DiagonalGaussianDistribution.sample``, scaled."""
    noise = torch.randn(mean.shape, generator=generator).to(mean.device)
    return (mean + std * noise) * scaling_factor


def dmp_loss(unet, x: torch.Tensor, y: torch.Tensor, context: torch.Tensor, alphas_cumprod: torch.Tensor,
             prediction_type: str, generator: torch.Generator, min_timestep: int = 0) -> torch.Tensor:
    """DMP's objective for latents x (input) and y (target) [B, 4, h, w]: MSE in float32.

    t ~ U{min_timestep..T-1} per sample (DMP: from 0), a = alphas_cumprod[t],
    z_t = sqrt(a) y + sqrt(1 - a) x, and the UNet regresses ``training_target``
    (v = sqrt(a) x - sqrt(1 - a) y for v-prediction).
    """
    t = torch.randint(min_timestep, alphas_cumprod.shape[0], (x.shape[0],), generator=generator).to(x.device)
    alpha = expand_alpha(alphas_cumprod, t, x.ndim).to(x.dtype)  # [B, 1, 1, 1]
    z_t = interpolate(y, x, alpha)
    target = training_target(prediction_type, y, x, alpha)
    prediction = unet(z_t, t, encoder_hidden_states=context).sample
    return F.mse_loss(prediction.float(), target.float())
