"""The small dmp_model helpers the node pack added: memory estimate, class shares, prompt length."""

from __future__ import annotations

import json

import pytest
import torch

from dmp_model.loading import estimate_base_bytes
from dmp_model.palettes import class_fractions
from dmp_model.text import SD_CONTEXT_LENGTH, context_length, empty_prompt_ids
from dmp_model.tiny import build_tiny_components, save_tiny_sd, write_tiny_tokenizer


def _bytes(*modules, itemsize=4):
    return sum(p.numel() * itemsize for m in modules for p in m.state_dict().values())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    components = build_tiny_components(seed=0)
    return components, save_tiny_sd(tmp_path_factory.mktemp("tiny") / "base", components=components)


def test_estimate_counts_unet_and_vae_of_a_diffusers_folder(tiny):
    (unet, vae, _text), folder = tiny
    assert estimate_base_bytes(folder, "fp32") == _bytes(unet, vae)
    assert estimate_base_bytes(folder, "fp16") == _bytes(unet, vae, itemsize=2)
    assert estimate_base_bytes(folder, "auto") == _bytes(unet, vae)
    assert estimate_base_bytes(folder / "absent") == 0
    with pytest.raises(ValueError, match="precision must be one of"):
        estimate_base_bytes(folder, "int8")


def test_estimate_of_a_single_file_leaves_out_the_text_encoder(tiny, tmp_path):
    from ldm_layout import write_single_file

    (unet, vae, text), _folder = tiny
    file = write_single_file(tmp_path / "sd.safetensors", unet, vae, text, dtype=torch.float16)
    assert estimate_base_bytes(file, "bf16") == _bytes(unet, vae, itemsize=2)
    pickled = write_single_file(tmp_path / "sd.ckpt", unet, vae, text)
    assert estimate_base_bytes(pickled) == pickled.stat().st_size  # an upper bound without unpickling


def test_class_fractions_largest_first():
    ids = torch.tensor([[[5, 5, 0], [5, 149, 0]], [[5, 5, 5], [0, 0, 149]]])
    assert class_fractions(ids) == [(5, 0.5), (0, 1 / 3), (149, 1 / 6)]
    assert class_fractions(torch.zeros(1, 0, 3, dtype=torch.int64)) == []
    with pytest.raises(ValueError, match="class ids in 0..149"):
        class_fractions(torch.tensor([[[150]]]))


def test_prompts_fit_77_positions_with_comfyuis_tokenizer(tmp_path):
    """ComfyUI's comfy/sd1_tokenizer declares model_max_length 8192; prompts must still be 77 long."""
    from transformers import CLIPTokenizer

    folder = write_tiny_tokenizer(tmp_path / "tokenizer")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 8192}))
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    assert tokenizer.model_max_length == 8192 and context_length(tokenizer) == SD_CONTEXT_LENGTH
    ids = empty_prompt_ids(tokenizer)
    assert ids.shape == (1, 77) and ids[0, :2].tolist() == [49406, 49407]
