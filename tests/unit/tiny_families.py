"""Tiny random models of every buildable ``common.core.arch`` family, and the helpers the unit tests share."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
)

#: Families of ``common.core.arch.FAMILIES`` that can be built as a plain causal LM here.
#: ("gemma3" is the multimodal Gemma3ForConditionalGeneration, whose layers sit under
#: model.language_model: the table's "model"/"layers" paths do not reach them, so it is not built here.)
FAMILY_NAMES = ("llama", "mistral", "qwen2", "gemma", "gemma3_text", "gemma2", "phi3", "gpt2")

#: More decoder families (issue 23), from the table (Llama-style, GPT-NeoX / Falcon / BLOOM ``dense_h_to_4h``,
#: OPT's ``fc1/fc2`` in the layer, Phi, GPT-J, StarCoder2, GPTBigCode) and two the table does not list, whose
#: layout ``arch`` infers from their modules (``INFERRED``).
MORE_FAMILIES = ("qwen3", "olmo2", "granite", "cohere", "gpt_neox", "falcon", "bloom", "opt", "phi", "gptj",
                 "starcoder2", "gpt_bigcode")
INFERRED = ("helium", "seed_oss")
ALL_FAMILIES = (*FAMILY_NAMES, *MORE_FAMILIES, *INFERRED)

HIDDEN, INTER, N_LAYERS, VOCAB = 32, 48, 2, 64

#: Config arguments of the families whose configs do not take Llama's names.
_OWN_NAMES = {
    "gpt_neox": dict(hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=2, max_position_embeddings=64),
    "falcon": dict(hidden_size=HIDDEN, num_attention_heads=2, num_kv_heads=2, ffn_hidden_size=INTER),
    "bloom": dict(hidden_size=HIDDEN, n_head=2),
    "opt": dict(hidden_size=HIDDEN, ffn_dim=INTER, num_attention_heads=2, word_embed_proj_dim=HIDDEN,
                max_position_embeddings=64),
    "gptj": dict(n_embd=HIDDEN, n_head=2, rotary_dim=8, n_positions=64, n_inner=INTER),
    "gpt_bigcode": dict(n_embd=HIDDEN, n_head=2, n_positions=64, n_inner=INTER),
}


def tiny_config(family: str) -> PretrainedConfig:
    """A 2-layer config of ``family`` with hidden 32 and intermediate 48 (GPT-2: 4*32 = 128)."""
    base = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=N_LAYERS,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        return LlamaConfig(**base)
    if family == "mistral":
        return MistralConfig(**base)
    if family == "qwen2":
        return Qwen2Config(**base)
    if family == "gemma":
        return GemmaConfig(**base, head_dim=16)
    if family == "gemma3_text":
        return Gemma3TextConfig(**base, head_dim=16, sliding_window=8)
    if family == "gemma2":
        return Gemma2Config(**base, head_dim=16, sliding_window=8)
    if family == "phi3":
        return Phi3Config(**base)
    if family == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=N_LAYERS, n_head=2, n_positions=64,
                          bos_token_id=1, eos_token_id=2)
    if family in _OWN_NAMES:
        return AutoConfig.for_model(family, vocab_size=VOCAB, num_hidden_layers=N_LAYERS, n_layer=N_LAYERS,
                                    bos_token_id=1, eos_token_id=2, pad_token_id=0, **_OWN_NAMES[family])
    if family in (*MORE_FAMILIES, *INFERRED):
        return AutoConfig.for_model(family, **base, head_dim=16)
    raise KeyError(family)


def build_tiny(family: str, seed: int = 0) -> PreTrainedModel:
    """A seeded random tiny model of ``family`` in eval mode (fp32, CPU)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(family))
    return model.eval()


def hooked_forward(model: torch.nn.Module, ids: torch.Tensor, register) -> None:
    """One no-grad forward of ``model`` on ``ids`` with the hooks ``register()`` returns (a list of handles),
    removed afterwards, also on errors (the tests' own capture, independent of ``common.core.capture``)."""
    handles = register()
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()


@contextmanager
def single_thread() -> Iterator[None]:
    """One torch thread inside the block (conftest's ``one_thread`` fixture; module fixtures, which run
    outside it, use this directly)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def sharpen(model: nn.Module) -> nn.Module:
    """Scale every decoder linear by 10 and the LM head by 30, in place: a random model with peaked
    predictions, so rank cuts move its perplexity (the search tests' model)."""
    from common.core import arch

    for layer in arch.layers(model):
        for m in layer.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(10)
    model.lm_head.weight.mul_(30)
    return model
