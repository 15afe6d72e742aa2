"""``common.core.style``: deterministic figure files and the figure style."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common.core import manifest, models, style

NB = "01_massive_activation_origin"


def _cfg(tmp_path: Path) -> SimpleNamespace:
    return SimpleNamespace(notebook="x", profile="smoke", seed=0, out_dir=tmp_path / "out")


def _figure() -> plt.Figure:
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1, 2], [1, 3, 2], label="tiny-llama")
    ax.set_title("test")
    ax.legend()
    return fig


def test_save_figure_requires_manifest() -> None:
    """Figures go to the active notebook's directory: none active, no save."""
    fig = _figure()
    try:
        with pytest.raises(RuntimeError):
            style.save_figure(fig, "figX_test")
    finally:
        plt.close(fig)


def test_save_figure_png_pdf_deterministic(tmp_path: Path) -> None:
    """PNG and PDF are written to out_dir, the PNG path is returned and listed, and saving again gives
    byte-identical files (no timestamps in the PDF)."""
    manifest.start(_cfg(tmp_path))
    fig = _figure()
    try:
        png = style.save_figure(fig, "figX_test")
        pdf = png.with_suffix(".pdf")
        first_pdf, first_png = pdf.read_bytes(), png.read_bytes()
        style.save_figure(fig, "figX_test")
    finally:
        plt.close(fig)
    assert png == tmp_path / "out" / "figX_test.png"
    assert first_png.startswith(b"\x89PNG") and first_pdf.startswith(b"%PDF")
    assert b"CreationDate" not in first_pdf
    assert pdf.read_bytes() == first_pdf
    assert png.read_bytes() == first_png
    assert "figX_test.png" in manifest.current().figures


def test_apply_style_and_names() -> None:
    """The style sets TrueType PDF fonts; registry keys get display names and a fixed colour each."""
    with matplotlib.rc_context():
        plt.rcParams["pdf.fonttype"] = 3
        style.apply_style()
        assert plt.rcParams["pdf.fonttype"] == 42 and plt.rcParams["savefig.bbox"] == "tight"
    assert style.display_name("tiny-llama") == models.REGISTRY["tiny-llama"].display
    assert style.display_name("unregistered") == "unregistered"
    assert set(style.MODEL_COLORS) == set(models.REGISTRY)
    assert style.MODEL_COLORS["tiny-llama"] != style.MODEL_COLORS["tiny-gpt2"]
    assert style.MODEL_COLORS["user-x"] in style.PALETTE and "user-x" not in style.MODEL_COLORS  # your own model


def test_manifest_is_world_readable_and_lists_figures_once(tmp_path: Path) -> None:
    manifest.start(_cfg(tmp_path))
    fig = _figure()
    style.save_figure(fig, "figY")
    style.save_figure(fig, "figY")
    path = tmp_path / "out" / "manifest.json"
    assert path.stat().st_mode & 0o044 == 0o044
    assert json.loads(path.read_text())["figures"] == ["figY.png"]
