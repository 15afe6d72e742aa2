"""The determinism check (issue 9 §3): ``manifest.differences`` / ``compare_dirs`` / the ``compare`` CLI find a
changed number, interval, figure list or run field, tolerate what the run measures about the machine
(wall time, memory, volatile records), and apply a relative tolerance only when asked (the GPU case)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from common.core import manifest


def _manifest() -> dict:
    return {"notebook": "01_x", "profile": "smoke", "figures": ["fig1.png"],
            "run": {"git_sha": "abc", "seed": 0, "models": {"tiny-llama": "in-process:1"}, "wall_s": 3.0,
                    "peak_rss_mb": 900},
            "records": [{"key": "m/ppl", "value": 12.5, "ci95": [11.0, 14.0]},
                        {"key": "m/layers", "value": [1, 2, 3], "ci95": None},
                        {"key": "m/train_seconds", "value": 4.2, "ci95": None, "volatile": True}]}


def test_identical_runs_have_no_differences() -> None:
    """Machine measurements (wall time, peak memory, volatile records) may differ; nothing else does."""
    a, b = _manifest(), _manifest()
    b["run"].update(wall_s=9.9, peak_rss_mb=1234, peak_gpu_mb=5)
    b["records"][2]["value"] = 99.0
    assert manifest.differences(a, b) == []


@pytest.mark.parametrize("change,where", [
    (lambda m: m["records"][0].update(value=12.500001), "m/ppl.value"),
    (lambda m: m["records"][0].update(ci95=[11.0, 14.1]), "m/ppl.ci95[1]"),
    (lambda m: m["records"][1].update(value=[1, 2]), "m/layers.value: lengths"),
    (lambda m: m["records"].pop(1), "m/layers: only in the first"),
    (lambda m: m["figures"].append("fig2.png"), "figures: lengths"),
    (lambda m: m["run"]["models"].update({"tiny-llama": "in-process:2"}), "run.models.tiny-llama"),
    (lambda m: m["run"].update(seed=1), "run.seed"),
])
def test_a_planted_change_is_found(change, where: str) -> None:
    """Each kind of change, planted in a copy, is reported at its place (exact comparison: CPU)."""
    a = _manifest()
    b = copy.deepcopy(a)
    change(b)
    diffs = manifest.differences(a, b)
    assert len(diffs) == 1 and diffs[0].startswith(where), diffs


def test_relative_tolerance_for_gpu_runs() -> None:
    """rel > 0 accepts float noise within it and still reports a larger change; integers compare the same way."""
    a, b = _manifest(), _manifest()
    b["records"][0]["value"] = 12.5 * (1 + 1e-4)
    assert manifest.differences(a, b, rel=1e-3) == [] and manifest.differences(a, b) != []
    b["records"][0]["value"] = 12.5 * 1.01
    assert manifest.differences(a, b, rel=1e-3) != []


def test_compare_dirs_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """compare_dirs pairs notebooks by folder; a notebook in one tree only is a difference; the CLI exits 1 then
    and 0 when all agree."""
    for root in ("a", "b"):
        (tmp_path / root / "01_x").mkdir(parents=True)
        (tmp_path / root / "01_x" / "manifest.json").write_text(json.dumps(_manifest()))
    assert manifest.compare_dirs(tmp_path / "a", tmp_path / "b") == {"01_x": []}
    assert manifest.main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    (tmp_path / "b" / "02_y").mkdir()
    (tmp_path / "b" / "02_y" / "manifest.json").write_text(json.dumps(_manifest()))
    assert manifest.compare_dirs(tmp_path / "a", tmp_path / "b")["02_y"][0].startswith("manifest only under")
    assert manifest.main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    assert "DIFFERENT  02_y" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="no \\*/manifest.json"):
        manifest.compare_dirs(tmp_path / "none", tmp_path / "nothing")


def test_volatile_flag_is_written_only_when_set(tmp_path: Path) -> None:
    """record(volatile=True) marks the entry; other entries keep their usual fields."""
    from types import SimpleNamespace

    cfg = SimpleNamespace(notebook="x", profile="smoke", out_dir=tmp_path, seed=0)
    manifest.start(cfg)
    manifest.record("m/t", 1.0, volatile=True)
    manifest.record("m/v", 2.0)
    saved = {r["key"]: r for r in manifest.load(tmp_path / "manifest.json")["records"]}
    assert saved["m/t"]["volatile"] is True and "volatile" not in saved["m/v"]
