"""common.hoc.ablation's notebook-02 functions: one model attacked end to end (no zero-shot tasks), Table 7,
the k-sweep and the circuit records.

Ablation experiments: attack data -> contexts, Table 1 rows and records, the k-sweep, the circuit
attacks and the result cache, on the planted tiny Llama (no real model, no zero-shot tasks)."""

from __future__ import annotations

import json
import math
import types

import numpy as np
import pytest
import torch

from common.core import capture, data, evaluation, manifest, models
from common.core.models import PLANT
from common.core.profiles import load_config
from common.hoc import ablation, detection, edits

CFG = types.SimpleNamespace(corpus="synthetic", n_windows=2, window_len=32, prompts=("Summer is warm.", "I am here."),
                            k=2, batch_size=2, eval_batch_size=2, k_grid=(0, 1, 2), seeds=(0,), tasks=(), n_items=0,
                            sweep_tasks=(), sweep_n_items=0)


def test_a_task_the_intact_model_answers_constantly_leaves_every_mean(records) -> None:
    """Issue 20's rule: 'yes/no' answered 'no' throughout by the intact model cannot show an attack's effect, so
    it leaves the model's accuracy means and differences (all arms), and the manifest says which task left."""
    rng = np.random.default_rng(2)
    nll = rng.normal(3.0, 1.0, 8)
    varied = rng.integers(0, 2, 60).astype(float)
    base = {"mc": varied, "yesno": np.r_[np.ones(30), np.zeros(30)]}
    attacked = {"mc": varied, "yesno": np.zeros(60)}  # only the constant task 'moves'
    rows = {"base": _result(nll, base, constant=("yesno",)), "zero_top1": _result(nll + 1, attacked),
            "keep_top1": _result(nll, base), "random_top1_s0": _result(nll, base)}
    ablation.record_table1("m", rows, 1)
    recs = records()
    assert recs["m/acc/dropped_tasks"]["value"] == ["yesno"] and "['mc']" in recs["m/acc/base"]["note"]
    assert recs["m/acc/base"]["value"] == pytest.approx(varied.mean())
    assert recs["m/acc_delta/zero_top1"]["value"] == 0.0  # with 'yesno' in the mean it would be -0.25
    rows["base"] = _result(nll, base)  # the same answers, but varying: the task stays in
    ablation.record_table1("n", rows, 1)
    assert records()["n/acc_delta/zero_top1"]["value"] == pytest.approx(-0.25)
    assert records()["n/acc/dropped_tasks"]["value"] == []


@pytest.fixture
def attacked(records):
    return ablation.attack_model("tiny-llama", CFG)


def test_attack_model_records_table1_and_runs_the_circuit(attacked, records) -> None:
    m, ranked, rows, windows = attacked
    assert m.report.found and len(ranked) == max(CFG.k_grid) and windows.shape == (2, 32)
    assert {"base", "zero_top2", "keep_top2", "random_top2_s0", "sun_zero", "super_weight"} <= set(rows)
    ablation.record_table1("tiny-llama", rows, CFG.k)
    assert records()["tiny-llama/ppl/zero_top2"]["value"] == rows["zero_top2"]["ppl"]


def test_table7_frame_and_records(attacked, records) -> None:
    m, ranked, _, _ = attacked
    frame = ablation.table7_frame({"tiny-llama": m}, {"tiny-llama": ranked}, CFG.k)
    d = len(m.prompts.pos0["hidden"][0, 0])
    assert frame.loc["tiny-llama", "params attacked (2·k·d)"] == 2 * CFG.k * d
    ablation.record_table7({"tiny-llama": m}, {"tiny-llama": ranked}, CFG.k)
    recs = records()
    assert recs["tiny-llama/table7/top5"]["value"] == ranked[:5]
    assert recs["tiny-llama/table7/massive_layer"]["value"] == m.report.layer
    assert recs["tiny-llama/table7/params_attacked"]["value"] == 2 * CFG.k * d


