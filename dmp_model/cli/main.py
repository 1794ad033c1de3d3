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
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

import torch

from ..adapters import adapter_name_for
from ..geometry.export import AssetSettings
from ..images import InputFiles, find_inputs
from ..io import writers
from ..io.image_files import FRAMES, readable_extensions
from ..io.video import VIDEO_EXTENSIONS, is_video, require_av
from ..io.writers import prediction_paths
from ..prediction.ensemble import ENSEMBLES
from ..prediction.predict import DEFAULT_GUIDANCE, PredictOptions
from ..sampling import FINAL_OUTPUTS, SAMPLERS, SPACINGS
from ..sd.loading import PRECISIONS
from ..tasks.colormaps import COLORMAPS
from .assets import AssetOutput, add_export_3d_arguments, asset_settings, check_asset_tasks
from .batch import ImageJob, output_stems, predict_image_files
from .report import RunReport, report_path

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
    add_file_options(p)
    add_export_3d_arguments(p)
    p.set_defaults(func=run_predict)


def add_file_options(p) -> None:
    """Options about the input files and the run's record (docs/batch.md)."""
    p.add_argument("--frames", choices=FRAMES, default="first",
                   help="multi-frame files (animations, MPO, multi-page TIFF): predict the first frame (logged), "
                        "or every frame as <name>/frame_000001... (default: %(default)s)")
    p.add_argument("--max-pixels", type=_pixel_count, default=None, metavar="N",
                   help="refuse images with more pixels, a guard against decompression bombs (default: Pillow's "
                        "limit, 178956970); raise it for genuine gigapixel images (with --tile); 0 = no limit")
    p.add_argument("--report", metavar="FILE",
                   help="write one JSON line per input file: file, status (written, skipped, failed, ignored), "
                        "reason, outputs")


def _pixel_count(text: str) -> int:
    """--max-pixels: a whole number of pixels, 0 for no limit (argparse shows the error)."""
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number of pixels (0 = no limit), got {text!r}")
    return value


def _parse_formats(text: str) -> tuple[str, ...]:
    formats = tuple(f.strip() for f in text.split(",") if f.strip())
    unknown = [f for f in formats if f not in OUTPUT_FORMATS]
    if unknown or not formats:
        raise ValueError(f"--formats must be a comma-separated subset of {OUTPUT_FORMATS}, got {text!r}")
    if "exr" in formats and not writers.exr_available():
        raise ValueError("--formats exr needs the OpenEXR package: pip install openexr")
    return formats


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


@dataclass(frozen=True)
class _Request:
    """A checked `dmp predict` command line: what to run on which files."""

    formats: tuple[str, ...]
    options: PredictOptions
    clip_options: PredictOptions
    inputs: InputFiles
    stems: dict[Path, Path]
    names: list[str]
    assets: AssetSettings | None  # --export-3d, else None


def _check_request(args: argparse.Namespace) -> _Request:
    """Everything about the arguments and inputs that can be wrong, before any model loads (exit 2)."""
    formats = _parse_formats(args.formats)
    options = PredictOptions(steps=args.steps, sampler=args.sampler, spacing=args.spacing,
                             processing_resolution=args.processing_resolution,
                             guidance_scale=args.guidance_scale, final_output=args.final_output,
                             batch_size=args.batch_size, colormap=args.colormap, tile=args.tile,
                             tile_size=args.tile_size, tile_overlap=args.tile_overlap, ensemble=args.ensemble)
    if args.uncertainty and args.ensemble == "none":
        raise ValueError("--uncertainty needs --ensemble flip: the uncertainty is how far the ensemble's "
                         "members disagree")
    names = [adapter_name_for(path) for path in args.adapter]
    output = Path(args.output)
    inputs = find_inputs(args.inputs, readable_extensions() + VIDEO_EXTENSIONS,
                         exclude=[output, *(output / name for name in names)])
    if not inputs.files:
        for path, reason in inputs.ignored:
            logger.info("%s: ignored: %s", path, reason)
        raise ValueError(f"no images found in {args.inputs} (nor video files)"
                         + (f"; {len(inputs.ignored)} files passed over, listed above" if inputs.ignored else ""))
    clip_options = options.updated(temporal_alignment=args.temporal_alignment)
    if any(is_video(file) for file in inputs.files):  # clips: checked here, before the model loads
        from .clips import check_clip_formats

        check_clip_formats(formats)
        require_av()
        if args.uncertainty:
            raise ValueError("--uncertainty writes one file per image and is not available for video inputs; "
                             "predict the clip without it (or its frames as images)")
    stems = output_stems(inputs.files, args.inputs)
    if len(set(names)) < len(names):
        raise ValueError(f"adapters must have distinct names, got {names}")
    assets = asset_settings(args, inputs.files)
    return _Request(formats, options, clip_options, inputs, stems, names, assets)


