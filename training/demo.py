"""`dmp demo`: the whole method on the miniature world, on a CPU, in a few minutes.

1. Render a training and a held-out set of world scenes with exact labels (``training.world``).
2. Build the tiny SD-shaped model (``dmp_model.tiny``, UNet width 64) and give it the prior it needs.
   What the tiny model knows, honestly: its VAE is pre-trained as an autoencoder on world images and
   on depth and normal maps (a VAE that cannot reconstruct a depth map cannot carry a depth
   prediction), then its latent space is rescaled exactly so that SD's scaling factor 0.18215 gives
   unit-variance latents. Its UNet and text encoder stay random (seeded): the UNet has no image
   prior at all, so everything task-specific is learnt by the LoRA. (Pre-training the UNet as a
   diffusion model, an identity denoiser or an albedo predictor for 300-600 steps did not help the
   adapters in this budget; a wider random UNet did: LoRA on random features of width 64 learns
   what width 32 cannot.)
3. Train a depth and a normal adapter with ``dmp train`` itself (``python -m training train
   --config``), two processes at once. Unlike the paper (rank 4, lr 1e-4, v-prediction, 50K steps)
   the demo uses rank 16, lr 3e-3 and the "sample" parametrisation (the UNet regresses the target
   latent y; same interpolation z_t, same sampler): with a random UNet and a few hundred steps,
   v-prediction stays about 25 % worse. ``dmp train`` defaults to DMP's v-prediction.
4. Predict the held-out scenes with the engine (``DMPModel`` and the DMP sampler), compare with the
   truth, with the best constant depth (the weighted median minimising AbsRel) and with the
   per-pixel layout prior (the same statistic per pixel over the training depth maps, which
   ignores the image), and write ``results.png`` (input | depth prediction | depth truth | normal
   prediction | normal truth per row) and ``metrics.json``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dmp_model.adapters import AdapterInfo
from dmp_model.writers import atomic_path, write_png8

from .config import TrainConfig
from .data import encode_raw_target, read_normals
from .metrics import TaskMetrics, best_constant_depth_map, constant_depth_abs_rel
from .trainer import train
from .world import NORMAL_CONVENTION, write_dataset

logger = logging.getLogger(__name__)

DEMO_MARKER = "demo.json"
_PARTS = ("world", "base", "depth", "normal", "logs", "results.png", "metrics.json", DEMO_MARKER)


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and budgets of the demo (defaults: about 3 minutes on 2 CPU cores)."""

    seed: int = 0
    size: int = 64  # image side; latents are size / 8
    target_scale: float = 8.0  # depth: metres encoded as white (DMP: 8); the world's depths stay below it
    train_scenes: int = 256
    val_scenes: int = 32
    vae_width: int = 16
    unet_width: int = 64
    vae_steps: int = 600
    vae_batch: int = 8
    vae_lr: float = 3e-3
    vae_threads: int = 2  # the VAE's convolutions use both cores; the UNet's small ops do not
    depth_steps: int = 300
    normal_steps: int = 300
    batch_size: int = 16
    rank: int = 16
    learning_rate: float = 3e-3
    prediction_type: str = "sample"
    parallel: bool = True  # train the two adapters in two processes at once, one thread each


# The prior ----------------------------------------------------------------------------------------

def load_pixels(folder: Path, names: list[str], target_scale: float) -> tuple[torch.Tensor, ...]:
    """World images, depth and normal maps of `folder` as VAE pixels [N, 3, H, W] in [-1, 1].

    Targets are encoded exactly as the trainer encodes them (``data.encode_raw_target``, the task
    codecs; depth with `target_scale` metres as white), so the VAE learns the images it will carry.
    """
    from dmp_model.imageproc import load_image

    depth_info = AdapterInfo(task="depth", target_scale=target_scale)
    normal_info = AdapterInfo(task="normal", normal_convention=NORMAL_CONVENTION)
    images, depths, normals = [], [], []
    for name in names:
        images.append(load_image(folder / "images" / f"{name}.png") * 2 - 1)
        depths.append(torch.from_numpy(np.load(folder / "depth" / f"{name}.npy")))
        normals.append(read_normals(folder / "normal" / f"{name}.png", NORMAL_CONVENTION, NORMAL_CONVENTION))
    return (torch.stack(images), encode_raw_target(torch.stack(depths), depth_info),
            encode_raw_target(torch.stack(normals), normal_info))


