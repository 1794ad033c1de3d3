"""Temporal alignment of a clip's depth (dmp_model.prediction.temporal) and its wiring into predict_images."""

from __future__ import annotations

import pytest
import torch

from clip_helpers import panning_clip
from dmp_model.prediction.alignment import fit_scale
from dmp_model.prediction.predict import PredictOptions, predict_images
from dmp_model.prediction.temporal import TEMPORAL_FITS, TEMPORAL_TASKS, TemporalAligner, clip_aligners
from dmp_model.tasks.codecs import get_codec
from standins import PIXEL_DEPTH, PIXEL_OPTIONS, PixelBackend, pixel_info


def jittered(clip: torch.Tensor, spread: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A stand-in predictor: each frame scaled by its own random factor (log-normal, `spread`), and
    1 % per-pixel noise. Returns (prediction, the factors)."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.exp(spread * torch.randn(clip.shape[0], generator=generator))
    noise = 1 + 0.01 * torch.randn(clip.shape, generator=generator)
    return clip * scales.view(-1, 1, 1) * noise, scales


def log_scales(prediction: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Each frame's scale against the truth (robust least squares), as logarithms [B]."""
    return fit_scale(prediction, truth).log()


def test_alignment_removes_injected_scale_jitter():
    """Measure: each frame's scale against the true depth. The stand-in's scales jump by about 11 % from
    frame to frame; aligned, by well under 1 %, and the whole clip keeps the first frame's scale.

    The room has no side wall here: that wall's depth at each pixel really grows as the camera turns,
    which the aligner cannot tell from drift (see ``temporal``; measured in benchmarks/bench_video.py)."""
    truth = panning_clip(frames=32, size=32, side_wall=False)
    prediction, scales = jittered(truth)
    raw = log_scales(prediction, truth)
    aligned = TemporalAligner(strength=1.0)(prediction)
    out = log_scales(aligned, truth)
    assert float(raw.diff().abs().mean()) > 0.08
    assert float(out.diff().abs().mean()) < 0.005
    assert float((out - out[0]).abs().max()) < 0.03  # no drift: every frame at the first frame's scale
    assert torch.equal(aligned[0], prediction[0])  # the first frame sets the scale (returned as is: exact)
    assert float(out[0]) == pytest.approx(-float(scales[0].log()), abs=0.01)  # truth ~ prediction / scale


def test_strength_blends_between_the_prediction_and_the_full_fit():
    truth = panning_clip(frames=4, size=32)
    prediction, _ = jittered(truth, seed=1)
    full = TemporalAligner(strength=1.0)(prediction[:2])[1]
    half = TemporalAligner(strength=0.5)(prediction[:2])[1]
    torch.testing.assert_close(half, 0.5 * prediction[1] + 0.5 * full, rtol=1e-5, atol=1e-5)
    assert torch.equal(TemporalAligner(strength=0.0)(prediction), prediction)  # no fit at all: frames untouched


def test_chunks_continue_one_clip_and_reset_starts_a_new_one():
    prediction, _ = jittered(panning_clip(frames=12, size=32), seed=2)
    whole = TemporalAligner()(prediction)
    aligner = TemporalAligner()
    chunked = torch.cat([aligner(prediction[:5]), aligner(prediction[5:9]), aligner(prediction[9:])])
    # Exact by construction: frames are aligned one at a time, by the same operations however they are chunked.
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)
    aligner.reset()
    assert torch.equal(aligner(prediction[3:5])[0], prediction[3])


def test_replaying_written_frames_restores_the_reference():
    """Resuming a clip: observing the frames already aligned gives the reference an uninterrupted run had."""
    prediction, _ = jittered(panning_clip(frames=10, size=32), seed=3)
    whole = TemporalAligner()(prediction)
    resumed = TemporalAligner()
    for frame in whole[:6]:
        resumed.observe(frame)
    # Exact by construction: observe is the reference update an uninterrupted run made on the same frames.
    torch.testing.assert_close(resumed(prediction[6:]), whole[6:], rtol=0, atol=0)


def test_scene_cut_or_frame_without_depth_restarts_the_reference():
    frame = panning_clip(frames=1, size=32)[0]
    clip = torch.stack([frame, torch.zeros_like(frame), 3 * frame, 6 * frame])
    out = TemporalAligner()(clip)
    assert torch.equal(out[1], clip[1]) and torch.equal(out[2], clip[2])  # restarted: kept as predicted
    torch.testing.assert_close(out[3], out[2], rtol=1e-4, atol=1e-4)  # then aligned to the new start


def test_scale_shift_fit_removes_a_shift_as_well():
    truth = panning_clip(frames=8, size=32, side_wall=False)
    prediction = truth + torch.linspace(0, 1, 8).view(-1, 1, 1)  # the first frame without a shift
    assert torch.equal(TemporalAligner(fit="scale_shift")(prediction)[0], prediction[0])
    out = TemporalAligner(fit="scale_shift")(prediction)
    torch.testing.assert_close(out[1:] - truth[1:], torch.zeros_like(truth[1:]), rtol=0, atol=1e-3)


def test_bad_settings_and_inputs_are_refused():
    with pytest.raises(ValueError, match=r"strength must be a finite number in \[0, 1\], got 1.5"):
        TemporalAligner(strength=1.5)
    with pytest.raises(ValueError, match=r"momentum must be a finite number in \[0, 1\), got 1"):
        TemporalAligner(momentum=1)
    with pytest.raises(ValueError, match=r"fit must be one of \('scale', 'scale_shift'\), got 'affine'"):
        TemporalAligner(fit="affine")
    with pytest.raises(ValueError, match=r"temporal_alignment must be a finite number in \[0, 1\], got -0.1"):
        PredictOptions(temporal_alignment=-0.1)
    with pytest.raises(ValueError, match="visual_range"):
        PredictOptions(visual_range="fixed")
    aligner = TemporalAligner()
    aligner(torch.ones(1, 8, 8))
    with pytest.raises(ValueError, match=r"size \(4, 4\) does not continue a clip of size \(8, 8\)"):
        aligner(torch.ones(1, 4, 4))
    with pytest.raises(ValueError, match=r"depth must be a floating-point tensor \[B, H, W\]"):
        aligner(torch.ones(8, 8))
    assert TEMPORAL_TASKS == ("depth",) and "scale" in TEMPORAL_FITS


def test_clip_aligners_only_for_depth_and_kept_in_the_callers_state():
    state: dict = {}
    found = clip_aligners({"d": "depth", "n": "normal", "a": "albedo", "s": "shading"}, 0.7, state)
    assert list(found) == ["d"] and state["d"] is found["d"] and found["d"].strength == 0.7
    assert clip_aligners({"d": "depth"}, 0.7, state)["d"] is found["d"]  # the next call continues it
    assert clip_aligners({"d": "depth"}, 0.0) == {}


# predict_images with the stand-in backend: the prediction is the input grey * 8 m (per 8x8 block) --------


def grey_frames(depth: torch.Tensor) -> torch.Tensor:
    """Depth [B, H, W] (metres, below 8) as the stand-in's input images [B, 3, H, W]."""
    return (depth / 8).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def test_predict_images_aligns_depth_frames_in_order_and_leaves_normals_alone():
    truth = panning_clip(frames=10, size=32)
    prediction, _ = jittered(truth, spread=0.05, seed=4)
    images = grey_frames(prediction.clamp(max=7.9))
    adapters = {"depth": PIXEL_DEPTH, "normal": pixel_info("normal")}
    options = PIXEL_OPTIONS.updated(batch_size=3)
    plain = predict_images(PixelBackend(), images, adapters, options)
    aligned = predict_images(PixelBackend(), images, adapters, options.updated(temporal_alignment=1.0))
    # Exact by construction here and below: the stand-in's per-image arithmetic (8 x 8 block means, an
    # identity network) does not depend on the batch, and the aligner goes frame by frame.
    torch.testing.assert_close(aligned["depth"].raw, TemporalAligner()(plain["depth"].raw), rtol=0, atol=0)
    assert not torch.equal(aligned["depth"].raw, plain["depth"].raw)  # scales jitter by ~5 %
    assert torch.equal(aligned["normal"].raw, plain["normal"].raw)
    # A clip in several calls with one state dict: the same as one call.
    state: dict = {}
    parts = [predict_images(PixelBackend(), images[i:i + 4], adapters, options.updated(temporal_alignment=1.0),
                            aligners=state)["depth"].raw for i in (0, 4, 8)]
    torch.testing.assert_close(torch.cat(parts), aligned["depth"].raw, rtol=0, atol=0)


def test_batch_visual_range_gives_every_frame_one_colour_scale():
    near = torch.full((1, 16, 16), 2.0)
    near[:, :, 8:] = 3.0
    frames = grey_frames(torch.cat([near, near * 2]))  # the second frame twice as far
    options = PIXEL_OPTIONS.updated(batch_size=1)
    # Exact values throughout: depths 2, 3, 4 and 6 m (and their eighths) are binary fractions, so per-image
    # ranges map both frames onto the same 0 and 1, and the batch range's ends onto the same colours.
    per_image = predict_images(PixelBackend(), frames, {"d": PIXEL_DEPTH}, options)["d"].visual
    batch = predict_images(PixelBackend(), frames, {"d": PIXEL_DEPTH},
                           options.updated(visual_range="batch"))["d"].visual
    assert torch.equal(per_image[0], per_image[1])  # each frame spread over the whole colour map
    assert not torch.equal(batch[0], batch[1])
    assert torch.equal(batch[0, 0, 0], per_image[0, 0, 0]) and torch.equal(batch[1, 0, -1], per_image[1, 0, -1])


def test_batch_visual_of_a_clip_coloured_in_chunks_equals_one_call():
    depth = panning_clip(frames=7, size=32) * torch.linspace(1, 1.3, 7).view(-1, 1, 1)
    options = PIXEL_OPTIONS.updated(batch_size=3, visual_range="batch")
    chunked = predict_images(PixelBackend(), grey_frames(depth), {"d": PIXEL_DEPTH}, options)["d"]
    whole = get_codec("depth").visualize(chunked.raw, range_mode="batch")
    # Exact by construction: one colour range over the clip, then element-wise maps, however it is chunked.
    torch.testing.assert_close(chunked.visual, whole, rtol=0, atol=0)
    flat = predict_images(PixelBackend(), torch.full((5, 3, 16, 16), 0.25), {"d": PIXEL_DEPTH}, options)["d"]
    assert torch.equal(flat.visual, get_codec("depth").visualize(flat.raw, range_mode="batch"))  # no range at all