def test_run_sweep_and_record_sweep(attacked, records) -> None:
    m, ranked, rows, windows = attacked
    frame = ablation.run_sweep("tiny-llama", CFG, windows, m.report.layer, ranked)
    assert frame.loc[("zero", 0), "ppl"] == pytest.approx(rows["base"]["ppl"])
    ablation.record_sweep("tiny-llama", frame, CFG.k_grid, CFG.sweep_tasks, CFG.sweep_n_items)
    recs = records()
    assert recs["tiny-llama/sweep/keep/ppl"]["value"] == frame.loc["keep", "ppl"].tolist()
    assert "tiny-llama/sweep/random/acc" not in recs and recs["tiny-llama/sweep/zero/ppl"]["note"] == "k = [0, 1, 2]"
    assert frame["correct"].isna().all()  # no sweep tasks: no per-item lists, so no accuracy change
    assert recs["tiny-llama/sweep/zero/acc_delta_k3"]["value"] is None  # k = 3 is not in CFG.k_grid
    assert recs["tiny-llama/sweep/keep/acc_delta_k1"]["value"] is None


def _result(window_nll, correct: dict[str, list[float]] | None = None, constant: tuple[str, ...] = ()) -> dict:
    """An ``evaluate`` result from per-window NLLs and, optionally, per-task per-item 0/1 scores; the tasks in
    ``constant`` were answered the same way on every item."""
    nll = np.asarray(window_nll, dtype=float)
    tasks = {t: {"acc": float(np.mean(c)), "correct": list(c), "chance": 0.5, "varies": t not in constant}
             for t, c in correct.items()} if correct else None
    return {"ppl": math.exp(nll.mean()), "window_nll": nll.tolist(), "tasks": tasks,
            "avg": evaluation.average_accuracy(tasks) if tasks else None}


def _sweep_results(ks: tuple[int, ...], correct: dict[tuple[str, int], dict[str, np.ndarray]]) -> dict[str, dict]:
    """``run_sweep``'s results for ``k_sweep``'s attack names over ``ks``: the given per-item 0/1 per (kind, k),
    the intact model's (zero, 0) for every other zero / keep point, no tasks for random."""
    nll = np.full(4, 3.0)
    out = {}
    for k in ks:
        for kind, name in (("zero", f"zero_top{k}"), ("keep", f"keep_top{k}")):
            out[name] = _result(nll + k / 10, correct.get((kind, k), correct[("zero", 0)]))
        out[f"random_top{k}_s0"] = _result(nll)
    return out


def test_record_sweep_acc_deltas_exclude_a_planted_drop_only(records) -> None:
    """zero top-3 planted 50% wrong on the intact model's right items: the change's interval over items lies below
    0 and its value is the difference of the task-averaged accuracies; keep top-1 right on other items at the same
    accuracy: the interval holds 0. Swapped (keep top-1 breaks, zero top-3 does not), the verdicts swap."""
    rng = np.random.default_rng(2)
    ks = (0, 1, 2, 3, 5)
    intact = {t: rng.integers(0, 2, 60).astype(float) for t in ("a", "b")}
    wrong = {t: np.where(rng.random(60) < 0.5, 0.0, c) for t, c in intact.items()}
    same = {t: rng.permutation(c) for t, c in intact.items()}
    for drop, flat in (("zero", "keep"), ("keep", "zero")):
        k_of = {"zero": 3, "keep": 1}
        results = _sweep_results(ks, {("zero", 0): intact, (drop, k_of[drop]): wrong, (flat, k_of[flat]): same})
        frame = ablation.sweep_frame(results, ks)
        assert frame.loc[("zero", 3), "correct"] == {t: r["correct"] for t, r in results["zero_top3"]["tasks"].items()}
        ablation.record_sweep("m", frame, ks, ("a", "b"), 60)
        recs = records()
        hit, miss = (recs[f"m/sweep/{kind}/acc_delta_k{k_of[kind]}"] for kind in (drop, flat))
        expected = results[f"{drop}_top{k_of[drop]}"]["avg"]["acc"] - results["zero_top0"]["avg"]["acc"]
        assert hit["value"] == pytest.approx(expected) and hit["value"] < -0.1
        assert hit["ci95"][0] <= hit["value"] <= hit["ci95"][1] < 0.0
        assert miss["value"] == pytest.approx(0.0) and miss["ci95"][0] < 0.0 < miss["ci95"][1]
        assert "paired bootstrap over 120 items, resampled within each task (2 in all)" in hit["note"]


