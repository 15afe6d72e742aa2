"""common.hoc.finetune's notebook-03 records: settings, the massive rows, training time and MacDrop's drop rate."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from common.core import progress
from common.core.profiles import load_config
from common.hoc import finetune, paper


def test_record_settings(records) -> None:
    cfg = load_config("03_macdrop_finetuning", "smoke")
    finetune.record_settings(cfg)
    rec = records()["settings/train"]
    assert rec["value"]["lr"] == cfg.settings.lr and rec["value"]["n_train"] == cfg.n_train
    assert rec["note"].endswith(f"({paper.table6_note()})")


def test_record_massive_rows(records) -> None:
    finetune.record_massive_rows("m", 3, [7, 1, 2], 3)
    recs = records()
    assert recs["m/macdrop/massive_layer"]["value"] == 3 and recs["m/macdrop/channels"]["value"] == [7, 1, 2]


def test_record_training(records) -> None:
    hist = [{"step": 1, "p": 0.5, "drop_rate": 0.45}, {"step": 2, "p": 0.0, "drop_rate": 0.0}]
    tuned = {("m", "lora", 0): finetune.FineTune(Path("a"), log=[{"step": 1, "loss": 2.0}], seconds=3.0, steps=2),
             ("m", "lora_macdrop", 0): finetune.FineTune(Path("b"), log=[{"step": 1, "loss": 1.0}], macdrop=hist,
                                                         seconds=4.0, steps=2),
             ("m", "lora_macdrop", 1): finetune.FineTune(Path("c"), macdrop=[{"step": 1, "p": 0.5, "drop_rate": 0.0}])}
    curves, schedules = finetune.record_training(tuned, 5)
    assert len(curves["m", "lora_macdrop"]) == 2 and schedules == {("m", "lora_macdrop"): hist}
    recs = records()
    assert recs["m/macdrop/lora/train_seconds_s0"]["volatile"] is True
    assert abs(recs["m/macdrop/lora_macdrop/drop_rate_max_error"]["value"] - 0.05) < 1e-12  # seed 0's history
    assert "m/macdrop/lora/drop_rate_max_error" not in recs


def test_step_progress_reports_process_zeros_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fine-tune's progress callback reports the global step of ``max_steps`` on process 0 only."""
    seen = []
    monkeypatch.setattr(progress, "report", lambda task, done, total=None, note="": seen.append((task, done, total)))
    cb = finetune.StepProgress("fine-tune x lora seed 0")
    for zero in (True, False):
        cb.on_step_end(None, SimpleNamespace(is_world_process_zero=zero, global_step=3, max_steps=8), None)
    assert seen == [("fine-tune x lora seed 0", 3, 8)]
