"""The trainer's configuration: one frozen dataclass, from flags, a JSON/TOML file or code.

Every field has a default chosen after the DMP paper ("Training" in DMP_METHOD.md: rank 4 on all
attention projections, v-prediction, AdamW at 1e-4, cosine schedule, batch 8, 512 px) except the
data and base paths. The resolved configuration is written as ``config.json`` next to the
outputs and stored inside every checkpoint; a resumed run must have the same configuration.
"""

from __future__ import annotations

import json
import os
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

from dmp_model.adapters import ATTENTION_PROJECTIONS
from dmp_model.options import check_fraction, check_int, check_real, option_error
from dmp_model.sampling import PREDICTION_TYPES
from dmp_model.tasks.codecs import DEPTH_TARGET_SCALE, TASKS
from dmp_model.tasks.normals import NORMAL_CONVENTIONS
from dmp_model.tasks.palettes import PALETTES

CROP_MODES = ("center", "stretch")
LR_SCHEDULERS = ("cosine", "constant", "constant_with_warmup", "linear", "cosine_with_restarts", "polynomial")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
LORA_INITS = ("gaussian", "default")
# The projections LoRA can adapt: the engine's list (DMP adapts all four of every attention layer).
TARGET_MODULES = tuple(ATTENTION_PROJECTIONS)
# Fields whose value is a filesystem path: made absolute when a configuration is resolved.
PATH_FIELDS = ("base", "train_images", "train_targets", "val_images", "val_targets", "output_dir",
               "tokenizer")


