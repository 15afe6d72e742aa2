"""``common.inheritune.results``: the records notebook 04 writes from an experiment (seed-averaged losses, paired
bootstrap differences), the §5.2 acceptance readings on planted runs and attention statistics, and the runs table."""

from __future__ import annotations

import math

import pytest
import torch

from common.core import intervals
from common.inheritune import results
from common.inheritune.attention import AttentionStats
from common.inheritune.training import Experiment, Growth, Run


def _run(name: str, n_layer: int, losses: list[float], steps: int = 20, curve=None) -> Run:
    return Run(name, n_layer, steps, curve or [(0, 5.0), (steps, losses[0])], losses, tokens_per_s=1.0,
               seconds=1.0, n_params=1, init={})


def test_record_acceptance_records_every_check(records) -> None:
    """One key per reading, in order, values as given (bools, floats, None)."""
    checks = {"s1_maxrank_last_third_over_first_half": 0.5, "s4a_first_beats_random": True, "s4a_over_se": None}
    results.record_acceptance("gpt-byte", checks)
    recorded = list(records().values())
    assert [r["key"] for r in recorded] == [f"gpt-byte/inheritune/check/{k}" for k in checks]
    assert [r["value"] for r in recorded] == list(checks.values())
    assert {r["paper_ref"] for r in recorded} == {"research inheritune.md §5.2"}


def _stats(rank: list[list[float]], mass: list[list[float]]) -> AttentionStats:
    """Planted per-(layer, head) rank and mass for one sequence."""
    return AttentionStats({"rank": torch.tensor([rank]), "mass": torch.tensor([mass])}, torch.zeros(1), 0.9, 0.9, 8)


def test_acceptance_reads_planted_runs_and_stats() -> None:
    """Every reading on planted inputs, by hand: MaxRank [10, 8, 6, 4, 1, 1] (max over heads) -> last third
    / first half = 1 / 8, lazy layers 4, 5; AvgMass [20, 16, 12, 6, 2, 2] -> last third 2, first three / last
    third 8; first - random = -0.375 with se sqrt(0.0625 / 3) / 2 = 0.0722 (-3 sqrt 3 se: beats random); last -
    random = 0.125 (sqrt 3 se: within noise); the early curve point closest to
    steps // 10 = 4 is step 3 (not 8). A random run equal to inherit_first up to +-0.01 does not count as beaten."""
    ref_stats = _stats([[10, 2], [8, 3], [6, 6], [1, 4], [1, 1], [1, 1]],
                       [[20, 20], [10, 22], [12, 12], [6, 6], [2, 2], [3, 1]])
    tgt_stats = _stats([[5, 1], [1, 1], [3, 2]], [[1, 1], [1, 1], [1, 1]])
    ref = _run("reference", 6, [2.0] * 4, steps=40)
    first = _run("inherit_first", 3, [2.0, 2.25, 2.0, 2.25], curve=[(0, 3.0), (3, 2.9), (8, 2.5), (40, 2.1)])
    rnd = _run("random", 3, [2.5] * 4, curve=[(0, 5.5), (3, 4.5), (8, 3.5), (40, 2.5)])
    last = _run("inherit_last", 3, [2.5, 2.75, 2.5, 2.75], curve=[(0, 5.5), (3, 4.0), (8, 3.9), (40, 2.5)])
    rnd2 = _run("random_2x", 3, [2.1] * 4, steps=80)
    exp = Experiment(ref, {"inherit_first": first, "random": rnd, "inherit_last": last, "random_2x": rnd2},
                     Growth([first], tolerance=0.05, matched=True))
    out = results.acceptance(exp, ref_stats, tgt_stats)
    assert out["s1_maxrank_last_third_over_first_half"] == pytest.approx(1 / 8)
    assert out["s2_avgmass_last_third"] == pytest.approx(2.0)
    assert out["s2_avgmass_first3_over_last_third"] == pytest.approx(8.0)
    assert out["s3_lazy_layers"] == 2
    assert out["s4a_first_minus_random"] == pytest.approx(-0.375)
    assert out["s4a_noise_se"] == pytest.approx(math.sqrt(0.0625 / 3) / 2)
    assert out["s4a_over_se"] == pytest.approx(-3 * math.sqrt(3))
    assert out["s4a_first_beats_random"] is True
    assert out["s4b_first_within_tol_of_reference"] is False  # 2.125 > 2.0 + 0.05
    assert out["s4b_after_growth"] is True
    assert out["s4c_first_within_tol_of_random_2x"] is True  # 2.125 <= 2.1 + 0.05
    assert out["s5_last_minus_random"] == pytest.approx(0.125)  # same se as s4a: 0.125 = sqrt(3) se
    assert out["s5_over_se"] == pytest.approx(math.sqrt(3)) and out["s5_last_within_noise_of_random"] is True
    assert out["s5_last_minus_first"] == pytest.approx(0.5)
    assert out["s5_early_last_minus_random"] == pytest.approx(-0.5)
    assert out["s5_early_first_minus_random"] == pytest.approx(-1.6)
    assert out["s6_lazy_share_reference"] == pytest.approx(2 / 6)
    assert out["s6_lazy_share_inheritune"] == pytest.approx(1 / 3)

    close = _run("random", 3, [2.01, 2.24, 2.01, 2.24])
    exp.variants["random"] = close
    out = results.acceptance(exp, ref_stats, tgt_stats)
    assert out["s4a_first_beats_random"] is False


