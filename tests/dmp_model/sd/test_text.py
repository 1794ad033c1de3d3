"""Text conditioning: the empty-prompt embedding (computed once, cached, encoder released) and prompts."""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from dmp_model import DMPModel
from dmp_model.sd.text import TOKENIZER_HINT, TextConditioner, cache_file_for, empty_prompt_ids
from dmp_model.sd.tiny import tiny_text_encoder_config
from factories import write_official_adapter
from ldm_layout import write_single_file

SD_EMPTY_IDS = [49406] + [49407] * 76


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    return CLIPTokenizer.from_pretrained(tiny_base, subfolder="tokenizer")


@pytest.fixture(scope="module")
def encoder(tiny_base):
    return CLIPTextModel.from_pretrained(tiny_base, subfolder="text_encoder").eval()


class Loader:
    """Counts how often the text encoder is loaded; optionally refuses to."""

    def __init__(self, model=None, fail: bool = False):
        self.model, self.fail, self.calls = model, fail, 0

    def __call__(self):
        self.calls += 1
        if self.fail:
            raise AssertionError("the text encoder must not be loaded")
        return self.model


def conditioner(encoder_loader, tokenizer=None, cache_file=None) -> TextConditioner:
    return TextConditioner(encoder_loader, lambda: tokenizer, torch.device("cpu"), torch.float32, cache_file)


def test_empty_prompt_ids_with_and_without_tokenizer(tokenizer):
    assert empty_prompt_ids(tokenizer).tolist() == [SD_EMPTY_IDS]
    assert empty_prompt_ids().tolist() == [SD_EMPTY_IDS]
    assert empty_prompt_ids(None, vocab_size=49408).dtype == torch.int64


def test_small_vocabulary_without_tokenizer_is_refused_with_the_tokenizer_hint():
    with pytest.raises(ValueError, match=r"vocabulary \(1000 tokens\) is not SD 1.x's; pass tokenizer="):
        empty_prompt_ids(None, vocab_size=1000)
    small = CLIPTextModel(CLIPTextConfig(**{**tiny_text_encoder_config(), "vocab_size": 1000, "bos_token_id": 998,
                                             "eos_token_id": 999, "pad_token_id": 999})).eval()
    with pytest.raises(ValueError, match="tokenizer"):
        conditioner(Loader(small)).empty_embedding()


def test_empty_embedding_is_the_text_encoder_output_computed_once_and_the_encoder_released(encoder, tokenizer):
    loader = Loader(encoder)
    text = conditioner(loader, tokenizer)
    first = text.empty_embedding()
    with torch.no_grad():
        expected = encoder(torch.tensor([SD_EMPTY_IDS]))[0]
    assert first.shape == (1, 77, 32)
    # Exact by construction: the same encoder on the same ids of the same shape runs the same operations.
    torch.testing.assert_close(first, expected, atol=0, rtol=0)
    assert text.text_encoder is None  # released: a -notext adapter never needs it again
    torch.testing.assert_close(text.empty_embedding(), first, atol=0, rtol=0)  # the cached tensor itself
    assert loader.calls == 1


def test_without_tokenizer_the_fixed_ids_give_the_same_embedding(encoder, tokenizer):
    # Exact: the same ids either way, so the same encoder call.
    torch.testing.assert_close(conditioner(Loader(encoder)).empty_embedding(),
                               conditioner(Loader(encoder), tokenizer).empty_embedding(), atol=0, rtol=0)


def test_a_prompt_loads_the_encoder_and_keeps_it(encoder, tokenizer):
    loader = Loader(encoder)
    text = conditioner(loader, tokenizer)
    prompts = ["a bedroom", "a kitchen with a window"]
    embeddings = text.encode(prompts)
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():  # exact: the same encoder call on the same [2, 77] ids
        torch.testing.assert_close(embeddings, encoder(ids)[0], atol=0, rtol=0)
    assert text.text_encoder is encoder
    text.empty_embedding()  # the encoder was in use before: keep it
    text.encode(["another"])
    assert text.text_encoder is encoder and loader.calls == 1
    text.release()
    assert text.text_encoder is None
    text.encode(["again"])
    assert loader.calls == 2


def test_prompt_without_tokenizer_raises_the_hint(encoder):
    text = conditioner(Loader(encoder))
    with pytest.raises(ValueError, match="needs the CLIP tokenizer") as caught:
        text.encode(["a room"])
    assert TOKENIZER_HINT in str(caught.value)


def test_cache_file_serves_later_runs_without_any_text_encoder(encoder, tokenizer, tmp_path):
    cache = tmp_path / "cache" / "empty.safetensors"
    computed = conditioner(Loader(encoder), tokenizer, cache).empty_embedding()
    assert cache.is_file() and not list(cache.parent.glob(".*tmp*"))
    refusing = Loader(fail=True)
    cached = conditioner(refusing, cache_file=cache).empty_embedding()
    torch.testing.assert_close(cached, computed, atol=0, rtol=0)  # exact: read back from the file written
    assert refusing.calls == 0


