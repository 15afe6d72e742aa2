"""The claims tier (DESIGN §7): the decision logic of claims.yaml's rules on constructed inputs, never the committed
statuses; and that every claim's number, figure and report entry exist."""

import pytest

from common import REPO_ROOT
from common.core.manifest import load
from common.reporting import report
from common.reporting.claims import (
    MDE_PER_WIDTH,
    MISSING,
    NO_INTERVAL,
    NOT_RUN,
    PENDING,
    Rule,
    decide,
    evaluate,
    load_claims,
    manifest_path,
    minimum_detectable_effect,
    within,
)

CLAIMS = load_claims()
IDS = [c.id for c in CLAIMS]

GREATER = Rule(null=1.0, direction="greater", sesoi=1.0, interval="windows", paired=True)
LESS = Rule(null=0.0, direction="less", sesoi=0.02, interval="items", paired=True)
EQUIV = Rule(null=1.0, direction="equivalent", sesoi=0.02, interval="windows")


@pytest.mark.parametrize("rule, value, ci, status", [
    # greater than 1 by >= 1 (an attack at least doubles perplexity)
    (GREATER, 3.0, (2.5, 3.5), "reproduced"),            # excludes 1, holds effects >= 2
    (GREATER, 1.3, (1.1, 1.5), "contradicted"),          # excludes 1 but rules out every effect >= 2
    (GREATER, 0.8, (0.7, 0.9), "contradicted"),          # the other side of the null
    (GREATER, 1.5, (0.9, 2.4), "inconclusive"),          # holds 1 and 2
    (GREATER, 1.5, (1.0, 2.4), "inconclusive"),          # touching the null does not exclude it
    # less than 0 by >= 0.02 (mirror image)
    (LESS, -0.1, (-0.15, -0.05), "reproduced"),
    (LESS, -0.01, (-0.015, -0.005), "contradicted"),     # significant, but smaller than any effect of interest
    (LESS, 0.05, (0.01, 0.09), "contradicted"),
    (LESS, -0.01, (-0.05, 0.03), "inconclusive"),
    # equivalent: within 1 +- 0.02
    (EQUIV, 1.001, (0.995, 1.01), "reproduced"),
    (EQUIV, 1.1, (1.05, 1.15), "contradicted"),
    (EQUIV, 1.01, (0.99, 1.03), "inconclusive"),
    # not measured
    (GREATER, None, None, "not_attempted"),
])
def test_decide(rule, value, ci, status):
    assert decide(rule, value, ci).status == status


def test_decide_orders_the_interval_and_reports_it():
    d = decide(GREATER, 3.0, (3.5, 2.5))
    assert d.status == "reproduced" and d.interval == (2.5, 3.5)


def test_tolerance_splits_reproduced_from_direction_only():
    rule = Rule(null=1.0, direction="greater", sesoi=1.0, interval="windows", tolerance={"rel": 0.2})
    assert decide(rule, 17.0, (16.0, 18.0), paper=18.2).status == "reproduced"
    assert decide(rule, 3.0, (2.5, 3.5), paper=18.2).status == "direction_only"
    assert decide(rule, 3.0, (2.5, 3.5), paper="described").status == "reproduced"  # nothing to measure against


def test_inconclusive_prints_the_minimum_detectable_effect():
    d = decide(GREATER, 1.5, (0.9, 2.4))
    assert d.mde == pytest.approx(MDE_PER_WIDTH * 1.5)
    # normal approximation: a 95% interval of width w has se = w / 3.92; 80% power needs (1.96 + 0.84) se
    assert minimum_detectable_effect((0.0, 3.92)) == pytest.approx(1.96 + 0.8416, abs=1e-3)
    assert decide(GREATER, 3.0, (2.5, 3.5)).mde is None


def test_exact_rules_need_no_interval_and_sampled_ones_do():
    exact = Rule(null=2.0, direction="less", sesoi=0.0, interval="exact")
    assert decide(exact, 1, None).status == "reproduced"
    assert decide(exact, 11, None).status == "contradicted"
    assert decide(exact, 2, None).status == "inconclusive"  # on the line: neither side
    assert decide(GREATER, 3.0, None).status == NO_INTERVAL
    with pytest.raises(ValueError, match="finite number"):
        decide(GREATER, [1, 2], (0, 1))


def test_within():
    assert within({"rel": 0.1}, 10.9, 10) and not within({"rel": 0.1}, 11.2, 10)
    assert within({"abs": 0.02}, -0.01, 0.0) and not within({"abs": 0.02}, 0.03, 0.0)


@pytest.mark.parametrize("claim", CLAIMS, ids=IDS)
def test_claim_number_is_in_its_manifest(claim):
    out = evaluate(claim)
    assert out.status not in (MISSING, NOT_RUN), (
        f"{claim.id}: {claim.key} is not in figures/small/{claim.notebook}/manifest.json ({out.why}): "
        "run the notebook (`make reproduce NB=...`) or fix the claim's key")


@pytest.mark.parametrize("claim", [c for c in CLAIMS if c.awaits_rerun], ids=[c.id for c in CLAIMS if c.awaits_rerun])
def test_awaits_rerun_only_while_the_key_is_missing(claim):
    assert evaluate(claim).status == PENDING, (
        f"{claim.id}: its key is in the committed manifest now: remove `awaits_rerun: true` from claims.yaml")


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
        assert out.why.strip(), f"{claim.id}: not attempted without a reason or a note on the null record"


def test_report_is_up_to_date():
    stale = [str(path.relative_to(REPO_ROOT)) for path, text in report.outputs().items()
             if not path.exists() or path.read_text() != text]
    assert not stale, f"{', '.join(stale)} out of date with claims.yaml and the manifests: run `make report`"


def test_every_claim_is_in_the_report():
    text = (REPO_ROOT / "REPORT.md").read_text()
    for c in CLAIMS:
        assert f"**{c.id}**" in text and f"({c.figure})" in text, c.id
