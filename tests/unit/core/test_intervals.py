"""core.intervals: each interval excludes its null when an effect is planted and holds it when none is."""

import numpy as np
import pytest

from common.core import intervals


def test_mean_interval_covers_the_mean_and_excludes_a_planted_shift():
    rng = np.random.default_rng(0)
    flat = intervals.mean(rng.normal(0.0, 1.0, 400))
    assert flat["ci95"][0] < 0.0 < flat["ci95"][1] and flat["n"] == 400
    shifted = intervals.mean(rng.normal(0.5, 1.0, 400))
    assert shifted["ci95"][0] > 0.0
    assert flat["ci95"][0] < flat["value"] < flat["ci95"][1]


def test_bootstrap_is_reproducible_with_its_seed():
    v = np.arange(20.0)
    stat = lambda r: r.mean(axis=1)  # noqa: E731
    assert intervals.bootstrap(v, stat, seed=3) == intervals.bootstrap(v, stat, seed=3)
    assert intervals.bootstrap(v, stat, seed=3) != intervals.bootstrap(v, stat, seed=4)


def test_pairing_removes_the_shared_unit_effect():
    """Units differ a lot from each other, the arms by a small constant: only the paired interval sees it."""
    rng = np.random.default_rng(1)
    unit = rng.normal(0.0, 5.0, 60)
    treated, control = unit + 0.1 + rng.normal(0, 0.01, 60), unit
    paired = intervals.paired_difference(treated, control)
    assert paired["ci95"][0] > 0.05 and paired["value"] == pytest.approx(0.1, abs=0.01)
    unpaired = intervals.mean(treated)["ci95"][0] - intervals.mean(control)["ci95"][1]
    assert unpaired < 0  # unpaired intervals overlap: the pairing is what decides


def test_perplexity_ratio_from_window_nlls():
    rng = np.random.default_rng(2)
    intact = rng.normal(3.0, 0.4, 64)
    same = intervals.perplexity_ratio(intact + rng.normal(0, 0.001, 64), intact)
    assert same["ci95"][0] < 1.0 < same["ci95"][1] or same["ci95"] == pytest.approx([1.0, 1.0], abs=1e-3)
    broken = intervals.perplexity_ratio(intact + np.log(2.0), intact)
    assert broken["value"] == pytest.approx(2.0) and broken["ci95"] == pytest.approx([2.0, 2.0])
    noisy = intervals.perplexity_ratio(intact + np.log(1.5) + rng.normal(0, 0.3, 64), intact)
    assert 1.0 < noisy["ci95"][0] < 1.5 < noisy["ci95"][1]


def test_ratio_of_means_is_paired():
    rng = np.random.default_rng(3)
    base = rng.uniform(1, 10, 40)
    r = intervals.ratio_of_means(0.5 * base, base)
    assert r["value"] == pytest.approx(0.5) and r["ci95"] == pytest.approx([0.5, 0.5])
    with pytest.raises(ValueError, match="denominator's mean is 0"):
        intervals.ratio_of_means([1.0, 2.0], [0.0, 0.0])


def test_proportion_wilson():
    assert intervals.proportion(20, 20)["ci95"][1] == 1.0 and intervals.proportion(20, 20)["ci95"][0] < 1.0
    assert intervals.proportion(0, 20)["ci95"][0] == 0.0 and intervals.proportion(0, 20)["ci95"][1] > 0.0
    lo, hi = intervals.proportion(50, 100)["ci95"]
    assert lo == pytest.approx(0.404, abs=1e-3) and hi == pytest.approx(0.596, abs=1e-3)  # Wilson's textbook value
    with pytest.raises(ValueError, match="successes <= n"):
        intervals.proportion(3, 2)


@pytest.mark.parametrize("bad, match", [
    (np.array([1.0]), "fewer than two units"),
    (np.array([1.0, np.nan]), "finite"),
    (np.ones((2, 2, 2)), r"\[n\] or \[n, k\]"),
])
def test_bootstrap_refuses_what_is_not_an_interval(bad, match):
    with pytest.raises(ValueError, match=match):
        intervals.bootstrap(bad, lambda r: r.mean(axis=1))


def test_bootstrap_refuses_a_statistic_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"to \[n_resamples\]"):
        intervals.bootstrap(np.arange(5.0), lambda r: r)


def test_function_of_means_equals_the_bootstrap_of_the_mean_for_one_column():
    v = np.random.default_rng(4).normal(1.0, 2.0, 30)
    one = intervals.function_of_means(v[:, None], lambda m: m[:, 0])
    ref = intervals.mean(v)
    assert one["value"] == pytest.approx(ref["value"]) and one["ci95"] == pytest.approx(ref["ci95"]) and one["n"] == 30


def test_function_of_means_excludes_a_planted_column_and_holds_the_null_without_one():
    rng = np.random.default_rng(5)
    v = rng.normal(0.0, 1.0, (50, 400))  # wide: 400 columns per unit
    v[:, 7] += 1.0
    top = intervals.function_of_means(v, lambda m: m.max(axis=1))
    assert top["value"] == pytest.approx(v.mean(0).max()) and top["ci95"][0] > 0.5
    flat = intervals.function_of_means(v, lambda m: m[:, 0] - m[:, 1])
    assert flat["ci95"][0] < 0.0 < flat["ci95"][1]