def test_record_sweep_acc_deltas_are_null_where_the_profile_lacks_them(records) -> None:
    """k = 3 outside the k_grid (smoke: 0, 1, 2, 5, 10): null with the reason, k_grid untouched; no sweep tasks:
    both null."""
    intact = {"a": np.array([1.0, 0.0, 1.0, 1.0])}
    ks = (0, 1, 2, 5)
    ablation.record_sweep("m", ablation.sweep_frame(_sweep_results(ks, {("zero", 0): intact}), ks), ks, ("a",), 4)
    recs = records()
    k3, k1 = recs["m/sweep/zero/acc_delta_k3"], recs["m/sweep/keep/acc_delta_k1"]
    assert k3["value"] is None and k3["ci95"] is None and "k = [3] not in this profile's k_grid [0, 1, 2, 5]" in k3["note"]
    assert k1["value"] == 0.0 and k1["ci95"] == [0.0, 0.0]
    ablation.record_sweep("n", ablation.sweep_frame(_sweep_results(ks, {("zero", 0): None}), ks), ks, (), 0)
    recs = records()
    assert recs["n/sweep/keep/acc_delta_k1"]["value"] is None and "no sweep tasks" in recs["n/sweep/keep/acc_delta_k1"]["note"]


def test_record_circuit_gives_each_ratio_its_paired_interval_over_windows(records) -> None:
    """A planted NLL rise on every window excludes a ratio of 1; window-sized noise around the intact model does
    not (the windows differ a lot from each other: only the pairing makes the rise visible)."""
    rng = np.random.default_rng(0)
    base = rng.normal(3.0, 1.0, 24)
    rows = {"m": {"base": _result(base), "sun_zero": _result(base + 0.1 + rng.normal(0, 0.02, 24)),
                  "sun_mean": _result(base + rng.normal(0, 0.02, 24)), "zero_top2": _result(base + 5)}}
    ablation.record_circuit(rows)
    recs = records()
    zero, mean = recs["m/circuit/sun_zero/ppl_ratio"], recs["m/circuit/sun_mean/ppl_ratio"]
    assert zero["value"] == pytest.approx(rows["m"]["sun_zero"]["ppl"] / rows["m"]["base"]["ppl"])
    assert 1.0 < zero["ci95"][0] <= zero["value"] <= zero["ci95"][1]
    assert mean["ci95"][0] < 1.0 < mean["ci95"][1] and "paired bootstrap over 24 windows" in mean["note"]
    assert "m/circuit/zero_top2/ppl_ratio" not in recs  # a Table 1 row, not a circuit attack


def test_record_table1_intervals_exclude_planted_effects_only(records) -> None:
    """ppl_ratio: paired over windows (random: the mean ratio over its seeds); acc_delta: paired over items,
    resampled within each task. The values stay the point estimates (ratio of perplexities, difference of
    averages)."""
    rng = np.random.default_rng(1)
    base_nll = rng.normal(3.0, 1.0, 16)
    base_acc = {t: rng.integers(0, 2, 80).astype(float) for t in ("a", "b")}
    wrong = {t: np.where(rng.random(80) < 0.5, 0.0, c) for t, c in base_acc.items()}  # accuracy falls
    same = {t: rng.permutation(c) for t, c in base_acc.items()}  # the same accuracy, other items right
    rows = {"base": _result(base_nll, base_acc), "zero_top2": _result(base_nll + 1.0, wrong),
            "keep_top2": _result(base_nll + rng.normal(0, 0.01, 16), same),
            "random_top2_s0": _result(base_nll + rng.normal(0, 0.01, 16), same),
            "random_top2_s1": _result(base_nll + rng.normal(0, 0.01, 16))}
    ablation.record_table1("m", rows, 2)
    recs = records()
    ratio = {row: recs[f"m/ppl_ratio/{row}"] for row in ("base", "zero_top2", "keep_top2", "random_top2")}
    assert ratio["base"]["value"] == 1.0 and ratio["base"]["ci95"] == [1.0, 1.0]
    assert ratio["zero_top2"]["ci95"][0] > 2.0 and ratio["keep_top2"]["ci95"][0] < 1.0 < ratio["keep_top2"]["ci95"][1]
    seeds = (rows["random_top2_s0"]["ppl"] + rows["random_top2_s1"]["ppl"]) / 2
    assert ratio["random_top2"]["value"] == pytest.approx(seeds / rows["base"]["ppl"])
    assert ratio["random_top2"]["ci95"][0] < 1.0 < ratio["random_top2"]["ci95"][1]
    assert "mean over the seeds" in ratio["random_top2"]["note"]
    delta = {row: recs[f"m/acc_delta/{row}"] for row in ("zero_top2", "keep_top2", "random_top2")}
    assert delta["zero_top2"]["value"] == pytest.approx(rows["zero_top2"]["avg"]["acc"] - rows["base"]["avg"]["acc"])
    assert delta["zero_top2"]["ci95"][1] < 0.0 and "160 items, resampled within each task (2 in all)" in delta["zero_top2"]["note"]
    for row in ("keep_top2", "random_top2"):  # random: seed 0's items, as its accuracy
        assert delta[row]["value"] == 0.0 and delta[row]["ci95"][0] < 0.0 < delta[row]["ci95"][1]


