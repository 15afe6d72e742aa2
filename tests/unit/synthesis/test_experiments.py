"""Notebook 06's record functions and helpers in ``common.synthesis.experiments`` on planted values.

``common.synthesis.experiments`` (notebook 06) and the helpers it brought along: ``manifest.upstream`` /
``upstream_value``, ``finetune.datasets`` and the notebook-06 plots.

Each experiment is checked by planting its phenomenon and removing it: tiny-llama's planted massive weight
(``models.PLANT``) makes the first token's hidden state explode from its layer on, and zeroing its rows
removes that; attention statistics are built from hand-made attention matrices (sinks on position 0, sinks
moved to another column, uniform causal attention) with ``attention.head_metrics``; search-rank tables are
constructed to be monotone in AvgMass, with and without a depth trend; mean offsets are planted on the
first token only or on every token of synthetic decompositions. Oracles: hooks on the dense model,
``scipy.stats.spearmanr``, ``evaluation.response_loss`` / ``lowrank.decomposed`` for the losses."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from contextlib import contextmanager
from types import SimpleNamespace

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as scipy_stats
from tiny_families import hooked_forward
from torch import nn

from common.core import arch, capture, data, env, evaluation, layer_inputs, manifest, models, profiles
from common.hoc import ablation, detection, edits, finetune
from common.inheritune import attention
from common.inheritune.attention import AttentionStats
from common.reporting import session
from common.sfsd import budgets, decomposition, lowrank
from common.sfsd.budgets import Target
from common.sfsd.decomposition import Decomposition
from common.sfsd.lowrank import LowRankLinear
from common.synthesis import experiments, figures, protected
from common.synthesis.experiments import SinkProfile
from common.synthesis.protected import RowProtectedLinear


def _planted_profile(n_layers: int = 5) -> SinkProfile:
    g = torch.Generator().manual_seed(0)
    t = 6
    scores = torch.randn(3, n_layers, 2, t, t, generator=g, dtype=torch.float64)
    attn = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    stats = attention.AttentionStats(attention.head_metrics(attn), attn.mean(0), 0.9, 0.9, t)
    pos0 = torch.tensor([[1.0, 50.0, 5000.0, 4000.0, 3000.0][:n_layers]] * 3)
    return SinkProfile(pos0, torch.ones(3, n_layers), stats)


def test_record_sink_and_sink_table(records) -> None:
    """sink_summary's readings under <key>/synthesis/sink/, returned; one table row per model."""
    profile = _planted_profile()
    s = experiments.record_sink("m", profile, 2)
    assert s == experiments.sink_summary(profile, 2)
    rec = records()
    base = "m/synthesis/sink"
    assert rec[f"{base}/massive_layer"]["value"] == 2
    assert rec[f"{base}/pos0_ratio"]["value"] == pytest.approx(profile.frame().ratio.tolist())
    assert rec[f"{base}/pos0_share_after_massive"]["value"] == pytest.approx(s["pos0_share_after_massive"])
    assert rec[f"{base}/rho_ratio_share"]["value"] == s["correlation"]["rho"]
    assert rec[f"{base}/rho_ratio_share"]["ci95"] == pytest.approx(s["correlation"]["ci95"])
    table = experiments.sink_table({"m": s}, {"m": 2})
    assert table.loc["m", "massive layer"] == 2 and table.loc["m", "first sink layer"] == s["first_sink_layer"]
    experiments.record_sink("n", profile, None)
    assert records()["n/synthesis/sink/sink_minus_massive_layer"]["value"] is None


def test_massive_attacks(tiny_llama) -> None:
    """The top-k attack first, then one random-row control per seed, all on the massive layer."""
    model, _ = tiny_llama
    attacks = experiments.massive_attacks(model, 1, [3, 7, 9], 2, (0, 1))
    assert [a.name for a in attacks] == ["zero_top2", "random_top2_s0", "random_top2_s1"]


def _ablation_frame() -> pd.DataFrame:
    """Windows that differ a lot from each other (base 0.2-0.8 a window): the attack takes 0.4 off every window,
    the controls move each window by noise only (+0.02 and -0.02 around the same mean)."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.8, 24)
    windows = {"base": base, "zero_top2": base - 0.4 + rng.normal(0, 0.01, 24),
               "random_top2_s0": base + 0.02 + rng.normal(0, 0.01, 24),
               "random_top2_s1": base - 0.02 + rng.normal(0, 0.01, 24)}
    rows = {name: {"pos0_share": w.mean(), "pos0_share_ci95": [w.mean() - 0.1, w.mean() + 0.1], "pos0_share_windows": w,
                   "maxcol_share": w.mean(), "maxcol_share_ci95": [w.mean() - 0.1, w.mean() + 0.1], "moved_sinks": 0.0,
                   "lazy_layers": 0, "sink_layers": 3, "ratio_after": 100.0, "layers": 4} for name, w in windows.items()}
    return pd.DataFrame(rows).T


def test_record_ablation(records) -> None:
    """Every condition's readings, the attack's change and the controls' mean change, each with its interval
    paired over windows (the attack's excludes 0, the controls' holds it); nulls without a layer."""
    frame = _ablation_frame()
    experiments.record_ablation("m", frame, 2, (0, 1))
    rec = records()
    assert rec["m/synthesis/ablation/zero_top2/pos0_share"]["value"] == frame.pos0_share["zero_top2"]
    assert rec["m/synthesis/ablation/zero_top2/pos0_share"]["ci95"] == frame.pos0_share_ci95["zero_top2"]
    assert rec["m/synthesis/ablation/random_top2_s1/sink_layers"]["value"] == 3
    zero, rand = rec["m/synthesis/ablation/zero_minus_base_pos0_share"], rec["m/synthesis/ablation/random_minus_base_pos0_share"]
    assert zero["value"] == frame.pos0_share["zero_top2"] - frame.pos0_share["base"]
    assert -0.41 < zero["ci95"][0] < zero["value"] < zero["ci95"][1] < -0.39  # paired: the window spread cancels
    assert "24 windows" in zero["note"]
    assert rand["value"] == np.mean([frame.pos0_share[c] for c in ("random_top2_s0", "random_top2_s1")]) - frame.pos0_share["base"]
    assert rand["ci95"][0] < 0.0 < rand["ci95"][1] and rand["ci95"][1] - rand["ci95"][0] < 0.02
    experiments.record_ablation("n", None, 2, (0, 1))
    rec = records()
    assert rec["n/synthesis/ablation/zero_minus_base_pos0_share"]["value"] is None
    assert not [k for k in rec if k.startswith("n/") and "/base/" in k]


def test_record_lazy(records) -> None:
    lazy = pd.DataFrame({"rank_fraction": [0.5, 0.25]}, index=pd.Index([3, 4], name="layer"))
    corr = {"maxrank": {"rho": 0.5, "ci95": [0.1, 0.9], "n": 2},
            "maxrank_detrended": {"rho": -0.5, "ci95": None, "n": 2}}
    experiments.record_lazy("m", lazy, corr, [3, 4])
    rec = records()
    assert rec["m/synthesis/lazy/rho_maxrank_vs_rank"]["value"] == 0.5
    assert rec["m/synthesis/lazy/rho_maxrank_vs_rank"]["ci95"] == [0.1, 0.9]
    assert "depth trend removed" in rec["m/synthesis/lazy/rho_maxrank_detrended_vs_rank"]["note"]
    assert rec["m/synthesis/lazy/rank_fraction"]["value"] == [0.5, 0.25]


def test_mean_part_perplexities(monkeypatch) -> None:
    """Dense first, then one perplexity per part of MEAN_PARTS, each inside that part's decomposition."""
    active = []

    @contextmanager
    def decomposed(model, decomps, method, ranks):
        active.append(decomps)
        yield
        active.pop()

    monkeypatch.setattr(experiments.lowrank, "decomposed", decomposed)
    monkeypatch.setattr(experiments, "mean_parts", lambda decomps, means, t, part: part)
    inputs = SimpleNamespace(perplexity_and_windows=lambda start: ((active[-1] if active else "dense", start), start))
    ppl, nll = experiments.mean_part_perplexities(None, {}, {}, 8, inputs, 2, {})
    assert list(ppl) == list(nll) == ["dense", *experiments.MEAN_PARTS]
    assert ppl["dense"] == ("dense", 2) and ppl["first_token"] == ("first_token", 2) and nll["none"] == 2


