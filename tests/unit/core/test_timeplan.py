"""``common.core.timeplan``: the FLOP counts by hand (PaLM's 2N + 4LdT a forward token, three for training), the
hours at the stated MFU on one GPU and on N, the paper profile's jobs and tiers, and the estimate a long run prints."""

from __future__ import annotations

from dataclasses import replace

import pytest

from common.core import models, timeplan
from common.core.gpu import Shape
from common.core.profiles import PROFILES, GPTConfig, load_config, notebook_models
from common.core.timeplan import DAY, LONG, Job
from common.hoc import finetune

GPT2_MEDIUM = Shape.from_config(GPTConfig(n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50304))


def test_forward_flops_of_gpt2_medium_by_hand() -> None:
    """24 layers of 12 d^2 matmul weights (4 d^2 attention, 8 d^2 MLP) and the 50,304 x 1,024 head; attention adds
    4 L d T: at T = 1024, 2 x 353.5M + 100.7M = 807.7M FLOPs a token (nanoGPT's count)."""
    n = 24 * 12 * 1024 ** 2 + 50304 * 1024
    assert timeplan.matmul_params(GPT2_MEDIUM) == n
    assert timeplan.forward_flops(GPT2_MEDIUM, 1024) == 2 * n + 4 * 24 * 1024 * 1024
    assert timeplan.forward_flops(GPT2_MEDIUM, 1) < timeplan.forward_flops(GPT2_MEDIUM, 1024)
    with pytest.raises(ValueError, match="seq"):
        timeplan.forward_flops(GPT2_MEDIUM, 0)


def test_hours_at_the_stated_mfu_on_one_gpu_and_on_n() -> None:
    """A job of exactly one hour at its MFU on one H100 takes 1 h there, 1 / (8 x 0.9) h on 8 when it is a long
    run, still 1 h on 8 when it is day-tier work (one process), and 989 / 312 h on one A100."""
    flops = timeplan.PEAK["h100"] * timeplan.MFU["train"] * 3600
    long, day = Job("nb", "x", "m", flops, "train", LONG), Job("nb", "x", "m", flops, "train", DAY)
    assert long.hours("h100") == pytest.approx(1.0)
    assert long.hours("h100", 8) == pytest.approx(1 / (8 * timeplan.DP_EFFICIENCY))
    assert day.hours("h100", 8) == pytest.approx(1.0)
    assert long.hours("a100") == pytest.approx(989 / 312)
    with pytest.raises(ValueError, match="unknown GPU 'v100'; known: h100, h200, a100"):
        long.hours("v100")
    with pytest.raises(ValueError, match="n_gpus=0"):
        long.hours("h100", 0)


def test_task_tokens_are_requests_times_their_mean_length() -> None:
    """ARC-Easy: 2,376 docs x 4 choices x 45 tokens; 10 BoolQ docs: 10 x 2 x 170."""
    assert timeplan.task_tokens(("arc_easy",), None) == 2376 * 4 * 45
    assert timeplan.task_tokens(("arc_easy", "boolq"), {"arc_easy": 0, "boolq": 10}) == 10 * 2 * 170


def test_paper_pretraining_is_the_recipe_by_hand() -> None:
    """The paper's GPT-2-medium recipe: 100K steps of 12 x 32 x 1024 tokens; the reference at 3 forward passes a
    token is 9.5e19 FLOPs (issue 21), and with four half-depth runs at S, random_2x at 2S and the growth rounds
    of 14 and 16 layers the whole pre-training is about 5.7 references: a long run, launched by torchrun."""
    cfg = load_config("04_attention_degeneration_inheritune", "paper")
    tokens = 100_000 * 12 * 32 * 1024

    def run(layers: int) -> float:
        return 3 * tokens * timeplan.forward_flops(replace(GPT2_MEDIUM, layers=layers), 1024)

    job = timeplan.pretraining(cfg)
    assert run(24) == pytest.approx(9.5e19, rel=0.01)
    assert job.flops == pytest.approx(run(24) + 6 * run(12) + run(14) + run(16), rel=1e-12)
    assert 5.5 < job.flops / run(24) < 6.0
    assert job.tier == LONG and job.kind == "train" and "torchrun" in job.launch and "--profile paper" in job.launch
    assert "growth [14, 16]" in job.name
    assert job.command(8) == "torchrun --standalone --nproc_per_node 8 -m common.inheritune.pretrain --profile paper"


def test_pretraining_is_day_work_where_the_notebook_trains() -> None:
    """``small`` trains in the notebook: its pre-training is day-tier work; the paper's is a long run."""
    for profile, tier in (("small", DAY), ("paper", LONG)):
        cfg = load_config("04_attention_degeneration_inheritune", profile)
        jobs = timeplan.jobs_inheritune(cfg, {k: GPT2_MEDIUM for k in cfg.models})
        assert [j.tier for j in jobs if j.model == "gpt"] == [tier]
        assert all(j.tier == DAY for j in jobs if j.model != "gpt")


def test_paper_finetunes_main_arms_in_the_day_and_the_grid_as_a_long_run() -> None:
    """Notebook 03 on the paper profile: 8 main fine-tunes (2 models x 4 arms x seed 42) of 52,002 examples x 300
    tokens x 3 epochs, 3 forward passes a token, in the day tier; the grid of 4 kinds x 4 p0s + 3 scopes x 6 ps =
    34 fine-tunes (the scopes are hoc.finetune's) a long run; the profile does not run the grid in the notebook."""
    cfg = load_config("03_macdrop_finetuning", "paper")
    assert timeplan.GRID_SCOPES == len(finetune.SCOPES) and not cfg.full_grid
    shapes = {k: GPT2_MEDIUM for k in ("llama-3-8b", "mistral-7b")}
    jobs = timeplan.jobs_finetune(cfg, shapes)
    tunes = [j for j in jobs if j.kind == "finetune" and j.tier == DAY]
    assert len(tunes) == 8 and all("accelerate launch" in j.launch for j in tunes)
    per_token = 3 * timeplan.forward_flops(GPT2_MEDIUM, 300)
    assert tunes[0].flops == pytest.approx(52_002 * 300 * 3 * per_token)
    (grid,) = [j for j in jobs if j.kind == "finetune" and j.tier == LONG]
    assert grid.flops == pytest.approx(34 * tunes[0].flops) and "34 fine-tunes" in grid.name and "--grid" in grid.launch


def test_every_paper_notebook_has_jobs_and_an_unknown_one_is_refused() -> None:
    for notebook in PROFILES["paper"]:
        cfg = load_config(notebook, "paper")
        jobs = timeplan.notebook_jobs(cfg, models.shapes(notebook_models(cfg)))
        assert jobs and all(j.flops > 0 and j.notebook == notebook for j in jobs)
    with pytest.raises(ValueError, match="no time planner for notebook '07_x'"):
        timeplan.notebook_jobs(replace(cfg, notebook="07_x"), {})


def test_estimate_names_the_hardware_and_the_hours() -> None:
    """The line a long run prints: its PFLOPs and the hours on the hardware given (detected: 1 H200 on CPU)."""
    flops = timeplan.PEAK["h100"] * timeplan.MFU["train"] * 3600 * 8 * timeplan.DP_EFFICIENCY
    job = Job("nb", "the run", "m", flops, "train", LONG)
    assert "about 1.0 h on 8 H100 at 40% MFU" in timeplan.estimate(job, "h100", 8)
    assert timeplan.detected() == ("h200", 1)  # no CUDA here
    assert "on 1 H200" in timeplan.estimate(job)