def test_runs_frame_lists_variants_then_rounds() -> None:
    """One row per variant and per growth round, with the run's own depth, steps and mean validation loss."""
    ref = _run("reference", 4, [2.0, 2.2])
    first = _run("inherit_first", 2, [2.4, 2.6])
    grown = _run("inheritune_3L", 3, [2.1, 2.1])
    exp = Experiment(ref, {"inherit_first": first}, Growth([first, grown], 0.01, True))
    frame = results.runs_frame(exp)
    assert list(frame.index) == ["reference", "inherit_first", "round 2L", "round 3L"]
    assert frame.loc["reference", "val loss"] == 2.1 and frame.loc["round 3L", "layers"] == 3
    assert frame.loc["inherit_first", "steps"] == 20


def test_record_experiment_records_paired_bootstrap_differences(records) -> None:
    """Every diff key, random - reference included, is the mean per-window difference with its paired bootstrap
    over the windows: a fresh half model 0.1 worse on every window (plus noise) excludes 0, an inherited one that
    equals the reference up to noise holds it; val_loss intervals come from the same engine."""
    noise = torch.randn(3, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.01
    base = 3.0 + torch.rand(64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _run("reference", 4, base.tolist())
    rnd = _run("random", 2, (base + 0.1 + noise[0]).tolist())
    first = _run("inherit_first", 2, (base + noise[1]).tolist())
    results.record_experiment("gpt-byte", Experiment(ref, {"inherit_first": first, "random": rnd},
                                                      Growth([first], 0.01, True)))
    rec = records()
    worse = rec["gpt-byte/inheritune/diff/random-reference"]
    assert worse["value"] == pytest.approx(float((0.1 + noise[0]).mean()), rel=1e-9)
    assert 0.09 < worse["ci95"][0] < worse["ci95"][1] < 0.11 and "64 windows" in worse["note"]
    same = rec["gpt-byte/inheritune/diff/inherit_first-reference"]["ci95"]
    assert same[0] < 0.0 < same[1]
    assert rec["gpt-byte/inheritune/reference/val_loss"]["ci95"] == intervals.mean(ref.window_losses)["ci95"]


def test_record_experiment_averages_training_seeds(records) -> None:
    """Two seeds: every loss and difference is the mean over seeds (each seed's recorded beside it); the interval
    resamples windows of the seed-averaged losses, so a difference that flips sign between seeds averages out."""
    base = 3.0 + torch.rand(32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exps = []
    for shift in (0.2, -0.2):
        ref = _run("reference", 4, base.tolist())
        rnd = _run("random", 2, (base + shift).tolist())
        exps.append(Experiment(ref, {"random": rnd}, Growth([rnd], 0.01, True)))
    results.record_experiment("gpt-byte", exps)
    rec = records()
    diff = rec["gpt-byte/inheritune/diff/random-reference"]
    assert diff["value"] == pytest.approx(0.0, abs=1e-12) and diff["ci95"] == pytest.approx([0.0, 0.0], abs=1e-12)
    assert rec["gpt-byte/inheritune/diff/random-reference/seeds"]["value"] == pytest.approx([0.2, -0.2])
    assert "mean over 2 training seeds" in diff["note"]
    assert rec["gpt-byte/inheritune/random/val_loss_seeds"]["value"] == pytest.approx(
        [float(base.mean()) + 0.2, float(base.mean()) - 0.2])
    # one experiment: no per-seed records
    results.record_experiment("one", exps[0])
    assert "one/inheritune/diff/random-reference/seeds" not in records()
