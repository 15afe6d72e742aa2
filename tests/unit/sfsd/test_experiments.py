"""Notebook 05's record functions and helpers in ``common.sfsd.experiments`` on planted values."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from common.core import evaluation, manifest, profiles
from common.sfsd import experiments, paper


def _uniform_frame() -> pd.DataFrame:
    """``uniform_table``'s rows on planted per-unit values: weight SVD 2 nats a window worse than feature at
    both budgets, feature_nomean as good; at 80% feature right on 20 more of 40 items a task than SVD, at
    50% the same accuracy on other items."""
    rng = np.random.default_rng(0)
    nll = rng.normal(3.0, 0.3, 16)
    svd = (rng.random((2, 40)) < 0.3).astype(float)
    better = np.where(svd == 0, (rng.permutation(40) < 30).astype(float), 1.0)  # about +20 items a task
    rows = [("dense", 100, nll - 0.1, {"a": np.ones(40), "b": np.ones(40)})]
    for pct, feature in ((80, better), (50, svd[:, rng.permutation(40)])):
        rows += [("feature", pct, nll, {"a": feature[0], "b": feature[1]}),
                 ("weight_svd", pct, nll + 2.0 + rng.normal(0, 0.3, 16), {"a": svd[0], "b": svd[1]}),
                 ("feature_nomean", pct, nll + rng.normal(0, 0.3, 16), {"a": svd[0], "b": svd[1]})]
    return pd.DataFrame([{"method": m, "pct": p, "ppl": math.exp(w.mean()), "window_nll": w.tolist(), "share": p / 100,
                          "params": p, "acc": np.mean([c["a"].mean(), c["b"].mean()]), "ci95": [0.0, 1.0], "chance": 0.25,
                          "correct": {t: v.tolist() for t, v in c.items()}} for m, p, w, c in rows])


def test_record_uniform_intervals(records) -> None:
    """Perplexity ratios paired over windows (a planted 2-nat gap excluded, none held), accuracy differences
    paired over items within tasks (a planted gain excluded, none held), the mean over budgets likewise; the
    values are the ratios and differences of the cells, as before."""
    frame = _uniform_frame()
    experiments.record_uniform("m", frame, "2 tasks")
    rec, cells = records(), frame.set_index(["method", "pct"])
    for pct in (80, 50):
        svd, nomean = rec[f"m/lowrank/{pct}/weight_svd_over_feature_ppl"], rec[f"m/lowrank/{pct}/feature_nomean_over_feature_ppl"]
        assert svd["value"] == cells.loc[("weight_svd", pct), "ppl"] / cells.loc[("feature", pct), "ppl"]
        assert svd["ci95"][0] > math.exp(1.5) and "16 test windows" in svd["note"]
        assert nomean["ci95"][0] < 1.0 < nomean["ci95"][1]
    gain, flat = rec["m/lowrank/80/feature_minus_svd_acc"], rec["m/lowrank/50/feature_minus_svd_acc"]
    assert gain["value"] == cells.loc[("feature", 80), "acc"] - cells.loc[("weight_svd", 80), "acc"]
    assert gain["ci95"][0] > 0.2 and "80 items" in gain["note"] and "2 tasks" in gain["note"]
    assert flat["value"] == pytest.approx(0.0, abs=1e-12) and flat["ci95"][0] < 0.0 < flat["ci95"][1]
    both = rec["m/lowrank/feature_minus_svd_acc_mean"]
    assert both["value"] == pytest.approx((gain["value"] + flat["value"]) / 2)
    assert 0.0 < both["ci95"][0] < both["value"] < both["ci95"][1] < gain["value"]


def test_record_mean_diagnosis(records) -> None:
    """Per kind, the ratios sorted by layer; then the massive layer."""
    diag = pd.DataFrame({"layer": [5, 4, 4, 5], "kind": ["q", "q", "up", "up"], "ratio": [2.0, 1.0, 0.5, 0.25]})
    experiments.record_mean_diagnosis("m", diag, 3)
    rec = records()
    assert list(rec) == ["m/lowrank/meancomp/q/lost_mean_over_var", "m/lowrank/meancomp/up/lost_mean_over_var",
                         "m/lowrank/meancomp/massive_layer"]
    assert rec["m/lowrank/meancomp/q/lost_mean_over_var"]["value"] == [1.0, 2.0]
    assert rec["m/lowrank/meancomp/up/lost_mean_over_var"]["value"] == [0.5, 0.25]
    assert rec["m/lowrank/meancomp/massive_layer"]["value"] == 3


def test_record_mean_term_ablation(records) -> None:
    experiments.record_mean_term_ablation("m", {"none": 10.0, "q": 11.0, "all": 100.0})
    rec = records()
    assert {k: r["value"] for k, r in rec.items()} == {"m/lowrank/meancomp/drop_none/ppl": 10.0,
                                                       "m/lowrank/meancomp/drop_q/ppl": 11.0,
                                                       "m/lowrank/meancomp/drop_all/ppl": 100.0}


def test_record_search_noise_returns_the_first_module_count_above_2se(records) -> None:
    """m log t > 2 SE first at m = ceil(2 SE / log t) (strictly above), returned and recorded."""
    t, se = 1.005, 0.02
    first = experiments.record_search_noise("m", {"se": se, "log_ratio": -0.1, "windows": 4}, t)
    assert first == math.floor(2 * se / math.log(t)) + 1
    rec = records()
    assert rec["m/lowrank/search/noise_se"]["value"] == se
    assert rec["m/lowrank/search/noise_log_ratio"]["value"] == -0.1
    assert rec["m/lowrank/search/noise_relative_se"]["value"] == pytest.approx(0.2)
    assert rec["m/lowrank/search/bound_above_2se_after"]["value"] == first
    assert experiments.record_search_noise("m", {"se": 10.0, "log_ratio": 1.0, "windows": 4}, t) is None


def _search_state(m: int, t: float = 1.005, base: float = 10.0) -> SimpleNamespace:
    """A finished perplexity search of ``m`` visited modules (its steps' bounds as ``perplexity_search`` stores
    them: dense ppl x t^i for the i-th module visited)."""
    return SimpleNamespace(base={"ppl": base}, settings={"tolerance": t},
                           steps=[{"bound": base * t ** i} for i in range(1, m + 1)])


def test_record_search(records) -> None:
    """Rank map (NaN -> null), thirds, last - first third, share, the last accepted score, test ppl, evaluations."""
    ranks = np.array([[1.0, 0.5], [0.5, np.nan], [0.25, 0.25]])
    frame = pd.DataFrame({"share": [0.9, 0.8], "score": [12.0, None], "bound": [12.5, 12.6], "evaluated": [3, 4]})
    state = _search_state(2)
    nll = np.linspace(2.9, 3.1, 4)
    points = [{"m": 2, "value": 20.0, "window_nll": (nll + 0.1).tolist()}]
    third = experiments.record_search("m", state, frame, ranks, ["q", "k"], [4, 5, 6], points, "bisect", nll)
    assert third == [0.75, 0.5, 0.25]
    rec = records()
    assert rec["m/lowrank/search/ranks"]["value"] == [[1.0, 0.5], [0.5, None], [0.25, 0.25]]
    assert rec["m/lowrank/search/rank_fraction_thirds"]["value"] == third
    assert rec["m/lowrank/search/last_minus_first_third"]["value"] == -0.5
    assert rec["m/lowrank/search/last_minus_first_third"]["ci95"] is None  # one layer a third: no interval
    assert rec["m/lowrank/search/whole_model_pct"]["value"] == pytest.approx(80.0)
    assert rec["m/lowrank/search/ppl_search"]["value"] == 12.0
    assert rec["m/lowrank/search/ppl_test"]["value"] == 20.0
    assert rec["m/lowrank/search/evaluations"]["value"] == 7
    frame["score"] = [None, None]
    experiments.record_search("m", state, frame, ranks, ["q", "k"], [4, 5, 6], points, "bisect", nll)
    assert records()["m/lowrank/search/ppl_search"]["value"] == 10.0  # nothing accepted: the dense score
    with pytest.raises(ValueError, match="not the search's final state"):
        experiments.record_search("m", state, frame, ranks, ["q", "k"], [4, 5, 6], [{**points[0], "m": 1}], "bisect", nll)


def test_record_search_test_over_bound(records) -> None:
    """(searched / dense test perplexity) / t^m with m = modules visited, the interval the paired bootstrap over
    the test windows divided by the bound. Planted: every window 0.3 nats worse than dense against a bound of
    1.005^20 = 1.105 (ratio 1.35): the interval lies above 1. The searched model landing right on its bound
    (window noise around log t^m): the interval holds 1 (the windows differ a lot: only the pairing resolves it)."""
    rng = np.random.default_rng(0)
    dense = rng.normal(3.0, 1.0, 24)
    frame = pd.DataFrame({"share": [0.9], "score": [11.0], "bound": [11.05], "evaluated": [3]})
    ranks = np.array([[1.0], [0.5], [0.5]])
    state = _search_state(20)
    bound = 1.005 ** 20
    for shift, above in ((0.3, True), (math.log(bound), False)):
        searched = dense + shift + rng.normal(0, 0.02, 24)
        points = [{"m": 10, "value": 0.0, "window_nll": dense.tolist()},
                  {"m": 20, "value": math.exp(searched.mean()), "window_nll": searched.tolist()}]
        experiments.record_search("m", state, frame, ranks, ["q"], [4, 5, 6], points, "linear", dense)
        rec = records()
        assert rec["m/lowrank/search/modules_in_bound"]["value"] == 20
        assert rec["m/lowrank/search/bound"]["value"] == pytest.approx(bound)
        over = rec["m/lowrank/search/test_over_bound"]
        assert over["value"] == pytest.approx(math.exp(searched.mean() - dense.mean()) / bound)
        assert over["ci95"][0] <= over["value"] <= over["ci95"][1]
        if above:
            assert over["ci95"][0] > 1.0 and over["value"] == pytest.approx(math.exp(0.3) / bound, rel=0.02)
        else:
            assert over["ci95"][0] < 1.0 < over["ci95"][1]
        assert "paired bootstrap over 24 test windows" in over["note"]
        assert over["paper_value"] == pytest.approx(1.02, abs=0.005) and over["paper_ref"] == "SFSD README Table C"


def test_search_bound_is_the_searchs_own() -> None:
    """t^m with m = modules visited, kept dense or not (``perplexity_search``'s bound); a stored bound that is not
    dense ppl x t^m refuses."""
    assert experiments.search_bound(_search_state(7, t=1.01)) == (pytest.approx(1.01 ** 7), 7)
    state = _search_state(3)
    state.steps[-1]["bound"] *= 1.005
    with pytest.raises(ValueError, match="definition of the bound changed"):
        experiments.search_bound(state)


def test_perplexity_points_keep_each_windows_nll(monkeypatch) -> None:
    """The test points' perplexity and per-window NLLs come from one ``perplexity_and_windows`` pass."""
    monkeypatch.setattr(experiments, "trajectory", lambda model, decomps, state, at, score: [
        {"m": m, "layer": 4, "share": 1 - m / 100, "value": score(m)} for m in at])
    inputs = SimpleNamespace(perplexity_and_windows=lambda start: (float(start), np.full(3, start / 10)))
    points = experiments.perplexity_points(None, {}, None, [2, 5], inputs)
    assert [p["value"] for p in points] == [2.0, 5.0] and points[1]["window_nll"] == [0.5, 0.5, 0.5]
    assert points[0]["m"] == 2 and points[0]["share"] == 0.98


def test_last_minus_first_third_resamples_layers_within_thirds() -> None:
    """Later layers planted smaller: the interval excludes 0; the same depth everywhere: it holds 0; the value
    is ``thirds``' (a layer with no searched module is left out of the interval's units)."""
    rng = np.random.default_rng(0)
    flat = rng.uniform(0.3, 0.9, (9, 7))
    out = experiments.last_minus_first_third(flat)
    third = experiments.thirds(flat)
    assert out["value"] == third[2] - third[0] and out["n"] == 6
    assert out["ci95"][0] < 0.0 < out["ci95"][1]
    falling = flat - np.linspace(0.0, 0.4, 9)[:, None]
    assert experiments.last_minus_first_third(falling)["ci95"][1] < 0.0
    falling[0] = np.nan
    gap = experiments.last_minus_first_third(falling)
    assert gap["n"] == 5 and gap["ci95"][1] < 0.0 and gap["value"] == pytest.approx(np.nanmean(falling[6:]) - np.nanmean(falling[:3]))


def test_record_task_search(records) -> None:
    """Trajectories, dense test accuracy, final differences (the paper's Table B value beside, the test split's
    with its interval paired over items), share, modules."""
    dense = [1.0] * 13 + [0.0] * 7  # 0.65
    final = [1.0] * 12 + [0.0] * 8  # 0.6: one item lost, the others the same
    frame = pd.DataFrame({"modules": [7, 14], "share": [0.99, 0.98], "search": [0.6, 0.65], "test": [0.7, 0.6],
                          "test_correct": [[1.0] * 14 + [0.0] * 6, final]})
    state = SimpleNamespace(steps=[{"rank": 3}, {"rank": None}, {"rank": 1}])
    experiments.record_task_search("m", "wiki_mc", frame, {"search": 0.6, "test": 0.65, "test_correct": dense}, state)
    rec = records()
    base = "m/lowrank/task_search/wiki_mc"
    assert rec[f"{base}/search_acc"]["value"] == [0.6, 0.65] and rec[f"{base}/test_acc"]["value"] == [0.7, 0.6]
    assert rec[f"{base}/dense_test_acc"]["value"] == 0.65
    assert rec[f"{base}/test_minus_dense"]["value"] == pytest.approx(-0.05)
    lo, hi = rec[f"{base}/test_minus_dense"]["ci95"]
    assert lo <= -0.05 <= hi and hi <= 0.0 and lo >= -0.2  # paired: only the one changed item varies
    assert "20 test items" in rec[f"{base}/test_minus_dense"]["note"]
    frame.at[1, "test_correct"] = [1.0] * 5 + [0.0] * 15  # 8 of the 13 dense-correct items lost: excluded
    experiments.record_task_search("m", "wiki_mc", frame, {"search": 0.6, "test": 0.65, "test_correct": dense}, state)
    assert records()[f"{base}/test_minus_dense"]["ci95"][1] < 0.0
    assert rec[f"{base}/test_minus_dense"]["paper_value"] == paper.TASK_SEARCH_TEST_MINUS_DENSE
    assert rec[f"{base}/search_minus_dense"]["value"] == pytest.approx(0.05)
    assert rec[f"{base}/whole_model_pct"]["value"] == pytest.approx(98.0)
    assert rec[f"{base}/modules_compressed"]["value"] == 2


def test_trajectory_marks_and_task_layers() -> None:
    """About four layer ends counted back from the last decision; the task search's layers."""
    state = SimpleNamespace(steps=[{"layer": layer} for layer in (9, 9, 8, 8, 7, 7, 6, 6, 5, 5)])
    assert experiments.layer_ends(state) == [2, 4, 6, 8, 10]
    assert experiments.trajectory_marks(state) == [2, 4, 6, 8, 10]
    state = SimpleNamespace(steps=[{"layer": layer} for layer in range(20, 0, -1)])
    assert experiments.trajectory_marks(state) == [5, 10, 15, 20]
    assert experiments.task_layers([2, 3, 4, 5], None) == [2, 3, 4, 5]
    assert experiments.task_layers([2, 3, 4, 5], 2) == [4, 5]


def test_task_scorers_score_each_split_in_order(monkeypatch) -> None:
    """Chunks, then the search split, then the test split, each with the same metric, batch and cached layers."""
    calls = []
    monkeypatch.setattr(evaluation, "multiple_choice",
                        lambda model, tok, key, docs, metric, batch, keep: calls.append((docs, metric, batch, keep))
                        or len(calls))
    splits = experiments.TaskSplits([["a"], ["b"]], ["a", "b"], ["c"])
    chunks, split_mc, test_mc = experiments.task_scorers(None, None, "m", splits, "acc_norm", [0, 3])
    assert (chunks, split_mc, test_mc) == ([1, 2], 3, 4)
    assert [c[0] for c in calls] == [["a"], ["b"], ["a", "b"], ["c"]]
    assert {(c[1], c[2], tuple(c[3])) for c in calls} == {("acc_norm", 16, (0, 3))}


def test_task_trajectory(monkeypatch) -> None:
    """Both splits re-scored at every layer end; the dense accuracies from the state and the test scorer; the
    test items' 0/1 kept (final state and dense) for the paired interval."""
    monkeypatch.setattr(experiments, "trajectory", lambda model, decomps, state, at, score: [
        {"m": m, "share": 1 - m / 100, "value": score(m)} for m in at])
    state = SimpleNamespace(steps=[{"layer": 5}, {"layer": 5}, {"layer": 4}], base={"split": 0.5})
    split_mc = SimpleNamespace(correct=lambda m: [1.0] * m + [0.0] * (10 - m))
    test_mc = SimpleNamespace(correct=lambda m: [1.0] * (4 - m) + [0.0] * (m + 1))
    frame, dense = experiments.task_trajectory(None, {}, state, split_mc, test_mc)
    assert frame.modules.tolist() == [2, 3] and frame.share.tolist() == [0.98, 0.97]
    assert frame.search.tolist() == [0.2, 0.3] and frame.test.tolist() == pytest.approx([0.4, 0.2])
    assert frame.test_correct.iloc[-1] == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert dense == {"search": 0.5, "test": 0.8, "test_correct": [1.0, 1.0, 1.0, 1.0, 0.0]}


def test_load_and_decompose_and_describe(records) -> None:
    """The smoke profile on tiny-llama: the model's weight identity, protected prefix, windows, decompositions."""
    cfg = profiles.load_config("05_lowrank_decomposition", "smoke")
    key = cfg.models[0]
    run = experiments.load_and_decompose(key, cfg)
    assert key in manifest.current().run["models"]
    assert run["layers"] == list(range(run["protected"], run["layers"][-1] + 1)) and run["protected"] >= 1
    assert {d.target.layer for d in run["decomps"].values()} == set(run["layers"])
    assert run["test"].shape == (cfg.eval_windows, cfg.eval_len) and run["search"].shape[1] == cfg.search_len
    line = experiments.describe(key, run)
    assert line.startswith(f"{key}: ") and f"{len(run['decomps'])} modules decomposed" in line
