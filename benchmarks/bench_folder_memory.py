"""Peak memory of `dmp predict` over a folder of distinct-size images against one of same-size images.

    python benchmarks/bench_folder_memory.py               # 48 + 48 JPEGs of ~2000x1072, batch 4, 1 (~12 min, 2 cores)
    python benchmarks/bench_folder_memory.py --smoke         # 3 + 3 small images, batch 2 (seconds: checks it runs)
    python benchmarks/bench_folder_memory.py --compare-with /tmp/old   # also the CLI of another checkout

A folder run must not hold more images in memory because its images come in many sizes: the
CLI plans batches from the files' headers and decodes a batch's files only when it runs. This
runs the real command line (``python -m dmp_model predict``, the tiny SD model built in code, one
sampler step, npy + 16-bit png + visual outputs) in a child process per run and takes the child's
peak resident memory (``ru_maxrss`` from ``os.wait4``), alternating the two folders round by round.
"distinct": every image has its own size (the width steps by 8 pixels around the nominal size);
"same": every image has the nominal size. The ratio distinct / same is the figure to watch, at
batch 1 like for like (at batch 4 the same-size folder holds four images a batch, the distinct one
one, so distinct is lower there).

It also measures what reading one large image costs (``load_image``, a JPEG of --load-size) in
bytes per pixel beyond the interpreter before the read: the result alone is 12 bytes a pixel
(float32 RGB).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "tests", ROOT / "tests" / "support"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

SUMMARY = "written, "


def parse_size(text: str) -> tuple[int, int]:
    """'1072x2000' -> (1072, 2000): height x width."""
    height, width = (int(v) for v in text.lower().split("x"))
    return height, width


def write_photo(path: Path, height: int, width: int, seed: int) -> None:
    """A photo-like JPEG: smooth gradients and some noise (compresses like a photo, not like noise)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.random(3) * 6.28
    rgb = np.stack([127 + 100 * np.sin(x / (97 + 13 * c) + y / (71 + 7 * c) + phase[c]) for c in range(3)], -1)
    rgb += rng.normal(0, 6, rgb.shape).astype(np.float32)
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(path, quality=90)


def make_folders(workdir: Path, count: int, size: tuple[int, int]) -> dict[str, Path]:
    """The two folders of `count` images: distinct sizes (width nominal + 8 k, k centred on 0) and same size."""
    folders = {"distinct": workdir / "distinct", "same": workdir / "same"}
    height, width = size
    for kind, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            path = folder / f"img{i:03d}.jpg"
            if not path.exists():
                w = width + 8 * (i - count // 2) if kind == "distinct" else width
                write_photo(path, height, w, seed=i)
    return folders


def make_model(workdir: Path) -> tuple[Path, Path]:
    """The tiny SD base and a depth adapter, built once in `workdir`."""
    base, adapter = workdir / "tiny-base", workdir / "depth-bench-notext"
    if not (base / "model_index.json").exists():
        from dmp_model.sd.tiny import save_tiny_sd

        save_tiny_sd(base, seed=0)
    if not adapter.exists():
        from diffusers import UNet2DConditionModel

        from factories import write_official_adapter

        write_official_adapter(UNet2DConditionModel.from_pretrained(base, subfolder="unet"), adapter, seed=1)
    return base, adapter


def run_child(command: list[str], code: Path, cwd: Path) -> tuple[int, int, str]:
    """Run `command` with `code` first on the path: (exit status, peak RSS in bytes, its output)."""
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(cwd / "child.log", "w+") as log:
        child = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        return child.returncode, usage.ru_maxrss * 1024, log.read()  # ru_maxrss: KiB on Linux


def folder_run(folder: Path, out: Path, base: Path, adapter: Path, batch: int, code: Path) -> dict:
    """One `dmp predict` of a folder: peak RSS and the summary line."""
    command = [sys.executable, "-m", "dmp_model", "predict", str(folder), "--base", str(base), "--adapter",
               str(adapter), "-o", str(out), "--device", "cpu", "--precision", "fp32", "--steps", "1",
               "--batch-size", str(batch), "--overwrite", "--cache-dir", str(out.parent / "cache")]
    status, peak, text = run_child(command, code, out.parent)
    summary = next((line for line in text.splitlines() if SUMMARY in line), "")
    if status != 0:
        raise RuntimeError(f"dmp predict {folder} exited {status}:\n{text[-3000:]}")
    return {"peak_bytes": peak, "summary": summary.split("INFO ")[-1]}


LOAD_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from dmp_model.images import load_image
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    load_image(sys.argv[2])  # a small image first: Pillow's plugins and torch's kernels load outside the figure
    before = rss()
    image = load_image(sys.argv[1])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"before": before, "peak": peak, "shape": list(image.shape)}))
