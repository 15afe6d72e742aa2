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
   kept exact (``protected.protected_factorised``), at the same parameter budget.
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

from common.core import arch, capture, evaluation, intervals, layer_inputs
from common.core.hooks import hooked
from common.core.manifest import record
from common.hoc import ablation, scoring
from common.hoc.ablation import Attack
from common.inheritune import attention
from common.sfsd import budgets, decomposition, lowrank
from common.synthesis import protected


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


def record_sink(key: str, profile: SinkProfile, massive_layer: int | None) -> dict:
    """Notebook 06 §1 for one model: ``sink_summary`` of its profile, recorded under ``<key>/synthesis/sink/``
    (the per-layer ratio and mass on position 0, where the sink starts, the rank correlation); returns it."""
    s = sink_summary(profile, massive_layer)
    f = profile.frame()
    base = f"{key}/synthesis/sink"
    record(f"{base}/massive_layer", massive_layer, note="notebook 01's criterion; 0-based")
    record(f"{base}/first_sink_layer", s["first_sink_layer"],
           note=f"first layer whose heads put >= {attention.SINK_SHARE} of their mass on position 0")
    record(f"{base}/sink_minus_massive_layer", s["sink_minus_massive_layer"],
           note=None if massive_layer is not None else "no massive layer: nothing to compare with")
    record(f"{base}/pos0_ratio", f.ratio.tolist(), note="per layer: max_d |h_0,d| / median |h| (mean over windows)")
    record(f"{base}/pos0_share", f.pos0_share.tolist(), note="per layer: attention mass on position 0, mean over heads and windows")
    record(f"{base}/pos0_share_before_massive", s["pos0_share_before_massive"], note="largest, over the layers before the massive one")
    record(f"{base}/pos0_share_after_massive", s["pos0_share_after_massive"], note="mean over the layers after the massive one")
    record(f"{base}/rho_ratio_share", s["correlation"]["rho"], ci95=s["correlation"]["ci95"],
           note=f"Spearman over {s['correlation']['n']} layers l of log ratio of h_(l-1) (the input) vs mass on "
                "position 0 in layer l; bootstrap over layers")
    return s


def sink_table(sinks: dict[str, dict], massive_at: dict[str, int | None]) -> pd.DataFrame:
    """One row per model of ``record_sink``'s summaries."""
    return pd.DataFrame({k: {"massive layer": massive_at[k], "first sink layer": s["first_sink_layer"],
                             "sink - massive": s["sink_minus_massive_layer"], "max share before": s["pos0_share_before_massive"],
                             "mean share after": s["pos0_share_after_massive"], "rho(log ratio, share)": s["correlation"]["rho"],
                             "rho 95% CI": s["correlation"]["ci95"]} for k, s in sinks.items()}).T


def massive_attacks(model: nn.Module, layer: int, ranked: list[int], k: int, seeds: Sequence[int]) -> list[Attack]:
    """Notebook 02's attack on the massive ``layer`` (zero its top-k up/gate rows) and its control, k random rows
    of the same layer (one per seed, never a massive one)."""
    width = arch.intermediate_size(model, layer)
    return [ablation.zero_top(layer, ranked, k)] + [ablation.random_k(layer, k, s, width, ranked) for s in seeds]


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
    windows; ``pos0_share_windows`` the per-window values behind it), the share of (window, layer, head)
    triples whose sink is not position 0 (moved sinks), the lazy layers (MaxRank < 2) and sink layers (mass on
    position 0 >= ``threshold``) among them, and the first token's massive ratio there."""
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
                      "pos0_share_windows": share,
                      "maxcol_share": col.mean(), "maxcol_share_ci95": evaluation.bootstrap_ci(col),
                      "moved_sinks": float((m["sink"][:, after] != 0).double().mean()),
                      "lazy_layers": int((rank < attention.LAZY_LAYER).sum()),
                      "sink_layers": int((p.attention.per_layer("pos0_share")[after] >= threshold).sum()),
                      "ratio_after": float(p.ratio[after].mean()), "layers": int(len(rank))}
    return pd.DataFrame(rows).T


