"""``common.reporting.gpu_check``: a failing step is reported and the others still run; the report is written after
each step; the wheels are pinned to this environment. (``make test-gpu-check`` runs every real step, shrunk.)"""

from __future__ import annotations

import json
from importlib.metadata import version

from common.reporting import gpu_check


def test_a_failing_step_is_reported_and_the_rest_run(tmp_path, monkeypatch) -> None:
    def broken(sz, cache):
        raise RuntimeError("out of memory (planted)")

    def fine(sz, cache):
        return {"planned": 2 * 1024 ** 3, "tokens_per_s": 10.0, "notebook": "01_massive_activation_origin"}

    monkeypatch.setattr(gpu_check, "STEPS", {"broken": broken, "fine": fine})
    out = tmp_path / "report.json"
    assert gpu_check.main(["--shrink", "16", "--out", str(out), "--steps", "broken,fine"]) == 1
    report = json.loads(out.read_text())
    first, second = report["steps"]
    assert first["step"] == "broken" and not first["ok"] and "planted" in first["error"] and first["planned_gib"] is None
    assert second["ok"] and second["planned_gib"] == 2.0 and second["tokens_per_s"] == 10.0
    import torch

    assert report["shrink"] == 16
    assert report["device"] == (torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    assert gpu_check.main(["--shrink", "16", "--out", str(out), "--steps", "fine"]) == 0


def test_unknown_steps_are_refused(tmp_path) -> None:
    import pytest

    with pytest.raises(SystemExit, match="unknown steps"):
        gpu_check.main(["--steps", "nope", "--out", str(tmp_path / "r.json")])


def test_wheels_are_pinned_to_this_environment() -> None:
    pins = gpu_check.wheels()
    assert f"lm_eval=={version('lm_eval')}" in pins and len(pins) == len(gpu_check.WHEELS)
    assert all("==" in p for p in pins)


def test_the_dry_run_environment_does_not_leak(tmp_path, monkeypatch) -> None:
    import os

    seen = {}
    monkeypatch.setattr(gpu_check, "STEPS", {"env": lambda sz, cache: seen.update(os.environ) or {}})
    gpu_check.main(["--shrink", "16", "--out", str(tmp_path / "r.json"), "--steps", "env"])
    assert seen["REPRO_WEIGHTS"] == "random" and seen["REPRO_RANDOM_SHRINK"] == "16"
    assert "REPRO_WEIGHTS" not in os.environ and "REPRO_RANDOM_SHRINK" not in os.environ
