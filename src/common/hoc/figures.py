"""Figures of notebooks 01-03 (House of Cards): the layerwise top-k curves (Fig. 3), Table 1 and the k sweep
(Fig. 4), the circuit attacks, and MacDrop's Tables 3-4, training curves and grids (Table 5, Fig. 6)."""

from __future__ import annotations

import textwrap

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

from common.core.models import REGISTRY
from common.core.style import MODEL_COLORS, PALETTE, blank, display_name, model_grid
from common.hoc import detection


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


def plot_layer_topk(measurements: dict[str, detection.Measurement], point: str, ylabel: str) -> plt.Figure:
    """HoC Fig. 3b (``point="hidden"``) / 3c (``"inter"``): per model, the top-1..3 |x| over all tokens and dims of
    each window and the median, averaged over windows, per layer; the dotted line marks the massive layer."""
    keys = list(measurements)
    fig, axes = model_grid(keys)
    for key, ax in axes.items():
        m = measurements[key]
        layer_topk_curves(ax, m.windows.top[point].mean(0).numpy(), m.windows.median[point].mean(0).numpy(),
                          m.report.layer)
    axes[keys[0]].set_ylabel(ylabel)
    axes[keys[-1]].legend(fontsize="small")
    return fig


def _found(measurements: dict[str, detection.Measurement]) -> list[str]:
    """The models with a massive layer (or the first model, for an empty panel)."""
    return [k for k, m in measurements.items() if m.report.found]


def plot_origin(measurements: dict[str, detection.Measurement]) -> plt.Figure:
    """HoC Fig. 3a: at the massive layer, |residual before|, |attention branch|, |FFN branch| and |residual after|
    summed over the massive hidden dims at position 0 (``detection.origin_split``), per model with a massive layer."""
    keys, found = list(measurements), _found(measurements)
    fig, axes = model_grid(found or keys[:1])
    for key in found:
        r = measurements[key].report
        split = detection.origin_split(measurements[key].prompts, r.layer, r.hidden_dims)
        axes[key].bar(list(split), [abs(v) for v in split.values()], color=PALETTE[:4])
        axes[key].set_yscale("symlog", linthresh=1.0)
        axes[key].set_title(f"{display_name(key)}, layer {r.layer}, dims {r.hidden_dims}", fontsize="small")
    axes[(found or keys)[0]].set_ylabel("|value| at position 0")
    return fig


def plot_channel_contributions(measurements: dict[str, detection.Measurement], n: int = 12) -> plt.Figure:
    """HoC Table 7 / Fig. 1a: the ``n`` largest |W_down[dim, c] inter[c]| at the massive layer (dim: the top
    massive hidden dim), per model with a massive layer, log scale."""
    keys, found = list(measurements), _found(measurements)
    fig, axes = model_grid(found or keys[:1])
    for key in found:
        m = measurements[key]
        contrib = m.contributions.numpy()
        order = np.argsort(-np.abs(contrib))[:n]
        axes[key].bar(range(len(order)), np.abs(contrib[order]), color=MODEL_COLORS[key])
        axes[key].set_xticks(range(len(order)), [str(c) for c in order], rotation=90, fontsize="x-small")
        axes[key].set_yscale("log")
        axes[key].set_xlabel(f"channel -> hidden dim {m.report.hidden_dims[0]}")
    axes[(found or keys)[0]].set_ylabel("|contribution|")
    return fig


def plot_first_token_stability(measurements: dict[str, detection.Measurement]) -> plt.Figure:
    """HoC App. C: for each consensus top-k channel, the share of detection prompts whose own top-k contains it."""
    keys, found = list(measurements), _found(measurements)
    fig, axes = model_grid(found or keys[:1])
    for key in found:
        r = measurements[key].report
        axes[key].bar([str(c) for c in r.channels], r.channel_stability, color=MODEL_COLORS[key])
        axes[key].set_ylim(0, 1.05)
        axes[key].set_xlabel("consensus top-k channel")
    axes[(found or keys)[0]].set_ylabel("share of prompts with it in top-k")
    return fig


def plot_post_norm(m: detection.Measurement) -> plt.Figure:
    """HoC App. D analogue for a model with a post-FFN norm: per layer, at the hidden dim with the largest
    position-0 value, the raw FFN output, the post-norm output, the norm's gain there and its median gain."""
    p, dim = m.post_norm, detection.largest_hidden_dim(m.prompts)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(p["raw_ffn"], marker="o", ms=3, label="|raw FFN output|")
    ax.plot(p["post_norm"], marker="o", ms=3, label="|after post-FFN norm|")
    ax.plot(np.abs(p["gain"]), ls="--", label="|norm gain| at dim")
    ax.plot(p["median_gain"], ls=":", color="black", label="median |norm gain|")
    ax.set_yscale("log")
    ax.set_xlabel("layer (0-based)")
    ax.set_title(f"{display_name(m.key)}: hidden dim {dim} at position 0")
    ax.legend(fontsize="small")
    return fig


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
            blank(ax_a, "zero-shot not run for this model\n(held-out loss only; CPU budget)")
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
            blank(ax_a, "zero-shot not run for this model")
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
            blank(ax, "zero-shot not run for the grid")
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
