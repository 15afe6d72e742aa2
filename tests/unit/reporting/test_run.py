"""The papermill driver: a failing notebook keeps its executed copy with the traceback, the others still
run, and the exit status is non-zero."""

import json

import nbformat
import pytest

from common import REPO_ROOT
from common.reporting import run


def _notebook(path, source: str) -> None:
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell('PROFILE = "small"\nSEED = 0', metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(source)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture
def notebook_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "NOTEBOOK_DIR", tmp_path)
    _notebook(tmp_path / "98_fails.ipynb", "raise RuntimeError('planted failure')")
    _notebook(tmp_path / "99_works.ipynb", "print('profile', PROFILE, 'steps', globals().get('STEPS'))")
    yield tmp_path
    for name in ("98_fails.ipynb", "99_works.ipynb"):
        (REPO_ROOT / "build" / "smoke" / name).unlink(missing_ok=True)


def test_failure_keeps_the_executed_copy_and_the_others_still_run(notebook_dir, capsys):
    assert run.main(["98", "99", "--profile", "smoke"]) == 1
    failed = json.loads((REPO_ROOT / "build" / "smoke" / "98_fails.ipynb").read_text())
    assert "planted failure" in json.dumps(failed)
    worked = json.loads((REPO_ROOT / "build" / "smoke" / "99_works.ipynb").read_text())
    assert "profile smoke" in json.dumps(worked)  # parameters were injected
    assert "1 notebook(s) failed: 98_fails" in capsys.readouterr().out


def test_unknown_notebook_number_lists_the_available_ones(notebook_dir):
    with pytest.raises(SystemExit, match="99_works"):
        run.select_notebooks(["42"])


def test_extra_parameters_are_injected_as_literals(notebook_dir):
    assert run.main(["99", "--profile", "smoke", "--param", "STEPS=20"]) == 0
    worked = json.loads((REPO_ROOT / "build" / "smoke" / "99_works.ipynb").read_text())
    assert "profile smoke steps 20" in json.dumps(worked)


def test_param_parsing():
    assert run.parse_param("STEPS=20") == ("STEPS", 20)
    assert run.parse_param("FULL_GRID=True") == ("FULL_GRID", True)
    assert run.parse_param("NAME=wiki") == ("NAME", "wiki")
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        run.parse_param("STEPS")


def test_start_line_and_final_table(notebook_dir, capsys):
    """Each notebook gets a start line with its expected time (none committed for a planted notebook), and the
    run ends with a table of time against expected."""
    assert run.main(["99", "--profile", "smoke"]) == 0
    out = capsys.readouterr().out
    assert "start  99_works (profile smoke): expected n/a" in out
    table = out[out.index("notebook"):]
    assert "time" in table and "expected" in table and "99_works" in table and table.rstrip().endswith("ok")


def test_expected_time_is_the_committed_manifests_wall_time(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "FIGURES", tmp_path)
    (tmp_path / "small" / "07_x").mkdir(parents=True)
    (tmp_path / "small" / "07_x" / "manifest.json").write_text(json.dumps({"run": {"wall_s": 123.5}}))
    assert run.expected_seconds(tmp_path / "07_x.ipynb", "small") == 123.5
    assert run.expected_seconds(tmp_path / "08_y.ipynb", "small") is None


def test_heartbeat_reads_the_running_cell_from_papermills_copy(tmp_path):
    """``where`` names the running code cell (k of N, first non-blank line), else the last finished one; nothing
    before papermill wrote the copy."""
    path = tmp_path / "out.ipynb"
    assert run.where(path, 1.0) is None
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# title"),
        nbformat.v4.new_code_cell("a = 1", metadata={"papermill": {"status": "completed"}}),
        nbformat.v4.new_code_cell("\n# train\nfor i in range(3):\n    pass", metadata={"papermill": {"status": "running"}}),
        nbformat.v4.new_code_cell("b = 2", metadata={"papermill": {"status": "pending"}})])
    nbformat.write(nb, path)
    assert run.where(path, 75.0) == "cell 2 of 3, 1:15 elapsed: # train"
    nb.cells[2].metadata["papermill"]["status"] = "completed"
    nbformat.write(nb, path)
    assert run.where(path, 5.0) == "cell 2 of 3, 0:05 elapsed: # train"


def test_a_long_cell_gets_heartbeats_when_the_output_is_not_a_terminal(notebook_dir, capsys):
    """A notebook whose cell sleeps 2.5 s, with a 0.5 s heartbeat: several lines naming that cell (the last of 3
    code cells: the parameters, papermill's injected ones, the sleep)."""
    _notebook(notebook_dir / "97_sleeps.ipynb", "import time\ntime.sleep(2.5)")
    try:
        ok, _ = run.run_notebook(notebook_dir / "97_sleeps.ipynb", "smoke", 0, heartbeat=0.5)
    finally:
        (REPO_ROOT / "build" / "smoke" / "97_sleeps.ipynb").unlink(missing_ok=True)
    beats = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  97: cell 3 of 3")]
    assert ok and len(beats) >= 2 and beats[0].endswith("import time")
