"""Training speed and memory on the CPU: the DMP trainer's step against a plain diffusers LoRA step.

    HF_HUB_OFFLINE=1 python benchmarks/bench_training.py [--shapes tiny sd1] [--steps 3] [--threads 2]

Shapes: "tiny" is dmp_model.sd.tiny's SD-shaped model at 64 px, batch 8; "sd1" is the real SD 1.x
UNet and VAE (configs from dmp_model/sd/configs/sd1, random weights: nothing is downloaded) at
256 px, batch 1. Both variants adapt the same layers (rank 4 on to_q/k/v/out of all 16 blocks)
with AdamW and gradient clipping:

- dmp: the trainer's step (training.trainer): VAE latent distributions of the input image and of
  the target image, latent samples, ``dmp_loss`` (interpolation + velocity target), backward,
  clip, AdamW step;
- plain: diffusers' train_text_to_image_lora.py step: one VAE latent sample, noise, DDPM
  ``add_noise``, epsilon MSE, backward, clip, AdamW step.

Each (shape, variant) runs in a fresh child process, so "peak memory" is that process's peak
resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``: model build plus the steps).
The first step is a warm-up and is not timed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"tiny": {"resolution": 64, "batch": 8}, "sd1": {"resolution": 256, "batch": 1}}


def build(shape: str):
    """(unet, vae, text context, alphas_cumprod, scheduler config) with random weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from dmp_model.sampling import SD1_SCHEDULER_CONFIG, schedule_from_config
    from dmp_model.sd.tiny import build_tiny_components

    torch.manual_seed(0)
    if shape == "tiny":
        unet, vae, _ = build_tiny_components(0)
        width = 32
    else:
        configs = ROOT / "dmp_model" / "sd" / "configs" / "sd1"
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae"))
        width = 768
    scheduler_config = dict(SD1_SCHEDULER_CONFIG)
    context = torch.randn(1, 77, width)
    return unet, vae, context, schedule_from_config(scheduler_config).alphas_cumprod, scheduler_config


def run(shape: str, variant: str, steps: int, threads: int, queue) -> None:
    """Child process: build, train `steps` + 1 steps, report timings and peak RSS."""
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from training.config import TrainConfig
    from training.objective import dmp_loss, latent_moments, sample_latents
    from training.trainer import add_lora

    torch.set_num_threads(threads)
    unet, vae, context, alphas, scheduler_config = build(shape)
    vae.requires_grad_(False)
    config = TrainConfig(base="-", train_images="-", train_targets="-", rank=4)
    params = add_lora(unet, config)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    noise_scheduler = DDPMScheduler.from_config(scheduler_config)
    size, batch = SHAPES[shape]["resolution"], SHAPES[shape]["batch"]
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=generator) * 2 - 1
    targets = torch.rand(batch, 3, size, size, generator=generator) * 2 - 1
    context = context.expand(batch, -1, -1)
    unet.train()

    def dmp_step():
        x = sample_latents(*latent_moments(vae, images), generator, 0.18215)
        y = sample_latents(*latent_moments(vae, targets), generator, 0.18215)
        return dmp_loss(unet, x, y, context, alphas, "v_prediction", generator)

    def plain_step():
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample(generator=generator) * 0.18215
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, 1000, (batch,), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        prediction = unet(noisy, t, encoder_hidden_states=context).sample
        return F.mse_loss(prediction.float(), noise.float())

    step = dmp_step if variant == "dmp" else plain_step
    times = []
    for i in range(steps + 1):
        started = time.perf_counter()
        loss = step()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - started)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    queue.put({"shape": shape, "variant": variant, "steps_per_s": len(times) / sum(times),
               "seconds_per_step": sum(times) / len(times), "peak_rss_mib": peak_mib})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=tuple(SHAPES), default=list(SHAPES))
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    results = {}
    for shape in args.shapes:
        for variant in ("dmp", "plain"):
            queue = context.Queue()
            child = context.Process(target=run, args=(shape, variant, args.steps, args.threads, queue))
            child.start()
            results[shape, variant] = queue.get()
            child.join()
    print(f"CPU, {args.threads} threads, {args.steps} timed steps after 1 warm-up; "
          "peak = child process max RSS (getrusage ru_maxrss)")
    print(f"{'shape':<6} {'variant':<6} {'steps/s':>9} {'s/step':>8} {'peak MiB':>9}")
    for (shape, variant), r in results.items():
        print(f"{shape:<6} {variant:<6} {r['steps_per_s']:>9.3f} {r['seconds_per_step']:>8.3f} "
              f"{r['peak_rss_mib']:>9.0f}")
    for shape in args.shapes:
        dmp, plain = results[shape, "dmp"], results[shape, "plain"]
        print(f"{shape}: dmp/plain time per step {dmp['seconds_per_step'] / plain['seconds_per_step']:.2f}x, "
              f"peak memory {dmp['peak_rss_mib'] / plain['peak_rss_mib']:.2f}x")


if __name__ == "__main__":
    main()
