"""Evaluation: perplexity over fixed token windows (SunMA / HoC protocol, house_of_cards.md §1.2).

Perplexity = exp(total next-token NLL / number of predicted tokens) over all windows; each window is
scored independently (no carried context), and the first token of a window is never predicted.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """Perplexity of ``model`` on ``windows`` ([N, T] token ids), batched; logits are never kept whole."""
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [N, T] with T >= 2, got shape {tuple(windows.shape)}")
    dev = next(model.parameters()).device
    nll, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        ids = windows[start:start + batch_size].to(dev)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    return math.exp(nll / count)
