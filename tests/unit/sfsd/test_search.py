"""SFSD surgical rank searches (``common.sfsd``) and notebook 05's helpers (``common.sfsd.experiments``).

Two tiny models are used. ``plain``: the stock random ``tiny-llama``, whose layers barely move its (near
uniform) predictions. ``sharp``: the same architecture with every decoder projection scaled x10 and the
LM head x30, so that layers matter, evaluated on windows *sampled from itself*: by Gibbs' inequality the
dense model is then the best predictor of its own samples and no truncation can improve the perplexity
(the "nothing can pass at tolerance 1" plant), while looser tolerances give a mix of rank-1, intermediate
and dense decisions.
"""

from __future__ import annotations

import json
import math
import random
import re
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_families import sharpen, single_thread
from torch import nn

from common.core import data, evaluation, layer_inputs, models, progress, tasks
from common.sfsd import budgets, decomposition, experiments, lowrank, search

pytestmark = pytest.mark.usefixtures("one_thread")

KEY = "tiny-llama"
KINDS = ["q", "k", "v", "o", "gate", "up", "down"]
NAMES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj"]


# --------------------------------------------------------------------------------------- fixtures


def _calibration(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 259, (8, 24), generator=g)


@contextmanager
def _loaded_one_thread():
    """The tiny model in eval mode, built with one torch thread (module fixtures run outside ``one_thread``)."""
    with single_thread():
        model, tok = models.load_model(KEY)
        yield model.eval(), tok


@pytest.fixture(scope="module")
def plain():
    with _loaded_one_thread() as (model, tok):
        return model, tok, decomposition.decompose_model(model, _calibration(), batch_size=4)


@pytest.fixture(scope="module")
def sharp():
    with _loaded_one_thread() as (model, tok):
        sharpen(model)
        decomps = decomposition.decompose_model(model, _calibration(), batch_size=4)
        g = torch.Generator().manual_seed(0)
        torch.randint(3, 259, (8, 24), generator=g)  # advance past the calibration draw (a fixed stream)
        ids = torch.full((16, 1), tok.bos_token_id)
        with torch.no_grad():
            for _ in range(23):
                p = model(ids).logits[:, -1].softmax(-1)
                ids = torch.cat([ids, torch.multinomial(p, 1, generator=g)], 1)
        return model, tok, decomps, layer_inputs.LayerInputs(model, ids, batch_size=8)


def _hf_ppl(model: nn.Module, ids: torch.Tensor) -> float:
    """Perplexity from the model's own full forward pass (no cached layer inputs)."""
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].double()
    return math.exp(float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))))


def _expected_order(n_layers: int, protected: int) -> list[str]:
    return [f"model.layers.{i}.{n}" for i in reversed(range(protected, n_layers)) for n in reversed(NAMES)]


def _check_ppl_state(model, decomps, inputs, state, tolerance, protected, scan):
    """Every property a perplexity search's decisions must have, checked from its own record and from
    independent re-evaluations with the model's full forward pass."""
    base = _hf_ppl(model, inputs.ids)
    assert state.base["ppl"] == pytest.approx(base, rel=1e-5)
    assert [s["path"] for s in state.steps] == _expected_order(4, protected)
    ranks: dict[str, int] = {}
    dense_total = budgets.param_count(model)
    for m, s in enumerate(state.steps, start=1):
        k = decomps[s["path"]].kappa
        grid = budgets.rank_grid(k)
        assert s["layer"] >= protected and s["kappa"] == k
        assert s["bound"] == pytest.approx(state.base["ppl"] * tolerance ** m, rel=1e-12)
        tried = {int(r): v for r, v in s["tried"].items()}
        assert k not in tried and s["rank"] != k  # kappa saves nothing: never a candidate
        assert set(tried) <= set(grid[:-1])
        if s["rank"] is None:
            if scan == "linear":
                assert sorted(tried) == grid[:-1]
            assert all(v > s["bound"] for v in tried.values())
        else:
            r = s["rank"]
            assert tried[r] <= s["bound"]
            smaller = [g for g in grid if g < r]
            if scan == "linear":  # ascending: every smaller grid rank was tried and failed
                assert all(g in tried and tried[g] > s["bound"] for g in smaller)
                assert max(tried) == r
            else:  # bisect: the grid entry just below the chosen one was tried and failed
                if smaller:
                    assert tried[smaller[-1]] > s["bound"]
            ranks[s["path"]] = r
            # independent: the full model with every decision so far (no cached prefix)
            with lowrank.decomposed(model, decomps, state.method, ranks):
                assert _hf_ppl(model, inputs.ids) == pytest.approx(tried[r], rel=1e-5)
        with lowrank.decomposed(model, decomps, state.method, ranks):  # share: real parameter counts
            assert s["share"] == pytest.approx(budgets.param_count(model) / dense_total, rel=1e-12)
    assert state.ranks == ranks


# ----------------------------------------------------------------------------- perplexity search


def test_search_order_back_to_front_and_protected(plain):
    _, _, decomps = plain
    for protected in (0, 1, 2, 4):
        assert [t.path for t in search.search_order(decomps, protected)] == _expected_order(4, protected)
    with pytest.raises(ValueError, match="protected"):
        search.search_order(decomps, -1)


