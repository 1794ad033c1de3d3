"""GPU benchmark: DMP and Marigold at 512 and 768 px in fp16, against bare loops of the same maths.

    python benchmarks/bench_gpu.py                          # CUDA, SD 1.x shape, fp16; about 2-4 min
    python benchmarks/bench_gpu.py --smoke                  # CPU, tiny shape: the script end to end, seconds

Random SD 1.x-shaped weights (no download), built once and shared (see ``bench_common``). For each
processing resolution and each method it reports the latency at batch 1, images/s at batch 1, 4
and 8, the peak GPU memory of the batch-8 run, and the ratio of the method's time to a bare loop
doing the same maths (the same UNet/VAE calls written by hand, merged LoRA for DMP), measured
interleaved at every batch size:

- ``dmp-5``: ``DMPModel.predict``, 5 leading steps (DMP's default);
- ``dmp-1``: ``DMPModel.predict``, 1 trailing step;
- ``marigold-4`` / ``marigold-1``: diffusers' MarigoldDepthPipeline on the same weights (8-channel
  UNet), 4 trailing steps (v1-1's default) and 1.

Then one UNet call at batch 1: the adapter merged by hand, merged inside peft's layers (what
``predict`` runs) and unmerged in peft's layers; the CPU time of DMP's depth preview (``visual``,
computed by ``predict`` and not by the bare loop); and the time of one adapter switch. Prints a table
and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench_common import ADAPTER, OTHER, bare_dmp, bare_marigold, build, run_dmp, run_marigold

METHODS = {  # name: (run the method, run its bare loop)
    "dmp-5": (lambda m, x: run_dmp(m, x, 5, "leading"), lambda m, x: bare_dmp(m, x, 5, "leading")),
    "dmp-1": (lambda m, x: run_dmp(m, x, 1, "trailing"), lambda m, x: bare_dmp(m, x, 1, "trailing")),
    "marigold-4": (lambda m, x: run_marigold(m, x, 4), lambda m, x: bare_marigold(m, x, 4)),
    "marigold-1": (lambda m, x: run_marigold(m, x, 1), lambda m, x: bare_marigold(m, x, 1)),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def peak_memory(fn, device: torch.device) -> int | None:
    """Peak bytes allocated on the GPU while `fn` runs (None on the CPU)."""
    if device.type != "cuda":
        fn()
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device)


def agreement(models, size: int) -> dict[str, float]:
    """Largest difference between each method and its bare loop on one image (same maths: small)."""
    images = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    return {method: (run(models, images) - bare(models, images)).abs().max().item()
            for method, (run, bare) in METHODS.items()}


def measure(models, method: str, size: int, batch: int, repeats: int, device: torch.device) -> dict:
    """Interleaved method / bare-loop times at one size and batch; the peak memory of the method."""
    run, bare = METHODS[method]
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
    peak = peak_memory(lambda: run(models, images), device)  # doubles as the warm-up
    bare(models, images)
    method_s, bare_s = [], []
    for r in range(repeats):
        pair = [(method_s, run), (bare_s, bare)]
        for times, fn in pair if r % 2 == 0 else pair[::-1]:
            times.append(timed(lambda fn=fn: fn(models, images), device))
    return {"method_s": statistics.median(method_s), "bare_s": statistics.median(bare_s),
            "ratio": statistics.median(a / b for a, b in zip(method_s, bare_s)),
            "images_per_s": batch / statistics.median(method_s), "peak_bytes": peak}


def unet_calls(models, size: int, repeats: int, device: torch.device) -> dict:
    """Seconds of one UNet call at batch 1: merged by hand, merged in peft's layers, unmerged."""
    latent = size // 8
    x = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(0)).to(device, models.context.dtype)
    t = torch.tensor(401, device=device)
    models.model.denoiser([ADAPTER], models.context, None)  # merge, as predict does
    unets = {"merged by hand": models.merged_unet, "DMPModel (merged in peft)": models.model.unet,
             "peft unmerged": models.peft_unet}
    times: dict[str, list[float]] = {name: [] for name in unets}
    with torch.no_grad():
        for r in range(repeats + 1):
            for name, unet in unets.items():
                elapsed = timed(lambda unet=unet: unet(x, t, encoder_hidden_states=models.context), device)
                if r:  # the first round warms up
                    times[name].append(elapsed)
    return {name: statistics.median(v) for name, v in times.items()}