def test_a_corrupt_cache_is_recomputed_with_a_warning_and_rewritten(encoder, tokenizer, tmp_path, caplog):
    cache = tmp_path / "empty.safetensors"
    cache.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    loader = Loader(encoder)
    with caplog.at_level(logging.WARNING, logger="dmp_model.sd.text"):
        embedding = conditioner(loader, tokenizer, cache).empty_embedding()
    assert loader.calls == 1
    assert any("ignoring unreadable empty-prompt cache" in r.getMessage() and str(cache) in r.getMessage()
               for r in caplog.records)
    torch.testing.assert_close(conditioner(Loader(fail=True), cache_file=cache).empty_embedding(), embedding)


def test_cache_file_for_follows_the_file(tmp_path, tiny_base):
    assert cache_file_for(tmp_path, None) is None
    model_file = tmp_path / "model.safetensors"
    model_file.write_bytes(b"x" * 10)
    first = cache_file_for(model_file, tmp_path / "cache")
    assert first.parent == tmp_path / "cache" and first.suffix == ".safetensors"
    assert cache_file_for(model_file, tmp_path / "cache") == first
    model_file.write_bytes(b"x" * 11)  # size changes
    second = cache_file_for(model_file, tmp_path / "cache")
    assert second != first
    stat = model_file.stat()
    os.utime(model_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))  # same size, newer
    assert cache_file_for(model_file, tmp_path / "cache") not in (first, second)
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"x" * 11)
    os.utime(other, ns=(stat.st_atime_ns, model_file.stat().st_mtime_ns))
    assert cache_file_for(other, tmp_path / "cache") != cache_file_for(model_file, tmp_path / "cache")
    # A diffusers folder is keyed by its text encoder files.
    folder = tmp_path / "base"
    shutil.copytree(tiny_base, folder)
    before = cache_file_for(folder, tmp_path / "cache")
    weights = next((folder / "text_encoder").glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 5_000_000_000))
    assert cache_file_for(folder, tmp_path / "cache") != before


def test_dmp_model_uses_the_cache_dir_between_instances(tiny_base, tmp_path, monkeypatch):
    first = DMPModel.from_pretrained(tiny_base, device="cpu", precision="fp32", cache_dir=tmp_path)
    embedding = first.text.empty_embedding()
    assert len(list(tmp_path.glob("empty_prompt_*.safetensors"))) == 1
    second = DMPModel.from_pretrained(tiny_base, device="cpu", precision="fp32", cache_dir=tmp_path)
    monkeypatch.setattr(second.text, "_load_text_encoder", Loader(fail=True))
    torch.testing.assert_close(second.text.empty_embedding(), embedding, atol=0, rtol=0)  # read from the cache


@pytest.fixture(scope="module")
def single_file_base(tiny_base, tmp_path_factory):
    """The tiny base as one .safetensors, and a config folder with no tokenizer (like the bundled one)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = tmp_path_factory.mktemp("text-single")
    parts = (UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet"),
             AutoencoderKL.from_pretrained(tiny_base, subfolder="vae"),
             CLIPTextModel.from_pretrained(tiny_base, subfolder="text_encoder"))
    path = write_single_file(folder / "tiny.safetensors", *parts)
    config = folder / "config"
    for source in tiny_base.rglob("*.json"):
        if source.parent.name != "tokenizer":
            (config / source.relative_to(tiny_base)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, config / source.relative_to(tiny_base))
    adapter = write_official_adapter(parts[0], folder / "depth-t-notext", seed=41)
    return path, config, adapter


def test_single_file_without_tokenizer_predicts_notext_and_refuses_prompts(single_file_base):
    path, config, adapter = single_file_base
    model = DMPModel.from_pretrained(path, device="cpu", precision="fp32", config=config)
    model.load_adapter(adapter, uses_prompts=True)
    assert model.text.tokenizer is None
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    raw = model.predict(image, processing_resolution=0).raw
    assert raw.shape == (1, 16, 16) and torch.isfinite(raw).all()
    with pytest.raises(ValueError, match="a text prompt needs the CLIP tokenizer") as caught:
        model.predict(image, processing_resolution=0, prompt="a bedroom")
    assert TOKENIZER_HINT in str(caught.value)


def test_a_tokenizer_folder_makes_prompts_work_with_a_single_file(single_file_base, tiny_base):
    path, config, adapter = single_file_base
    model = DMPModel.from_pretrained(path, device="cpu", precision="fp32", config=config,
                                     tokenizer=tiny_base / "tokenizer")
    reference = DMPModel.from_pretrained(tiny_base, device="cpu", precision="fp32")
    for each in (model, reference):
        each.load_adapter(adapter, uses_prompts=True)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    ours = model.predict(image, processing_resolution=0, prompt="a bedroom", return_latents=True)
    theirs = reference.predict(image, processing_resolution=0, prompt="a bedroom", return_latents=True)
    # Equal weights read from other files (other addresses): at most rounding differences, ~1e-7 of latents ~1.
    torch.testing.assert_close(ours.latents, theirs.latents, atol=1e-5, rtol=0)
    plain = reference.predict(image, processing_resolution=0, return_latents=True)
    assert not torch.allclose(plain.latents, theirs.latents, atol=1e-4)  # the prompt did change the result
