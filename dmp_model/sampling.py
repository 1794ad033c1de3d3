"""The DMP interpolation process: schedule, training objective and deterministic sampler.

DMP (Lee et al., "Exploiting Diffusion Prior for Generalizable Dense Prediction", CVPR 2024)
replaces the noise of a diffusion process with the input image's latent x and the clean sample
with the prediction's latent y. Training (``interpolate`` + ``training_target``) and inference
(``sample_dmp``) share the formulas below, so the two cannot drift apart.

Everything here is a small pure function of tensors, in the manner of k-diffusion's
``sampling.py``; the network hides behind a ``model(z, t) -> output`` callable.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .options import check_int, check_option, option_error

logger = logging.getLogger(__name__)

PREDICTION_TYPES = ("v_prediction", "epsilon", "sample")
SAMPLERS = ("ddim", "oracle")
SPACINGS = ("leading", "trailing")
FINAL_OUTPUTS = ("z", "y_hat")

Denoiser = Callable[[torch.Tensor, int], torch.Tensor]
StepCallback = Callable[[int, int, torch.Tensor], None]


@dataclass(frozen=True)
class Schedule:
    """The constants the sampler takes from a base's scheduler config.

    Attributes:
        alphas_cumprod: float32 [num_train_timesteps] (also what training interpolates with).
        final_alpha: alpha after the last step (alphas_cumprod[0] = 0.99915 for SD 1.x).
        steps_offset: added to "leading" timesteps (1 for SD 1.x).
        clip_sample: clamp range for y_hat when the config clips (SD 1.x does not: None).
    """

    alphas_cumprod: torch.Tensor
    final_alpha: torch.Tensor
    steps_offset: int
    clip_sample: float | None


# What a scheduler config may say, with diffusers' DDIMScheduler defaults for what it leaves out
# (the reference builds its DDIM scheduler from the base's config, so missing keys mean these).
_DDIM_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                  "trained_betas": None, "clip_sample": True, "clip_sample_range": 1.0, "set_alpha_to_one": True,
                  "steps_offset": 0, "thresholding": False, "rescale_betas_zero_snr": False}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# SD 1.x's scheduler release config, the schedule DMP was trained with (betas scaled_linear 0.00085..0.012 over
# 1000 steps, steps_offset 1, set_alpha_to_one False, no clipping): the one home of these constants. The base
# folders the tiny models write and the bases without a scheduler/ folder use it.
SD1_SCHEDULER_CONFIG = {"_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                        "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
                        "prediction_type": "v_prediction", "set_alpha_to_one": False, "steps_offset": 1,
                        "timestep_spacing": "leading", "trained_betas": None}


def betas_for_schedule(name: str, num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """float32 betas [T] of a named schedule, with diffusers' arithmetic (so alphas match bit for bit).

    "scaled_linear" is SD 1.x's: linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2; "squaredcos_cap_v2" is
    the cosine schedule of Nichol and Dhariwal (2021), betas capped at 0.999.
    """
    if name == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if name == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if name == "squaredcos_cap_v2":
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        steps = range(num_train_timesteps)
        return torch.tensor([min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps),
                                 0.999) for i in steps], dtype=torch.float32)
    raise option_error("beta_schedule", name, BETA_SCHEDULES)


def schedule_from_config(scheduler_config: dict) -> Schedule:
    """Resolve a diffusers scheduler config as its DDIMScheduler does, defaults included (as the reference).

    Pure torch, so that the ComfyUI nodes, which must not import diffusers, share it.
    """
    config = {**_DDIM_DEFAULTS, **{k: v for k, v in scheduler_config.items() if k in _DDIM_DEFAULTS}}
    if config["rescale_betas_zero_snr"]:
        raise ValueError("scheduler configs with rescale_betas_zero_snr are not supported: DMP's adapters were "
                         "trained on SD 1.x's schedule, which does not rescale")
    if config["thresholding"]:
        logger.warning("the scheduler config asks for dynamic thresholding, which DMP does not use; ignored")
    if config["trained_betas"] is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
    else:
        betas = betas_for_schedule(config["beta_schedule"], int(config["num_train_timesteps"]),
                                   config["beta_start"], config["beta_end"])
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    final_alpha = torch.tensor(1.0) if config["set_alpha_to_one"] else alphas_cumprod[0].clone()
    return Schedule(alphas_cumprod, final_alpha, int(config["steps_offset"]),
                    float(config["clip_sample_range"]) if config["clip_sample"] else None)


def sd1_schedule() -> Schedule:
    """SD 1.x's schedule (``SD1_SCHEDULER_CONFIG``): alphas_cumprod equal to diffusers' DDIMScheduler's."""
    return schedule_from_config(SD1_SCHEDULER_CONFIG)


def max_steps(spacing: str, num_train_timesteps: int = 1000, steps_offset: int = 1) -> int:
    """The most steps a spacing allows: "leading" with more would start past t = T - 1 (T - 1 steps for SD 1.x:
    1000 would start at t = 1000)."""
    check_option("spacing", spacing, SPACINGS)
    if spacing == "trailing":
        return num_train_timesteps
    starts_inside = (n for n in range(num_train_timesteps, 0, -1)
                     if (n - 1) * (num_train_timesteps // n) + steps_offset < num_train_timesteps)
    return next(starts_inside, 0)


def get_timesteps(
    num_steps: int,
    spacing: str = "leading",
    num_train_timesteps: int = 1000,
    steps_offset: int = 1,
) -> list[int]:
    """DDIM timesteps, largest first ("leading" with offset 1 gives 801, 601, 401, 201, 1 for 5).

    "trailing" starts at t = num_train_timesteps - 1 (999), as single-step predictors use.
    """
    check_int("steps", num_steps, 1, max_steps(spacing, num_train_timesteps, steps_offset))
    if spacing == "leading":
        ratio = num_train_timesteps // num_steps
        return [(num_steps - 1 - i) * ratio + steps_offset for i in range(num_steps)]
    # "trailing": the same arithmetic as diffusers' DDIMScheduler (numpy, round half to even).
    points = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps))
    return [int(v) - 1 for v in points]