def pretrain_vae(vae, pixels: torch.Tensor, steps: int, batch: int, lr: float, seed: int) -> float:
    """Autoencoder pre-training: MSE plus SD's tiny KL weight (1e-6), one-cycle learning rate.

    Returns the last loss. The annealed schedule matters: the same steps at a constant rate leave
    reconstructions of depth maps about twice as far off.
    """
    generator = torch.Generator().manual_seed(seed)
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=max(steps, 1), pct_start=0.1)
    loss = torch.tensor(math.nan)
    for _ in range(steps):
        x = pixels[torch.randint(0, len(pixels), (batch,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.mse_loss(reconstruction, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    vae.eval().requires_grad_(False)
    return loss.item()


@torch.no_grad()
def calibrate_latent_scale(vae, pixels: torch.Tensor) -> float:
    """Rescale the latent space exactly so that mean * scaling_factor has unit standard deviation.

    The encoder's output convolution is scaled by k (its log-variance shifted by 2 log k) and the
    decoder's input convolution by 1 / k: reconstructions are unchanged. Returns k.
    """
    mean = torch.cat([vae.encode(pixels[i:i + 32]).latent_dist.mean for i in range(0, len(pixels), 32)])
    k = 1.0 / (float(mean.std()) * vae.config.scaling_factor)
    channels = vae.config.latent_channels
    vae.quant_conv.weight[:channels] *= k
    vae.quant_conv.bias[:channels] *= k
    vae.quant_conv.bias[channels:] += 2 * math.log(k)
    vae.post_quant_conv.weight /= k
    return k


def build_world_base(folder: Path, world: Path, names: list[str], settings: DemoSettings) -> dict:
    """The tiny SD 1.x: a random (seeded) UNet and text encoder, a VAE pre-trained on the world; saved as
    a diffusers folder. Returns what the pre-training did."""
    from dmp_model.tiny import build_tiny_components, save_tiny_sd

    unet, vae, text_encoder = build_tiny_components(settings.seed, unet_width=settings.unet_width,
                                                    vae_width=settings.vae_width,
                                                    text_width=settings.unet_width)
    images, depths, normals = load_pixels(world, names, settings.target_scale)
    started = time.perf_counter()
    threads = torch.get_num_threads()
    if settings.vae_threads:
        torch.set_num_threads(settings.vae_threads)
    try:
        loss = pretrain_vae(vae, torch.cat([images, depths, normals]), settings.vae_steps, settings.vae_batch,
                            settings.vae_lr, settings.seed)
    finally:
        torch.set_num_threads(threads)
    rescale = calibrate_latent_scale(vae, torch.cat([images, depths]))
    save_tiny_sd(folder, components=(unet, vae, text_encoder))
    return {"vae_loss": loss, "latent_rescale": rescale, "vae_seconds": time.perf_counter() - started,
            "unet": f"random, seed {settings.seed}, width {settings.unet_width}"}


# Training, prediction, results --------------------------------------------------------------------

def adapter_config(out: Path, task: str, steps: int, settings: DemoSettings) -> TrainConfig:
    """What `dmp train` is given for one demo adapter."""
    world = out / "world"
    return TrainConfig(
        base=str(out / "base"), train_images=str(world / "train" / "images"),
        train_targets=str(world / "train" / task), val_images=str(world / "val" / "images"),
        val_targets=str(world / "val" / task), task=task, output_dir=str(out / task),
        resolution=settings.size, rank=settings.rank, prediction_type=settings.prediction_type,
        target_scale=settings.target_scale if task == "depth" else None,
        normal_convention=NORMAL_CONVENTION, adapter_normal_convention=NORMAL_CONVENTION,
        learning_rate=settings.learning_rate, lr_scheduler="cosine", warmup_steps=min(20, steps),
        max_steps=steps, batch_size=settings.batch_size, cache_latents=True, checkpoint_every=0,
        keep_checkpoints=1, val_every=max(steps // 2, 1), val_limit=settings.val_scenes, val_previews=6,
        log_every=10, seed=settings.seed)


def train_adapters(out: Path, settings: DemoSettings) -> dict[str, float]:
    """Train the depth and normal adapters with `dmp train`; returns seconds per adapter.

    In parallel (settings.parallel) each adapter is its own ``python -m training train --config``
    process with one thread, so the two use both cores; otherwise they train in turn in this process.
    """
    configs = {task: adapter_config(out, task, steps, settings)
               for task, steps in (("depth", settings.depth_steps), ("normal", settings.normal_steps))}
    timings = {}
    if not settings.parallel:
        for task, config in configs.items():
            started = time.perf_counter()
            train(config)
            timings[f"{task}_s"] = time.perf_counter() - started
        return timings
    started = time.perf_counter()
    package_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    (out / "logs").mkdir(exist_ok=True)
    runs = {}
    for task, config in configs.items():
        config_file = out / "logs" / f"{task}_config.json"
        config_file.write_text(json.dumps(config.to_dict(), indent=2), encoding="utf-8")
        log = open(out / "logs" / f"train_{task}.log", "w", encoding="utf-8")  # closed below
        command = [sys.executable, "-m", "training", "train", "--config", str(config_file)]
        logger.info("%s", " ".join(command))
        runs[task] = (subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    failed = []
    for task, (process, log) in runs.items():
        process.wait()
        log.close()
        timings[f"{task}_s"] = time.perf_counter() - started
        if process.returncode:
            failed.append(task)
    if failed:
        tails = {t: (out / "logs" / f"train_{t}.log").read_text(encoding="utf-8")[-1500:] for t in failed}
        raise RuntimeError(f"training the {failed} adapter(s) failed: {tails}")
    return timings


def write_results_sheet(path: Path, images, depth_pred, depth_true, normal_pred, normal_true,
                        target_scale: float, rows: int = 8) -> Path:
    """Rows of input | depth prediction | depth truth | normal prediction | normal truth.

    Depth is grey on one fixed scale for prediction and truth (white 0 m, black `target_scale` m).
    """
    from dmp_model.controlnet import normals_to_rgb

    def grey(depth):
        return (1 - depth / target_scale).clamp(0, 1).unsqueeze(-1).expand(-1, -1, 3)

    strips = []
    for i in range(min(rows, len(images))):
        normals = normals_to_rgb(torch.stack([normal_pred[i], normal_true[i]]))
        strips.append(torch.cat([images[i].permute(1, 2, 0), grey(depth_pred[i]), grey(depth_true[i]),
                                 normals[0], normals[1]], 1))
    return write_png8(path, torch.cat(strips, 0).numpy())


def baselines(depth_true: torch.Tensor, train_depths: torch.Tensor, normal_true: torch.Tensor) -> dict:
    """What predictors that never look at the image achieve on the held-out scenes."""
    constant, constant_abs_rel = constant_depth_abs_rel(depth_true)
    layout = TaskMetrics("depth")
    layout.update(best_constant_depth_map(train_depths).expand_as(depth_true), depth_true)
    mean_normal = TaskMetrics("normal")
    mean_direction = F.normalize(normal_true.reshape(-1, 3).mean(0), dim=0)
    mean_normal.update(mean_direction.expand_as(normal_true).contiguous(), normal_true)
    return {"depth": {"best_constant_m": constant, "best_constant_abs_rel": constant_abs_rel,
                      "layout_prior_abs_rel": layout.compute()["abs_rel"]},
            "normal": {"mean_normal_angular_error_deg": mean_normal.compute()["angular_error_deg"]}}


def evaluate(out: Path, val_names: list[str], settings: DemoSettings) -> dict:
    """Predict the held-out scenes with the engine and both adapters; metrics and the results sheet.

    Two sampler settings are reported: DMP's default (5 steps, "leading" spacing) and a single step
    with "trailing" spacing (t = 999), the setting single-step predictors use. The results sheet and
    the pass criterion use DMP's default. The adapters' facts (target scale, normal convention,
    prompts) come from their files' metadata, as for any user; the truth normals are read from the
    world's convention into the normal adapter's.
    """
    from dmp_model import DMPModel
    from dmp_model.imageproc import load_image

    world = out / "world"
    model = DMPModel.from_pretrained(out / "base", device="cpu", precision="fp32")
    for task in ("depth", "normal"):
        model.load_adapter(out / task)  # named after its folder: "depth", "normal"
    images = torch.stack([load_image(world / "val" / "images" / f"{n}.png") for n in val_names])
    normal_convention = model.adapters["normal"].normal_convention
    truth = {"depth": torch.stack([torch.from_numpy(np.load(world / "val" / "depth" / f"{n}.npy"))
                                   for n in val_names]),
             "normal": torch.stack([read_normals(world / "val" / "normal" / f"{n}.png", NORMAL_CONVENTION,
                                                 normal_convention) for n in val_names])}
    depth_files = sorted((world / "train" / "depth").glob("*.npy"))
    train_depths = torch.stack([torch.from_numpy(np.load(f)) for f in depth_files])
    summary = {"held_out_scenes": len(val_names), **baselines(truth["depth"], train_depths, truth["normal"])}
    samplers = {"dmp_default": {}, "one_step_trailing": {"steps": 1, "spacing": "trailing"}}
    for sampler, options in samplers.items():
        results = model.predict_tasks(images, ["depth", "normal"], processing_resolution=0, batch_size=16,
                                      **options)  # both -notext: the empty prompt, no guidance
        for task in ("depth", "normal"):
            metrics = TaskMetrics(task)
            metrics.update(results[task].raw, truth[task])
            summary[task][sampler] = metrics.compute()
        depth = summary["depth"]
        gain = depth["best_constant_abs_rel"] / depth[sampler]["abs_rel"]
        depth[sampler]["improvement_over_constant"] = gain
        if sampler == "dmp_default":
            write_results_sheet(out / "results.png", images, results["depth"].raw, truth["depth"],
                                results["normal"].raw, truth["normal"], settings.target_scale)
    return summary


def _prepare_folder(out: Path, overwrite: bool) -> None:
    """Refuse to mix with unrelated files; an earlier demo is replaced only with overwrite."""
    if out.exists() and any(out.iterdir()):
        if not (out / DEMO_MARKER).is_file():
            raise ValueError(f"--output {out} is not empty and holds no earlier demo; choose an empty or a "
                             "new folder")
        if not overwrite:
            raise ValueError(f"--output {out} holds an earlier demo; pass --overwrite to replace it")
        for part in _PARTS:
            path = out / part
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def run_demo(output: str | os.PathLike = "demo_output", settings: DemoSettings | None = None,
             overwrite: bool = False) -> dict:
    """Run the demo end to end; returns the summary also written to metrics.json."""
    settings = settings or DemoSettings()
    out = Path(output).resolve()
    _prepare_folder(out, overwrite)
    timings, started = {}, time.perf_counter()
    with atomic_path(out / DEMO_MARKER) as temp:
        temp.write_text(json.dumps({"settings": asdict(settings)}, indent=2), encoding="utf-8")

    # 1. The world.
    write_dataset(out / "world" / "train", settings.train_scenes, settings.size, settings.seed)
    write_dataset(out / "world" / "val", settings.val_scenes, settings.size, settings.seed, start=1_000_000)
    train_names = [f"{i:05d}" for i in range(settings.train_scenes)]
    val_names = [f"{i:05d}" for i in range(1_000_000, 1_000_000 + settings.val_scenes)]
    timings["world_s"] = time.perf_counter() - started

    # 2. The tiny model and its prior.
    logger.info("pre-training the tiny model's VAE on world images, depth and normal maps")
    prior = build_world_base(out / "base", out / "world" / "train", train_names, settings)
    timings["prior_s"] = time.perf_counter() - started - timings["world_s"]

    # 3. Two adapters, by `dmp train`.
    timings.update(train_adapters(out, settings))

    # 4. Held-out prediction with the engine, metrics, sheet.
    mark = time.perf_counter()
    summary = evaluate(out, val_names, settings)
    timings["evaluate_s"] = time.perf_counter() - mark
    timings["total_s"] = time.perf_counter() - started
    summary.update(prior=prior, timings=timings, settings=asdict(settings))
    summary["passed"] = summary["depth"]["dmp_default"]["improvement_over_constant"] >= 2.0
    with atomic_path(out / "metrics.json") as temp:
        temp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    d, n = summary["depth"], summary["normal"]
    for sampler in ("dmp_default", "one_step_trailing"):
        logger.info("held-out depth (%s sampler): AbsRel %.3f, delta1 %.3f; best constant %.2f m: "
                    "AbsRel %.3f (%.2fx better); layout prior: AbsRel %.3f; normals: %.1f deg "
                    "(mean normal: %.1f deg)", sampler, d[sampler]["abs_rel"], d[sampler]["delta1"],
                    d["best_constant_m"], d["best_constant_abs_rel"], d[sampler]["improvement_over_constant"],
                    d["layout_prior_abs_rel"], n[sampler]["angular_error_deg"],
                    n["mean_normal_angular_error_deg"])
    verdict = "PASSED" if summary["passed"] else "FAILED (< 2x the constant baseline)"
    logger.info("%s in %.0f s: %s, %s", verdict, timings["total_s"], out / "results.png",
                out / "metrics.json")
    return summary
