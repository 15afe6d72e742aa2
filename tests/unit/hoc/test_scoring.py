"""common.hoc.scoring's notebook-03 records on planted per-seed results (Tables 3-5)."""

from __future__ import annotations

from dataclasses import replace

import pandas as pd
import pytest

from common.core import data, evaluation, models
from common.core.profiles import load_config
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


def test_shard_jobs_split_every_job_once() -> None:
    """The smoke runs' jobs (the pre-trained model once, though two runs name it, then every arm x seed) split
    over 3 shards: disjoint, together all of them; the grid's jobs are plain LoRA and the grid arms."""
    cfg = load_config(finetune.NOTEBOOK, "smoke")
    everything = scoring.shard_jobs(cfg, grid=False)
    assert everything[0] == ("tiny-llama", None, 0) and everything.count(("tiny-llama", None, 0)) == 1
    assert len(everything) == 1 + 2 * 2 + 2
    shards = [scoring.shard_jobs(cfg, False, i, 3) for i in range(3)]
    joined = [j for s in shards for j in s]
    assert len(joined) == len(set(joined)) and set(joined) == set(everything)
    grid = scoring.shard_jobs(cfg, grid=True)
    assert grid[0] == ("tiny-llama", "lora", cfg.seed) and len(grid) == 1 + 4 * 1 + 3 * 1
    with pytest.raises(ValueError, match="shard 3/3"):
        scoring.shard_jobs(cfg, False, 3, 3)


@pytest.mark.usefixtures("one_thread")
def test_score_shards_write_the_notebooks_cache_entries(tmp_path, monkeypatch) -> None:
    """``python -m common.hoc.scoring --shard i/2`` on a profile with one LoRA run: before the adapter exists the
    shard holding it refuses (no training in a scoring job); once it is fine-tuned, the two shards score the
    pre-trained model and the arm, and the notebook's own ``evaluate`` calls then only read the cache."""
    monkeypatch.setenv("REPRO_CACHE", str(tmp_path))
    cfg = replace(load_config(finetune.NOTEBOOK, "smoke"), runs=(("tiny-llama", ("lora",), (0,)),))
    monkeypatch.setattr(scoring, "load_config", lambda notebook, profile, seed: cfg)
    with pytest.raises(FileNotFoundError, match="not fine-tuned yet"):
        scoring.main(["--profile", "smoke", "--shard", "1/2"])
    train, layer, channels = finetune.notebook_inputs(cfg, "tiny-llama")
    tuned = finetune.finetune("tiny-llama", finetune.ARMS["lora"], 0, cfg.settings, train, layer, channels)
    for shard in ("0/2", "1/2"):
        scoring.main(["--profile", "smoke", "--shard", shard])
    assert len(list((tmp_path / "macdrop_eval").iterdir())) == 2
    monkeypatch.setattr(evaluation, "zero_shot", lambda *a, **k: pytest.fail("scored again instead of the cache"))
    model, tok = models.load_model("tiny-llama")
    spec = scoring.eval_spec(cfg, "tiny-llama", finetune.datasets(cfg, "tiny-llama", tok)[1])
    for arm in (None, tuned):
        res = scoring.evaluate("tiny-llama", arm, layer, channels, spec, data.pad_id(tok))
        assert {"loss", "acc", "loss_zero"} <= set(res)