def previous_alpha(
    alphas_cumprod: torch.Tensor, t: int, num_steps: int, final_alpha: torch.Tensor
) -> torch.Tensor:
    """alpha_cumprod of the step after t: alphas_cumprod[t - 1000 // N], or final_alpha past 0."""
    prev_t = t - alphas_cumprod.shape[0] // num_steps
    return alphas_cumprod[prev_t] if prev_t >= 0 else final_alpha


def interpolate(y: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """z_t = sqrt(a) * y + sqrt(1 - a) * x: the input latent x takes the place of the noise."""
    return alpha**0.5 * y + (1 - alpha) ** 0.5 * x


def velocity(y: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """v = sqrt(a) * x - sqrt(1 - a) * y, the velocity DMP's UNet learns to predict."""
    return alpha**0.5 * x - (1 - alpha) ** 0.5 * y


def training_target(
    prediction_type: str, y: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor
) -> torch.Tensor:
    """What the UNet regresses for each parametrisation (epsilon: x, sample: y, v: velocity)."""
    if prediction_type == "v_prediction":
        return velocity(y, x, alpha)
    if prediction_type == "epsilon":
        return x
    if prediction_type == "sample":
        return y
    raise option_error("prediction_type", prediction_type, PREDICTION_TYPES)


def expand_alpha(alphas_cumprod: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """alphas_cumprod[t] per batch element, shaped [B, 1, 1, 1] to broadcast over latents."""
    alpha = alphas_cumprod.to(t.device)[t]
    return alpha.reshape(alpha.shape + (1,) * (ndim - alpha.ndim))


def split_prediction(
    model_output: torch.Tensor,
    z: torch.Tensor,
    alpha: torch.Tensor,
    prediction_type: str,
    x: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's estimates (y_hat, x_hat) of prediction and input latents at z_t.

    With ``x`` given ("oracle" DDIM, the paper's variant) the true input latent replaces x_hat
    for the v and sample parametrisations; an epsilon model's output already is its x estimate
    and is kept, as in the reference implementation.
    """
    sqrt_a, sqrt_1ma = alpha**0.5, (1 - alpha) ** 0.5
    if prediction_type == "v_prediction":
        y_hat = sqrt_a * z - sqrt_1ma * model_output
        x_hat = sqrt_a * model_output + sqrt_1ma * z
    elif prediction_type == "epsilon":
        y_hat = (z - sqrt_1ma * model_output) / sqrt_a
        return y_hat, model_output
    elif prediction_type == "sample":
        y_hat = model_output
        x_hat = (z - sqrt_a * y_hat) / sqrt_1ma
    else:
        raise option_error("prediction_type", prediction_type, PREDICTION_TYPES)
    return y_hat, (x if x is not None else x_hat)


def ddim_step(y_hat: torch.Tensor, x_hat: torch.Tensor, alpha_prev: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM move (eta = 0): z_prev = sqrt(a_prev) * y_hat + sqrt(1 - a_prev) * x_hat."""
    return interpolate(y_hat, x_hat, alpha_prev)


def apply_guidance(output: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance on a [cond; uncond] batch: uncond + g * (cond - uncond)."""
    cond, uncond = output.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


@torch.no_grad()
def sample_dmp(
    model: Denoiser,
    x: torch.Tensor,
    timesteps: Sequence[int],
    schedule: Schedule,
    prediction_type: str = "v_prediction",
    oracle: bool = False,
    final_output: str = "z",
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DMP's deterministic interpolation sampler, from the input latent x to the prediction latent.

    Args:
        model: ``model(z, t) -> output`` for latents [B, 4, h, w] (guidance is the model's business).
        x: input image latents [B, 4, h, w]; the chain starts at z = x, no noise added.
        timesteps: from ``get_timesteps``, largest first.
        schedule: the base's constants (``schedule_from_config``): alphas_cumprod, the alpha after
            the last step (alphas_cumprod[0] = 0.99915 for SD 1.x), y_hat clipping (off for SD 1.x).
        prediction_type: one of PREDICTION_TYPES.
        oracle: use x itself as x_hat (the paper's "oracle" DDIM) instead of the model's estimate.
        final_output: "z" returns the last z, as the reference (keeps 0.029 * x at a_prev = 0.99915);
            "y_hat" returns the model's estimate of y at the last step.
        callback: ``callback(i, N, z)`` after each step; may raise to interrupt.

    Returns:
        prediction latents [B, 4, h, w].
    """
    check_option("final_output", final_output, FINAL_OUTPUTS)
    num_steps = len(timesteps)
    alphas_cumprod = schedule.alphas_cumprod.to(x.device)
    final_alpha = schedule.final_alpha.to(x.device)
    clip_sample = schedule.clip_sample
    z = x
    y_hat = x
    for i, t in enumerate(timesteps):
        alpha = alphas_cumprod[t]
        output = model(z, t)
        y_hat, x_hat = split_prediction(output, z, alpha, prediction_type, x if oracle else None)
        if clip_sample is not None:
            y_hat = y_hat.clamp(-clip_sample, clip_sample)
        z = ddim_step(y_hat, x_hat, previous_alpha(alphas_cumprod, t, num_steps, final_alpha))
        if callback is not None:
            callback(i, num_steps, z)
    return z if final_output == "z" else y_hat
