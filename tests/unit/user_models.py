"""Your own model in the tests (issue 23): directories as a user saves them (``save_pretrained``), and the
environment that names one, undone after the test (the registry entry and the per-process check included)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig

from common.core import models, user_model


def save_tiny_llama(path: Path, seed: int = 0) -> Path:
    """A tiny Llama (hidden 64, 4 layers, the byte vocabulary) with the planted massive weight of ``models.PLANT``
    (layer 1, channel 37, hidden dim 11, BOS dim 5), and the byte tokenizer, saved with save_pretrained."""
    cfg = LlamaConfig(vocab_size=models.TINY_VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    models.plant_massive_weight(model, layer=1, channel=37, hidden_dim=11, bos_dim=5)
    model.save_pretrained(path)
    models.byte_tokenizer().save_pretrained(path)
    return path


def save_config_only(path: Path, config: PretrainedConfig, tokenizer: bool = True) -> Path:
    """``config`` and a stand-in weight file (the checks never load it), with the byte tokenizer when asked."""
    config.save_pretrained(path)
    (path / "model.safetensors").write_bytes(b"not loaded by the checks")
    if tokenizer:
        models.byte_tokenizer().save_pretrained(path)
    return path


@contextmanager
def using(monkeypatch: pytest.MonkeyPatch, ref: Path | str, bos: str | None = None) -> Iterator[str]:
    """``REPRO_MODEL`` (and ``REPRO_MODEL_BOS``) naming ``ref`` for the block; yields the model's key. Afterwards the
    registry and the per-process check forget it."""
    monkeypatch.setenv(user_model.MODEL_ENV, str(ref))
    monkeypatch.setenv(user_model.BOS_ENV, bos or "")  # "": detected; set either way, so the test's end restores it
    user_model._checked.cache_clear()
    try:
        yield user_model.key_for(str(ref))
    finally:
        for key in [k for k in models.REGISTRY if k.startswith(user_model.PREFIX)]:
            del models.REGISTRY[key]
        user_model._checked.cache_clear()
