"""`dmp`: the command line. `dmp predict` lives here; other packages add commands (`dmp train`,
`dmp demo` from `training`) through the "dmp.commands" entry-point group, so this package never
imports them.

    dmp predict photos/ --base sd15.safetensors --adapter ckpt/depth-hypersim-notext -o out/

Under ``accelerate launch`` (or torchrun) each process takes every N-th file of the sorted list,
so a large folder is shared out and no file is written twice (on a CPU-only machine, accelerate
starts several processes only with ``--multi_gpu --num_processes N``; ``--cpu`` starts one).
Existing outputs are skipped unless --overwrite, so an interrupted run resumes where it stopped.
Video files (mp4, mov, webm, mkv; PyAV, an optional extra) are clips: raw outputs per frame, a
preview video, temporal alignment of depth, resuming at the first missing frame (``clips.py``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path

import torch

from ..adapters import adapter_name_for
from ..images import IMAGE_EXTENSIONS, list_images, load_image
from ..io import writers
from ..io.video import VIDEO_EXTENSIONS, is_video, require_av
from ..io.writers import prediction_paths, write_prediction
from ..prediction.ensemble import ENSEMBLES
from ..prediction.predict import DEFAULT_GUIDANCE, PredictOptions
from ..sampling import FINAL_OUTPUTS, SAMPLERS, SPACINGS
from ..sd.loading import PRECISIONS
from ..tasks.colormaps import COLORMAPS
from .assets import add_export_3d_arguments, asset_done, asset_settings, check_asset_tasks, write_image_asset

logger = logging.getLogger("dmp")

OUTPUT_FORMATS = ("npy", "png", "exr", "visual")
DEFAULTS = PredictOptions()  # the one home of the prediction defaults
_DEFAULT_FORMATS = ("npy", "png", "visual")


def add_predict_parser(subparsers) -> None:
    """Register `dmp predict`."""
    p = subparsers.add_parser("predict", help="predict dense maps for image or video files or folders",
                              description="Predict with DMP task adapters; writes raw values and previews.")
    p.add_argument("inputs", nargs="+", help="image or video files and/or folders (searched recursively)")
    p.add_argument("--base", required=True, help="SD 1.x base: diffusers folder or .safetensors/.ckpt file")
    p.add_argument("--adapter", action="append", required=True, metavar="PATH",
                   help="adapter file or folder; repeat for several tasks (one VAE encode serves all)")
    p.add_argument("-o", "--output", default="dmp_output", help="output folder (default: %(default)s)")
    p.add_argument("--steps", type=int, default=DEFAULTS.steps, help="sampler steps (default: %(default)s)")
    p.add_argument("--sampler", choices=SAMPLERS, default=DEFAULTS.sampler)
    p.add_argument("--spacing", choices=SPACINGS, default=DEFAULTS.spacing)
    p.add_argument("--processing-resolution", type=int, default=DEFAULTS.processing_resolution,
                   help="shorter side while predicting, 0 = native (default: %(default)s)")
    p.add_argument("--final-output", choices=FINAL_OUTPUTS, default=DEFAULTS.final_output)
    p.add_argument("--prompt", help="text prompt for prompted adapters (needs a tokenizer)")
    p.add_argument("--guidance-scale", type=float,
                   help=f"classifier-free guidance with --prompt (default {DEFAULT_GUIDANCE:g})")
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    p.add_argument("--formats", default=",".join(_DEFAULT_FORMATS),
                   help=f"comma-separated subset of {OUTPUT_FORMATS} (default: %(default)s); "
                        "png = 16-bit depth in millimetres or 8-bit class ids")
    p.add_argument("--colormap", choices=COLORMAPS, default=DEFAULTS.colormap, help="depth preview colormap")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", choices=PRECISIONS, default="auto")
    p.add_argument("--config", help="diffusers config folder for a single-file base (default: bundled SD 1.x)")
    p.add_argument("--tokenizer", help="CLIP tokenizer folder (prompts with a single-file base)")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "dmp"),
                   help="cache for the empty-prompt embedding (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="recompute outputs that already exist")
    p.add_argument("--temporal-alignment", type=float, default=1.0, metavar="STRENGTH",
                   help="video files: align each depth frame's scale to the frames before it, 0 (off) to 1 "
                        "(default: %(default)s); images are never aligned")
    p.add_argument("--tile", action="store_true",
                   help="large images: a global pass plus overlapping tiles at the processing resolution, "
                        "merged without seams (more detail, one pass per tile)")
    p.add_argument("--tile-size", type=int, default=DEFAULTS.tile_size,
                   help="tile side in input pixels, 0 = the processing resolution (default: %(default)s)")
    p.add_argument("--tile-overlap", type=float, default=DEFAULTS.tile_overlap,
                   help="blend ramp between tiles, a fraction of the tile in (0, 0.5] (default: %(default)s)")
    p.add_argument("--ensemble", choices=ENSEMBLES, default=DEFAULTS.ensemble,
                   help="flip: predict each image and its mirror in one batch and merge them (default: %(default)s)")
    p.add_argument("--uncertainty", action="store_true",
                   help="with --ensemble flip: also write _uncertainty.npy (the members' disagreement) and "
                        "_uncertainty.png (grey, white = high)")
    add_export_3d_arguments(p)
    p.set_defaults(func=run_predict)


def _parse_formats(text: str) -> tuple[str, ...]:
    formats = tuple(f.strip() for f in text.split(",") if f.strip())
    unknown = [f for f in formats if f not in OUTPUT_FORMATS]
    if unknown or not formats:
        raise ValueError(f"--formats must be a comma-separated subset of {OUTPUT_FORMATS}, got {text!r}")
    if "exr" in formats and not writers.exr_available():
        raise ValueError("--formats exr needs the OpenEXR package: pip install openexr")
    return formats


def output_stems(files: Sequence[Path], inputs: Sequence[str]) -> dict[Path, Path]:
    """Output path stem for each input file: its path relative to the folder it was found in."""
    roots = [Path(i) for i in inputs if Path(i).is_dir()]
    stems: dict[Path, Path] = {}
    for file in files:
        root = next((r for r in roots if file.is_relative_to(r)), None)
        stems[file] = file.relative_to(root).with_suffix("") if root else Path(file.stem)
    clashes = len(stems) - len(set(stems.values()))
    if clashes:
        raise ValueError(f"{clashes} input files would write to the same output names; "
                         "pass folders instead of same-named files from different places")
    return stems


def _shard(files: list[Path]) -> tuple[list[Path], int, int, str]:
    """This process's share of the files, its rank, the process count and its device."""
    try:
        from accelerate import PartialState

        # Without cpu=True, PartialState takes a CPU-only torchrun / `accelerate launch --multi_gpu` run
        # for N single processes (DistributedType.NO), and every process would write every file.
        cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") \
            or not torch.cuda.is_available()
        state = PartialState(cpu=cpu)
        rank, world, device = state.process_index, state.num_processes, str(state.device)
    except ImportError:
        rank, world, device = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), "auto"
    return files[rank::world], rank, world, device


