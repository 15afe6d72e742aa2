"""The papermill driver: a failing notebook keeps its executed copy with the traceback, the others still
run, and the exit status is non-zero; your own model (``--model``) is checked before any work, runs notebooks 01, 02,
04 and 05 only, writes under figures/user/ and build/user/, publishes nothing, and works end to end offline."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import nbformat
import pytest
from user_models import save_tiny_llama, using

import common.run
from common import REPO_ROOT
from common.core import progress, user_model
from common.reporting import executed, run


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


def test_heartbeat_adds_the_running_cells_library_progress(tmp_path, monkeypatch):
    """The library's latest progress line (``common.core.progress``, written to ``progress_file``) follows the cell
    it was written in; a line from before the running cell started is an earlier cell's, and is left out."""
    monkeypatch.delenv(progress.QUIET_VAR, raising=False)  # make test-unit runs quiet
    path = tmp_path / "out.ipynb"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "decompose()", metadata={"papermill": {"status": "running", "start_time": "2026-01-01T00:00:00.000000Z"}})])
    nbformat.write(nb, path)
    assert run.where(path, 1.0) == "cell 1 of 1, 0:01 elapsed: decompose()"
    monkeypatch.setenv(progress.FILE_VAR, str(run.progress_file(path)))
    progress.report("SFSD decomposition (layers)", 1, 30)
    assert run.where(path, 1.0) == "cell 1 of 1, 0:01 elapsed: decompose() | SFSD decomposition (layers): 1/30"
    nb.cells[0].metadata["papermill"]["start_time"] = "2999-01-01T00:00:00Z"
    nbformat.write(nb, path)
    assert run.where(path, 1.0) == "cell 1 of 1, 0:01 elapsed: decompose()"


def test_on_a_terminal_only_new_loop_lines_are_written_above_the_bar(tmp_path, monkeypatch, capsys):
    """With papermill's bar on a terminal the heartbeat prints no cell lines, only each new library progress line,
    once, through ``tqdm.write`` (which keeps the bar intact)."""
    import tqdm

    monkeypatch.delenv(progress.QUIET_VAR, raising=False)
    path = tmp_path / "out.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "search()", metadata={"papermill": {"status": "running", "start_time": "2026-01-01T00:00:00Z"}})]), path)
    written = []
    monkeypatch.setattr(tqdm.tqdm, "write", staticmethod(lambda line, *a, **k: written.append(line)))
    monkeypatch.setenv(progress.FILE_VAR, str(run.progress_file(path)))
    beat = run.Heartbeat(path, "05", every=0.05, tty=True)
    beat.start()
    progress.report("SFSD feature search (modules)", 1, 9)
    time.sleep(0.4)
    beat.done.set()
    beat.join()
    assert written == ["  05: SFSD feature search (modules): 1/9"] and capsys.readouterr().out == ""


def test_heartbeats_carry_the_kernels_loop_progress(notebook_dir, capsys, monkeypatch):
    """End to end: a cell whose loop reports through ``common.core.progress`` in the kernel shows its latest line in
    the runner's heartbeats, and nothing of it lands in the executed notebook."""
    monkeypatch.delenv(progress.QUIET_VAR, raising=False)
    _notebook(notebook_dir / "96_loops.ipynb", "import time\nfrom common.core import progress\n"
              "for i in progress.each('loop', range(5)):\n    time.sleep(0.6)")
    out = REPO_ROOT / "build" / "smoke" / "96_loops.ipynb"
    try:
        ok, _ = run.run_notebook(notebook_dir / "96_loops.ipynb", "smoke", 0, heartbeat=0.5)
        executed = out.read_text()
    finally:
        out.unlink(missing_ok=True)
        run.progress_file(out).unlink(missing_ok=True)
    beats = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  96: cell 3 of 3")]
    assert ok and any(" | loop: " in line for line in beats) and "loop: " not in executed


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


# ------------------------------------------------------------------------------------------ your own model


