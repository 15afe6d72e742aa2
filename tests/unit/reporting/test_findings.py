"""``common.reporting.findings``: templates render this run's values, refuse keys the run lacks, and state a
direction only from the sign of the number it is about."""

from __future__ import annotations

import pytest

from common.reporting import findings

RECORDS = [{"key": "m/ppl/base", "value": 20.0}, {"key": "m/ppl/zero", "value": 61.0},
           {"key": "m/layers", "value": [3, 11]}, {"key": "m/none", "value": None}, {"key": "m/layer", "value": 11}]


def test_values_expressions_formats_and_indexing() -> None:
    text = "{[m/ppl/zero] / [m/ppl/base]:.2f}x at layer {[m/layer]}, first {[m/layers][0]}, all {[m/layers]}"
    assert findings.render(text, RECORDS) == "3.05x at layer 11, first 3, all [3, 11]"
    assert findings.render("{[m/ppl/base]} {[m/none]} {{literal}}", RECORDS) == "20 n/a {literal}"
    assert findings.render("{max([m/layers]) - min([m/layers])}", RECORDS) == "8"


def test_the_direction_comes_from_the_sign() -> None:
    template = "zeroing {[m/ppl/zero] - [m/ppl/base] ? raises | does not raise} perplexity"
    assert findings.render(template, RECORDS) == "zeroing raises perplexity"
    flipped = [{**r, "value": 10.0} if r["key"] == "m/ppl/zero" else r for r in RECORDS]
    assert findings.render(template, flipped) == "zeroing does not raise perplexity"
    with pytest.raises(ValueError, match="text if > 0 | text otherwise"):
        findings.render("{[m/layer] ? only one}", RECORDS)


def test_a_key_the_run_lacks_is_refused_by_name() -> None:
    template = "we see {[m/ppl/base]} and {[m/ppl/keep]:.1f}"
    assert findings.keys(template) == ["m/ppl/base", "m/ppl/keep"]
    assert findings.missing(template, RECORDS) == ["m/ppl/keep"]
    with pytest.raises(KeyError, match="'m/ppl/keep'"):
        findings.render(template, RECORDS)


def test_only_arithmetic_is_evaluated() -> None:
    with pytest.raises(ValueError, match="only \\[keys\\], numbers"):
        findings.render("{__import__('os')}", RECORDS)
