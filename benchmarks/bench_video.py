"""Video benchmark: peak memory against clip length, temporal alignment and flicker on moving cameras.

    python benchmarks/bench_video.py                       # everything (a few minutes on 2 CPU cores)
    python benchmarks/bench_video.py --parts memory --old-engine /tmp/old   # also an older dmp_model

1. Memory: ``predict_images`` with the tiny SD model (random weights) on 16 and on 256 frames of
   64 px, each run in a fresh process: the peak resident memory during the call (VmHWM, reset after a
   warm-up) above the resident memory before it, less the results (raw values and visuals). Runs
   interleave (16, 256, 16, 256, ...). ``--old-engine DIR`` runs the same in a copy of an older
   dmp_model (e.g. ``git archive <commit> dmp_model | tar -x -C DIR``) for comparison.
2. Alignment: the miniature world's rooms (training/demo/world.py) with the camera turning by 0 to 2
   degrees per frame (about 0 to 2 px at 64 px); a stand-in predictor scales each frame's true depth
   by its own random factor (log-normal, 10 %) with 2 % pixel noise. Reported per setting: the
   mean |change of log-scale| between consecutive frames (flicker), and |log-scale of the last frame
   - log-scale of the first| (slow drift), the scale measured against the true depth.
3. Flicker of ControlNet depth maps (percentile rule) on the same clips: mean absolute change between
   consecutive maps, per image and over the batch, for the true depth and for the stand-in.
4. CLI: ``dmp predict`` on a 16- and a 256-frame 64 px video (tiny model), each in a fresh process: its
   peak resident memory over the whole run (loading included). Results go to disk, so the two peaks
   should match.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
# One thread in every child: OpenMP threads on a busy 2-core machine spin-wait for each other (a run
# of the CLI part took 17 minutes with them, 2 without).
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

MEMORY_CHILD = r"""
import sys, time, tempfile
from pathlib import Path
sys.path[:0] = [sys.argv[1], {tests!r}]
import torch
torch.set_num_threads(1)
from factories import write_official_adapter
from dmp_model import DMPModel
from dmp_model.prediction.predict import PredictOptions
from dmp_model.sd.tiny import save_tiny_sd

def kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

frames, steps, workdir = int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
base = workdir / "base"
if not (base / "model_index.json").exists():
    save_tiny_sd(base)
model = DMPModel.from_pretrained(base, device="cpu", precision="fp32", cache_dir=workdir / "cache")
model.load_adapter(write_official_adapter(model.unet, workdir / "depth-bench-notext", seed=1))
options = PredictOptions(steps=steps, processing_resolution=64, batch_size=4)
model.predict(torch.rand(8, 3, 64, 64), "depth-bench-notext", options)  # warm up
images = torch.rand(frames, 3, 64, 64)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before, start = kib("VmRSS"), time.perf_counter()
result = model.predict(images, "depth-bench-notext", options)
seconds, peak = time.perf_counter() - start, kib("VmHWM")
print(peak - before, result.raw.nbytes + result.visual.nbytes, seconds)
"""


def bench_memory(engines: dict[str, Path], repeats: int, steps: int) -> None:
    script = MEMORY_CHILD.format(tests=str(ROOT / "tests"))
    rows: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory() as workdir:
        for _ in range(repeats):
            for label, engine in engines.items():
                for frames in (16, 256):
                    out = subprocess.run([sys.executable, "-c", script, str(engine), str(frames), str(steps), workdir],
                                         capture_output=True, text=True, check=True, env=CHILD_ENV).stdout.split()
                    growth, outputs, seconds = int(out[-3]) / 2**20, int(out[-2]) / 2**20, float(out[-1])
                    rows.setdefault((label, frames), []).append((growth, outputs, seconds / frames))
    print(f"1. memory: tiny model, 64 px, {steps} steps, batch 4; MiB, median (min..max) of {repeats} fresh processes")
    print(f"{'engine':10} {'frames':>6} {'peak growth':>20} {'results':>8} {'growth - results':>22} {'s/frame':>8}")
    for (label, frames), values in rows.items():
        growth, outputs, per_frame = zip(*values)
        excess = [g - o for g, o in zip(growth, outputs)]
        print(f"{label:10} {frames:6d} {_spread(growth):>20} {statistics.median(outputs):8.1f} "
              f"{_spread(excess):>22} {statistics.median(per_frame):8.3f}")


CLI_CHILD = r"""
import sys
sys.path[:0] = [{root!r}]
from dmp_model.cli.main import main
code = main(sys.argv[1:])
for line in open("/proc/self/status"):
    if line.startswith("VmHWM"):
        print(code, int(line.split()[1]) * 1024)
