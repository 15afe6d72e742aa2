"""common.hoc.paper: the paper numbers claims.yaml reads through ``hoc.paper:NAME``."""

from __future__ import annotations

import pytest

from common.core import profiles
from common.hoc import ablation, detection, macdrop, paper
from common.reporting import claims


def test_claims_resolve_hoc_paper_values() -> None:
    assert claims.resolve_paper_value("c", "hoc.paper:TABLE7.llama-3-8b.layer") == 1
    assert claims.resolve_paper_value("c", "hoc.paper:TABLE1_WIKI_PPL_RATIO.zero_top5") == pytest.approx(18.19, abs=0.005)
    assert claims.resolve_paper_value("c", "hoc.paper:TABLE1_WIKI_PPL_RATIO.keep_top5") == pytest.approx(1.765, abs=5e-4)
    assert claims.resolve_paper_value("c", "hoc.paper:SUN_TOP_RATIO") == 12500
    assert claims.resolve_paper_value("c", "hoc.paper:TABLE1_ACC_DELTA.zero_top5") == -0.336


def test_table1_ratios_are_derived_per_corpus() -> None:
    """HoC Table 1, Llama-3-8B: the WikiText-2 column (what we measure on) and the three-corpus average differ."""
    wiki = paper.TABLE1_WIKI_PPL
    assert (wiki["base"], wiki["zero_top5"], wiki["keep_top5"]) == (5.75, 104.57, 10.15)
    assert paper.TABLE1_WIKI_PPL_RATIO["zero_top5"] == wiki["zero_top5"] / wiki["base"]
    for row in ("base", "zero_top5", "keep_top5"):  # the Avg column is the mean of the three corpora
        mean = sum(c[row] for c in paper.TABLE1_PPL_BY_CORPUS.values()) / 3
        assert paper.TABLE1[f"ppl/{row}"] == pytest.approx(mean, abs=0.005)
    assert paper.TABLE1_PPL_RATIO["zero_top5"] == pytest.approx(14.93, abs=0.005)
    assert paper.TABLE8_GEMMA2_MACDROP_GAIN["gemma-2-2b"] == -0.001


def test_library_reads_the_paper_module() -> None:
    assert detection.MIN_ABS == paper.SUN_MIN_ABS == 100.0 and detection.MIN_RATIO == paper.SUN_MIN_RATIO
    assert macdrop.Schedule("exp").alpha_for(paper.T_STEPS) == paper.EXP_ALPHA
    assert macdrop.Schedule().p0 == paper.MACDROP_P0
    assert ablation.record_table1.__module__ == "common.hoc.ablation"
    assert profiles.load_config("03_macdrop_finetuning", "smoke").k_attack == paper.K_ATTACK


def test_table6_note() -> None:
    assert paper.table6_note() == "HoC App. A Table 6: lr 1e-4, 3 epochs, batch 256, r16 a16"


def test_macdrop_gains_and_table7_layers_in_our_units() -> None:
    """HoC Tables 3 / 4 as fractions (the keys acc_gain and robust_acc); Table 7's layers 0-based with depth."""
    assert paper.TABLE3_MACDROP_GAIN == {"lora": 0.005, "dora": 0.003}
    assert paper.TABLE4_MACDROP_GAIN == {"lora": 0.073, "dora": 0.324}
    assert claims.resolve_paper_value("c", "hoc.paper:TABLE7_LAYER_ALL.gemma-2-2b.layer") == 1
    assert all(paper.TABLE7_LAYER_ALL[m]["layer"] == v["layer"] for m, v in paper.TABLE7.items())
    assert paper.TABLE7["llama-3-8b"]["hidden_dims"] is None  # no paper gives them (CROSS_CHECK_HIDDEN_DIMS)
