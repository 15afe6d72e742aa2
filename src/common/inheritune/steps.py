"""How long notebook 04 trains (issue 20): Inheritune's "matches the reference" (Table 5) says something only where
the reference is clearly better than a fresh half-depth model trained for as many steps. ``choose_steps`` trains
both for each length of a schedule fixed before the run and keeps the first length at which the gap is clear on
selection windows disjoint from the ones the claims read; ``settle_steps`` applies it to a notebook's recipe."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from common.core import intervals, progress
from common.core.manifest import record
from common.core.profiles import GPTConfig, PretrainSettings
from common.inheritune import training


@dataclass
class StepChoice:
    """The training length ``choose_steps`` chose, whether the reference beat a fresh half-depth model by the
    margin there, and every length tried: ``{"steps", "value", "ci95", "n"}`` (random - reference loss on the
    selection windows, nats per token, 95% paired bootstrap over them)."""
    steps: int
    separated: bool
    trials: list[dict]


def choose_steps(ref_cfg: GPTConfig, s: PretrainSettings, stream: torch.Tensor, val: torch.Tensor,
                 select: torch.Tensor, schedule: Sequence[int], margin: float, seed: int = 0) -> StepChoice:
    """The training length S of Inheritune's comparison (issue 20; Table 5's premise): "matches the reference" says
    something only where the reference is clearly better than a fresh half-depth model trained for the same steps.
    For S in ``schedule`` (increasing), train both (seed ``seed``) and stop at the first S where the 95% paired
    bootstrap interval of random - reference over the ``select`` windows (``val_windows(..., shift=True)``:
    disjoint from ``val``, which the claims read) lies above ``margin``; otherwise the last S, ``separated``
    False. Both runs are cached under the same keys ``run_experiment`` uses, so the chosen S's are reused."""
    schedule = [int(x) for x in schedule]
    if not schedule or schedule != sorted(set(schedule)) or schedule[0] < 1:
        raise ValueError(f"schedule must be increasing positive step counts, got {list(schedule)}")
    data_id = {"train": training.data_digest(stream), "val": training.data_digest(val)}
    trials = []
    for steps in schedule:
        at = replace(s, steps=steps)
        ref = training.reference_run(ref_cfg, at, stream, val, seed, data_id)
        fresh = training.half_depth_run("random", ref_cfg, at, stream, val, seed, steps, data_id)
        diff = intervals.paired_difference(training.window_losses(fresh.load(), select).numpy(),
                                           training.window_losses(ref.load(), select).numpy())
        trials.append({"steps": steps, "value": diff["value"], "ci95": diff["ci95"], "n": diff["n"]})
        progress.report("Inheritune step-length trials", len(trials), len(schedule),
                        f"S = {steps}: random - reference {diff['value']:+.4f} {diff['ci95']}")
        if diff["ci95"][0] > margin:
            return StepChoice(steps, True, trials)
    return StepChoice(schedule[-1], False, trials)


def record_step_choice(key: str, choice: StepChoice, margin: float) -> None:
    """``<key>/inheritune/steps`` (the chosen S), ``.../steps/separated`` and ``.../steps/trials``."""
    record(f"{key}/inheritune/steps", choice.steps,
           note=f"training steps S of every run, chosen by choose_steps from {[t['steps'] for t in choice.trials]}: "
                f"the first S whose random - reference 95% interval on the selection windows lies above {margin}")
    record(f"{key}/inheritune/steps/separated", choice.separated,
           note="whether the reference beat a fresh half-depth model by the margin at the chosen S (else the "
                "last S of the schedule)")
    record(f"{key}/inheritune/steps/trials", choice.trials,
           note="per S tried: random - reference validation loss on the selection windows (disjoint from the "
                "claims' windows), nats per token, 95% paired bootstrap")


def settle_steps(cfg, s: PretrainSettings, stream: torch.Tensor, heldout: torch.Tensor, val: torch.Tensor,
                 key: str) -> tuple[PretrainSettings, StepChoice | None]:
    """Notebook 04's recipe ``s`` with S chosen by ``choose_steps`` over ``cfg.steps_schedule`` (``cfg``: its
    InherituneConfig; selection windows ``training.val_windows(heldout, ..., shift=True)``), recorded under ``key``; ``s``
    unchanged and None when the profile has no schedule."""
    if not cfg.steps_schedule:
        return s, None
    select = training.val_windows(heldout, len(val), cfg.reference.block_size, shift=True)
    choice = choose_steps(cfg.reference, s, stream, val, select, cfg.steps_schedule, cfg.steps_margin, cfg.seed)
    record_step_choice(key, choice, cfg.steps_margin)
    return replace(s, steps=choice.steps), choice