@pytest.mark.parametrize(("tolerance", "protected"), [(1.03, 2), (1.5, 1)])
def test_perplexity_search_decisions(sharp, tolerance, protected):
    model, _, decomps, inputs = sharp
    originals = {p: model.get_submodule(p) for p in decomps}
    state = search.perplexity_search(model, decomps, inputs, "feature", tolerance, protected)
    assert state.criterion == "perplexity" and state.method == "feature"
    steps = state.steps
    assert steps[0]["path"] == "model.layers.3.mlp.down_proj"
    assert steps[-1]["path"] == f"model.layers.{protected}.self_attn.q_proj"
    assert all(s["layer"] >= protected for s in steps)
    _check_ppl_state(model, decomps, inputs, state, tolerance, protected, "linear")
    # something was compressed (the tolerance is generous) and the search really searched
    assert len(state.ranks) >= 5
    if tolerance == 1.03:  # the mix: rank 1, intermediate ranks and modules kept dense
        kept = [s["rank"] for s in steps]
        assert None in kept and 1 in kept and any(r not in (None, 1) for r in kept)
    with lowrank.decomposed(model, decomps, "feature", state.ranks):
        for p, module in originals.items():
            now = model.get_submodule(p)
            if p in state.ranks:
                assert isinstance(now, lowrank.LowRankLinear) and now.rank == state.ranks[p]
            else:
                assert now is module
            if int(p.split(".")[2]) < protected:
                assert now is module and type(now) is nn.Linear
    for p, module in originals.items():  # restored afterwards
        assert model.get_submodule(p) is module


def test_perplexity_search_tolerance_one_keeps_everything_dense(sharp):
    model, _, decomps, inputs = sharp
    state = search.perplexity_search(model, decomps, inputs, "feature", 1.0, 2)
    assert state.ranks == {} and all(s["rank"] is None for s in state.steps)
    assert len(state.steps) == 14
    # consistent with the scores: every candidate of every module made perplexity worse than dense
    base = state.base["ppl"]
    assert all(v > base for s in state.steps for v in s["tried"].values())
    _check_ppl_state(model, decomps, inputs, state, 1.0, 2, "linear")
    assert state.steps[-1]["share"] == 1.0


def test_perplexity_search_rejects_tolerance_below_one(sharp):
    model, _, decomps, inputs = sharp
    with pytest.raises(ValueError, match="tolerance"):
        search.perplexity_search(model, decomps, inputs, tolerance=0.99, protected=2)


def test_perplexity_search_bisect(sharp):
    model, _, decomps, inputs = sharp
    state = search.perplexity_search(model, decomps, inputs, "feature", 1.03, 2, scan="bisect")
    _check_ppl_state(model, decomps, inputs, state, 1.03, 2, "bisect")
    assert all(len(s["tried"]) <= 1 + math.ceil(math.log2(10)) for s in state.steps)
    linear = search.perplexity_search(model, decomps, inputs, "feature", 1.03, 2, scan="linear")
    assert sum(len(s["tried"]) for s in state.steps) < sum(len(s["tried"]) for s in linear.steps)


def test_cached_prefix_is_exact(sharp):
    model, _, decomps, inputs = sharp
    fast = search.perplexity_search(model, decomps, inputs, "feature", 1.03, 2, cached_prefix=True)
    slow = search.perplexity_search(model, decomps, inputs, "feature", 1.03, 2, cached_prefix=False)
    assert [s["rank"] for s in fast.steps] == [s["rank"] for s in slow.steps]
    assert fast.steps == slow.steps  # scores bit-identical, not just close
    assert fast.base == slow.base


# ------------------------------------------------------------------------------ _smallest_passing


@pytest.mark.parametrize("threshold", [1, 3, 16, 22, 28])
def test_smallest_passing_linear_and_bisect_agree_on_monotone(threshold):
    grid = budgets.rank_grid(32)  # [1, 3, 6, 9, 12, 16, 19, 22, 25, 28, 32]
    calls = {"linear": [], "bisect": []}
    out = {}
    for scan in calls:
        def passes(r, scan=scan):
            calls[scan].append(r)
            return r >= threshold
        out[scan] = search._smallest_passing(grid, passes, scan)
    assert out["linear"] == out["bisect"] == threshold
    assert 32 not in calls["linear"] + calls["bisect"]  # kappa is never a candidate
    assert calls["linear"] == [g for g in grid if g <= threshold]
    assert calls["bisect"][0] == 28  # 0.9 kappa first
    assert len(calls["bisect"]) <= 1 + math.ceil(math.log2(len(grid) - 1))
    if threshold >= 16:  # threshold late in the grid: bisect needs fewer evaluations
        assert len(calls["bisect"]) < len(calls["linear"])


def test_smallest_passing_nothing_passes_and_bad_scan():
    grid = budgets.rank_grid(32)
    calls = []

    def only_kappa(r):
        calls.append(r)
        return r >= 32

    assert search._smallest_passing(grid, only_kappa, "linear") is None
    assert calls == grid[:-1]
    calls.clear()
    assert search._smallest_passing(grid, only_kappa, "bisect") is None
    assert calls == [28]  # 0.9 kappa fails: nothing smaller is tried
    assert search._smallest_passing([1], lambda r: True, "linear") is None  # kappa = 1: no candidate
    assert search._smallest_passing([1], lambda r: True, "bisect") is None
    with pytest.raises(ValueError, match="scan"):
        search._smallest_passing(grid, lambda r: True, "binary")


# ----------------------------------------------------------------------------------------- resume


class _Interrupt(Exception):
    pass


