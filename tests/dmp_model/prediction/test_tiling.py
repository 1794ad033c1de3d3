"""Tiled prediction: layout, blend weights, alignment to the global pass, seamless merging, sizes, memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dmp_model.images import resize
from dmp_model.prediction.ensemble import align
from dmp_model.prediction.predict import PredictOptions, predict_images
from dmp_model.prediction.tiling import TileMerger, predict_tiled, tile_layout, tile_starts
from dmp_model.tasks.palettes import NUM_CLASSES
from standins import PIXEL_OPTIONS, PixelBackend, pixel_info

ROOT = Path(__file__).resolve().parents[3]
HEIGHT, WIDTH, TILE, RESOLUTION = 301, 517, 64, 64  # odd sizes on purpose


def smooth_depth(height: int, width: int) -> torch.Tensor:
    """A smooth positive depth map [H, W] in metres (1..5): a ramp and two slow waves."""
    y = torch.linspace(0, 1, height)[:, None]
    x = torch.linspace(0, 1, width)[None, :]
    return 2 + 1.5 * y + 0.5 * torch.sin(6 * x) * torch.cos(4 * y) + 0.3 * x


def standin_run(truths: dict[str, torch.Tensor], seed: int = 0, tilt: float = 0.0):
    """A pass whose input rows carry their own truth: image channel 0 holds each pixel's flat index.

    The whole image (the global pass) is predicted exactly but only at the processing resolution
    (shrunk to RESOLUTION and back, as a real global pass sees it); any other row (a tile) is
    predicted sharp, but depth is off by a random scale and shift per tile (plus, with `tilt`, a
    tilt across the tile that no scale and shift can undo), drawn from the tile's position.
    """
    height, width = truths["depth"].shape

    def run(images: torch.Tensor, cond):
        out = {name: [] for name in truths}
        for crop in images:
            index = (crop[0] * (height * width)).round().long().clamp(0, height * width - 1)
            generator = torch.Generator().manual_seed(seed * 10**6 + int(index[0, 0]))
            whole = tuple(crop.shape[-2:]) == (height, width)
            for name in truths:
                value = truths[name].reshape(height * width, *truths[name].shape[2:])[index]
                if name == "depth" and whole:
                    value = resize(resize(value[None, None], (RESOLUTION, 110)), (height, width))[0, 0]
                elif name == "depth":
                    scale, shift = 0.5 + 1.5 * torch.rand(1, generator=generator), torch.randn(1, generator=generator)
                    u = torch.linspace(-1, 1, crop.shape[-1])[None, :] * torch.randn(1, generator=generator)
                    value = scale * (value + tilt * u) + shift
                out[name].append(value)
        return {name: (torch.stack(values), None) for name, values in out.items()}
    return run


def index_image(height: int, width: int) -> torch.Tensor:
    """[1, 3, H, W]: channel 0 is each pixel's flat index / (H W), so a crop knows where it lies."""
    index = torch.arange(height * width, dtype=torch.float64).reshape(height, width) / (height * width)
    return index.float()[None, None].expand(1, 3, height, width).contiguous()


def test_tiles_cover_the_image_evenly_with_at_least_the_overlap():
    for length, tile, overlap in [(517, 64, 16), (301, 64, 16), (1000, 512, 128), (513, 512, 128), (4096, 512, 128)]:
        starts = tile_starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] + tile == length
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        assert all(tile - gap >= overlap for gap in gaps), (length, starts)
        assert max(gaps) - min(gaps) <= 1  # spread evenly
        assert len(starts) == 1 or tile - max(gaps) < overlap + (tile - overlap) / (len(starts) - 1) + 1  # fewest
    assert tile_layout(512, 4000, 512, 0.25) is None  # the shorter side fits in one tile: no tiling
    assert tile_layout(513, 600, 512, 0.25) is not None


def test_blend_weights_sum_to_one_where_neighbours_overlap_by_the_ramp():
    layout = tile_layout(160, 160, 64, 0.25)  # 160 = 64 + 2 * 48: overlaps of exactly the ramp (16)
    assert layout.rows == (0, 48, 96) and layout.ramp == 16
    total = torch.zeros(160, 160)
    for top, left in layout.boxes:
        weight = layout.weights(top, left)
        assert weight.min() > 0
        total[top:top + 64, left:left + 64] += weight
    torch.testing.assert_close(total, torch.ones(160, 160))


def merged_depth(tilt: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, object]:
    truth = smooth_depth(HEIGHT, WIDTH)
    layout = tile_layout(HEIGHT, WIDTH, TILE, 0.25)
    out = predict_tiled(standin_run({"depth": truth}, seed, tilt), index_image(HEIGHT, WIDTH), None,
                        {"depth": "depth"}, layout, batch_size=4)
    return out["depth"][0][0], truth, layout


