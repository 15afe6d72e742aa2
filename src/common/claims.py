"""Paper claims (``claims.yaml``) checked against the manifests (DESIGN §3, §7).

Each claim names a manifest key, a check, and what we expect at our scale: ``reproduced`` or
``not_reproduced`` (with the reason). A claim *passes* when the manifest agrees with the expectation,
so a regression in either direction is noticed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from common import REPO_ROOT
from common.manifest import load

CLAIMS_FILE = REPO_ROOT / "claims.yaml"
OPS = ("not_null", "null", ">=", "<=")


@dataclass(frozen=True)
class Claim:
    id: str
    paper: str
    claim: str
    paper_ref: str
    paper_model: str
    paper_value: object
    key: str
    notebook: str
    op: str
    value: object
    expect: str
    figure: str
    reason: str = ""


def load_claims(path: Path = CLAIMS_FILE) -> list[Claim]:
    """Parse and validate ``claims.yaml``."""
    claims = []
    for raw in yaml.safe_load(path.read_text()):
        check = raw.pop("check")
        claim = Claim(op=check["op"], value=check.get("value"), **raw)
        if claim.op not in OPS:
            raise ValueError(f"claim {claim.id}: unknown op {claim.op!r}; known: {', '.join(OPS)}")
        if claim.expect not in ("reproduced", "not_reproduced"):
            raise ValueError(f"claim {claim.id}: expect must be 'reproduced' or 'not_reproduced'")
        claims.append(claim)
    return claims


def holds(op: str, actual: object, target: object) -> bool:
    """Whether ``actual`` satisfies the check ``op target``."""
    if op == "null":
        return actual is None
    if op == "not_null":
        return actual is not None
    if actual is None:
        return False
    if op == ">=":
        return actual >= target
    return actual <= target


def manifest_value(claim: Claim, profile: str = "small") -> tuple[bool, object]:
    """(found, value) of the claim's key in ``figures/<profile>/<notebook>/manifest.json``."""
    path = REPO_ROOT / "figures" / profile / claim.notebook / "manifest.json"
    if not path.exists():
        return False, None
    for rec in load(path)["records"]:
        if rec["key"] == claim.key:
            return True, rec["value"]
    return False, None


def status(claim: Claim, profile: str = "small") -> tuple[str, object]:
    """("reproduced" | "not reproduced" | "missing", value) for one claim."""
    found, value = manifest_value(claim, profile)
    if not found:
        return "missing", None
    return ("reproduced" if holds(claim.op, value, claim.value) else "not reproduced"), value
