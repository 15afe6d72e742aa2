"""A compact pre-LN GPT in nanoGPT's style, the model Inheritune trains (arXiv 2404.08634 App. F.2, [code]
GPT2-experiments/model.py): GELU MLP, no biases, tied token embedding / LM head, learned positions, and the
authors' attention-logit scaling by 1 / (layer index + 1) (``scale_attn_by_inverse_layer_idx``, on by default).

Module names follow GPT-2 (``transformer.h[i].attn`` / ``.mlp.c_fc`` / ``.mlp.c_proj``), so ``common.core.arch``
(family ``nanogpt``), the capture hooks and the attention metrics work on it unchanged. ``transformer`` is the
backbone (ids -> final hidden states); ``GPT.forward`` adds the LM head and, given ``labels``, the loss.
Attention runs through ``scaled_dot_product_attention`` for training; ``set_attn_implementation("eager")``
switches to an explicit softmax whose probabilities each attention module returns (the analysis pass).
"""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from common.core.profiles import GPTConfig

ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(output, probabilities)``; the probabilities [B, H, T, T] only under eager attention."""
        b, t, d = x.shape
        h = self.cfg.n_head
        q, k, v = (z.view(b, t, h, d // h).transpose(1, 2) for z in self.c_attn(x).split(d, dim=2))
        scale = 1.0 / math.sqrt(d // h)
        if self.cfg.scale_attn_by_inverse_layer_idx:
            scale /= self.layer_idx + 1
        probs = None
        if self.cfg._attn_implementation == "eager":
            logits = (q @ k.transpose(-2, -1)) * scale
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
            probs = logits.masked_fill(mask, float("-inf")).softmax(-1)
            y = probs @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d)), probs


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=False)
        self.attn = CausalSelfAttention(cfg, layer_idx)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=False)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))[0]
        return x + self.mlp(self.ln_2(x))


class Body(nn.Module):
    """Token + position embeddings, the blocks, the final LayerNorm: ids [B, T] -> hidden [B, T, d]."""
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=False)

    def forward(self, input_ids: torch.Tensor, use_cache: bool | None = None) -> torch.Tensor:
        t = input_ids.shape[1]
        if t > self.cfg.block_size:
            raise ValueError(f"sequence of {t} tokens exceeds block_size={self.cfg.block_size}")
        x = self.wte(input_ids) + self.wpe(torch.arange(t, device=input_ids.device))
        for block in self.h:
            x = block(x)
        return self.ln_f(x)


class GPT(nn.Module):
    """nanoGPT with tied embeddings; ``forward(input_ids, labels=None)`` returns ``.logits`` (and ``.loss``)."""
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        cfg = self.config = replace(cfg)  # a private copy: the attention implementation is per model
        self.transformer = Body(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied (nanoGPT, GPT-2)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def set_attn_implementation(self, name: str) -> None:
        """``"sdpa"`` (fused, training) or ``"eager"`` (explicit softmax, returns the probabilities)."""
        if name not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"unknown attention implementation {name!r}; known: {', '.join(ATTN_IMPLEMENTATIONS)}")
        self.config._attn_implementation = name

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                use_cache: bool | None = None) -> SimpleNamespace:
        """Next-token logits [B, T, V]; with ``labels`` [B, T] (the targets, already shifted) also the mean
        cross-entropy ``loss``."""
        logits = self.lm_head(self.transformer(input_ids))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        return SimpleNamespace(logits=logits, loss=loss)

    def n_params(self) -> int:
        """Parameters, the tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())
