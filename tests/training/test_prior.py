"""The demo's diffusion prior: pre-training lowers the diffusion loss, and the cache is used only when
it is intact and built for this world, this model shape and these settings (else it is rebuilt)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from training.demo import prior as priors
from training.demo.prior import PriorSettings

# A prior that builds in a few seconds: 32 px images, a handful of steps.
TINY = PriorSettings(size=32, images=10, label_maps=2, vae_steps=3, vae_batch=4, unet_width=32, unet_steps=3,
                     unet_batch=4, unet_warmup=1, threads=1)


@pytest.fixture(scope="module")
def cached(tmp_path_factory) -> Path:
    """A cache folder holding one prior built with TINY."""
    cache = tmp_path_factory.mktemp("prior-cache")
    base, info = priors.load_or_build_prior(TINY, cache)
    assert info["cached"] is False and base == priors.cache_folder(cache, TINY) / priors.BASE_FOLDER
    return cache


def _copy(cached: Path, tmp_path: Path) -> Path:
    """A private copy of the cache, to damage."""
    return Path(shutil.copytree(cached, tmp_path / "cache"))


def test_an_intact_prior_is_reused_without_building(cached, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("an intact cached prior must not be rebuilt")

    monkeypatch.setattr(priors, "build_vae_stage", no_build)
    base, info = priors.load_or_build_prior(TINY, cached)
    assert info["cached"] is True and (base / "unet" / "config.json").is_file()
    meta = priors.read_prior_metadata(base.parent)
    assert meta["world_version"] == priors.WORLD_VERSION and meta["settings"]["unet_width"] == 32
    from dmp_model import DMPModel

    model = DMPModel.from_pretrained(base, device="cpu", precision="fp32")  # an SD 1.x folder the engine loads
    assert model.unet.config.block_out_channels[0] == 32


def _flip_a_byte(slot: Path) -> None:
    weights = slot / "base" / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))


def _set_meta(slot: Path, **changes) -> None:
    meta = json.loads((slot / priors.METADATA_FILE).read_text())
    meta.update(changes)
    (slot / priors.METADATA_FILE).write_text(json.dumps(meta))


DAMAGES = {
    "corrupt weights": (_flip_a_byte, "corrupt"),
    "another world version": (lambda slot: _set_meta(slot, world_version=priors.WORLD_VERSION - 1), "world version"),
    "another cache format": (lambda slot: _set_meta(slot, format=0), "cache format"),
    "metadata not JSON": (lambda slot: (slot / priors.METADATA_FILE).write_text("{not json"), "unreadable"),
    "metadata missing": (lambda slot: (slot / priors.METADATA_FILE).unlink(), "missing"),
    "file list altered": (lambda slot: _set_meta(slot, files={"unet/config.json": "0" * 64}), "altered"),
    "a weight file missing": (lambda slot: (slot / "base" / "vae" / "diffusion_pytorch_model.safetensors").unlink(),
                              "missing"),
    "an extra file": (lambda slot: (slot / "base" / "unet" / "extra.bin").write_bytes(b"x"), "not built with"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_or_stale_prior_is_detected(cached, tmp_path, damage):
    cache = _copy(cached, tmp_path)
    slot = priors.cache_folder(cache, TINY)
    assert priors.check_cached_prior(slot, TINY) is None
    harm, expected = DAMAGES[damage]
    harm(slot)
    problem = priors.check_cached_prior(slot, TINY)
    assert problem is not None and expected in problem, problem


def test_other_shape_or_settings_are_detected(cached):
    slot = priors.cache_folder(cached, TINY)
    assert "model shape" in priors.check_cached_prior(slot, replace(TINY, unet_width=16))
    assert "model shape" in priors.check_cached_prior(slot, replace(TINY, vae_width=8))
    assert "settings" in priors.check_cached_prior(slot, replace(TINY, unet_steps=4))


def test_a_corrupt_prior_is_rebuilt_and_replaced(cached, tmp_path):
    cache = _copy(cached, tmp_path)
    slot = priors.cache_folder(cache, TINY)
    _flip_a_byte(slot)
    base, info = priors.load_or_build_prior(TINY, cache)
    assert info["cached"] is False and "corrupt" in info["rebuilt_because"]
    assert priors.check_cached_prior(slot, TINY) is None  # the slot now holds an intact prior
    assert not [p.name for p in cache.iterdir() if p.name.startswith(".")]  # no staging or aside folder left
    # Rebuilt from the same settings and seeds: the same weights as the first build, bit for bit (exact by
    # construction: the same operations in the same order, in this process, on threads pinned to TINY's 1).
    first = priors.read_prior_metadata(priors.cache_folder(cached, TINY))["files"]
    assert priors.read_prior_metadata(slot)["files"] == first


def test_a_prior_for_another_shape_is_rebuilt(cached, tmp_path):
    cache = _copy(cached, tmp_path)
    wider = replace(TINY, unet_width=16)
    base, info = priors.load_or_build_prior(wider, cache)
    assert info["cached"] is False and "model shape" in info["rebuilt_because"]
    assert json.loads((base / "unet" / "config.json").read_text())["block_out_channels"][0] == 16


def test_diffusion_pretraining_lowers_the_diffusion_loss():
    """The prior's UNet learns to denoise: its loss on held-back latents falls well below the random UNet's."""
    from dmp_model.sd.tiny import build_tiny_components
    from training.objective import dmp_loss

    settings = replace(TINY, unet_steps=60, unet_batch=8, unet_lr=2e-3, unet_warmup=5)
    unet, _, text_encoder = build_tiny_components(0, unet_width=32, text_width=32)
    context = priors.empty_context(text_encoder)
    # Structured "latents": smooth random fields, as image latents are (white noise has nothing to learn).
    fields = torch.nn.functional.interpolate(torch.randn(64, 4, 2, 2, generator=torch.Generator().manual_seed(0)),
                                             size=(4, 4), mode="bilinear")
    fields = fields / fields.std() / 0.18215

    def held_back_loss() -> float:
        generator = torch.Generator().manual_seed(1)
        y = fields[:16] * 0.18215
        with torch.no_grad():
            return dmp_loss(unet, torch.randn(y.shape, generator=generator), y, context.expand(16, -1, -1),
                            priors.sd_alphas_cumprod(), settings.prediction_type, generator).item()

    before = held_back_loss()
    priors.pretrain_unet(unet, (fields, torch.zeros_like(fields)), context, settings, 0.18215)
    assert held_back_loss() < 0.85 * before  # an optimiser that does not step stays at the random loss