"""


def bench_cli(repeats: int, steps: int) -> None:
    from dmp_model.io.video import write_video
    from dmp_model.sd.tiny import build_tiny_components, save_tiny_sd
    from factories import write_official_adapter

    peaks: dict[int, list[float]] = {}
    with tempfile.TemporaryDirectory() as workdir:
        work = Path(workdir)
        unet, vae, text = build_tiny_components()
        base = save_tiny_sd(work / "base", components=(unet, vae, text))
        adapter = write_official_adapter(unet, work / "depth-bench-notext", seed=1)
        for frames in (16, 256):
            with write_video(work / f"clip{frames}.mp4", 24) as write:
                for start in range(0, frames, 32):
                    write(torch.rand(min(32, frames - start), 64, 64, 3))
        for repeat in range(repeats):
            for frames in (16, 256):
                argv = ["predict", str(work / f"clip{frames}.mp4"), "--base", str(base), "--adapter", str(adapter),
                        "-o", str(work / f"out{repeat}"), "--device", "cpu", "--precision", "fp32", "--steps",
                        str(steps), "--processing-resolution", "64", "--cache-dir", str(work / "cache")]
                out = subprocess.run([sys.executable, "-c", CLI_CHILD.format(root=str(ROOT)), *argv],
                                     capture_output=True, text=True, check=True, env=CHILD_ENV).stdout.split()
                assert out[-2] == "0", out
                peaks.setdefault(frames, []).append(int(out[-1]) / 2**20)
    print(f"\n4. dmp predict on a 64 px video, tiny model, {steps} steps: peak RSS of the whole process, MiB, "
          f"median (min..max) of {repeats}")
    for frames, values in peaks.items():
        print(f"{frames:4d} frames: {_spread(values)}")


def _spread(values) -> str:
    return f"{statistics.median(values):6.1f} ({min(values):.1f}..{max(values):.1f})"


def world_clip(seed: int, frames: int, degrees_per_frame: float, size: int = 64) -> torch.Tensor:
    """True depth [frames, size, size] of a miniature-world room, the camera turning right."""
    from training.demo.world import random_scene, render

    scene = random_scene(seed, 3)
    views = []
    for i in range(frames):
        camera = dataclasses.replace(scene.camera, yaw=scene.camera.yaw + math.radians(degrees_per_frame) * i)
        views.append(torch.from_numpy(render(dataclasses.replace(scene, camera=camera), size, size).depth))
    return torch.stack(views)


def stand_in(truth: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scales = torch.exp(0.1 * torch.randn(truth.shape[0], generator=generator))
    return truth * scales.view(-1, 1, 1) * (1 + 0.02 * torch.randn(truth.shape, generator=generator))


def scale_measures(depth: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """(mean |log-scale change| between consecutive frames, |last - first log-scale|) against the truth."""
    from dmp_model.prediction.alignment import fit_scale

    log_scale = fit_scale(depth, truth).log()
    return float(log_scale.diff().abs().mean()), float((log_scale[-1] - log_scale[0]).abs())


def bench_alignment(scenes: int, frames: int) -> None:
    from dmp_model.prediction import temporal
    from dmp_model.tasks.controlnet import depth_to_control

    settings = {"off": None, "strength 0.5": dict(strength=0.5), "strength 1": dict(strength=1.0),
                "1, all pixels": dict(strength=1.0, flat=1.0), "1, scale_shift": dict(strength=1.0, fit="scale_shift")}
    speeds = (0.0, 0.5, 1.0, 2.0)
    align, flicker = {}, {}
    for seed in range(scenes):
        for speed in speeds:
            truth = world_clip(seed, frames, speed)
            prediction = stand_in(truth, seed)
            for name, setting in settings.items():
                if setting is None:
                    aligned = prediction
                else:
                    setting = dict(setting)
                    temporal.FLAT_FRACTION = setting.pop("flat", 0.25)
                    aligned = temporal.TemporalAligner(**setting)(prediction)
                    temporal.FLAT_FRACTION = 0.25
                align.setdefault((name, speed), []).append(scale_measures(aligned, truth))
            for name, depth, mode in (("truth, per image", truth, "image"), ("truth, batch", truth, "batch"),
                                      ("stand-in, per image", prediction, "image"),
                                      ("stand-in, batch", prediction, "batch"),
                                      ("stand-in aligned, batch", temporal.TemporalAligner()(prediction), "batch")):
                maps = depth_to_control(depth, range_mode=mode)[..., 0]
                flicker.setdefault((name, speed), []).append(float((maps[1:] - maps[:-1]).abs().mean()))
    print(f"\n2. alignment: {scenes} world rooms x {frames} frames at 64 px, stand-in with 10 % scale jitter; "
          "mean over rooms")
    print(f"{'setting':16}" + "".join(f"{f'{s:g} deg/frame: flicker, drift':>32}" for s in speeds))
    for name in settings:
        cells = [tuple(statistics.mean(v) for v in zip(*align[name, s])) for s in speeds]
        print(f"{name:16}" + "".join(f"{c[0]:>22.4f}{c[1]:>10.3f}" for c in cells))
    print(f"\n3. ControlNet depth maps: mean |change| between consecutive frames (0..1 scale), {scenes} rooms")
    print(f"{'depth, range':24}" + "".join(f"{f'{s:g} deg/frame':>14}" for s in speeds))
    for name in dict.fromkeys(k[0] for k in flicker):
        print(f"{name:24}" + "".join(f"{statistics.mean(flicker[name, s]):14.4f}" for s in speeds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="memory,alignment,cli", help="comma-separated: memory, alignment, cli")
    parser.add_argument("--repeats", type=int, default=2, help="memory runs per engine and frame count")
    parser.add_argument("--steps", type=int, default=2, help="sampler steps in the memory runs")
    parser.add_argument("--old-engine", help="folder holding an older dmp_model package, to compare memory")
    parser.add_argument("--scenes", type=int, default=4)
    parser.add_argument("--frames", type=int, default=48)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, CPU")
    if "memory" in args.parts:
        engines = {"this": ROOT, **({"old": Path(args.old_engine)} if args.old_engine else {})}
        bench_memory(engines, args.repeats, args.steps)
    if "alignment" in args.parts:
        bench_alignment(args.scenes, args.frames)
    if "cli" in args.parts:
        bench_cli(args.repeats, args.steps)


if __name__ == "__main__":
    main()
