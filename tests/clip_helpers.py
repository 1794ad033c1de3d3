"""Synthetic clips and a stand-in prediction backend for the video tests (no networks, no diffusers).

``panning_clip``: depth frames of a room seen by a camera panning one pixel per frame.

``StandInBackend``: fast, exact, and importable in a bare subprocess. Its ``encode`` averages 8x8
pixel blocks (channels R, G, B and their mean), the denoiser returns its input, and ``decode``
repeats each latent pixel 8x8. With ``STAND_IN_OPTIONS`` (one step, the "sample" parametrisation,
the last step's y_hat) the "prediction" is the blocky input itself: a depth adapter
(``STAND_IN_DEPTH``, 8 m per unit) reads 8 * grey as metres, so a clip of grey frames depth / 8 is
predicted as that depth (per 8x8 block). Used to test what ``predict_images`` does around the
networks: streaming, temporal alignment, previews, memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dmp_model.adapters import AdapterInfo
from dmp_model.prediction.predict import PredictOptions
from dmp_model.sampling import sd1_schedule

STAND_IN_DEPTH = AdapterInfo(task="depth", prediction_type="sample", target_scale=8.0)
STAND_IN_NORMAL = AdapterInfo(task="normal", prediction_type="sample")
STAND_IN_OPTIONS = PredictOptions(steps=1, final_output="y_hat", processing_resolution=0)


class StandInBackend:
    """``PredictionBackend`` whose prediction is the input image, block-averaged (see the module)."""

    mixes_adapters = False

    def __init__(self):
        self.schedule = sd1_schedule()
        self.encoded = 0  # images encoded, to check that chunks stream through

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        self.encoded += pixels.shape[0]
        rgb = F.avg_pool2d(pixels * 2 - 1, 8)
        return torch.cat([rgb, rgb.mean(1, keepdim=True)], dim=1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents[:, :3].repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)

    def empty_embedding(self) -> torch.Tensor:
        return torch.zeros(1, 77, 8)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return torch.zeros(len(prompts), 77, 8)

    def denoiser(self, adapters, context, guidance_scale):
        return lambda z, t: z


def panning_clip(frames: int = 32, size: int = 32, side_wall: bool = True) -> torch.Tensor:
    """Depth [frames, size, size] in metres: a window sliding one pixel right per frame over a room.

    The room: a floor receding toward the horizon, a back wall at 6 m, a near box (1 m) that enters
    from the right halfway through and (`side_wall`) a wall receding from the left, whose depth at
    each pixel grows as the camera turns away from it. Frame t + 1 shows at column c what frame t
    showed at column c + 1, so the motion can be undone exactly.
    """
    width = size + frames
    rows = torch.arange(size, dtype=torch.float32)[:, None].expand(size, width)
    cols = torch.arange(width, dtype=torch.float32)[None].expand(size, width)
    horizon = size * 0.4
    far = torch.full_like(rows, 6.0)
    floor = torch.where(rows > horizon, 1.2 * size / (rows - horizon).clamp_min(1e-3), far)
    depth = torch.minimum(floor, far)
    if side_wall:
        depth = torch.minimum(depth, 1.5 + 0.08 * cols)
    box = (rows >= size // 2) & (rows < size * 3 // 4) & (cols >= width - size // 2) & (cols < width - size // 4)
    depth = torch.where(box, torch.ones_like(depth), depth)
    return torch.stack([depth[:, t:t + size] for t in range(frames)])