@pytest.fixture
def planted():
    model, tok = models.load_model("tiny-llama")
    windows = data.token_windows(tok, "tiny-llama", "synthetic", 4, 32)
    m = detection.measure(model, tok, "tiny-llama", ("Summer is warm.", "I am here."), windows, k=5)
    ranked = detection.top_channels(m.prompts.pos0["inter"], m.report.layer, 20)[0]
    return model, tok, windows, m, ranked


def test_table1_rows_zero_breaks_keep_and_random_do_not(planted):
    model, tok, windows, m, ranked = planted
    rows = ablation.table1_rows(model, tok, "tiny-llama", m.report, ranked, windows, 1, (0, 1), (), 0, 2, 2)
    assert set(rows) == {"base", "zero_top1", "keep_top1", "random_top1_s0", "random_top1_s1"}
    base = rows["base"]["ppl"]
    assert rows["zero_top1"]["ppl"] > 1.05 * base
    assert abs(rows["random_top1_s0"]["ppl"] / base - 1) < abs(rows["zero_top1"]["ppl"] / base - 1)
    frame = ablation.table1_frame({"tiny-llama": rows}, 1)
    assert frame.loc[("tiny-llama", "random_top1"), "ppl"] == pytest.approx(
        (rows["random_top1_s0"]["ppl"] + rows["random_top1_s1"]["ppl"]) / 2)
    assert frame.loc[("tiny-llama", "base"), "ppl_ratio"] == 1.0


def test_record_table1_writes_required_keys_and_refusal_nulls(planted, tmp_path):
    model, tok, windows, m, ranked = planted
    manifest.start(types.SimpleNamespace(notebook="02", profile="smoke", seed=0, out_dir=tmp_path))
    rows = ablation.table1_rows(model, tok, "tiny-llama", m.report, ranked, windows, 1, (0,), (), 0, 2, 2)
    ablation.record_table1("tiny-llama", rows, 1)
    ablation.record_table1("other", {"base": rows["base"]}, 1, reason=ablation.NO_LAYER)
    recs = {r["key"]: r for r in json.loads((tmp_path / "manifest.json").read_text())["records"]}
    for row in ("base", "zero_top1", "keep_top1", "random_top1"):
        assert recs[f"tiny-llama/ppl/{row}"]["value"] > 1
        assert f"tiny-llama/acc/{row}" in recs
        lo, hi = recs[f"tiny-llama/ppl_ratio/{row}"]["ci95"]
        assert lo <= hi and "over 4 windows" in recs[f"tiny-llama/ppl_ratio/{row}"]["note"]
    assert recs["other/ppl/zero_top1"]["value"] is None and "refuse" in recs["other/ppl/zero_top1"]["note"]
    assert recs["other/ppl/base"]["value"] == rows["base"]["ppl"]


def test_no_massive_layer_evaluates_only_base():
    model, tok = models.load_model("tiny-gpt2")
    windows = data.token_windows(tok, "tiny-gpt2", "synthetic", 2, 32)
    m = detection.measure(model, tok, "tiny-gpt2", ("Hello there.",), windows)
    rows = ablation.table1_rows(model, tok, "tiny-gpt2", m.report, [], windows, 5, (0,), (), 0, 2, 2)
    assert list(rows) == ["base"]


