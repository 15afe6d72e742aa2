"""One figure style for the suite, and ``save_figure`` (PNG dpi 200 + PDF, deterministic metadata).

Colours come from seaborn's colour-blind palette with a fixed model -> colour map, so a model has the
same colour in every notebook. Figures go to the active notebook's output directory (``manifest``).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

from common import manifest
from common.models import REGISTRY

PALETTE = sns.color_palette("colorblind")
MODEL_COLORS = {key: PALETTE[i % len(PALETTE)] for i, key in enumerate(REGISTRY)}


def apply_style() -> None:
    """Seaborn ``paper`` theme, TrueType fonts in PDFs, tight bounding boxes."""
    sns.set_theme(context="paper", style="whitegrid", palette=PALETTE, font_scale=1.1)
    plt.rcParams.update({"pdf.fonttype": 42, "ps.fonttype": 42, "savefig.bbox": "tight",
                         "figure.dpi": 100, "axes.titlesize": "medium"})


def display_name(key: str) -> str:
    """Legend label of a registry key."""
    return REGISTRY[key].display if key in REGISTRY else key


def save_figure(fig: plt.Figure, name: str) -> Path:
    """Write ``<out_dir>/<name>.png`` (dpi 200) and ``.pdf`` with no timestamps; returns the PNG path.

    ``name`` follows the paper's figure, e.g. ``fig3b_hidden_topk``.
    """
    out = manifest.current().out_dir
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{name}.png"
    fig.savefig(png, dpi=200, metadata={"Software": None})
    fig.savefig(out / f"{name}.pdf", metadata={"Creator": None, "Producer": None, "CreationDate": None})
    manifest.current().figures.append(png.name)
    manifest.current().save()
    return png


def model_grid(keys: list[str], width: float = 3.4, height: float = 2.6, sharey: bool = False):
    """One panel per model in a row: ``(fig, {key: ax})``."""
    fig, axes = plt.subplots(1, len(keys), figsize=(width * len(keys), height), sharey=sharey, squeeze=False)
    for key, ax in zip(keys, axes[0], strict=True):
        ax.set_title(display_name(key))
    return fig, dict(zip(keys, axes[0], strict=True))


def layer_topk_curves(ax: plt.Axes, top: np.ndarray, median: np.ndarray, mark: int | None = None) -> None:
    """SunMA/HoC Fig. 3b-c panel: top-1..k |x| and the median per layer, log scale; ``mark`` a layer."""
    layers = range(len(median))
    for j in range(top.shape[1]):
        ax.plot(layers, top[:, j], marker="o", ms=2.5, label=f"top {j + 1}")
    ax.plot(layers, median, color="black", ls="--", label="median")
    if mark is not None:
        ax.axvline(mark, color="grey", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("layer (0-based)")


def _attack_label(name: str) -> str:
    return name.replace("_top", " top-").replace("_", " ")


def plot_table1(frame, k: int) -> plt.Figure:
    """HoC Table 1 as two panels: perplexity ratio to the intact model (log) and zero-shot accuracy with
    95% intervals and the tasks' chance level, per model and attack."""
    models = list(dict.fromkeys(frame.index.get_level_values(0)))
    attacks = list(dict.fromkeys(frame.index.get_level_values(1)))
    fig, (ax_p, ax_a) = plt.subplots(1, 2, figsize=(10, 3.2))
    width = 0.8 / len(attacks)
    for j, attack in enumerate(attacks):
        sub = frame.xs(attack, level=1).reindex(models)
        xs = np.arange(len(models)) + (j - (len(attacks) - 1) / 2) * width
        ax_p.bar(xs, sub["ppl_ratio"], width, label=_attack_label(attack), color=PALETTE[j])
        acc = sub["acc"].astype(float)
        err = np.vstack([acc - sub["acc_lo"].astype(float), sub["acc_hi"].astype(float) - acc])
        ax_a.bar(xs, acc, width, yerr=err, capsize=2, color=PALETTE[j])
    chance = frame.xs("base", level=1).reindex(models)["chance"].astype(float)
    for i, c in enumerate(chance):
        ax_a.hlines(c, i - 0.45, i + 0.45, color="black", ls=":", label="chance" if i == 0 else None)
    for ax in (ax_p, ax_a):
        ax.set_xticks(range(len(models)), [textwrap.fill(display_name(m), 14) for m in models], fontsize="small")
    ax_p.set_yscale("log")
    ax_p.axhline(1, color="grey", lw=0.8)
    ax_p.set_ylabel("perplexity / intact")
    ax_a.set_ylabel("zero-shot accuracy (mean of tasks)")
    ax_a.set_ylim(0, 1)
    fig.legend(loc="upper center", ncol=len(attacks) + 1, bbox_to_anchor=(0.5, 1.08), fontsize="small")
    return fig


