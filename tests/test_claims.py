"""The committed ``small`` manifests agree with every claim in ``claims.yaml``, and REPORT.md / the README
results table are what ``make report`` generates from them now."""

import math

import pytest

from common import REPO_ROOT
from common.core.manifest import load
from common.reporting import report
from common.reporting.claims import (
    MISSING,
    NOT_RUN,
    _is_number,
    evaluate,
    find_record,
    holds,
    load_claims,
    manifest_path,
    numeric_paper_value,
    within,
)

CLAIMS = load_claims()
IDS = [c.id for c in CLAIMS]


@pytest.mark.parametrize("claim", CLAIMS, ids=IDS)
def test_claim_matches_expectation(claim):
    out = evaluate(claim)
    assert out.status not in (MISSING, NOT_RUN), (
        f"{claim.id}: {claim.key} is not in figures/small/{claim.notebook}/manifest.json ({out.reason}): "
        "run the notebook (`make reproduce NB=...`) or fix the claim's key")
    assert out.status == claim.expect, (
        f"{claim.id}: computed status {out.status}, claims.yaml expects {claim.expect}: {claim.key} = {out.value}, "
        f"check {claim.op} {claim.value}, tolerance {claim.tolerance} around {numeric_paper_value(claim, out.record)}")


@pytest.mark.parametrize("claim", CLAIMS, ids=IDS)
def test_claim_figure_exists_and_comes_from_its_notebook(claim):
    assert (REPO_ROOT / claim.figure).exists(), claim.figure
    assert claim.figure.startswith(f"figures/small/{claim.notebook}/"), (claim.figure, claim.notebook)
    listed = load(manifest_path(claim.notebook))["figures"]
    assert claim.figure.rsplit("/", 1)[-1] in listed, f"{claim.figure} is not among the figures its manifest lists"


@pytest.mark.parametrize("claim", CLAIMS, ids=IDS)
def test_not_attempted_says_why(claim):
    out = evaluate(claim)
    if out.status == "not_attempted":
        assert out.reason.strip(), f"{claim.id}: not attempted without a reason or a note on the null record"


@pytest.mark.parametrize("claim", CLAIMS, ids=IDS)
def test_paper_values_agree(claim):
    """Where claims.yaml and the manifest record both give the paper's number, they are the same number."""
    _, rec = find_record(claim)
    if rec is not None and _is_number(rec.get("paper_value")) and _is_number(claim.paper_value):
        assert math.isclose(rec["paper_value"], claim.paper_value, rel_tol=1e-3, abs_tol=1e-9), (
            f"{claim.id}: claims.yaml paper_value {claim.paper_value} != manifest {rec['key']} paper_value "
            f"{rec['paper_value']}")
    if claim.tolerance is not None:
        assert numeric_paper_value(claim, rec) is not None, f"{claim.id}: a tolerance needs a numeric paper value"


def test_report_is_up_to_date():
    stale = [str(path.relative_to(REPO_ROOT)) for path, text in report.outputs().items()
             if not path.exists() or path.read_text() != text]
    assert not stale, f"{', '.join(stale)} out of date with claims.yaml and the manifests: run `make report`"


def test_every_claim_is_in_the_report():
    text = (REPO_ROOT / "REPORT.md").read_text()
    for c in CLAIMS:
        assert f"**{c.id}**" in text and f"({c.figure})" in text, c.id


def test_checks_can_fail():
    assert holds(">=", 5, 3) and not holds(">=", 2, 3)
    assert holds("<=", 2, 3) and not holds("<=", 5, 3)
    assert holds("null", None, None) and not holds("null", 0, None)
    assert holds("not_null", 0, None) and not holds("not_null", None, None)
    assert not holds(">=", None, 3)
    assert within({"rel": 0.1}, 10.9, 10) and not within({"rel": 0.1}, 11.2, 10)
    assert within({"abs": 0.02}, -0.01, 0.0) and not within({"abs": 0.02}, 0.03, 0.0)