def test_search_state_resume(sharp, tmp_path, monkeypatch):
    model, _, decomps, inputs = sharp
    reference = search.perplexity_search(model, decomps, inputs, "feature", 1.03, 2)
    path = tmp_path / "s.json"
    calls = []
    real = inputs.perplexity
    monkeypatch.setattr(inputs, "perplexity", lambda start=0: calls.append(start) or real(start))

    def stop_after_3(task, m, total=None, note=""):
        if m == 3:
            raise _Interrupt

    monkeypatch.setattr(progress, "report", stop_after_3)
    with pytest.raises(_Interrupt):
        search.perplexity_search(model, decomps, inputs, "feature", 1.03, 2, state_path=path)
    saved = json.loads(path.read_text())
    assert saved["steps"] == reference.steps[:3]
    first = sum(len(s["tried"]) for s in reference.steps[:3])
    assert len(calls) == 1 + first  # the base perplexity and the first 3 modules' candidates

    calls.clear()
    seen = []
    monkeypatch.setattr(progress, "report", lambda task, m, total=None, note="": seen.append(m))
    state = search.perplexity_search(model, decomps, inputs, "feature", 1.03, 2, state_path=path)
    assert state.steps == reference.steps and state.base == reference.base
    assert seen == list(range(4, 15))  # modules 1-3 not visited again
    assert len(calls) == sum(len(s["tried"]) for s in reference.steps[3:])  # neither base nor 1-3 re-scored
    assert json.loads(path.read_text())["steps"] == reference.steps

    calls.clear()  # finished: a third call re-evaluates nothing
    assert search.perplexity_search(model, decomps, inputs, "feature", 1.03, 2, state_path=path).steps == reference.steps
    assert calls == []

    with pytest.raises(ValueError, match=re.escape(str(path))):
        search.perplexity_search(model, decomps, inputs, "feature", 1.05, 2, state_path=path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        search.perplexity_search(model, decomps, inputs, "weight_svd", 1.03, 2, state_path=path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        search.perplexity_search(model, decomps, inputs, "feature", 1.03, 1, state_path=path)


def test_search_state_roundtrip(tmp_path):
    st = search.SearchState("perplexity", "feature", {"tolerance": 1.5}, {"ppl": 3.25},
                             [{"path": "a", "rank": 3}, {"path": "b", "rank": None}])
    assert st.ranks == {"a": 3}
    st.save(None)  # no path: nothing written, no error
    assert search.SearchState.load(None, "perplexity", "feature", {}) is None
    assert search.SearchState.load(tmp_path / "missing.json", "perplexity", "feature", {}) is None
    st.save(tmp_path / "x.json")
    back = search.SearchState.load(tmp_path / "x.json", "perplexity", "feature", {"tolerance": 1.5})
    assert back == st
    with pytest.raises(ValueError, match="x.json"):
        search.SearchState.load(tmp_path / "x.json", "task", "feature", {"tolerance": 1.5})


# ------------------------------------------------------------------------------ multiple choice


def _request_logprob(model, tok, query: str, choice: str) -> float:
    """Summed log-probability of " " + choice after BOS + query, from the full model's logits."""
    ctx = [tok.bos_token_id, *tok(query, add_special_tokens=False)["input_ids"]]
    whole = [tok.bos_token_id, *tok(query + " " + choice, add_special_tokens=False)["input_ids"]]
    assert whole[:len(ctx)] == ctx and len(whole) - len(ctx) == len((" " + choice).encode())  # byte tokens
    ids = torch.tensor([whole])
    with torch.no_grad():
        lp = model(ids).logits[0].double().log_softmax(-1)
    return float(sum(lp[t - 1, whole[t]] for t in range(len(ctx), len(whole))))


def test_multiple_choice_agrees_with_lm_eval(plain):
    model, tok, _ = plain
    docs = tasks.build_docs("commonsense", 12, 0)
    metric = tasks.LOCAL_TASKS["commonsense"].metric
    mc = evaluation.multiple_choice(model, tok, KEY, docs, metric, 4)
    norm = evaluation.multiple_choice(model, tok, KEY, docs, "acc_norm", 4)
    ref = evaluation.zero_shot(model, tok, ["commonsense"], 12, seed=0, batch_size=4,
                               prepend_bos=models.get_spec(KEY).prepend_bos)["commonsense"]
    assert mc.correct(0) == ref["correct"]
    assert 0 < sum(ref["correct"]) < len(docs)  # a mix of right and wrong: agreement is informative
    assert mc.accuracy(0) == pytest.approx(ref["scores"]["acc"])
    assert norm.accuracy(0) == pytest.approx(ref["scores"]["acc_norm"])


def test_multiple_choice_scores_and_acc_norm(plain):
    model, tok, _ = plain
    # one short and one long choice: raw log-likelihood favours the short one, per-character the long one
    doc = {"query": "Question: what is it?\nAnswer:", "choices": ["a", "a big round heavy stone"], "gold": 1}
    lp = [_request_logprob(model, tok, doc["query"], c) for c in doc["choices"]]
    assert lp[0] > lp[1] and lp[0] / 1 < lp[1] / len(doc["choices"][1])  # the plant holds
    acc = evaluation.multiple_choice(model, tok, KEY, [doc], "acc")
    norm = evaluation.multiple_choice(model, tok, KEY, [doc], "acc_norm")
    assert acc.scores(0)[0] == pytest.approx(lp, rel=1e-5)
    assert norm.scores(0)[0] == pytest.approx([lp[0] / 1, lp[1] / len(doc["choices"][1])], rel=1e-5)
    assert acc.correct(0) == [0.0] and norm.correct(0) == [1.0]
    # continuation tokens: exactly the bytes of " " + choice are scored
    assert acc.inputs.mask[:, :-1].sum(1).tolist() == [2, 1 + len(doc["choices"][1])]


def test_multiple_choice_cached_prefix_exact(plain):
    model, tok, _ = plain
    docs = tasks.build_docs("commonsense", 8, 1)
    mc = evaluation.multiple_choice(model, tok, KEY, docs, "acc_norm", 5)  # uneven batches
    full = mc.scores(0)
    for start in range(1, mc.inputs.n_layers):
        assert mc.scores(start) == full
    # and against the full model: each request's log-likelihood / len(choice)
    want = [[_request_logprob(model, tok, d["query"], c) / len(c) for c in d["choices"]] for d in docs[:2]]
    for got, ref in zip(full[:2], want, strict=True):
        assert got == pytest.approx(ref, rel=1e-5)


def test_multiple_choice_rejects_bad_input(plain):
    model, tok, _ = plain
    with pytest.raises(ValueError, match="doc"):
        evaluation.multiple_choice(model, tok, KEY, [], "acc")
    with pytest.raises(ValueError, match="metric"):
        evaluation.multiple_choice(model, tok, KEY, tasks.build_docs("commonsense", 2, 0), "f1")


# ----------------------------------------------------------------------------------- task search


def _task_mc(model, tok, docs):
    return evaluation.multiple_choice(model, tok, KEY, docs, tasks.LOCAL_TASKS["commonsense"].metric, 16,
                                   tasks.TARGET_DELIMITER)


def _check_task_state(model, tok, decomps, state, chunks, split_docs, delta):
    base_chunks, base_split = state.base["chunks"], state.base["split"]
    ranks: dict[str, int] = {}
    for s in state.steps:
        k = s["kappa"]
        grid = budgets.rank_grid(k)
        per_chunk: dict[int, dict[int, float]] = {}
        split = {}
        for key, v in s["tried"].items():
            a, r = key.split(":")
            (split if a == "split" else per_chunk.setdefault(int(a), {}))[int(r)] = v
        # each chunk: the linear scan stops at the first grid rank within delta of the dense chunk accuracy
        smallest = []
        for i in sorted(per_chunk):
            tried = per_chunk[i]
            passing = [r for r in sorted(tried) if tried[r] >= base_chunks[i] - delta - 1e-12]
            assert sorted(tried) == [g for g in grid[:-1] if not passing or g <= passing[0]]
            smallest.append(passing[0] if passing else k)
        assert sorted(per_chunk) == list(range(len(smallest)))  # chunks in order; stop once one needs kappa
        if k in smallest:
            assert smallest.index(k) == len(smallest) - 1 and s["rank"] is None and not split
            continue
        assert len(smallest) == len(chunks)
        want = max(smallest)
        assert list(split) == [want]
        keep = split[want] >= base_split - delta - 1e-12
        assert s["rank"] == (want if keep else None)
        assert s["bound"] == pytest.approx(base_split - delta)
        if keep:
            ranks[s["path"]] = want
            # independent: a fresh scorer (full forward pass) on the compressed model
            with lowrank.decomposed(model, decomps, "feature", ranks):
                assert _task_mc(model, tok, split_docs).accuracy(0) == pytest.approx(split[want])
    assert state.ranks == ranks


def test_task_search(sharp):
    model, tok, decomps, _ = sharp
    docs = tasks.build_docs("commonsense", 60, 0)
    # chunk=0.1 needs a search split of at least 3 x 0.1 (the default 0.2 is refused)
    with pytest.raises(ValueError):
        experiments.task_splits(docs, chunk=0.1)
    sp = experiments.task_splits(docs, chunk=0.1, search=0.4)
    chunks = [_task_mc(model, tok, c) for c in sp.chunks]
    split = _task_mc(model, tok, sp.search)
    state = search.task_search(model, decomps, chunks, split, "feature", 0.0, protected=2)
    assert state.base == {"chunks": [c.accuracy(0) for c in chunks], "split": split.accuracy(0)}
    assert [s["path"] for s in state.steps] == _expected_order(4, 2)
    _check_task_state(model, tok, decomps, state, chunks, sp.search, 0.0)
    kept = [s["rank"] for s in state.steps]
    assert None in kept and 1 in kept and any(r not in (None, 1) for r in kept)  # a real mix

    def chunks_scored(s):
        return {k.split(":")[0] for k in s["tried"]} - {"split"}

    assert all(chunks_scored(s) == {"0", "1", "2"} for s in state.steps)  # chunk 2 is the hard one here
    # the max over chunks does not depend on their order; with the hard chunk first the scan stops early
    hard_first = search.task_search(model, decomps, [chunks[2], chunks[0], chunks[1]], split, "feature", 0.0, 2)
    assert [s["rank"] for s in hard_first.steps] == kept
    assert any(chunks_scored(s) == {"0"} for s in hard_first.steps)
    assert all(chunks_scored(s) == {"0"} for s in hard_first.steps if s["rank"] is None and "split:" not in str(s))

    only3 = search.task_search(model, decomps, chunks, split, "feature", 0.0, protected=1, layers=[3])
    assert [s["path"] for s in only3.steps] == _expected_order(4, 3)
    assert {s["layer"] for s in only3.steps} == {3}


def test_task_search_split_veto(sharp):
    """Chunks that always pass (single-choice docs are always right) leave the decision to the split; a split
    of the docs the dense model gets right (accuracy 1) vetoes any module whose rank-1 pair flips one."""
    model, tok, decomps, _ = sharp
    docs = tasks.build_docs("commonsense", 60, 0)
    right = [d for d, c in zip(docs, _task_mc(model, tok, docs).correct(0), strict=True) if c]
    easy = [_task_mc(model, tok, [{**d, "choices": d["choices"][:1], "gold": 0} for d in docs[:6]])]
    split = _task_mc(model, tok, right)
    state = search.task_search(model, decomps, easy, split, "feature", 0.0, protected=2)
    assert state.base == {"chunks": [1.0], "split": 1.0}
    assert all(s["tried"]["0:1"] == 1.0 for s in state.steps)  # every chunk passes at rank 1
    _check_task_state(model, tok, decomps, state, easy, right, 0.0)
    vetoed = [s for s in state.steps if s["rank"] is None]
    assert vetoed and all(s["tried"]["split:1"] < 1.0 for s in vetoed)
    assert any(s["rank"] == 1 for s in state.steps)
    loose = search.task_search(model, decomps, easy, split, "feature", 1.0, protected=2)
    assert all(s["rank"] == 1 for s in loose.steps)  # delta = 1: nothing can be vetoed


# ----------------------------------------------------------------------------------- task splits


@pytest.mark.parametrize(("n", "chunk", "search"), [(1838, 122, 367), (3270, 217, 654), (1267, 84, 253)])
def test_task_splits_reference_sizes(n, chunk, search):
    docs = [{"id": i} for i in range(n)]
    sp = experiments.task_splits(docs)
    assert [len(c) for c in sp.chunks] == [chunk] * 3
    assert len(sp.search) == search and len(sp.test) == n - search  # the last doc is kept (1471 for piqa)
    ids = lambda part: [d["id"] for d in part]  # noqa: E731
    chunk_ids = [i for c in sp.chunks for i in ids(c)]
    assert len(set(chunk_ids)) == len(chunk_ids) and set(chunk_ids) <= set(ids(sp.search))
    assert not set(ids(sp.search)) & set(ids(sp.test))
    assert sorted(ids(sp.search) + ids(sp.test)) == list(range(n))
    assert [d["id"] for d in docs] == list(range(n))  # the caller's list is not shuffled in place


def test_task_splits_shuffle_is_seeded():
    docs = [{"id": i} for i in range(100)]
    a, b = experiments.task_splits(docs), experiments.task_splits(docs)
    assert a == b
    order = list(range(100))
    random.Random(42).shuffle(order)
    assert [d["id"] for d in a.search + a.test] == order
    assert experiments.task_splits(docs, seed=43).search != a.search


def test_task_splits_rejects_bad_fractions():
    docs = [{"id": i} for i in range(100)]
    for kwargs in ({"chunk": 0.0}, {"chunk": -0.1}, {"chunk": 0.1, "search": 0.2}, {"search": 1.0},
                   {"chunk": 0.5, "search": 1.5}):
        with pytest.raises(ValueError):
            experiments.task_splits(docs, **kwargs)
    with pytest.raises(ValueError, match="docs"):
        experiments.task_splits(docs[:10])  # floor(0.0666 x 10) = 0: empty chunks


def test_task_splits_three_tenths_fit_in_thirty_percent():
    """3 chunks of 10% fit a 30% search split exactly; the float product 3 x 0.1 = 0.30000000000000004
    must not make it refuse."""
    sp = experiments.task_splits([{"id": i} for i in range(60)], chunk=0.1, search=0.3)
    assert [len(c) for c in sp.chunks] == [6, 6, 6] and len(sp.search) == 18


# ------------------------------------------------------------------------------- held-out windows


def test_heldout_windows_disjoint(byte_tok):
    tok = byte_tok
    test, search = experiments.heldout_windows(tok, KEY, "synthetic", 2, 32, 3, 16)
    assert test.shape == (2, 32) and search.shape == (3, 16)
    assert (test[:, 0] == tok.bos_token_id).all() and (search[:, 0] == tok.bos_token_id).all()
    stream = tok(data.synthetic_text(seed=0) + "\n\n", add_special_tokens=False)["input_ids"]
    test_body = test[:, 1:].reshape(-1).tolist()
    search_body = search[:, 1:].reshape(-1).tolist()
    assert stream[:len(test_body)] == test_body  # the test windows are the start of the held-out stream

    def find(seq):
        return next(i for i in range(len(stream) - len(seq) + 1) if stream[i:i + len(seq)] == seq)

    starts = [find(search[j, 1:].tolist()) for j in range(3)]
    assert find(search_body) == starts[0]  # the search windows are consecutive in the stream
    assert starts[0] >= len(test_body)  # and begin after the test tokens: no shared span


# ------------------------------------------------------------------------------------------ noise


def test_paired_noise_constant_shift():
    g = torch.Generator().manual_seed(0)
    T, n = 31, 20
    dense = -T * (3.0 + torch.rand(n, generator=g, dtype=torch.float64))
    shift = 0.125
    out = experiments.paired_noise(dense, dense - shift * T, T)
    assert out["log_ratio"] == pytest.approx(shift, abs=1e-12)
    assert out["se"] == pytest.approx(0.0, abs=1e-12) and out["windows"] == n
    # the log-ratio is log(ppl_candidate / ppl_dense)
    cand = dense - shift * T
    ratio = math.log(math.exp(-float(cand.sum()) / (n * T)) / math.exp(-float(dense.sum()) / (n * T)))
    assert out["log_ratio"] == pytest.approx(ratio, rel=1e-9)


def test_paired_noise_standard_error():
    rng = np.random.default_rng(1)
    T, n, std = 16, 400, 0.3
    dense = torch.tensor(-T * (4.0 + rng.random(n)))
    noise = rng.normal(0.02, std, n)
    out = experiments.paired_noise(dense, dense - T * torch.tensor(noise), T)
    assert out["log_ratio"] == pytest.approx(noise.mean(), abs=1e-12)
    assert out["se"] == pytest.approx(noise.std(ddof=1) / math.sqrt(n), rel=1e-9)
    assert out["se"] == pytest.approx(std / math.sqrt(n), rel=0.1)
    assert math.isnan(experiments.paired_noise(dense[:1], dense[:1] - 1.0, T)["se"])


# ------------------------------------------------------------------------------------- diagnosis


def _synthetic_decomp(layer: int, kind_name: str, vals, mu) -> decomposition.Decomposition:
    m = len(mu)
    eye = torch.eye(m)
    t = budgets.Target(layer, kind_name, f"model.layers.{layer}.{kind_name}")
    spectra = {"centred": (torch.tensor(vals), eye), "uncentred": (torch.tensor(vals), eye)}
    return decomposition.Decomposition(t, m, m, False, torch.tensor(mu), spectra,
                                 (eye, torch.ones(m), eye), m)


def test_mean_diagnosis_planted():
    vals = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625]
    # m = n = 8: kappa 4, pct 50 -> rank 2 keeps eigenvectors e0, e1
    inside = _synthetic_decomp(2, "self_attn.q_proj", vals, [3.0, 1.0, 0, 0, 0, 0, 0, 0])
    outside = _synthetic_decomp(2, "self_attn.k_proj", vals, [3.0, 0, 0, 0, 0, 2.0, 0, 0])
    other = _synthetic_decomp(5, "self_attn.q_proj", vals, [1.0] * 8)
    decomps = {d.target.path: d for d in (inside, outside, other)}
    frame = experiments.mean_diagnosis(decomps, 50, [2])
    assert len(frame) == 2 and frame.layer.tolist() == [2, 2] and frame.kind.tolist() == ["q", "k"]
    lost_var = sum(vals[2:])
    assert frame.lost_var.tolist() == pytest.approx([lost_var, lost_var])
    assert frame.lost_mean.tolist() == pytest.approx([0.0, 4.0], abs=1e-12)
    assert frame.mean_norm2.tolist() == pytest.approx([10.0, 13.0])
    assert frame.ratio.tolist() == pytest.approx([0.0, 4.0 / lost_var], abs=1e-12)


def test_mean_diagnosis_real(plain):
    _, _, decomps = plain
    frame = experiments.mean_diagnosis(decomps, 80, [2, 3])
    assert len(frame) == 14 and set(frame.layer) == {2, 3} and frame.kind.tolist()[:7] == KINDS
    for row, d in zip(frame.itertuples(), [d for d in decomps.values() if d.target.layer >= 2], strict=True):
        r = budgets.rank_for(0.8, d.kappa)
        v = d.spectra["centred"][1][:, :r].double()
        mu = d.mean.double()
        assert row.lost_mean == pytest.approx(float(mu @ mu - (v.T @ mu) @ (v.T @ mu)), rel=1e-4, abs=1e-9)
        assert 0 <= row.lost_mean <= row.mean_norm2 * (1 + 1e-9)
        assert row.lost_var == pytest.approx(float(d.spectra["centred"][0][r:].double().sum()), rel=1e-9)


def _fake_state(criterion="perplexity"):
    def step(layer, name, rank, kappa, score):
        key = str(rank) if criterion == "perplexity" else f"split:{rank}"
        tried = {"1": 9.0, key: score} if rank is not None else {"1": 9.0, "3": 8.0}
        return {"path": f"model.layers.{layer}.{name}", "layer": layer, "kind": name.split(".")[-1][:-5],
                "rank": rank, "kappa": kappa, "tried": tried, "bound": 5.0, "share": 0.9}

    steps = [step(3, "mlp.down_proj", 24, 48, 4.0), step(3, "mlp.up_proj", None, 48, None),
             step(3, "mlp.gate_proj", 12, 48, 4.5), step(2, "mlp.down_proj", 48 // 4, 48, 4.9),
             step(2, "mlp.up_proj", 6, 48, 4.95)]
    return search.SearchState(criterion, "feature", {}, {"ppl": 3.0}, steps)


def test_search_frame_rank_matrix_layer_ends():
    state = _fake_state()
    frame = experiments.search_frame(state)
    assert frame.layer.tolist() == [3, 3, 3, 2, 2]
    assert frame.kind.tolist() == ["down", "up", "gate", "down", "up"]
    assert frame.fraction.tolist() == [0.5, 1.0, 0.25, 0.25, 0.125]
    assert frame.score.tolist()[:1] == [4.0] and frame.score.tolist()[2:] == [4.5, 4.9, 4.95]
    assert frame.score.isna().tolist() == [False, True, False, False, False]
    assert frame.evaluated.tolist() == [2, 2, 2, 2, 2]
    task = experiments.search_frame(_fake_state("task"))
    assert task.score.tolist()[2:] == [4.5, 4.9, 4.95] and task.score.isna().tolist()[1]

    m = experiments.rank_matrix(frame, KINDS, [0, 1, 2, 3])
    assert m.shape == (4, 7)
    want = np.full((4, 7), np.nan)
    want[3, 6], want[3, 5], want[3, 4], want[2, 6], want[2, 5] = 0.5, 1.0, 0.25, 0.25, 0.125
    np.testing.assert_array_equal(m, want)  # NaN exactly where not searched
    assert experiments.rank_matrix(frame, ["down"], [3]).tolist() == [[0.5]]
    assert experiments.layer_ends(state) == [3, 5]


def test_thirds():
    m = np.array([[0.2] * 7, [0.5] * 7, [0.9] * 7])
    assert experiments.thirds(m) == pytest.approx([0.2, 0.5, 0.9])
    six = np.repeat(m, 2, axis=0)
    six[0, :3] = np.nan  # not searched: ignored
    assert experiments.thirds(six) == pytest.approx([0.2, 0.5, 0.9])
    uneven = np.array([[0.0], [1.0], [2.0], [3.0], [4.0]])  # array_split: rows 0-1, 2-3, 4
    assert experiments.thirds(uneven) == pytest.approx([0.5, 2.5, 4.0])


def test_real_state_frame_and_trajectory(sharp):
    model, _, decomps, inputs = sharp
    state = search.perplexity_search(model, decomps, inputs, "feature", 1.03, 2)
    frame = experiments.search_frame(state)
    assert len(frame) == 14 and experiments.layer_ends(state) == [7, 14]
    for row, s in zip(frame.itertuples(), state.steps, strict=True):
        assert row.fraction == (1.0 if s["rank"] is None else s["rank"] / s["kappa"])
        if s["rank"] is not None:
            assert row.score == s["tried"][str(s["rank"])] <= row.bound
    m = experiments.rank_matrix(frame, KINDS, [0, 1, 2, 3])
    assert np.isnan(m[:2]).all() and not np.isnan(m[2:]).any()
    assert (m[2:] > 0).all() and (m[2:] <= 1).all()

    points = experiments.trajectory(model, decomps, state, [1, 7, 14], inputs.perplexity)
    assert [p["m"] for p in points] == [1, 7, 14] and [p["layer"] for p in points] == [3, 3, 2]
    last_kept = [s for s in state.steps if s["rank"] is not None][-1]
    assert points[-1]["value"] == pytest.approx(last_kept["tried"][str(last_kept["rank"])], rel=1e-12)
    assert points[-1]["share"] == pytest.approx(state.steps[-1]["share"])
    first = state.steps[0]
    want = state.base["ppl"] if first["rank"] is None else first["tried"][str(first["rank"])]
    assert points[0]["value"] == pytest.approx(want, rel=1e-12)
    with lowrank.decomposed(model, decomps, "feature", state.ranks):  # the full model agrees
        assert points[-1]["value"] == pytest.approx(_hf_ppl(model, inputs.ids), rel=1e-5)


# -------------------------------------------------------------------------------- uniform table


def _windows(seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 259, (4, 16), generator=g)


def _expected_share(model, decomps, pct, layers, bias: bool) -> float:
    total = sum(p.numel() for p in model.parameters())
    after = total
    for d in decomps.values():
        if d.target.layer in layers:
            mod = model.get_submodule(d.target.path)
            m, n = mod.weight.shape
            r = max(1, math.floor(pct / 100 * ((m * n) // (m + n)) + 1e-9))
            after += r * (m + n) + (m if bias else 0) - m * n
    return after / total


def test_uniform_table(plain, monkeypatch, tmp_path):
    model, tok, decomps = plain
    zs = experiments.suite(model, tok, KEY, ("commonsense",), 8)
    windows = layer_inputs.LayerInputs(model, _windows(), batch_size=4)
    eigh_before = len(decomposition.EIGH_CALLS)
    table = experiments.uniform_table(model, KEY, decomps, windows, zs, ("weight_svd", "feature"), (100, 50), 1)
    assert table[["method", "pct"]].values.tolist() == [["dense", 100], ["weight_svd", 100], ["weight_svd", 50],
                                                         ["feature", 100], ["feature", 50]]
    dense = table.iloc[0]
    assert dense.ppl == windows.perplexity(0)
    assert dense.ppl == pytest.approx(_hf_ppl(model, windows.ids), rel=1e-5)
    assert len(dense.window_nll) == 4 and math.exp(np.mean(dense.window_nll)) == pytest.approx(dense.ppl, rel=1e-12)
    assert dense.share == 1.0 and dense.params == budgets.param_count(model)
    correct = evaluation.multiple_choice(model, tok, KEY, zs.tasks["commonsense"].docs, "acc").correct(0)
    assert dense.acc == pytest.approx(sum(correct) / len(correct)) and dense.correct == {"commonsense": correct}
    assert dense.chance == pytest.approx(tasks.chance_level("commonsense", zs.tasks["commonsense"].docs))
    s = {(r.method, r.pct): r.share for r in table.itertuples()}
    layers = [1, 2, 3]
    for method in ("weight_svd", "feature"):
        assert s[(method, 50)] < s[(method, 100)]
        assert s[(method, 50)] < 1
        for pct in (100, 50):
            assert s[(method, pct)] == pytest.approx(_expected_share(model, decomps, pct, layers, method == "feature"))
    assert s[("weight_svd", 100)] < 1  # the k/v projections' floor(kappa) saves a little
    for r in table.itertuples():  # the share is the real parameter count of the factorised model
        assert r.share == pytest.approx(r.params / dense.params)
    assert table.ppl.nunique() == len(table)  # every cell really evaluated its own model

    # cached: the second call evaluates nothing
    def boom(*a, **k):
        raise AssertionError("evaluated instead of read from the cache")

    monkeypatch.setattr(layer_inputs.LayerInputs, "perplexity_and_windows", boom)
    monkeypatch.setattr(evaluation.MultipleChoice, "correct", boom)
    again = experiments.uniform_table(model, KEY, decomps, windows, zs, ("weight_svd", "feature"), (100, 50), 1)
    assert again.equals(table)
    monkeypatch.setenv("REPRO_CACHE", str(tmp_path / "other"))  # the plant: without the cache it evaluates
    with pytest.raises(AssertionError, match="evaluated"):
        experiments.uniform_table(model, KEY, decomps, windows, zs, ("weight_svd", "feature"), (100, 50), 1)
    assert len(decomposition.EIGH_CALLS) == eigh_before


def test_uniform_table_scores_accuracy_only_at_acc_pcts(plain, monkeypatch, tmp_path):
    """``acc_pcts``: the dense row and those budgets get the tasks, the other budgets perplexity only (NaN accuracy),
    and record_uniform then records the accuracy comparison and the mean over budgets from the scored budgets
    alone. A budget outside ``pcts`` is refused."""
    model, tok, decomps = plain
    monkeypatch.setenv("REPRO_CACHE", str(tmp_path))
    zs = experiments.suite(model, tok, KEY, ("commonsense",), {"commonsense": 8})
    windows = layer_inputs.LayerInputs(model, _windows(), batch_size=4)
    table = experiments.uniform_table(model, KEY, decomps, windows, zs, ("weight_svd", "feature"), (100, 50), 1,
                                      acc_pcts=(50,))
    scored = {(r.method, r.pct) for r in table.itertuples() if not math.isnan(r.acc)}
    assert scored == {("dense", 100), ("weight_svd", 50), ("feature", 50)}
    full = experiments.uniform_table(model, KEY, decomps, windows, zs, ("weight_svd", "feature"), (100, 50), 1)
    assert not full.acc.isna().any()  # the plant: without acc_pcts every cell is scored
    assert table.ppl.tolist() == full.ppl.tolist()
    recorded = {}
    monkeypatch.setattr(experiments, "record", lambda key, value, **kw: recorded.setdefault(key, value))
    experiments.record_uniform(KEY, table, "note")
    assert f"{KEY}/lowrank/50/feature_minus_svd_acc" in recorded
    assert f"{KEY}/lowrank/100/feature_minus_svd_acc" not in recorded
    assert f"{KEY}/lowrank/feature/100/acc" not in recorded and f"{KEY}/lowrank/feature/100/ppl" in recorded
    assert recorded[f"{KEY}/lowrank/feature_minus_svd_acc_mean"] == pytest.approx(
        recorded[f"{KEY}/lowrank/50/feature_minus_svd_acc"])  # one scored budget: its mean is itself
    with pytest.raises(ValueError, match="acc_pcts"):
        experiments.uniform_table(model, KEY, decomps, windows, zs, ("feature",), (100, 50), 1, acc_pcts=(80,))


def test_uniform_table_cache_follows_decompositions(plain, monkeypatch, tmp_path):
    """A cell computed from decompositions on other calibration data is another result: it must not be
    served from the cache of the first."""
    model, _, decomps = plain
    other = decomposition.decompose_model(model, _calibration(seed=7), batch_size=4)
    windows = layer_inputs.LayerInputs(model, _windows(), batch_size=4)
    monkeypatch.setenv("REPRO_CACHE", str(tmp_path / "fresh"))
    fresh = experiments.uniform_table(model, KEY, other, windows, None, ("feature",), (50,), 1)
    monkeypatch.setenv("REPRO_CACHE", str(tmp_path / "shared"))
    first = experiments.uniform_table(model, KEY, decomps, windows, None, ("feature",), (50,), 1)
    assert first.ppl.iloc[1] != fresh.ppl.iloc[1]  # the plant: the calibration changes the feature cell
    second = experiments.uniform_table(model, KEY, other, windows, None, ("feature",), (50,), 1)
    assert second.ppl.iloc[1] == fresh.ppl.iloc[1]


def test_suite_evaluate(plain):
    model, tok, _ = plain
    zs = experiments.suite(model, tok, KEY, ("commonsense",), 8)
    out = zs.evaluate(0)
    correct = zs.tasks["commonsense"].correct(0)
    assert out["acc"] == pytest.approx(sum(correct) / 8) and out["tasks"] == ["commonsense"]
    assert out["ci95"][0] <= out["acc"] <= out["ci95"][1] and out["correct"] == {"commonsense": correct}
    assert zs.evaluate(2) == out  # from layer 2's cached inputs: the same


def test_suite_scores_paper_tasks_as_lm_eval_does(plain, monkeypatch):
    """Paper tasks in the cached scorer (notebook 05's paper profile refused them) give lm-eval's per-item
    answers, for ARC's shared context and WinoGrande's per-choice contexts, on the dry run's stand-ins."""
    monkeypatch.setenv("REPRO_WEIGHTS", "random")
    model, tok, _ = plain
    names = ("arc_easy", "winogrande")
    zs = experiments.suite(model, tok, KEY, names, 12)
    ref = evaluation.zero_shot(model, tok, list(names), 12, seed=0, batch_size=4,
                               prepend_bos=models.get_spec(KEY).prepend_bos)
    for name in names:
        assert zs.tasks[name].correct(0) == ref[name]["correct"], name
        assert zs.tasks[name].metric == ref[name]["metric"] == tasks.PAPER_TASKS[name]
    assert any(0 < sum(ref[n]["correct"]) < 12 for n in names)  # a mix: agreement is informative


# ------------------------------------------------------------------------ one decomposition each


def test_each_decomposition_computed_once_and_reused(sharp, tmp_path):
    model, tok, _, inputs = sharp
    n_targets = len(budgets.targets(model))
    before = len(decomposition.EIGH_CALLS)
    decomps = decomposition.decompose_model(model, _calibration(), batch_size=4, cache=tmp_path / "dec")
    calls = decomposition.EIGH_CALLS[before:]
    assert len(calls) == 2 * n_targets == len(set(calls))  # centred + uncentred, once per module
    assert {c.rsplit(":", 1)[0] for c in calls} == set(decomps)
    after = len(decomposition.EIGH_CALLS)
    again = decomposition.decompose_model(model, _calibration(), batch_size=4, cache=tmp_path / "dec")
    assert len(decomposition.EIGH_CALLS) == after and set(again) == set(decomps)  # read back, not recomputed

    experiments.uniform_table(model, KEY, decomps, inputs, None, ("weight_svd", "feature", "feature_uncentred"),
                               (100, 50), 2)
    search.perplexity_search(model, decomps, inputs, "feature", 1.03, 2)
    docs = tasks.build_docs("commonsense", 60, 0)
    sp = experiments.task_splits(docs, chunk=0.1, search=0.4)
    chunks = [_task_mc(model, tok, c) for c in sp.chunks[:1]]
    search.task_search(model, decomps, chunks, _task_mc(model, tok, sp.search), "feature", 0.0, 2, layers=[3])
    assert len(decomposition.EIGH_CALLS) == after
