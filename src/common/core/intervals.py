"""95% intervals for the numbers claims are decided on (DESIGN §7: every claim reads its number's ``ci95``).

One resampling engine, ``bootstrap``: units (items, windows, prompts, sequences, layers, modules) are rows,
resampled with replacement, and a statistic is recomputed on each resample (percentile interval). Paired
designs put both arms of a unit in one row, so the pairing survives resampling. Proportions near 0 or 1, where
a bootstrap collapses to a point, use Wilson's score interval instead (``proportion``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

#: resamples of every bootstrap (fixed, so intervals are reproducible to the bit with the seed)
N_RESAMPLES = 2000


Z975 = 1.959963984540054


def bootstrap(rows: np.ndarray, statistic: Callable[[np.ndarray], np.ndarray], seed: int = 0,
              n_resamples: int = N_RESAMPLES, level: float = 0.95) -> list[float]:
    """Percentile interval of ``statistic`` over units resampled with replacement.

    ``rows``: ``[n_units]`` or ``[n_units, k]`` (a paired design keeps its arms as columns of one row).
    ``statistic``: maps a batch of resamples ``[n_resamples, n_units(, k)]`` to ``[n_resamples]`` values, so the
    resamples are computed in one vectorised call (e.g. ``lambda r: r.mean(axis=1)``)."""
    values = np.asarray(rows, dtype=float)
    if values.ndim not in (1, 2) or len(values) < 2 or not np.isfinite(values).all():
        raise ValueError(f"need >= 2 units of finite values as [n] or [n, k], got shape {values.shape}: "
                         "an interval over fewer than two units is not an interval")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level} must be in (0, 1), e.g. 0.95")
    if n_resamples < 100:
        raise ValueError(f"n_resamples={n_resamples}: use >= 100 (default {N_RESAMPLES})")
    rng = np.random.default_rng(seed)
    stats = np.asarray(statistic(values[rng.integers(0, len(values), size=(n_resamples, len(values)))]), dtype=float)
    if stats.shape != (n_resamples,):
        raise ValueError(f"statistic must map [n_resamples, n_units, ...] to [n_resamples], gave {stats.shape}")
    stats = stats[np.isfinite(stats)]
    if stats.size < n_resamples // 2:
        raise ValueError("the statistic is undefined on most resamples (constant units?): no interval")
    tail = 100 * (1 - level) / 2
    return [float(np.percentile(stats, tail)), float(np.percentile(stats, 100 - tail))]


def mean(values, seed: int = 0) -> dict:
    """The mean of per-unit values with its bootstrap interval: ``{"value", "ci95", "n"}``."""
    v = np.asarray(values, dtype=float)
    return {"value": float(v.mean()), "ci95": bootstrap(v, lambda r: r.mean(axis=1), seed), "n": int(v.size)}


def paired_difference(treated, control, seed: int = 0) -> dict:
    """Mean of ``treated - control`` over units both arms share (same items / windows / sequences), with the
    interval of a paired bootstrap: ``{"value", "ci95", "n"}``."""
    a, b = np.asarray(treated, dtype=float), np.asarray(control, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired arms need the same units: shapes {a.shape} and {b.shape}")
    return mean(a - b, seed)


def perplexity_ratio(window_nll_treated, window_nll_control, seed: int = 0) -> dict:
    """Perplexity of the treated model over the control's on the same windows (equal tokens per window), from
    per-window mean NLLs: ``exp(mean(treated) - mean(control))``, with the paired bootstrap over windows."""
    a, b = np.asarray(window_nll_treated, dtype=float), np.asarray(window_nll_control, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"a perplexity ratio pairs the same windows: shapes {a.shape} and {b.shape}")
    rows = np.stack([a, b], axis=1)
    ci = bootstrap(rows, lambda r: np.exp(r[..., 0].mean(axis=1) - r[..., 1].mean(axis=1)), seed)
    return {"value": float(math.exp(a.mean() - b.mean())), "ci95": ci, "n": int(a.size)}


def ratio_of_means(numerator, denominator, seed: int = 0) -> dict:
    """``mean(numerator) / mean(denominator)`` of paired per-unit values (e.g. a statistic of the last third of
    the layers over the first third, per sequence), with the paired bootstrap over units."""
    a, b = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"a paired ratio needs the same units: shapes {a.shape} and {b.shape}")
    if b.mean() == 0:
        raise ValueError("the denominator's mean is 0: the ratio is undefined")
    ci = bootstrap(np.stack([a, b], axis=1), lambda r: r[..., 0].mean(axis=1) / r[..., 1].mean(axis=1), seed)
    return {"value": float(a.mean() / b.mean()), "ci95": ci, "n": int(a.size)}


def proportion(successes: int, n: int) -> dict:
    """A share ``successes / n`` with Wilson's score interval (exact-enough at 0 and 1, where a bootstrap
    collapses to a point): ``{"value", "ci95", "n"}``."""
    if isinstance(n, bool) or n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    p, z2 = successes / n, Z975 ** 2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z975 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return {"value": p, "ci95": [max(0.0, centre - half), min(1.0, centre + half)], "n": int(n)}


def function_of_means(values, statistic: Callable[[np.ndarray], np.ndarray], seed: int = 0) -> dict:
    """A statistic of the per-column means of per-unit vectors ``values`` ``[n_units, k]`` (e.g. the max over
    hidden dims of the mean |h| over prompts, or the min over layers of the max over heads of the mean k* over
    sequences), with its bootstrap interval over units: ``{"value", "ci95", "n"}``.

    ``statistic`` maps means ``[m, k]`` to ``[m]``; ``value`` is it on the means of all units, so it equals a
    point estimate computed from pooled means. ``k`` may be wide (thousands of channels): a resample's means are
    its counts of each unit times ``values``, never an ``[n_resamples, n_units, k]`` copy."""
    v = np.asarray(values, dtype=float)
    if v.ndim != 2 or not np.isfinite(v).all():
        raise ValueError(f"need finite per-unit vectors as [n_units, k], got shape {v.shape}")
    n = len(v)

    def of_resamples(idx: np.ndarray) -> np.ndarray:
        rows = np.arange(len(idx))[:, None] * n + idx.astype(int)
        counts = np.bincount(rows.ravel(), minlength=len(idx) * n).reshape(len(idx), n)
        return statistic(counts @ v / n)

    return {"value": float(statistic(v.mean(0, keepdims=True))[0]), "ci95": bootstrap(np.arange(n), of_resamples, seed),
            "n": int(n)}


def mean_perplexity_ratio(windows_nll_treated: list[np.ndarray] | np.ndarray, window_nll_control,
                          seed: int = 0) -> dict:
    """Mean over treated arms (e.g. the seeds of a random control) of each arm's perplexity over the control's on
    the same windows, from per-window mean NLLs (``windows_nll_treated``: one ``[n_windows]`` vector per arm):
    ``mean_s exp(mean(arm_s) - mean(control))``, with the paired bootstrap over windows (every arm and the control
    resampled together). One arm is ``perplexity_ratio``."""
    arms, b = np.asarray(windows_nll_treated, dtype=float), np.asarray(window_nll_control, dtype=float)
    if arms.ndim != 2 or len(arms) < 1 or b.ndim != 1 or arms.shape[1] != b.size:
        raise ValueError(f"every arm pairs the control's windows: arms {arms.shape}, control {b.shape}")
    rows = np.concatenate([arms.T, b[:, None]], axis=1)  # [n_windows, arms + control]

    def of_resamples(r: np.ndarray) -> np.ndarray:
        m = r.mean(axis=1)
        return np.exp(m[:, :-1] - m[:, -1:]).mean(axis=1)

    value = float(np.exp(arms.mean(axis=1) - b.mean()).mean())
    return {"value": value, "ci95": bootstrap(rows, of_resamples, seed), "n": int(b.size)}


def stratified_resamples(groups: list[np.ndarray], n_resamples: int, seed: int = 0) -> np.ndarray:
    """``[n_resamples]`` unweighted means over ``groups`` of each group's mean, every group's units resampled
    with replacement within the group (one group: the plain bootstrap of a mean). The resampling loop behind
    ``stratified_mean`` and ``evaluation.bootstrap_ci`` / ``average_accuracy``; callers validate their input."""
    rng = np.random.default_rng(seed)
    return sum(g[rng.integers(0, g.size, size=(n_resamples, g.size))].mean(axis=1) for g in groups) / len(groups)


def stratified_mean(strata: dict[str, np.ndarray | list[float]], seed: int = 0,
                    n_resamples: int = N_RESAMPLES) -> dict:
    """Unweighted mean over strata (e.g. tasks) of each stratum's mean of per-unit values (e.g. items), with a
    percentile bootstrap that resamples units within each stratum independently (a stratum's size is fixed, as
    in the design): ``{"value", "ci95", "n", "n_strata"}``."""
    groups = [np.asarray(v, dtype=float) for v in strata.values()]
    bad = [name for name, g in zip(strata, groups, strict=True)
           if g.ndim != 1 or g.size < 2 or not np.isfinite(g).all()]
    if not groups or bad:
        raise ValueError(f"need >= 1 stratum of >= 2 finite per-unit values each; not so: {bad or 'no strata'}")
    if n_resamples < 100:
        raise ValueError(f"n_resamples={n_resamples}: use >= 100 (default {N_RESAMPLES})")
    stats = stratified_resamples(groups, n_resamples, seed)
    return {"value": float(np.mean([g.mean() for g in groups])),
            "ci95": [float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))],
            "n": int(sum(g.size for g in groups)), "n_strata": len(groups)}


def stratified_paired_difference(treated: dict[str, np.ndarray | list[float]],
                                 control: dict[str, np.ndarray | list[float]], seed: int = 0) -> dict:
    """Unweighted mean over strata (tasks) of the mean of ``treated - control`` over the units both arms share in
    that stratum (the same items, in the same order), e.g. an accuracy change averaged over tasks, with the paired
    bootstrap that resamples units within each stratum (``stratified_mean`` of the per-unit differences)."""
    if set(treated) != set(control):
        raise ValueError(f"paired arms need the same strata: {sorted(treated)} vs {sorted(control)}")
    diffs = {}
    for name in treated:
        a, b = np.asarray(treated[name], dtype=float), np.asarray(control[name], dtype=float)
        if a.shape != b.shape or a.ndim != 1:
            raise ValueError(f"{name}: paired arms need the same units: shapes {a.shape} and {b.shape}")
        diffs[name] = a - b
    return stratified_mean(diffs, seed)


def independent_difference(treated, control, seed: int = 0) -> dict:
    """``mean(treated) - mean(control)`` of two samples of different units (e.g. the layers of the last third
    against those of the first), with a bootstrap that resamples each sample within itself: twice
    ``stratified_mean`` of the strata ``{treated, -control}`` (the mean over two strata is half their sum).
    ``{"value", "ci95", "n"}``."""
    a, b = np.asarray(treated, dtype=float), np.asarray(control, dtype=float)
    half = stratified_mean({"treated": a, "control": -b}, seed)
    return {"value": 2 * half["value"], "ci95": [2 * x for x in half["ci95"]], "n": half["n"]}
