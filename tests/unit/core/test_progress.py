"""``common.core.progress``: the library's one progress channel (issue 22)."""

from __future__ import annotations

import pytest

from common.core import progress


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """No throttle state from other tests, a clock the test moves, neither the quiet switch nor a file set."""
    clock = [1000.0]
    monkeypatch.setattr(progress, "_last", {})
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    monkeypatch.delenv(progress.QUIET_VAR, raising=False)
    monkeypatch.delenv(progress.FILE_VAR, raising=False)
    return clock


def test_lines_go_to_stderr_throttled_per_task(_fresh: list[float], capsys) -> None:
    """The first unit reports; more units inside EVERY_S do not, one after it does; the last always does; a
    second task has its own clock."""
    progress.report("decompose", 1, 4)
    progress.report("decompose", 2, 4)
    progress.report("search", 1, 9, "ppl 12.3")
    _fresh[0] += progress.EVERY_S
    progress.report("decompose", 3, 4)
    progress.report("decompose", 4, 4)
    assert capsys.readouterr().err.splitlines() == ["decompose: 1/4", "search: 1/9 ppl 12.3", "decompose: 3/4",
                                                    "decompose: 4/4"]


def test_unknown_total_is_a_question_mark(capsys) -> None:
    progress.report("sweep", 1)
    assert capsys.readouterr().err == "sweep: 1/?\n"


def test_under_the_runner_the_file_holds_the_latest_line(monkeypatch: pytest.MonkeyPatch, tmp_path, capsys) -> None:
    """With REPRO_PROGRESS_FILE set, each report replaces the file's line (nothing on stderr, so executed notebooks
    stay clean), and ``latest`` reads it back; no file yet reads as ""."""
    path = tmp_path / "02.progress"
    assert progress.latest(path) == ""
    monkeypatch.setenv(progress.FILE_VAR, str(path))
    progress.report("train reference", 1, 8, "val 5.1")
    progress.report("train reference", 8, 8, "val 3.2")
    assert progress.latest(path) == "train reference: 8/8 val 3.2"
    assert path.read_text().count("\n") == 1 and not list(tmp_path.glob("*.tmp"))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("value, silent", [("1", True), ("yes", True), ("0", False), ("", False)])
def test_quiet_switch_silences_everything(monkeypatch: pytest.MonkeyPatch, tmp_path, capsys, value: str,
                                          silent: bool) -> None:
    """REPRO_QUIET=1 (CI) silences stderr and the file alike; 0 or empty does not."""
    monkeypatch.setenv(progress.QUIET_VAR, value)
    progress.report("fine-tune", 1, 2)
    monkeypatch.setenv(progress.FILE_VAR, str(tmp_path / "p"))
    progress.report("fine-tune", 2, 2)
    assert (capsys.readouterr().err == "") == silent
    assert (progress.latest(tmp_path / "p") == "") == silent


def test_each_yields_every_item_and_reports_after_it(capsys) -> None:
    """``each`` passes the items through and reports after each (a generator has no total: "?")."""
    assert list(progress.each("arms", ["a", "b"])) == ["a", "b"]
    assert list(progress.each("gen", (x for x in (1, 2)))) == [1, 2]
    assert capsys.readouterr().err.splitlines() == ["arms: 1/2", "arms: 2/2", "gen: 1/?"]
