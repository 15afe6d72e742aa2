"""Figures of notebook 06: massive activations vs attention sinks, attention under the massive-weight attack,
lazy layers vs searched ranks, the mean term's parts, protected low-rank, MacDrop under compression."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from common.core.style import PALETTE, display_name, log_axis, mark_layer, model_grid
from common.sfsd.figures import KIND_ORDER, METHOD_LABELS


def plot_massive_vs_sink(frames: dict[str, object], massive_layers: dict[str, int | None]) -> plt.Figure:
    """Per model and layer: the first token's largest |h| over the layer's median |h| (log, left axis) and
    the attention mass on position 0 (right axis); dashed: the massive layer."""
    fig, axes = model_grid(list(frames), width=3.6, height=2.8)
    for key, frame in frames.items():
        ax = axes[key]
        ax.plot(frame.index, frame.ratio, color=PALETTE[0], marker="o", ms=2.5, label="max |h₀| / median |h|")
        log_axis(ax, plain=False)
        ax.set_xlabel("layer (0-based)")
        mark_layer(ax, massive_layers.get(key))
        twin = ax.twinx()
        twin.plot(frame.index, frame.pos0_share, color=PALETTE[1], marker="s", ms=2.5, label="attention on position 0")
        twin.set_ylim(0, 1)
        twin.grid(False)
        if key == list(frames)[0]:
            ax.set_ylabel("first-token massive ratio", color=PALETTE[0])
        if key == list(frames)[-1]:
            twin.set_ylabel("attention mass on position 0", color=PALETTE[1])
    lines = ax.get_legend_handles_labels()[0][:1] + twin.get_legend_handles_labels()[0]
    lines.append(plt.Line2D([], [], color="grey", ls="--", lw=1, label="massive layer (notebook 01)"))
    fig.legend(lines, [h.get_label() for h in lines], fontsize="small", loc="lower center", ncol=3,
               bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def _condition_style(name: str, i: int) -> dict:
    if name == "base":
        return {"color": "k", "lw": 1.6, "label": "unattacked"}
    if name.startswith("zero_top"):
        return {"color": PALETTE[3], "lw": 1.6, "label": f"massive rows zeroed (top-{name.removeprefix('zero_top')})"}
    return {"color": PALETTE[0], "lw": 1.0, "ls": ":", "label": "random rows zeroed (one line a seed)" if i == 0 else None}


def plot_ablation_attention(profiles: dict[str, dict], massive_layers: dict[str, int | None]) -> plt.Figure:
    """Per model (columns): attention mass on position 0 (top) and MaxRank (bottom, log) per layer for the
    unattacked model, the massive rows zeroed and random rows zeroed (one thin line per seed)."""
    keys = list(profiles)
    fig, axes = plt.subplots(2, len(keys), figsize=(3.8 * len(keys), 5.0), squeeze=False, sharex="col",
                             layout="constrained")
    for j, key in enumerate(keys):
        randoms = 0
        for name, p in profiles[key].items():
            style = _condition_style(name, randoms)
            randoms += name.startswith("random")
            axes[0][j].plot(p.attention.per_layer("pos0_share").numpy(), **style)
            axes[1][j].plot(p.attention.max_rank().numpy(), **style)
        for ax in axes[:, j]:
            mark_layer(ax, massive_layers.get(key))
        axes[0][j].set_title(display_name(key))
        axes[0][j].set_ylim(0, 1)
        log_axis(axes[1][j])
        axes[1][j].set_xlabel("layer (0-based)")
    axes[0][0].set_ylabel("attention mass on position 0")
    axes[1][0].set_ylabel("MaxRank (k*, max over heads)")
    axes[0][-1].legend(fontsize="x-small")
    return fig


def plot_lazy_vs_rank(frame, corr: dict[str, dict], title: str) -> plt.Figure:
    """Left: per searched layer, AvgMass and MaxRank (log) with the rank / kappa the perplexity search kept.
    Right: rank / kappa against AvgMass, coloured by depth, with Spearman's rho (raw and depth-detrended)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.0, 3.2), layout="constrained")
    left.plot(frame.index, frame.avgmass, color=PALETTE[0], marker="o", ms=2.5, label="AvgMass (m*)")
    left.plot(frame.index, frame.maxrank, color=PALETTE[2], marker="^", ms=2.5, label="MaxRank (k*)")
    log_axis(left)
    left.set_xlabel("layer (0-based)")
    left.set_ylabel("attention rank / mass")
    twin = left.twinx()
    twin.plot(frame.index, frame.rank_fraction, color=PALETTE[1], marker="s", ms=2.5, label="search rank / κ")
    twin.set_ylim(0, 1.05)
    twin.set_ylabel("rank / κ kept by the search", color=PALETTE[1])
    twin.grid(False)
    lines = left.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    left.legend(lines, [h.get_label() for h in lines], fontsize="x-small")
    left.set_title(title, fontsize="small")
    points = right.scatter(frame.avgmass, frame.rank_fraction, c=frame.index, cmap="viridis", s=18)
    fig.colorbar(points, ax=right, label="layer")
    log_axis(right, "x")
    right.set_xlabel("AvgMass (mean over heads of m*)")
    right.set_ylabel("rank / κ kept by the search")
    raw, flat = corr["avgmass"], corr["avgmass_detrended"]

    def fmt(c: dict) -> str:
        ci = c["ci95"]
        return f"{c['rho']:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")

    right.set_title(f"Spearman ρ {fmt(raw)}; depth removed {fmt(flat)}", fontsize="x-small")
    return fig


