"""Figures of notebook 04 (Inheritune): MaxRank / AvgMass per layer (Fig. 1, 14), the per-head rank heatmap
(Fig. 11), attention maps (Fig. 9), the τ sweep (Fig. 10), sinks vs the massive layer, validation curves
(Fig. 3) and the rank of the reference vs the inherited model (Fig. 8)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from common.core.style import MODEL_COLORS, PALETTE, band, display_name, log_axis


def plot_layer_metric(stats: dict, metric: str, heads: str, ylabel: str, paper: dict[str, list] | None = None,
                      log: bool = False) -> plt.Figure:
    """One panel per model: the per-layer aggregate over heads (``heads`` = "max" / "mean") of a per-head
    metric, with a band of +-1 std over sequences; a last panel with the paper's curves (Inheritune Fig. 1
    / Fig. 14, read off the authors' images) when ``paper`` is given."""
    keys = list(stats)
    n = len(keys) + (1 if paper else 0)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 2.7), squeeze=False, layout="constrained")
    for ax, key in zip(axes[0], keys, strict=False):
        s = stats[key]
        band(ax, s.per_layer(metric, heads).numpy(), s.spread(metric, heads).numpy(), MODEL_COLORS.get(key, "C0"), key)
        ax.set_title(display_name(key), fontsize="small")
        ax.set_xlabel("layer (0-based)")
    if paper:
        ax = axes[0][-1]
        for j, (label, values) in enumerate(paper.items()):
            y = np.array([np.nan if v is None else v for v in values], dtype=float)
            ax.plot(np.arange(len(y)), y, marker="o", ms=2.5, color=PALETTE[(j + 5) % len(PALETTE)], label=label)
        ax.set_title("paper (self-trained GPT-2, read off)", fontsize="small")
        ax.set_xlabel("layer (0-based)")
        ax.legend(fontsize="x-small")
    for ax in axes[0]:
        if log:
            log_axis(ax)
    axes[0][0].set_ylabel(ylabel)
    return fig


def plot_rank_heatmap(stats: dict, threshold: float) -> plt.Figure:
    """Inheritune Fig. 11 / 21-22: mean rank k* per head (rows) and layer (columns), log colour scale; heads
    with Rank(h, l) < ``threshold`` (collapsed, decision D12) are dotted."""
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import MaxNLocator

    keys = list(stats)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 2.9), squeeze=False, layout="constrained")
    for ax, key in zip(axes[0], keys, strict=True):
        rank = stats[key].per_head("rank").numpy().T  # [H, L]
        im = ax.imshow(rank, aspect="auto", cmap="magma", norm=LogNorm(vmin=1, vmax=max(2.0, rank.max())),
                       origin="lower", interpolation="nearest")
        hh, ll = np.nonzero(rank < threshold)
        ax.scatter(ll, hh, s=4, color="cyan", marker="o")
        ax.grid(False)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{display_name(key)}: {int((rank < threshold).sum())} of {rank.size} heads < {threshold}",
                     fontsize="small")
        ax.set_xlabel("layer (0-based)")
        ax.set_ylabel("head")
        fig.colorbar(im, ax=ax, label="mean k*")
    return fig


def plot_attention_maps(maps: dict[int, np.ndarray], heads: int, title: str) -> plt.Figure:
    """Inheritune Fig. 9 / 12: causal attention maps of the first ``heads`` heads (fewer if the model has fewer)
    of each given layer (rows), on a log colour scale (the paper drew full, non-causal maps: decision D3)."""
    from matplotlib.colors import LogNorm

    layers = list(maps)
    heads = min(heads, *(len(m) for m in maps.values()))
    fig, axes = plt.subplots(len(layers), heads, figsize=(1.9 * heads, 2.0 * len(layers)), squeeze=False,
                             layout="constrained")
    for row, layer in zip(axes, layers, strict=True):
        for h, ax in enumerate(row):
            a = np.asarray(maps[layer][h], dtype=float)
            ax.imshow(np.where(a > 0, a, np.nan), cmap="viridis", norm=LogNorm(vmin=1e-4, vmax=1))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            ax.set_title(f"L{layer} H{h}", fontsize="x-small")
    fig.suptitle(title, fontsize="small")
    return fig


