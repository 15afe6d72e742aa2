"""Notebook 05's experiments on top of ``common.lowrank``: cached decompositions per model, the uniform-budget
table (SFSD Table A), the task splits of the task search (§1.7), the evaluation-noise reading that sizes the
search split, the mean-compensation diagnosis, and the paper's reference numbers (research sfsd.md §3)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common import lowrank, tasks
from common.cache import CACHE_VERSION, cached, tensor_digest
from common.config import cache_dir
from common.evaluation import average_accuracy
from common.manifest import record
from common.models import weights_id

#: Bump when the statistics or decompositions change meaning (invalidates the per-layer safetensors).
STATS_VERSION = 3

#: SFSD Table A (README; LLaMA-7B, 0-shot, 6-task average): dense and both methods at 5.4B (80%) and 3.4B (50%).
TABLE_A = {"dense": 69.61, ("feature", 80): 64.85, ("weight_svd", 80): 50.41, ("feature", 50): 47.26,
           ("weight_svd", 50): 41.04}


def decomposition_dir(key: str, model: nn.Module, calibration: torch.Tensor, layers: list[int],
                      exclude_first: bool = False) -> Path:
    """Content-addressed home of a model's per-layer decompositions (safetensors): weights and the dtype they
    were loaded in (notebook 05 runs a paper model in bf16, notebook 06 in fp32: different statistics),
    calibration tokens, layers, variant and the cache version."""
    dtype = next(model.parameters()).dtype
    tag = (f"{weights_id(key)}|{dtype}|{tensor_digest(calibration)}|{layers}|{exclude_first}|{CACHE_VERSION}|"
           f"{STATS_VERSION}")
    import hashlib

    return cache_dir() / "lowrank" / f"{key}-{hashlib.sha256(tag.encode()).hexdigest()[:16]}"


@dataclass
class Suite:
    """Zero-shot multiple-choice tasks scored from cached layer inputs (``lowrank.MultipleChoice``)."""

    tasks: dict[str, lowrank.MultipleChoice]

    def evaluate(self, start: int = 0, seed: int = 0) -> dict:
        """``evaluation.average_accuracy`` over the tasks: mean accuracy, bootstrap ci95 and chance."""
        per_task = {}
        for name, mc in self.tasks.items():
            correct = mc.correct(start)
            per_task[name] = {"acc": sum(correct) / len(correct), "correct": correct,
                              "chance": tasks.chance_level(name, mc.docs)}
        return average_accuracy(per_task, seed=seed)


def suite(model: nn.Module, tok, key: str, names: tuple[str, ...], n_items: int | None, seed: int = 0,
          batch_size: int = 16, keep: str | list[int] = "all") -> Suite:
    """Zero-shot tasks, local or the paper's (``n_items`` docs each; None: every doc of a paper task), with
    lm-eval's requests (``tasks.requests``) and the inputs of the layers in ``keep`` cached
    (``Suite.evaluate(start)`` needs ``start`` among them)."""
    return Suite({n: lowrank.multiple_choice(model, tok, key, tasks.requests(n, n_items, seed), tasks.metric(n),
                                             batch_size, keep=keep)
                  for n in names})


def uniform_table(model: nn.Module, key: str, decomps: dict[str, lowrank.Decomposition], windows: lowrank.LayerInputs,
                  zero_shot: Suite | None, methods: tuple[str, ...], pcts: tuple[int, ...], protected: int,
                  seed: int = 0):
    """SFSD Table A on ``model``: perplexity and zero-shot accuracy at rank pct% of kappa in every module of
    the unprotected layers, per method, plus the dense row (method "dense", pct 100). Each cell is cached."""
    import pandas as pd

    layers = sorted({d.target.layer for d in decomps.values() if d.target.layer >= protected})
    docs = {n: mc.docs for n, mc in zero_shot.tasks.items()} if zero_shot else {}
    base_key = {"model": weights_id(key), "decompositions": lowrank.decomposition_digest(decomps),
                "windows": tensor_digest(windows.ids), "layers": layers,
                "tasks": {n: len(d) for n, d in docs.items()}, "task_digest": _docs_digest(docs), "seed": seed}

    def cell(method: str, pct: int) -> dict:
        def compute() -> dict:
            ranks = {} if method == "dense" else lowrank.uniform_ranks(decomps, pct, layers)
            with lowrank.decomposed(model, decomps, "feature" if method == "dense" else method, ranks):
                out = {"ppl": windows.perplexity(protected), "share": lowrank.model_share(model, decomps, ranks, method),
                       "params": lowrank.param_count(model)}
                if zero_shot:
                    acc = zero_shot.evaluate(protected, seed)
                    out.update(acc=acc["acc"], ci95=acc["ci95"], chance=acc["chance"])
            return out
        return cached("lowrank_uniform", {**base_key, "method": method, "pct": pct}, compute)

    rows = [{"method": "dense", "pct": 100, **cell("dense", 100)}]
    rows += [{"method": m, "pct": p, **cell(m, p)} for m in methods for p in pcts]
    return pd.DataFrame(rows)


def _docs_digest(docs: dict[str, list[dict]]) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(docs, sort_keys=True).encode()).hexdigest()[:16]


def record_uniform(key: str, frame, tasks_note: str) -> None:
    """DESIGN §9 keys: ``M/lowrank/<method>/<pct>/ppl|acc`` and ``M/lowrank/<pct>/whole_model_pct``."""
    dense = frame[frame.method == "dense"].iloc[0]
    record(f"{key}/lowrank/dense/ppl", dense.ppl, paper=12.33, paper_ref="SFSD README (LLaMA-7B, WikiText-2 seq 128)")
    if "acc" in frame:
        record(f"{key}/lowrank/dense/acc", dense.acc, ci95=dense.ci95, paper=TABLE_A["dense"] / 100,
               paper_ref="SFSD Table A (LLaMA-7B, 6-task average)", note=tasks_note)
    for row in frame[frame.method != "dense"].itertuples():
        paper = TABLE_A.get((row.method, row.pct))
        ref = "SFSD Table A (LLaMA-7B)" if paper is not None else None
        record(f"{key}/lowrank/{row.method}/{row.pct}/ppl", row.ppl, note="held-out wiki windows")
        if "acc" in frame:
            record(f"{key}/lowrank/{row.method}/{row.pct}/acc", row.acc, ci95=row.ci95,
                   paper=None if paper is None else paper / 100, paper_ref=ref, note=tasks_note)
    for pct, share in frame[frame.method == "feature"].set_index("pct").share.items():
        record(f"{key}/lowrank/{pct}/whole_model_pct", 100 * share,
               note="whole-model parameter share (%) with the feature method's m-vector bias per module")
    cells = frame.set_index(["method", "pct"])
    for pct in sorted({p for m, p in cells.index if m == "feature"}):
        for other in ("weight_svd", "feature_nomean", "feature_uncentred"):
            if (other, pct) in cells.index:
                record(f"{key}/lowrank/{pct}/{other}_over_feature_ppl", cells.loc[(other, pct), "ppl"] / cells.loc[("feature", pct), "ppl"],
                       note=f"perplexity ratio at rank {pct}% of kappa")
        if "acc" in frame and ("weight_svd", pct) in cells.index:
            record(f"{key}/lowrank/{pct}/feature_minus_svd_acc", cells.loc[("feature", pct), "acc"] - cells.loc[("weight_svd", pct), "acc"],
                   paper=None if pct not in (80, 50) else (TABLE_A[("feature", pct)] - TABLE_A[("weight_svd", pct)]) / 100,
                   paper_ref="SFSD Table A (LLaMA-7B)" if pct in (80, 50) else None)
    pairs = [(cells.loc[("feature", p), "acc"], cells.loc[("weight_svd", p), "acc"]) for m, p in cells.index
             if m == "feature" and ("weight_svd", p) in cells.index] if "acc" in frame else []
    if pairs:
        record(f"{key}/lowrank/feature_minus_svd_acc_mean", float(np.mean([f - w for f, w in pairs])),
               note=f"mean over the {len(pairs)} uniform budgets of the accuracy difference")


# ------------------------------------------------------------------------------ task search splits


@dataclass
class TaskSplits:
    """§1.7 splits of a task's docs shuffled with seed 42: ``chunks`` (3 x floor(chunk N)), ``search``
    (the first floor(0.2 N)) and ``test`` (the rest)."""

    chunks: list[list[dict]]
    search: list[dict]
    test: list[dict]


def task_splits(docs: list[dict], chunk: float = 0.0666, n_chunks: int = 3, search: float = 0.2,
                seed: int = 42) -> TaskSplits:
    """Shuffle (``random.Random(seed)``, as the reference's lm-eval fork) and cut; the chunks lie inside
    the search split and the test split is disjoint from both (research §6.1 check 5)."""
    if not (0 < chunk and 0 < search < 1 and n_chunks >= 1 and chunk * n_chunks <= search + 1e-9):
        raise ValueError(f"need 0 < {n_chunks} x chunk ({chunk}) <= search ({search}) < 1")
    docs = list(docs)
    random.Random(seed).shuffle(docs)
    n = len(docs)
    size, cut = math.floor(chunk * n + 1e-9), math.floor(search * n + 1e-9)
    if size < 1:
        raise ValueError(f"{n} docs give empty chunks of {chunk:.3f} N; use more docs")
    return TaskSplits([docs[i * size:(i + 1) * size] for i in range(n_chunks)], docs[:cut], docs[cut:])


# ----------------------------------------------------------------------------- noise and diagnosis


def paired_noise(dense: torch.Tensor, candidate: torch.Tensor, tokens_per_window: int) -> dict[str, float]:
    """Paired evaluation noise of a perplexity ratio on a split: per window, the mean-NLL difference
    (candidate - dense); returns the log-ratio (their mean) and its standard error over windows."""
    if dense.ndim != 1 or dense.shape != candidate.shape or len(dense) == 0:
        raise ValueError(f"dense and candidate must be per-window log-probabilities of the same windows, got shapes "
                         f"{tuple(dense.shape)} and {tuple(candidate.shape)}")
    if tokens_per_window < 1:
        raise ValueError(f"tokens_per_window={tokens_per_window} must be >= 1 (T - 1 predicted tokens a window)")
    d = (dense - candidate).double() / tokens_per_window  # logprobs: dense - candidate = NLL(candidate) - NLL(dense)
    n = len(d)
    se = float(d.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return {"log_ratio": float(d.mean()), "se": se, "windows": n}


def mean_diagnosis(decomps: dict[str, lowrank.Decomposition], pct: int, layers: list[int]):
    """Per module at rank pct% of kappa (centred eigenvectors): the squared norm of the output mean that the
    discarded directions carry, ||(I - P_r) mu||^2, next to the discarded variance sum_{i>r} lambda_i. Their
    ratio says whether dropping the mean term (``feature_nomean``) or the variance dominates the error."""
    import pandas as pd

    rows = []
    for d in decomps.values():
        if d.target.layer not in layers:
            continue
        r = lowrank.rank_for(pct / 100, d.kappa)
        lost_mean = float(d.discarded(d.mean, r).square().sum())
        lost_var = float(d.spectra["centred"][0][r:].double().sum())
        rows.append({"layer": d.target.layer, "kind": d.target.kind, "lost_mean": lost_mean, "lost_var": lost_var,
                     "mean_norm2": float(d.mean.double().square().sum()), "ratio": lost_mean / max(lost_var, 1e-30)})
    return pd.DataFrame(rows)


def search_frame(state: lowrank.SearchState):
    """One row per visited module (back to front): layer, kind, chosen rank / kappa (1 = kept dense),
    whole-model share after it, the bound and the accepted score."""
    import pandas as pd

    rows = []
    for s in state.steps:
        frac = 1.0 if s["rank"] is None else s["rank"] / s["kappa"]
        score = s["tried"].get(str(s["rank"])) if state.criterion == "perplexity" else s["tried"].get(f"split:{s['rank']}")
        rows.append({"layer": s["layer"], "kind": s["kind"], "rank": s["rank"], "fraction": frac, "share": s["share"],
                     "bound": s["bound"], "score": score, "evaluated": len(s["tried"])})
    return pd.DataFrame(rows)


def rank_matrix(frame, kinds: list[str], layers: list[int]) -> np.ndarray:
    """[layer, kind] chosen rank / kappa (NaN where not searched)."""
    out = np.full((len(layers), len(kinds)), np.nan)
    for row in frame.itertuples():
        if row.layer in layers and row.kind in kinds:
            out[layers.index(row.layer), kinds.index(row.kind)] = row.fraction
    return out


def thirds(matrix: np.ndarray) -> list[float]:
    """Mean rank fraction of the first, middle and last third of the searched layers (rows)."""
    parts = np.array_split(np.arange(len(matrix)), 3)
    return [float(np.nanmean(matrix[p])) for p in parts]


def heldout_windows(tok, key: str, corpus: str, n_test: int, test_len: int, n_search: int,
                    search_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Test windows (the first ``n_test`` x ``test_len`` held-out tokens) and, after them and disjoint,
    ``n_search`` search windows of ``search_len`` (§1.8's 20% / 80% split, by position)."""
    from common.data import token_windows

    if search_len < 2:
        raise ValueError(f"search_len={search_len} must be >= 2 (a window's first token is never predicted)")
    test = token_windows(tok, key, corpus, n_test, test_len)
    skip = math.ceil(n_test * test_len / (search_len - 1))
    search = token_windows(tok, key, corpus, skip + n_search, search_len)[skip:]
    return test, search


def trajectory(model: nn.Module, decomps: dict[str, lowrank.Decomposition], state: lowrank.SearchState,
               at: list[int], score) -> list[dict]:
    """Re-score a search's model after its first ``m`` decisions for each m in ``at``: ``score(start)``
    runs from the lowest layer changed so far (``start``); returns [{m, layer, share, value}]."""
    bad = [m for m in at if not 1 <= m <= len(state.steps)]
    if bad:
        raise ValueError(f"decision counts {bad} must lie in [1, {len(state.steps)}], the search's decisions")
    out = []
    for m in at:
        steps = state.steps[:m]
        ranks = {s["path"]: s["rank"] for s in steps if s["rank"] is not None}
        start = min(s["layer"] for s in steps)
        with lowrank.decomposed(model, decomps, state.method, ranks):
            out.append({"m": m, "layer": start, "share": lowrank.model_share(model, decomps, ranks, state.method),
                        "value": score(start)})
    return out


def layer_ends(state: lowrank.SearchState) -> list[int]:
    """Number of decisions made when each visited layer is complete (the reference logs after every
    down_proj, i.e. every 7 modules)."""
    ends, layers = [], [s["layer"] for s in state.steps]
    for i, layer in enumerate(layers):
        if i + 1 == len(layers) or layers[i + 1] != layer:
            ends.append(i + 1)
    return ends


def mean_term_ablation(model: nn.Module, decomps: dict[str, lowrank.Decomposition], inputs: lowrank.LayerInputs,
                       pct: int, layers: list[int]) -> dict[str, float]:
    """Perplexity at rank pct% of kappa in ``layers`` with mean compensation everywhere except one module
    kind, which gets ``feature_nomean``: which kind's mean term the model cannot do without. Also "none"
    (every module compensated) and "all" (none compensated)."""
    ranks = lowrank.uniform_ranks(decomps, pct, layers)
    kinds = sorted({decomps[p].target.kind for p in ranks})
    out = {}
    for kind in ["none", *kinds, "all"]:
        dropped = {p: r for p, r in ranks.items() if kind == "all" or decomps[p].target.kind == kind}
        kept = {p: r for p, r in ranks.items() if p not in dropped}
        with lowrank.decomposed(model, decomps, "feature_nomean", dropped), \
                lowrank.decomposed(model, decomps, "feature", kept):
            out[kind] = inputs.perplexity(min(layers))
    return out
