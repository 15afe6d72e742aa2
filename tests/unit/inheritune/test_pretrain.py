"""``common.inheritune.pretrain`` (issue 21): notebook 04's runs trained under ``torchrun`` on 2 CPU processes (gloo
DDP) are the one-process runs: the same cache keys (the notebook finds them), losses equal to float rounding; a
launch killed mid-run resumes from its last checkpoint; a process count that cannot share the global batch is
refused before any work; the notebook's inputs; a profile that leaves training to the launcher reads only cached
runs."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from launcher import free_port, launch_env

from common import REPO_ROOT
from common.core import data
from common.core.profiles import load_config
from common.inheritune import pretrain, training

WORLD = 2
WORKER = Path(__file__).with_name("ddp_worker.py")
pytestmark = pytest.mark.usefixtures("one_thread")


def _torchrun(cache: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(WORLD),
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", *args]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=launch_env(cache), capture_output=True, text=True, timeout=timeout)


def _runs(cache: Path) -> dict[str, dict]:
    return {p.name: json.loads((p / "run.json").read_text()) for p in sorted((cache / "inheritune").iterdir())}


def test_two_process_launch_is_the_one_process_run(tmp_path, monkeypatch) -> None:
    """``torchrun --nproc_per_node 2 -m common.inheritune.pretrain --profile smoke`` (global batch 8 windows: 4 per
    process) trains the step-length trials and the experiment; the one-process command (what the notebook runs)
    leaves the same cache entries, so the notebook finds the launched runs; every run's per-window losses and
    validation curve agree to 1e-4 nats (float rounding of the all-reduce); no ``.work`` or temporary directory is
    left, and only process 0 prints."""
    out = _torchrun(tmp_path / "launch", "-m", "common.inheritune.pretrain", "--profile", "smoke")
    assert out.returncode == 0, f"torchrun failed:\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    assert out.stdout.count("seed 0: reference") == 1 and "2 process(es)" in out.stdout
    monkeypatch.setenv("REPRO_CACHE", str(tmp_path / "one"))
    pretrain.main(["--profile", "smoke"])
    launched, one = _runs(tmp_path / "launch"), _runs(tmp_path / "one")
    assert len(one) >= 7 and launched.keys() == one.keys()  # 5 variants, reference, the S trials
    assert all(r["name"] == one[k]["name"] and r["steps"] == one[k]["steps"] for k, r in launched.items())
    for k, r in launched.items():
        assert r["window_losses"] == pytest.approx(one[k]["window_losses"], abs=1e-4)
        assert [c[1] for c in r["curve"]] == pytest.approx([c[1] for c in one[k]["curve"]], abs=1e-4)
    assert all((tmp_path / "launch" / "inheritune" / k / "COMPLETE").exists() for k in launched)


def test_a_killed_launch_resumes_from_its_last_checkpoint(tmp_path, monkeypatch) -> None:
    """Process 0 of a 2-process launch is SIGKILLed when it logs step 6 of 12 (checkpoints every 4 steps): the
    launch fails, leaving the step-4 checkpoint and no finished run. The same launch again starts from step 4
    (its first log line is step 6, the step-2 and step-4 ones are not repeated) and finishes the run that one
    uninterrupted process trains, to float rounding."""
    cache = tmp_path / "launch"
    killed = _torchrun(cache, str(WORKER), "6")
    assert killed.returncode != 0 and "step 6/12" in killed.stdout and "step 8/12" not in killed.stdout
    (work,) = (cache / "inheritune").iterdir()
    assert work.name.endswith(".work") and torch.load(work / "ckpt.pt", weights_only=True)["step"] == 4
    resumed = _torchrun(cache, str(WORKER))
    assert resumed.returncode == 0, f"resume failed:\n{resumed.stdout[-3000:]}\n{resumed.stderr[-6000:]}"
    logged = [int(line.split()[2].split("/")[0]) for line in resumed.stdout.splitlines() if line.startswith("tiny:")]
    assert logged == [6, 8, 10, 12]
    (launched,) = _runs(cache).values()
    monkeypatch.setenv("REPRO_CACHE", str(tmp_path / "one"))
    sys.path.insert(0, str(WORKER.parent))
    try:
        import ddp_worker
    finally:
        sys.path.remove(str(WORKER.parent))
    one = ddp_worker.run()
    assert launched["window_losses"] == pytest.approx(one.window_losses, abs=1e-4)
    assert [c[0] for c in launched["curve"]] == [c[0] for c in one.curve] == [0, 2, 4, 6, 8, 10, 12]
    assert [c[1] for c in launched["curve"]] == pytest.approx([c[1] for c in one.curve], abs=1e-4)


def test_a_process_count_that_cannot_share_the_batch_is_refused_before_any_work(monkeypatch) -> None:
    """The smoke recipe's 8 windows a step cannot be shared by 3 processes: refused, naming 1, 2, 4, 8, before the
    corpus is read."""
    monkeypatch.setattr(training, "process", lambda: (0, 3))
    monkeypatch.setattr(pretrain, "inputs", lambda cfg: pytest.fail("the corpus was read before the check"))
    with pytest.raises(ValueError, match=r"3 processes .* divides 8: 1, 2, 4, 8"):
        pretrain.main(["--profile", "smoke"])


def test_inputs_are_the_notebooks_streams_and_windows() -> None:
    """The smoke profile's byte streams of the synthetic corpus, and n_val fixed windows of the held-out stream;
    the reference's manifest key follows the tokenizer."""
    cfg = load_config(pretrain.NOTEBOOK, "smoke")
    stream, heldout, val = pretrain.inputs(cfg)
    assert torch.equal(stream, data.token_stream("synthetic", "train", "byte")) and stream.dtype == torch.uint8
    assert torch.equal(heldout, data.token_stream("synthetic", "heldout", "byte"))
    assert not torch.equal(stream[:100], heldout[:100])
    assert torch.equal(val, training.val_windows(heldout, cfg.train.n_val, cfg.reference.block_size))
    assert pretrain.reference_key(cfg) == "gpt-byte"
    assert pretrain.reference_key(load_config(pretrain.NOTEBOOK, "paper")) == "gpt2-medium-ours"


