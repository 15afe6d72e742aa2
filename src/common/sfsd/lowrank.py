"""Factorised modules (SFSD §1.1): ``LowRankLinear`` pairs W2 (W1 x) + b built from a decomposition, swapped
into a model by restoring context managers (``swapped``, ``decomposed``), and the parameter shares they
keep (``model_share``, uniform budgets)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from common.sfsd.budgets import factor_params, param_count, rank_for, weight_of
from common.sfsd.decomposition import Decomposition


class LowRankLinear(nn.Module):
    """y = second(first(x)): a real factorised pair (r (m + n) parameters and MACs), not a dense matrix of
    lower rank."""
    def __init__(self, w1: torch.Tensor, w2: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        r, n = w1.shape
        m = w2.shape[0]
        self.first = nn.Linear(n, r, bias=False, device=w1.device, dtype=dtype)
        self.second = nn.Linear(r, m, bias=bias is not None, device=w1.device, dtype=dtype)
        with torch.no_grad():
            self.first.weight.copy_(w1)
            self.second.weight.copy_(w2)
            if bias is not None:
                self.second.bias.copy_(bias)

    @property
    def rank(self) -> int:
        return self.first.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


def check_rank(d: Decomposition, rank: int) -> None:
    """A factorised module above kappa has more parameters than the dense one: refuse it."""
    if not 1 <= rank <= d.kappa:
        raise ValueError(f"{d.target.path}: rank {rank} outside [1, kappa={d.kappa}]; above kappa the pair has "
                         f"more parameters than the dense {d.m} x {d.n} matrix (keep it dense instead)")


def factorised(model: nn.Module, d: Decomposition, method: str, rank: int) -> LowRankLinear:
    """The rank-``rank`` replacement of ``d``'s module in ``model``."""
    check_rank(d, rank)
    module = model.get_submodule(d.target.path)
    w1, w2, b = d.factors(module, method, rank)
    return LowRankLinear(w1, w2, b, weight_of(module).dtype)


@contextmanager
def swapped(model: nn.Module, replacements: dict[str, nn.Module | Callable[[], nn.Module]]) -> Iterator[nn.Module]:
    """Within the block, each module path of ``replacements`` is the given module (or what the callable
    builds, once the previous ones are in place); the original modules are put back afterwards (also on
    errors), untouched."""
    originals = {p: model.get_submodule(p) for p in replacements}
    try:
        for p, new in replacements.items():
            model.set_submodule(p, new() if callable(new) and not isinstance(new, nn.Module) else new)
        yield model
    finally:
        for p, module in originals.items():
            model.set_submodule(p, module)


def decomposed(model: nn.Module, decomps: dict[str, Decomposition], method: str,
               ranks: dict[str, int]):
    """Context: within the block, every module in ``ranks`` ({path: rank}) is its factorised pair; the
    dense modules are put back afterwards (also on errors), untouched."""
    unknown = [p for p in ranks if p not in decomps]
    if unknown:
        raise KeyError(f"no decomposition for {unknown[:3]}; decompose those layers first")
    return swapped(model, {p: (lambda p=p, r=r: factorised(model, decomps[p], method, r)) for p, r in ranks.items()})


def model_share(model: nn.Module, decomps: dict[str, Decomposition], ranks: dict[str, int], method: str = "feature") -> float:
    """Whole-model parameter share after replacing ``ranks``' modules (embeddings, head and norms included,
    §1.9), computed exactly from the shapes: the dense total minus each dense module plus its pair."""
    total = dense_param_count(model, decomps)
    after = total
    for p, r in ranks.items():
        d = decomps[p]
        after += factor_params(d.m, d.n, r, d.pair_has_bias(method)) - d.m * d.n - (d.m if d.has_bias else 0)
    return after / total


def dense_param_count(model: nn.Module, decomps: dict[str, Decomposition]) -> int:
    """``param_count`` of the dense model, also while some modules are factorised (``decomposed``)."""
    total = param_count(model)
    for p, d in decomps.items():
        module = model.get_submodule(p)
        if isinstance(module, LowRankLinear):
            total += d.m * d.n + (d.m if d.has_bias else 0) - sum(q.numel() for q in module.parameters())
    return total


def uniform_ranks(decomps: dict[str, Decomposition], pct: float, layers: Sequence[int]) -> dict[str, int]:
    """Rank pct% of kappa in every module of ``layers`` (the uniform budgets, D4)."""
    chosen = set(layers)
    missing = sorted(chosen - {d.target.layer for d in decomps.values()})
    if not chosen or missing:
        raise ValueError(f"layers {sorted(chosen)} must be non-empty and decomposed; no decompositions for {missing} "
                         "(decompose_model(..., layers=...) first, or pick decomposed layers)")
    return {p: rank_for(pct / 100, d.kappa) for p, d in decomps.items() if d.target.layer in chosen}