""")


def load_cost(path: Path, warm_up: Path, code: Path, cwd: Path) -> dict:
    """Bytes per pixel that reading `path` with load_image adds to the process's peak (after reading `warm_up`)."""
    status, _, text = run_child([sys.executable, "-c", LOAD_SCRIPT, str(path), str(warm_up)], code, cwd)
    if status != 0:
        raise RuntimeError(f"load_image {path} exited {status}:\n{text[-3000:]}")
    result = json.loads(text.strip().splitlines()[-1])
    pixels = result["shape"][1] * result["shape"][2]
    return {"pixels": pixels, "bytes_per_pixel": (result["peak"] - result["before"]) / pixels}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="3 + 3 images of 48x64, batch 2, 1 round: seconds")
    parser.add_argument("--count", type=int, default=48, help="images per folder (default: %(default)s)")
    parser.add_argument("--size", type=parse_size, default=(1072, 2000), help="nominal HxW (default: 1072x2000)")
    parser.add_argument("--batch-sizes", default="4,1", help="comma-separated --batch-size values (default: 4,1)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each folder per batch size")
    parser.add_argument("--load-size", type=parse_size, default=(4000, 6000),
                        help="HxW of the image whose reading cost is measured (default: 4000x6000)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dmp-bench-folder-memory"))
    parser.add_argument("--compare-with", type=Path, action="append", default=[], metavar="DIR",
                        help="a checkout whose dmp_model is measured the same way (e.g. the code before a change)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.count, args.size, args.batch_sizes, args.rounds, args.load_size = 3, (48, 64), "2", 1, (96, 128)
    args.workdir.mkdir(parents=True, exist_ok=True)
    folders = make_folders(args.workdir, args.count, args.size)
    base, adapter = make_model(args.workdir)
    big = args.workdir / f"load-{args.load_size[0]}x{args.load_size[1]}.jpg"
    if not big.exists():
        write_photo(big, *args.load_size, seed=99)
    codes = {"this": ROOT, **{str(path): path for path in args.compare_with}}
    results: dict = {"count": args.count, "size": list(args.size), "codes": {}}
    for label, code in codes.items():
        runs: dict = {}
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            cell = {kind: [] for kind in folders}
            for round_ in range(args.rounds):
                order = list(folders) if round_ % 2 == 0 else list(reversed(folders))
                for kind in order:
                    run = folder_run(folders[kind], args.workdir / f"out-{kind}", base, adapter, batch, code)
                    cell[kind].append(run)
            peaks = {kind: max(r["peak_bytes"] for r in cell[kind]) for kind in cell}
            runs[str(batch)] = {"runs": cell, "peak_bytes": peaks, "ratio": peaks["distinct"] / peaks["same"]}
        results["codes"][label] = {"batches": runs, "load": load_cost(big, folders["same"] / "img000.jpg", code,
                                                                          args.workdir)}
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


def print_table(results: dict) -> None:
    mib = 1 << 20
    height, width = results["size"]
    print(f"dmp predict, {results['count']} distinct-size vs {results['count']} same-size JPEGs of ~{width}x{height} "
          f"(tiny model, 1 step, CPU): peak RSS")
    print(f"{'code':<24} {'batch':>5} {'distinct MiB':>13} {'same MiB':>9} {'distinct/same':>14}")
    for label, result in results["codes"].items():
        for batch, cell in result["batches"].items():
            peaks = cell["peak_bytes"]
            print(f"{label:<24} {batch:>5} {peaks['distinct'] / mib:>13.0f} {peaks['same'] / mib:>9.0f} "
                  f"{cell['ratio']:>14.2f}")
    for label, result in results["codes"].items():
        load = result["load"]
        print(f"load_image ({label}): {load['pixels'] / 1e6:.1f} MP JPEG, {load['bytes_per_pixel']:.1f} bytes "
              "per pixel at peak (the float32 result is 12)")


if __name__ == "__main__":
    main()
