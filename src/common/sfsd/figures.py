"""Figures of notebook 05 (SFSD): spectra energy, uniform budgets (Table A), mean compensation, the perplexity
search (Table C), the rank map (F5) and the task search (Table B)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

from common.core.style import PALETTE, display_name

KIND_ORDER = ("q", "k", "v", "o", "gate", "up", "down")


def plot_spectra(frames: dict[str, object], share: float) -> plt.Figure:
    """SFSD's thesis: per module kind, the energy held by the top ``share`` of the rank, output features vs
    weights, across depth (one panel per model)."""
    fig, axes = plt.subplots(1, len(frames), figsize=(4.2 * len(frames), 3.0), squeeze=False, layout="constrained")
    for ax, (key, frame) in zip(axes[0], frames.items(), strict=True):
        kinds = [k for k in KIND_ORDER if k in set(frame.kind)] or sorted(set(frame.kind))
        for i, kind in enumerate(kinds):
            f = frame[frame.kind == kind].sort_values("layer")
            ax.plot(f.layer, f.feature, color=PALETTE[i], marker="o", ms=2, label=kind)
            ax.plot(f.layer, f.weight, color=PALETTE[i], ls="--", lw=1)
        ax.set_title(f"{display_name(key)}: solid = output features, dashed = weights", fontsize="small")
        ax.set_xlabel("layer (0-based)")
        ax.set_ylabel(f"energy in top {share:.0%} of rank")
        ax.set_ylim(0, 1.02)
    axes[0][-1].legend(fontsize="x-small", ncol=2, title="module")
    return fig


METHOD_LABELS = {"weight_svd": "weight SVD", "feature": "feature space (mean comp.)",
                 "feature_nomean": "feature space, no mean comp.", "feature_uncentred": "feature space, uncentred (= whitened SVD)"}


def plot_uniform(frames: dict[str, object], paper: dict) -> plt.Figure:
    """SFSD Table A: perplexity (log) and zero-shot accuracy (at the budgets that have it) vs whole-model parameter
    share per method, one column per model; the paper's LLaMA-7B averages in the accuracy panels' legend."""
    fig, axes = plt.subplots(2, len(frames), figsize=(4.0 * len(frames), 5.4), squeeze=False, layout="constrained")
    for j, (key, frame) in enumerate(frames.items()):
        dense = frame[frame.method == "dense"].iloc[0]
        for i, method in enumerate(m for m in METHOD_LABELS if m in set(frame.method)):
            f = frame[frame.method == method].sort_values("share")
            axes[0][j].plot(100 * f.share, f.ppl, marker="o", ms=3, color=PALETTE[i], label=METHOD_LABELS[method])
            scored = f[f.acc.notna()] if "acc" in f else f.iloc[:0]  # the budgets with zero-shot accuracy
            if len(scored):
                err = np.abs(np.array(scored.ci95.tolist()).T - scored.acc.to_numpy())
                axes[1][j].errorbar(100 * scored.share, scored.acc, yerr=err, marker="o", ms=3, color=PALETTE[i],
                                    capsize=2)
        axes[0][j].axhline(dense.ppl, color="k", lw=0.8, ls=":", label="dense")
        axes[0][j].set_yscale("log")  # 17 to 10^8: powers of ten
        axes[0][j].set_title(display_name(key), fontsize="small")
        axes[0][j].set_ylabel("held-out perplexity")
        if "acc" in frame:
            axes[1][j].axhline(dense.acc, color="k", lw=0.8, ls=":")
            axes[1][j].axhline(dense.chance, color="grey", lw=0.8, ls="--", label="chance")
        axes[1][j].set_ylabel("zero-shot accuracy")
        axes[1][j].set_xlabel("whole-model parameters (%)")
    axes[0][0].legend(fontsize="x-small")
    axes[1][0].set_title(f"paper (LLaMA-7B, 80%): feature {paper[('feature', 80)]}, SVD {paper[('weight_svd', 80)]}, "
                         f"dense {paper['dense']}", fontsize="x-small")
    return fig


def plot_mean_diagnosis(frame, massive_layer: int | None) -> plt.Figure:
    """Per layer and module kind: the discarded output mean ||(I - P_r) mu||^2 over the discarded variance
    (log scale); above 1 the mean term, not the variance, is what dropping mean compensation loses."""
    kinds = [k for k in KIND_ORDER if k in set(frame.kind)]
    fig, ax = plt.subplots(figsize=(6.4, 3.0), layout="constrained")
    for i, kind in enumerate(kinds):
        f = frame[frame.kind == kind].sort_values("layer")
        ax.plot(f.layer, f.ratio, marker="o", ms=2.5, color=PALETTE[i], label=kind)
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    if massive_layer is not None:
        ax.axvline(massive_layer, color="grey", ls="--", lw=1, label=f"massive layer {massive_layer}")
    ax.set_yscale("log")
    ax.set_xlabel("layer (0-based)")
    ax.set_ylabel("discarded mean² / discarded variance")
    ax.legend(fontsize="x-small", ncol=4)
    return fig


def plot_search(frame, base: float, test: list[tuple[float, float]] | None = None, test_dense: float | None = None) -> plt.Figure:
    """SFSD Table C / Fig. F2: search-split perplexity after each visited module, relative to the dense
    model's, against its bound t^m, over the whole-model parameter share; test-split points (relative to
    the dense test perplexity) when given."""
    fig, ax = plt.subplots(figsize=(5.2, 3.2), layout="constrained")
    ppl, last = [], base
    for row in frame.itertuples():
        last = row.score if row.rank is not None else last
        ppl.append(last / base)
    share = 100 * frame.share.to_numpy()
    ax.plot(share, ppl, color=PALETTE[0], label="search split (accepted)")
    ax.plot(share, frame.bound / base, color="k", ls=":", label="bound t^m")
    if test and test_dense:
        ax.plot([100 * s for s, _ in test], [p / test_dense for _, p in test], "o", color=PALETTE[1], label="test split")
    ax.invert_xaxis()
    ax.set_xlabel("whole-model parameters (%)")
    ax.set_ylabel("perplexity / dense")
    ax.legend(fontsize="x-small")
    return fig


def plot_rank_map(matrix: np.ndarray, layers: list[int], kinds: list[str], title: str) -> plt.Figure:
    """Chosen rank / kappa per layer (rows) and module (columns); 1 = kept dense (SFSD F5)."""
    fig, ax = plt.subplots(figsize=(3.6, 0.16 * len(layers) + 1.2), layout="constrained")
    sns.heatmap(matrix, ax=ax, vmin=0, vmax=1, cmap="viridis", yticklabels=layers, xticklabels=kinds,
                cbar_kws={"label": "rank / κ (1 = dense)"})
    ax.set_ylabel("layer (0-based)")
    ax.set_title(title, fontsize="small")
    return fig


def plot_task_search(frame, dense: dict[str, float]) -> plt.Figure:
    """SFSD Table B / Fig. F1: search-split vs test-split accuracy after each searched layer, over the
    whole-model parameter share; dashed lines the dense accuracies."""
    fig, ax = plt.subplots(figsize=(5.2, 3.2), layout="constrained")
    for i, split in enumerate(("search", "test")):
        ax.plot(100 * frame.share, frame[split], marker="o", color=PALETTE[i], label=f"{split} split")
        ax.axhline(dense[split], color=PALETTE[i], ls="--", lw=0.8)
    ax.invert_xaxis()
    ax.set_xlabel("whole-model parameters (%)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize="x-small")
    return fig
