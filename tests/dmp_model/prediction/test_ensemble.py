"""Flip ensembles: one batch for both passes, mirrored back per task, merged, with an uncertainty map."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dmp_model.prediction.alignment import apply_scale_shift, fit_scale_shift
from dmp_model.prediction.ensemble import predict_flip, uncertainty_visual
from dmp_model.prediction.predict import PredictOptions, predict_images
from dmp_model.tasks.codecs import get_codec
from standins import PIXEL_OPTIONS, PixelBackend, pixel_info

DEPTH, NORMAL = "depth-test-notext", "normal-test-notext"


def test_a_symmetric_image_gives_zero_depth_uncertainty_from_one_batch():
    half = torch.rand(2, 3, 24, 16, generator=torch.Generator().manual_seed(0))
    symmetric = torch.cat([half, half.flip(-1)], -1)  # [2, 3, 24, 32], a mirror image of itself
    backend = PixelBackend()
    result = predict_images(backend, symmetric, {"d": pixel_info("depth", target_scale=8.0)},
                            PIXEL_OPTIONS.updated(ensemble="flip"))["d"]
    assert backend.calls == [4]  # both images and both mirrors in one UNet batch
    # Zero up to rounding only: the mirror's 8x8 averages sum their pixels in another order, and the
    # scale-and-shift fit rounds too (measured <= 2e-7 m; the worst case of 64-term sums of pixels in
    # [0, 1], times 8 m, is ~2e-5 m). 1e-4 m is 1e-5 of the 8 m range; members flipped along the wrong
    # axis differ by decimetres (blocks of noise: ~0.3 m). The preview is u / depth (~4 m) / 0.1: < 1e-3.
    assert result.uncertainty.shape == (2, 24, 32) and result.uncertainty.abs().max() < 1e-4
    assert result.uncertainty_visual.shape == (2, 24, 32, 3) and result.uncertainty_visual.max() < 1e-3
    # A lopsided image is not its own mirror: the (pixel-wise, so mirror-equivariant) stand-in
    # still agrees with itself, but the members only match up after mirroring back.
    plain = predict_images(backend, half, {"d": pixel_info("depth", target_scale=8.0)}, PIXEL_OPTIONS)["d"]
    flipped = predict_images(backend, half, {"d": pixel_info("depth", target_scale=8.0)},
                             PIXEL_OPTIONS.updated(ensemble="flip"))["d"]
    torch.testing.assert_close(flipped.raw, plain.raw, atol=1e-4, rtol=0)  # as above: rounding only


def test_mirrored_normals_come_back_with_x_negated():
    normals = F.normalize(torch.randn(1, 8, 12, 3, generator=torch.Generator().manual_seed(1)), dim=-1)
    codec = get_codec("normal")
    mirrored = codec.mirror(normals)
    torch.testing.assert_close(mirrored[..., 0], -normals.flip(2)[..., 0])
    torch.testing.assert_close(mirrored[..., 1:], normals.flip(2)[..., 1:])
    torch.testing.assert_close(codec.mirror(mirrored), normals)

    def geometric(images, cond):  # a perfect predictor: the mirror's normals are the scene's, mirrored
        return {"n": (torch.cat([normals, codec.mirror(normals)]), None)}

    images = torch.rand(1, 3, 8, 12, generator=torch.Generator().manual_seed(2))  # unused by `geometric`
    merged, uncertainty = predict_flip(geometric, images, None, {"n": "normal"})["n"]
    torch.testing.assert_close(merged, normals)
    # Degrees; x left as it was would leave up to 90 (85 for these normals). The members agree, but the
    # angle is acos of a float32 cosine ~1: k rounding steps below 1 read as sqrt(2 k 6e-8) rad, 0.02
    # degrees for k = 1 (measured), 0.05 for k = 6. 0.5 degrees allows ~600 steps.
    assert uncertainty.max() < 0.5


def test_flip_ensemble_of_the_model_equals_the_hand_computed_merge(tiny_model):
    image = torch.rand(1, 3, 24, 40, generator=torch.Generator().manual_seed(2))
    options = PredictOptions(steps=2, processing_resolution=0)
    ensemble = tiny_model.predict_tasks(image, [DEPTH, NORMAL], options.updated(ensemble="flip"))
    original = tiny_model.predict_tasks(image, [DEPTH, NORMAL], options)
    mirror = tiny_model.predict_tasks(image.flip(-1), [DEPTH, NORMAL], options)
    # The ensemble runs image and mirror in one batch, the hand merge runs them apart: other matrix shapes,
    # so other summation orders, and raw values that differ by rounding (~1e-5, depending on the BLAS).
    # Depth: the mirror's prediction flipped back, fitted to the original by scale and shift, averaged
    # (measured 6e-6 m on depths up to 6 m; the tolerance allows 1e-4 + 1e-4 * depth). The robust fit picks
    # its inliers by thresholds, but near-threshold points weigh alike: inputs perturbed by 2e-5 (relative,
    # 20x the measured) moved the fitted scale and shift by < 6e-5, the merge by < 3e-4 m.
    back = mirror[DEPTH].raw.flip(2)
    aligned = apply_scale_shift(back, *fit_scale_shift(back, original[DEPTH].raw)).clamp(min=0)
    torch.testing.assert_close(ensemble[DEPTH].raw, (original[DEPTH].raw + aligned) / 2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ensemble[DEPTH].uncertainty, (original[DEPTH].raw - aligned).abs() / 2,
                               atol=1e-4, rtol=1e-4)
    # Normals: flipped back with x negated, mean direction, mean angle to it.
    back = mirror[NORMAL].raw.flip(2) * torch.tensor([-1.0, 1.0, 1.0])
    merged = F.normalize(original[NORMAL].raw + back, dim=-1)
    # Normalising a + b divides their rounding by |a + b| (0.06 at worst here): measured 4e-5. 1e-3 allows
    # that and a less favourable BLAS; a mirror whose x is not negated back is off by ~1.8.
    torch.testing.assert_close(ensemble[NORMAL].raw, merged, atol=1e-3, rtol=0)
    angles = [torch.rad2deg(torch.acos((n * merged).sum(-1).clamp(-1, 1))) for n in (original[NORMAL].raw, back)]
    # Angles between vectors move by about as many radians as the vectors move (1e-3 at most, as above:
    # 0.06 degrees); measured 8e-4 degrees on angles of 1.5 to 88 degrees. Wrong angles (the full angle
    # instead of each member's, or x not negated) are off by degrees.
    torch.testing.assert_close(ensemble[NORMAL].uncertainty, (angles[0] + angles[1]) / 2, atol=0.1, rtol=0)
    assert ensemble[DEPTH].uncertainty.max() > 0.01  # metres (1.3 here): a random UNet is not mirror-symmetric


def test_merge_rules_per_task():
    a, b = torch.tensor([[[1.0, 2.0]]]), torch.tensor([[[3.0, 2.0]]])
    merged, spread = get_codec("depth").merge(torch.stack([a, b]))
    torch.testing.assert_close(merged, torch.tensor([[[2.0, 2.0]]]))
    torch.testing.assert_close(spread, torch.tensor([[[1.0, 0.0]]]))
    ids = torch.tensor([[[[4, 7, 7]]], [[[5, 7, 9]]], [[[5, 2, 8]]]])  # 3 members, [1, 1, 3]
    voted, share = get_codec("segmentation").merge(ids)
    assert voted.tolist() == [[[5, 7, 7]]]  # majority, and the first member on a three-way tie
    torch.testing.assert_close(share, torch.tensor([[[1 / 3, 1 / 3, 2 / 3]]]))
    x, y = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    normal, angle = get_codec("normal").merge(torch.stack([x, y])[:, None, None, None])
    torch.testing.assert_close(normal[0, 0, 0], F.normalize(x + y, dim=0))
    torch.testing.assert_close(angle, torch.tensor([[[45.0]]]))
    albedo, spread = get_codec("albedo").merge(torch.stack([torch.zeros(1, 1, 1, 3), torch.full((1, 1, 1, 3), 0.5)]))
    torch.testing.assert_close(spread, torch.tensor([[[0.25]]]))


@pytest.mark.parametrize("task, uncertainty, raw, level", [
    ("depth", 0.2, 4.0, 0.5),  # std 5 % of the depth: half of the 10 % shown as white
    ("normal", 10.0, None, 0.5),  # 10 of 20 degrees
    ("segmentation", 0.5, None, 1.0),
    ("shading", 0.3, None, 1.0),  # beyond the scale: clamped
])
def test_uncertainty_previews_use_a_fixed_scale_per_task(task, uncertainty, raw, level):
    u = torch.full((1, 2, 2), uncertainty)
    raw = torch.full((1, 2, 2), raw) if raw is not None else torch.zeros(1, 2, 2)
    torch.testing.assert_close(uncertainty_visual(task, u, raw), torch.full((1, 2, 2, 3), level))
