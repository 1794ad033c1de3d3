"""Text conditioning: the cached empty-prompt embedding, and prompts when an adapter wants them.

`-notext` adapters condition on the embedding of "" only. It is one fixed [1, 77, D] tensor
(token ids 49406 then 49407 x 76 for SD 1.x), so it is computed once, kept, optionally cached on
disk, and the text encoder is released again: those adapters need neither tokenizer nor encoder
after the first run.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SD_START_TOKEN, SD_END_TOKEN, SD_CONTEXT_LENGTH = 49406, 49407, 77
TOKENIZER_HINT = (
    "pass tokenizer=<folder with vocab.json and merges.txt> (the tokenizer/ folder of any SD 1.x "
    "diffusers model, or ComfyUI's comfy/sd1_tokenizer), or pass prompt embeddings instead "
    "(e.g. ComfyUI's CLIP Text Encode output)")


def context_length(tokenizer) -> int:
    """Tokens per prompt: the tokenizer's limit, at most SD's 77 text positions.

    ComfyUI's own SD 1.x tokenizer (comfy/sd1_tokenizer) declares model_max_length 8192, because
    ComfyUI splits long prompts itself; padding to that would overflow the 77 positions.
    """
    return min(int(tokenizer.model_max_length), SD_CONTEXT_LENGTH)


def empty_prompt_ids(tokenizer=None, vocab_size: int = 49408) -> torch.Tensor:
    """Token ids of "" padded to the context length: [1, 77] (49406, then 49407 x 76 for SD 1.x).

    With a tokenizer this is exactly what the reference computes; without one the SD 1.x ids are
    used, which only fit a text encoder with SD's vocabulary.
    """
    if tokenizer is not None:
        return tokenizer([""], padding="max_length", max_length=context_length(tokenizer),
                         return_tensors="pt").input_ids
    if vocab_size <= SD_END_TOKEN:
        raise ValueError(f"the text encoder's vocabulary ({vocab_size} tokens) is not SD 1.x's; " + TOKENIZER_HINT)
    return torch.tensor([[SD_START_TOKEN] + [SD_END_TOKEN] * (SD_CONTEXT_LENGTH - 1)])


class TextConditioner:
    """Prompt embeddings for the UNet, loading the text encoder only when it is needed.

    Args:
        load_text_encoder: returns the CLIPTextModel (called lazily, at most once while kept).
        load_tokenizer: returns a tokenizer or None when there is none.
        device, dtype: where embeddings are computed and returned.
        cache_file: optional safetensors file caching the empty-prompt embedding across runs.
    """

    def __init__(self, load_text_encoder: Callable[[], torch.nn.Module], load_tokenizer: Callable[[], object],
                 device: torch.device, dtype: torch.dtype, cache_file: Path | None = None):
        self._load_text_encoder = load_text_encoder
        self._load_tokenizer = load_tokenizer
        self.device, self.dtype = device, dtype
        self.cache_file = cache_file
        self.text_encoder = None
        self._tokenizer, self._tokenizer_loaded = None, False
        self._empty: torch.Tensor | None = None

    @property
    def tokenizer(self):
        if not self._tokenizer_loaded:
            self._tokenizer, self._tokenizer_loaded = self._load_tokenizer(), True
        return self._tokenizer

    def _encoder(self) -> torch.nn.Module:
        if self.text_encoder is None:
            self.text_encoder = self._load_text_encoder().to(self.device, self.dtype).eval().requires_grad_(False)
        return self.text_encoder

    @torch.no_grad()
    def _encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self._encoder()(ids.to(self.device))[0]

    def empty_embedding(self) -> torch.Tensor:
        """The embedding of "" [1, 77, D], computed once (or read from the cache file)."""
        if self._empty is None:
            self._empty = self._read_cache()
        if self._empty is None:
            keep = self.text_encoder is not None
            try:
                ids = empty_prompt_ids(self.tokenizer, self._encoder().config.vocab_size)
                self._empty = self._encode_ids(ids)
            finally:
                if not keep:
                    self.release()
            self._write_cache()
        return self._empty.to(self.device, self.dtype)

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Embeddings [B, 77, D] of prompts, as diffusers' ``text_encoder(ids)[0]``."""
        if self.tokenizer is None:
            raise ValueError("a text prompt needs the CLIP tokenizer, and this base has none: " + TOKENIZER_HINT)
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=context_length(self.tokenizer),
                             truncation=True, return_tensors="pt").input_ids
        return self._encode_ids(ids).to(self.dtype)

    def release(self) -> None:
        """Drop the text encoder (it is loaded again if a prompt needs it)."""
        self.text_encoder = None

    def to(self, device: torch.device) -> None:
        self.device = device
        if self.text_encoder is not None:
            self.text_encoder.to(device)

    def _read_cache(self) -> torch.Tensor | None:
        if self.cache_file is None or not self.cache_file.is_file():
            return None
        from safetensors.torch import load_file

        try:
            return load_file(self.cache_file)["empty_prompt"]
        except Exception as err:  # a bad cache is recomputed, never fatal
            logger.warning("ignoring unreadable empty-prompt cache %s: %s", self.cache_file, err)
            return None

    def _write_cache(self) -> None:
        if self.cache_file is None:
            return
        from safetensors.torch import save_file

        from ..io.writers import atomic_path

        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.cache_file) as tmp:
            save_file({"empty_prompt": self._empty.detach().float().cpu().contiguous()}, str(tmp))


def cache_file_for(source: str | os.PathLike, cache_dir: str | os.PathLike | None) -> Path | None:
    """Where the empty-prompt embedding of a base is cached: keyed by its path, size and mtime."""
    if cache_dir is None:
        return None
    source = Path(source).resolve()
    stat_target = source / "text_encoder" if source.is_dir() else source
    stamps = [(p.name, p.stat().st_size, p.stat().st_mtime_ns)
              for p in ([stat_target] if stat_target.is_file() else sorted(stat_target.glob("*")))]
    digest = hashlib.sha256(repr((str(source), stamps)).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"empty_prompt_{digest}.safetensors"
