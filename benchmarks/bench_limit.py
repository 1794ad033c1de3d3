"""DMPModel.predict against the algorithm's limit and against Marigold, in one run, interleaved.

    python benchmarks/bench_limit.py                        # SD 1.x shape, 256 px, 5 steps, 10 rounds (~10 min)
    python benchmarks/bench_limit.py --shape tiny --size 64 --rounds 30   # quick (~1 min)

Random SD 1.x-shaped weights, one image, CPU (see ``bench_common`` for what is built). Every round
runs each candidate once, in an order that rotates from round to round, so that a slow spell of
this shared machine hits all candidates alike; a ratio is taken within each round and the rounds'
ratios are summarised by their median with a bootstrap 95 % interval, for wall time and for this
process's CPU time (less disturbed by other processes on a shared machine). Candidates:

- ``predict``: ``DMPModel.predict`` (5 leading steps; the adapter merged into the UNet weights);
- ``bare``: the same maths by hand on a UNet with the adapter merged by hand (the limit);
- ``marigold-4`` / ``marigold-1``: diffusers' MarigoldDepthPipeline from the same weights, 4 trailing
  steps (its v1-1 default) and 1, at the same processing resolution;
- ``predict-1``: ``DMPModel.predict`` with 1 trailing step (DMP's single-step setting);
- ``unet-merged`` / ``unet-dmp`` / ``unet-peft``: one UNet call with the adapter merged by hand, merged
  inside peft's layers (the engine's UNet as ``predict`` runs it), and unmerged in peft's layers.

It also times switching the merged adapter (unmerge one, merge another) and reports the memory the
exact unmerge keeps (one copy of the adapted layers' weights).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from bench_common import ADAPTER, OTHER, bare_dmp, build, run_dmp, run_marigold


def bootstrap_median(values: list[float], resamples: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the median."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def timed(fn) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds (all threads) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def candidates(models, images: torch.Tensor) -> dict:
    x = models.model.encode(images)
    context = models.context.expand(x.shape[0], -1, -1)

    @torch.no_grad()
    def unet_call(unet):
        return unet(x, torch.tensor(401), encoder_hidden_states=context).sample

    return {"predict": lambda: run_dmp(models, images, 5, "leading"),
            "bare": lambda: bare_dmp(models, images, 5, "leading"),
            "marigold-4": lambda: run_marigold(models, images, 4),
            "marigold-1": lambda: run_marigold(models, images, 1),
            "predict-1": lambda: run_dmp(models, images, 1, "trailing"),
            "unet-merged": lambda: unet_call(models.merged_unet),
            "unet-dmp": lambda: unet_call(models.model.unet),
            "unet-peft": lambda: unet_call(models.peft_unet)}


def switch_cost(models, switches: int) -> dict:
    """Seconds per adapter switch (unmerge + merge) and the memory the exact unmerge keeps."""
    model = models.model
    context = model.empty_embedding()
    model.denoiser([ADAPTER], context, None)
    extra = model._merged.extra_bytes
    start = time.perf_counter()
    for i in range(switches):
        model.denoiser([(OTHER, ADAPTER)[i % 2]], context, None)
    per_switch = (time.perf_counter() - start) / switches
    adapted = extra // models.context.element_size()
    return {"switch_s": per_switch, "extra_bytes": extra, "adapted_parameters": adapted}


def summary(times: dict[str, list[float]], numerator: str, denominator: str) -> dict:
    """The per-round ratios numerator / denominator: median, its bootstrap 95 % interval, range."""
    ratios = [a / b for a, b in zip(times[numerator], times[denominator])]
    low, high = bootstrap_median(ratios)
    return {"median": statistics.median(ratios), "ci95": [low, high], "min": min(ratios), "max": max(ratios),
            "of_best_times": min(times[numerator]) / min(times[denominator]), "rounds": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="sd1", choices=("sd1", "tiny"))
    parser.add_argument("--size", type=int, default=256, help="image side = processing resolution (px)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--switches", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared machine, OpenMP threads spin-wait for each other)")
    parser.add_argument("--workdir", default="/tmp/dmp_bench_limit")
    parser.add_argument("--only", help="comma-separated candidates to run (default: all), e.g. predict,bare")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; shape {args.shape}, "
          f"{args.size} px, {args.rounds} rounds")
    models = build(args.shape, "cpu", torch.float32, Path(args.workdir))
    images = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    difference = (run_dmp(models, images) - bare_dmp(models, images)).abs().max().item()
    print(f"same maths: predict and the bare loop differ by at most {difference:.2e} m")
    runs = candidates(models, images)
    if args.only:
        unknown = set(args.only.split(",")) - set(runs)
        if unknown:
            raise SystemExit(f"--only: unknown candidates {sorted(unknown)}; valid: {list(runs)}")
        runs = {name: fn for name, fn in runs.items() if name in args.only.split(",")}
    for fn in runs.values():  # warm-up
        fn()
    names = list(runs)
    times = {clock: {name: [] for name in names} for clock in ("wall", "cpu")}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order if r % 2 == 0 else order[::-1]:
            wall, cpu = timed(runs[name])
            times["wall"][name].append(wall)
            times["cpu"][name].append(cpu)
        print(f"round {r + 1} (wall s): " + ", ".join(f"{n} {times['wall'][n][-1]:.3f}" for n in names), flush=True)
    pairs = [("predict", "bare"), ("marigold-4", "predict"), ("marigold-1", "predict"), ("marigold-1", "predict-1"),
             ("unet-dmp", "unet-merged"), ("unet-peft", "unet-merged")]
    pairs = [(a, b) for a, b in pairs if a in runs and b in runs]
    results = {"shape": args.shape, "size": args.size, "rounds": args.rounds, "threads": torch.get_num_threads(),
               "median_s": {clock: {n: statistics.median(v) for n, v in t.items()} for clock, t in times.items()},
               "ratios": {clock: {f"{a} / {b}": summary(t, a, b) for a, b in pairs} for clock, t in times.items()},
               "switch": switch_cost(models, args.switches)}
    for clock in ("wall", "cpu"):
        print(f"\n{clock} time, median seconds: "
              + ", ".join(f"{n} {s:.3f}" for n, s in results["median_s"][clock].items()))
        print(f"{'ratio (per round)':26} {'median':>7} {'95% CI of median':>17} {'min':>6} {'max':>6} {'of best':>8}")
        for label, r in results["ratios"][clock].items():
            print(f"{label:26} {r['median']:7.3f} {r['ci95'][0]:8.3f}-{r['ci95'][1]:.3f} {r['min']:6.3f} "
                  f"{r['max']:6.3f} {r['of_best_times']:8.3f}")
    s = results["switch"]
    print(f"\nadapter switch (unmerge + merge): {s['switch_s'] * 1000:.1f} ms; exact unmerge keeps "
          f"{s['adapted_parameters'] / 1e6:.1f}M parameters = {s['extra_bytes'] / 2**20:.0f} MiB here "
          f"({s['adapted_parameters'] * 2 / 2**20:.0f} MiB in fp16)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
