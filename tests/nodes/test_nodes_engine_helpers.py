"""The small dmp_model helpers the node pack added: class shares, prompt length."""

from __future__ import annotations

import json

import pytest
import torch

from dmp_model.sd.text import SD_CONTEXT_LENGTH, context_length, empty_prompt_ids
from dmp_model.sd.tiny import write_tiny_tokenizer
from dmp_model.tasks.palettes import class_fractions


def test_class_fractions_largest_first():
    ids = torch.tensor([[[5, 5, 0], [5, 149, 0]], [[5, 5, 5], [0, 0, 149]]])
    # Exact: Python divides integer counts, and 4 / 12 and 1 / 3 round the same rational number alike.
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
