"""Row-protected low-rank pairs (notebook 06, beyond the papers): a projection whose massive rows (House of
Cards) stay exact while the other rows are factorised in feature space (SFSD), at the same parameter budget."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from common.core.layer_inputs import LayerInputs
from common.sfsd.budgets import Target, factor_params, targets, weight_of
from common.sfsd.decomposition import METHODS, Moments, decompose_target, gather_layer_moments
from common.sfsd.lowrank import LowRankLinear, check_rank


def layer_moments(model: nn.Module, calibration: torch.Tensor, layer: int, batch_size: int = 8,
                  exclude_first: bool = False) -> dict[str, tuple[Moments, str]]:
    """The statistics ``decompose_model`` gathers for the targets of ``layer`` ({path: (moments, side)},
    side "output" or "input"), kept so that parts of a module can be decomposed from them."""
    if calibration.ndim != 2 or calibration.shape[1] < 2:
        raise ValueError(f"calibration must be [N, T] windows with T >= 2, got shape {tuple(calibration.shape)}")
    inputs = LayerInputs(model, calibration, batch_size=batch_size, keep=[layer])
    return gather_layer_moments(dict(model.named_modules()), inputs, layer, targets(model, [layer]), exclude_first)


def _other_rows(rows: torch.Tensor, m: int) -> torch.Tensor:
    """The indices of [0, m) not in ``rows``, ascending, on ``rows``' device."""
    keep = torch.ones(m, dtype=torch.bool, device=rows.device)
    keep[rows] = False
    return keep.nonzero().flatten()


class RowProtectedLinear(nn.Module):
    """y[rows] = W[rows] x + b0[rows] exactly (``exact``); every other output row from a low-rank ``pair``
    (a ``LowRankLinear`` cut from those rows alone)."""
    def __init__(self, exact: nn.Linear, pair: LowRankLinear, rows: torch.Tensor, m: int):
        super().__init__()
        self.exact, self.pair, self.m = exact, pair, m
        self.register_buffer("rows", rows.clone(), persistent=False)
        self.register_buffer("rest", _other_rows(rows, m), persistent=False)

    @property
    def rank(self) -> int:
        return self.pair.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.new_empty(*x.shape[:-1], self.m)
        y[..., self.rest] = self.pair(x)
        y[..., self.rows] = self.exact(x)
        return y


def protected_rank(m: int, n: int, k: int, rank: int, bias: bool) -> int:
    """The largest rank r' at which k exact rows plus a rank-r' pair over the other m - k rows have no more
    parameters than the unprotected rank-``rank`` pair of the m x n module (the same budget)."""
    if not 0 < k < m:
        raise ValueError(f"k={k} protected rows must lie in [1, {m - 1}] for a {m} x {n} module")
    spare = factor_params(m, n, rank, bias) - k * n - (m if bias else 0)
    r = spare // (m - k + n)
    if r < 1:
        raise ValueError(f"rank {rank} leaves no budget for a pair after {k} exact rows of a {m} x {n} module "
                         f"({k * n:,} parameters): raise the rank or protect fewer rows")
    return r


def protected_factorised(module: nn.Module, moments: Moments, side: str, rows: Sequence[int], method: str,
                         rank: int) -> RowProtectedLinear:
    """Keep the output ``rows`` of ``module`` exact and decompose the others with ``method`` at ``rank``,
    from the module's calibration ``moments`` (``layer_moments``: input moments serve any row subset,
    output moments are restricted to the kept rows)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    w = weight_of(module).detach()
    m, n = w.shape
    idx = torch.as_tensor(sorted(set(int(r) for r in rows)), dtype=torch.long, device=w.device)
    if len(idx) != len(rows) or len(idx) == 0 or int(idx.min()) < 0 or int(idx.max()) >= m:
        raise ValueError(f"rows must be distinct indices in [0, {m}), got {list(rows)[:8]}")
    if len(idx) == m:
        raise ValueError(f"all {m} rows protected: nothing left to decompose (keep the module dense instead)")
    rest = _other_rows(idx, m)
    bias = module.bias.detach() if module.bias is not None else None

    def linear(weight: torch.Tensor, b: torch.Tensor | None) -> nn.Linear:
        lin = nn.Linear(n, len(weight), bias=b is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(weight)
            if b is not None:
                lin.bias.copy_(b)
        return lin

    sub = linear(w[rest], None if bias is None else bias[rest])
    sub_moments = moments if side == "input" else moments.subset(rest.to(moments.gram.device))
    d = decompose_target(Target(-1, "rest", "rest"), sub, sub_moments, side, rank)
    check_rank(d, rank)
    w1, w2, b = d.factors(sub, method, rank)
    return RowProtectedLinear(linear(w[idx], None if bias is None else bias[idx]),
                              LowRankLinear(w1, w2, b, w.dtype), idx, m)