def _load_model(args: argparse.Namespace, device: str):
    """The base and adapters (a wrong base or adapter is a usage error: ValueError)."""
    from ..sd.model import DMPModel

    model = DMPModel.from_pretrained(args.base, args.device if args.device != "auto" else device,
                                     args.precision, args.config, args.tokenizer, args.cache_dir)
    for path in args.adapter:
        model.load_adapter(path)
    if args.prompt and model.text.tokenizer is None:
        raise ValueError("--prompt needs the CLIP tokenizer, and this base has none: pass --tokenizer "
                         "<folder with vocab.json and merges.txt> (e.g. the tokenizer/ folder of an SD 1.x "
                         "diffusers model)")
    return model


def run_predict(args: argparse.Namespace) -> int:
    """`dmp predict`: returns 0 when every input was written or skipped, 1 when some failed, 2 on bad arguments."""
    # 1. Arguments, inputs and output names: usage errors end here, before any model loads.
    try:
        request = _check_request(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as err:
        logger.error("%s", err)
        return 2
    # 2. This process's share of the files, its --report file, and the model (a wrong base or adapter, or a
    #    report that cannot be written, is a usage error).
    mine, rank, world, device = _shard(request.inputs.files)
    try:
        report = RunReport(report_path(args.report, rank, world))
    except OSError as err:
        logger.error("--report %s cannot be written: %s", args.report, err)
        return 2
    try:
        model = _load_model(args, device)
        check_asset_tasks(request.assets, (model.adapters[n].task for n in request.names))
    except (ValueError, TypeError, FileNotFoundError) as err:  # CheckpointError is a ValueError
        logger.error("%s", err)
        report.close()
        return 2
    try:
        # 3. Images: skip what an earlier run wrote; the rest in same-size batches, one outcome per file.
        if rank == 0:
            for path, reason in request.inputs.ignored:
                report.record(path, "ignored", reason)
        _predict_images(args, request, model, [f for f in mine if not is_video(f)], report, rank, world)
        # 4. Video files: each a clip, streamed in chunks, resumed at its first missing frame.
        videos = [f for f in mine if is_video(f)]
        if videos:
            from .clips import ClipJob, predict_clips

            job = ClipJob(model, {n: model.adapters[n] for n in request.names}, Path(args.output), request.formats,
                          request.clip_options, args.prompt, args.overwrite)
            predict_clips(job, videos, request.stems, report)
        # 5. The summary per process (tests and users read it), the failed files by name.
        report.summarise(rank, world)
    finally:
        report.close()
    return 1 if report.failed else 0


def _predict_images(args: argparse.Namespace, request: _Request, model, files: list[Path], report: RunReport,
                    rank: int, world: int) -> None:
    """Every image file of this process, with a progress bar: ``batch.predict_image_files`` loops over the
    files; one image's outputs (every adapter, every format in `paths`) are written in ``batch.write_outputs``,
    all or none."""
    from tqdm import tqdm

    output = Path(args.output)

    def paths(name: str, stem: Path) -> dict[str, Path]:
        return prediction_paths(model.adapters[name].task, stem, output / name, request.formats, args.uncertainty)

    def predict(images):
        return model.predict_tasks(images, request.names, request.options, prompt=args.prompt)

    asset = AssetOutput(request.assets, output) if request.assets is not None else None
    job = ImageJob(predict, paths, request.names, request.options, args.frames, args.max_pixels, args.overwrite,
                   asset)
    with tqdm(desc=f"dmp predict [{rank + 1}/{world}]" if world > 1 else "dmp predict", unit="img",
              disable=None) as bar:
        def advance(done: int, total: int) -> None:
            bar.total = total
            bar.update(done)

        predict_image_files(job, files, request.stems, report, advance)


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