MEAN_PART_LABELS = {"dense": "dense", "all": "μ (notebook 05)", "first_token": "first token's part μ₀/T",
                    "other_tokens": "other tokens' part", "none": "no mean term"}


def plot_mean_parts(share, ppl: dict[str, float], massive_layer: int | None) -> plt.Figure:
    """Left: per layer and module kind, the first token's mean output over the calibration mean in the
    discarded directions (squared norms, log; 1 = as offset as the average token). Right: perplexity with
    the compensation built from each part of the mean (log)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.4, 3.2), layout="constrained", width_ratios=(1.6, 1))
    kinds = [k for k in KIND_ORDER if k in set(share.kind)] or sorted(set(share.kind))
    for i, kind in enumerate(kinds):
        f = share[share.kind == kind].sort_values("layer")
        left.plot(f.layer, f.first_over_mean, marker="o", ms=2.5, color=PALETTE[i], label=kind)
    mark_layer(left, massive_layer)
    left.axhline(1.0, color="k", lw=0.8, ls=":")
    log_axis(left)
    left.set_xlabel("layer (0-based)")
    left.set_ylabel("‖(I−P)μ₀‖² / ‖(I−P)μ‖²")
    left.legend(fontsize="x-small", ncol=4)
    names = list(ppl)
    right.barh(range(len(names)), [ppl[n] for n in names], color=[PALETTE[i % len(PALETTE)] for i in range(len(names))])
    right.set_yticks(range(len(names)), [MEAN_PART_LABELS.get(n, n) for n in names], fontsize="x-small")
    right.invert_yaxis()
    log_axis(right, "x", plain=False)
    right.set_xlabel("held-out perplexity (log)")
    return fig


SCOPE_TITLES = {"all": "every module of the layer", "gate_up": "gate and up only"}


def plot_protected(frame, dense: float, title: str) -> plt.Figure:
    """Perplexity (relative to dense, log) against the massive layer's budget, one panel per scope of
    decomposed modules, per method, with and without the massive gate/up rows kept exact."""
    frame = frame if "scope" in frame else frame.assign(scope="all")
    scopes = list(dict.fromkeys(frame.scope))
    fig, axes = plt.subplots(1, len(scopes), figsize=(4.6 * len(scopes), 3.2), squeeze=False, sharey=True,
                             layout="constrained")
    for ax, scope in zip(axes[0], scopes, strict=True):
        f_scope = frame[frame.scope == scope]
        for i, method in enumerate(m for m in METHOD_LABELS if m in set(f_scope.method)):
            for guarded, ls in ((False, "-"), (True, "--")):
                f = f_scope[(f_scope.method == method) & (f_scope.protected == guarded)].sort_values("pct")
                ax.plot(f.pct, f.ppl / dense, ls=ls, marker="o", ms=3, color=PALETTE[i],
                        label=f"{METHOD_LABELS[method]}" + (", massive rows exact" if guarded else ""))
        ax.axhline(1.0, color="k", lw=0.8, ls=":")
        log_axis(ax)
        ax.invert_xaxis()
        ax.set_xlabel("rank (% of κ)")
        ax.set_title(f"{title}: {SCOPE_TITLES.get(scope, scope)}", fontsize="small")
    axes[0][0].set_ylabel("perplexity / dense")
    axes[0][-1].legend(fontsize="x-small")
    return fig


def plot_macdrop_compression(increase, plain: str, treated: str, layer: int) -> plt.Figure:
    """Held-out loss increase when the massive layer is low-rank, per budget: the pre-trained model and each
    seed of the two fine-tuning arms (dots), arm means (bars)."""
    arms = [a for a in ("pretrained", plain, treated) if a in increase.index.get_level_values("arm")]
    pcts = list(increase.columns)
    fig, ax = plt.subplots(figsize=(5.2, 3.2), layout="constrained")
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        f = increase.loc[arm]
        x = np.arange(len(pcts)) + (i - (len(arms) - 1) / 2) * width
        ax.bar(x, f.mean().to_numpy(), width=width * 0.9, color=PALETTE[i], alpha=0.6, label=arm.replace("_", " + "))
        for _, row in f.iterrows():
            ax.plot(x, row.to_numpy(), "o", color=PALETTE[i], ms=3)
    ax.set_xticks(range(len(pcts)), [f"{p}% of κ" for p in pcts])
    ax.set_ylabel("held-out loss increase (nats)")
    ax.set_title(f"layer {layer} (massive) decomposed, feature space", fontsize="small")
    ax.legend(fontsize="x-small")
    return fig
