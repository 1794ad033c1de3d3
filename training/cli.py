"""`dmp train`, `dmp demo` and `dmp evaluate`, registered with the `dmp` command through the
"dmp.commands" entry points.

    dmp train --base sd15/ --train-images data/images --train-targets data/depth --task depth
    dmp train --config run.toml --resume latest
    accelerate launch --num_processes 2 -m training train --config run.toml
    dmp demo --output demo_out
    dmp evaluate --base sd15/ --adapter ckpt/depth --images data/images --targets data/depth --steps 1 5

``python -m training train|demo ...`` is the same without the entry point. Every TrainConfig
field is a flag (``--max-steps``; booleans also as ``--no-flip``); a config file (JSON or TOML,
keys are the field names) supplies values that flags override.
"""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from collections.abc import Sequence
from dataclasses import fields

from .config import TrainConfig, config_fields, config_from_dict, read_config_file

logger = logging.getLogger("dmp")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (absent flags leave the config file's or default value)."""
    parser.add_argument("--config", help="JSON or TOML file of settings (keys as the flags, with _ or -)")
    parser.add_argument("--resume", metavar="latest|PATH",
                        help="continue a run: 'latest' checkpoint of --output-dir, or a checkpoint folder")
    parser.add_argument("--stop-after", type=int, metavar="STEP",
                        help="stop after this step with a checkpoint (time-limited jobs; continue with "
                             "--resume)")
    kinds = config_fields()
    for spec in fields(TrainConfig):
        kind = kinds[spec.name]
        flag = "--" + spec.name.replace("_", "-")
        options = {"default": argparse.SUPPRESS, "help": spec.metadata.get("help", "")}
        default = spec.default if not isinstance(spec.default, tuple) else " ".join(spec.default)
        if default is not None:
            options["help"] += f" (default: {default})"
        if spec.metadata.get("choices") and typing.get_origin(kind) is not tuple:
            options["choices"] = spec.metadata["choices"]
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(flag, nargs="+", metavar="NAME", **options)
        else:
            base = [k for k in typing.get_args(kind) if k is not type(None)] or [kind]
            parser.add_argument(flag, type=base[0], **options)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from (lowest to highest priority) defaults, --config file, flags."""
    values = read_config_file(args.config) if getattr(args, "config", None) else {}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    for spec in fields(TrainConfig):
        if hasattr(args, spec.name):
            values[spec.name] = getattr(args, spec.name)
    return config_from_dict(values)


def run_train(args: argparse.Namespace) -> int:
    """`dmp train`: 0 on success, 2 on bad configuration or data (reported before training starts)."""
    from dmp_model.io.weight_files import CheckpointError

    from .trainer import train

    try:
        config = config_from_args(args)
        result = train(config, resume=args.resume, stop_after=args.stop_after)
    except (ValueError, TypeError, FileNotFoundError, CheckpointError) as err:
        logger.error("%s", err)
        return 2
    if result.adapter is not None:
        logger.info("done: %d steps; adapter %s", result.step, result.adapter)
    else:
        logger.info("stopped after step %d; continue with --resume latest", result.step)
    return 0


def register_train(subparsers) -> None:
    """Entry point ("dmp.commands"): add `train` to the `dmp` command."""
    parser = subparsers.add_parser("train", help="train a DMP task adapter (LoRA) on image/target folders",
                                   description="Train a DMP task adapter (LoRA) with the DMP objective.")
    add_train_arguments(parser)
    parser.set_defaults(func=run_train)


def run_demo(args: argparse.Namespace) -> int:
    """`dmp demo`: the miniature world end to end."""
    from .demo import DemoSettings
    from .demo import run_demo as demo

    try:
        summary = demo(args.output, DemoSettings(seed=args.seed), overwrite=args.overwrite,
                       cache_dir=args.prior_cache)
    except (ValueError, FileNotFoundError) as err:
        logger.error("%s", err)
        return 2
    # Whether the claims hold is a result, not an error: it is logged and in metrics.json ("bars", "passed").
    return 0 if summary else 1


def register_demo(subparsers) -> None:
    """Entry point ("dmp.commands"): add `demo` to the `dmp` command."""
    parser = subparsers.add_parser(
        "demo", help="DMP's claim on a procedural miniature world: a diffusion prior makes a few labels "
                     "generalise (CPU, under 5 minutes the first time, then under 3)",
        description="Render a miniature world with exact labels in several styles, pre-train a tiny SD-shaped "
                    "model on its images as a diffusion model (once; cached), train depth and normal adapters "
                    "on one style with `dmp train`'s code (LoRA on the prior, the same LoRA on a random UNet, "
                    "and a full fine-tune), predict held-out scenes in and out of that style with the DMP "
                    "sampler, and write metrics.json, results.md and results.png.")
    parser.add_argument("--output", "-o", default="demo_output", help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="world and training seed (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --output")
    parser.add_argument("--prior-cache", metavar="DIR", default=None,
                        help="where the pre-trained prior is cached (default: $DMP_CACHE_DIR, else "
                             "$XDG_CACHE_HOME/dmp or ~/.cache/dmp, then demo-prior)")
    parser.set_defaults(func=run_demo)


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """The data, the model, the grid (each axis takes several values) and the fixed settings."""
    from dmp_model.sd.loading import PRECISIONS
    from dmp_model.tasks.normals import NORMAL_CONVENTIONS
    from dmp_model.tasks.palettes import PALETTES

    from .metrics import DEPTH_ALIGNMENTS

    parser.add_argument("--base", required=True, help="SD 1.x base: diffusers folder or single file")
    parser.add_argument("--adapter", required=True, help="the adapter to evaluate (file or folder)")
    parser.add_argument("--images", required=True, help="folder of input images (as dmp train's)")
    parser.add_argument("--targets", required=True, help="folder of ground-truth targets, matched by file stem")
    parser.add_argument("-o", "--output", default="dmp_evaluation", help="results folder (default: %(default)s)")
    grid = parser.add_argument_group("grid", "every combination of these values is evaluated")
    for axis, default, meaning in (("steps", "5", "sampler steps"), ("spacing", "leading", "leading, trailing"),
                                   ("sampler", "ddim", "ddim, oracle"),
                                   ("processing-resolution", "512", "shorter side while predicting, 0 = native"),
                                   ("tile", "off", "off, on (tiles over images larger than a tile)"),
                                   ("ensemble", "none", "none, flip")):
        grid.add_argument(f"--{axis}", nargs="+", default=[default], metavar="VALUE",
                          help=f"{meaning} (default: {default})")
    parser.add_argument("--tile-size", type=int, default=0, help="tile side in pixels, 0 = processing resolution")
    parser.add_argument("--tile-overlap", type=float, default=0.25, help="tile blend ramp as a fraction (0, 0.5]")
    parser.add_argument("--batch-size", type=int, default=4, help="images (or tiles) per UNet batch")
    parser.add_argument("--depth-alignment", choices=DEPTH_ALIGNMENTS, default="none",
                        help="depth before the metrics: as predicted (metric depth) or per-image least-squares "
                             "scale and shift (relative depth) (default: %(default)s)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N pairs (file order)")
    parser.add_argument("--normal-convention", choices=NORMAL_CONVENTIONS, default="omnidata",
                        help="camera frame of normal targets (default: %(default)s)")
    parser.add_argument("--depth-png-scale", type=float, help="metres per unit of 16-bit depth PNGs without metadata")
    parser.add_argument("--segmentation-palette", choices=PALETTES, help="segmentation targets are colour images")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument("--tokenizer", help="CLIP tokenizer folder (prompted adapters with a single-file base)")
    parser.add_argument("--overwrite", action="store_true", help="discard results of an earlier evaluation")


def run_evaluate(args: argparse.Namespace) -> int:
    """`dmp evaluate`: 0 on success, 2 on bad arguments or data (reported before any prediction)."""
    from dmp_model import DMPModel
    from dmp_model.prediction.predict import PredictOptions

    from . import evaluate

    axes = {"steps": args.steps, "spacing": args.spacing, "sampler": args.sampler,
            "processing_resolution": args.processing_resolution, "tile": args.tile, "ensemble": args.ensemble}
    try:
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be a positive number of pairs, got {args.limit}")
        base = PredictOptions(batch_size=args.batch_size, tile_size=args.tile_size, tile_overlap=args.tile_overlap)
        settings = evaluate.parse_grid(axes, base)
        model = DMPModel.from_pretrained(args.base, args.device, args.precision, tokenizer=args.tokenizer)
        info = model.load_adapter(args.adapter)
        name = next(iter(model.adapters))
        config = evaluate.reading_config(args.base, args.images, args.targets, info,
                                         normal_convention=args.normal_convention,
                                         depth_png_scale=args.depth_png_scale,
                                         segmentation_palette=args.segmentation_palette)
        pairs = evaluate.load_pairs(args.images, args.targets, config, args.limit)
        identity = {"adapter": str(args.adapter), "images": str(args.images), "targets": str(args.targets),
                    "tile_size": args.tile_size, "tile_overlap": args.tile_overlap, "batch_size": args.batch_size}

        def predict(images, options, prompts):
            return model.predict(images, name, options, prompt=prompts)

        rows = evaluate.run_evaluation(predict, pairs, config, settings, base, args.output, identity,
                                       args.depth_alignment, args.overwrite)
    except (ValueError, TypeError, FileNotFoundError) as err:  # DataError and CheckpointError are ValueErrors
        logger.error("%s", err)
        return 2
    sys.stdout.write(evaluate.format_table(rows, config.task) + "\n")
    logger.info("wrote %s, %s and %s in %s", evaluate.RESULTS_JSON, evaluate.RESULTS_CSV, evaluate.QUALITY_PNG,
                args.output)
    return 0


def register_evaluate(subparsers) -> None:
    """Entry point ("dmp.commands"): add `evaluate` to the `dmp` command."""
    parser = subparsers.add_parser(
        "evaluate", help="measure an adapter on labelled images with a grid of settings (quality and speed)",
        description="Predict a labelled folder (dmp train's layout and formats) with every combination of the "
                    "given settings; print and write (CSV, JSON, plot) the task's metrics and seconds per image. "
                    "An interrupted run resumes: settings already in results.json are skipped.")
    add_evaluate_arguments(parser)
    parser.set_defaults(func=run_evaluate)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training {train,demo,evaluate} ...``."""
    parser = argparse.ArgumentParser(prog="python -m training", description="DMP adapter training")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    register_train(subparsers)
    register_demo(subparsers)
    register_evaluate(subparsers)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