def test_where_the_profile_leaves_training_to_the_launcher_only_cached_runs_are_read(tmp_path, monkeypatch,
                                                                                   capsys) -> None:
    """``train_in_notebook`` False (the paper profile): with an empty cache ``experiments`` trains nothing, returns
    None and prints the launch command and the planner's estimate; once the runs are in the cache (trained by the
    command: the notebook's runs) it returns them, reading only the cache."""
    monkeypatch.setenv("REPRO_CACHE", str(tmp_path))
    cfg = load_config(pretrain.NOTEBOOK, "smoke")
    stream, _, val = pretrain.inputs(cfg)
    launcher = replace(cfg, train_in_notebook=False)
    assert pretrain.experiments(launcher, cfg.train, stream, val) is None
    said = capsys.readouterr().out
    assert "is not in the cache" in said and "-m common.inheritune.pretrain --profile smoke" in said
    assert "time plan:" in said and not (tmp_path / "inheritune").exists()
    trained = pretrain.experiments(cfg, cfg.train, stream, val)
    monkeypatch.setattr(training, "step_batches", lambda *a, **k: pytest.fail("trained instead of reading the cache"))
    (read,) = pretrain.experiments(launcher, cfg.train, stream, val)
    assert {n: r.window_losses for n, r in read.runs.items()} == {n: r.window_losses for n, r in trained[0].runs.items()}
    assert [r.n_layer for r in read.growth.rounds] == [r.n_layer for r in trained[0].growth.rounds]


def test_your_own_model_trains_no_gpt(monkeypatch, capsys) -> None:
    """Notebook 04 on your own model (``n_seeds`` 0, no step schedule): no seeds, ``experiments`` trains nothing and
    returns None (the notebook's skip path), saying so."""
    monkeypatch.setenv("REPRO_MODEL", "/nowhere/mine")
    cfg = load_config(pretrain.NOTEBOOK, "smoke")
    monkeypatch.setattr(training, "step_batches", lambda *a, **k: pytest.fail("trained a GPT for your own model"))
    assert pretrain.notebook_seeds(cfg) == [] and not cfg.steps_schedule
    assert pretrain.experiments(cfg, cfg.train, torch.zeros(0, dtype=torch.uint8), torch.zeros(0, 32)) is None
    assert "self-trained GPTs are skipped" in capsys.readouterr().out