def plot_sweep(frame, title: str) -> plt.Figure:
    """HoC Fig. 4: perplexity and accuracy against k for zero / keep-only / random (k on a symlog axis)."""
    fig, (ax_p, ax_a) = plt.subplots(1, 2, figsize=(9, 3.2))
    for j, kind in enumerate(("zero", "keep", "random")):
        sub = frame.xs(kind, level=0)
        ks = sub.index.to_numpy()
        ax_p.plot(ks, sub["ppl"], marker="o", ms=3, color=PALETTE[j], label=f"{kind} top-k" if kind != "random"
                  else "random k")
        acc = sub["acc"].astype(float)
        ax_a.plot(ks, acc, marker="o", ms=3, color=PALETTE[j])
        ax_a.fill_between(ks, sub["acc_lo"].astype(float), sub["acc_hi"].astype(float), color=PALETTE[j], alpha=0.15)
    for ax in (ax_p, ax_a):
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("k (rows of up and gate)")
    ax_p.set_yscale("log")
    ax_p.set_ylabel("perplexity")
    ax_a.set_ylabel("zero-shot accuracy")
    ax_p.legend(fontsize="small")
    fig.suptitle(title)
    return fig


def plot_circuit(frame) -> plt.Figure:
    """Perplexity ratio of the circuit attacks per model (log scale)."""
    models = list(dict.fromkeys(frame.index.get_level_values(0)))
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(4.2 * max(1, len(models)), 3.2), squeeze=False,
                             layout="constrained")
    for ax, key in zip(axes[0], models, strict=False):
        sub = frame.xs(key, level=0)
        ax.barh([_attack_label(a) for a in sub.index], sub["ppl_ratio"], color=MODEL_COLORS.get(key))
        ax.set_xscale("log")
        ax.axvline(1, color="grey", lw=0.8)
        ax.set_title(display_name(key))
        ax.set_xlabel("perplexity / intact")
    return fig


ARM_ORDER = ("lora", "lora_macdrop", "dora", "dora_macdrop")
ARM_COLORS = {"lora": PALETTE[0], "lora_macdrop": PALETTE[1], "dora": PALETTE[2], "dora_macdrop": PALETTE[3],
              "pre-trained": (0.55, 0.55, 0.55)}


def _models_in(frame) -> list[str]:
    """The frame's models in registry order (the suite's fixed order)."""
    present = set(frame.index.get_level_values("model"))
    return [m for m in REGISTRY if m in present]


def _arm_axis(ax: plt.Axes, frame, key: str, column: str, offset: float = 0.0, bars: bool = True,
              **style) -> list[str]:
    """Per-seed points and the seed mean (a bar, or a dash when ``bars`` is False, for quantities whose zero
    is not meaningful) of ``column`` for every arm of ``key``; returns the arms."""
    arms = [a for a in ARM_ORDER if a in frame.loc[key].index.get_level_values("arm")]
    for i, arm in enumerate(arms):
        values = frame.loc[(key, arm), column].astype(float).to_numpy()
        if bars:
            ax.bar(i + offset, values.mean(), 0.38, color=ARM_COLORS[arm], **style)
        else:
            ax.hlines(values.mean(), i + offset - 0.25, i + offset + 0.25, color=ARM_COLORS[arm], lw=3)
        ax.scatter(np.full(len(values), i + offset), values, color="black", s=8, zorder=3)
    ax.set_xticks(range(len(arms)), [a.replace("_", "+\n") for a in arms], fontsize="small")
    return arms


def _blank(ax: plt.Axes, text: str) -> None:
    """A panel with nothing to show: no axes, one line saying why."""
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize="small", transform=ax.transAxes)


def plot_macdrop_table3(frame, base: dict[str, dict]) -> plt.Figure:
    """HoC Table 3 analogue: held-out loss and zero-shot accuracy per arm (bars: mean over seeds; dots: seeds),
    the pre-trained model as a dashed line, one row of panels per model."""
    models = _models_in(frame)
    fig, axes = plt.subplots(len(models), 2, figsize=(8, 2.8 * len(models)), squeeze=False, layout="constrained")
    for (ax_l, ax_a), key in zip(axes, models, strict=True):
        _arm_axis(ax_l, frame, key, "loss", bars=False)
        ax_l.set_ylabel("held-out loss")
        ax_l.set_title(f"{display_name(key)}: held-out loss (pre-trained {base[key]['loss']:.2f})",
                       fontsize="small")
        if frame.loc[key, "acc"].notna().any():
            _arm_axis(ax_a, frame, key, "acc")
            ax_a.axhline(base[key]["acc"]["acc"], color="grey", ls="--", lw=1, label="pre-trained")
            ax_a.legend(fontsize="small", loc="lower left")
            ax_a.set_ylabel("zero-shot accuracy")
            ax_a.set_title(f"{display_name(key)}: zero-shot (mean of tasks)", fontsize="small")
        else:
            _blank(ax_a, "zero-shot not run for this model\n(held-out loss only; CPU budget)")
    return fig


