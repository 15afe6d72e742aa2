"""One figure style for the suite, and ``save_figure`` (PNG dpi 200 + PDF, deterministic metadata).

Colours come from seaborn's colour-blind palette with a fixed model -> colour map, so a model has the
same colour in every notebook. Figures go to the active notebook's output directory (``manifest``).
"""

from __future__ import annotations

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