def _image_batches(files: Sequence[Path], batch_size: int, failed: list[Path]):
    """(files, images [b, 3, H, W]) of up to `batch_size` same-size images; unreadable files go to `failed`."""
    pending: dict[tuple[int, int], list[tuple[Path, torch.Tensor]]] = {}
    for file in files:
        try:
            image = load_image(file)
        except ValueError as err:
            logger.error("%s: %s", file, err)
            failed.append(file)
            continue
        group = pending.setdefault(tuple(image.shape[-2:]), [])
        group.append((file, image))
        if len(group) == batch_size:
            yield [f for f, _ in group], torch.stack([i for _, i in group])
            group.clear()
    for group in pending.values():
        if group:
            yield [f for f, _ in group], torch.stack([i for _, i in group])


def run_predict(args: argparse.Namespace) -> int:
    """`dmp predict`: returns 0 when every image was written, 1 when some failed, 2 on bad arguments."""
    from tqdm import tqdm

    from ..sd.model import DMPModel, PredictOptions

    # 1. Arguments, inputs and output names: usage errors end here, before any model loads.
    try:
        formats = _parse_formats(args.formats)
        options = PredictOptions(steps=args.steps, sampler=args.sampler, spacing=args.spacing,
                                 processing_resolution=args.processing_resolution,
                                 guidance_scale=args.guidance_scale, final_output=args.final_output,
                                 batch_size=args.batch_size, colormap=args.colormap, tile=args.tile,
                                 tile_size=args.tile_size, tile_overlap=args.tile_overlap, ensemble=args.ensemble)
        if args.uncertainty and args.ensemble == "none":
            raise ValueError("--uncertainty needs --ensemble flip: the uncertainty is how far the ensemble's "
                             "members disagree")
        files = list_images(args.inputs, IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)
        if not files:
            raise ValueError(f"no images found in {args.inputs} (nor video files)")
        clip_options = options.updated(temporal_alignment=args.temporal_alignment)
        if any(is_video(file) for file in files):  # clips: checked here, before the model loads
            from .clips import check_clip_formats

            check_clip_formats(formats)
            require_av()
            if args.uncertainty:
                raise ValueError("--uncertainty writes one file per image and is not available for video inputs; "
                                 "predict the clip without it (or its frames as images)")
        stems = output_stems(files, args.inputs)
        assets = asset_settings(args, files)  # --export-3d: None without it
        names = [adapter_name_for(path) for path in args.adapter]
        if len(set(names)) < len(names):
            raise ValueError(f"adapters must have distinct names, got {names}")
    except (ValueError, TypeError, FileNotFoundError, ImportError) as err:
        logger.error("%s", err)
        return 2
    # 2. This process's share of the files, and the model (a wrong base or adapter is a usage error).
    mine, rank, world, device = _shard(files)
    try:
        model = DMPModel.from_pretrained(args.base, args.device if args.device != "auto" else device,
                                         args.precision, args.config, args.tokenizer, args.cache_dir)
        for path in args.adapter:
            model.load_adapter(path)
        if args.prompt and model.text.tokenizer is None:
            raise ValueError("--prompt needs the CLIP tokenizer, and this base has none: pass --tokenizer "
                             "<folder with vocab.json and merges.txt> (e.g. the tokenizer/ folder of an SD 1.x "
                             "diffusers model)")
        check_asset_tasks(assets, (model.adapters[n].task for n in names))
    except (ValueError, TypeError, FileNotFoundError) as err:  # CheckpointError is a ValueError
        logger.error("%s", err)
        return 2
    output = Path(args.output)

    def paths(file: Path, name: str) -> dict[str, Path]:
        return prediction_paths(model.adapters[name].task, stems[file], output / name, formats, args.uncertainty)

    # 3. Skip what an earlier run wrote; predict the rest in same-size batches, one encode for all tasks.
    image_files = [f for f in mine if not is_video(f)]
    todo = [f for f in image_files if args.overwrite or not all(list(paths(f, n).values())[-1].exists() for n in names)
            or not asset_done(assets, output, stems[f])]
    failed: list[Path] = []
    bar = tqdm(total=len(todo), desc=f"dmp predict [{rank + 1}/{world}]" if world > 1 else "dmp predict",
               unit="img", disable=None)
    def predict_and_write(batch_files: list[Path], images: torch.Tensor) -> None:
        results = model.predict_tasks(images, names, options, prompt=args.prompt)
        for index, file in enumerate(batch_files):
            for name, prediction in results.items():
                write_prediction(prediction, index, paths(file, name))
            write_image_asset(assets, output, stems[file], images, results, index)

    for batch_files, images in _image_batches(todo, options.batch_size, failed):
        try:
            predict_and_write(batch_files, images)
        except (ValueError, OSError, RuntimeError):  # retry one by one, so the error names its image
            for index, file in enumerate(batch_files):
                try:
                    predict_and_write([file], images[index:index + 1])
                except (ValueError, OSError, RuntimeError) as err:  # RuntimeError: out of memory among others
                    logger.error("%s: %s", file, err)
                    failed.append(file)
        bar.update(len(batch_files))
    bar.close()
    # 4. Video files: each a clip, streamed in chunks, resumed at its first missing frame.
    written, skipped = len(todo) - len(failed), len(image_files) - len(todo)
    if len(image_files) < len(mine):
        from .clips import ClipJob, predict_clips

        job = ClipJob(model, {n: model.adapters[n] for n in names}, output, formats, clip_options, args.prompt,
                      args.overwrite)
        clips_written, clips_skipped, clips_failed = predict_clips(job, [f for f in mine if is_video(f)], stems)
        written, skipped, failed = written + clips_written, skipped + clips_skipped, failed + clips_failed
    # 5. One summary line per process (tests and users read it).
    logger.info("process %d/%d: %d written, %d skipped (already there), %d failed",
                rank + 1, world, written, skipped, len(failed))
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    """`dmp` with `predict` and every command registered under the "dmp.commands" entry points."""
    parser = argparse.ArgumentParser(prog="dmp", description="DMP dense prediction on Stable Diffusion 1.x")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_predict_parser(subparsers)
    for entry in entry_points(group="dmp.commands"):
        entry.load()(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
