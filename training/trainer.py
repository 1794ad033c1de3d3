"""Training a DMP task adapter: one readable loop around the engine's objective.

    config = TrainConfig(base="sd15/", train_images="data/img", train_targets="data/depth", task="depth")
    result = train(config)                       # -> output_dir/pytorch_lora_weights.safetensors

The objective is DMP's (``training.objective``, built from ``dmp_model.sampling``): x and y are
the VAE latents of input and target image (a sample of the latent distribution, times the
scaling factor 0.18215), t is uniform in [0, 999], a = alphas_cumprod[t],
z_t = interpolate(y, x, a), and the UNet with its LoRA regresses training_target(y, x, a)
(the velocity for v-prediction) under an MSE loss computed in float32. Only the LoRA weights
train. Validation runs the engine's own ``DMPModel.predict`` with the adapter being trained.

Randomness is explicit and resumable: the sample order is a pure function of (seed, step)
(``data.SamplePlan``), and each micro-batch draws its latent noise and timesteps from a
``torch.Generator`` seeded with (seed, step, micro-batch, process). A checkpoint therefore only
needs the step, the weights, the optimiser and the schedule to continue bit for bit.

Everything device- and process-related goes through ``accelerate``: the same code runs on a CPU,
a GPU, or several processes (``accelerate launch --num_processes N -m training train ...``), where
each process reads its own shard and only the main process writes files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dmp_model.adapters import ADAPTER_FILE, save_adapter  # ADAPTER_FILE: the run folder is a loadable adapter
from dmp_model.io.writers import atomic_path, write_png8
from dmp_model.sd.loading import load_base
from dmp_model.sd.model import DMPModel
from dmp_model.tasks.codecs import get_codec

from . import resume as ckpt
from .config import TrainConfig, config_differences
from .data import PairDataset, PlanSampler, SamplePlan, adapter_info, build_datasets, collate, mix_seed
from .metrics import TaskMetrics
from .objective import dmp_loss, latent_moments, sample_latents
from .plot import plot_log

logger = logging.getLogger(__name__)

ADAPTER_NAME = "default"  # peft's name for the adapter added by ``unet.add_adapter``
LOG_FILE, CONFIG_FILE, PLOT_FILE = "log.jsonl", "config.json", "curves.png"
FULL_UNET_FOLDER = "unet"  # where a full fine-tune (config.full_finetune) writes its UNet
_PRECISION_NAMES = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}


@dataclass
class TrainResult:
    """What a run produced. `adapter` is None when it stopped early (``stop_after``)."""

    output_dir: Path
    step: int
    adapter: Path | None
    metrics: dict[str, float]
    log: Path


# Building blocks --------------------------------------------------------------------------------

def add_lora(unet: torch.nn.Module, config: TrainConfig) -> list[torch.nn.Parameter]:
    """Attach the trainable LoRA (peft) to a frozen UNet; returns its parameters, in a fixed order.

    The initial weights come from a generator seeded with config.seed (peft initialises with
    torch's global generator, which is forked so nothing else is disturbed).
    """
    from peft import LoraConfig

    layers = "attn1" if config.self_attn_only else "attn[12]"
    projections = "|".join(p.replace(".", r"\.") for p in config.target_modules)
    lora = LoraConfig(r=config.rank, lora_alpha=config.resolved_lora_alpha,
                      init_lora_weights=True if config.lora_init == "default" else "gaussian",
                      target_modules=rf".*\.{layers}\.({projections})")
    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        unet.add_adapter(lora, adapter_name=ADAPTER_NAME)
    params = [p for _, p in sorted(unet.named_parameters()) if p.requires_grad]
    for p in params:  # train in fp32 even when the frozen weights are fp16/bf16
        p.data = p.data.float()
    if not params:
        raise ValueError(f"no LoRA layers were created for target_modules={config.target_modules}")
    return params


def unfreeze_unet(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Make every UNet weight trainable (``full_finetune``), LoRA included; returns them, in a fixed order."""
    unet.requires_grad_(True)
    params = [p for _, p in sorted(unet.named_parameters())]
    for p in params:
        p.data = p.data.float()
    return params


def unet_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's own weights without the LoRA, under the plain diffusers keys (peft's ``.base_layer`` removed)."""
    return {key.replace(".base_layer.", "."): value.detach().float().cpu().clone()
            for key, value in unet.state_dict().items() if ".lora_" not in key}


def load_unet_state_dict(unet: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Restore weights saved by ``unet_state_dict`` into a UNet carrying a LoRA, strictly."""
    current = {key.replace(".base_layer.", "."): key for key in unet.state_dict() if ".lora_" not in key}
    if set(state) != set(current):
        missing, unexpected = sorted(set(current) - set(state)), sorted(set(state) - set(current))
        raise ValueError(f"checkpoint UNet weights do not match this model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    result = unet.load_state_dict({current[key]: value for key, value in state.items()}, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"checkpoint UNet weights not loaded: {result.unexpected_keys[:3]}")


def save_unet(folder: Path, unet: torch.nn.Module) -> Path:
    """The fine-tuned UNet (without its LoRA) as a diffusers UNet folder (config.json + safetensors)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    unet.save_config(folder)
    with atomic_path(folder / "diffusion_pytorch_model.safetensors") as temp:
        save_file({k: v.contiguous() for k, v in unet_state_dict(unet).items()}, str(temp))
    return folder


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable LoRA weights in peft layout ('...attn1.to_q.lora_A.weight'), on the CPU."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
    return {k: v.detach().float().cpu().clone() for k, v in state.items()}


def load_lora_state_dict(unet: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Restore LoRA weights saved by ``lora_state_dict``, strictly (every key used, none missing)."""
    from peft import set_peft_model_state_dict

    expected = set(lora_state_dict(unet))
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"checkpoint LoRA weights do not match this model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    result = set_peft_model_state_dict(unet, state, adapter_name=ADAPTER_NAME)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"checkpoint LoRA weights not loaded: {result.unexpected_keys[:3]}")


class LatentCache:
    """The latent distributions of every (pair, flip) of a dataset, computed once (``cache_latents``)."""

    def __init__(self, dataset: PairDataset, vae: torch.nn.Module, flips: bool, batch_size: int = 16):
        self.moments: dict[tuple[int, bool], tuple[torch.Tensor, ...]] = {}
        items = [(i, f) for i in range(len(dataset)) for f in ((False, True) if flips else (False,))]
        for start in range(0, len(items), batch_size):
            chunk = collate([dataset[item] for item in items[start:start + batch_size]])
            x_mean, x_std = latent_moments(vae, chunk["image"])
            y_mean, y_std = latent_moments(vae, chunk["target"])
            for k, item in enumerate(items[start:start + batch_size]):
                self.moments[item] = (x_mean[k], x_std[k], y_mean[k], y_std[k])

    def batch(self, items: list[tuple[int, bool]]) -> tuple[torch.Tensor, ...]:
        """(x_mean, x_std, y_mean, y_std), each [B, 4, h, w]."""
        return tuple(torch.stack(parts) for parts in zip(*(self.moments[item] for item in items)))


# Validation -------------------------------------------------------------------------------------

@dataclass
class ValidationSet:
    images: torch.Tensor  # [N, 3, R, R] in [0, 1]
    raws: torch.Tensor  # raw targets at R
    captions: list[str]


def load_validation(dataset: PairDataset, limit: int) -> ValidationSet:
    """The first `limit` validation pairs at the training resolution (empty without validation pairs)."""
    loaded = [dataset.load(i) for i in range(min(limit, len(dataset)))]
    if not loaded:
        return ValidationSet(torch.zeros(0, 3, 1, 1), torch.zeros(0), [])
    return ValidationSet(torch.stack([image for image, _ in loaded]), torch.stack([raw for _, raw in loaded]),
                         [pair.caption for pair in dataset.pairs[:len(loaded)]])


@torch.no_grad()
def validate(model: DMPModel, val: ValidationSet, config: TrainConfig, preview_path: Path | None,
             batch_size: int = 8) -> dict[str, float]:
    """Predict the validation images with the real sampler (``DMPModel.predict``); metrics + preview grid.

    Conditioning follows the engine's rule for the registered adapter: a prompted adapter
    (``uses_prompts``, trained with --captions) gets each image's caption with classifier-free
    guidance, a -notext adapter the empty prompt, exactly as ``dmp predict`` would run them.
    """
    metrics = TaskMetrics(config.task)
    visuals = []
    model.unet.eval()
    prompted = model.adapters[ADAPTER_NAME].uses_prompts
    for start in range(0, len(val.images), batch_size):
        images = val.images[start:start + batch_size]
        prompt = val.captions[start:start + batch_size] if prompted else None
        prediction = model.predict(images, ADAPTER_NAME, steps=config.val_steps, processing_resolution=0,
                                   batch_size=batch_size, prompt=prompt)
        metrics.update(prediction.raw, val.raws[start:start + batch_size])
        visuals.append(prediction.visual)
    if preview_path is not None and config.val_previews:
        write_preview(preview_path, val.images, torch.cat(visuals), val.raws, config)
    return metrics.compute()


def write_preview(path: Path, images: torch.Tensor, visuals: torch.Tensor, raws: torch.Tensor,
                  config: TrainConfig) -> Path:
    """A grid with one row per image: input | prediction | ground truth."""
    n = min(config.val_previews, len(images))
    truth = get_codec(config.task).visualize(raws[:n]).float()  # [n, R, R, 3]
    rows = [torch.cat([images[i].permute(1, 2, 0), visuals[i], truth[i]], dim=1) for i in range(n)]
    return write_png8(path, torch.cat(rows, dim=0).clamp(0, 1).numpy())


# The run ----------------------------------------------------------------------------------------

def train(config: TrainConfig, resume: str | os.PathLike | None = None, stop_after: int | None = None,
          on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Train one task adapter as configured.

    Args:
        config: the run's configuration (paths are made absolute).
        resume: None (a new run; the output folder must not hold another run), "latest" (the last
            checkpoint in the output folder, or a new run if there is none) or a checkpoint path.
        stop_after: stop after this step, writing a checkpoint (for jobs with a time limit; resume later).
        on_step: called with the step number after every optimiser step (progress hooks, tests).

    Returns:
        a TrainResult; the adapter is output_dir/pytorch_lora_weights.safetensors.
    """
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    # 1. Processes and devices; resume and output checks before anything heavy.
    config = config.resolved()
    # Several processes on a machine without CUDA (torchrun, `accelerate launch --multi_gpu`): CPU + gloo.
    cpu_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=cpu_processes)
    if config.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ValueError("mixed_precision='fp16' needs a GPU; use 'bf16' or 'no' on the CPU")
    main = accelerator.is_main_process
    out = Path(config.output_dir)
    if main:  # a run killed while writing a checkpoint: restore or delete its hidden folders first
        ckpt.recover_interrupted(out)
    accelerator.wait_for_everyone()
    state = _resume_state(out, config, resume, accelerator.num_processes)
    start_step = state["step"] if state else 0
    if stop_after is not None and not start_step < stop_after <= config.max_steps:
        raise ValueError(f"stop_after must be in {start_step + 1}..{config.max_steps}, got {stop_after}")
    stop = stop_after or config.max_steps

    # 2. Data: every pair is read once, so bad data fails here, before the model loads.
    train_set, val_set = build_datasets(config, log=main)

    # 3. The frozen base (the engine refuses anything but SD 1.x), wrapped by the engine for text,
    #    VAE and validation; the trainable LoRA on its UNet.
    components = load_base(config.base, accelerator.device, _PRECISION_NAMES[config.mixed_precision],
                           tokenizer=config.tokenizer)
    model = DMPModel(components)
    unet, vae = model.unet, model.vae
    params = add_lora(unet, config)
    if config.full_finetune:
        params = unfreeze_unet(unet)
    info = adapter_info(config)
    model.register_adapter(ADAPTER_NAME, info)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    alphas_cumprod = model.alphas_cumprod.to(accelerator.device)
    scaling = vae.config.scaling_factor
    empty = model.text.empty_embedding()  # [1, 77, D], for the empty prompt

    # 4. Optimiser and schedule (stepped once per optimiser step, whatever the process count).
    betas = (config.adam_beta1, config.adam_beta2)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=betas, eps=config.adam_epsilon,
                                  weight_decay=config.weight_decay)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps,
                                 num_training_steps=config.max_steps)
    unet_ddp, optimizer = accelerator.prepare(unet, optimizer)
    if state:
        load_lora_state_dict(unet, state["lora"])
        if config.full_finetune:
            load_unet_state_dict(unet, state["unet"])
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        logger.info("resumed from step %d", start_step)

    # 5. Sample order, latents, outputs.
    plan = SamplePlan(len(train_set), config.seed, config.batch_size, config.grad_accum,
                      accelerator.num_processes, accelerator.process_index, config.flips)
    source = _latent_source(config, train_set, plan, vae, start_step, stop)
    val = load_validation(val_set, config.val_limit)
    if main:
        _prepare_output(out, config, start_step)
    log = _Log(out / LOG_FILE, main)

    # 6. The loop: grad_accum micro-batches per optimiser step, then clip, step, schedule.
    unet.train()
    progress = tqdm(total=config.max_steps, initial=start_step, disable=not main, desc=f"train {config.task}",
                    dynamic_ncols=True)
    metrics: dict[str, float] = {}
    step = start_step
    window: list[float] = []
    started = time.perf_counter()
    while step < stop:
        step_loss = 0.0
        for micro in range(config.grad_accum):
            x_mean, x_std, y_mean, y_std, captions = next(source)
            seed = mix_seed(config.seed, step, micro, accelerator.process_index)
            generator = torch.Generator().manual_seed(seed)
            x = sample_latents(x_mean, x_std, generator, scaling)  # [B, 4, h, w], input image
            y = sample_latents(y_mean, y_std, generator, scaling)  # [B, 4, h, w], target image
            context = model.text.encode(captions) if config.captions else empty.expand(x.shape[0], -1, -1)
            last = micro == config.grad_accum - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(unet_ddp):  # sync on the last
                with accelerator.autocast():
                    loss = dmp_loss(unet_ddp, x.to(unet.dtype), y.to(unet.dtype), context, alphas_cumprod,
                                    config.prediction_type, generator, config.min_timestep)
                accelerator.backward(loss / config.grad_accum)
            step_loss += loss.item() / config.grad_accum
        if config.max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window.append(step_loss)
        progress.update(1)
        progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")

        # 7. Logs, validation, checkpoints (files only from the main process).
        if step % config.log_every == 0 or step == stop:
            mean_loss = accelerator.reduce(torch.tensor(sum(window) / len(window), device=accelerator.device),
                                           "mean").item()
            log.write(step=step, loss=mean_loss, lr=lr_scheduler.get_last_lr()[0], epoch=plan.epoch_of(step),
                      seconds=time.perf_counter() - started)
            window.clear()
        if (config.val_every and step % config.val_every == 0) or step == config.max_steps:
            metrics = _validate_main(accelerator, model, val, config, out, step, log)
            unet.train()
        if (config.checkpoint_every and step % config.checkpoint_every == 0) or step == stop:
            _save_checkpoint(accelerator, unet, optimizer, lr_scheduler, config, step)
        if on_step is not None:
            on_step(step)
    progress.close()

    # 8. The adapter and the curves.
    adapter = None
    if step == config.max_steps and main:
        adapter = save_adapter(out / ADAPTER_FILE, lora_state_dict(unet), adapter_info(config, step),
                               lora_scale=config.resolved_lora_alpha / config.rank)
        if config.full_finetune:
            save_unet(out / FULL_UNET_FOLDER, unet)
        plot_log(out / LOG_FILE, out / PLOT_FILE, config.task)
        logger.info("adapter written to %s (%s)", adapter, _format(metrics))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(out, step, adapter, metrics, out / LOG_FILE)


# Pieces of the run ------------------------------------------------------------------------------

def _resume_state(out: Path, config: TrainConfig, resume, num_processes: int) -> dict | None:
    """The checkpoint to continue from (checked against the configuration), or None for a new run."""
    folder = ckpt.resolve_resume(out, resume)
    saved_config = out / CONFIG_FILE
    if folder is None:
        if resume is None and (saved_config.is_file() or ckpt.list_checkpoints(out)):
            raise ValueError(f"output_dir {out} already holds a training run; pass --resume latest to "
                             "continue it, or choose another --output-dir")
        if saved_config.is_file():
            _check_same_config(json.loads(saved_config.read_text(encoding="utf-8")), config, saved_config)
        return None
    state = ckpt.load_checkpoint(folder)
    _check_same_config(state["config"], config, folder)
    if state.get("world_size", 1) != num_processes:
        raise ValueError(f"checkpoint {folder} was written by {state['world_size']} processes, this run has "
                         f"{num_processes}; the data order depends on it: resume with the same number")
    return state


def _check_same_config(saved: dict, config: TrainConfig, where: Path) -> None:
    differences = config_differences(saved, config)
    if differences:
        raise ValueError(f"cannot resume: the configuration differs from the one saved in {where}: "
                         + "; ".join(differences) + ". Use the saved configuration (--config "
                         f"{where if where.name == CONFIG_FILE else where.parent.parent / CONFIG_FILE}) "
                         "or start a new run in another --output-dir")


def _latent_source(config: TrainConfig, dataset: PairDataset, plan: SamplePlan, vae, start: int, stop: int):
    """Yields (x_mean, x_std, y_mean, y_std, captions) per micro-batch, in plan order from `start`."""
    if config.cache_latents:
        cache = LatentCache(dataset, vae, config.flips)
        for step in range(start, stop):
            for micro in range(config.grad_accum):
                items = plan.batch(step, micro)
                yield (*cache.batch(items), [dataset.pairs[i].caption for i, _ in items])
        return
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=PlanSampler(plan, start, stop),
                                         collate_fn=collate, num_workers=config.num_workers)
    for batch in loader:
        yield (*latent_moments(vae, batch["image"]), *latent_moments(vae, batch["target"]), batch["caption"])


def _prepare_output(out: Path, config: TrainConfig, start_step: int) -> None:
    """config.json, and on resume a log cut back to the checkpoint (a killed run may have logged more)."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / CONFIG_FILE) as temp:
        temp.write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
    log_path = out / LOG_FILE
    if log_path.is_file():
        kept = [line for line in log_path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= start_step]
        with atomic_path(log_path) as temp:
            temp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


class _Log:
    """Appends JSON lines (training loss, validation metrics) from the main process."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, **record) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def _validate_main(accelerator, model: DMPModel, val: ValidationSet, config: TrainConfig, out: Path,
                   step: int, log: _Log) -> dict[str, float]:
    metrics: dict[str, float] = {}
    if accelerator.is_main_process and len(val.images):
        metrics = validate(model, val, config, out / "previews" / f"step-{step:08d}.png")
        log.write(step=step, val=metrics)
        logger.info("step %d validation: %s", step, _format(metrics))
    accelerator.wait_for_everyone()
    return metrics


def _format(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())


def _save_checkpoint(accelerator, unet, optimizer, lr_scheduler, config: TrainConfig, step: int) -> None:
    """The checkpoint dict (see resume.py), written by the main process while the others wait."""
    if accelerator.is_main_process:
        lora = lora_state_dict(unet)
        state = {"step": step, "config": config.to_dict(), "world_size": accelerator.num_processes,
                 "lora": lora, "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                 "rng": {"torch": torch.get_rng_state()}, "versions": {"torch": str(torch.__version__)}}
        if config.full_finetune:
            state["unet"] = unet_state_dict(unet)

        def write_adapter(folder: Path) -> None:
            save_adapter(folder / ADAPTER_FILE, lora, adapter_info(config, step),
                         lora_scale=config.resolved_lora_alpha / config.rank)

        path = ckpt.save_checkpoint(config.output_dir, state, write_adapter, config.keep_checkpoints)
        logger.debug("checkpoint %s", path)
    accelerator.wait_for_everyone()
