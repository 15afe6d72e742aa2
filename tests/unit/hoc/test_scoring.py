"""common.hoc.scoring's notebook-03 records on planted per-seed results (Tables 3-5)."""

from __future__ import annotations

import pandas as pd
import pytest

from common.hoc import finetune, paper, scoring


def _result(loss: float, acc: float) -> dict:
    return {"loss": loss, "acc": {"acc": acc, "ci95": [acc - 0.1, acc + 0.1]}, "loss_zero": loss + 1.0,
            "loss_zero_merged": loss + 1.0, "acc_zero": {"acc": acc - 0.2, "ci95": None}}


@pytest.fixture
def planted():
    results = {("m", arm, seed): _result(2.0 - 0.1 * ("macdrop" in arm) + 0.01 * seed, 0.5 + 0.01 * seed)
               for arm in ("lora", "lora_macdrop") for seed in (0, 1)}
    return scoring.runs_frame(results), {"m": _result(3.0, 0.4)}


def test_record_pretrained(records) -> None:
    scoring.record_pretrained("m", {"loss": 3.0, "loss_zero": 4.0, "acc": None}, 3)
    recs = records()
    assert recs["m/macdrop/pretrained/loss_zero_top3"]["value"] == 4.0 and "m/macdrop/pretrained/acc" not in recs


def test_record_tables34_and_effects_frame(planted, records) -> None:
    frame, base = planted
    effects = scoring.record_tables34(frame, base, [("m", ("lora", "lora_macdrop"), (0, 1))], 3)
    assert set(effects) == {("m", "lora")}
    recs = records()
    assert recs["m/macdrop/lora_macdrop/loss"]["value"] == pytest.approx(1.905)
    assert recs["m/macdrop/lora/acc"]["paper_value"] == paper.TABLE34["lora"]["acc"]
    assert recs["m/macdrop/dora/acc_zero_top3"]["value"] is None  # arm not run: null with the paper value
    assert recs["m/macdrop/pretrained/acc"]["ci95"] == pytest.approx([0.3, 0.5])
    assert recs["m/macdrop/effect/lora/loss_gain"]["value"] == pytest.approx(0.1)
    table = scoring.effects_frame(effects)
    assert table.loc[("m", "lora", "loss_gain"), "seeds"] == 2


def test_record_grid(records) -> None:
    grid = pd.DataFrame([{"arm": "lora_step_p1", "loss": 1.5}]).set_index("arm")
    scoring.record_grid("m", grid, {"loss": 2.0}, 10)
    recs = records()
    assert recs["m/macdrop/grid/lora_step_p1/loss_gain"]["value"] == 0.5
    assert recs["m/macdrop/grid/exp_alpha"]["value"] == finetune.Schedule("exp").alpha_for(10)
    assert recs["m/macdrop/grid/exp_alpha"]["note"] == "0.01 x 579 / T, T = 10"