@pytest.mark.parametrize("bad", [np.arange(4.0), np.array([[1.0], [np.inf]])])
def test_function_of_means_refuses_what_is_not_per_unit_vectors(bad):
    with pytest.raises(ValueError, match=r"\[n_units, k\]"):
        intervals.function_of_means(bad, lambda m: m[:, 0])


def test_mean_perplexity_ratio_of_one_arm_is_the_perplexity_ratio():
    rng = np.random.default_rng(6)
    control = rng.normal(3.0, 0.3, 40)
    treated = control + rng.normal(0.1, 0.05, 40)
    one = intervals.mean_perplexity_ratio([treated], control)
    ref = intervals.perplexity_ratio(treated, control)
    assert one["value"] == pytest.approx(ref["value"]) and one["ci95"] == pytest.approx(ref["ci95"]) and one["n"] == 40


def test_mean_perplexity_ratio_averages_the_arms_and_excludes_a_planted_rise():
    rng = np.random.default_rng(7)
    control = rng.normal(3.0, 0.5, 30)  # windows differ a lot; the pairing removes that spread
    noise = [control + rng.normal(0.0, 0.01, 30) for _ in range(3)]
    flat = intervals.mean_perplexity_ratio(noise, control)
    assert flat["ci95"][0] < 1.0 < flat["ci95"][1]
    assert flat["value"] == pytest.approx(np.mean([np.exp(a.mean() - control.mean()) for a in noise]))
    risen = intervals.mean_perplexity_ratio([a + 0.05 for a in noise], control)
    assert risen["ci95"][0] > 1.0


def test_mean_perplexity_ratio_refuses_unpaired_arms():
    with pytest.raises(ValueError, match="pairs the control's windows"):
        intervals.mean_perplexity_ratio([np.zeros(4)], np.zeros(5))


def test_stratified_mean_is_the_unweighted_mean_over_strata_and_resamples_within_them():
    strata = {"big": np.ones(200), "small": np.zeros(4)}  # a pooled mean would be ~0.98
    out = intervals.stratified_mean(strata)
    assert out["value"] == 0.5 and out["n"] == 204 and out["n_strata"] == 2
    assert out["ci95"] == [0.5, 0.5]  # constant within each stratum: a stratum never loses its units
    assert intervals.stratified_mean(strata, seed=3) == out


def test_stratified_paired_difference_excludes_a_planted_drop_and_holds_the_null_without_one():
    rng = np.random.default_rng(8)
    control = {t: rng.integers(0, 2, 60).astype(float) for t in ("a", "b", "c")}
    same = {t: v.copy() for t, v in control.items()}
    for v in same.values():  # the same accuracy, different items right: no effect
        flip = rng.permutation(60)[:10]
        v[flip] = 1 - v[flip]
    flat = intervals.stratified_paired_difference(same, control)
    assert flat["ci95"][0] < 0.0 < flat["ci95"][1]
    dropped = {t: np.where(rng.random(60) < 0.4, 0.0, v) for t, v in control.items()}
    drop = intervals.stratified_paired_difference(dropped, control)
    want = np.mean([(dropped[t] - control[t]).mean() for t in control])
    assert drop["value"] == pytest.approx(want) and drop["ci95"][1] < 0.0


@pytest.mark.parametrize("treated, control, match", [
    ({"a": [1.0, 0.0]}, {"b": [1.0, 0.0]}, "same strata"),
    ({"a": [1.0, 0.0]}, {"a": [1.0, 0.0, 1.0]}, "same units"),
    ({"a": [1.0]}, {"a": [0.0]}, ">= 2 finite"),
    ({}, {}, "no strata"),
])
def test_stratified_paired_difference_refuses_unpaired_or_empty_strata(treated, control, match):
    with pytest.raises(ValueError, match=match):
        intervals.stratified_paired_difference(treated, control)


def test_independent_difference_resamples_each_sample_within_itself():
    """Two groups of different units (and sizes): a planted gap is excluded, no gap is held, the value exact."""
    rng = np.random.default_rng(9)
    first, last = rng.normal(0.6, 0.1, 9), rng.normal(0.6, 0.1, 8)
    flat = intervals.independent_difference(last, first)
    assert flat["value"] == pytest.approx(last.mean() - first.mean()) and flat["n"] == 17
    assert flat["ci95"][0] < 0.0 < flat["ci95"][1]
    gap = intervals.independent_difference(last - 0.3, first)
    assert gap["ci95"][1] < 0.0 and gap["ci95"][0] < gap["value"] < gap["ci95"][1]
    assert intervals.independent_difference([1.0, 1.0], [0.0, 0.0])["ci95"] == [1.0, 1.0]  # constant: no spread
    with pytest.raises(ValueError, match=">= 2 finite"):
        intervals.independent_difference([1.0], [0.0, 0.5])
