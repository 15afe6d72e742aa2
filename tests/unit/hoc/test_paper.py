"""common.hoc.paper: the paper numbers claims.yaml reads through ``hoc.paper:NAME``."""

from __future__ import annotations

from common.core import profiles
from common.hoc import ablation, detection, macdrop, paper
from common.reporting import claims


def test_claims_resolve_hoc_paper_values() -> None:
    assert claims.resolve_paper_value("c", "hoc.paper:TABLE7.llama-3-8b.layer") == 1
    assert claims.resolve_paper_value("c", "hoc.paper:TABLE1_PPL_RATIO.zero_top5") == 14.93
    assert claims.resolve_paper_value("c", "hoc.paper:SUN_TOP_RATIO") == 12500
    by_id = {c.id: c for c in claims.load_claims()}
    assert by_id["hoc-keep-only-top5-is-cheap"].paper_value == 2.549
    assert by_id["hoc-zero-top5-accuracy-to-chance"].paper_value == -0.336


def test_library_reads_the_paper_module() -> None:
    assert detection.MIN_ABS == paper.SUN_MIN_ABS == 100.0 and detection.MIN_RATIO == paper.SUN_MIN_RATIO
    assert macdrop.Schedule("exp").alpha_for(paper.T_STEPS) == paper.EXP_ALPHA
    assert macdrop.Schedule().p0 == paper.MACDROP_P0
    assert abs(paper.TABLE1["ppl/zero_top5"] / paper.TABLE1["ppl/base"] - paper.TABLE1_PPL_RATIO["zero_top5"]) < 0.01
    assert ablation.record_table1.__module__ == "common.hoc.ablation"
    assert profiles.load_config("03_macdrop_finetuning", "smoke").k_attack == paper.K_ATTACK


def test_table6_note() -> None:
    assert paper.table6_note() == "HoC App. A Table 6: lr 1e-4, 3 epochs, batch 256, r16 a16"