def record_ablation(key: str, frame: pd.DataFrame | None, k: int, seeds: Sequence[int]) -> None:
    """Notebook 06 §2 keys from ``ablation_frame`` (rows base, zero_top<k>, random controls): every row's readings
    and the changes of the mass on position 0 (the random controls' mean over seeds) with their 95% intervals,
    paired over windows; ``frame=None`` (no massive layer): those two as null."""
    base = f"{key}/synthesis/ablation"
    if frame is None:
        for q in ("zero_minus_base_pos0_share", "random_minus_base_pos0_share"):
            record(f"{base}/{q}", None, note="no massive layer (notebook 01's criterion): nothing to ablate")
        return
    zero = f"zero_top{k}"
    rand = [c for c in frame.index if c not in ("base", zero)]
    for cond, row in frame.iterrows():
        for q in ("pos0_share", "maxcol_share"):
            record(f"{base}/{cond}/{q}", row[q], ci95=row[f"{q}_ci95"],
                   note=f"mean over the {row['layers']} layers after the massive one, heads, windows")
        for q in ("moved_sinks", "lazy_layers", "sink_layers", "ratio_after"):
            record(f"{base}/{cond}/{q}", row[q])
    windows = frame.pos0_share_windows
    zeroed = intervals.paired_difference(windows[zero], windows["base"])
    record(f"{base}/zero_minus_base_pos0_share", frame.pos0_share[zero] - frame.pos0_share["base"], ci95=zeroed["ci95"],
           note=f"95% paired bootstrap over {zeroed['n']} windows (sequences)")
    randoms = intervals.paired_difference(np.mean([windows[c] for c in rand], axis=0), windows["base"])
    record(f"{base}/random_minus_base_pos0_share", frame.pos0_share[rand].mean() - frame.pos0_share["base"],
           ci95=randoms["ci95"], note=f"mean over seeds {list(seeds)}; 95% paired bootstrap over {randoms['n']} windows "
                                      "(sequences), each window's change averaged over the seeds")


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


def record_lazy(key: str, lazy: pd.DataFrame, corr: dict[str, dict], layers: Sequence[int]) -> None:
    """Notebook 06 §3 keys from ``lazy_vs_compressible``: each rank correlation and the per-layer rank fraction."""
    for metric, c in corr.items():
        record(f"{key}/synthesis/lazy/rho_{metric}_vs_rank", c["rho"], ci95=c["ci95"],
               note=f"Spearman over {c['n']} searched layers; bootstrap over layers"
                    + ("; depth trend removed" if "detrended" in metric else ""))
    record(f"{key}/synthesis/lazy/rank_fraction", lazy.rank_fraction.tolist(), note=f"layers {layers[0]}-{layers[-1]}, notebook 05's search")


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

    dev = next(model.parameters()).device
    with hooked((model.get_submodule(p), "output", hook(p)) for p in paths):
        for ids in calibration.split(batch_size):
            arch.backbone(model)(input_ids=ids.to(dev), use_cache=False)
    n, t = calibration.shape
    return {p: (s0.cpu() / n, s1.cpu() / (n * (t - 1))) for p, (s0, s1) in sums.items()}


MEAN_PARTS = ("all", "first_token", "other_tokens", "none")


def _check_seq_len(seq_len: int) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be the calibration window length T >= 1")


def mean_parts(decomps: dict[str, decomposition.Decomposition], means: dict[str, tuple[torch.Tensor, torch.Tensor]],
               seq_len: int, part: str) -> dict[str, decomposition.Decomposition]:
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


