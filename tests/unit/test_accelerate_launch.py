"""Notebook 03's fine-tune under ``accelerate launch`` (issue 9 §1): ``python -m common.hoc.finetune`` on 2 CPU
processes (gloo DDP) writes exactly the adapter a one-process run with the same effective batch writes, under
the cache key the notebook looks up, with MacDrop's masks dealt over the processes by micro-batch index.

The launch uses ``--multi_gpu`` (torchrun) with no GPU visible: accelerate's ``--cpu`` starts several
processes only through mpirun; on CPU the Trainer then runs DDP over gloo (``use_cpu``)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from argparse import Namespace
from dataclasses import replace

import pytest
import torch
from launcher import free_port, launch_env
from safetensors.torch import load_file

from common import REPO_ROOT
from common.core.env import cache_dir
from common.core.profiles import load_config
from common.hoc import finetune
from common.hoc.macdrop import Schedule, merge_histories, micro_index

KEY, ARM, SEED = "tiny-llama", "lora_macdrop", 1  # one of the smoke profile's notebook-03 runs
WORLD = 2


def _launch(cache, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(WORLD),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()),
           "-m", "common.hoc.finetune", "--profile", "smoke", "--model", KEY, "--arm", ARM, "--seed", str(SEED)]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=launch_env(cache), capture_output=True, text=True, timeout=timeout)


@pytest.mark.usefixtures("one_thread")
def test_two_process_launch_is_the_one_process_run(tmp_path, monkeypatch) -> None:
    """``accelerate launch --num_processes 2 -m common.hoc.finetune --profile smoke --model tiny-llama --arm
    lora_macdrop --seed 1`` (16 examples, batch 4, the profile's grad_accum 2 split into 1 per process, 2
    epochs):

    (a) exits 0 and leaves exactly one COMPLETE adapter in the cache (no ``.work``/``.tmp`` left: only the main
    process finalises, after a barrier), recording world size 2 and grad_accum 1 per process;
    (b) MacDrop's history has T = 4 steps with p_t = 0.8 (1 - t/T), 2 masks a step (one per process), drop
    rates within 0.1 of p_t, the two processes' masks different while p_t > 0;
    (c) the one-process run with the profile's settings (grad_accum 2: the same effective batch of 8) has the
    same cache key, so the notebook finds the launched adapter; the same 4 steps, the same masks in
    ``micro_index`` order (process r's micro-batch j is index 2j + r), the same p, drop rates, losses and
    adapter weights: the 2-process run is that run;
    (d) a one-process run with the per-process settings (grad_accum 1) takes WORLD x the optimizer steps
    (steps per epoch = n / (batch x grad_accum x processes), 16 divides evenly)."""
    out = _launch(tmp_path / "launch")
    assert out.returncode == 0, f"accelerate launch failed:\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    # (a)
    entries = sorted((tmp_path / "launch" / "finetune").iterdir())
    assert len(entries) == 1 and (entries[0] / "COMPLETE").exists(), entries
    launched = json.loads((entries[0] / "result.json").read_text())
    assert launched["world_size"] == WORLD and launched["settings"]["grad_accum"] == 1
    assert out.stdout.count("steps (") == 1  # the result line is printed by the main process only
    # (b)
    steps, hist = launched["steps"], launched["macdrop"]
    assert steps == 4 and [h["step"] for h in hist] == [1, 2, 3, 4]
    schedule = Schedule("step", 0.8)
    for h in hist:
        p = schedule.p(h["step"], steps)
        assert h["p"] == pytest.approx(p, abs=1e-12) and abs(h["drop_rate"] - p) < 0.1
        assert len(h["masks"]) == WORLD and (p == 0 or h["masks"][0] != h["masks"][1])

    # (c) the one-process run the notebook would make
    monkeypatch.setenv("REPRO_CACHE", str(tmp_path / "single"))
    cfg = load_config(finetune.NOTEBOOK, "smoke", 0)
    train, layer, channels = finetune.notebook_inputs(cfg, KEY)
    one = finetune.finetune(KEY, finetune.ARMS[ARM], SEED, cfg.settings, train, layer, channels)
    assert one.path.name == entries[0].name
    assert one.steps == steps
    assert [h["masks"] for h in one.macdrop] == [h["masks"] for h in hist]
    assert [h["p"] for h in one.macdrop] == [h["p"] for h in hist]
    assert [h["drop_rate"] for h in one.macdrop] == pytest.approx([h["drop_rate"] for h in hist], abs=1e-9)
    assert [e["loss"] for e in one.log] == pytest.approx([e["loss"] for e in launched["log"]], rel=1e-4)
    got, want = (load_file(p / "adapter_model.safetensors") for p in (entries[0], one.path))
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)
    # (d)
    per_process = finetune.finetune(KEY, finetune.ARMS[ARM], SEED, replace(cfg.settings, grad_accum=1), train,
                                    layer, channels)
    assert per_process.steps == WORLD * steps and per_process.path.name != entries[0].name


# ------------------------------------------------------------------------------------- pure helpers


def test_micro_index_deals_micro_batches_over_processes() -> None:
    """Process r's j-th micro-batch is index j N + r: the N x g indices of a step are 0..N g - 1, once each."""
    assert [micro_index(j, r, 2) for j in range(3) for r in range(2)] == [0, 1, 2, 3, 4, 5]
    assert micro_index(3) == 3
    with pytest.raises(ValueError, match="outside"):
        micro_index(0, 2, 2)


def test_merge_histories_interleaves_masks_and_weights_drop_rates() -> None:
    r0 = [{"step": 1, "p": 0.5, "drop_rate": 0.4, "masks": ["a0", "a1"]}]
    r1 = [{"step": 1, "p": 0.5, "drop_rate": 0.6, "masks": ["b0", "b1"]}]
    assert merge_histories([r0]) is r0
    (m,) = merge_histories([r0, r1])
    assert m["masks"] == ["a0", "b0", "a1", "b1"] and m["drop_rate"] == pytest.approx(0.5) and m["p"] == 0.5
    with pytest.raises(RuntimeError, match="disagree"):
        merge_histories([r0, [dict(r1[0], p=0.4)]])
    with pytest.raises(RuntimeError, match="numbers"):
        merge_histories([r0, []])


def test_per_process_grad_accum_splits_the_profiles_and_warns_on_another_batch() -> None:
    """The CLI's default splits the profile's grad_accum over the processes (the paper's 32 -> 4 on 8 GPUs,
    the notebook's effective batch and cache key); one that does not split is refused with the fix; an explicit
    other value warns that the notebook will not find the adapter."""
    paper = load_config(finetune.NOTEBOOK, "paper").settings
    assert paper.grad_accum == 32 and finetune._per_process(paper, 8, None).grad_accum == 4
    assert finetune._per_process(paper, 1, None) == paper
    with pytest.raises(SystemExit, match="--grad-accum"):
        finetune._per_process(paper, 3, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert finetune._per_process(paper, 8, 4).grad_accum == 4
    with pytest.warns(UserWarning, match="not find"):
        finetune._per_process(paper, 8, 8)


def test_cache_key_is_the_one_process_equivalent() -> None:
    """N processes x grad_accum g has the key of one process x grad_accum N g, and only that one."""
    s = finetune.TrainSettings(grad_accum=4)
    train = [{"input_ids": [1, 2], "labels": [1, 2]}]
    key = finetune._cache_key(KEY, finetune.ARMS[ARM], 0, s, train, 1, [3], world=8)
    assert key == finetune._cache_key(KEY, finetune.ARMS[ARM], 0, replace(s, grad_accum=32), train, 1, [3])
    assert key != finetune._cache_key(KEY, finetune.ARMS[ARM], 0, s, train, 1, [3])


def test_cli_selects_the_profiles_runs() -> None:
    """--model/--arm/--seed filter the profile's runs; nothing chosen or nothing matching is refused, listing
    the runs; an unknown arm lists the known ones; --grid picks the grid model, arms and settings."""
    cfg = load_config(finetune.NOTEBOOK, "paper")

    def pick(**kw):
        return finetune._selected(cfg, Namespace(**{"model": None, "arm": None, "seed": None, "all": False,
                                                    "grid": False, **kw}))

    runs, _, settings = pick(model="llama-3-8b", arm="lora_macdrop", seed=42)
    assert runs == [("llama-3-8b", "lora_macdrop", 42)] and settings == cfg.settings
    assert len(pick(all=True)[0]) == 8 and {r[0] for r in pick(arm="dora")[0]} == {"llama-3-8b", "mistral-7b"}
    with pytest.raises(SystemExit, match="--all"):
        pick()
    with pytest.raises(SystemExit, match="no run"):
        pick(model="mistral-7b", seed=7)
    with pytest.raises(SystemExit, match="unknown arm"), pytest.warns(UserWarning, match="not one of"):
        pick(model="llama-3-8b", arm="bogus", seed=42)
    grid, arms, gs = pick(grid=True, all=True)
    assert gs == cfg.grid_settings and {r[0] for r in grid} == {cfg.grid_model} and "lora" in arms
    assert cache_dir().name == "cache"  # nothing above touched the cache
