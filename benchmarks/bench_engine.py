"""Engine benchmark: time per stage, peak memory, pipeline overhead, one-call multi-task.

    python benchmarks/bench_engine.py                 # tiny config and full SD 1.x shape, 256 px, CPU
    python benchmarks/bench_engine.py --shapes tiny   # quick

Random weights (no download): the timings are those of the real architectures. "Overhead" is the
share of predict()'s wall time spent outside the UNet and VAE calls of the same run
(preprocessing, scheduling, adapter switching, codecs, copies). It cannot see what happens inside
those calls (an adapter's LoRA layers, for one): ``bench_limit.py`` compares predict() with a bare
loop of the same maths instead.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from dmp_model import DMPModel
from dmp_model.sampling import SD1_SCHEDULER_CONFIG
from dmp_model.sd.loading import SD1_CONFIG_DIR, BaseComponents
from dmp_model.sd.tiny import build_tiny_components
from factories import write_official_adapter


def full_sd1_components(seed: int = 0):
    """SD 1.x UNet and VAE from the bundled configs, randomly initialised, and a tiny-width text encoder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(json.loads((SD1_CONFIG_DIR / "unet" / "config.json").read_text()))
    vae = AutoencoderKL.from_config(json.loads((SD1_CONFIG_DIR / "vae" / "config.json").read_text()))
    return unet.eval(), vae.eval()


def build_model(shape: str, workdir: Path) -> DMPModel:
    """A DMPModel around in-memory components; the empty-prompt embedding is a fixed random tensor."""
    if shape == "tiny":
        unet, vae, _ = build_tiny_components()
    else:
        unet, vae = full_sd1_components()
    scheduler = dict(SD1_SCHEDULER_CONFIG)
    components = BaseComponents(unet.requires_grad_(False), vae.requires_grad_(False), lambda: None, lambda: None,
                                scheduler, workdir, torch.device("cpu"), torch.float32)
    model = DMPModel(components)
    model.text._empty = torch.randn(1, 77, unet.config.cross_attention_dim)  # skip the text encoder: not timed
    for task, seed in (("depth", 1), ("normal", 2)):
        model.load_adapter(write_official_adapter(unet, workdir / shape / f"{task}-bench-notext", seed))
    return model


class StageTimer:
    """Wraps the model's UNet and VAE calls to add up their bare wall time per stage."""

    def __init__(self, model: DMPModel):
        self.times = {"encode": [], "unet": [], "decode": []}
        self._wrap(model.unet, "forward", "unet")
        self._wrap(model.vae, "encode", "encode")
        self._wrap(model.vae, "decode", "decode")

    def _wrap(self, module, method, stage):
        original = getattr(module, method)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = original(*args, **kwargs)
            self.times[stage].append(time.perf_counter() - start)
            return out
        setattr(module, method, timed)

    def reset(self):
        for values in self.times.values():
            values.clear()

    def total(self) -> float:
        return sum(sum(v) for v in self.times.values())


def bench(shape: str, size: int, steps: int, repeats: int, workdir: Path) -> dict:
    model = build_model(shape, workdir)
    timer = StageTimer(model)
    images = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    settings = dict(steps=steps, processing_resolution=size)
    model.predict(images, "depth-bench-notext", **settings)  # warm-up
    walls, overheads = [], []
    for _ in range(repeats):
        timer.reset()
        start = time.perf_counter()
        model.predict(images, "depth-bench-notext", **settings)
        wall = time.perf_counter() - start
        walls.append(wall)
        overheads.append((wall - timer.total()) / wall)
    stages = {k: sum(v) / len(v) for k, v in timer.times.items()}
    # Two tasks: one call (one encode; adapters in turn, or in one batch) against two separate calls.
    names = ["depth-bench-notext", "normal-bench-notext"]
    timings = {"sequential": [], "batched": [], "separate": []}
    for _ in range(repeats):
        for mode in ("sequential", "batched"):
            start = time.perf_counter()
            model.predict_tasks(images, names, task_batching=mode, **settings)
            timings[mode].append(time.perf_counter() - start)
        start = time.perf_counter()
        for name in names:
            model.predict(images, name, **settings)
        timings["separate"].append(time.perf_counter() - start)
    best = {mode: min(values) for mode, values in timings.items()}
    return {"shape": shape, "size": size, "steps": steps, "predict_s": min(walls),
            "encode_s": stages["encode"], "unet_call_s": stages["unet"], "decode_s": stages["decode"],
            "overhead": min(overheads), "two_tasks": best,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tiny,sd1", help="comma-separated: tiny, sd1")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/dmp_bench")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print(f"{'shape':6} {'size':>5} {'predict s':>10} {'encode s':>9} {'unet/call s':>12} {'decode s':>9} "
          f"{'overhead':>9} {'peak RSS MiB':>13}")
    results = [bench(shape, args.size, args.steps, args.repeats, Path(args.workdir))
               for shape in args.shapes.split(",")]
    for r in results:
        print(f"{r['shape']:6} {r['size']:5d} {r['predict_s']:10.3f} {r['encode_s']:9.3f} {r['unet_call_s']:12.3f} "
              f"{r['decode_s']:9.3f} {r['overhead']:9.1%} {r['peak_rss_mib']:13.0f}")
    print("\ntwo tasks (depth + normal), seconds, best of repeats; ratio = / two separate predict() calls")
    print(f"{'shape':6} {'1 call, sequential':>19} {'1 call, batched':>16} {'2 separate':>11} "
          f"{'seq ratio':>10} {'batched ratio':>14}")
    for r in results:
        t = r["two_tasks"]
        print(f"{r['shape']:6} {t['sequential']:19.3f} {t['batched']:16.3f} {t['separate']:11.3f} "
              f"{t['sequential'] / t['separate']:10.2f} {t['batched'] / t['separate']:14.2f}")
    print("\nunet/call s: mean wall time of one UNet call; overhead: predict() time outside the bare UNet/VAE "
          "calls; peak RSS: process maximum so far (getrusage).")


if __name__ == "__main__":
    main()