def test_tiles_off_by_random_scale_and_shift_merge_to_the_truth():
    merged, truth, layout = merged_depth(tilt=0.0)
    assert merged.shape == (HEIGHT, WIDTH) and len(layout.boxes) == 66
    # Each tile is fitted to a global pass that is blurred (seen at 64 px): what remains is the
    # blur's pull on the fit, well under 1 % of the depth; without the fit, tiles are off by metres.
    assert ((merged - truth).abs() / truth).max() < 0.01


def largest_step(values: torch.Tensor) -> float:
    """The largest difference between neighbouring pixels (rows or columns) of a map [H, W]."""
    return max(values.diff(dim=0).abs().max(), values.diff(dim=1).abs().max()).item()


def hard_seam_merge(run, layout, reference: torch.Tensor) -> torch.Tensor:
    """The control: tiles aligned the same way, but every pixel taken from the tile whose centre is nearest."""
    codec = TileMerger("depth", layout, reference, False).codec
    nearest = torch.full((HEIGHT, WIDTH), float("inf"))
    merged = torch.zeros(HEIGHT, WIDTH)
    image = index_image(HEIGHT, WIDTH)
    for top, left in layout.boxes:
        box = (slice(top, top + TILE), slice(left, left + TILE))
        value = run(image[:, :, box[0], box[1]], None)["depth"][0]
        aligned = align(codec, value, reference[None][:, box[0], box[1]])[0][0]
        ys, xs = torch.meshgrid(torch.arange(TILE), torch.arange(TILE), indexing="ij")
        distance = (ys - TILE / 2).abs().maximum((xs - TILE / 2).abs()).float()
        closer = distance < nearest[box]
        merged[box][closer], nearest[box][closer] = aligned[closer], distance[closer]
    return merged


def test_no_step_at_tile_borders():
    """The measure: the largest difference between neighbouring pixels of the error (merged - truth).

    Tiles here carry an error no scale and shift removes (a random tilt across each tile), so
    overlapping tiles disagree after alignment. A hard seam puts that whole disagreement between two
    neighbouring pixels; the blend spreads it over the 16-px ramp, so the largest neighbour step of
    the error must stay under a fifth of the hard seam's.
    """
    merged, truth, layout = merged_depth(tilt=0.05, seed=3)
    run = standin_run({"depth": truth}, seed=3, tilt=0.05)
    hard = hard_seam_merge(run, layout, run(index_image(HEIGHT, WIDTH), None)["depth"][0][0])
    hard_step = largest_step(hard - truth)
    assert hard_step > 0.02  # the aligned tiles do disagree: a seam would show
    assert largest_step(merged - truth) < hard_step / 5, (largest_step(merged - truth), hard_step)


