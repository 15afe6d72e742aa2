"""The surgical rank searches of SFSD (§1.7-1.8).

The surgical search (§1.7-1.8) visits modules back to front, leaves the first
``protected`` layers dense (the paper skips 4 of 32) and keeps, per module, the smallest grid rank whose
perplexity stays within base x t^m (m = modules visited) or whose task accuracy does not drop (max over
chunks); candidates are scored from cached layer inputs, re-running only the layers from the changed
module onward.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from common.core import progress
from common.core.cache import tensor_digest
from common.core.env import write_json_atomic
from common.core.evaluation import MultipleChoice
from common.core.layer_inputs import LayerInputs
from common.sfsd.budgets import Target, protected_layers, rank_grid
from common.sfsd.decomposition import Decomposition, decomposition_digest
from common.sfsd.lowrank import decomposed, model_share

TOLERANCE = 1.005  # per-module perplexity tolerance of the released perplexity search (§1.8, D8)


@dataclass
class SearchState:
    """A search's decisions so far, saved after every module (``path``), so an interrupted search resumes.
    ``steps``: one dict per visited module, back to front: path, layer, kind, rank (None = kept dense),
    tried ({rank: score}), share (whole-model parameter share after the decision), bound."""
    criterion: str
    method: str
    settings: dict
    base: dict
    steps: list[dict] = field(default_factory=list)

    @property
    def ranks(self) -> dict[str, int]:
        return {s["path"]: s["rank"] for s in self.steps if s["rank"] is not None}

    def save(self, path: Path | None) -> None:
        if path is not None:
            write_json_atomic(path, {"criterion": self.criterion, "method": self.method, "settings": self.settings,
                                     "base": self.base, "steps": self.steps})

    @classmethod
    def load(cls, path: Path | None, criterion: str, method: str, settings: dict) -> SearchState | None:
        if path is None or not path.exists():
            return None
        raw = json.loads(path.read_text())
        if (raw["criterion"], raw["method"], raw["settings"]) != (criterion, method, settings):
            raise ValueError(f"{path} holds a search with other settings ({raw['settings']}); delete it or use "
                             "another path")
        return cls(**raw)


#: Bump when what a ``Decomposition`` holds, or how factors are cut from it, changes (part of every digest).
def search_order(decomps: dict[str, Decomposition], protected: int) -> list[Target]:
    """Modules back to front (last layer's last module first), skipping the first ``protected`` layers."""
    if protected < 0:
        raise ValueError(f"protected must be >= 0, got {protected}")
    return [d.target for d in reversed(list(decomps.values())) if d.target.layer >= protected]


def _smallest_passing(grid: list[int], passes: Callable[[int], bool], scan: str) -> int | None:
    """Smallest rank of ``grid[:-1]`` that passes (the last entry, kappa, saves nothing), or None.
    ``linear``: ascending scan, the reference protocol. ``bisect``: assumes the criterion is monotone in
    the rank; checks 0.9 kappa first, then bisects (about 4 evaluations instead of up to 10)."""
    candidates = grid[:-1]
    if scan == "linear":
        return next((r for r in candidates if passes(r)), None)
    if scan != "bisect":
        raise ValueError(f"scan must be 'linear' or 'bisect', got {scan!r}")
    if not candidates or not passes(candidates[-1]):
        return None
    lo, hi = 0, len(candidates) - 1  # candidates[hi] passes
    while lo < hi:
        mid = (lo + hi) // 2
        if passes(candidates[mid]):
            hi = mid
        else:
            lo = mid + 1
    return candidates[hi]


def _run_search(model: nn.Module, decomps: dict[str, Decomposition], method: str, order: list[Target],
                state: SearchState, decide: Callable[[Target, int, dict[str, int]], tuple[int | None, dict, float]],
                state_path: Path | None) -> SearchState:
    done = {s["path"] for s in state.steps}
    for m, t in enumerate(order, start=1):
        if t.path in done:
            continue
        rank, tried, bound = decide(t, m, state.ranks)
        ranks = {**state.ranks, **({t.path: rank} if rank is not None else {})}
        state.steps.append({"path": t.path, "layer": t.layer, "kind": t.kind, "rank": rank,
                            "kappa": decomps[t.path].kappa, "tried": tried, "bound": bound,
                            "share": model_share(model, decomps, ranks, method)})
        state.save(state_path)
        progress.report(f"SFSD {method} search (modules)", m, len(order))
    return state


def perplexity_search(model: nn.Module, decomps: dict[str, Decomposition], inputs: LayerInputs,
                      method: str = "feature", tolerance: float = TOLERANCE, protected: int | None = None,
                      scan: str = "linear", cached_prefix: bool = True, state_path: Path | None = None) -> SearchState:
    """The perplexity-driven surgical search (§1.8): for the m-th module visited (back to front), the
    smallest grid rank with ppl <= base x tolerance^m on ``inputs`` (the search split), else dense.

    ``cached_prefix``: score a candidate of layer l from the cached inputs of layer l (False: re-run the
    whole model, the reference's cost; same decisions). ``state_path``: JSON saved after every module;
    a later call with the same settings resumes there."""
    if not tolerance >= 1.0:
        raise ValueError(f"tolerance {tolerance} must be >= 1 (a per-module perplexity factor, e.g. 1.005)")
    protected = protected_layers(inputs.n_layers) if protected is None else protected
    settings = {"tolerance": tolerance, "protected": protected, "scan": scan, "windows": tensor_digest(inputs.ids),
                "decompositions": decomposition_digest(decomps)}
    state = SearchState.load(state_path, "perplexity", method, settings)
    if state is None:
        state = SearchState("perplexity", method, settings, {"ppl": inputs.perplexity(0)})
    base = state.base["ppl"]

    def decide(t: Target, m: int, ranks: dict[str, int]):
        bound = base * tolerance ** m
        tried: dict[str, float] = {}
        start = t.layer if cached_prefix else 0

        def passes(r: int) -> bool:
            with decomposed(model, decomps, method, {**ranks, t.path: r}):
                tried[str(r)] = inputs.perplexity(start)
            return tried[str(r)] <= bound

        return _smallest_passing(rank_grid(decomps[t.path].kappa), passes, scan), tried, bound

    return _run_search(model, decomps, method, search_order(decomps, protected), state, decide, state_path)


def task_search(model: nn.Module, decomps: dict[str, Decomposition], chunks: Sequence[MultipleChoice],
                split: MultipleChoice, method: str = "feature", delta: float = 0.0, protected: int | None = None,
                layers: Sequence[int] | None = None, scan: str = "linear",
                state_path: Path | None = None) -> SearchState:
    """The task-specific surgical search (§1.7): per module, on each chunk the smallest grid rank whose
    accuracy is >= the dense chunk accuracy - ``delta`` (none: kappa); the module takes the max over
    chunks, and is kept only if that rank < kappa and the accuracy on the whole search ``split`` stays >=
    its dense value - ``delta``. ``layers``: search only these layers (default: all unprotected)."""
    if not chunks:
        raise ValueError("task_search needs at least one chunk (lowrank_eval.task_splits(...).chunks)")
    n_layers = split.inputs.n_layers
    protected = protected_layers(n_layers) if protected is None else protected
    settings = {"delta": delta, "protected": protected, "scan": scan, "layers": None if layers is None else list(layers),
                "chunks": [tensor_digest(c.inputs.ids) for c in chunks], "split": tensor_digest(split.inputs.ids),
                "decompositions": decomposition_digest(decomps)}
    state = SearchState.load(state_path, "task", method, settings)
    if state is None:
        state = SearchState("task", method, settings,
                            {"chunks": [c.accuracy(0) for c in chunks], "split": split.accuracy(0)})
    order = [t for t in search_order(decomps, protected) if layers is None or t.layer in set(layers)]

    def decide(t: Target, m: int, ranks: dict[str, int]):
        k = decomps[t.path].kappa
        grid, tried, chosen = rank_grid(k), {}, []
        for i, chunk in enumerate(chunks):
            def passes(r: int, i=i, chunk=chunk) -> bool:
                with decomposed(model, decomps, method, {**ranks, t.path: r}):
                    tried[f"{i}:{r}"] = chunk.accuracy(t.layer)
                return tried[f"{i}:{r}"] >= state.base["chunks"][i] - delta - 1e-12

            chosen.append(_smallest_passing(grid, passes, scan) or k)
            if max(chosen) == k:
                break
        rank = max(chosen)
        if rank == k:
            return None, tried, state.base["split"] - delta
        with decomposed(model, decomps, method, {**ranks, t.path: rank}):
            tried[f"split:{rank}"] = split.accuracy(t.layer)
        keep = tried[f"split:{rank}"] >= state.base["split"] - delta - 1e-12
        return (rank if keep else None), tried, state.base["split"] - delta

    return _run_search(model, decomps, method, order, state, decide, state_path)
