"""common.inheritune.paper: the half-depth comparisons, Fig. 3 / Table 4 differences and Fig. 1 readings in our units."""

from __future__ import annotations

from common.inheritune import paper
from common.reporting import claims


def test_half_depth_table5_differences() -> None:
    """Inheritune v4 Table 5: every half-depth difference the claims read, and None where the paper has no run."""
    assert paper.HALF_DEPTH_RANDOM_MINUS_REFERENCE == {"gpt2-medium": None, "gpt2-large": 0.12, "gpt2-xl": 0.04}
    assert paper.HALF_DEPTH_MINUS_RANDOM_2X == {"gpt2-medium": None, "gpt2-large": -0.04, "gpt2-xl": 0.02}
    assert claims.resolve_paper_value("c", "inheritune.paper:HALF_DEPTH_MINUS_REFERENCE.gpt2-medium") == 0.06


def test_fig3_table4_and_fig1_readings() -> None:
    """Fig. 3 (10K steps), Table 4 (GPT-2 small) and Fig. 1 (second-half minimum MaxRank) as our keys read them."""
    assert paper.FIG3_LAST_MINUS_FIRST_10K == {"gpt2-medium": 0.25, "gpt2-large": 0.39}
    assert paper.FIG3_LAST_MINUS_RANDOM_10K["gpt2-medium"] == -0.02
    assert paper.TABLE4_DIFF["inherit_middle-inherit_first"] == -0.03  # the paper's middle layers are the best
    assert paper.MIN_MAXRANK_SECOND_HALF == {"gpt2-medium": 1.0, "gpt2-large": 1.0}
    assert paper.N_LAZY_LAYERS == {"gpt2-medium": 14, "gpt2-large": 22}
    assert [v for k, v in paper.VAL_LOSS.items() if v[0] is not None] == [(2.81, paper.VAL_LOSS["reference"][1]),
                                                                           (2.87, paper.VAL_LOSS["inherit_first"][1])]
