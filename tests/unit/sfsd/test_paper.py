"""common.sfsd.paper: whole-model budgets, Table B's per-segment shares and Table C's bound, derived in code."""

from __future__ import annotations

import pytest

from common.reporting import claims
from common.sfsd import paper


def test_table_b_segments_in_rank_fractions() -> None:
    """sfsd.md §3.3's derived shares: LLaMA-7B PIQA removes 27% / 20% / 13% of layers 27-31 / 22-26 / 12-21."""
    piqa = paper.TABLE_B_SEGMENT_REMOVED["llama-7b"]["piqa"]
    assert [round(piqa[s], 2) for s in ("layers_27_31", "layers_22_26", "layers_12_21")] == [0.27, 0.2, 0.13]
    kept = paper.TABLE_B_KEPT_LAST5_MINUS_MID10["llama-7b"]
    assert {t: round(v, 2) for t, v in kept.items()} == {"piqa": -0.13, "boolq": -0.4, "arc_challenge": -0.27,
                                                         "arc_easy": -0.37, "winogrande": -0.37, "hellaswag": -0.13}


def test_table_c_sits_at_its_bound() -> None:
    """Mistral's test perplexity is 1-4% above dense x 1.005^m; LLaMA's fits 1.007^m within 2% (sfsd.md §1.8)."""
    assert all(1.0 <= r < 1.04 for r in paper.TABLE_C_PPL_OVER_BOUND["mistral-7b"])
    assert all(abs(r - 1) < 0.02 for r in paper.TABLE_C_PPL_OVER_BOUND["llama-7b"])
    assert paper.TABLE_A_KAPPA_FRACTION_IF_LAYERS_4_31[80] == pytest.approx(0.76, abs=0.01)


def test_claims_index_paper_lists() -> None:
    """claims.yaml names a list entry by an integer (``.-1``: the last column of Table C)."""
    last = paper.TABLE_C_PPL_OVER_BOUND["mistral-7b"][-1]
    assert claims.resolve_paper_value("c", "sfsd.paper:TABLE_C_PPL_OVER_BOUND.mistral-7b.-1") == last
    with pytest.raises(ValueError, match="is not in common.sfsd.paper"):
        claims.resolve_paper_value("c", "sfsd.paper:TABLE_C_PPL_OVER_BOUND.mistral-7b.99")
    with pytest.raises(ValueError, match="is not in common.sfsd.paper"):
        claims.resolve_paper_value("c", "sfsd.paper:TABLE_C_PPL_OVER_BOUND.mistral-7b.last")
