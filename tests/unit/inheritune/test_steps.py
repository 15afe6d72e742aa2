"""``common.inheritune.steps``: the training length chosen so that the reference clearly beats a fresh half-depth
model (planted gaps found, and not found without them), the runs it trains reused by ``run_experiment``, and the
records."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from common.core import data
from common.core.profiles import GPTConfig, PretrainSettings
from common.inheritune import steps, training


class _Fake:
    """Stands in for a trained run in choose_steps: its depth and steps; load() returns itself."""

    def __init__(self, n_layer: int, steps: int) -> None:
        self.n_layer, self.steps = n_layer, steps

    def load(self):
        return self


def _plant_gaps(monkeypatch: pytest.MonkeyPatch, gaps: dict[int, float]) -> None:
    """choose_steps sees a fresh half-depth model worse than the reference by gaps[S] nats (+ seeded noise)."""
    monkeypatch.setattr(training, "reference_run", lambda cfg, s, *a, **k: _Fake(cfg.n_layer, s.steps))
    monkeypatch.setattr(training, "half_depth_run", lambda name, cfg, s, *a, **k: _Fake(cfg.n_layer // 2, s.steps))
    noise = torch.Generator().manual_seed(0)

    def losses(run, windows):
        base = torch.full((len(windows),), 2.0, dtype=torch.float64) + 0.01 * torch.randn(len(windows), generator=noise,
                                                                                            dtype=torch.float64)
        return base + (gaps[run.steps] if run.n_layer < 8 else 0.0)

    monkeypatch.setattr(training, "window_losses", losses)


def test_choose_steps_stops_at_the_first_separated_length(monkeypatch: pytest.MonkeyPatch) -> None:
    """Planted: the gap opens at S = 8 (0.1 nats, margin 0.05): S = 8, separated, two trials. Without the gap: the
    last S of the schedule, not separated, every S tried. A schedule that is not increasing is refused."""
    cfg, s = GPTConfig(n_layer=8), PretrainSettings(steps=4)
    args = (torch.zeros(10), torch.zeros(4, 5), torch.zeros(32, 5))
    _plant_gaps(monkeypatch, {4: 0.0, 8: 0.1, 16: 0.2})
    choice = steps.choose_steps(cfg, s, *args, schedule=(4, 8, 16), margin=0.05)
    assert (choice.steps, choice.separated) == (8, True)
    assert [t["steps"] for t in choice.trials] == [4, 8] and choice.trials[1]["ci95"][0] > 0.05
    assert choice.trials[0]["ci95"][0] < 0.05 < choice.trials[1]["value"]
    _plant_gaps(monkeypatch, {4: 0.0, 8: 0.0, 16: 0.0})
    choice = steps.choose_steps(cfg, s, *args, schedule=(4, 8, 16), margin=0.05)
    assert (choice.steps, choice.separated) == (16, False) and len(choice.trials) == 3
    for bad in ((), (8, 4), (4, 4), (0, 4)):
        with pytest.raises(ValueError, match="increasing"):
            steps.choose_steps(cfg, s, *args, schedule=bad, margin=0.05)


def test_choose_steps_runs_are_the_experiments_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference and the fresh half-depth model that choose_steps trains at the chosen S are read from the cache
    by run_experiment at that S: it trains only the other variants."""
    ref_cfg = GPTConfig(n_layer=4, n_head=2, n_embd=16, block_size=16)
    s = PretrainSettings(steps=6, batch_size=4, lr=3e-3, warmup=2, eval_interval=3, n_val=4)
    stream = data.token_stream("synthetic", "train", "byte")
    heldout = data.token_stream("synthetic", "heldout", "byte")
    val, select = training.val_windows(heldout, 4, 16), training.val_windows(heldout, 4, 16, shift=True)
    choice = steps.choose_steps(ref_cfg, s, stream, val, select, schedule=(3, 6), margin=-10.0)
    assert (choice.steps, choice.separated) == (3, True)  # any difference clears a margin of -10
    calls, real = [], training.train_batch
    monkeypatch.setattr(training, "train_batch", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    exp = training.run_experiment(ref_cfg, replace(s, steps=3), stream, val, variants=("random", "inherit_first"))
    assert len(calls) == 3  # inherit_first only: the reference and random came from the cache
    assert exp.reference.steps == exp.variants["random"].steps == 3
    assert exp.reference.n_layer == 4 and exp.variants["random"].n_layer == 2  # half_depth_run: half the depth


def test_settle_steps_applies_and_records_the_choice(monkeypatch: pytest.MonkeyPatch, records) -> None:
    """With a schedule: the recipe at the chosen S, and the choice recorded; without one: the recipe untouched."""
    _plant_gaps(monkeypatch, {4: 0.0, 8: 0.1, 16: 0.2})
    cfg = SimpleNamespace(steps_schedule=(4, 8, 16), steps_margin=0.05, reference=GPTConfig(n_layer=8), seed=0)
    s, val = PretrainSettings(steps=4), torch.zeros(32, 129)
    settled, choice = steps.settle_steps(cfg, s, torch.zeros(10), torch.arange(9000), val, "gpt-byte")
    assert settled == replace(s, steps=8) and choice.steps == 8 and choice.separated
    assert records()["gpt-byte/inheritune/steps"]["value"] == 8
    unscheduled = SimpleNamespace(**{**vars(cfg), "steps_schedule": ()})
    assert steps.settle_steps(unscheduled, s, torch.zeros(10), torch.arange(9000), val, "x/y") == (s, None)


def test_record_step_choice(records) -> None:
    choice = steps.StepChoice(1200, True, [{"steps": 600, "value": 0.0, "ci95": [-0.01, 0.01], "n": 8},
                                              {"steps": 1200, "value": 0.05, "ci95": [0.03, 0.07], "n": 8}])
    steps.record_step_choice("gpt-byte", choice, 0.02)
    got = {k: r["value"] for k, r in records().items()}
    assert got["gpt-byte/inheritune/steps"] == 1200 and got["gpt-byte/inheritune/steps/separated"] is True
    assert [t["steps"] for t in got["gpt-byte/inheritune/steps/trials"]] == [600, 1200]
