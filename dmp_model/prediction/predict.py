"""Prediction from images, written once for every backend that can run the models.

DMP's path from pixels to a task's values is the same whatever runs the networks: resize and
pad, encode to latents, run the sampler with each adapter, decode, crop the padding, decode the
task's values and bring them back to the input size. This module holds that path; a backend
(``PredictionBackend``) only supplies the networks: the diffusers models of ``DMPModel`` (the
library and CLI), or ComfyUI's own MODEL, VAE and CLIP (the node pack). Nothing here imports a
model library.

    results = predict_images(backend, images, {"depth": depth_info}, PredictOptions(steps=5))
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Protocol

import torch

from ..adapters import AdapterInfo
from ..images import LATENT_FACTOR, Framing, frame_batch, to_image_batch, unframe
from ..options import check_fraction, check_int, check_option, check_real
from ..sampling import (
    FINAL_OUTPUTS,
    PREDICTION_TYPES,
    SAMPLERS,
    SPACINGS,
    Denoiser,
    Schedule,
    get_timesteps,
    max_steps,
    sample_dmp,
)
from ..tasks.codecs import get_codec
from ..tasks.colormaps import COLORMAPS, batch_percentiles
from . import ensemble, tiling
from .temporal import TemporalAligner, clip_aligners

logger = logging.getLogger(__name__)

DEFAULT_GUIDANCE = 2.0
# Several tasks at once: adapters in turn on the same latents, or all in one UNet batch.
TASK_BATCHING = ("sequential", "batched")
# The visual's colour range (colormaps.RANGE_MODES without "fixed", which needs values).
VISUAL_RANGES = ("image", "batch")
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class PredictOptions:
    """Sampler and processing settings; the one home of every prediction default.

    Attributes:
        steps: UNet calls per image (per guidance pair), 1..1000; DMP uses 5.
        sampler: "ddim" (standard, the reference's default) or "oracle" (x_hat = input latent).
        spacing: "leading" (801, 601, ... for 5 steps, as the reference) or "trailing" (999 first).
        processing_resolution: shorter side in pixels during prediction (reference: 512); 0 = native.
        guidance_scale: classifier-free guidance with a prompt (None: 2.0, as DMP).
        final_output: "z" (the reference's last latent) or "y_hat" (the last step's estimate of y).
        batch_size: images per UNet batch.
        prediction_type: override the adapter's parametrisation (one of PREDICTION_TYPES).
        colormap: depth visual colormap (one of COLORMAPS).
        task_batching: for several adapters, "sequential" (one after the other) or "batched"
            (all in the same UNet batch, peft's mixed-adapter LoRA; adapters must share a
            prediction type; only backends that can mix adapters in one batch).
        temporal_alignment: the images are a clip's frames in order: align each depth frame's
            scale to the frames before it, 0 (off, for still images) .. 1 (full); see ``temporal``.
        visual_range: the depth visual's colour range, "image" (per image) or "batch" (one range
            for the whole batch: a clip's colours do not flicker).
        tile: predict large images as a global pass plus overlapping tiles, merged without seams
            (``tiling.py``); images whose shorter side fits in one tile are predicted as usual.
        tile_size: tile side in input pixels; 0 = the processing resolution; else at least it.
        tile_overlap: blend ramp between neighbouring tiles as a fraction of the tile, in (0, 0.5].
        ensemble: "none", or "flip": the image and its mirror in one UNet batch, merged, with an
            uncertainty map (``ensemble.py``); batch_size then counts images, the batch has twice
            the rows.
    """

    steps: int = 5
    sampler: str = "ddim"
    spacing: str = "leading"
    processing_resolution: int = 512
    guidance_scale: float | None = None
    final_output: str = "z"
    batch_size: int = 4
    prediction_type: str | None = None
    colormap: str = "Spectral"
    task_batching: str = "sequential"
    temporal_alignment: float = 0.0
    visual_range: str = "image"
    tile: bool = False
    tile_size: int = 0
    tile_overlap: float = 0.25
    ensemble: str = "none"

    def __post_init__(self):
        check_option("spacing", self.spacing, SPACINGS)
        check_int("steps", self.steps, 1, max_steps(self.spacing))
        check_int("processing_resolution", self.processing_resolution, 0)
        if 0 < self.processing_resolution < LATENT_FACTOR:
            raise ValueError(f"processing_resolution must be 0 (native) or at least {LATENT_FACTOR}, "
                             f"got {self.processing_resolution}")
        check_option("sampler", self.sampler, SAMPLERS)
        check_option("final_output", self.final_output, FINAL_OUTPUTS)
        check_option("colormap", self.colormap, COLORMAPS)
        check_option("task_batching", self.task_batching, TASK_BATCHING)
        check_option("visual_range", self.visual_range, VISUAL_RANGES)
        check_fraction("temporal_alignment", self.temporal_alignment)
        if self.prediction_type is not None:
            check_option("prediction_type", self.prediction_type, PREDICTION_TYPES)
        if self.guidance_scale is not None:
            check_real("guidance_scale", self.guidance_scale)
        check_int("batch_size", self.batch_size, 1)
        check_option("ensemble", self.ensemble, ensemble.ENSEMBLES)
        self._check_tiling()

    def _check_tiling(self) -> None:
        if not isinstance(self.tile, bool):
            raise TypeError(f"tile must be True or False, got {self.tile!r}")
        check_int("tile_size", self.tile_size, 0)  # 0: the processing resolution
        check_real("tile_overlap", self.tile_overlap, 0, 0.5, low_open=True)  # a fraction of the tile
        if self.tile and self.processing_resolution == 0:
            raise ValueError("tile=True needs a processing_resolution > 0 (tiles are predicted at it); "
                             "got processing_resolution=0 (native size)")
        if self.tile and 0 < self.tile_size < self.processing_resolution:
            raise ValueError(f"tile_size must be 0 or at least the processing_resolution "
                             f"({self.processing_resolution}): a smaller tile would be upsampled; got {self.tile_size}")

    @property
    def merges_passes(self) -> bool:
        """Whether an image may take several passes that are merged (tiling or an ensemble)."""
        return self.tile or self.ensemble != "none"

    def updated(self, **changes) -> PredictOptions:
        """A copy with some settings changed; unknown names raise a TypeError listing the valid ones."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"unknown prediction settings {sorted(unknown)}; valid: {[f.name for f in fields(self)]}")
        return replace(self, **changes)


@dataclass
class Prediction:
    """One adapter's result for a batch of images, at the input size, on the CPU.

    Attributes:
        adapter: the adapter's name; ``info`` its facts (task, conventions).
        raw: the task's values (see ``tasks/codecs.py``: metres, unit normals, class ids, ...).
        visual: float32 [B, H, W, 3] in [0, 1], a preview of raw.
        latents: final latents [B, 4, h, w] when asked for (``return_latents=True``).
        input_latents: the input image latents [B, 4, h, w] when asked for.
        visual_range: the colour range the visual used (one of VISUAL_RANGES): "batch" for a clip's
            frames, which maps made from this prediction follow by default.
        uncertainty: float32 [B, H, W], how far an ensemble's members disagree (``ensemble="flip"``;
            units per task in ``tasks/codecs.py``: metres, degrees, vote share, ...), else None.
        uncertainty_visual: float32 [B, H, W, 3] in [0, 1], grey: black = agreement, white = the
            task's ``uncertainty_scale`` (``ensemble.uncertainty_visual``); a mask is one channel.
    """

    adapter: str
    info: AdapterInfo
    raw: torch.Tensor
    visual: torch.Tensor
    latents: torch.Tensor | None = None
    input_latents: torch.Tensor | None = None
    visual_range: str = "image"
    uncertainty: torch.Tensor | None = None
    uncertainty_visual: torch.Tensor | None = None

    @property
    def task(self) -> str:
        return self.info.task


class PredictionBackend(Protocol):
    """What runs the networks for ``predict_images``.

    Attributes:
        schedule: the sampler's constants (``sampling.schedule_from_config``).
        mixes_adapters: whether one UNet batch may run different adapters per row.
    """

    schedule: Schedule
    mixes_adapters: bool

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [b, 3, H, W] in [0, 1] -> latents [b, 4, H/8, W/8], scaled (0.18215), deterministic."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [b, 4, h, w] -> pixels [b, 3, 8h, 8w], nominally in [-1, 1] and never clamped."""

    def empty_embedding(self) -> torch.Tensor:
        """The embedding of the empty prompt, [1, L, D]."""

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompt embeddings [n, L * k, D]."""

    def denoiser(self, adapters: Sequence[str], context: torch.Tensor, guidance_scale: float | None) -> Denoiser:
        """``model(z, t) -> output`` with `context` (see ``conditioning``); several adapters: row blocks."""


def conditioning(info: AdapterInfo, batch: int, empty: torch.Tensor, cond: torch.Tensor | None,
                 guidance_scale: float | None) -> tuple[torch.Tensor, float | None]:
    """Text context for the UNet and the guidance scale (None: a single call per step).

    `-notext` adapters (``uses_prompts`` False) always get the empty-prompt embedding, one call per
    step, as the reference's ``disable_prompts``; so do prompted adapters without a prompt. With a
    prompt (embeddings [1 or B, L * k, D]) a prompted adapter gets (cond; uncond) for
    classifier-free guidance (DMP: scale 2), cond and uncond in one batch as the reference.
    """
    if cond is None or not info.uses_prompts:
        return empty.expand(batch, -1, -1), None
    cond = cond.to(empty.device, empty.dtype).expand(batch, -1, -1)
    scale = DEFAULT_GUIDANCE if guidance_scale is None else float(guidance_scale)
    if scale == 1.0:
        return cond, None
    uncond = empty.repeat(1, cond.shape[1] // empty.shape[1], 1).expand(batch, -1, -1)
    return torch.cat([cond, uncond]), scale


def check_conditioning(adapters: Mapping[str, AdapterInfo], batch: int, prompt, prompt_embeds,
                       empty: torch.Tensor | None = None) -> None:
    """Refuse prompt counts or embedding shapes that do not fit the batch (or the model), before any work.

    Args:
        empty: the backend's empty-prompt embedding [1, L, D]; embeddings must be [1 or B, L * k, D].
    """
    if prompt is not None and prompt_embeds is not None:
        raise ValueError("pass either prompt or prompt_embeds, not both")
    if prompt is not None:
        count = 1 if isinstance(prompt, str) else len(prompt)
        if count not in (1, batch):
            raise ValueError(f"give one prompt or one per image ({batch}), got {count}")
    if prompt_embeds is not None:
        if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.ndim != 3:
            raise ValueError("prompt_embeds must be a tensor [B, L, D]")
        if empty is not None:
            length, width = empty.shape[1:]
            if prompt_embeds.shape[-1] != width or prompt_embeds.shape[1] % length:
                raise ValueError(f"prompt_embeds of shape {tuple(prompt_embeds.shape)} do not fit this model, "
                                 f"which expects [B, {length}*k, {width}] (an SD 1.x CLIP text encoder output)")
        if prompt_embeds.shape[0] not in (1, batch):
            raise ValueError(f"prompt_embeds must have 1 or {batch} rows, got {prompt_embeds.shape[0]}")
    prompted = prompt is not None or prompt_embeds is not None
    for name, info in adapters.items():
        if prompted != info.uses_prompts:
            logger.info("adapter %r %s", name, "takes no prompt (trained without); the prompt is not used"
                        if prompted else "was trained with prompts; none given, using the empty prompt")


def prompt_embeddings(backend: PredictionBackend, adapters: Mapping[str, AdapterInfo], batch: int, prompt,
                      prompt_embeds: torch.Tensor | None) -> torch.Tensor | None:
    """The prologue of every prediction: check the conditioning against the batch (and the backend's text
    width), and embed a text prompt when a prompted adapter will use it.

    Returns:
        prompt embeddings [1 or B, L * k, D], or None (the empty prompt).
    """
    empty = backend.empty_embedding() if prompt_embeds is not None else None
    check_conditioning(adapters, batch, prompt, prompt_embeds, empty)
    if prompt is not None and any(info.uses_prompts for info in adapters.values()):
        return backend.encode_prompts([prompt] if isinstance(prompt, str) else list(prompt))
    return prompt_embeds


def task_groups(adapters: Mapping[str, AdapterInfo], options: PredictOptions, mixes_adapters: bool
                ) -> list[list[str]]:
    """Adapters that sample together: one each, or (batched) those sharing prediction type and prompting."""
    if options.task_batching == "sequential":
        return [[name] for name in adapters]
    if not mixes_adapters:
        raise ValueError("task_batching='batched' needs a backend that runs several adapters in one batch "
                         "(DMPModel's peft adapters); use 'sequential'")
    groups: dict[tuple, list[str]] = {}
    for name, info in adapters.items():
        groups.setdefault((options.prediction_type or info.prediction_type, info.uses_prompts), []).append(name)
    return list(groups.values())


class StepCounter:
    """Counts sampler steps across images, chunks and adapters for one ``callback(done, total)``."""

    def __init__(self, callback: ProgressCallback | None, total: int):
        self.callback, self.total, self.done = callback, total, 0

    def step(self, i: int, num_steps: int, z: torch.Tensor) -> None:
        self.done += 1
        if self.callback is not None:
            self.callback(self.done, self.total)


def chunk_rows(value, start: int, count: int):
    """The rows of a per-image prompt list or embedding batch that belong to one chunk."""
    if value is None or isinstance(value, str) or len(value) == 1:
        return value
    return value[start:start + count]


def sample_group(backend: PredictionBackend, x: torch.Tensor, names: Sequence[str],
                 infos: Mapping[str, AdapterInfo], options: PredictOptions, cond: torch.Tensor | None,
                 progress: StepCounter) -> list[torch.Tensor]:
    """Final latents of one chunk [b, 4, h, w] for each adapter in `names` (one UNet batch if several).

    `cond`: the chunk's prompt embeddings [1 or b, L * k, D], or None.
    """
    schedule = backend.schedule
    info = infos[names[0]]
    prediction_type = options.prediction_type or info.prediction_type
    timesteps = get_timesteps(options.steps, options.spacing, schedule.alphas_cumprod.shape[0],
                              schedule.steps_offset)
    context, scale = conditioning(info, x.shape[0], backend.empty_embedding(), cond, options.guidance_scale)
    if len(names) > 1:  # adapter-major rows: [a1 x b; a2 x b; ...], the context likewise per half
        halves = context.chunk(1 if scale is None else 2)
        context = torch.cat([half.repeat(len(names), 1, 1) for half in halves])
    denoiser = backend.denoiser(names, context, scale)
    y = sample_dmp(denoiser, x.repeat(len(names), 1, 1, 1), timesteps, schedule, prediction_type,
                   options.sampler == "oracle", options.final_output, callback=progress.step)
    return list(y.chunk(len(names)))


def decode_task(backend: PredictionBackend, y: torch.Tensor, info: AdapterInfo, framing: Framing) -> torch.Tensor:
    """Prediction latents [b, 4, h, w] -> the task's raw values at the input size, on the CPU."""
    codec = get_codec(info.task)
    decoded = unframe(backend.decode(y), framing)                          # [b, 3, h', w']
    return codec.resize(codec.decode(decoded, info.target_scale), framing.input_size).cpu()


def predict_pass(backend: PredictionBackend, images: torch.Tensor, cond: torch.Tensor | None,
                 adapters: Mapping[str, AdapterInfo], groups: list[list[str]], options: PredictOptions,
                 progress: StepCounter) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """One chunk of images [b, 3, H, W] in [0, 1]: framed and encoded once, sampled with every adapter.

    Returns:
        ({name: raw at H x W on the CPU}, {name: final latents [b, 4, h, w]}, input latents [b, 4, h, w]).
    """
    pixels, framing = frame_batch(images, options.processing_resolution)    # [b, 3, Hp, Wp] in [0, 1]
    x = backend.encode(pixels)                                               # [b, 4, h, w]
    raws, latents = {}, {}
    for group in groups:
        for name, y in zip(group, sample_group(backend, x, group, adapters, options, cond, progress)):
            raws[name] = decode_task(backend, y, adapters[name], framing)
            latents[name] = y
    return raws, latents, x


def predict_merged(run: ensemble.PassFn, images: torch.Tensor, cond: torch.Tensor | None,
                   adapters: Mapping[str, AdapterInfo], options: PredictOptions) -> ensemble.Passes:
    """Several passes per image merged: a flip ensemble around `run`, tiles around that (if the images
    are larger than a tile). Returns {name: (raw, uncertainty or None)}."""
    tasks = {name: info.task for name, info in adapters.items()}
    if options.ensemble == "flip":
        run = functools.partial(ensemble.predict_flip, run, tasks=tasks)
    layout = tile_layout_for(images.shape[-2:], options)
    if layout is None:
        return run(images, cond)
    return tiling.predict_tiled(run, images, cond, tasks, layout, options.batch_size)


def tile_layout_for(size: Sequence[int], options: PredictOptions) -> tiling.TileLayout | None:
    """The tiles of images of `size` (H, W) under `options`, or None when they are not tiled."""
    if not options.tile:
        return None
    return tiling.tile_layout(size[0], size[1], options.tile_size or options.processing_resolution,
                              options.tile_overlap)


def count_passes(count: int, size: Sequence[int], adapters: Mapping[str, AdapterInfo], options: PredictOptions
                 ) -> int:
    """UNet sampling runs (per adapter group) that `count` images of `size` take: for the progress total."""
    chunks = math.ceil(count / options.batch_size)
    layout = tile_layout_for(size, options)
    if layout is None:
        return chunks
    aligning = any(get_codec(info.task).alignment is not None for info in adapters.values())
    return chunks * aligning + count * math.ceil(len(layout.boxes) / options.batch_size)


def predict_images(backend: PredictionBackend, images, adapters: Mapping[str, AdapterInfo],
                   options: PredictOptions | None = None, *, prompt: str | Sequence[str] | None = None,
                   prompt_embeds: torch.Tensor | None = None, return_latents: bool = False,
                   callback: ProgressCallback | None = None,
                   aligners: dict[str, TemporalAligner] | None = None) -> dict[str, Prediction]:
    """Predict several tasks for a batch of same-size images, each image encoded once.

    Images stream through in chunks of ``options.batch_size``: each chunk is framed, encoded,
    sampled with every adapter, decoded and turned into the tasks' values before the next, so
    memory beyond the results does not grow with the number of images (a video's frames). With
    ``options.tile`` or ``options.ensemble`` each chunk takes several passes that are merged
    (``predict_merged``: tiles in batches of batch_size, an image and its mirror in one batch).

    Args:
        backend: runs the networks (``PredictionBackend``).
        images: tensor [B, 3, H, W] or [3, H, W] in [0, 1], PIL image(s), numpy array(s) or paths.
        adapters: {name: AdapterInfo} of the adapters to run, in output order.
        options: PredictOptions (defaults: DMP's).
        prompt: text for prompted adapters (one, or one per image); prompt_embeds: or embeddings
            [1 or B, L * k, D] such as ComfyUI's CLIP Text Encode output.
        return_latents: also return final and input latents.
        callback: ``callback(done, total)`` after every sampler step; may raise to interrupt.
        aligners: with ``options.temporal_alignment`` > 0, a dict the caller keeps across calls when
            one clip comes in several calls (the CLI's chunks of a video): each depth adapter's
            ``TemporalAligner`` lives there and its reference runs on. None: this call is the whole clip.

    Returns:
        {name: Prediction} at the input size.
    """
    # 1. Check everything before any work.
    options = options or PredictOptions()
    if not adapters:
        raise ValueError("no adapters given")
    groups = task_groups(adapters, options, backend.mixes_adapters)
    batch = to_image_batch(images)
    count = batch.shape[0]
    prompt_embeds = prompt_embeddings(backend, adapters, count, prompt, prompt_embeds)
    if return_latents and options.merges_passes:
        raise ValueError("return_latents=True is not available with tile=True or ensemble='flip': the result "
                         "merges several passes; predict without them to get the latents")
    passes = count_passes(count, batch.shape[-2:], adapters, options)
    progress = StepCounter(callback, options.steps * passes * len(groups))
    aligned = clip_aligners({name: info.task for name, info in adapters.items()}, options.temporal_alignment,
                            aligners)
    outputs: dict[str, dict[str, torch.Tensor]] = {name: {} for name in adapters}
    inputs: dict[str, torch.Tensor] = {}

    def run(images: torch.Tensor, cond: torch.Tensor | None) -> ensemble.Passes:
        return {name: (raw, None) for name, raw in
                predict_pass(backend, images, cond, adapters, groups, options, progress)[0].items()}

    for start in range(0, count, options.batch_size):
        # 2. Each chunk: framed and encoded once for every adapter, sampled, decoded to the tasks' values.
        images = batch[start:start + options.batch_size]
        cond = chunk_rows(prompt_embeds, start, images.shape[0])
        if options.merges_passes:  # tiles and flip ensembles (tiling.py, ensemble.py)
            merged = predict_merged(run, images, cond, adapters, options)
            chunk_raws = {name: raw for name, (raw, _) in merged.items()}
            for name, (_, uncertainty) in merged.items():
                if uncertainty is not None:
                    store_rows(outputs[name], "uncertainty", uncertainty.float(), start, count)
        else:
            chunk_raws, chunk_latents, x = predict_pass(backend, images, cond, adapters, groups, options, progress)
            if return_latents:
                store_rows(inputs, "x", x.float().cpu(), start, count)
                for name, y in chunk_latents.items():
                    store_rows(outputs[name], "latents", y.float().cpu(), start, count)
        # 3. A clip's depth frames aligned in order (temporal.py).
        for name, raw in chunk_raws.items():
            store_rows(outputs[name], "raw", aligned[name](raw) if name in aligned else raw, start, count)
    # 4. Previews of the whole batch (one colour range for all with visual_range "batch"), uncertainty maps.
    results = {}
    for name, info in adapters.items():
        raw, uncertainty = outputs[name]["raw"], outputs[name].get("uncertainty")
        results[name] = Prediction(name, info, raw, batch_visual(raw, info, options),
                                   outputs[name].get("latents"), inputs.get("x"), options.visual_range,
                                   uncertainty=uncertainty,
                                   uncertainty_visual=None if uncertainty is None else
                                   ensemble.uncertainty_visual(info.task, uncertainty, raw))
    return results


def store_rows(into: dict[str, torch.Tensor], key: str, rows: torch.Tensor, start: int, count: int) -> None:
    """Copy a chunk's rows into ``into[key]``, the tensor for all `count` images (made at the first chunk),
    so that results are never held twice (as a list of chunks and as their concatenation)."""
    if key not in into:
        into[key] = rows.new_empty((count, *rows.shape[1:]))
    into[key][start:start + rows.shape[0]] = rows


def visual_settings(codec, raw: torch.Tensor, visual_range: str) -> dict:
    """``codec.visualize`` keywords: one colour range for all of `raw` ("batch"), or none (per image).

    `raw`: a batch of the task's values, or any sample of a clip's values ([1, 1, K] of pixels).
    """
    percentiles = getattr(codec, "visual_percentiles", None)  # only depth's colours depend on a range
    if visual_range != "batch" or percentiles is None:
        return {}
    low, high = (float(v[0]) for v in batch_percentiles(raw, *percentiles))
    return {"bounds": (low, high)}


def batch_visual(raw: torch.Tensor, info: AdapterInfo, options: PredictOptions) -> torch.Tensor:
    """The preview [B, H, W, 3] of a batch's raw values, made chunk by chunk so that its temporaries stay
    chunk-sized; with ``options.visual_range`` "batch" the colour range is taken once over the batch."""
    codec = get_codec(info.task)
    settings = visual_settings(codec, raw, options.visual_range)
    visual: dict[str, torch.Tensor] = {}
    for start in range(0, raw.shape[0], options.batch_size):
        chunk = codec.visualize(raw[start:start + options.batch_size], colormap=options.colormap, **settings)
        store_rows(visual, "rgb", chunk.float(), start, raw.shape[0])
    return visual["rgb"].contiguous()
