"""Notebook 06: experiments that link the three papers' outlier structure (DESIGN §1, issue 8).

None of the three papers measures these; each experiment reuses the machinery (and the caches) of
notebooks 01-05 on the same models and data:

1. ``sink_profile``: per layer, the first token's massive hidden value (SunMA / HoC) next to the attention
   mass on position 0 (Inheritune's degenerate, sink-dominated heads), from one forward pass.
2. ``attack_profiles``: the same profile with the massive weights zeroed (HoC Table 1's attack) or random
   rows zeroed (its control): do the sinks and the degenerate heads go, or move?
3. ``lazy_vs_compressible``: per layer, Inheritune's attention rank / mass against the ranks SFSD's
   perplexity search chose (notebook 05's manifest), with rank correlations and bootstrap intervals.
4. ``first_token_means`` / ``mean_parts``: how much of SFSD's mean-compensation term (§1.3) is the massive
   first token's share of the calibration mean, and which part the perplexity needs.
5. ``massive_layer_perplexity``: the massive layer decomposed with and without its k massive up/gate rows
   kept exact (``lowrank.protected_factorised``), at the same parameter budget.
6. ``compression_losses``: held-out loss of fine-tuned models (notebook 03's adapters, merged) when their
   massive layer is low-rank: does MacDrop make a model more robust to it than LoRA?
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch
from torch import nn

from common import arch, attention, capture, evaluation, lowrank
from common.ablation import Attack

# ------------------------------------------------------------------------------- 1. sinks


@dataclass
class SinkProfile:
    """Per window and layer: the largest |h| at position 0 (``hidden_pos0`` [N, L]), the median |h| over
    all tokens and dims of that layer (``hidden_median`` [N, L], SunMA's reference), and the attention
    metrics of notebook 04 on the same windows (``attention``)."""

    hidden_pos0: torch.Tensor
    hidden_median: torch.Tensor
    attention: attention.AttentionStats

    @property
    def ratio(self) -> torch.Tensor:
        """Mean over windows of max_d |h_0,d| / median |h|, per layer; [L]."""
        return (self.hidden_pos0 / self.hidden_median.clamp_min(1e-12)).double().mean(0)

    def frame(self) -> pd.DataFrame:
        """One row per layer: the massive value at position 0, its ratio to the median, the attention mass
        on position 0 (mean over heads), the largest column's share, MaxRank and AvgMass."""
        a = self.attention
        return pd.DataFrame({"layer": range(self.hidden_pos0.shape[1]),
                             "hidden_pos0": self.hidden_pos0.double().mean(0).numpy(),
                             "ratio": self.ratio.numpy(),
                             "pos0_share": a.per_layer("pos0_share").numpy(),
                             "maxcol_share": a.per_layer("maxcol_share").numpy(),
                             "maxrank": a.max_rank().numpy(), "avgmass": a.avg_mass().numpy()}).set_index("layer")


@torch.no_grad()
def sink_profile(model: nn.Module, windows: torch.Tensor, batch_size: int = 8, tau: float = 0.9,
                 eta: float = 0.9) -> SinkProfile:
    """One pass over ``windows`` [N, T] with eager attention: notebook 04's attention statistics and, from
    hooks on the same pass, notebook 01's position-0 hidden maxima and per-layer medians."""
    with capture.recording(model, ("hidden",), whole=True, k=1) as rec:
        stats = attention.capture_attention(model, windows.split(batch_size), tau, eta)
    s = rec.result()
    return SinkProfile(s.pos0["hidden"].abs().amax(-1), s.median["hidden"], stats)


def rank_correlation(x: Sequence[float], y: Sequence[float], n_resamples: int = 2000, seed: int = 0) -> dict:
    """Spearman's rho of the pairs (x_i, y_i) (NaN pairs dropped) with a percentile-bootstrap 95% interval
    over the pairs (layers are not independent draws: read the interval as a spread, not a test)."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"x and y must be 1-d and of equal length, got shapes {a.shape} and {b.shape}")
    ok = ~(np.isnan(a) | np.isnan(b))
    a, b = a[ok], b[ok]
    if len(a) < 3:
        raise ValueError(f"need at least 3 complete pairs for a rank correlation, got {len(a)}")

    def rho(u: np.ndarray, v: np.ndarray) -> float:
        ru, rv = pd.Series(u).rank().to_numpy(), pd.Series(v).rank().to_numpy()
        if ru.std() == 0 or rv.std() == 0:
            return float("nan")
        return float(np.corrcoef(ru, rv)[0, 1])

    rng = np.random.default_rng(seed)
    boots = np.array([rho(a[i], b[i]) for i in rng.integers(0, len(a), size=(n_resamples, len(a)))])
    boots = boots[~np.isnan(boots)]
    ci = [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))] if len(boots) else None
    return {"rho": rho(a, b), "ci95": ci, "n": int(len(a))}


def sink_summary(profile: SinkProfile, massive_layer: int | None,
                 threshold: float = attention.SINK_SHARE) -> dict:
    """Where the sink starts relative to the massive layer, and how closely the attention on position 0
    follows the first token's massive value across layers: the rank correlation of layer l's mass on
    position 0 with the log ratio of its *input* h_{l-1} (what its attention reads), l = 1..L-1."""
    f = profile.frame()
    out = attention.sink_vs_massive(profile.attention, massive_layer, threshold)
    out["ratio_at_massive"] = None if massive_layer is None else float(f.ratio.iloc[massive_layer])
    after = f.pos0_share.iloc[massive_layer + 1:] if massive_layer is not None else f.pos0_share.iloc[:0]
    out["pos0_share_after_massive"] = float(after.mean()) if len(after) else None
    out["correlation"] = rank_correlation(np.log10(f.ratio.to_numpy()[:-1]), f.pos0_share.to_numpy()[1:])
    return out


# ----------------------------------------------------------------------------- 2. ablation


def attack_profiles(model: nn.Module, windows: torch.Tensor, attacks: Sequence[Attack], batch_size: int = 8,
                    tau: float = 0.9, eta: float = 0.9) -> dict[str, SinkProfile]:
    """``sink_profile`` with each attack of notebook 02 applied (and undone afterwards)."""
    out = {}
    for a in attacks:
        with a.context(model):
            out[a.name] = sink_profile(model, windows, batch_size, tau, eta)
    return out


def _window_mean(values: torch.Tensor, layers: slice) -> np.ndarray:
    """Per window, the mean over ``layers`` and heads of a [N, L, H] metric."""
    return values[:, layers].double().mean((1, 2)).numpy()


def ablation_frame(profiles: dict[str, SinkProfile], massive_layer: int,
                   threshold: float = attention.SINK_SHARE) -> pd.DataFrame:
    """One row per condition, over the layers after the massive one: the mean attention mass on position 0
    and the largest column's share (mean over heads and windows, with a bootstrap 95% interval over the
    windows), the share of (window, layer, head) triples whose sink is not position 0 (moved sinks), the
    lazy layers (MaxRank < 2) and sink layers (mass on position 0 >= ``threshold``) among them, and the
    first token's massive ratio there."""
    n_layers = {p.hidden_pos0.shape[1] for p in profiles.values()}
    if not profiles or any(not 0 <= massive_layer < n for n in n_layers):
        raise ValueError(f"massive layer {massive_layer} must lie inside every profile's layers {sorted(n_layers)} "
                         "(and give at least one profile)")
    after = slice(massive_layer + 1, None)
    rows = {}
    for name, p in profiles.items():
        m = p.attention.metrics
        share, col = _window_mean(m["pos0_share"], after), _window_mean(m["maxcol_share"], after)
        rank = p.attention.max_rank()[after]
        rows[name] = {"pos0_share": share.mean(), "pos0_share_ci95": evaluation.bootstrap_ci(share),
                      "maxcol_share": col.mean(), "maxcol_share_ci95": evaluation.bootstrap_ci(col),
                      "moved_sinks": float((m["sink"][:, after] != 0).double().mean()),
                      "lazy_layers": int((rank < attention.LAZY_LAYER).sum()),
                      "sink_layers": int((p.attention.per_layer("pos0_share")[after] >= threshold).sum()),
                      "ratio_after": float(p.ratio[after].mean()), "layers": int(len(rank))}
    return pd.DataFrame(rows).T