def plot_macdrop_table4(frame, base: dict[str, dict], k: int) -> plt.Figure:
    """HoC Table 4 analogue: what zeroing the top-k massive rows costs each fine-tuned model. Left: loss
    increase with the adapter unmerged (solid) and merged (hatched); right: accuracy intact vs attacked."""
    models = [m for m in _models_in(frame) if "loss_delta" in frame and frame.loc[m, "loss_delta"].notna().any()]
    fig, axes = plt.subplots(len(models), 2, figsize=(8, 2.8 * len(models)), squeeze=False, layout="constrained")
    for (ax_l, ax_a), key in zip(axes, models, strict=True):
        _arm_axis(ax_l, frame, key, "loss_delta", offset=-0.2)
        _arm_axis(ax_l, frame, key, "loss_delta_merged", offset=0.2, hatch="//", alpha=0.5)
        ax_l.axhline(base[key]["loss_zero"] - base[key]["loss"], color="grey", ls="--", lw=1, label="pre-trained")
        ax_l.set_ylabel(f"loss increase, zero top-{k}")
        ax_l.set_title(f"{display_name(key)}: solid unmerged, hatched merged", fontsize="small")
        if frame.loc[key, "acc_zero"].notna().any():
            _arm_axis(ax_a, frame, key, "acc", offset=-0.2, alpha=0.35)
            _arm_axis(ax_a, frame, key, "acc_zero", offset=0.2)
            ax_a.set_ylabel("zero-shot accuracy")
            ax_a.set_title(f"{display_name(key)}: pale intact, solid zero top-{k}", fontsize="small")
        else:
            _blank(ax_a, "zero-shot not run for this model")
    axes[0][0].legend(fontsize="small")
    return fig


def plot_training(curves: dict[tuple[str, str], list[list[dict]]], schedules: dict[tuple[str, str], list[dict]]):
    """Training loss per step (mean over seeds) per (model, arm), and MacDrop's p_t with the measured drop
    rate of every step (proof that the masks were applied)."""
    models = [m for m in REGISTRY if any(k == m for k, _ in curves)]
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(3.8 * (len(models) + 1), 3), squeeze=False,
                             layout="constrained")
    for ax, key in zip(axes[0], models, strict=False):
        for (k, arm), runs in curves.items():
            if k != key:
                continue
            steps = [e["step"] for e in runs[0]]
            loss = np.mean([[e["loss"] for e in run] for run in runs], axis=0)
            ax.plot(steps, loss, color=ARM_COLORS[arm], label=arm, lw=1)
        ax.set_title(display_name(key), fontsize="small")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize="x-small")
    ax = axes[0][-1]
    for (key, arm), hist in schedules.items():
        steps = [h["step"] for h in hist]
        ax.plot(steps, [h["p"] for h in hist], color="black", lw=1)
        ax.scatter(steps, [h["drop_rate"] for h in hist], s=6, color=ARM_COLORS[arm], label=f"{key} {arm}")
    ax.set_title("MacDrop: p_t (line), measured drop rate (dots)", fontsize="small")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("drop probability")
    ax.legend(fontsize="x-small")
    return fig


def plot_macdrop_grid(grid, baseline: dict) -> plt.Figure:
    """HoC Table 5 (schedule x p0 heatmap of held-out loss and accuracy) and Fig. 6 (constant p per scope),
    relative to plain LoRA (``baseline``: its ``loss`` and ``acc``)."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2), layout="constrained")
    sched = grid[grid["kind"] != "constant"]
    for ax, col, sign, label in ((axes[0], "loss", -1, "loss gain vs LoRA"), (axes[1], "acc", 1, "acc gain vs LoRA")):
        if col == "acc" and not baseline.get("acc"):
            _blank(ax, "zero-shot not run for the grid")
            continue
        table = sched.pivot_table(index="kind", columns="p0", values=col)
        base = baseline["loss"] if col == "loss" else baseline["acc"]["acc"]
        sns.heatmap(sign * (table - base), annot=True, fmt=".3f", center=0, cmap="vlag", ax=ax, cbar=False)
        ax.set_title(f"Table 5: {label}", fontsize="small")
        ax.set_xlabel("p0")
        ax.set_ylabel("")
    scope = grid[grid["kind"] == "constant"]
    for j, (name, sub) in enumerate(scope.groupby("scope")):
        sub = sub.sort_values("p0")
        axes[2].plot(sub["p0"], baseline["loss"] - sub["loss"], marker="o", ms=3, color=PALETTE[j], label=name)
    axes[2].axhline(0, color="grey", lw=0.8)
    axes[2].set_title("Fig. 6: constant p, loss gain vs LoRA", fontsize="small")
    axes[2].set_xlabel("p (constant)")
    axes[2].legend(fontsize="small", title="rows dropped")
    return fig


# ------------------------------------------------------------------------------- notebook 04 (Inheritune)


def _log_axis(ax: plt.Axes, axis: str = "y", plain: bool = True) -> None:
    """Log ``axis`` ("y" or "x") without minor tick labels; ``plain``: numbers (1, 10, 100) instead of
    powers of ten."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    getattr(ax, f"set_{axis}scale")("log")
    scale = getattr(ax, f"{axis}axis")
    if plain:
        scale.set_major_formatter(ScalarFormatter())
    scale.set_minor_formatter(NullFormatter())


