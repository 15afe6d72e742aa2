"""Budgets and targets of SFSD (§1.1). kappa = floor(mn / (m + n)) is the break-even rank (§1.1); rank pct% of kappa keeps pct% of a
module's parameters.
Targets are every linear projection of a decoder layer, read through ``arch``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common.core import arch

PCTS = (100, 90, 80, 70, 60, 50)  # DESIGN §9 uniform budgets: rank = pct% of kappa


def kappa(m: int, n: int) -> int:
    """Break-even rank floor(mn / (m + n)): a rank-kappa pair has the dense module's parameter count (§1.1)."""
    if m < 1 or n < 1:
        raise ValueError(f"matrix dimensions must be positive, got {m} x {n}")
    return (m * n) // (m + n)


def rank_grid(k: int) -> list[int]:
    """The search grid {1, floor(0.1 k), ..., k} exactly as the reference builds it (numpy int32 of
    arange(0.1, 1.1, 0.1) x k), duplicates removed for tiny k."""
    if k < 1:
        raise ValueError(f"kappa must be >= 1, got {k}")
    grid = [1, *(np.arange(0.1, 1.1, 0.1) * k).astype(np.int32).tolist()]
    return sorted({max(1, int(r)) for r in grid})


def rank_for(budget: float, k: int) -> int:
    """Rank that keeps ``budget`` (a fraction in (0, 1]) of a module's parameters: max(1, floor(budget k))."""
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget {budget} must be a fraction in (0, 1] (pct / 100), e.g. 0.8 for 80%")
    if k < 1:
        raise ValueError(f"kappa={k}: a module's break-even rank is >= 1 (lowrank.kappa(m, n))")
    return max(1, math.floor(budget * k + 1e-9))


def factor_params(m: int, n: int, r: int, bias: bool) -> int:
    """Parameters of a rank-r pair: r (m + n), plus m for an output bias."""
    return r * (m + n) + (m if bias else 0)


def param_count(model: nn.Module) -> int:
    """Unique parameters of ``model`` (tied embeddings counted once), the paper's budget denominator (§1.9)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _is_projection(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


@dataclass(frozen=True)
class Target:
    """One decomposable projection: layer ``layer``, ``name`` relative to the layer ("self_attn.q_proj"),
    ``path`` relative to the model."""
    layer: int
    name: str
    path: str

    @property
    def kind(self) -> str:
        """Short label: "q_proj" -> "q", GPT-2 "attn.c_proj" stays whole."""
        last = self.name.rsplit(".", 1)[-1]
        return last.removesuffix("_proj") if last.endswith("_proj") and not last.startswith("c_") else self.name


def targets(model: nn.Module, layers: Sequence[int] | None = None) -> list[Target]:
    """Every linear projection of the decoder layers (attention and FFN; not embeddings, norms or the LM
    head, §1.4), in model order: layer ascending, then the order ``named_modules`` gives (q, k, v, o, gate,
    up, down for LLaMA)."""
    stack = arch.layers(model)
    prefix = _path_of(model, stack)
    chosen = range(len(stack)) if layers is None else layers
    bad = [i for i in chosen if not 0 <= i < len(stack)]
    if bad:
        raise ValueError(f"layers {bad} are outside the model's {len(stack)} layers; pick 0 <= layer < {len(stack)}")
    out = []
    for i in chosen:
        for name, module in stack[i].named_modules():
            if name and _is_projection(module):
                out.append(Target(i, name, f"{prefix}.{i}.{name}"))
    return out


def _path_of(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise ValueError("module is not part of the model")


def weight_of(module: nn.Module) -> torch.Tensor:
    """The projection's weight in ``nn.Linear`` layout [out, in] (GPT-2 ``Conv1D`` stores its transpose)."""
    w = module.weight
    return w.T if type(module).__name__ == "Conv1D" else w


def protected_layers(n_layers: int) -> int:
    """Leading layers every search leaves dense: round(L / 8) (the paper: 4 of 32, module index < 28)."""
    if n_layers < 1:
        raise ValueError(f"n_layers={n_layers}: a model has at least one layer")
    return max(1, round(n_layers / 8))
