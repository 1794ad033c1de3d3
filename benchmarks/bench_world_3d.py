"""How far the demo adapters' 3D points land from the miniature world's: mean 3D error on held-out scenes.

    python -m training demo --out demo/                     # once: the world, the prior, the adapters
    python benchmarks/bench_world_3d.py --demo demo/ --base ~/.cache/dmp/demo-prior/seed0-64px/base

Each held-out scene of a finished ``dmp demo`` (in domain: val, out of domain: ood) is predicted as
the demo scores it (the prior's depth LoRA, DMP's sampler, native resolution) and back-projected
through the scene's own camera (its field of view from the world's scene description) with
``dmp_model.geometry``, as is its true depth. The world's true depth gives the world's 3D points to
float precision (tests/dmp_model/geometry/test_geometry.py), so the distance between the two point clouds, pixel by
pixel, is the prediction's 3D error in metres. Along a pixel's ray it is |depth error| times the
ray's length per metre of depth (1 at the centre, about 1.2 in the corners at 70 degrees).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from dmp_model import DMPModel  # noqa: E402
from dmp_model.geometry.cloud import build_point_cloud  # noqa: E402
from dmp_model.images import load_image  # noqa: E402
from training.demo import world  # noqa: E402
from training.demo.run import OOD_STYLES  # noqa: E402

SPLITS = {"val": world.IN_DOMAIN_STYLE, "ood": OOD_STYLES}  # world folder -> the styles its scenes were drawn in


def points(depth: torch.Tensor, hfov_degrees: float) -> torch.Tensor:
    """[H * W, 3] glTF points of every pixel (depth > 0 everywhere in the world)."""
    colours = torch.zeros(*depth.shape, 3)
    return build_point_cloud(depth, colours, hfov_degrees, depth.numel()).points


def split_errors(model: DMPModel, folder: Path, seed: int, styles) -> dict[str, float]:
    stems = sorted(p.stem for p in (folder / "images").glob("*.png"))
    images = torch.stack([load_image(folder / "images" / f"{stem}.png") for stem in stems])  # [N, 3, H, W]
    with torch.inference_mode():
        predicted = model.predict(images, "depth", processing_resolution=0, batch_size=16).raw
    errors, relative, depths = [], [], []
    for stem, guess in zip(stems, predicted):
        index = int(stem)
        scene = world.random_scene(seed, index, world.scene_style(styles, index))
        hfov = math.degrees(scene.camera.hfov)
        truth = torch.from_numpy(np.load(folder / "depth" / f"{stem}.npy"))
        if not (guess > 0).all():
            raise ValueError(f"{stem}: the prediction has {(guess <= 0).sum()} pixels without depth")
        distance = (points(guess, hfov) - points(truth, hfov)).norm(dim=-1)
        errors.append(distance.mean().item())
        relative.append((distance / points(truth, hfov).norm(dim=-1)).mean().item())
        depths.append(truth.mean().item())
    return {"scenes": len(stems), "mean_3d_error_m": float(np.mean(errors)),
            "median_scene_3d_error_m": float(np.median(errors)), "mean_relative": float(np.mean(relative)),
            "mean_depth_m": float(np.mean(depths))}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, required=True, help="a finished `dmp demo --out` folder")
    parser.add_argument("--base", type=Path, required=True, help="the demo's prior base (its prior cache)")
    parser.add_argument("--run", default="prior_lora", help="the demo run whose depth adapter is used")
    args = parser.parse_args(argv)
    seed = json.loads((args.demo / "demo.json").read_text())["settings"]["seed"]
    model = DMPModel.from_pretrained(args.base, device="cpu", precision="fp32")
    model.load_adapter(args.demo / "runs" / args.run / "depth", name="depth")
    results = {split: split_errors(model, args.demo / "world" / split, seed, styles)
               for split, styles in SPLITS.items()}
    print(f"{'split':6} {'scenes':>6} {'mean 3D error':>14} {'median scene':>13} {'relative':>9} {'mean depth':>11}")
    for split, r in results.items():
        print(f"{split:6} {r['scenes']:6d} {r['mean_3d_error_m']:12.3f} m {r['median_scene_3d_error_m']:11.3f} m "
              f"{r['mean_relative']:9.1%} {r['mean_depth_m']:9.2f} m")
    print("\nmean 3D error: the distance between predicted and true points, averaged over pixels, then scenes; "
          "relative: that distance over the true point's distance from the camera.")
    return results


if __name__ == "__main__":
    main()
