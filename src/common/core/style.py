"""One figure style for the suite, and ``save_figure`` (PNG dpi 200 + PDF, deterministic metadata).

Colours come from seaborn's colour-blind palette with a fixed model -> colour map, so a model has the
same colour in every notebook. Figures go to the active notebook's output directory (``manifest``).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

from common.core import manifest
from common.core.models import REGISTRY

PALETTE = sns.color_palette("colorblind")


class _Colors(dict):
    """Model key -> colour; a key outside the registry (your own model) gets the colour after the registry's."""

    def __missing__(self, key: str):
        return PALETTE[len(self) % len(PALETTE)]


MODEL_COLORS = _Colors({key: PALETTE[i % len(PALETTE)] for i, key in enumerate(REGISTRY)})


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


def blank(ax: plt.Axes, text: str) -> None:
    """A panel with nothing to show: no axes, one line saying why."""
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize="small", transform=ax.transAxes)


def log_axis(ax: plt.Axes, axis: str = "y", plain: bool = True) -> None:
    """Log ``axis`` ("y" or "x") without minor tick labels; ``plain``: numbers (1, 10, 100) instead of
    powers of ten."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    getattr(ax, f"set_{axis}scale")("log")
    scale = getattr(ax, f"{axis}axis")
    if plain:
        scale.set_major_formatter(ScalarFormatter())
    scale.set_minor_formatter(NullFormatter())


def band(ax: plt.Axes, y: np.ndarray, spread: np.ndarray | None, color, label: str, **style) -> None:
    layers = np.arange(len(y))
    ax.plot(layers, y, marker="o", ms=2.5, color=color, label=label, **style)
    if spread is not None:
        ax.fill_between(layers, np.maximum(y - spread, 0), y + spread, color=color, alpha=0.15, lw=0)


def mark_layer(ax: plt.Axes, layer: int | None, label: str = "massive layer") -> None:
    if layer is not None:
        ax.axvline(layer, color="grey", ls="--", lw=1, label=f"{label} {layer}")