def preview_seconds(size: int, batches: list[int]) -> dict[str, float]:
    """CPU seconds of the depth preview ``predict`` computes from its result (the bare loop has none)."""
    from dmp_model.tasks.codecs import get_codec

    codec = get_codec("depth")
    return {str(b): timed(lambda b=b: codec.visualize(torch.rand(b, size, size) * 8), torch.device("cpu"))
            for b in batches}


def switch_seconds(models, switches: int, device: torch.device) -> float:
    context = models.context
    models.model.denoiser([ADAPTER], context, None)
    sync(device)
    start = time.perf_counter()
    for i in range(switches):
        models.model.denoiser([(OTHER, ADAPTER)[i % 2]], context, None)
    sync(device)
    return (time.perf_counter() - start) / switches


def print_table(results: dict) -> None:
    print(f"\n{results['device']}, {results['dtype']}, shape {results['shape']}; ratio = time / bare loop of the "
          "same maths (median of interleaved pairs)")
    batches = results["batches"]
    header = (f"{'px':>4} {'method':11} {'latency ms':>10} "
              + " ".join(f"{f'img/s b{b}':>9}" for b in batches)
              + " " + " ".join(f"{f'ratio b{b}':>8}" for b in batches) + f" {'peak GiB':>9}")
    print(header)
    for row in results["rows"]:
        cells = row["batches"]
        peak = cells[str(batches[-1])]["peak_bytes"]
        print(f"{row['size']:>4} {row['method']:11} {cells[str(batches[0])]['method_s'] * 1000:10.1f} "
              + " ".join(f"{cells[str(b)]['images_per_s']:9.2f}" for b in batches) + " "
              + " ".join(f"{cells[str(b)]['ratio']:8.3f}" for b in batches)
              + f" {'-' if peak is None else f'{peak / 2**30:.2f}':>9}")
    for size, calls in results["unet_call_s"].items():
        base = calls["merged by hand"]
        print(f"{size:>4} px, one UNet call at batch 1: "
              + ", ".join(f"{name} {s * 1000:.2f} ms ({s / base:.3f}x)" for name, s in calls.items()))
    for size, times in results["preview_s"].items():
        print(f"{size:>4} px, DMP's depth preview on the CPU (part of predict, not of the bare loop): "
              + ", ".join(f"b{b} {s * 1000:.0f} ms" for b, s in times.items()))
    print(f"adapter switch (unmerge + merge): {results['switch_s'] * 1000:.1f} ms; total {results['total_s']:.0f} s")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shape, 64 px, batches 1 and 2, 1 repeat")
    parser.add_argument("--sizes", default=None, help="comma-separated processing resolutions (default 512,768)")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,4,8)")
    parser.add_argument("--repeats", type=int, default=None, help="timed pairs per cell (default 3)")
    parser.add_argument("--json", default="dmp_bench_gpu.json", help="where to write the results")
    parser.add_argument("--workdir", default="/tmp/dmp_bench_gpu")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke for the CPU check of this script")
    device, dtype, shape, sizes, batches, repeats = (
        (torch.device("cpu"), torch.float32, "tiny", "64", "1,2", 1) if args.smoke
        else (torch.device("cuda"), torch.float16, "sd1", "512,768", "1,4,8", 3))
    sizes = [int(s) for s in (args.sizes or sizes).split(",")]
    batches = [int(b) for b in (args.batches or batches).split(",")]
    repeats = args.repeats or repeats
    started = time.perf_counter()
    models = build(shape, str(device), dtype, Path(args.workdir))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    results = {"device": name, "dtype": str(dtype).removeprefix("torch."), "shape": shape, "torch": torch.__version__,
               "sizes": sizes, "batches": batches, "repeats": repeats, "rows": [], "unet_call_s": {}, "preview_s": {},
               "max_difference_to_bare": agreement(models, sizes[0])}
    print("same maths, largest difference to the bare loop: "
          + ", ".join(f"{m} {d:.2e}" for m, d in results["max_difference_to_bare"].items()), flush=True)
    for size in sizes:
        for method in METHODS:
            cells = {str(b): measure(models, method, size, b, repeats, device) for b in batches}
            results["rows"].append({"size": size, "method": method, "batches": cells})
            print(f"{size} px {method}: " + ", ".join(f"b{b} {c['method_s']:.3f} s (x{c['ratio']:.3f})"
                                                     for b, c in cells.items()), flush=True)
        results["unet_call_s"][str(size)] = unet_calls(models, size, repeats, device)
        results["preview_s"][str(size)] = preview_seconds(size, batches)
    results["switch_s"] = switch_seconds(models, 10, device)
    results["total_s"] = time.perf_counter() - started
    print_table(results)
    Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"written {args.json}")
    return results


if __name__ == "__main__":
    main()