# ------------------------------------------------------------------ 3. lazy layers vs compressibility


def layer_fraction(ranks: Sequence[Sequence[float | None]]) -> np.ndarray:
    """Per searched layer, the mean over module kinds of the chosen rank / kappa (notebook 05's
    ``M/lowrank/search/ranks``; 1 = kept dense, missing entries ignored)."""
    m = np.array([[np.nan if v is None else v for v in row] for row in ranks], dtype=float)
    if m.ndim != 2 or m.size == 0:
        raise ValueError("ranks must be a non-empty [layer][kind] table (notebook 05's search/ranks)")
    return np.nanmean(m, axis=1)


def _detrended(values: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """``values`` minus their least-squares line in ``depth`` (what is left once depth is accounted for)."""
    slope, intercept = np.polyfit(depth, values, 1)
    return values - (slope * depth + intercept)


def lazy_vs_compressible(stats: attention.AttentionStats, ranks: Sequence[Sequence[float | None]],
                         layers: Sequence[int], seed: int = 0) -> tuple[pd.DataFrame, dict[str, dict]]:
    """Per searched layer: MaxRank, AvgMass and position-0 mass (notebook 04's metrics) next to the rank
    fraction the perplexity search kept; rank correlations of each metric with it, raw and with the linear
    depth trend removed from both (both could simply fall with depth)."""
    frac = layer_fraction(ranks)
    if len(frac) != len(layers):
        raise ValueError(f"{len(frac)} rows of search ranks for {len(layers)} layers: pass the searched layers")
    idx = list(layers)
    frame = pd.DataFrame({"layer": idx, "maxrank": stats.max_rank()[idx].numpy(),
                          "avgmass": stats.avg_mass()[idx].numpy(),
                          "pos0_share": stats.per_layer("pos0_share")[idx].numpy(), "rank_fraction": frac})
    depth = frame.layer.to_numpy(dtype=float)
    ok = ~np.isnan(frac)
    corr = {}
    for metric in ("maxrank", "avgmass", "pos0_share"):
        x = frame[metric].to_numpy(dtype=float)
        corr[metric] = rank_correlation(x, frac, seed=seed)
        corr[f"{metric}_detrended"] = rank_correlation(_detrended(x[ok], depth[ok]),
                                                       _detrended(frac[ok], depth[ok]), seed=seed)
    return frame.set_index("layer"), corr


# ------------------------------------------------------------- 4. the mean term and the first token


@torch.no_grad()
def first_token_means(model: nn.Module, calibration: torch.Tensor, paths: Sequence[str],
                      batch_size: int = 8) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module path, the mean output at position 0 and over positions 1..T-1 on ``calibration`` [N, T]
    (the dense model, one pass; float64). The calibration mean of SFSD's statistics is
    mu = (mu_0 + (T - 1) mu_rest) / T."""
    if calibration.ndim != 2 or calibration.shape[1] < 2:
        raise ValueError(f"calibration must be [N, T] windows with T >= 2, got shape {tuple(calibration.shape)}")
    sums: dict[str, list] = {}

    def hook(path: str):
        def fn(_module, _args, y):
            y = y.detach().double()
            s0, s1 = y[:, 0].sum(0), y[:, 1:].sum((0, 1))
            if path in sums:
                sums[path][0] += s0
                sums[path][1] += s1
            else:
                sums[path] = [s0, s1]
        return fn

    handles = [model.get_submodule(p).register_forward_hook(hook(p)) for p in paths]
    dev = next(model.parameters()).device
    try:
        for ids in calibration.split(batch_size):
            arch.backbone(model)(input_ids=ids.to(dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    n, t = calibration.shape
    return {p: (s0.cpu() / n, s1.cpu() / (n * (t - 1))) for p, (s0, s1) in sums.items()}


MEAN_PARTS = ("all", "first_token", "other_tokens", "none")


def _check_seq_len(seq_len: int) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be the calibration window length T >= 1")


def mean_parts(decomps: dict[str, lowrank.Decomposition], means: dict[str, tuple[torch.Tensor, torch.Tensor]],
               seq_len: int, part: str) -> dict[str, lowrank.Decomposition]:
    """The decompositions with the mean mu of their compensation term replaced by one part of it:
    ``first_token`` mu_0 / T, ``other_tokens`` (T - 1) mu_rest / T (the two sum to mu), ``all`` mu itself,
    ``none`` zero (= ``feature_nomean``). The projections P_r are unchanged."""
    if part not in MEAN_PARTS:
        raise ValueError(f"unknown part {part!r}; known: {', '.join(MEAN_PARTS)}")
    _check_seq_len(seq_len)
    missing = [p for p in decomps if p not in means]
    if missing:
        raise KeyError(f"no first-token means for {missing[:3]}; pass first_token_means(...) of the same modules")
    out = {}
    for p, d in decomps.items():
        mu0, rest = (t.to(d.mean.device, torch.float64) for t in means[p])
        value = {"all": d.mean.double(), "first_token": mu0 / seq_len, "other_tokens": rest * (seq_len - 1) / seq_len,
                 "none": torch.zeros_like(mu0)}[part]
        out[p] = replace(d, mean=value.float())
    return out


def mean_consistency(decomps: dict[str, lowrank.Decomposition],
                     means: dict[str, tuple[torch.Tensor, torch.Tensor]], seq_len: int) -> float:
    """Largest relative gap between each decomposition's stored mean and (mu_0 + (T-1) mu_rest) / T: near 0
    when both come from the same model and calibration windows (a check that the parts add up)."""
    _check_seq_len(seq_len)
    if not decomps:
        raise ValueError("mean_consistency needs at least one decomposition")
    gaps = []
    for p, d in decomps.items():
        mu0, rest = (t.to(d.mean.device, torch.float64) for t in means[p])
        total = (mu0 + (seq_len - 1) * rest) / seq_len
        gaps.append(float((total - d.mean.double()).norm() / d.mean.double().norm().clamp_min(1e-12)))
    return max(gaps)


def lost_mean_share(decomps: dict[str, lowrank.Decomposition], means: dict[str, tuple[torch.Tensor, torch.Tensor]],
                    seq_len: int, pct: float) -> pd.DataFrame:
    """Per module at rank pct% of kappa, in the directions the projection discards (I - P_r): the first
    token's mean output against the calibration mean, ``first_over_mean`` = ||(I - P_r) mu_0||^2 /
    ||(I - P_r) mu||^2 (1: the first token is as offset there as the average token; >> 1: its massive
    output is what the mean term restores), and the share of the discarded mean energy its part mu_0 / T
    carries, ``share_first_token`` = first_over_mean / T^2."""
    _check_seq_len(seq_len)
    rows = []
    for p, d in decomps.items():
        mu = torch.stack([d.mean.double(), means[p][0].to(d.mean.device, torch.float64)], dim=1)  # [m, 2]: mu, mu_0
        total, first = d.discarded(mu, lowrank.rank_for(pct / 100, d.kappa)).square().sum(0).tolist()
        ratio = first / total if total > 0 else float("nan")
        rows.append({"layer": d.target.layer, "kind": d.target.kind, "lost_mean": total,
                     "first_over_mean": ratio, "share_first_token": ratio / seq_len**2})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- 5. protected low-rank massive layer


def massive_rows(model: nn.Module, layer: int, channels: Sequence[int]) -> dict[str, list[int]]:
    """{module path: output rows} that produce the intermediate ``channels`` of ``layer``: the rows of up
    and gate (HoC's massive weights), both halves of a fused gate_up, GPT-2's ``c_fc``."""
    paths = {id(m.weight): name for name, m in model.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)}
    out: dict[str, list[int]] = {}
    for block in arch.ffn_input_blocks(model, layer):
        out.setdefault(paths[id(block.weight)], []).extend(int(c) + block.offset for c in channels)
    return out


def massive_layer_perplexity(model: nn.Module, decomps: dict[str, lowrank.Decomposition],
                             moments: dict[str, tuple[lowrank.Moments, str]], inputs: lowrank.LayerInputs,
                             layer: int, rows: Sequence[int], method: str, pct: float, protect: bool,
                             kinds: Sequence[str] | None = None) -> dict:
    """Perplexity (from ``inputs``' cached layer inputs) with the modules of the massive ``layer`` (those of
    ``kinds``, default all) at rank pct% of kappa; with ``protect`` the rows that produce the intermediate
    channels ``rows`` (``massive_rows``: gate and up) stay exact and their pairs lose rank so that each
    module keeps the same parameter count (``lowrank.protected_rank``). Also the parameters of the replaced
    modules, counted from the modules."""
    kinds = (kinds,) if isinstance(kinds, str) else kinds
    ranks = {p: r for p, r in lowrank.uniform_ranks(decomps, pct, [layer]).items()
             if kinds is None or decomps[p].target.kind in kinds}
    if not ranks:
        raise ValueError(f"no decompositions of layer {layer}" + (f" of kinds {list(kinds)}" if kinds else "")
                         + ": decompose it first (module kinds: q, k, v, o, gate, up, down)")
    exact = massive_rows(model, layer, rows) if protect else {}
    replacements, used = {}, {}
    for p, r in ranks.items():
        d = decomps[p]
        if p in exact:
            used[p] = lowrank.protected_rank(d.m, d.n, len(exact[p]), r, d.pair_has_bias(method))
            replacements[p] = (lambda p=p, r=used[p]: lowrank.protected_factorised(
                model.get_submodule(p), *moments[p], exact[p], method, r))
        else:
            used[p] = r
            replacements[p] = (lambda p=p, r=r: lowrank.factorised(model, decomps[p], method, r))
    with lowrank.swapped(model, replacements):
        ppl = inputs.perplexity(layer)
        params = sum(q.numel() for p in ranks for q in model.get_submodule(p).parameters())
    return {"ppl": ppl, "params": params, "ranks": used}


# ------------------------------------------------------------------- 6. MacDrop under compression


def compression_losses(model: nn.Module, calibration: torch.Tensor, layer: int, examples: list[dict],
                       pad_id: int, pcts: Sequence[float], method: str = "feature", batch_size: int = 8) -> dict:
    """Held-out response loss of ``model`` dense (key ``"dense"``) and with its ``layer`` decomposed at each
    pct% of kappa (key pct; statistics of this model on ``calibration``: a fine-tuned model gets its own)."""
    decomps = lowrank.decompose_model(model, calibration, [layer], batch_size)
    out = {"dense": evaluation.response_loss(model, examples, pad_id, batch_size)}
    for pct in pcts:
        with lowrank.decomposed(model, decomps, method, lowrank.uniform_ranks(decomps, pct, [layer])):
            out[pct] = evaluation.response_loss(model, examples, pad_id, batch_size)
    return out


def robustness_frame(losses: dict[tuple[str, int], dict]) -> pd.DataFrame:
    """Rows (arm, seed), columns pct: the loss increase over the same model dense, loss(pct) - loss("dense")."""
    rows = {k: {pct: v[pct] - v["dense"] for pct in v if pct != "dense"} for k, v in losses.items()}
    frame = pd.DataFrame(rows).T
    frame.index = pd.MultiIndex.from_tuples(frame.index, names=["arm", "seed"])
    return frame

