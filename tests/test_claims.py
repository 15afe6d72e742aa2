"""The committed ``small`` manifests agree with every claim's expectation in ``claims.yaml``."""

import pytest

from common import REPO_ROOT
from common.claims import holds, load_claims, status

CLAIMS = load_claims()


@pytest.mark.parametrize("claim", CLAIMS, ids=[c.id for c in CLAIMS])
def test_claim_matches_expectation(claim):
    state, value = status(claim)
    assert state != "missing", f"{claim.key} is not in figures/small/{claim.notebook}/manifest.json"
    expected = "reproduced" if claim.expect == "reproduced" else "not reproduced"
    assert state == expected, f"{claim.id}: {claim.key} = {value}, check {claim.op} {claim.value}"


@pytest.mark.parametrize("claim", CLAIMS, ids=[c.id for c in CLAIMS])
def test_claim_figure_exists(claim):
    assert (REPO_ROOT / claim.figure).exists(), claim.figure


def test_checks_can_fail():
    assert holds(">=", 5, 3) and not holds(">=", 2, 3)
    assert holds("<=", 2, 3) and not holds("<=", 5, 3)
    assert holds("null", None, None) and not holds("null", 0, None)
    assert holds("not_null", 0, None) and not holds("not_null", None, None)
    assert not holds(">=", None, 3)