def test_record_mean_term(records) -> None:
    share = pd.DataFrame({"layer": [2, 1, 1], "kind": ["q", "q", "v"], "first_over_mean": [3.0, 1.0, 2.0],
                          "share_first_token": [0.03, 0.01, 0.02]})
    ppl = {"dense": 10.0, "all": 20.0, "first_token": 400.0, "other_tokens": 21.0, "none": 500.0}
    rng = np.random.default_rng(0)
    window = rng.normal(3.0, 0.5, 32)  # the other tokens' part: noise around "all"; the first token's: +3 nats
    nll = {"all": window, "other_tokens": window + rng.normal(0, 0.05, 32), "first_token": window + 3.0}
    experiments.record_mean_term("m", 1e-8, share, ppl, nll, 20.0, 80, [1, 2])
    full = records()
    lo, hi = full["m/synthesis/meanterm/other_tokens_over_all_ppl"]["ci95"]
    assert lo < 1.0 < hi and "32 windows" in full["m/synthesis/meanterm/other_tokens_over_all_ppl"]["note"]
    assert full["m/synthesis/meanterm/first_token_over_all_ppl"]["ci95"] == pytest.approx([math.exp(3.0)] * 2)
    rec = {k: r["value"] for k, r in full.items()}
    base = "m/synthesis/meanterm"
    assert rec[f"{base}/parts_gap"] == 1e-8 and rec[f"{base}/none/ppl"] == 500.0
    assert rec[f"{base}/q/first_over_mean"] == [1.0, 3.0] and rec[f"{base}/v/first_over_mean"] == [2.0]
    assert rec[f"{base}/first_over_mean_median"] == 2.0 and rec[f"{base}/first_over_mean_max"] == 3.0
    assert rec[f"{base}/share_first_token_max"] == 0.03
    assert rec[f"{base}/first_token_over_all_ppl"] == 20.0
    assert rec[f"{base}/other_tokens_over_all_ppl"] == pytest.approx(1.05)
    assert rec[f"{base}/check_all_vs_nb05"] == 1.0


def test_protected_table_and_record_protected(monkeypatch, records) -> None:
    """Every scope x method x pct, plain then protected; the records pair them."""
    """Every scope x method x pct, plain then protected; the records pair them, the ratio with its interval paired
    over windows (protection planted 0.2 nats a window better for weight_svd, nothing for feature)."""
    windows = np.random.default_rng(0).normal(3.0, 0.5, 16)

    def fake(model, decomps, moments, inputs, layer, rows, method, pct, protect, kinds):
        gain = 0.2 if protect and method == "weight_svd" else 0.0
        noise = np.random.default_rng(pct + 2 * protect).normal(0, 0.01, 16)
        return {"ppl": pct + (1.0 if protect else 0.0) + (0.5 if kinds else 0.0), "params": 100 - protect,
                "window_nll": windows - gain + noise}

    monkeypatch.setattr(experiments, "massive_layer_perplexity", fake)
    table = experiments.protected_table(None, {}, {}, None, 3, [1], (10, 50))
    assert len(table) == 2 * 2 * 2 * 2
    assert list(table.columns) == ["scope", "method", "pct", "protected", "ppl", "window_nll", "params"]
    experiments.record_protected("m", table, 5.0, 3, 1)
    full = records()
    assert full["m/synthesis/protected/all/weight_svd/50/protected_over_plain"]["ci95"][1] < math.exp(-0.15)
    lo, hi = full["m/synthesis/protected/all/feature/50/protected_over_plain"]["ci95"]
    assert lo < 1.0 < hi and "16 windows" in full["m/synthesis/protected/all/feature/50/protected_over_plain"]["note"]
    rec = {k: r["value"] for k, r in full.items()}
    assert rec["m/synthesis/protected/dense_ppl"] == 5.0
    assert rec["m/synthesis/protected/gate_up/feature/50/ppl"] == 50.5
    assert rec["m/synthesis/protected/gate_up/feature/50/ppl_protected"] == 51.5
    assert rec["m/synthesis/protected/all/weight_svd/10/protected_over_plain"] == pytest.approx(1.1)
    assert rec["m/synthesis/protected/all/weight_svd/10/param_ratio"] == pytest.approx(0.99)


def test_record_macdrop(records) -> None:
    """Mean increase per arm and pct, MacDrop - LoRA paired by seed, the pre-trained increase per pct."""
    losses = {("pretrained", 0): {"dense": 1.0, 50: 1.1, 25: 1.3}}
    for seed, (a, b) in enumerate(((0.10, 0.08), (0.20, 0.17), (0.15, 0.14))):
        losses["lora", seed] = {"dense": 1.0, 50: 1.0 + a, 25: 1.0 + 2 * a}
        losses["lora_macdrop", seed] = {"dense": 1.0, 50: 1.0 + b, 25: 1.0 + 2 * b}
    increase = experiments.robustness_frame(losses)
    experiments.record_macdrop("m", increase, ("lora", "lora_macdrop"), (50, 25), (0, 1, 2), 3)
    rec = records()
    assert rec["m/synthesis/macdrop/lora/50/loss_increase"]["value"] == pytest.approx(0.15)
    assert rec["m/synthesis/macdrop/50/macdrop_minus_lora"]["value"] == pytest.approx(-0.02)
    ci = rec["m/synthesis/macdrop/50/macdrop_minus_lora"]["ci95"]
    assert ci[0] < -0.02 < ci[1] and rec["m/synthesis/macdrop/50/macdrop_minus_lora_ci_high"]["value"] == ci[1]
    assert rec["m/synthesis/macdrop/pretrained/loss_increase"]["value"] == pytest.approx([0.1, 0.3])


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

LAYER, CHANNEL, DIM = models.PLANT["layer"], models.PLANT["channel"], models.PLANT["hidden_dim"]
T_ATT = 16  # length of the hand-made attention matrices
F64 = torch.float64


def _ids(n: int, t: int, seed: int) -> torch.Tensor:
    """Random byte ids with BOS at position 0 (where tiny-llama's massive activation appears)."""
    ids = torch.randint(3, models.TINY_VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 1
    return ids


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], v) for k, v in before.items())


# --------------------------------------------------------------------------- hand-made attention


def _uniform(t: int = T_ATT) -> torch.Tensor:
    """Uniform causal attention: row i spreads over columns 0..i (position 0 gets H_T / T < 0.3)."""
    return torch.ones(t, t, dtype=F64).tril() / torch.arange(1, t + 1, dtype=F64)[:, None]


def _sink(t: int = T_ATT) -> torch.Tensor:
    """Every row on column 0 (the first-token sink, a rank-1 matrix)."""
    a = torch.zeros(t, t, dtype=F64)
    a[:, 0] = 1
    return a


def _column(c: int, t: int = T_ATT) -> torch.Tensor:
    """Rows >= c on column c, earlier rows on themselves: the sink moved to key position c."""
    a = torch.zeros(t, t, dtype=F64)
    a[torch.arange(t), torch.arange(t).clamp_max(c)] = 1
    return a


