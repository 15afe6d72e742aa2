"""``common.core.plan``: the planner's table of every notebook, and docs/GPU.md's generated section."""

from __future__ import annotations

import json

import pytest

from common.core import plan
from common.core.profiles import PROFILES


def test_table_has_every_notebook_and_both_cards() -> None:
    text = plan.table("paper")
    for notebook in PROFILES["paper"]:
        assert f"| {notebook} |" in text
    assert all(f"fits {card}" in text for card in plan.CARDS)


def test_docs_gpu_md_is_current() -> None:
    """The committed table is what the planner computes now (regenerate with `make plan WRITE=1`)."""
    text = plan.DOC.read_text()
    assert plan._document(text, "paper") == text


def test_measured_column_reads_the_gpu_check_report(tmp_path, monkeypatch) -> None:
    report = tmp_path / "gpu_check.json"
    report.write_text(json.dumps({"steps": [{"step": "lowrank", "notebook": "05_lowrank_decomposition", "ok": True,
                                             "peak_gib": 33.3, "planned_gib": 30.0}]}))
    monkeypatch.setattr(plan, "GPU_CHECK", report)
    row = next(line for line in plan.table("paper").splitlines() if "05_lowrank" in line)
    assert "33.3 GiB vs 30.0 planned (lowrank)" in row


def test_document_needs_its_markers() -> None:
    with pytest.raises(ValueError, match="markers"):
        plan._document("no markers here", "paper")
