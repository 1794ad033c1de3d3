"""Tiled prediction of large images: a global pass, then overlapping tiles merged without seams.

A single pass sees the image at the processing resolution (a 512-px shorter side) and loses
the detail of a 4096-px image. Tiling adds passes over square crops of ``tile`` input pixels
(at least the processing resolution, so a tile is never upsampled), each predicted at the
processing resolution, and merges them at the full size:

1. Layout: along each side, the fewest tiles whose neighbours overlap by at least ``ramp``
   pixels, spread evenly from edge to edge (``tile_starts``); an image whose shorter side fits
   in one tile is not tiled (the global pass already sees it at full detail or more).
2. Alignment: each tile is fitted to the global pass over its area by the task's rule (depth:
   robust scale and shift; shading: scale; ``tasks/codecs.py``), so tiles that saw different context
   agree on the scale of the scene.
3. Blending: separable weights, 1 inside a tile and a raised-cosine ramp over ``ramp`` pixels on
   each side that faces a neighbour (none on the image border). Where neighbours overlap by
   exactly the ramp, their weights sum to one (sin^2 + cos^2), so the merge crosses from one
   tile to the next smoothly and never steps; elsewhere the weighted mean is normalised.
   Averaged values are projected back (normals renormalised, [0, 1] clamped). Segmentation is
   voted on instead, with the same weights, so no class appears that no tile predicted.

Memory per image: the image, the global prediction and the sums at full size (for depth about
4 float32 planes, 200 MB at 4096 x 3072) and one batch of tiles; tiles' latents and decoded pixels
are never held beyond their batch (segmentation keeps every tile's class ids as uint8).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..tasks.codecs import get_codec
from .ensemble import Passes, PassFn, align


def tile_starts(length: int, tile: int, overlap: int) -> tuple[int, ...]:
    """Start offsets of the fewest tiles covering [0, length) with neighbours overlapping >= overlap.

    Args:
        length: image side in pixels (>= tile); tile: tile side; overlap: 0 <= overlap < tile.
    """
    if length <= tile:
        return (0,)
    count = math.ceil((length - tile) / (tile - overlap)) + 1
    return tuple(round(i * (length - tile) / (count - 1)) for i in range(count))


def ramp_weights(tile: int, ramp: int, fade_start: bool, fade_end: bool) -> torch.Tensor:
    """1-D weights [tile]: 1, with sin^2 ramps over `ramp` pixels at the ends that face a neighbour."""
    weights = torch.ones(tile, dtype=torch.float64)
    edge = torch.sin(math.pi / 2 * (torch.arange(ramp, dtype=torch.float64) + 0.5) / ramp) ** 2
    if fade_start:
        weights[:ramp] = edge
    if fade_end:
        weights[tile - ramp:] = torch.minimum(weights[tile - ramp:], edge.flip(0))
    return weights.float()


@dataclass(frozen=True)
class TileLayout:
    """Square tiles over an image: `tile` pixels, neighbours blended over `ramp` pixels."""

    height: int
    width: int
    tile: int
    ramp: int
    rows: tuple[int, ...]
    cols: tuple[int, ...]

    @property
    def boxes(self) -> list[tuple[int, int]]:
        """(top, left) of every tile, row by row."""
        return [(top, left) for top in self.rows for left in self.cols]

    def weights(self, top: int, left: int) -> torch.Tensor:
        """Blend weights [tile, tile] (> 0 everywhere) of the tile at (top, left)."""
        wy = ramp_weights(self.tile, self.ramp, top > 0, top + self.tile < self.height)
        wx = ramp_weights(self.tile, self.ramp, left > 0, left + self.tile < self.width)
        return wy[:, None] * wx[None, :]


def tile_layout(height: int, width: int, tile: int, overlap: float) -> TileLayout | None:
    """The tiles of a `height` x `width` image, or None when its shorter side fits in one tile.

    Args:
        tile: tile side in input pixels.
        overlap: blend ramp as a fraction of the tile, in (0, 0.5].
    """
    if min(height, width) <= tile:
        return None
    ramp = max(1, round(tile * overlap))
    return TileLayout(height, width, tile, ramp, tile_starts(height, tile, ramp), tile_starts(width, tile, ramp))


class TileMerger:
    """One image's tiles of one adapter: fitted to the global pass, then blended (or voted on).

    Args:
        task: the adapter's task (its codec has the merge rules).
        layout: the tiles.
        reference: the global pass [H, W(, C)] at the image size, for tasks that align; else None.
        with_uncertainty: also blend the tiles' uncertainty maps (flip ensembles).
    """

    def __init__(self, task: str, layout: TileLayout, reference: torch.Tensor | None, with_uncertainty: bool):
        self.codec, self.layout, self.reference = get_codec(task), layout, reference
        self.weight = torch.zeros(layout.height, layout.width)
        self.uncertainty = torch.zeros(layout.height, layout.width) if with_uncertainty else None
        self.votes: list[tuple[int, int, torch.Tensor]] = []
        self.total: torch.Tensor | None = None

    def add(self, top: int, left: int, value: torch.Tensor, uncertainty: torch.Tensor | None = None) -> None:
        """A tile's raw values [tile, tile(, C)] at (top, left), and its uncertainty [tile, tile] or None."""
        size = self.layout.tile
        box = (slice(top, top + size), slice(left, left + size))
        weight = self.layout.weights(top, left)
        scale = None
        if self.reference is not None and self.codec.alignment is not None:
            aligned, scale = align(self.codec, value[None].float(), self.reference[box][None].float())
            value = aligned[0]
        if self.codec.votes:
            self.votes.append((top, left, value.to(torch.uint8)))  # class ids 0..149
        else:
            if self.total is None:
                self.total = torch.zeros((self.layout.height, self.layout.width) + tuple(value.shape[2:]))
            self.total[box] += (weight if value.ndim == 2 else weight[..., None]) * value.float()
        self.weight[box] += weight
        if self.uncertainty is not None and uncertainty is not None:
            factor = 1.0 if scale is None else float(scale.abs()[0])  # in the aligned units
            self.uncertainty[box] += weight * uncertainty.float() * factor

    def result(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(merged raw [H, W(, C)], blended uncertainty [H, W] or None)."""
        if self.codec.votes:
            value = vote(self.votes, self.layout)
        else:
            weight = self.weight if self.total.ndim == 2 else self.weight[..., None]
            value = self.codec.project(self.total / weight)
        uncertainty = None if self.uncertainty is None else self.uncertainty / self.weight
        return value, uncertainty


def vote(tiles: list[tuple[int, int, torch.Tensor]], layout: TileLayout) -> torch.Tensor:
    """Weighted vote of tiles' class ids: per pixel the class with the largest sum of blend weights.

    Exact, without a per-class buffer: each tile's class is scored against every overlapping
    tile, and the best-scoring candidate over all tiles wins (ties: the earlier tile).

    Args:
        tiles: (top, left, class ids [tile, tile]) of every tile of the layout.

    Returns:
        int64 class ids [H, W], each one some tile's prediction at that pixel.
    """
    size = layout.tile
    best = torch.zeros(layout.height, layout.width, dtype=torch.int64)
    best_score = torch.full((layout.height, layout.width), -1.0)
    for top, left, ids in tiles:
        score = torch.zeros(size, size)
        for other_top, other_left, other in tiles:
            y0, y1 = max(top, other_top), min(top, other_top) + size
            x0, x1 = max(left, other_left), min(left, other_left) + size
            if y0 >= y1 or x0 >= x1:
                continue
            mine = (slice(y0 - top, y1 - top), slice(x0 - left, x1 - left))
            theirs = (slice(y0 - other_top, y1 - other_top), slice(x0 - other_left, x1 - other_left))
            agree = ids[mine] == other[theirs]
            score[mine] += layout.weights(other_top, other_left)[theirs] * agree
        region = (slice(top, top + size), slice(left, left + size))
        better = score > best_score[region]
        best[region][better] = ids[better].long()
        best_score[region][better] = score[better]
    return best


def predict_tiled(run: PassFn, images: torch.Tensor, cond: torch.Tensor | None, tasks: Mapping[str, str],
                  layout: TileLayout, batch_size: int) -> Passes:
    """Predict images [b, 3, H, W] (all of `layout`'s size) tile by tile and merge.

    Args:
        run: the pass (plain or a flip ensemble; ``ensemble.py``) for the global pass and the tiles.
        cond: prompt embeddings [1 or b, L, D] or None.
        tasks: {adapter name: task}.
        batch_size: tiles per pass (one UNet batch; a flip ensemble doubles its rows).

    Returns:
        {name: (raw [b, H, W(, C)], uncertainty [b, H, W] or None)}.
    """
    # 1. The global pass, only if some task aligns its tiles to it.
    aligning = [name for name, task in tasks.items() if get_codec(task).alignment is not None]
    reference = run(images, cond) if aligning else {}
    merged: dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]] = {name: [] for name in tasks}
    boxes, size = layout.boxes, layout.tile
    for i in range(images.shape[0]):
        # 2. This image's tiles in batches, each merged into full-size sums as soon as it is decoded.
        image_cond = cond if cond is None or cond.shape[0] == 1 else cond[i:i + 1]
        mergers: dict[str, TileMerger] = {}
        for start in range(0, len(boxes), batch_size):
            chunk = boxes[start:start + batch_size]
            crops = torch.stack([images[i, :, top:top + size, left:left + size] for top, left in chunk])
            for name, (raw, uncertainty) in run(crops, image_cond).items():
                if name not in mergers:
                    mergers[name] = TileMerger(tasks[name], layout, reference[name][0][i] if name in aligning
                                               else None, uncertainty is not None)
                for k, (top, left) in enumerate(chunk):
                    mergers[name].add(top, left, raw[k], None if uncertainty is None else uncertainty[k])
        for name, merger in mergers.items():
            merged[name].append(merger.result())
    return {name: (torch.stack([value for value, _ in parts]),
                   None if parts[0][1] is None else torch.stack([u for _, u in parts]))
            for name, parts in merged.items()}