def _forget(key: str) -> None:
    """Remove what a run of your own model ``key`` wrote into the repository (git-ignored folders)."""
    for root in ("figures", "build"):
        user = REPO_ROOT / root / "user"
        shutil.rmtree(user / key.removeprefix(user_model.PREFIX), ignore_errors=True)
        if user.is_dir() and not any(user.iterdir()):
            user.rmdir()


def test_common_run_is_the_same_command() -> None:
    assert common.run.main is run.main


def test_your_own_model_is_refused_before_any_work(tmp_path, monkeypatch):
    """03 / 06 are refused with why (before the model is even looked at); --bos needs --model; a bad model exits
    with its check's message; papermill never starts."""
    monkeypatch.setattr(run, "run_notebook", lambda *a, **k: pytest.fail("a notebook ran"))
    with pytest.raises(SystemExit, match="03 fine-tunes"):
        run.main(["03", "--model", str(tmp_path / "not-there")])
    with pytest.raises(SystemExit, match="--bos goes with --model"):
        run.main(["01", "--bos", "yes"])
    with using(monkeypatch, "unset"), pytest.raises(SystemExit, match=rf"--model {tmp_path}: .*no config.json"):
        run.main(["--model", str(tmp_path), "--profile", "smoke"])


def test_your_own_models_run_writes_under_user_and_publishes_nothing(notebook_dir, tmp_path, monkeypatch, capsys):
    """On a committed profile the run of your own model goes to build/user/<slug>/<profile>/ and is not published;
    the model's check is printed first."""
    tiny = save_tiny_llama(tmp_path / "tiny-run-test")
    monkeypatch.setattr(executed, "publish", lambda *a: pytest.fail("published a run of your own model"))
    with using(monkeypatch, "unset"):
        try:
            assert run.main(["99", "--model", str(tiny), "--profile", "small"]) == 0
            out = REPO_ROOT / "build" / "user" / "tiny-run-test" / "small" / "99_works.ipynb"
            assert run.executed_copy(notebook_dir / "99_works.ipynb", "small") == out
            assert "profile small" in json.dumps(json.loads(out.read_text()))
            nb01 = run.NOTEBOOK_DIR / "01_massive_activation_origin.ipynb"  # the planted folder has no 01
            assert run._manifest(nb01, "small") == (user_model.out_root("user-tiny-run-test", "small") / nb01.stem
                                                    / "manifest.json")
        finally:
            _forget("user-tiny-run-test")
    said = capsys.readouterr().out
    assert said.startswith("your own model user-tiny-run-test: llama from") and "BOS prepended (detected)" in said


def test_your_own_model_end_to_end_offline(tmp_path):
    """A tiny Llama with a planted massive weight, saved with save_pretrained, through notebook 01 on smoke in a
    fresh process, offline: its manifest lands under figures/user/<slug>/smoke/, records the weights' sha256 and
    finds the planted layer."""
    tiny = save_tiny_llama(tmp_path / f"tiny-e2e-{os.getpid()}")
    key = user_model.key_for(str(tiny))
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPRO_")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", REPRO_CACHE=str(tmp_path / "cache"), TQDM_DISABLE="1",
               TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    try:
        done = subprocess.run([sys.executable, "-m", "common.reporting.run", "01", "--model", str(tiny), "--profile",
                               "smoke"], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        path = user_model.out_root(key, "smoke") / "01_massive_activation_origin" / "manifest.json"
        m = json.loads(path.read_text())
    finally:
        _forget(key)
    sha = hashlib.sha256((tiny / "model.safetensors").read_bytes()).hexdigest()
    assert m["profile"] == "smoke" and m["run"]["models"] == {key: f"sha256:{sha}"}
    assert m["run"]["user_model"]["sha256"] == sha and m["run"]["user_model"]["prepend_bos"]
    records = {r["key"]: r["value"] for r in m["records"]}
    assert records[f"{key}/massive_layer"] == 1 and records[f"{key}/massive_channels"][0] == 37