def _option(default, help: str, **extra):
    """A dataclass field carrying its command-line help."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on. See ``--help`` of ``dmp train`` for each field."""

    # Data ------------------------------------------------------------------------------------
    base: str = _option(None, "SD 1.x base model: a diffusers folder or a single .safetensors/.ckpt file")
    train_images: str = _option(None, "folder of input images (captions: metadata.jsonl or a .txt per image)")
    train_targets: str = _option(None, "folder of targets, matched to the images by file stem")
    task: str = _option("depth", f"what the adapter predicts, one of {TASKS}", choices=TASKS)
    output_dir: str = _option("dmp_output/train", "where checkpoints, logs, previews and the adapter go")
    val_images: str | None = _option(None, "validation images (default: hold out --val-split training pairs)")
    val_targets: str | None = _option(None, "validation targets, matched by stem")
    val_split: int = _option(8, "without validation folders: training pairs held out for validation")
    resolution: int = _option(512, "training side length in pixels, a multiple of 8 (the paper: 512)")
    crop: str = _option("center", "'center': shorter side to --resolution, then a centre crop; "
                        "'stretch': resize to a square, ignoring the aspect ratio", choices=CROP_MODES)
    flip: bool = _option(True, "random horizontal flips of image and target. The paper flips every task but "
                         "normals; here normals are flipped too, with their x component negated, which is "
                         "geometrically equivalent (see --flip-normals); --no-flip (or --no-flip-normals) "
                         "reproduces the paper's recipe for normals")
    flip_normals: bool = _option(True, "with --flip and --task normal: flip normals too (x negated). The paper "
                                 "does not flip normals; --no-flip-normals reproduces its recipe")
    captions: bool = _option(False, "condition on captions (a prompted adapter) instead of the empty prompt")
    tokenizer: str | None = _option(None, "CLIP tokenizer folder (captions with a single-file base)")
    depth_png_scale: float | None = _option(None, "metres per unit of 16-bit depth PNGs without DMP "
                                            "metadata (e.g. 0.001 for millimetres)")
    target_scale: float | None = _option(None, "depth: metres encoded as white (default 8, as DMP)")
    normal_convention: str = _option("omnidata", "camera frame of the normal files",
                                     choices=NORMAL_CONVENTIONS)
    adapter_normal_convention: str = _option("omnidata", "camera frame the adapter learns (DMP: omnidata)",
                                             choices=NORMAL_CONVENTIONS)
    segmentation_palette: str | None = _option(None, "segmentation targets are colour images in this palette "
                                               f"{PALETTES}; default: class-id images (mode L/P/I)",
                                               choices=PALETTES)
    cache_latents: bool = _option(False, "encode every training image and target once (with its flip) and "
                                  "keep the VAE's latent distributions in memory; same objective, faster for "
                                  "small sets")
    num_workers: int = _option(0, "data loading worker processes")
    # Adapter ---------------------------------------------------------------------------------
    rank: int = _option(4, "LoRA rank (DMP: 4)")
    lora_alpha: float | None = _option(None, "LoRA alpha (default: the rank; update up @ down, as DMP)")
    self_attn_only: bool = _option(False, "adapt only the self-attention layers (attn1)")
    target_modules: tuple[str, ...] = _option(TARGET_MODULES, "attention projections to adapt",
                                              choices=TARGET_MODULES)
    lora_init: str = _option("gaussian", "initialisation of the LoRA down weights (up weights start at 0)",
                             choices=LORA_INITS)
    prediction_type: str = _option("v_prediction", "what the UNet regresses (DMP: v_prediction)",
                                   choices=PREDICTION_TYPES)
    min_timestep: int = _option(0, "train on timesteps t uniform in MIN..999 (DMP: 0). The sampler starts from "
                                "the input image at a high t, where z_t holds little of the target; low t teach "
                                "the UNet to find the target inside z_t instead of reading the image")
    base_name: str | None = _option(None, "base model name stored in the adapter (default: its file name)")
    full_finetune: bool = _option(False, "also train every weight of the UNet itself, not only the LoRA (a full "
                                  "fine-tune: the baseline DMP's frozen prior is compared with). The fine-tuned "
                                  "UNet is written to OUTPUT_DIR/unet (a diffusers UNet folder): predict with it in "
                                  "place of the base's UNet, plus the adapter")
    # Optimisation ----------------------------------------------------------------------------
    max_steps: int = _option(50_000, "optimiser steps (DMP: 50K)")
    batch_size: int = _option(8, "images per process per micro-batch")
    grad_accum: int = _option(1, "micro-batches per optimiser step")
    learning_rate: float = _option(1e-4, "AdamW learning rate (DMP: 1e-4)")
    lr_scheduler: str = _option("cosine", "learning-rate schedule after warm-up", choices=LR_SCHEDULERS)
    warmup_steps: int = _option(0, "linear warm-up steps")
    adam_beta1: float = _option(0.9, "AdamW beta1")
    adam_beta2: float = _option(0.999, "AdamW beta2")
    weight_decay: float = _option(1e-2, "AdamW weight decay")
    adam_epsilon: float = _option(1e-8, "AdamW epsilon")
    max_grad_norm: float = _option(1.0, "gradient clipping norm (0: no clipping)")
    mixed_precision: str = _option("no", "autocast precision; frozen weights are stored in it too",
                                   choices=MIXED_PRECISIONS)
    gradient_checkpointing: bool = _option(False, "recompute UNet activations in backward (less memory)")
    seed: int = _option(0, "seed of the data order, flips, latent samples and timesteps")
    # Checkpoints, validation, logs -------------------------------------------------------------
    checkpoint_every: int = _option(1000, "steps between checkpoints (0: only the final one)")
    keep_checkpoints: int = _option(3, "checkpoints kept (older ones go once a new one is complete)")
    val_every: int = _option(1000, "steps between validations (0: only after the last step)")
    val_limit: int = _option(32, "validation pairs evaluated (the first ones, in file order)")
    val_previews: int = _option(4, "rows in each validation preview grid")
    val_steps: int = _option(5, "sampler steps at validation (DMP: 5)")
    log_every: int = _option(10, "steps between loss records in the log")

    def __post_init__(self):
        _check_config(self)

    @property
    def resolved_target_scale(self) -> float:
        """Metres per decoded unit for depth (8, as DMP, unless set); 1 for the other tasks."""
        if self.target_scale is not None:
            return float(self.target_scale)
        return DEPTH_TARGET_SCALE if self.task == "depth" else 1.0

    @property
    def flips(self) -> bool:
        """Whether training samples are randomly flipped (``flip``; for normals also ``flip_normals``)."""
        return self.flip and (self.task != "normal" or self.flip_normals)

    @property
    def resolved_lora_alpha(self) -> float:
        return float(self.rank if self.lora_alpha is None else self.lora_alpha)

    def to_dict(self) -> dict:
        """Plain JSON-able values (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def resolved(self) -> TrainConfig:
        """A copy with absolute paths, as written to config.json and compared on resume."""
        paths = {name: os.path.abspath(os.path.expanduser(getattr(self, name)))
                 for name in PATH_FIELDS if getattr(self, name) is not None}
        return replace(self, **paths)


def _check_config(config: TrainConfig) -> None:
    """Raise ValueError/TypeError naming the field, its value and what is expected."""
    for name in ("base", "train_images", "train_targets"):
        if not getattr(config, name):
            raise ValueError(f"{name} is required (got {getattr(config, name)!r}): "
                             f"pass --{name.replace('_', '-')} PATH or set it in the config file")
    for spec in fields(config):
        choices = spec.metadata.get("choices")
        value = getattr(config, spec.name)
        values = value if isinstance(value, tuple) else (value,)
        if choices and value is not None and any(v not in choices for v in values):
            raise option_error(spec.name, value, choices)
    positive = ("resolution", "max_steps", "batch_size", "grad_accum", "rank", "keep_checkpoints",
                "val_steps", "log_every", "val_limit")
    non_negative = ("val_split", "num_workers", "warmup_steps", "checkpoint_every", "val_every",
                    "val_previews", "seed", "min_timestep")
    for name in positive + non_negative:
        check_int(name, getattr(config, name), 1 if name in positive else 0)
    if config.resolution % 8:
        raise ValueError(f"resolution must be a multiple of 8 (the VAE downsamples 8x), "
                         f"got {config.resolution}")
    if config.min_timestep > 998:
        raise ValueError(f"min_timestep must be below 999 (the last of SD's 1000 training steps), "
                         f"got {config.min_timestep}")
    if config.warmup_steps > config.max_steps:
        raise ValueError(f"warmup_steps ({config.warmup_steps}) must not exceed max_steps "
                         f"({config.max_steps})")
    for name in ("learning_rate", "adam_epsilon", "lora_alpha", "target_scale", "depth_png_scale"):
        if getattr(config, name) is not None:
            check_real(name, getattr(config, name), 0, low_open=True)
    for name in ("weight_decay", "max_grad_norm"):
        check_real(name, getattr(config, name), 0)
    for name in ("adam_beta1", "adam_beta2"):
        check_fraction(name, getattr(config, name), high_open=True)
    if not config.target_modules:
        raise ValueError(f"target_modules must name at least one of {TARGET_MODULES}")
    if (config.val_images is None) != (config.val_targets is None):
        raise ValueError("give both val_images and val_targets, or neither (--val-split pairs are held out); "
                         f"got val_images={config.val_images!r}, val_targets={config.val_targets!r}")


def config_fields() -> dict[str, typing.Any]:
    """Field name -> type (typing objects, resolved), in declaration order."""
    hints = typing.get_type_hints(TrainConfig)
    return {spec.name: hints[spec.name] for spec in fields(TrainConfig)}


def _coerce(name: str, value, kind):
    """A value read from JSON/TOML converted to the field's type (tuple fields from lists)."""
    if value is None:
        return None
    if typing.get_origin(kind) is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be a list of strings, got {value!r}")
        return tuple(value)
    base = [k for k in typing.get_args(kind) if k is not type(None)] or [kind]
    target = base[0]
    if target is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, target) or (target is int and isinstance(value, bool)):
        raise TypeError(f"{name} must be {target.__name__}, got {value!r} ({type(value).__name__})")
    return value


