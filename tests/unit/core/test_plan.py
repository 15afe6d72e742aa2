"""``common.core.plan``: the memory planner's and the time planner's tables of every notebook, and the generated
sections of docs/GPU.md and the README."""

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


def test_docs_gpu_md_and_the_readme_are_current() -> None:
    """The committed tables are what the planners compute now (regenerate with `make plan WRITE=1`)."""
    for path, text in plan.documents("paper").items():
        assert path.read_text() == text, f"{path.name} is stale: make plan WRITE=1"


def test_time_table_sums_the_day_tier_and_lists_each_long_run() -> None:
    """One day-tier row per notebook and one row per long run (the paper's pre-training and MacDrop grid, with
    their launch commands); the one-GPU tier's total is the sum of the day-tier hours on one H200."""
    text = plan.time_table("paper")
    rows = [line for line in text.splitlines() if line.startswith("| 0")]
    assert len([r for r in rows if "| day |" in r]) == len(PROFILES["paper"])
    long = [r for r in rows if "| long |" in r]
    assert any("torchrun" in r for r in long) and any("--grid" in r for r in long)
    day = sum(j.hours("h200") for work in plan.jobs("paper").values() for j in work if j.tier == "day")
    total = next(line for line in text.splitlines() if line.startswith("| **one-GPU tier**"))
    assert f"**{day:,.1f}**" in total
    assert "40%" in text and "90%" in text


def test_measured_column_reads_the_gpu_check_report(tmp_path, monkeypatch) -> None:
    report = tmp_path / "gpu_check.json"
    report.write_text(json.dumps({"steps": [{"step": "lowrank", "notebook": "05_lowrank_decomposition", "ok": True,
                                             "peak_gib": 33.3, "planned_gib": 30.0}]}))
    monkeypatch.setattr(plan, "GPU_CHECK", report)
    row = next(line for line in plan.table("paper").splitlines() if "05_lowrank" in line)
    assert "33.3 GiB vs 30.0 planned (lowrank)" in row


def test_a_document_needs_its_markers() -> None:
    with pytest.raises(ValueError, match="markers"):
        plan._section("no markers here", plan.TIME_BEGIN, plan.TIME_END, "table")


def test_time_table_puts_gpu_checks_training_step_beside_the_prediction(tmp_path, monkeypatch) -> None:
    """Without a GPU report the table says the step is not yet measured; with one (full size) it gives the
    measured step and MFU next to the planner's step; a shrunk CPU report is not a measurement."""
    monkeypatch.setattr(plan, "GPU_CHECK", tmp_path / "none.json")
    assert "Not yet measured on a GPU" in plan.measured_step()
    report = {"device": "NVIDIA H200", "shrink": 1, "steps": [
        {"step": "inheritune", "notebook": "04_attention_degeneration_inheritune", "ok": True, "step_s": 0.321,
         "mfu": 0.43, "planned_step_s": 0.345, "planned_mfu": 0.4}]}
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps(report))
    monkeypatch.setattr(plan, "GPU_CHECK", path)
    line = plan.measured_step()
    assert "on NVIDIA H200" in line and "took 0.321 s, MFU 43%" in line and "predicts 0.345 s at 40%" in line
    assert line in plan.time_table("paper")
    path.write_text(json.dumps({**report, "shrink": 16}))
    assert "Not yet measured on a GPU" in plan.measured_step()
