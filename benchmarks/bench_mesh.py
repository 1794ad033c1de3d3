"""A 3D asset from a large depth map against the prediction of that depth: seconds and peak memory.

    python benchmarks/bench_mesh.py                       # 2048 x 1536, default vertex budget, SD 1.x shapes
    python benchmarks/bench_mesh.py --shape tiny --repeats 3

What a user runs for one photo (``dmp predict --export-3d`` or the DMP → 3D node), in parts:

- predict: ``DMPModel.predict`` of the depth at the default options (5 steps, processing resolution
  512), random weights of the chosen shape (no download: the timings are the architecture's);
- mesh glb: ``export_assets`` of a textured mesh with DMP normals at the default vertex budget
  (building the geometry, trimesh's glTF with the full-size texture as PNG, the atomic write);
- points ply: the same for a point cloud with normals and colours.

The depth map is a room corner (two walls and a floor, exact planes) with a box in front, so the
discontinuity cut has edges to cut; the normals are the planes' own; the texture a colour ramp.
Every measurement runs in a fresh process (its peak RSS is its own) and the modes are interleaved
round by round, so a machine that gets busier slows every mode alike. Peak memory: the process's
peak RSS during the step over its RSS just before it (inputs and libraries already loaded).
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
MODES = ("predict", "mesh glb", "points ply")


def rss_bytes() -> int:
    """The current resident set size of this process."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def room_corner(height: int, width: int, hfov_degrees: float):
    """(depth [H, W] metres, Omnidata normals [H, W, 3], texture [H, W, 3]) of two walls, a floor and a box."""
    import torch

    from dmp_model.geometry.camera import pixel_rays

    rays = pixel_rays(height, width, hfov_degrees).double()  # OpenCV frame, z = 1
    # Planes n . p = d in the OpenCV frame (y down): left wall, right wall, floor, the box's front.
    planes = [((0.8, 0.0, 0.6), 2.4), ((-0.8, 0.0, 0.6), 2.4), ((0.0, 1.0, 0.0), 1.5)]
    depth = torch.full((height, width), float("inf"), dtype=torch.float64)
    normal = torch.zeros(height, width, 3, dtype=torch.float64)
    for n, d in planes:
        n = torch.tensor(n, dtype=torch.float64) / torch.tensor(n, dtype=torch.float64).norm()
        along = rays @ n
        z = torch.where(along > 1e-9, d / along, torch.full_like(along, float("inf")))
        nearer = z < depth
        depth, normal = torch.where(nearer, z, depth), torch.where(nearer[..., None], -n, normal)
    box = (rays[..., 0].abs() < 0.15) & (rays[..., 1] > -0.05) & (rays[..., 1] < 0.25)
    depth = torch.where(box, torch.full_like(depth, 1.8), depth)
    normal = torch.where(box[..., None], torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64), normal)
    ramp = torch.linspace(0, 1, width)[None, :] * torch.linspace(0.2, 1, height)[:, None]
    texture = torch.stack([ramp, ramp.flip(1), ramp.flip(0)], -1)
    return depth.float(), normal.float(), texture


def child(shape: str, mode: str, args: argparse.Namespace) -> dict:
    """One measurement in this (fresh) process: seconds, peak RSS growth, file size."""
    import torch

    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]
    from dmp_model.adapters import AdapterInfo
    from dmp_model.geometry.export import AssetSettings, export_assets
    from dmp_model.prediction.predict import Prediction

    depth, normal, texture = room_corner(args.height, args.width, args.hfov)
    image = texture.permute(2, 0, 1)[None]  # [1, 3, H, W]
    with tempfile.TemporaryDirectory() as workdir:
        if mode == "predict":
            from bench_engine import build_model

            model = build_model(shape, Path(workdir))
            model.predict(torch.rand(1, 3, 64, 64), "depth-bench-notext", steps=1, processing_resolution=64)  # warm-up
            before, started = rss_bytes(), time.perf_counter()
            model.predict(image, "depth-bench-notext")
            seconds, size = time.perf_counter() - started, 0
        else:
            def prediction(task, raw):
                return Prediction(f"{task}-bench", AdapterInfo(task=task), raw[None], torch.zeros(1, 1, 1, 3))

            predictions = {"depth": prediction("depth", depth), "normal": prediction("normal", normal)}
            settings = AssetSettings(hfov_degrees=args.hfov, mode="mesh" if mode == "mesh glb" else "point cloud",
                                     file_format=mode[-3:], vertex_budget=args.vertex_budget)
            path = Path(workdir) / f"asset.{settings.file_format}"
            export_assets([path.with_name("warm-up" + path.suffix)], image[..., :16, :16],
                          {k: prediction(k, v[:16, :16]) for k, v in (("depth", depth), ("normal", normal))},
                          settings)  # imports trimesh, PIL's PNG encoder
            before, started = rss_bytes(), time.perf_counter()
            export_assets([path], image, predictions, settings)
            seconds, size = time.perf_counter() - started, path.stat().st_size
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "peak_growth_mib": max(peak - before, 0) / 2**20, "file_mib": size / 2**20}


def run_child(shape: str, mode: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", shape, mode, "--width", str(args.width), "--height",
               str(args.height), "--hfov", str(args.hfov), "--vertex-budget", str(args.vertex_budget)]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    sys.path[:0] = [str(ROOT)]
    from dmp_model.geometry.export import AssetSettings

    defaults = AssetSettings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="sd1", choices=("tiny", "sd1"), help="the predicting model's shapes")
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--height", type=int, default=1536)
    parser.add_argument("--hfov", type=float, default=defaults.hfov_degrees)
    parser.add_argument("--vertex-budget", type=int, default=defaults.vertex_budget)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of interleaved measurements")
    parser.add_argument("--child", nargs=2, metavar=("SHAPE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args)))
        return
    import torch

    modes = args.modes.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; {args.width} x {args.height} depth, "
          f"vertex budget {args.vertex_budget:,}, hfov {args.hfov:g}; predict: {args.shape} shapes, default options; "
          f"{args.repeats} interleaved round(s)")
    runs = {mode: [] for mode in modes}
    for _ in range(args.repeats):
        for mode in modes:
            runs[mode].append(run_child(args.shape, mode, args))
    reference = statistics.median(r["seconds"] for r in runs["predict"]) if "predict" in runs else None
    print(f"{'mode':11} {'seconds':>14} {'x predict':>10} {'peak MiB':>9} {'file MiB':>9}")
    for mode, results in runs.items():
        seconds = [r["seconds"] for r in results]
        spread = f"{min(seconds):.2f}-{max(seconds):.2f}" if len(seconds) > 1 else f"{seconds[0]:.2f}"
        ratio = f"{statistics.median(seconds) / reference:10.3f}" if reference else f"{'-':>10}"
        print(f"{mode:11} {spread:>14} {ratio} {max(r['peak_growth_mib'] for r in results):9.0f} "
              f"{results[0]['file_mib']:9.1f}")
    print("\nseconds: min-max over rounds; x predict: median / median of the prediction; peak MiB: peak RSS "
          "during the step over RSS before it (largest over rounds).")


if __name__ == "__main__":
    main()