def test_normals_stay_unit_length_and_classes_come_from_the_tiles():
    generator = torch.Generator().manual_seed(0)
    normals = F.normalize(torch.randn(HEIGHT, WIDTH, 3, generator=generator), dim=-1)
    classes = torch.randint(0, NUM_CLASSES, (HEIGHT, WIDTH), generator=generator)
    truths = {"depth": smooth_depth(HEIGHT, WIDTH), "normal": normals, "segmentation": classes}
    base = standin_run(truths)
    seen: list[tuple[int, int, torch.Tensor]] = []

    def noisy(images, cond):  # every tile predicts different normals and some wrong classes
        out = base(images, cond)
        n = F.normalize(out["normal"][0] + 0.5 * torch.randn(out["normal"][0].shape, generator=generator), dim=-1)
        wrong = torch.randint(0, NUM_CLASSES, out["segmentation"][0].shape, generator=generator)
        ids = torch.where(torch.rand(wrong.shape, generator=generator) < 0.3, wrong, out["segmentation"][0])
        corners = [int(c[0, 0, 0] * HEIGHT * WIDTH + 0.5) for c in images]
        seen.extend((corner // WIDTH, corner % WIDTH, i) for corner, i in zip(corners, ids) if i.shape == (TILE, TILE))
        return {**out, "normal": (n, None), "segmentation": (ids, None)}

    layout = tile_layout(HEIGHT, WIDTH, TILE, 0.25)
    out = predict_tiled(noisy, index_image(HEIGHT, WIDTH), None,
                        {"depth": "depth", "normal": "normal", "segmentation": "segmentation"}, layout, 4)
    torch.testing.assert_close(out["normal"][0].norm(dim=-1), torch.ones(1, HEIGHT, WIDTH))
    ids = out["segmentation"][0][0]
    assert ids.dtype == torch.int64 and ids.shape == (HEIGHT, WIDTH)
    predicted_here = torch.zeros(HEIGHT, WIDTH, dtype=torch.bool)  # the vote only returns a tile's class
    assert sorted((top, left) for top, left, _ in seen) == sorted(layout.boxes)
    for top, left, tile_ids in seen:
        predicted_here[top:top + TILE, left:left + TILE] |= tile_ids == ids[top:top + TILE, left:left + TILE]
    assert predicted_here.all()
    # The vote equals a brute-force one: blend weights summed per class, the largest wins (where unique).
    scores = torch.zeros(NUM_CLASSES, HEIGHT, WIDTH)
    for top, left, tile_ids in seen:
        scores[:, top:top + TILE, left:left + TILE].scatter_add_(0, tile_ids[None], layout.weights(top, left)[None])
    top2 = scores.topk(2, dim=0)
    unique = top2.values[0] - top2.values[1] > 1e-4
    assert unique.float().mean() > 0.5 and (ids == top2.indices[0])[unique].all()


@pytest.mark.parametrize("ensemble", ["none", "flip"])
def test_predict_images_tiles_odd_sizes_back_to_the_input_size(ensemble):
    backend = PixelBackend()
    infos = {name: pixel_info(name, target_scale=8.0 if name == "depth" else 1.0)
             for name in ("depth", "normal", "segmentation", "albedo", "shading")}
    options = PIXEL_OPTIONS.updated(processing_resolution=RESOLUTION, tile=True, ensemble=ensemble, batch_size=8)
    image = torch.rand(1, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(0))
    progress = []
    results = predict_images(backend, image, infos, options, callback=lambda done, total: progress.append(total))
    layout = tile_layout(HEIGHT, WIDTH, RESOLUTION, 0.25)
    for result in results.values():
        assert result.raw.shape[1:3] == (HEIGHT, WIDTH) and result.visual.shape == (1, HEIGHT, WIDTH, 3)
        assert (result.uncertainty is None) == (ensemble == "none")
        assert not result.raw.isnan().any()
    # Every tile batch and the global pass (depth and shading align to it) ran every adapter,
    # counted in the progress total; a flip ensemble doubles the rows of a batch, not the batches.
    passes = 1 + -(-len(layout.boxes) // 8)
    assert len(backend.calls) == passes * len(infos) and progress[-1] == len(backend.calls)
    assert max(backend.calls) == 8 * (2 if ensemble == "flip" else 1)


def test_tiling_settings_are_checked_up_front():
    with pytest.raises(ValueError, match=r"tile_size must be 0 or at least the processing_resolution \(512\).*256"):
        PredictOptions(tile=True, tile_size=256)
    with pytest.raises(ValueError, match=r"tile_overlap must be a finite number in \(0, 0.5\], got 0.75"):
        PredictOptions(tile_overlap=0.75)
    with pytest.raises(ValueError, match="tile=True needs a processing_resolution > 0"):
        PredictOptions(tile=True, processing_resolution=0)
    with pytest.raises(ValueError, match=r"ensemble must be one of \('none', 'flip'\), got 'mirror'"):
        PredictOptions(ensemble="mirror")
    with pytest.raises(TypeError, match="tile must be True or False"):
        PredictOptions(tile="yes")
    with pytest.raises(ValueError, match="return_latents=True is not available with tile=True"):
        predict_images(PixelBackend(), torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)),
                       {"d": pixel_info("depth")},
                       PIXEL_OPTIONS.updated(processing_resolution=8, tile=True), return_latents=True)


def test_a_4096_by_3072_image_stays_within_the_memory_bound(tmp_path):
    """Peak RSS of a fresh process predicting a 4096 x 3072 image with 512-px tiles (88 tiles of 4 per
    batch, pixel-wise stand-in networks, shading: aligned to a global pass like depth, with a cheap
    preview), over its RSS once the input exists: under 700 MB (measured: about 475 MB).

    What must be held is about 500 MB: the input's copy in [0, 1] (151 MB), at full size the global
    pass, the weighted sums, the weights and the result (4 x 50 MB), and the preview (151 MB).
    Holding every tile's decoded pixels (or every tile's framed input) would add 277 MB each.
    """
    script = textwrap.dedent(f"""
        import json, resource, sys, torch
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests" / "support")!r}]
        from standins import PIXEL_OPTIONS, PixelBackend, pixel_info
        from dmp_model.prediction.predict import predict_images
        ramp = torch.linspace(0, 1, 4096) * torch.linspace(0.5, 1, 3072)[:, None]
        image = ramp.expand(1, 3, 3072, 4096).contiguous()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result = predict_images(PixelBackend(), image, {{"d": pixel_info("shading")}},
                                PIXEL_OPTIONS.updated(processing_resolution=512, tile=True, batch_size=4))["d"]
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"shape": list(result.raw.shape), "peak_kb": after - before}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    assert measured["shape"] == [1, 3072, 4096]
    assert measured["peak_kb"] < 7e5, measured