def config_from_dict(values: dict, defaults: TrainConfig | None = None) -> TrainConfig:
    """Build a TrainConfig from a mapping (keys may use dashes); unknown keys are an error."""
    kinds = config_fields()
    known = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in kinds:
            raise ValueError(f"unknown configuration key {key!r}; valid keys: {sorted(kinds)}")
        known[name] = _coerce(name, value, kinds[name])
    if defaults is not None:
        return replace(defaults, **known)
    return TrainConfig(**known)


def read_config_file(path: str | os.PathLike) -> dict:
    """Key/value pairs of a .json or .toml configuration file (a [train] table in TOML is accepted)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    if path.suffix == ".json":
        values = json.loads(path.read_text(encoding="utf-8"))
    elif path.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            try:
                import tomli as tomllib
            except ModuleNotFoundError as err:
                raise ValueError(f"reading {path.name} needs Python 3.11+ or the tomli package; "
                                 "or use a .json config file") from err
        values = tomllib.loads(path.read_text(encoding="utf-8"))
        values = values.get("train", values)
    else:
        raise ValueError(f"config file must end in .json or .toml, got {path.name!r}")
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a table of settings, got {type(values).__name__}")
    return values


def config_differences(saved: dict, current: TrainConfig) -> list[str]:
    """'field: saved -> current' for every field that differs from a checkpoint's configuration.

    A field missing from `saved` (added to TrainConfig after that run started) counts as its default:
    older runs behaved as the default does, so they still resume while the value is left at it.
    """
    now = current.to_dict()
    defaults = {spec.name: spec.default for spec in fields(TrainConfig) if spec.default is not MISSING}
    saved = {**{k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items() if k not in saved},
             **saved}
    names = sorted(set(saved) | set(now))
    return [f"{name}: {saved.get(name, '<absent>')!r} -> {now.get(name, '<absent>')!r}"
            for name in names if saved.get(name, MISSING) != now.get(name, MISSING)]