def _stats(per_window: list[list[torch.Tensor]], heads: int = 2) -> AttentionStats:
    """AttentionStats of ``per_window[n][l]`` ([T, T], the same for every head)."""
    attn = torch.stack([torch.stack(layers) for layers in per_window])  # [N, L, T, T]
    attn = attn[:, :, None].expand(-1, -1, heads, -1, -1).contiguous()  # [N, L, H, T, T]
    return AttentionStats(attention.head_metrics(attn), attn.mean(0), 0.9, 0.9, attn.shape[-1])


def _profile(per_window: list[list[torch.Tensor]], ratios: list[list[float]]) -> SinkProfile:
    """A SinkProfile with max |h_0| = ``ratios`` and median 1 (so ``ratio`` is their mean over windows)."""
    pos0 = torch.tensor(ratios, dtype=torch.float32)
    return SinkProfile(pos0, torch.ones_like(pos0), _stats(per_window))


# ------------------------------------------------------------------------------- shared fixtures


@pytest.fixture
def fast_bootstrap(monkeypatch):
    """Callers of ``rank_correlation`` (``sink_summary``, ``lazy_vs_compressible``: six a call) with 200
    bootstrap resamples instead of 2000 (the pandas ranking loop costs ~0.3 s per 2000)."""
    monkeypatch.setattr(experiments, "rank_correlation", functools.partial(experiments.rank_correlation, n_resamples=200))


@pytest.fixture(scope="module")
def llama_tok():
    """A tiny-llama that every test leaves as it found it (tests check they restore it bit-exactly)."""
    return models.load_model("tiny-llama")


@pytest.fixture(scope="module")
def llama(llama_tok):
    return llama_tok[0]


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    return _ids(6, 20, seed=0)


@pytest.fixture(scope="module")
def ranked(llama_tok) -> list[int]:
    """The massive layer's top-2 up/gate rows, found by notebook 01/02's detection on its prompts."""
    model, tok = llama_tok
    layer, channels = detection.massive_weights(model, [models.encode(tok, "tiny-llama", p)
                                                      for p in profiles.DETECTION_PROMPTS[:3]], k=2)
    assert layer == LAYER and channels[0] == CHANNEL  # the planted weight is what is found
    return channels


@pytest.fixture(scope="module")
def base_profile(llama, windows) -> SinkProfile:
    return experiments.sink_profile(llama, windows, batch_size=4)


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return _ids(6, 12, seed=1)


@pytest.fixture(scope="module")
def decomps(llama, calib) -> dict[str, Decomposition]:
    """Decompositions of layers 0 and 1 (the planted massive layer) on ``calib``."""
    return decomposition.decompose_model(llama, calib, [0, LAYER], batch_size=4)


@pytest.fixture(scope="module")
def means(llama, calib, decomps):
    return experiments.first_token_means(llama, calib, list(decomps), batch_size=4)


# ----------------------------------------------------------------------------------- 1. sinks


def test_sink_profile_finds_the_planted_massive_first_token(llama, windows, base_profile) -> None:
    """From the planted layer on, the first token's largest |h| is thousands of times layer 0's and of
    the layer's median; with the planted channel zeroed (HoC's attack) it is not."""
    f = base_profile.frame()
    assert list(f.columns) == ["hidden_pos0", "ratio", "pos0_share", "maxcol_share", "maxrank", "avgmass"]
    assert f.index.name == "layer" and list(f.index) == list(range(4))
    assert base_profile.hidden_pos0.shape == base_profile.hidden_median.shape == (6, 4)
    assert (f.hidden_pos0.iloc[LAYER:] > 1000 * f.hidden_pos0.iloc[0]).all()
    assert (f.ratio.iloc[LAYER:] > 100 * f.ratio.iloc[:LAYER].max()).all()
    state = _state(llama)
    with ablation.zero_top(LAYER, [CHANNEL], 1).context(llama):
        quiet = experiments.sink_profile(llama, windows, batch_size=4).frame()
    assert _same_state(llama, state)
    assert (quiet.hidden_pos0 < 10 * quiet.hidden_pos0.iloc[0]).all()
    assert quiet.ratio.iloc[LAYER:].max() < 1e-2 * f.ratio.iloc[LAYER:].min()
    assert quiet.hidden_pos0.iloc[0] == f.hidden_pos0.iloc[0]  # layer 0 is upstream of the attack


def test_sink_profile_is_the_two_captures_in_one_pass(llama, windows, base_profile) -> None:
    """Same numbers as notebook 04's ``capture_attention`` and notebook 01's ``capture`` run alone; the
    model's attention implementation is put back."""
    impl = arch.unwrap(llama).config._attn_implementation
    alone = attention.capture_attention(llama, windows.split(4))
    for name in ("pos0_share", "maxcol_share", "rank", "mass", "sink"):
        assert torch.equal(base_profile.attention.metrics[name], alone.metrics[name]), name
    with attention.eager_attention(llama):  # sink_profile's pass runs eager attention throughout
        s = capture.capture(llama, windows.split(4), ("hidden",), whole=True, k=1)
    assert torch.equal(base_profile.hidden_pos0, s.pos0["hidden"].abs().amax(-1))
    assert torch.equal(base_profile.hidden_median, s.median["hidden"])
    assert torch.equal(base_profile.hidden_pos0[:, LAYER:], s.top["hidden"][:, LAYER:, 0])  # pos 0 holds the max
    assert arch.unwrap(llama).config._attn_implementation == impl
    other = experiments.sink_profile(llama, windows, batch_size=5)  # batching does not matter
    torch.testing.assert_close(other.ratio, base_profile.ratio, rtol=1e-5, atol=0)


def test_sink_profile_ratio_is_the_mean_of_window_ratios() -> None:
    """``ratio`` averages each window's max / median (not the ratio of the averages)."""
    stats = _stats([[_uniform(), _uniform()]] * 2)
    p = SinkProfile(torch.tensor([[10.0, 100.0], [30.0, 100.0]]), torch.tensor([[1.0, 10.0], [3.0, 1.0]]), stats)
    torch.testing.assert_close(p.ratio, torch.tensor([10.0, 55.0], dtype=F64))
    f = p.frame()
    assert f.hidden_pos0.tolist() == [20.0, 100.0] and f.ratio.tolist() == pytest.approx([10.0, 55.0])
    assert f.pos0_share.tolist() == pytest.approx([sum(1 / k for k in range(1, T_ATT + 1)) / T_ATT] * 2)


def test_rank_correlation_planted_and_removed() -> None:
    x = np.arange(12.0)
    up = experiments.rank_correlation(x, np.exp(x))  # monotone, not linear
    assert up["rho"] == pytest.approx(1.0) and up["ci95"] == pytest.approx([1.0, 1.0]) and up["n"] == 12
    down = experiments.rank_correlation(x, -x**3)
    assert down["rho"] == pytest.approx(-1.0) and down["ci95"] == pytest.approx([-1.0, -1.0])
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=300), rng.normal(size=300)
    free = experiments.rank_correlation(a, b, n_resamples=500)
    assert abs(free["rho"]) < 0.15 and free["ci95"][0] < 0 < free["ci95"][1]
    assert free["rho"] == pytest.approx(scipy_stats.spearmanr(a, b).statistic, abs=1e-12)