def test_k_sweep_shapes_and_k0_semantics(planted):
    model, _, _, m, ranked = planted
    width = 192
    attacks = {a.name: a for a in ablation.k_sweep(1, ranked, (0, 1, 3), width)}
    assert attacks["zero_top0"].kind == "base" and attacks["random_top0_s0"].kind == "base"
    assert len(attacks["keep_top0"].params["channels"][1]) == width  # k = 0 keep-only removes the FFN
    assert attacks["zero_top3"].params["channels"][1] == ranked[:3]
    assert not set(attacks["random_top3_s0"].params["channels"][1]) & set(ranked[:3])
    assert len(attacks["keep_top3"].params["channels"][1]) == width - 3


def test_evaluate_is_cached_and_restores_the_model(planted, monkeypatch):
    model, tok, windows, _, ranked = planted
    attack = ablation.zero_top(1, ranked, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = ablation.evaluate(model, tok, "tiny-llama", attack, windows, batch_size=2)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    monkeypatch.setattr(ablation.evaluation, "window_nll", lambda *a, **k: pytest.fail("not cached"))
    assert ablation.evaluate(model, tok, "tiny-llama", attack, windows, batch_size=2) == first


def test_perplexity_and_zero_shot_get_their_own_batch_sizes(planted, monkeypatch):
    """A 4096-token window and a 60-token lm-eval request need different batches (issue 18: lm-eval ran the
    paper's five tasks at the perplexity batch of 1); the tasks' batch size is part of the cache key."""
    model, tok, windows, _, ranked = planted
    seen = {}

    def window_nll(model, windows, batch_size):
        seen["ppl"] = batch_size
        return np.zeros(len(windows))

    def zero_shot(model, tok, tasks, n_items, seed, batch_size, prepend_bos):
        seen.setdefault("zero_shot", []).append(batch_size)
        return {t: {"acc": 0.5, "correct": [1.0, 0.0], "chance": 0.5, "varies": True} for t in tasks}

    monkeypatch.setattr(ablation.evaluation, "window_nll", window_nll)
    monkeypatch.setattr(ablation.evaluation, "zero_shot", zero_shot)
    ablation.evaluate(model, tok, "tiny-llama", ablation.BASE, windows, ("commonsense",), 4, 1, eval_batch_size=16)
    assert seen == {"ppl": 1, "zero_shot": [16]}
    ablation.evaluate(model, tok, "tiny-llama", ablation.BASE, windows, ("commonsense",), 4, 1, eval_batch_size=8)
    assert seen["zero_shot"] == [16, 8]  # another key, not the cached 16
    paper = load_config("02_massive_weight_ablation", "paper")
    assert paper.batch_size == 1 and paper.eval_batch_size >= 16


def test_unknown_attack_kind_lists_the_known_ones(planted):
    with pytest.raises(ValueError, match="channels"):
        ablation.Attack("x", "nope").context(planted[0])


def test_writer_layers_and_circuit_attacks(planted):
    model, tok, windows, m, ranked = planted
    assert ablation.writer_layers(m.prompts, PLANT["hidden_dim"], PLANT["layer"]) == [PLANT["layer"]]
    names = [a.name for a in ablation.circuit_attacks(model, m, ranked)]
    assert names == ["sun_zero", "sun_mean", "super_weight"]  # one writer layer: no joint attack
    ppl = {a.name: ablation.evaluate(model, tok, "tiny-llama", a, windows, batch_size=2)["ppl"]
           for a in [ablation.BASE, *ablation.circuit_attacks(model, m, ranked)]}
    assert abs(ppl["sun_mean"] / ppl["base"] - 1) < abs(ppl["sun_zero"] / ppl["base"] - 1)
    assert ppl["super_weight"] != ppl["base"]


def test_joint_top_zeroes_every_layer(planted):
    model, tok, _, m, _ = planted
    attack = ablation.joint_top(m.prompts, [0, 1], 2)
    assert set(attack.params["channels"]) == {0, 1}
    ids = models.encode(tok, "tiny-llama", "Hi")
    with attack.context(model):
        inter = capture.capture(model, [ids], points=("inter",)).pos0["inter"][0]
    for layer, chans in attack.params["channels"].items():
        assert torch.all(inter[layer, chans] == 0)


def test_table1_refuses_a_model_without_massive_layer():
    report = detection.MassiveReport(None, [], [], [], [None], 0, [], 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="no detectable massive layer"):
        ablation.table1(report, [], 5, 192, (0,))


def test_all_but_is_the_complement():
    assert edits.all_but([3, 1], 5) == [0, 2, 4]
    assert edits.all_but([], 3) == [0, 1, 2]