def mean_consistency(decomps: dict[str, decomposition.Decomposition],
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


def lost_mean_share(decomps: dict[str, decomposition.Decomposition], means: dict[str, tuple[torch.Tensor, torch.Tensor]],
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
        total, first = d.discarded(mu, budgets.rank_for(pct / 100, d.kappa)).square().sum(0).tolist()
        ratio = first / total if total > 0 else float("nan")
        rows.append({"layer": d.target.layer, "kind": d.target.kind, "lost_mean": total,
                     "first_over_mean": ratio, "share_first_token": ratio / seq_len**2})
    return pd.DataFrame(rows)


def mean_part_perplexities(model: nn.Module, decomps: dict[str, decomposition.Decomposition],
                           means: dict[str, tuple[torch.Tensor, torch.Tensor]], seq_len: int,
                           inputs: layer_inputs.LayerInputs, start: int,
                           ranks: dict[str, int]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Perplexity (from ``inputs``' cached inputs of layer ``start``) dense and, at ``ranks``, with the mean
    term built from each part of ``MEAN_PARTS`` (``mean_parts``); and, from the same passes, each one's
    per-window mean NLLs (``LayerInputs.perplexity_and_windows``)."""
    ppl, nll = {}, {}
    ppl["dense"], nll["dense"] = inputs.perplexity_and_windows(start)
    for part in MEAN_PARTS:
        with lowrank.decomposed(model, mean_parts(decomps, means, seq_len, part), "feature", ranks):
            ppl[part], nll[part] = inputs.perplexity_and_windows(start)
    return ppl, nll


def record_mean_term(key: str, gap: float, share: pd.DataFrame, mean_ppl: dict[str, float],
                     mean_nll: dict[str, np.ndarray], nb05_ppl: float, pct: float, layers: Sequence[int]) -> None:
    """Notebook 06 §4 keys: the parts' consistency ``gap``, perplexity with each part of the mean term, the
    first token's share of the discarded mean (``lost_mean_share``), each part's perplexity over the whole
    term's with its 95% interval paired over windows (``mean_nll``: ``mean_part_perplexities``' per-window
    NLLs), and the check against notebook 05's feature perplexity at the same budget (``nb05_ppl``)."""
    base = f"{key}/synthesis/meanterm"
    record(f"{base}/parts_gap", gap, note="max relative |mu_0/T + (T-1) mu_rest/T - mu|: the parts add up to notebook 05's mean")
    for part, ppl in mean_ppl.items():
        record(f"{base}/{part}/ppl", ppl, note=f"uniform {pct}% of kappa, layers {layers[0]}-{layers[-1]}; "
                                                "compensation from this part of mu")
    for kind, f in share.groupby("kind"):
        record(f"{base}/{kind}/first_over_mean", f.sort_values("layer").first_over_mean.tolist(),
               note="per decomposed layer: ||(I-P_r) mu_0||^2 / ||(I-P_r) mu||^2 (1: the first token is a typical "
                    "token there)")
    record(f"{base}/first_over_mean_median", share.first_over_mean.median(), note="over all decomposed modules")
    record(f"{base}/first_over_mean_max", share.first_over_mean.max(), note="over all decomposed modules")
    record(f"{base}/share_first_token_max", share.share_first_token.max(),
           note="largest share of a module's discarded mean energy carried by the first token's part mu_0/T")
    for part, what in (("first_token", "the first token's part of the mean term"), ("other_tokens", "the other tokens' part")):
        ratio = intervals.perplexity_ratio(mean_nll[part], mean_nll["all"])
        record(f"{base}/{part}_over_all_ppl", mean_ppl[part] / mean_ppl["all"], ci95=ratio["ci95"],
               note=f"perplexity with only {what} / with all of it; 95% paired bootstrap over {ratio['n']} windows")
    record(f"{base}/check_all_vs_nb05", mean_ppl["all"] / nb05_ppl,
           note="ratio to notebook 05's feature ppl at the same budget (1 = same computation)")


def massive_rows(model: nn.Module, layer: int, channels: Sequence[int]) -> dict[str, list[int]]:
    """{module path: output rows} that produce the intermediate ``channels`` of ``layer``: the rows of up
    and gate (HoC's massive weights), both halves of a fused gate_up, GPT-2's ``c_fc``."""
    paths = {id(m.weight): name for name, m in model.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)}
    out: dict[str, list[int]] = {}
    for block in arch.ffn_input_blocks(model, layer):
        out.setdefault(paths[id(block.weight)], []).extend(int(c) + block.offset for c in channels)
    return out


def massive_layer_perplexity(model: nn.Module, decomps: dict[str, decomposition.Decomposition],
                             moments: dict[str, tuple[decomposition.Moments, str]], inputs: layer_inputs.LayerInputs,
                             layer: int, rows: Sequence[int], method: str, pct: float, protect: bool,
                             kinds: Sequence[str] | None = None) -> dict:
    """Perplexity (from ``inputs``' cached layer inputs) with the modules of the massive ``layer`` (those of
    ``kinds``, default all) at rank pct% of kappa; with ``protect`` the rows that produce the intermediate
    channels ``rows`` (``massive_rows``: gate and up) stay exact and their pairs lose rank so that each
    module keeps the same parameter count (``protected.protected_rank``). Also the per-window mean NLLs behind
    the perplexity and the parameters of the replaced modules, counted from the modules."""
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
            used[p] = protected.protected_rank(d.m, d.n, len(exact[p]), r, d.pair_has_bias(method))
            replacements[p] = (lambda p=p, r=used[p]: protected.protected_factorised(
                model.get_submodule(p), *moments[p], exact[p], method, r))
        else:
            used[p] = r
            replacements[p] = (lambda p=p, r=r: lowrank.factorised(model, decomps[p], method, r))
    with lowrank.swapped(model, replacements):
        ppl, window_nll = inputs.perplexity_and_windows(layer)
        params = sum(q.numel() for p in ranks for q in model.get_submodule(p).parameters())
    return {"ppl": ppl, "window_nll": window_nll, "params": params, "ranks": used}


#: §5's scopes: every module of the massive layer, or only the two that hold its massive rows.
PROTECT_SCOPES = {"all": None, "gate_up": ("gate", "up")}


def protected_table(model: nn.Module, decomps: dict[str, decomposition.Decomposition],
                    moments: dict[str, tuple[decomposition.Moments, str]], inputs: layer_inputs.LayerInputs,
                    layer: int, rows: Sequence[int], pcts: Sequence[float],
                    scopes: dict[str, Sequence[str] | None] = PROTECT_SCOPES) -> pd.DataFrame:
    """``massive_layer_perplexity`` for every scope, method (weight_svd, feature), pct and with / without the
    massive rows kept exact: one row each (scope, method, pct, protected, ppl, window_nll, params)."""
    out = []
    for scope, kinds in scopes.items():
        for method in ("weight_svd", "feature"):
            for pct in pcts:
                for guarded in (False, True):
                    r = massive_layer_perplexity(model, decomps, moments, inputs, layer, rows, method, pct, guarded, kinds)
                    out.append({"scope": scope, "method": method, "pct": pct, "protected": guarded, "ppl": r["ppl"],
                                "window_nll": r["window_nll"], "params": r["params"]})
    return pd.DataFrame(out)


def record_protected(key: str, table: pd.DataFrame, dense_ppl: float, layer: int, k: int) -> None:
    """Notebook 06 §5 keys from ``protected_table``: per scope, method and pct the perplexity plain and with the
    top-``k`` rows exact, their ratio (95% interval paired over windows) and the parameter ratio; the dense
    perplexity first."""
    record(f"{key}/synthesis/protected/dense_ppl", dense_ppl)
    for (scope, method, pct), f in table.groupby(["scope", "method", "pct"]):
        plain, guarded = f[~f.protected].iloc[0], f[f.protected].iloc[0]
        base = f"{key}/synthesis/protected/{scope}/{method}/{pct}"
        record(f"{base}/ppl", plain.ppl, note=f"layer {layer}, {scope} modules at {pct}% of kappa")
        record(f"{base}/ppl_protected", guarded.ppl, note=f"the same, top-{k} gate/up rows exact")
        ratio = intervals.perplexity_ratio(guarded.window_nll, plain.window_nll)
        record(f"{base}/protected_over_plain", guarded.ppl / plain.ppl, ci95=ratio["ci95"],
               note=f"95% paired bootstrap over {ratio['n']} windows")
        record(f"{base}/param_ratio", guarded.params / plain.params, note="parameters of the replaced modules, protected / plain (<= 1)")


def compression_losses(model: nn.Module, calibration: torch.Tensor, layer: int, examples: list[dict],
                       pad_id: int, pcts: Sequence[float], method: str = "feature", batch_size: int = 8) -> dict:
    """Held-out response loss of ``model`` dense (key ``"dense"``) and with its ``layer`` decomposed at each
    pct% of kappa (key pct; statistics of this model on ``calibration``: a fine-tuned model gets its own)."""
    decomps = decomposition.decompose_model(model, calibration, [layer], batch_size)
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


def record_macdrop(key: str, increase: pd.DataFrame, arms: Sequence[str], pcts: Sequence[float],
                   seeds: Sequence[int], layer: int) -> None:
    """Notebook 06 §6 keys from ``robustness_frame``: each arm's mean loss increase per pct, MacDrop minus LoRA
    paired by seed (t-interval; ``arms`` = (plain, treated)) and the pre-trained model's increase."""
    plain, treated = arms
    for pct in pcts:
        for arm in arms:
            record(f"{key}/synthesis/macdrop/{arm}/{pct}/loss_increase", increase.loc[arm][pct].mean(),
                   note=f"held-out loss, layer {layer} at {pct}% of kappa minus dense; mean over seeds {list(seeds)}")
        eff = scoring.paired_difference(increase.loc[treated][pct], increase.loc[plain][pct])
        record(f"{key}/synthesis/macdrop/{pct}/macdrop_minus_lora", eff["mean"], ci95=eff["ci95"],
               note=f"loss increase, {treated} - {plain}, paired by seed (n = {eff['n']}); < 0: MacDrop more robust")
        record(f"{key}/synthesis/macdrop/{pct}/macdrop_minus_lora_ci_high", eff["ci95"][1] if eff["ci95"] else None,
               note="upper end of that interval: < 0 only if MacDrop is more robust beyond the seed noise")
    record(f"{key}/synthesis/macdrop/pretrained/loss_increase", [increase.loc["pretrained"][p].iloc[0] for p in pcts],
           note=f"pct {list(pcts)}")
