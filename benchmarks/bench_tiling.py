"""Tiled prediction and flip ensembles against a single pass: time and peak memory on one large image.

    python benchmarks/bench_tiling.py                          # tiny and SD 1.x shapes, 2048 x 1536, CPU
    python benchmarks/bench_tiling.py --shapes tiny --repeats 3

Random weights (no download): the timings are those of the real architectures. Every measurement
runs in a fresh process (so its peak RSS is its own), and the modes are interleaved round by
round, so a machine that gets busier slows every mode alike. Modes, on the same image and the
same processing resolution:

- single: one pass at the processing resolution (the image resized, the prediction resized back);
- flip: the image and its mirror in one UNet batch, merged (``ensemble="flip"``);
- tiled: the global pass plus tiles of ``--tile-size`` input pixels, each at the processing
  resolution (``tile=True``), merged at full size.

Peak memory: the process's peak RSS during the prediction over its RSS just before it (the model,
the input image and torch's own footprint excluded).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("single", "flip", "tiled")
DEFAULTS = {"tiny": {"resolution": 256, "tile_size": 256}, "sd1": {"resolution": 256, "tile_size": 512}}


def rss_bytes() -> int:
    """The current resident set size of this process."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(shape: str, mode: str, args: argparse.Namespace) -> dict:
    """One prediction in this (fresh) process: seconds, peak RSS growth, tiles."""
    import torch

    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]
    from bench_engine import build_model
    from dmp_model.prediction.predict import PredictOptions, tile_layout_for

    with tempfile.TemporaryDirectory() as workdir:
        model = build_model(shape, Path(workdir))
        ramp = torch.linspace(0, 1, args.width)[None, :] * torch.linspace(0.2, 1, args.height)[:, None]
        image = torch.stack([ramp, ramp.flip(1), ramp.flip(0)])[None]  # [1, 3, H, W]
        options = PredictOptions(steps=args.steps, processing_resolution=args.resolution, batch_size=args.batch_size,
                                 tile=mode == "tiled", tile_size=args.tile_size,
                                 ensemble="flip" if mode == "flip" else "none")
        model.predict(torch.rand(1, 3, 64, 64), "depth-bench-notext", steps=1, processing_resolution=64)  # warm-up
        before = rss_bytes()
        started = time.perf_counter()
        model.predict(image, "depth-bench-notext", options)
        seconds = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        layout = tile_layout_for((args.height, args.width), options)
    return {"seconds": seconds, "peak_growth_mib": max(peak - before, 0) / 2**20,
            "tiles": len(layout.boxes) if layout else 0}


def run_child(shape: str, mode: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", shape, mode, "--width", str(args.width), "--height",
               str(args.height), "--steps", str(args.steps), "--resolution", str(args.resolution),
               "--tile-size", str(args.tile_size), "--batch-size", str(args.batch_size)]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tiny,sd1", help="comma-separated: tiny, sd1")
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--height", type=int, default=1536)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--resolution", type=int, help="processing resolution (default: 256 for both shapes)")
    parser.add_argument("--tile-size", type=int, help="tile side in pixels (default: tiny 256, sd1 512)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1, help="rounds of interleaved measurements")
    parser.add_argument("--child", nargs=2, metavar=("SHAPE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args)))
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; {args.width} x {args.height} image, "
          f"{args.steps} steps, batch {args.batch_size}, {args.repeats} interleaved round(s)")
    print(f"{'shape':6} {'mode':7} {'resolution':>10} {'tile':>5} {'tiles':>6} {'seconds':>16} {'x single':>9} "
          f"{'peak MiB':>9}")
    for shape in args.shapes.split(","):
        shape_args = argparse.Namespace(**{**vars(args), **{k: getattr(args, k) or v
                                                            for k, v in DEFAULTS[shape].items()}})
        runs = {mode: [] for mode in MODES}
        for _ in range(args.repeats):
            for mode in MODES:
                runs[mode].append(run_child(shape, mode, shape_args))
        single = statistics.median(r["seconds"] for r in runs["single"])
        for mode, results in runs.items():
            seconds = [r["seconds"] for r in results]
            spread = f"{min(seconds):.1f}-{max(seconds):.1f}" if len(seconds) > 1 else f"{seconds[0]:.1f}"
            print(f"{shape:6} {mode:7} {shape_args.resolution:10d} {shape_args.tile_size:5d} {results[0]['tiles']:6d} "
                  f"{spread:>16} {statistics.median(seconds) / single:9.2f} "
                  f"{max(r['peak_growth_mib'] for r in results):9.0f}")
    print("\nseconds: min-max over rounds; x single: median / median of the single pass; peak MiB: peak RSS "
          "during the prediction over RSS before it (largest over rounds).")


if __name__ == "__main__":
    main()
