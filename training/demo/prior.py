"""The miniature world's diffusion prior: the stand-in for Stable Diffusion's pre-training.

DMP's claim is that a generative prior lets a few labels from one domain generalise. Real SD
weights cannot ship, so ``dmp demo`` builds its own prior, once, and caches it:

1. Render many unlabelled world images of every style (``world.STYLES``): textures, colours,
   object kinds, lighting and camera poses vary; nothing here is a task label.
2. Pre-train the tiny VAE as an autoencoder on those images, plus depth and normal maps of
   in-domain ("bedrooms") scenes of the pre-training set (a VAE that cannot reconstruct a depth map
   cannot carry a depth prediction; SD's VAE reconstructs them from its web-scale pre-training, ours
   sees a few). It never sees a label of another style. Its latent space is then rescaled exactly
   so that SD's scaling factor 0.18215 gives unit-variance latents.
3. Pre-train the tiny SD-shaped UNet as a text-free diffusion model on the VAE latents of the
   images, as SD was pre-trained: z_t = sqrt(a) x0 + sqrt(1 - a) noise under SD's schedule,
   conditioned on the empty prompt; the UNet regresses the clean latent x0 by default (the
   parameterisation of the demo's adapters; SD's own noise or velocity are settings). That is exactly
   the DMP objective with Gaussian noise in the place of the input image, so it is computed by the
   trainer's own ``dmp_loss``.

The result is a diffusers folder (``base/``) in a cache folder keyed by a hash of everything it
depends on, with ``prior.json`` beside it: the world version, the model shape, the settings and
the SHA-256 of every file. A cached prior is used only if all of these match; a corrupt, stale or
other-shape one is rebuilt (``load_or_build_prior``), never silently used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dmp_model.adapters import AdapterInfo
from dmp_model.tasks.codecs import DEPTH_TARGET_SCALE

from ..data import encode_raw_target
from ..objective import dmp_loss, latent_moments, sample_latents
from .world import IN_DOMAIN_STYLE, NORMAL_CONVENTION, STYLES, WORLD_VERSION, random_scene, render, scene_style

logger = logging.getLogger(__name__)

PRIOR_FORMAT = 1  # bump when the cache layout or metadata change
METADATA_FILE = "prior.json"
BASE_FOLDER = "base"
# Scene indices of the pre-training images: disjoint from the demo's labelled (0..) and held-out
# (1_000_000..) scenes, so the prior never sees an evaluation image.
PRIOR_START = 5_000_000


@dataclass(frozen=True)
class PriorSettings:
    """What the prior is built from; every field is part of the cache key."""

    seed: int = 0
    size: int = 64  # image side; latents are size / 8
    images: int = 1024  # unlabelled pre-training images, styles in turn
    styles: tuple[str, ...] = tuple(STYLES)
    label_maps: int = 128  # in-domain scenes whose depth and normal maps the VAE also reconstructs
    target_scale: float = DEPTH_TARGET_SCALE  # depth maps are encoded as the depth adapter's targets (8 m = white)
    vae_width: int = 16
    vae_steps: int = 300
    vae_batch: int = 8
    vae_lr: float = 3e-3
    unet_width: int = 32
    unet_steps: int = 200
    unet_batch: int = 32
    unet_lr: float = 1e-3
    unet_warmup: int = 40
    # x0-prediction, not SD 1.x's epsilon: the demo's adapters predict the clean target ("sample"), and
    # LoRAs on an x0-prior beat those on an epsilon-prior out of domain (docs/demo.md, what was tried).
    prediction_type: str = "sample"
    threads: int = 2  # the VAE's convolutions use both cores


# Rendering the pre-training data -----------------------------------------------------------------

def render_prior_data(settings: PriorSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images of every style, and depth and normal maps of in-domain scenes, as VAE pixels in [-1, 1].

    Returns (images [N, 3, S, S], depth maps [M, 3, S, S], normal maps [M, 3, S, S]) with
    N = settings.images and M = settings.label_maps; maps encoded exactly as the trainer's targets.
    """
    from dmp_model.tasks.normals import rgb_to_normals

    images = []
    for index in range(PRIOR_START, PRIOR_START + settings.images):
        view = render(random_scene(settings.seed, index, scene_style(settings.styles, index)), settings.size,
                      settings.size)
        images.append(torch.from_numpy(np.round(np.clip(view.image, 0, 1) * 255) / 255))
    depths, normals = [], []
    start = PRIOR_START + settings.images
    for index in range(start, start + settings.label_maps):
        view = render(random_scene(settings.seed, index, IN_DOMAIN_STYLE), settings.size, settings.size)
        depths.append(torch.from_numpy(view.depth))
        normals.append(torch.from_numpy(np.round(np.clip((view.normal + 1) / 2, 0, 1) * 255)))  # as the files
    pixels = torch.stack(images).permute(0, 3, 1, 2).float() * 2 - 1
    if not depths:
        empty = pixels[:0]
        return pixels, empty, empty
    depth_info = AdapterInfo(task="depth", target_scale=settings.target_scale)
    normal_info = AdapterInfo(task="normal", normal_convention=NORMAL_CONVENTION)
    # Normals go through 8-bit RGB and back, exactly as the trainer reads the world's normal files.
    normal_vectors = rgb_to_normals(torch.stack(normals).float() / 255)
    return (pixels, encode_raw_target(torch.stack(depths), depth_info), encode_raw_target(normal_vectors, normal_info))


