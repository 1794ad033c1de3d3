"""The one stand-in prediction backend, for tests of what ``predict_images`` does around the networks.

``PixelBackend`` is a ``prediction.PredictionBackend`` whose networks are pixel-wise: encode =
8x8 average pooling (latent = the image's colours), one sampler step with the "sample"
parametrisation returns the latent unchanged, decode = nearest upsampling. So a prediction is the
image's own colours decoded by the task's codec (depth = grey level x target_scale, normals =
2 rgb - 1, classes = nearest palette colour), the whole path is mirror-symmetric for widths that
are multiples of 8, and it costs next to nothing, even at 4096 x 3072. It imports no model library,
so it also runs in a bare subprocess (memory tests). ``PIXEL_DEPTH``: a depth adapter reading 8 * grey
as metres, so grey frames of depth / 8 are predicted as that depth (per 8x8 block).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dmp_model.adapters import AdapterInfo
from dmp_model.prediction.predict import PredictOptions
from dmp_model.sampling import sd1_schedule

# One step with the "sample" parametrisation and y_hat out: the result is the model's output at z = x.
PIXEL_OPTIONS = PredictOptions(steps=1, final_output="y_hat", processing_resolution=0)


def pixel_info(task: str, **facts) -> AdapterInfo:
    return AdapterInfo(task=task, prediction_type="sample", **facts)


PIXEL_DEPTH = pixel_info("depth", target_scale=8.0)


class PixelBackend:
    """Pixel-wise networks; records the rows of every denoiser call in ``calls``, images encoded in ``encoded``."""

    mixes_adapters = False

    def __init__(self):
        self.schedule = sd1_schedule()
        self.calls: list[int] = []
        self.encoded = 0  # images encoded, to check that chunks stream through

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        self.encoded += pixels.shape[0]
        pooled = F.avg_pool2d(pixels.float() * 2 - 1, 8)  # [0, 1] in, the VAE's [-1, 1] range out
        return torch.cat([pooled, torch.zeros_like(pooled[:, :1])], 1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.interpolate(latents[:, :3], scale_factor=8, mode="nearest")

    def empty_embedding(self) -> torch.Tensor:
        return torch.zeros(1, 77, 8)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return torch.zeros(len(prompts), 77, 8)

    def denoiser(self, adapters, context, guidance_scale):
        def model(z: torch.Tensor, t: int) -> torch.Tensor:
            self.calls.append(z.shape[0])
            return z
        return model
