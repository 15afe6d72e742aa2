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