def test_rank_correlation_ties_nans_seeds_and_bad_input() -> None:
    x = [1.0, 2.0, 2.0, 3.0, 5.0, 4.0, 7.0]
    y = [3.0, 1.0, 2.0, 2.0, 9.0, 8.0, 4.0]
    got = experiments.rank_correlation(x, y, seed=3)
    assert got["rho"] == pytest.approx(scipy_stats.spearmanr(x, y).statistic, abs=1e-12)  # ties: average ranks
    lo, hi = got["ci95"]
    assert -1.0 <= lo < got["rho"] < hi <= 1.0
    assert experiments.rank_correlation(x, y, seed=3) == got  # deterministic under a seed
    assert experiments.rank_correlation(x, y, n_resamples=300, seed=4)["rho"] == got["rho"]
    # NaN pairs are dropped: the same as the complete pairs alone
    with_nan = experiments.rank_correlation([*x, float("nan"), 0.0], [*y, 1.0, float("nan")], 300, seed=3)
    assert with_nan == experiments.rank_correlation(x, y, 300, seed=3)
    with pytest.raises(ValueError, match="at least 3"):
        experiments.rank_correlation([1.0, 2.0, float("nan")], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="equal length"):
        experiments.rank_correlation([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="1-d"):
        experiments.rank_correlation([[1.0, 2.0, 3.0]], [[1.0, 2.0, 3.0]])
    flat = experiments.rank_correlation([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0], 100)  # no ranking at all
    assert math.isnan(flat["rho"]) and flat["ci95"] is None


def test_sink_summary_on_a_planted_sink(fast_bootstrap) -> None:
    """A sink (all mass on position 0) from layer 2 on, next to a massive first token from layer 2."""
    layers = [_uniform(), _uniform(), _sink(), _sink()]
    ratios = [[1.0, 2.0, 1000.0, 900.0], [1.0, 2.0, 1000.0, 900.0]]
    p = _profile([layers, layers], ratios)
    uniform_share = sum(1 / k for k in range(1, T_ATT + 1)) / T_ATT
    s = experiments.sink_summary(p, 2)
    assert s["first_sink_layer"] == 2 and s["sink_minus_massive_layer"] == 0
    assert s["pos0_share_before_massive"] == pytest.approx(uniform_share)
    assert s["ratio_at_massive"] == pytest.approx(1000.0)
    assert s["pos0_share_after_massive"] == pytest.approx(1.0)
    # layer l's mass on position 0 against the log ratio of its input h_{l-1}: layers 1..3
    expected = scipy_stats.spearmanr(np.log10([1.0, 2.0, 1000.0]), [uniform_share, 1.0, 1.0]).statistic
    assert s["correlation"]["rho"] == pytest.approx(expected) and s["correlation"]["n"] == 3
    same_layer = scipy_stats.spearmanr(np.log10([1.0, 2.0, 1000.0, 900.0]), [uniform_share] * 2 + [1.0] * 2).statistic
    assert expected != pytest.approx(same_layer)  # the lag matters here
    # no massive layer: nothing to place the sink against
    none = experiments.sink_summary(p, None)
    assert none["first_sink_layer"] == 2
    assert none["sink_minus_massive_layer"] is none["ratio_at_massive"] is none["pos0_share_after_massive"] is None
    # the sink removed: no sink layer at all
    flat = experiments.sink_summary(_profile([[_uniform()] * 4] * 2, ratios), 2)
    assert flat["first_sink_layer"] is None and flat["sink_minus_massive_layer"] is None
    assert flat["pos0_share_after_massive"] == pytest.approx(uniform_share)
    assert experiments.sink_summary(p, 0)["pos0_share_before_massive"] is None


# ----------------------------------------------------------------------------- 2. ablation


def test_attack_profiles_zeroing_massive_rows_removes_the_first_token_value(llama, windows, ranked,
                                                                            base_profile) -> None:
    width = arch.intermediate_size(llama, LAYER)
    attacks = [ablation.BASE, ablation.zero_top(LAYER, ranked, 2), ablation.random_k(LAYER, 2, 0, width, ranked)]
    state, impl = _state(llama), arch.unwrap(llama).config._attn_implementation
    out = experiments.attack_profiles(llama, windows, attacks, batch_size=4)
    assert _same_state(llama, state) and arch.unwrap(llama).config._attn_implementation == impl
    assert list(out) == ["base", "zero_top2", "random_top2_s0"]
    assert torch.equal(out["base"].hidden_pos0, base_profile.hidden_pos0)
    base, zero, rand = (out[n].ratio[LAYER:] for n in out)
    assert (zero < 1e-2 * base).all()  # the massive first token is gone after the massive layer
    assert ((rand - base).abs() < 0.01 * base).all()  # random rows barely move it
    for p in out.values():  # the layers before the attacked one are untouched
        assert torch.equal(p.hidden_pos0[:, :LAYER], base_profile.hidden_pos0[:, :LAYER])
    frame = experiments.ablation_frame(out, LAYER)
    assert list(frame.index) == list(out) and (frame.layers == 4 - LAYER - 1).all()
    assert frame.ratio_after["zero_top2"] < 1e-2 * frame.ratio_after["base"]
    assert frame.ratio_after["base"] == pytest.approx(float(base_profile.ratio[LAYER + 1:].mean()))


def test_ablation_frame_on_planted_and_moved_sinks() -> None:
    """Layers after the massive one (1): the base model sinks on position 0 (rank 1, lazy); the attack
    moves each window's sink to another column (3, 5, 7, 9); layers 0 and 1 (uniform) must not count."""
    before = [_uniform(), _uniform()]
    base = _profile([before + [_sink(), _sink()]] * 4, [[1.0, 1.0, 1000.0, 3000.0]] * 4)
    cols = (3, 5, 7, 9)
    moved = _profile([before + [_column(c), _column(c)] for c in cols], [[1.0, 1.0, 1.0, 3.0]] * 4)
    f = experiments.ablation_frame({"base": base, "zero_top2": moved, "random_top2_s0": base}, massive_layer=1)
    assert list(f.index) == ["base", "zero_top2", "random_top2_s0"]
    b, z = f.loc["base"], f.loc["zero_top2"]
    assert b.pos0_share == pytest.approx(1.0) and b.pos0_share_ci95 == pytest.approx([1.0, 1.0])
    assert b.pos0_share_windows.tolist() == pytest.approx([1.0] * 4)  # one value a window: what the intervals pair
    assert z.pos0_share_windows.tolist() == pytest.approx([1 / T_ATT] * 4)
    assert z.pos0_share == pytest.approx(1 / T_ATT)  # only row 0 still looks at position 0
    expected_col = np.mean([(T_ATT - c) / T_ATT for c in cols])
    assert z.maxcol_share == pytest.approx(expected_col)
    lo, hi = z.maxcol_share_ci95
    assert (T_ATT - 9) / T_ATT <= lo < expected_col < hi <= (T_ATT - 3) / T_ATT
    assert (b.moved_sinks, z.moved_sinks) == (0.0, 1.0)
    assert (b.lazy_layers, z.lazy_layers) == (2, 0) and (b.sink_layers, z.sink_layers) == (2, 0)
    assert (b.ratio_after, z.ratio_after) == (pytest.approx(2000.0), pytest.approx(2.0))
    assert b.layers == z.layers == 2
    # the same profiles read from the massive layer 0: the uniform layer 1 now counts
    assert experiments.ablation_frame({"base": base}, 0).loc["base"].pos0_share < 0.8


# ---------------------------------------------------------------- 3. lazy layers vs compressibility


def test_layer_fraction() -> None:
    got = experiments.layer_fraction([[0.2, 0.4, None], [1.0, 1.0, 1.0], [None, 0.3, None]])
    np.testing.assert_allclose(got, [0.3, 1.0, 0.3])
    with pytest.warns(RuntimeWarning):  # a layer with no entries at all has no fraction
        assert np.isnan(experiments.layer_fraction([[None, None], [0.5, 0.5]])[0])
    for empty in ([], [[]]):
        with pytest.raises(ValueError, match="non-empty"):
            experiments.layer_fraction(empty)


E_NOISE = np.array([0.0, 0.3, -0.2, 0.1, -0.4, 0.25, -0.1, 0.35])  # per layer, what is not depth


def _layer_stats(avgmass: np.ndarray, maxrank: np.ndarray, share: np.ndarray) -> AttentionStats:
    """AttentionStats with the given per-layer AvgMass, MaxRank and position-0 share (2 windows, 2 heads:
    the second head's rank is lower, so the max over heads is the first's)."""
    n, heads = 2, 2
    per = lambda v: torch.tensor(v, dtype=F64)[None, :, None].expand(n, -1, heads).clone()  # noqa: E731
    rank = per(maxrank)
    rank[:, :, 1] -= 0.5
    return AttentionStats({"rank": rank, "mass": per(avgmass), "pos0_share": per(share)},
                          torch.zeros(len(avgmass), heads, 2, 2), 0.9, 0.9, 2)


def test_lazy_vs_compressible_planted_and_detrended(fast_bootstrap) -> None:
    """AvgMass and the kept rank fraction both rise with depth and share a non-depth component e:
    rho = 1 raw and after detrending; flip e's sign in the ranks and the raw rho stays 1 while the
    detrended one becomes -1 (depth alone made them agree). Layer 0 (not searched) holds wild values
    that would spoil every correlation if the layers were misaligned."""
    depth = np.arange(8.0)
    avgmass = 10 + depth + E_NOISE
    avgmass[0] = 1000.0
    maxrank = 20 - depth
    maxrank[0] = -5.0
    share = np.array([0.9, 0.1, 0.5, 0.2, 0.7, 0.3, 0.6, 0.4])
    stats = _layer_stats(avgmass, maxrank, share)
    layers = list(range(1, 8))
    for sign in (1.0, -1.0):
        frac = 0.4 + 0.05 * depth[1:] + sign * 0.01 * E_NOISE[1:]
        table = [[f - 0.01, f + 0.01, None] for f in frac]  # mean over kinds, None ignored
        frame, corr = experiments.lazy_vs_compressible(stats, table, layers, seed=0)
        assert list(frame.index) == layers and frame.index.name == "layer"
        np.testing.assert_allclose(frame.avgmass, avgmass[1:])
        np.testing.assert_allclose(frame.maxrank, maxrank[1:])
        np.testing.assert_allclose(frame.pos0_share, share[1:])
        np.testing.assert_allclose(frame.rank_fraction, frac)
        assert set(corr) == {f"{m}{s}" for m in ("maxrank", "avgmass", "pos0_share") for s in ("", "_detrended")}
        assert corr["avgmass"]["rho"] == pytest.approx(1.0) and corr["avgmass"]["ci95"] == pytest.approx([1, 1])
        assert corr["maxrank"]["rho"] == pytest.approx(-1.0)
        assert corr["avgmass_detrended"]["rho"] == pytest.approx(sign)
        assert corr["pos0_share"]["rho"] == pytest.approx(scipy_stats.spearmanr(share[1:], frac).statistic)
        assert all(c["n"] == 7 for c in corr.values())

    # shuffled ranks, and layer 1 without search ranks (it drops out of every correlation): no longer
    # monotone; rho is Spearman's of the remaining shuffled pairs
    frac = (0.4 + 0.05 * depth[1:])[[3, 0, 6, 1, 5, 2, 4]]
    with pytest.warns(RuntimeWarning):
        _, corr = experiments.lazy_vs_compressible(stats, [[None]] + [[f] for f in frac[1:]], layers)
    assert corr["avgmass"]["rho"] == pytest.approx(scipy_stats.spearmanr(avgmass[2:], frac[1:]).statistic)
    assert corr["avgmass"]["rho"] < 0.9
    assert all(c["n"] == 6 for c in corr.values())
    with pytest.raises(ValueError, match="searched layers"):
        experiments.lazy_vs_compressible(stats, [[f] for f in frac], list(range(8)))


# ------------------------------------------------------------- 4. the mean term and the first token


def _outputs(model: nn.Module, ids: torch.Tensor, paths: list[str]) -> dict[str, torch.Tensor]:
    """Each module's whole output [N, T, m] (float64), from hooks on one forward of the full model."""
    got: dict[str, torch.Tensor] = {}
    hooked_forward(model, ids, lambda: [model.get_submodule(p).register_forward_hook(
        lambda _m, _a, y, p=p: got.__setitem__(p, y.detach().double())) for p in paths])
    return got


def test_first_token_means_match_hooked_outputs(llama, calib, decomps, means) -> None:
    paths = list(decomps)
    assert list(means) == paths
    ys = _outputs(llama, calib, paths)
    for p in paths:
        mu0, rest = means[p]
        assert mu0.dtype == rest.dtype == F64
        y = ys[p]
        scale = float(y.abs().max())
        torch.testing.assert_close(mu0, y[:, 0].mean(0), rtol=1e-5, atol=1e-6 * scale)
        torch.testing.assert_close(rest, y[:, 1:].mean((0, 1)), rtol=1e-5, atol=1e-6 * scale)
    # the planted massive value: down_proj of the massive layer writes it into hidden dim DIM at position 0
    mu0, rest = means[f"model.layers.{LAYER}.mlp.down_proj"]
    assert abs(float(mu0[DIM])) > 100 * abs(float(rest[DIM])) and abs(float(mu0[DIM])) > 1000
    mu0, rest = means["model.layers.0.mlp.down_proj"]
    assert abs(float(mu0[DIM])) < 10 * abs(float(rest[DIM])) + 1.0  # not before it
    other = experiments.first_token_means(llama, calib, paths, batch_size=5)  # batching does not matter
    for p in paths:
        torch.testing.assert_close(other[p][0], means[p][0], rtol=1e-5, atol=1e-4)
    for bad in (calib[:, :1], calib[0]):
        with pytest.raises(ValueError, match="T >= 2"):
            experiments.first_token_means(llama, bad, paths)


def test_mean_consistency_same_other_and_first_token_free_calibration(llama, calib, decomps, means) -> None:
    t = calib.shape[1]
    assert experiments.mean_consistency(decomps, means, t) < 1e-5
    other = decomposition.decompose_model(llama, _ids(6, 12, seed=7), [0, LAYER], batch_size=4)
    assert experiments.mean_consistency(other, means, t) > 0.1
    late = decomposition.decompose_model(llama, calib, [0, LAYER], batch_size=4, exclude_first=True)
    assert experiments.mean_consistency(late, means, t) > 1.0  # position 0's massive share is missing


def test_mean_parts_split_the_compensation(llama, calib, decomps, means) -> None:
    t = calib.shape[1]
    parts = {part: experiments.mean_parts(decomps, means, t, part) for part in experiments.MEAN_PARTS}
    for p, d in decomps.items():
        assert torch.equal(parts["all"][p].mean, d.mean)
        assert parts["first_token"][p].spectra is d.spectra  # the projections are untouched
        assert torch.equal(parts["none"][p].mean, torch.zeros_like(d.mean))
        total = parts["first_token"][p].mean.double() + parts["other_tokens"][p].mean.double()
        torch.testing.assert_close(total, d.mean.double(), rtol=0, atol=1e-5 * float(d.mean.double().norm()))
        # the compensation b = (I - P_r) mu is linear in mu: the two parts' biases add up to the full one
        module, r = llama.get_submodule(p), budgets.rank_for(0.5, d.kappa)
        b = {part: parts[part][p].factors(module, "feature", r)[2].double() for part in experiments.MEAN_PARTS}
        torch.testing.assert_close(b["first_token"] + b["other_tokens"], b["all"], rtol=0,
                                   atol=1e-5 * float(d.mean.double().norm()) + 1e-6)
        # no mean: the factors of feature_nomean (LLaMA has no bias: b = 0)
        w1, w2, b_nomean = d.factors(module, "feature_nomean", r)
        w1_none, w2_none, _ = parts["none"][p].factors(module, "feature", r)
        assert b_nomean is None and torch.equal(w1, w1_none) and torch.equal(w2, w2_none)
        assert torch.equal(b["none"], torch.zeros_like(b["none"]))
    # the massive layer's down_proj: almost all of its mean is the first token's part
    down = f"model.layers.{LAYER}.mlp.down_proj"
    assert float(parts["first_token"][down].mean[DIM]) == pytest.approx(float(decomps[down].mean[DIM]), rel=0.2)
    assert torch.equal(decomps[down].mean, parts["all"][down].mean)  # the inputs are not modified
    with pytest.raises(ValueError, match="unknown part"):
        experiments.mean_parts(decomps, means, t, "half")
    with pytest.raises(KeyError, match="first-token means"):
        experiments.mean_parts(decomps, {p: v for p, v in means.items() if "layers.0." in p}, t, "all")


def _synthetic(layer: int, mean: torch.Tensor, m: int = 10) -> Decomposition:
    """An m x m module whose centred eigenvectors are e_0, e_1, ... (kappa = m / 2)."""
    eye = torch.eye(m)
    vals = torch.arange(m, 0, -1, dtype=torch.float32)
    return Decomposition(Target(layer, "mlp.down_proj", f"l.{layer}.mlp.down_proj"), m, m, False, mean.float(),
                         {"centred": (vals, eye[:, :m // 2]), "uncentred": (vals, eye[:, :m // 2])},
                         (eye[:, :m // 2], vals, eye[:m // 2]), m // 2)


def test_lost_mean_share_planted_offsets() -> None:
    """An offset c e_7 (a direction every rank discards) on the first token only carries all of the
    discarded mean (share 1); on every token, mu_0 / T is 1 / T of mu (share 1 / T^2); an offset in a
    kept direction loses nothing (share undefined); the rank follows pct (kappa 5: 40% -> 2, 60% -> 3)."""
    t, c, m = 8, 3.0, 10
    e = torch.eye(m, dtype=F64)
    first_only = (t * c * e[7], torch.zeros(m, dtype=F64))  # mu_0, mu_rest
    every = (c * e[7], c * e[7])
    kept = (t * c * e[2], torch.zeros(m, dtype=F64))
    decomps = {d.target.path: d for d in (_synthetic(0, c * e[7]), _synthetic(1, c * e[7]), _synthetic(2, c * e[2]))}
    means = dict(zip(decomps, (first_only, every, kept), strict=True))
    f = experiments.lost_mean_share(decomps, means, t, 40)
    assert list(f.columns) == ["layer", "kind", "lost_mean", "first_over_mean", "share_first_token"]
    assert f.layer.tolist() == [0, 1, 2] and f.kind.tolist() == ["down"] * 3
    assert f.lost_mean.tolist() == pytest.approx([c**2, c**2, c**2])
    assert f.share_first_token.tolist()[:2] == pytest.approx([1.0, 1 / t**2])
    assert f.first_over_mean.tolist()[:2] == pytest.approx([t**2, 1.0])  # ||(I-P) mu_0||^2 / ||(I-P) mu||^2
    assert f.share_first_token.iloc[2] == pytest.approx(1.0)  # e_2 is discarded at rank 2
    g = experiments.lost_mean_share(decomps, means, t, 60)  # rank 3 keeps e_2
    assert g.lost_mean.iloc[2] == pytest.approx(0.0, abs=1e-12) and math.isnan(g.share_first_token.iloc[2])
    assert math.isnan(g.first_over_mean.iloc[2])
    assert g.share_first_token.tolist()[:2] == pytest.approx([1.0, 1 / t**2])


def test_lost_mean_share_is_the_compensation_bias(llama, calib, decomps, means) -> None:
    """On the tiny model: the discarded mean energy ||(I - P_r) mu||^2 is the squared feature-method bias
    of a bias-free module, and the first token's share is that of the bias built from mu_0 / T alone."""
    t, pct = calib.shape[1], 50
    f = experiments.lost_mean_share(decomps, means, t, pct).set_index(["layer", "kind"])
    assert len(f) == len(decomps)
    first = experiments.mean_parts(decomps, means, t, "first_token")
    for p, d in decomps.items():
        module, r = llama.get_submodule(p), budgets.rank_for(pct / 100, d.kappa)
        b = d.factors(module, "feature", r)[2].double()
        b0 = first[p].factors(module, "feature", r)[2].double()
        row = f.loc[(d.target.layer, d.target.kind)]
        assert row.lost_mean == pytest.approx(float(b.square().sum()), rel=1e-4)
        assert row.share_first_token == pytest.approx(float(b0.square().sum() / b.square().sum()), rel=1e-3)
        assert row.first_over_mean == pytest.approx(row.share_first_token * t**2, rel=1e-12)


# ---------------------------------------------------------------- 5. protected low-rank massive layer


class _SpyInputs:
    """``LayerInputs`` stand-in that runs ``check`` on the model as it is while being scored."""

    def __init__(self, inputs: layer_inputs.LayerInputs, check):
        self.inputs, self.check, self.calls = inputs, check, 0

    def perplexity_and_windows(self, start: int) -> tuple[float, np.ndarray]:
        self.calls += 1
        self.check()
        return self.inputs.perplexity_and_windows(start)


@pytest.mark.parametrize("method", ["weight_svd", "feature"])
def test_massive_layer_perplexity_protects_the_massive_rows(llama, calib, decomps, ranked, method) -> None:
    layer_decomps = {p: d for p, d in decomps.items() if d.target.layer == LAYER}
    moments = protected.layer_moments(llama, calib, LAYER, batch_size=4)
    inputs = layer_inputs.LayerInputs(llama, _ids(3, 12, seed=2), batch_size=4, keep=[LAYER])
    pct, state = 50, _state(llama)
    originals = {p: llama.get_submodule(p) for p in layer_decomps}
    plain_ranks = lowrank.uniform_ranks(decomps, pct, [LAYER])
    bias = method == "feature"
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3))

    def check_protected() -> None:
        for p, dense in originals.items():
            module = llama.get_submodule(p)
            if p.endswith(("gate_proj", "up_proj")):
                assert isinstance(module, RowProtectedLinear) and module.rows.tolist() == sorted(ranked)
                assert module.rank == protected.protected_rank(192, 64, len(ranked), plain_ranks[p], bias)
                with torch.no_grad():  # the massive rows are the dense module's
                    torch.testing.assert_close(module(x)[..., ranked], dense(x)[..., ranked], rtol=1e-5, atol=1e-5)
            else:
                assert isinstance(module, LowRankLinear) and module.rank == plain_ranks[p]

    def check_plain() -> None:
        for p in originals:
            module = llama.get_submodule(p)
            assert isinstance(module, LowRankLinear) and module.rank == plain_ranks[p]

    spy_p, spy_u = _SpyInputs(inputs, check_protected), _SpyInputs(inputs, check_plain)
    guarded = experiments.massive_layer_perplexity(llama, decomps, moments, spy_p, LAYER, ranked, method, pct, True)
    plain = experiments.massive_layer_perplexity(llama, decomps, moments, spy_u, LAYER, ranked, method, pct, False)
    assert spy_p.calls == spy_u.calls == 1
    assert _same_state(llama, state) and all(llama.get_submodule(p) is m for p, m in originals.items())
    # the plain arm is notebook 05's uniform decomposition of that layer
    with lowrank.decomposed(llama, decomps, method, plain_ranks):
        assert plain["ppl"] == pytest.approx(inputs.perplexity(LAYER), rel=1e-12)
        np.testing.assert_array_equal(plain["window_nll"], inputs.perplexity_and_windows(LAYER)[1])
    assert plain["ranks"] == plain_ranks
    assert guarded["ranks"] == {p: (protected.protected_rank(192, 64, 2, r, bias) if p.endswith(("gate_proj", "up_proj"))
                                    else r) for p, r in plain_ranks.items()}
    expected_plain = sum(budgets.factor_params(d.m, d.n, plain_ranks[p], bias) for p, d in layer_decomps.items())
    assert plain["params"] == expected_plain
    assert guarded["params"] <= plain["params"]
    k, rp = len(ranked), guarded["ranks"][f"model.layers.{LAYER}.mlp.gate_proj"]
    saved = 2 * (budgets.factor_params(192, 64, plain_ranks[f"model.layers.{LAYER}.mlp.gate_proj"], bias)
                 - (k * 64 + rp * (192 - k + 64) + ((192 - k) if bias else 0)))
    assert plain["params"] - guarded["params"] == saved
    assert math.isfinite(guarded["ppl"]) and guarded["ppl"] != plain["ppl"]


def test_massive_layer_perplexity_kinds_and_missing_layers(llama, calib, decomps, ranked) -> None:
    """``kinds``: only those modules of the layer are replaced (and counted); the others stay dense."""
    moments = protected.layer_moments(llama, calib, LAYER, batch_size=4)
    inputs = layer_inputs.LayerInputs(llama, _ids(3, 12, seed=2), batch_size=4, keep=[LAYER])
    gate_up = [f"model.layers.{LAYER}.mlp.{k}_proj" for k in ("gate", "up")]
    dense = {p: llama.get_submodule(p) for p, d in decomps.items() if d.target.layer == LAYER}

    def check() -> None:
        for p, module in dense.items():
            assert isinstance(llama.get_submodule(p), RowProtectedLinear) if p in gate_up else \
                llama.get_submodule(p) is module

    spy = _SpyInputs(inputs, check)
    out = experiments.massive_layer_perplexity(llama, decomps, moments, spy, LAYER, ranked, "feature", 50, True,
                                             kinds=("gate", "up"))
    assert spy.calls == 1 and list(out["ranks"]) == gate_up
    r = budgets.rank_for(0.5, budgets.kappa(192, 64))
    rp = protected.protected_rank(192, 64, len(ranked), r, True)
    assert out["ranks"] == dict.fromkeys(gate_up, rp)
    assert out["params"] == 2 * (len(ranked) * 64 + rp * (192 - len(ranked) + 64) + (192 - len(ranked)))
    assert all(llama.get_submodule(p) is m for p, m in dense.items())
    with pytest.raises(ValueError, match=r"no decompositions for \[2\]"):  # layer 2 was not decomposed
        experiments.massive_layer_perplexity(llama, decomps, moments, inputs, 2, ranked, "feature", 50, True)
    with pytest.raises(ValueError, match="of kinds"):
        experiments.massive_layer_perplexity(llama, decomps, moments, inputs, LAYER, ranked, "feature", 50, True,
                                           kinds=("c_fc",))


# ------------------------------------------------------------------- 6. MacDrop under compression


@pytest.fixture(scope="module")
def val_examples(llama_tok):
    cfg3 = profiles.load_config("03_macdrop_finetuning", "smoke")
    return finetune.datasets(cfg3, "tiny-llama", llama_tok[1])[1]


def test_compression_losses_dense_and_decomposed(llama_tok, calib, val_examples) -> None:
    model, tok = llama_tok
    pad, state = data.pad_id(tok), _state(model)
    out = experiments.compression_losses(model, calib, LAYER, val_examples, pad, (50, 25), batch_size=4)
    assert _same_state(model, state) and not any(isinstance(m, LowRankLinear) for m in model.modules())
    assert list(out) == ["dense", 50, 25]
    assert out["dense"] == evaluation.response_loss(model, val_examples, pad, 4)
    own = decomposition.decompose_model(model, calib, [LAYER], batch_size=4)  # this model's own statistics
    for pct in (50, 25):
        with lowrank.decomposed(model, own, "feature", lowrank.uniform_ranks(own, pct, [LAYER])):
            assert out[pct] == pytest.approx(evaluation.response_loss(model, val_examples, pad, 4), rel=1e-9)
        assert out[pct] != out["dense"]
    # another model (the massive channel zeroed for good) gets its own statistics and losses
    with edits.zero_channels(model, {LAYER: [CHANNEL]}):
        other = experiments.compression_losses(model, calib, LAYER, val_examples, pad, (50,), batch_size=4)
    assert other["dense"] != out["dense"] and other[50] != out[50]
    assert _same_state(model, state)


def test_compression_losses_100_pct_of_kappa_is_not_the_dense_loss(llama_tok, calib, val_examples) -> None:
    """100% of kappa is a real budget of notebook 05's grid (budgets.PCTS), not the dense model: asking for it
    must not replace the dense loss by the rank-kappa loss."""
    model, tok = llama_tok
    pad = data.pad_id(tok)
    dense = evaluation.response_loss(model, val_examples, pad, 4)
    out = experiments.compression_losses(model, calib, LAYER, val_examples, pad, (100, 50), batch_size=4)
    assert out["dense"] == pytest.approx(dense, rel=1e-12) and out[100] != out["dense"]


def test_robustness_frame() -> None:
    losses = {("pretrained", 0): {"dense": 1.0, 50: 1.5, 25: 2.0},
              ("lora", 0): {"dense": 0.8, 50: 1.0, 25: 1.9}, ("lora", 1): {"dense": 0.7, 50: 1.2, 25: 1.3}}
    f = experiments.robustness_frame(losses)
    assert f.index.names == ["arm", "seed"] and list(f.index) == list(losses)
    assert list(f.columns) == [50, 25]
    np.testing.assert_allclose(f.to_numpy(dtype=float), [[0.5, 1.0], [0.2, 1.1], [0.5, 0.6]])
    assert f.loc["lora"][50].tolist() == pytest.approx([0.2, 0.5])  # per seed, as the notebook reads it


# ------------------------------------------------------------------- helpers: manifest, datasets


@pytest.fixture
def fake_root(monkeypatch, tmp_path):
    """REPO_ROOT moved to a temporary directory, so figures/<profile>/<nb>/ never touch the repository."""
    monkeypatch.setattr(profiles, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(session, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(manifest, "REPO_ROOT", tmp_path)
    return tmp_path


def _write_manifest(path, records: list[dict]) -> None:
    env.write_json_atomic(path, {"notebook": path.parent.name, "profile": path.parent.parent.name,
                                      "run": {"git_sha": "abc", "dirty": False}, "figures": [], "records": records})


def test_upstream_reads_an_earlier_notebooks_manifest(fake_root) -> None:
    nb = "05_lowrank_decomposition"
    path = fake_root / "figures" / "small" / nb / "manifest.json"
    ranks = [[0.5, None], [1.0, 0.25]]
    _write_manifest(path, [{"key": "m/lowrank/search/ranks", "value": ranks}, {"key": "m/x", "value": 3}])
    up = manifest.upstream(nb, "small")
    assert up["run"] == {"git_sha": "abc", "dirty": False}
    assert set(up["records"]) == {"m/lowrank/search/ranks", "m/x"}
    assert up["records"]["m/x"]["value"] == 3
    assert manifest.upstream_value(nb, "small", "m/lowrank/search/ranks") == ranks
    with pytest.raises(KeyError, match=r"05_lowrank_decomposition.*'m/missing'"):
        manifest.upstream_value(nb, "small", "m/missing")
    # the smoke profile writes under build/figures: a manifest of "small" is not one of "smoke"
    with pytest.raises(FileNotFoundError, match=r"build/figures/smoke/05_lowrank_decomposition/manifest.json"):
        manifest.upstream(nb, "smoke")
    smoke = fake_root / "build" / "figures" / "smoke" / nb / "manifest.json"
    _write_manifest(smoke, [{"key": "m/x", "value": 4}])
    assert manifest.upstream_value(nb, "smoke", "m/x") == 4
    assert json.loads(path.read_text())["records"][1]["value"] == 3  # reading changes nothing


def test_upstream_errors_name_the_command(fake_root, monkeypatch) -> None:
    with pytest.raises(FileNotFoundError, match=r"make reproduce NB=03 PROFILE=small"):
        manifest.upstream("03_macdrop_finetuning", "small")
    with pytest.raises(FileNotFoundError, match=r"make reproduce NB=03 PROFILE=small"):
        manifest.upstream_value("03_macdrop_finetuning", "small", "m/x")
    monkeypatch.setenv("REPRO_PROFILE", "smoke")  # the environment's profile wins, and the message says so
    with pytest.raises(FileNotFoundError, match=r"make reproduce NB=05 PROFILE=smoke"):
        manifest.upstream("05_lowrank_decomposition", "small")
    with pytest.raises(ValueError, match="no config"):
        manifest.upstream("99_nothing", "small")


def test_finetune_datasets_are_notebook_03s(byte_tok) -> None:
    cfg = profiles.load_config("03_macdrop_finetuning", "smoke")
    train, val = finetune.datasets(cfg, "tiny-llama", byte_tok)
    by_hand = [data.tokenize_pairs(byte_tok, "tiny-llama", data.instruction_pairs(cfg.corpus, split, n, cfg.seed),
                                   cfg.settings.max_len) for split, n in (("train", cfg.n_train), ("val", cfg.n_val))]
    assert train == by_hand[0] and val == by_hand[1]
    assert len(train) == cfg.n_train and len(val) == cfg.n_val
    assert all(len(e["input_ids"]) <= cfg.settings.max_len for e in train + val)
    assert {tuple(e["input_ids"]) for e in train}.isdisjoint({tuple(e["input_ids"]) for e in val})
    reseeded = finetune.datasets(dataclasses.replace(cfg, seed=cfg.seed + 1), "tiny-llama", byte_tok)[0]
    assert reseeded != train  # the seed picks the pairs


# ----------------------------------------------------------------------------------- plots


@pytest.fixture
def close_figures():
    yield
    plt.close("all")


def test_plot_massive_vs_sink(close_figures) -> None:
    p = _profile([[_uniform(), _sink(), _sink()]] * 2, [[1.0, 100.0, 90.0]] * 2)
    fig = figures.plot_massive_vs_sink({"tiny-llama": p.frame(), "tiny-gpt2": p.frame()},
                                        {"tiny-llama": 1, "tiny-gpt2": None})
    assert isinstance(fig, plt.Figure) and len(fig.axes) == 4  # a twin axis per model
    assert len(fig.axes[0].lines) == 2 and len(fig.axes[1].lines) == 1  # ratio + massive-layer mark; none


def test_plot_ablation_attention(close_figures) -> None:
    base = _profile([[_uniform(), _sink(), _sink()]] * 2, [[1.0, 100.0, 90.0]] * 2)
    moved = _profile([[_uniform(), _column(3), _column(3)]] * 2, [[1.0, 1.0, 1.0]] * 2)
    profiles = {"tiny-llama": {"base": base, "zero_top2": moved, "random_top2_s0": base, "random_top2_s1": base},
                "tiny-gpt2": {"base": base}}
    fig = figures.plot_ablation_attention(profiles, {"tiny-llama": 0, "tiny-gpt2": None})
    assert isinstance(fig, plt.Figure) and len(fig.axes) == 4
    assert len(fig.axes[0].lines) == 4 + 1  # four conditions + the massive layer


def test_plot_lazy_vs_rank(close_figures, fast_bootstrap) -> None:
    depth = np.arange(8.0)
    stats = _layer_stats(10 + depth + E_NOISE, 20 - depth, np.linspace(0.1, 0.9, 8))
    frame, corr = experiments.lazy_vs_compressible(stats, [[0.4 + 0.05 * d] for d in depth[1:]], list(range(1, 8)))
    fig = figures.plot_lazy_vs_rank(frame, corr, "tiny")
    assert isinstance(fig, plt.Figure) and len(fig.axes) == 4  # left, right, left's twin, colour bar
    assert "+1.00" in fig.axes[1].get_title()


def test_plot_mean_parts(close_figures) -> None:
    share = pd.DataFrame({"layer": [0, 0, 1, 1], "kind": ["q", "down", "q", "down"], "lost_mean": [1.0, 2.0, 3.0, 4.0],
                          "first_over_mean": [6.4, 57.6, 12.8, 51.2], "share_first_token": [0.1, 0.9, 0.2, 0.8]})
    ppl = {"dense": 10.0, "all": 11.0, "first_token": 12.0, "other_tokens": 30.0, "none": 40.0}
    fig = figures.plot_mean_parts(share, ppl, 1)
    assert isinstance(fig, plt.Figure) and len(fig.axes) == 2
    assert len(fig.axes[0].lines) == 2 + 2 and len(fig.axes[1].patches) == len(ppl)  # kinds + massive + 1


def test_plot_protected(close_figures) -> None:
    frame = pd.DataFrame([{"method": m, "pct": pct, "protected": g, "ppl": 10.0 + pct / 10 + g, "params": 1}
                          for m in ("weight_svd", "feature") for pct in (50, 25) for g in (False, True)])
    fig = figures.plot_protected(frame, 9.0, "tiny")  # no scope column: one panel
    assert isinstance(fig, plt.Figure) and len(fig.axes) == 1
    assert len(fig.axes[0].lines) == 2 * 2 + 1  # two methods x (plain, protected) + the dense line
    scoped = pd.concat([frame.assign(scope="all"), frame[frame.method == "feature"].assign(scope="gate_up")])
    fig = figures.plot_protected(scoped, 9.0, "tiny")
    assert len(fig.axes) == 2 and len(fig.axes[1].lines) == 2 + 1


def test_plot_macdrop_compression(close_figures) -> None:
    increase = experiments.robustness_frame({
        ("pretrained", 0): {"dense": 1.0, 50: 1.5, 25: 2.0}, ("lora", 0): {"dense": 0.8, 50: 1.0, 25: 1.9},
        ("lora", 1): {"dense": 0.7, 50: 1.2, 25: 1.3}, ("lora_macdrop", 0): {"dense": 0.8, 50: 0.9, 25: 1.0}})
    fig = figures.plot_macdrop_compression(increase, "lora", "lora_macdrop", 1)
    assert isinstance(fig, plt.Figure) and len(fig.axes) == 1
    assert len(fig.axes[0].patches) == 3 * 2  # a bar per arm and budget


def test_massive_rows_are_the_rows_that_produce_the_channels(llama) -> None:
    """Llama: the same channel rows of gate_proj and up_proj; GPT-2: the rows of c_fc (Conv1D); zeroing
    exactly those rows is notebook 02's attack, so they must be the rows ``zero_channels`` edits."""
    rows = experiments.massive_rows(llama, LAYER, [CHANNEL, 3])
    assert sorted(p.rsplit(".", 1)[-1] for p in rows) == ["gate_proj", "up_proj"]
    assert all(r == [CHANNEL, 3] for r in rows.values())
    before = {p: budgets.weight_of(llama.get_submodule(p)).detach().clone() for p in rows}
    with edits.zero_channels(llama, {LAYER: [CHANNEL, 3]}):
        for p, r in rows.items():
            w = budgets.weight_of(llama.get_submodule(p))
            changed = (w != before[p]).any(1).nonzero().flatten().tolist()
            assert changed == sorted(r)
    gpt2, _ = models.load_model("tiny-gpt2")
    rows = experiments.massive_rows(gpt2, 0, [1])
    assert list(rows) == ["transformer.h.0.mlp.c_fc"] and rows["transformer.h.0.mlp.c_fc"] == [1]