def _band(ax: plt.Axes, y: np.ndarray, spread: np.ndarray | None, color, label: str, **style) -> None:
    layers = np.arange(len(y))
    ax.plot(layers, y, marker="o", ms=2.5, color=color, label=label, **style)
    if spread is not None:
        ax.fill_between(layers, np.maximum(y - spread, 0), y + spread, color=color, alpha=0.15, lw=0)


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
        _band(ax, s.per_layer(metric, heads).numpy(), s.spread(metric, heads).numpy(), MODEL_COLORS.get(key, "C0"), key)
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
            _log_axis(ax)
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
    _log_axis(ax)
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
        _band(ax, np.asarray(y), np.asarray(spread), PALETTE[j], label)
    ax.axhline(2.0, color="grey", lw=0.8, ls=":")
    _log_axis(ax)
    ax.set_xlabel("layer (0-based); dotted: lazy threshold 2")
    ax.set_ylabel("MaxRank")
    ax.legend(fontsize="x-small")
    return fig


# ----------------------------------------------------------------------------------- notebook 05

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
    """SFSD Table A: perplexity (log) and zero-shot accuracy vs whole-model parameter share per method,
    one column per model; the paper's LLaMA-7B averages in the accuracy panels' legend."""
    fig, axes = plt.subplots(2, len(frames), figsize=(4.0 * len(frames), 5.4), squeeze=False, layout="constrained")
    for j, (key, frame) in enumerate(frames.items()):
        dense = frame[frame.method == "dense"].iloc[0]
        for i, method in enumerate(m for m in METHOD_LABELS if m in set(frame.method)):
            f = frame[frame.method == method].sort_values("share")
            axes[0][j].plot(100 * f.share, f.ppl, marker="o", ms=3, color=PALETTE[i], label=METHOD_LABELS[method])
            if "acc" in f:
                err = np.abs(np.array(f.ci95.tolist()).T - f.acc.to_numpy())
                axes[1][j].errorbar(100 * f.share, f.acc, yerr=err, marker="o", ms=3, color=PALETTE[i], capsize=2)
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


# ------------------------------------------------------------------------------- notebook 06


def _mark_layer(ax: plt.Axes, layer: int | None, label: str = "massive layer") -> None:
    if layer is not None:
        ax.axvline(layer, color="grey", ls="--", lw=1, label=f"{label} {layer}")


def plot_massive_vs_sink(frames: dict[str, object], massive_layers: dict[str, int | None]) -> plt.Figure:
    """Per model and layer: the first token's largest |h| over the layer's median |h| (log, left axis) and
    the attention mass on position 0 (right axis); dashed: the massive layer."""
    fig, axes = model_grid(list(frames), width=3.6, height=2.8)
    for key, frame in frames.items():
        ax = axes[key]
        ax.plot(frame.index, frame.ratio, color=PALETTE[0], marker="o", ms=2.5, label="max |h₀| / median |h|")
        _log_axis(ax, plain=False)
        ax.set_xlabel("layer (0-based)")
        _mark_layer(ax, massive_layers.get(key))
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
            _mark_layer(ax, massive_layers.get(key))
        axes[0][j].set_title(display_name(key))
        axes[0][j].set_ylim(0, 1)
        _log_axis(axes[1][j])
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
    _log_axis(left)
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
    _log_axis(right, "x")
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
    _mark_layer(left, massive_layer)
    left.axhline(1.0, color="k", lw=0.8, ls=":")
    _log_axis(left)
    left.set_xlabel("layer (0-based)")
    left.set_ylabel("‖(I−P)μ₀‖² / ‖(I−P)μ‖²")
    left.legend(fontsize="x-small", ncol=4)
    names = list(ppl)
    right.barh(range(len(names)), [ppl[n] for n in names], color=[PALETTE[i % len(PALETTE)] for i in range(len(names))])
    right.set_yticks(range(len(names)), [MEAN_PART_LABELS.get(n, n) for n in names], fontsize="x-small")
    right.invert_yaxis()
    _log_axis(right, "x", plain=False)
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
        _log_axis(ax)
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
