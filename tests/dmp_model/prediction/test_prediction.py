"""The prediction path (``dmp_model.prediction.predict.predict_images``) on the pixel-wise stand-in backend.

``standins.PixelBackend`` makes the networks pixel-wise and exact (encode = 8x8 average pooling into
[-1, 1], the denoiser returns its input, decode = nearest upsampling), so what predict_images does
around the networks has answers known by construction: a depth adapter reads an 8x8 block of grey g
as g * target_scale metres.
"""

from __future__ import annotations

import pytest
import torch

from dmp_model.prediction.predict import predict_images
from standins import PIXEL_DEPTH, PIXEL_OPTIONS, PixelBackend, pixel_info


def block_grey_images(count: int, height: int = 32, width: int = 48, seed: int = 0) -> torch.Tensor:
    """Grey images [count, 3, H, W] whose 8x8 blocks are each one random level in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    levels = torch.rand(count, 1, height // 8, width // 8, generator=generator)
    return levels.repeat_interleave(8, 2).repeat_interleave(8, 3).expand(-1, 3, -1, -1).contiguous()


def test_depth_is_each_blocks_grey_times_the_target_scale():
    images = block_grey_images(3)
    depth = predict_images(PixelBackend(), images, {"depth": PIXEL_DEPTH}, PIXEL_OPTIONS)["depth"]
    expected = images[:, 0] * PIXEL_DEPTH.target_scale
    assert depth.raw.shape == expected.shape
    torch.testing.assert_close(depth.raw, expected, rtol=0, atol=1e-5 * PIXEL_DEPTH.target_scale)
    assert depth.visual.shape == (*expected.shape, 3) and depth.visual.dtype == torch.float32
    assert 0 <= depth.visual.min() and depth.visual.max() <= 1


def test_streaming_in_chunks_gives_what_one_batch_gives():
    images = block_grey_images(5, seed=1)
    one = predict_images(PixelBackend(), images, {"depth": PIXEL_DEPTH}, PIXEL_OPTIONS.updated(batch_size=5))
    chunked = predict_images(PixelBackend(), images, {"depth": PIXEL_DEPTH}, PIXEL_OPTIONS.updated(batch_size=2))
    torch.testing.assert_close(chunked["depth"].raw, one["depth"].raw, rtol=0, atol=1e-6)


def test_each_image_is_encoded_once_for_every_task():
    backend = PixelBackend()
    adapters = {"depth": PIXEL_DEPTH, "normal": pixel_info("normal")}
    results = predict_images(backend, block_grey_images(5, seed=2), adapters, PIXEL_OPTIONS.updated(batch_size=2))
    assert list(results) == ["depth", "normal"]
    assert backend.encoded == 5
    assert sum(backend.calls) == 5 * len(adapters)  # one step per adapter and image
    assert max(backend.calls) <= 2  # chunks of batch_size rows


def test_return_latents_gives_the_input_latents_and_the_final_ones():
    images = block_grey_images(2, seed=3)
    depth = predict_images(PixelBackend(), images, {"depth": PIXEL_DEPTH}, PIXEL_OPTIONS,
                           return_latents=True)["depth"]
    expected_input = PixelBackend().encode(images)
    torch.testing.assert_close(depth.input_latents, expected_input, rtol=0, atol=1e-6)
    assert depth.latents.shape == expected_input.shape


@pytest.mark.parametrize("images", [torch.rand(4, 4), torch.rand(1, 5, 16, 16)])
def test_images_of_the_wrong_shape_are_refused(images):
    with pytest.raises((ValueError, TypeError), match="image"):
        predict_images(PixelBackend(), images, {"depth": PIXEL_DEPTH}, PIXEL_OPTIONS)


def test_no_adapters_is_refused():
    with pytest.raises(ValueError, match="adapter"):
        predict_images(PixelBackend(), block_grey_images(1), {}, PIXEL_OPTIONS)