# The VAE -----------------------------------------------------------------------------------------

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
    for step in range(steps):
        if step % 100 == 0:
            logger.info("prior VAE step %d/%d", step, steps)
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


# The UNet ----------------------------------------------------------------------------------------

@torch.no_grad()
def empty_context(text_encoder) -> torch.Tensor:
    """The empty prompt's embedding [1, 77, D]: SD's unconditional input, what a text-free prior sees."""
    from dmp_model.sd.text import empty_prompt_ids

    return text_encoder(empty_prompt_ids(None, text_encoder.config.vocab_size))[0]


@torch.no_grad()
def image_latents(vae, pixels: torch.Tensor, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std [2N, 4, h, w] of the latent distributions of pixels and of their mirror images."""
    both = torch.cat([pixels, pixels.flip(-1)])
    moments = [latent_moments(vae, both[i:i + batch]) for i in range(0, len(both), batch)]
    return torch.cat([m for m, _ in moments]), torch.cat([s for _, s in moments])


def pretrain_unet(unet, latents: tuple[torch.Tensor, torch.Tensor], context: torch.Tensor,
                  settings: PriorSettings, scaling_factor: float) -> float:
    """Text-free diffusion pre-training of `unet` on image latents; returns the mean loss of the last 20 steps.

    The loss is the trainer's ``dmp_loss`` (``training.objective``) with Gaussian noise as its "input
    image": with x = noise and y = the image latent, z_t = sqrt(a) y + sqrt(1 - a) noise is SD's
    forward process and the target (y itself for "sample", the noise for "epsilon",
    v = sqrt(a) noise - sqrt(1 - a) y for "v_prediction") is the diffusion model's. AdamW, linear
    warm-up, cosine decay; t uniform over SD's 1000 steps.
    """
    mean, std = latents
    alphas_cumprod = sd_alphas_cumprod()
    generator = torch.Generator().manual_seed(settings.seed)
    unet.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=settings.unet_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(settings.unet_warmup, settings.unet_steps))
    context = context.expand(settings.unet_batch, -1, -1)
    losses = []
    for _ in range(settings.unet_steps):
        pick = torch.randint(0, len(mean), (settings.unet_batch,), generator=generator)
        y = sample_latents(mean[pick], std[pick], generator, scaling_factor)  # [B, 4, h, w], clean latents
        noise = torch.randn(y.shape, generator=generator)
        loss = dmp_loss(unet, noise, y, context, alphas_cumprod, settings.prediction_type, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (len(losses) % 50 == 0) or len(losses) == settings.unet_steps:
            logger.info("prior UNet step %d/%d: diffusion loss %.4f", len(losses), settings.unet_steps,
                        float(np.mean(losses[-50:])))
    unet.eval().requires_grad_(False)
    return float(np.mean(losses[-20:])) if losses else math.nan


def _warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(total - warmup, 1))))
    return factor


def sd_alphas_cumprod() -> torch.Tensor:
    """SD 1.x's alphas_cumprod [1000] (scaled_linear betas 0.00085..0.012), from the bundled config."""
    from dmp_model.sampling import sd1_schedule

    return sd1_schedule().alphas_cumprod


# Building and caching ----------------------------------------------------------------------------

def model_configs(settings: PriorSettings) -> dict:
    """The tiny model's architecture (UNet, VAE, text encoder configs): the prior's "shape"."""
    from dmp_model.sd.tiny import tiny_text_encoder_config, tiny_unet_config, tiny_vae_config

    return {"unet": tiny_unet_config(settings.unet_width, settings.unet_width),
            "vae": tiny_vae_config(settings.vae_width), "text_encoder": tiny_text_encoder_config(settings.unet_width)}


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def expected_metadata(settings: PriorSettings) -> dict:
    """What prior.json must say for a prior built with `settings` by this code."""
    return {"format": PRIOR_FORMAT, "world_version": WORLD_VERSION, "model_hash": _digest(model_configs(settings)),
            "settings_hash": _digest(asdict(settings))}


def file_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder`, by relative path."""
    hashes = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        hashes[path.relative_to(folder).as_posix()] = digest.hexdigest()
    return hashes


def check_cached_prior(folder: Path, settings: PriorSettings) -> str | None:
    """None if `folder` holds a usable prior for `settings`, otherwise what is wrong with it."""
    meta_file = folder / METADATA_FILE
    if not meta_file.is_file():
        return f"{meta_file} is missing (an interrupted build?)"
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{meta_file} is unreadable ({err})"
    if not isinstance(meta, dict):
        return f"{meta_file} does not hold a table"
    labels = {"format": "cache format", "world_version": "world version", "model_hash": "model shape",
              "settings_hash": "settings"}
    for key, wanted in expected_metadata(settings).items():
        if meta.get(key) != wanted:
            return f"it was built for another {labels[key]} ({key} {meta.get(key)!r}, this demo needs {wanted!r})"
    files = meta.get("files")
    if not isinstance(files, dict) or not files or meta.get("content_hash") != _digest(files):
        return "its list of file hashes is missing or altered"
    found = file_hashes(folder / BASE_FOLDER)
    for name, digest in files.items():
        if found.get(name) != digest:
            return f"{BASE_FOLDER}/{name} is {'missing' if name not in found else 'corrupt (its SHA-256 differs)'}"
    extra = sorted(set(found) - set(files))
    if extra:
        return f"{BASE_FOLDER} holds files the prior was not built with: {extra[:3]}"
    return None


def default_cache_dir() -> Path:
    """Where built priors are kept: $DMP_CACHE_DIR, else $XDG_CACHE_HOME/dmp, else ~/.cache/dmp; then demo-prior."""
    root = os.environ.get("DMP_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "dmp")
    return Path(root) / "demo-prior"


def cache_folder(cache_dir: str | os.PathLike, settings: PriorSettings) -> Path:
    """One slot per (seed, size): a prior built with other settings there is detected and replaced."""
    return Path(cache_dir) / f"seed{settings.seed}-{settings.size}px"


def read_prior_metadata(folder: Path) -> dict:
    return json.loads((folder / METADATA_FILE).read_text(encoding="utf-8"))


def build_vae_stage(settings: PriorSettings, folder: Path) -> tuple[dict, torch.Tensor]:
    """Steps 1-2: render the pre-training data, pre-train and calibrate the VAE; save a base whose UNet
    is still random (seeded) to `folder`. Returns (stats, the pre-training images [N, 3, S, S])."""
    from dmp_model.sd.tiny import build_tiny_components, save_tiny_sd

    started = time.perf_counter()
    images, depths, normals = render_prior_data(settings)
    rendered = time.perf_counter()
    unet, vae, text_encoder = build_tiny_components(settings.seed, unet_width=settings.unet_width,
                                                    vae_width=settings.vae_width, text_width=settings.unet_width)
    with _threads(settings.threads):
        loss = pretrain_vae(vae, torch.cat([images, depths, normals]), settings.vae_steps, settings.vae_batch,
                            settings.vae_lr, settings.seed)
    rescale = calibrate_latent_scale(vae, torch.cat([images, depths]))
    save_tiny_sd(folder, components=(unet, vae, text_encoder))
    return {"render_s": rendered - started, "vae_s": time.perf_counter() - rendered, "vae_loss": loss,
            "latent_rescale": rescale}, images


def build_unet_stage(settings: PriorSettings, folder: Path, images: torch.Tensor) -> dict:
    """Step 3: pre-train the UNet of the base in `folder` (written by ``build_vae_stage``) as a text-free
    diffusion model on the latents of `images`, and save it in place. Returns stats."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    started = time.perf_counter()
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    context = empty_context(CLIPTextModel.from_pretrained(folder / "text_encoder"))
    loss = pretrain_unet(unet, image_latents(vae, images), context, settings, vae.config.scaling_factor)
    unet.register_to_config(_name_or_path="unet")  # not the staging path: a rebuild writes the same bytes
    unet.save_pretrained(folder / "unet")
    return {"unet_s": time.perf_counter() - started, "unet_loss": loss}


class _threads:
    """Temporarily use `count` torch threads (0: leave as is)."""

    def __init__(self, count: int):
        self.count, self.saved = count, torch.get_num_threads()

    def __enter__(self):
        if self.count:
            torch.set_num_threads(self.count)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)


def publish_prior(staging: Path, settings: PriorSettings, cache_dir: str | os.PathLike, stats: dict) -> Path:
    """Write prior.json (with every file's SHA-256) into `staging` (holding base/) and move it into the
    cache slot for `settings`, replacing whatever was there. Returns the slot."""
    files = file_hashes(staging / BASE_FOLDER)
    meta = {**expected_metadata(settings), "settings": asdict(settings), "files": files,
            "content_hash": _digest(files), "stats": stats, "versions": _versions()}
    (staging / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    slot = cache_folder(cache_dir, settings)
    aside = slot.with_name(f".old-{slot.name}-{uuid.uuid4().hex[:8]}")
    if slot.exists():
        os.rename(slot, aside)  # a rename is atomic: the slot never holds half a prior
    os.rename(staging, slot)
    shutil.rmtree(aside, ignore_errors=True)
    return slot


def _versions() -> dict:
    import diffusers

    return {"torch": str(torch.__version__), "diffusers": diffusers.__version__}


def staging_folder(cache_dir: str | os.PathLike) -> Path:
    """A fresh hidden folder beside the cache slots (same file system, so publishing is a rename)."""
    folder = Path(cache_dir) / f".tmp-{uuid.uuid4().hex[:12]}"
    folder.mkdir(parents=True)
    return folder


IMAGES_FILE = "images.npy"  # the pre-training images, handed from the VAE stage to the UNet stage
STATS_FILE = "stats.json"


def save_stage(staging: Path, images: torch.Tensor, stats: dict) -> None:
    """Keep what the UNet stage needs from the VAE stage in `staging` (for a separate process)."""
    pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()  # exact: images are 8-bit
    np.save(staging / IMAGES_FILE, pixels, allow_pickle=False)
    (staging / STATS_FILE).write_text(json.dumps(stats), encoding="utf-8")


def finish_prior(staging: Path, settings: PriorSettings, cache_dir: str | os.PathLike) -> Path:
    """The UNet stage on a staging folder written by ``build_vae_stage`` + ``save_stage``, then publish.

    Returns the cache slot. The staging folder is consumed (moved or deleted).
    """
    try:
        images = torch.from_numpy(np.load(staging / IMAGES_FILE, allow_pickle=False)).float() / 127.5 - 1
        stats = json.loads((staging / STATS_FILE).read_text(encoding="utf-8"))
        for name in (IMAGES_FILE, STATS_FILE):
            (staging / name).unlink()
        stats.update(build_unet_stage(settings, staging / BASE_FOLDER, images))
        return publish_prior(staging, settings, cache_dir, stats)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_or_build_prior(settings: PriorSettings, cache_dir: str | os.PathLike | None = None) -> tuple[Path, dict]:
    """The prior's diffusers folder for `settings`, from the cache if it is intact, else built and cached.

    Returns (base folder, info) where info says whether it came from the cache, why a cached one was
    rebuilt, and the build's timings and losses.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    slot = cache_folder(cache_dir, settings)
    problem = check_cached_prior(slot, settings) if slot.exists() else "none is cached"
    if problem is None:
        logger.info("using the cached prior %s", slot)
        return slot / BASE_FOLDER, {"cached": True, "folder": str(slot), **read_prior_metadata(slot)["stats"]}
    if slot.exists():
        logger.warning("rebuilding the cached prior %s: %s", slot, problem)
    staging = staging_folder(cache_dir)
    try:
        stats, images = build_vae_stage(settings, staging / BASE_FOLDER)
        save_stage(staging, images, stats)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    slot = finish_prior(staging, settings, cache_dir)
    info = read_prior_metadata(slot)["stats"]
    return slot / BASE_FOLDER, {"cached": False, "folder": str(slot), "rebuilt_because": problem, **info}


def settings_from_dict(values: dict) -> PriorSettings:
    """PriorSettings from ``asdict`` output (JSON turns its tuples into lists)."""
    return PriorSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def main(argv: list[str] | None = None) -> int:
    """``python -m training.demo.prior --staging DIR --cache-dir DIR --settings FILE``: the UNet stage of a
    prior whose VAE stage is done (``dmp demo`` runs it beside other work, in its own process)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m training.demo.prior", description=main.__doc__)
    parser.add_argument("--staging", required=True, help="folder written by the VAE stage")
    parser.add_argument("--cache-dir", required=True, help="where the finished prior is published")
    parser.add_argument("--settings", required=True, help="JSON file of PriorSettings")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    settings = settings_from_dict(json.loads(Path(args.settings).read_text(encoding="utf-8")))
    slot = finish_prior(Path(args.staging), settings, args.cache_dir)
    logger.info("prior published to %s", slot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