def plot_tau_sweep(stats, taus: tuple[float, ...], title: str) -> plt.Figure:
    """Inheritune Fig. 10: MaxRank(l) at several energy levels tau, from one capture (stored spectra)."""
    fig, ax = plt.subplots(figsize=(4.6, 2.8), layout="constrained")
    for j, tau in enumerate(taus):
        ax.plot(stats.rank_at(tau).numpy(), marker="o", ms=2.5, color=PALETTE[j], label=f"tau = {tau}")
    log_axis(ax)
    ax.set_xlabel("layer (0-based)")
    ax.set_ylabel("MaxRank")
    ax.set_title(title, fontsize="small")
    ax.legend(fontsize="x-small")
    return fig


def plot_sink_vs_massive(stats: dict, massive_layers: dict[str, int | None]) -> plt.Figure:
    """Per layer, the share of attention mass on position 0 (the first-token sink, mean over heads and
    sequences), with each model's massive layer (notebook 01's criterion) marked."""
    fig, ax = plt.subplots(figsize=(5.2, 2.9), layout="constrained")
    for key, s in stats.items():
        color = MODEL_COLORS.get(key, "C0")
        ax.plot(s.per_layer("pos0_share").numpy(), marker="o", ms=2.5, color=color, label=display_name(key))
        if massive_layers.get(key) is not None:
            ax.axvline(massive_layers[key], color=color, ls=":", lw=1.2)
    ax.set_xlabel("layer (0-based); dotted: massive layer")
    ax.set_ylabel("attention mass on position 0")
    ax.set_ylim(0, 1)
    ax.legend(fontsize="x-small")
    return fig


VARIANT_STYLE = {"reference": ("black", "-"), "inherit_first": (PALETTE[0], "-"), "inherit_last": (PALETTE[1], "-"),
                 "inherit_middle": (PALETTE[2], "-"), "random": (PALETTE[3], "--"), "random_2x": (PALETTE[3], ":")}


def plot_val_curves(runs: dict, rounds: list | None = None) -> plt.Figure:
    """Inheritune Fig. 3 / Fig. 20: validation loss against optimizer step for the reference and every
    variant (same fixed windows), the growth rounds in grey; right panel: the last 60% of training."""
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.2), layout="constrained")
    for ax in axes:
        for name, run in runs.items():
            color, ls = VARIANT_STYLE.get(name, ("grey", "-"))
            steps, loss = zip(*run.curve, strict=True)
            ax.plot(steps, loss, color=color, ls=ls, lw=1.3, label=f"{name} ({run.n_layer}L)")
        for run in rounds or []:
            steps, loss = zip(*run.curve, strict=True)
            ax.plot(steps, loss, color="grey", lw=0.9, alpha=0.8, label=f"round {run.n_layer}L")
        ax.set_xlabel("optimizer step")
    axes[0].set_ylabel("validation loss (nats/token)")
    s = max(r.steps for r in runs.values())
    axes[1].set_xlim(0.4 * runs["reference"].steps, s * 1.02)
    tail = [loss for r in runs.values() for step, loss in r.curve if step >= 0.4 * runs["reference"].steps]
    axes[1].set_ylim(min(tail) - 0.02, max(tail) + 0.02)
    axes[1].set_title("zoom: the last 60% of the reference's steps", fontsize="small")
    axes[0].legend(fontsize="x-small")
    return fig


def plot_rank_compare(curves: dict[str, tuple]) -> plt.Figure:
    """Inheritune Fig. 8 / 13: MaxRank per layer of the reference against the Inheritune model (log scale),
    each with its band; ``curves`` maps a label to (MaxRank, spread)."""
    fig, ax = plt.subplots(figsize=(4.8, 2.9), layout="constrained")
    for j, (label, (y, spread)) in enumerate(curves.items()):
        band(ax, np.asarray(y), np.asarray(spread), PALETTE[j], label)
    ax.axhline(2.0, color="grey", lw=0.8, ls=":")
    log_axis(ax)
    ax.set_xlabel("layer (0-based); dotted: lazy threshold 2")
    ax.set_ylabel("MaxRank")
    ax.legend(fontsize="x-small")
    return fig
