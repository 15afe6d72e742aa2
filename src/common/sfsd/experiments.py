"""Notebook 05's experiments on top of ``common.sfsd``: cached decompositions per model, the uniform-budget
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

from common.core import arch, evaluation, intervals, layer_inputs, models, tasks
from common.core.cache import CACHE_VERSION, cached, tensor_digest
from common.core.data import token_windows
from common.core.env import cache_dir
from common.core.evaluation import average_accuracy
from common.core.manifest import record, record_model
from common.core.models import weights_id
from common.sfsd import budgets, decomposition, lowrank, paper, search

STATS_VERSION = 3

#: Bump when what a cached ``uniform_table`` cell holds changes (2: per-window NLLs and per-item 0/1 for intervals).
UNIFORM_FORMAT = 2


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
    """Zero-shot multiple-choice tasks scored from cached layer inputs (``evaluation.MultipleChoice``)."""
    tasks: dict[str, evaluation.MultipleChoice]

    def evaluate(self, start: int = 0, seed: int = 0) -> dict:
        """``evaluation.average_accuracy`` over the tasks: mean accuracy, bootstrap ci95 and chance, plus
        ``correct``: per task the per-item 0/1 (what a paired interval between two models resamples)."""
        per_task = {}
        for name, mc in self.tasks.items():
            correct = mc.correct(start)
            per_task[name] = {"acc": sum(correct) / len(correct), "correct": correct,
                              "chance": tasks.chance_level(name, mc.docs)}
        return {**average_accuracy(per_task, seed=seed), "correct": {n: t["correct"] for n, t in per_task.items()}}


def suite(model: nn.Module, tok, key: str, names: tuple[str, ...], n_items: tasks.ItemCounts, seed: int = 0,
          batch_size: int = 16, keep: str | list[int] = "all") -> Suite:
    """Zero-shot tasks, local or the paper's (``n_items`` docs each, or a count per task, ``tasks.items_per_task``;
    None: every doc of a paper task), with lm-eval's requests (``tasks.requests``) and the inputs of the layers in
    ``keep`` cached (``Suite.evaluate(start)`` needs ``start`` among them)."""
    return Suite({n: evaluation.multiple_choice(model, tok, key, tasks.requests(n, count, seed), tasks.metric(n),
                                             batch_size, keep=keep)
                  for n, count in tasks.items_per_task(names, n_items).items()})


def uniform_table(model: nn.Module, key: str, decomps: dict[str, decomposition.Decomposition], windows: layer_inputs.LayerInputs,
                  zero_shot: Suite | None, methods: tuple[str, ...], pcts: tuple[int, ...], protected: int,
                  seed: int = 0, acc_pcts: tuple[int, ...] | None = None):
    """SFSD Table A on ``model``: perplexity at rank pct% of kappa in every module of the unprotected layers, per
    method, plus the dense row (method "dense", pct 100); zero-shot accuracy on the dense row and at the budgets
    ``acc_pcts`` (None: every pct; the others' ``acc`` is NaN). Each cell is cached, with the per-unit values its
    intervals need: ``window_nll`` (each test window's mean NLL) and ``correct`` (per task, each item's 0/1)."""
    import pandas as pd

    layers = sorted({d.target.layer for d in decomps.values() if d.target.layer >= protected})
    docs = {n: mc.docs for n, mc in zero_shot.tasks.items()} if zero_shot else {}
    base_key = {"model": weights_id(key), "decompositions": decomposition.decomposition_digest(decomps),
                "windows": tensor_digest(windows.ids), "layers": layers,
                "tasks": {n: len(d) for n, d in docs.items()}, "task_digest": _docs_digest(docs), "seed": seed,
                "format": UNIFORM_FORMAT}

    unknown = sorted(set(acc_pcts or ()) - set(pcts))
    if unknown:
        raise ValueError(f"acc_pcts {unknown} are not among the budgets pcts {list(pcts)}")

    def cell(method: str, pct: int) -> dict:
        with_acc = zero_shot is not None and (method == "dense" or acc_pcts is None or pct in acc_pcts)

        def compute() -> dict:
            ranks = {} if method == "dense" else lowrank.uniform_ranks(decomps, pct, layers)
            with lowrank.decomposed(model, decomps, "feature" if method == "dense" else method, ranks):
                ppl, window_nll = windows.perplexity_and_windows(protected)
                out = {"ppl": ppl, "window_nll": window_nll.tolist(),
                       "share": lowrank.model_share(model, decomps, ranks, method), "params": budgets.param_count(model)}
                if with_acc:
                    acc = zero_shot.evaluate(protected, seed)
                    out.update(acc=acc["acc"], ci95=acc["ci95"], chance=acc["chance"], correct=acc["correct"])
            return out
        return cached("lowrank_uniform", {**base_key, "method": method, "pct": pct, "acc": with_acc}, compute)

    rows = [{"method": "dense", "pct": 100, **cell("dense", 100)}]
    rows += [{"method": m, "pct": p, **cell(m, p)} for m in methods for p in pcts]
    return pd.DataFrame(rows)


def _docs_digest(docs: dict[str, list[dict]]) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(docs, sort_keys=True).encode()).hexdigest()[:16]


def record_uniform(key: str, frame, tasks_note: str) -> None:
    """DESIGN §9 keys: ``M/lowrank/<method>/<pct>/ppl|acc`` and ``M/lowrank/<pct>/whole_model_pct``; the methods'
    comparisons at each budget with their 95% intervals: perplexity ratios paired over the test windows
    (``intervals.perplexity_ratio``), accuracy differences paired over items resampled within each task
    (``intervals.stratified_paired_difference``), and their mean over the budgets the same way; accuracy only where
    the cell has it (``uniform_table``'s ``acc_pcts``)."""
    dense = frame[frame.method == "dense"].iloc[0]
    record(f"{key}/lowrank/dense/ppl", dense.ppl, paper=paper.DENSE_PPL, paper_ref=paper.DENSE_PPL_REF)
    if _has_acc(dense):
        record(f"{key}/lowrank/dense/acc", dense.acc, ci95=dense.ci95, paper=paper.TABLE_A["dense"] / 100,
               paper_ref="SFSD Table A (LLaMA-7B, 6-task average)", note=tasks_note)
    for row in frame[frame.method != "dense"].itertuples():
        value = paper.TABLE_A.get((row.method, row.pct))
        ref = paper.TABLE_A_REF if value is not None else None
        record(f"{key}/lowrank/{row.method}/{row.pct}/ppl", row.ppl, note="held-out wiki windows")
        if _has_acc(row):
            record(f"{key}/lowrank/{row.method}/{row.pct}/acc", row.acc, ci95=row.ci95,
                   paper=None if value is None else value / 100, paper_ref=ref, note=tasks_note)
    for pct, share in frame[frame.method == "feature"].set_index("pct").share.items():
        record(f"{key}/lowrank/{pct}/whole_model_pct", 100 * share,
               note="whole-model parameter share (%) with the feature method's m-vector bias per module")
    cells = frame.set_index(["method", "pct"])
    for pct in sorted({p for m, p in cells.index if m == "feature"}):
        for other in ("weight_svd", "feature_nomean", "feature_uncentred"):
            if (other, pct) in cells.index:
                ratio = intervals.perplexity_ratio(cells.loc[(other, pct), "window_nll"], cells.loc[("feature", pct), "window_nll"])
                record(f"{key}/lowrank/{pct}/{other}_over_feature_ppl", cells.loc[(other, pct), "ppl"] / cells.loc[("feature", pct), "ppl"],
                       ci95=ratio["ci95"], note=f"perplexity ratio at rank {pct}% of kappa; 95% paired bootstrap over "
                                                f"{ratio['n']} test windows")
        if ("weight_svd", pct) in cells.index and _has_acc(cells.loc[("feature", pct)]) \
                and _has_acc(cells.loc[("weight_svd", pct)]):
            diff = intervals.stratified_paired_difference(cells.loc[("feature", pct), "correct"],
                                                          cells.loc[("weight_svd", pct), "correct"])
            record(f"{key}/lowrank/{pct}/feature_minus_svd_acc", cells.loc[("feature", pct), "acc"] - cells.loc[("weight_svd", pct), "acc"],
                   ci95=diff["ci95"], note=_items_note(diff),
                   paper=None if pct not in (80, 50) else (paper.TABLE_A[("feature", pct)] - paper.TABLE_A[("weight_svd", pct)]) / 100,
                   paper_ref=paper.TABLE_A_REF if pct in (80, 50) else None)
    pcts = [p for m, p in cells.index if m == "feature" and ("weight_svd", p) in cells.index
            and _has_acc(cells.loc[("feature", p)]) and _has_acc(cells.loc[("weight_svd", p)])]
    if pcts:
        pairs = [(cells.loc[("feature", p), "acc"], cells.loc[("weight_svd", p), "acc"]) for p in pcts]
        diff = intervals.stratified_paired_difference(*(_mean_correct([cells.loc[(m, p), "correct"] for p in pcts])
                                                        for m in ("feature", "weight_svd")))
        record(f"{key}/lowrank/feature_minus_svd_acc_mean", float(np.mean([f - w for f, w in pairs])), ci95=diff["ci95"],
               note=f"mean over the {len(pcts)} uniform budgets of the accuracy difference; {_items_note(diff)} "
                    "(an item's difference averaged over the budgets)")


def _has_acc(row) -> bool:
    """Whether a Table A cell (a frame row) was scored on the zero-shot tasks."""
    acc = getattr(row, "acc", None)
    return acc is not None and not math.isnan(acc)


def _items_note(diff: dict) -> str:
    return (f"95% paired bootstrap over {diff['n']} items, resampled within each of the {diff['n_strata']} tasks "
            "(unweighted mean over tasks)")


def _mean_correct(per_budget: list[dict[str, list[float]]]) -> dict[str, np.ndarray]:
    """Per task, each item's 0/1 averaged over budgets (the same items at every budget)."""
    return {t: np.mean([b[t] for b in per_budget], axis=0) for t in per_budget[0]}


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


def mean_diagnosis(decomps: dict[str, decomposition.Decomposition], pct: int, layers: list[int]):
    """Per module at rank pct% of kappa (centred eigenvectors): the squared norm of the output mean that the
    discarded directions carry, ||(I - P_r) mu||^2, next to the discarded variance sum_{i>r} lambda_i. Their
    ratio says whether dropping the mean term (``feature_nomean``) or the variance dominates the error."""
    import pandas as pd

    rows = []
    for d in decomps.values():
        if d.target.layer not in layers:
            continue
        r = budgets.rank_for(pct / 100, d.kappa)
        lost_mean = float(d.discarded(d.mean, r).square().sum())
        lost_var = float(d.spectra["centred"][0][r:].double().sum())
        rows.append({"layer": d.target.layer, "kind": d.target.kind, "lost_mean": lost_mean, "lost_var": lost_var,
                     "mean_norm2": float(d.mean.double().square().sum()), "ratio": lost_mean / max(lost_var, 1e-30)})
    return pd.DataFrame(rows)


def record_mean_diagnosis(key: str, diag, massive_layer: int | None) -> None:
    """``<key>/lowrank/meancomp/<kind>/lost_mean_over_var`` per decomposed layer (``mean_diagnosis`` at 0.8
    kappa) and the model's massive layer beside them."""
    for kind in sorted(set(diag.kind)):
        record(f"{key}/lowrank/meancomp/{kind}/lost_mean_over_var",
               diag[diag.kind == kind].sort_values("layer").ratio.tolist(),
               note="||(I-P_r) mu||^2 / sum_{i>r} lambda_i at 0.8 kappa, per decomposed layer")
    record(f"{key}/lowrank/meancomp/massive_layer", massive_layer, note="0-based (notebook 01's detection)")


def record_search_noise(key: str, noise: dict[str, float], tolerance: float) -> int | None:
    """Record ``paired_noise``'s reading of the search split and the first module count m whose cumulative
    bound m log t exceeds 2 SE (None beyond 500 modules); returns that m."""
    first_above = next((m for m in range(1, 500) if math.log(tolerance) * m > 2 * noise["se"]), None)
    record(f"{key}/lowrank/search/noise_se", noise["se"],
           note=f"paired SE of log ppl ratio over {noise['windows']} search windows (last layer at 0.9 kappa vs dense)")
    record(f"{key}/lowrank/search/noise_log_ratio", noise["log_ratio"])
    record(f"{key}/lowrank/search/noise_relative_se", noise["se"] / abs(noise["log_ratio"]), note="SE / |log ratio|")
    record(f"{key}/lowrank/search/bound_above_2se_after", first_above,
           note=f"modules m with m log t > 2 SE (t = {tolerance})")
    return first_above


def search_frame(state: search.SearchState):
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


def last_minus_first_third(matrix: np.ndarray) -> dict:
    """The last third's mean rank fraction minus the first third's (``thirds``), with a 95% bootstrap interval
    over layers resampled within each third (``intervals.independent_difference`` of the per-layer means, layers
    with no searched module left out). ``ci95`` is None when a third has fewer than two layers."""
    parts = [matrix[p] for p in np.array_split(np.arange(len(matrix)), 3)]
    first, last = ([float(np.nanmean(row)) for row in part if not np.isnan(row).all()] for part in (parts[0], parts[2]))
    third = thirds(matrix)
    if min(len(first), len(last)) < 2:
        return {"value": third[2] - third[0], "ci95": None, "n": len(first) + len(last)}
    diff = intervals.independent_difference(last, first)
    return {**diff, "value": third[2] - third[0]}


def record_search(key: str, state: search.SearchState, frame, ranks: np.ndarray, kinds: list[str], layers: list[int],
                  test_points: list[dict], scan: str, dense_window_nll) -> list[float]:
    """Notebook 05's perplexity-search keys (DESIGN §9 ``M/lowrank/search/ranks`` and its readings): the rank map,
    its thirds, the final share, search- and test-split perplexity, candidates scored, and the final state's
    test-window perplexity over the dense model's divided by the search's final bound t^m (``search_bound``), with
    the paired bootstrap over the test windows (``test_points``: ``perplexity_points``, the last at the final state;
    ``dense_window_nll``: the dense model's per-window NLLs on the same windows); returns the thirds."""
    third, trend = thirds(ranks), last_minus_first_third(ranks)
    record(f"{key}/lowrank/search/ranks", [[None if x != x else float(x) for x in row] for row in ranks],
           note=f"rank / kappa per searched layer {layers[0]}-{layers[-1]} x {kinds}; 1 = kept dense")
    record(f"{key}/lowrank/search/rank_fraction_thirds", third,
           note="mean rank / kappa over the first, middle, last third of searched layers")
    record(f"{key}/lowrank/search/last_minus_first_third", trend["value"], ci95=trend["ci95"],
           note=f"95% bootstrap over the {trend['n']} layers of the first and last thirds, resampled within each third"
           if trend["ci95"] else "a third has fewer than two layers: no interval over layers")
    record(f"{key}/lowrank/search/whole_model_pct", 100 * frame.share.iloc[-1])
    record(f"{key}/lowrank/search/ppl_search",
           frame.score.dropna().iloc[-1] if frame.score.notna().any() else state.base["ppl"],
           note=f"search split; bound {frame.bound.iloc[-1]:.2f}")
    record(f"{key}/lowrank/search/ppl_test", test_points[-1]["value"], note="test windows, final state")
    record(f"{key}/lowrank/search/evaluations", int(frame.evaluated.sum()), note=f"candidates scored ({scan} scan)")
    final = test_points[-1]
    if final.get("m") != len(state.steps):
        raise ValueError(f"the last test point is after {final.get('m')} decisions, not the search's final state "
                         f"({len(state.steps)}): score it there (trajectory_marks ends at the last decision)")
    bound, m = search_bound(state)
    t = state.settings["tolerance"]
    record(f"{key}/lowrank/search/modules_in_bound", m,
           note="m of the search's bound dense ppl x t^m: modules visited back to front (kept dense or not)")
    record(f"{key}/lowrank/search/bound", bound, note=f"t^m, t = {t}, m = {m}: the final bound over the dense "
                                                      "search-split perplexity")
    ratio = intervals.perplexity_ratio(final["window_nll"], dense_window_nll)
    record(f"{key}/lowrank/search/test_over_bound", ratio["value"] / bound, ci95=[x / bound for x in ratio["ci95"]],
           paper=paper.TABLE_C_PPL_OVER_BOUND["mistral-7b"][-1], paper_ref="SFSD README Table C",
           note=f"(searched / dense perplexity on the test windows) / t^m (t = {t}, m = {m}); 1 = the held-out ratio "
                f"lands on the search-split bound; 95% paired bootstrap over {ratio['n']} test windows of the ratio, "
                f"divided by the bound (a constant); paper: Mistral-7B's last column (t = "
                f"{paper.TABLE_C_TOLERANCE['mistral-7b']}, m = {paper.TABLE_C_MODULES[-1]})")
    return third


def heldout_windows(tok, key: str, corpus: str, n_test: int, test_len: int, n_search: int,
                    search_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Test windows (the first ``n_test`` x ``test_len`` held-out tokens) and, after them and disjoint,
    ``n_search`` search windows of ``search_len`` (§1.8's 20% / 80% split, by position)."""
    if search_len < 2:
        raise ValueError(f"search_len={search_len} must be >= 2 (a window's first token is never predicted)")
    test = token_windows(tok, key, corpus, n_test, test_len)
    skip = math.ceil(n_test * test_len / (search_len - 1))
    search = token_windows(tok, key, corpus, skip + n_search, search_len)[skip:]
    return test, search


def load_and_decompose(key: str, cfg) -> dict:
    """Notebook 05's setup of one model: load it (its weight identity goes to the manifest), the calibration
    windows (train split), the held-out test and search windows, and the decompositions of every unprotected
    layer (cached per layer). Returns {model, tok, protected, layers, decomps, test, search}."""
    model, tok = models.load_model(key)
    record_model(key)
    n_layers = len(arch.layers(model))
    protected = budgets.protected_layers(n_layers)
    layers = list(range(protected, n_layers))
    cal = token_windows(tok, key, cfg.corpus, cfg.calib_windows, cfg.calib_len, split="train")
    test, search_windows = heldout_windows(tok, key, cfg.corpus, cfg.eval_windows, cfg.eval_len, cfg.search_windows,
                                           cfg.search_len)
    decomps = decomposition.decompose_model(model, cal, layers, cfg.batch_size,
                                            cache=decomposition_dir(key, model, cal, layers))
    return {"model": model, "tok": tok, "protected": protected, "layers": layers, "decomps": decomps, "test": test,
            "search": search_windows}


def describe(key: str, run: dict) -> str:
    """One line on a ``load_and_decompose`` result: depth, protected layers, modules, parameters, storage."""
    n_layers, protected, decomps = len(arch.layers(run["model"])), run["protected"], run["decomps"]
    return (f"{key}: {n_layers} layers, layers 0-{protected - 1} protected, {len(decomps)} modules decomposed, "
            f"{budgets.param_count(run['model']):,} parameters; decompositions "
            f"{decomposition.stored_bytes(decomps) / 2**30:.2f} GiB (host memory and cache)")


def trajectory(model: nn.Module, decomps: dict[str, decomposition.Decomposition], state: search.SearchState,
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


def perplexity_points(model: nn.Module, decomps: dict[str, decomposition.Decomposition], state: search.SearchState,
                      at: list[int], inputs: layer_inputs.LayerInputs) -> list[dict]:
    """``trajectory`` scored by perplexity on ``inputs`` (the test windows): [{m, layer, share, value (ppl),
    window_nll (each window's mean NLL, from the same pass)}], what ``record_search`` pairs with the dense model's
    windows."""
    points = trajectory(model, decomps, state, at, inputs.perplexity_and_windows)
    return [{**p, "value": p["value"][0], "window_nll": [float(x) for x in p["value"][1]]} for p in points]


def search_bound(state: search.SearchState) -> tuple[float, int]:
    """The perplexity search's final bound as a factor of the dense search-split perplexity, t^m, and m, exactly as
    ``search.perplexity_search`` defines it: the m-th module visited (back to front, kept dense or not) is accepted
    while ppl <= dense ppl x t^m, so after the whole search m is the number of modules visited. Checked against the
    bound the search stored with its last decision."""
    t, m = state.settings["tolerance"], len(state.steps)
    factor = t ** m
    if m and not math.isclose(state.steps[-1]["bound"], state.base["ppl"] * factor, rel_tol=1e-9):
        raise ValueError(f"the search's last bound {state.steps[-1]['bound']} is not dense ppl x {t}^{m}: "
                         "search.perplexity_search's definition of the bound changed; update search_bound")
    return factor, m


def layer_ends(state: search.SearchState) -> list[int]:
    """Number of decisions made when each visited layer is complete (the reference logs after every
    down_proj, i.e. every 7 modules)."""
    ends, layers = [], [s["layer"] for s in state.steps]
    for i, layer in enumerate(layers):
        if i + 1 == len(layers) or layers[i + 1] != layer:
            ends.append(i + 1)
    return ends


def trajectory_marks(state: search.SearchState) -> list[int]:
    """About four decision counts, at layer ends, counted back from the search's last decision: where
    notebook 05 re-scores the searched model on the test windows."""
    ends = layer_ends(state)
    return sorted({ends[i] for i in range(len(ends) - 1, -1, -max(1, len(ends) // 4))})


def task_layers(layers: list[int], last: int | None) -> list[int]:
    """The layers the task search visits: every searched layer, or only the ``last`` ones."""
    n_layers = layers[-1] + 1
    return layers if last is None else list(range(n_layers - last, n_layers))


def task_scorers(model: nn.Module, tok, key: str, splits: TaskSplits, metric: str, keep: list[int],
                 batch_size: int = 16) -> tuple[list[evaluation.MultipleChoice], evaluation.MultipleChoice,
                                                evaluation.MultipleChoice]:
    """Multiple-choice scorers (inputs of the layers in ``keep`` cached) of the chunks, the search split and
    the test split of a task (``task_splits``)."""
    def scorer(docs: list[dict]) -> evaluation.MultipleChoice:
        return evaluation.multiple_choice(model, tok, key, docs, metric, batch_size, keep=keep)
    return [scorer(c) for c in splits.chunks], scorer(splits.search), scorer(splits.test)


def task_trajectory(model: nn.Module, decomps: dict[str, decomposition.Decomposition], state: search.SearchState,
                    split_mc: evaluation.MultipleChoice, test_mc: evaluation.MultipleChoice):
    """Accuracy on the search and test splits after each searched layer of a task search: a frame (modules,
    share, search, test, and ``test_correct``: the test items' 0/1) and the dense accuracies {search, test,
    test_correct}."""
    import pandas as pd

    ends = layer_ends(state)
    points = {split: trajectory(model, decomps, state, ends, m.correct)
              for split, m in (("search", split_mc), ("test", test_mc))}
    frame = pd.DataFrame({"modules": ends, "share": [p["share"] for p in points["test"]],
                          "search": [_accuracy(p["value"]) for p in points["search"]],
                          "test": [_accuracy(p["value"]) for p in points["test"]],
                          "test_correct": [p["value"] for p in points["test"]]})
    dense = test_mc.correct(0)
    return frame, {"search": state.base["split"], "test": _accuracy(dense), "test_correct": dense}


def _accuracy(correct: list[float]) -> float:
    """``MultipleChoice.accuracy`` from its ``correct``."""
    return sum(correct) / len(correct)


def record_task_search(key: str, task: str, frame, dense_acc: dict[str, float], state: search.SearchState) -> None:
    """Notebook 05's task-search keys (SFSD Table B): accuracy after each searched layer on both splits, the
    dense test accuracy, the final differences to dense (the test split's with its interval, paired over items:
    ``task_trajectory``'s ``test_correct``), the parameter share and the modules compressed."""
    base = f"{key}/lowrank/task_search/{task}"
    kept = sum(s["rank"] is not None for s in state.steps)
    record(f"{base}/search_acc", frame.search.tolist(), paper_ref="SFSD Table B (search on 20%)",
           note=f"after each searched layer ({frame.modules.tolist()} modules); dense {dense_acc['search']:.3f}")
    record(f"{base}/test_acc", frame.test.tolist(), paper_ref="SFSD Table B (reported on 80%)",
           note=f"dense {dense_acc['test']:.3f}")
    record(f"{base}/dense_test_acc", dense_acc["test"])
    diff = intervals.paired_difference(frame.test_correct.iloc[-1], dense_acc["test_correct"])
    record(f"{base}/test_minus_dense", frame.test.iloc[-1] - dense_acc["test"], ci95=diff["ci95"],
           paper=paper.TASK_SEARCH_TEST_MINUS_DENSE, paper_ref=paper.TASK_SEARCH_REF,
           note=f"final state minus dense; 95% paired bootstrap over the {diff['n']} test items")
    record(f"{base}/search_minus_dense", frame.search.iloc[-1] - dense_acc["search"])
    record(f"{base}/whole_model_pct", 100 * frame.share.iloc[-1])
    record(f"{base}/modules_compressed", kept, note=f"of {len(state.steps)} visited")


def mean_term_ablation(model: nn.Module, decomps: dict[str, decomposition.Decomposition], inputs: layer_inputs.LayerInputs,
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


def record_mean_term_ablation(key: str, ablation: dict[str, float]) -> None:
    """``<key>/lowrank/meancomp/drop_<kind>/ppl`` for each reading of ``mean_term_ablation``."""
    for kind, ppl in ablation.items():
        record(f"{key}/lowrank/meancomp/drop_{kind}/ppl", ppl, note="0.8 kappa; mean term dropped in this kind only")
