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
