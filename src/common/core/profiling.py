"""Cost of the paper-scale runs (issue 9 §1): model FLOPs of a forward pass, the accelerator's peak, and one
timed perplexity pass with its tokens/s, peak accelerator memory and model-FLOPs utilisation (MFU).

MFU follows PaLM (Chowdhery et al. 2022, App. B) for a forward pass: ``2 N`` FLOPs a token for the ``N``
matmul parameters (every linear layer and the LM head; the embedding lookup is free) plus ``4 L d T`` for
attention's scores and weighted values at sequence length ``T`` (no causal discount), over the chip's dense
bf16 peak.
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from common.core import arch, evaluation

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "RTX 4090": 165.0}


def matmul_params(model: nn.Module) -> int:
    """Parameters that take part in a matmul: every ``nn.Linear`` / GPT-2 ``Conv1D`` weight once, the LM head
    included when it is tied to the embedding (the embedding lookup itself costs no FLOPs)."""
    weights = {id(m.weight): m.weight.numel() for m in model.modules()
               if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}
    return sum(weights.values())


def forward_flops(model: nn.Module, seq_len: int) -> float:
    """Model FLOPs of one forward token at sequence length ``seq_len``: ``2 N + 4 L d T`` (module docstring)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    n_layers, width = len(arch.layers(model)), model.config.get_text_config().hidden_size
    return 2.0 * matmul_params(model) + 4.0 * n_layers * width * seq_len


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s (``REPRO_PEAK_TFLOPS`` wins); None on CPU or an unknown chip."""
    if os.environ.get("REPRO_PEAK_TFLOPS"):
        return float(os.environ["REPRO_PEAK_TFLOPS"]) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for chip, tf in PEAK_BF16_TFLOPS.items() if chip in name), None)


def perplexity_pass(model: nn.Module, windows: torch.Tensor, batch_size: int) -> dict:
    """Time ``evaluation.perplexity`` over ``windows`` ([N, T]) after one warm-up batch: perplexity, tokens/s,
    peak accelerator memory (MB; None on CPU) and MFU (None where the peak is unknown)."""
    dev = next(model.parameters()).device
    evaluation.perplexity(model, windows[:batch_size], batch_size)  # warm-up: kernels, allocator
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    start = time.perf_counter()
    ppl = evaluation.perplexity(model, windows, batch_size)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - start
    tokens = windows.numel()
    achieved = forward_flops(model, windows.shape[1]) * tokens / seconds
    peak = peak_flops(dev)
    return {"perplexity": ppl, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "peak_mem_mb": torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None,
            "tflops": achieved / 1e12, "mfu": achieved / peak if peak else None}
