"""Paper claims (``claims.yaml``) checked against the manifests (DESIGN §3, §7).

Each claim names a manifest key, a check (``op`` + ``value``), optionally a ``tolerance`` around the paper's
number, and the status we expect at our scale (``expect``). The status is computed from the manifest:

- ``not_attempted``: the key is recorded with ``value: null`` (the record's ``note`` or the claim's ``reason``
  says why) and the check compares numbers (``>=`` / ``<=``; a ``not_null`` check that meets ``null`` fails,
  and a ``null`` check holds);
- ``not_at_scale``: the check fails;
- ``direction_only``: the check holds but our value is outside ``tolerance`` (``{rel: x}``: ``|ours - paper|
  <= x |paper|``; ``{abs: x}``: ``|ours - paper| <= x``) of the numeric paper value (the manifest record's
  ``paper_value``, else the claim's numeric ``paper_value``);
- ``reproduced``: the check holds (and, with a tolerance, our value is within it).

Defects, never expected: ``missing`` (the manifest lacks the key) and ``not_run`` (no manifest at all; on the
``paper`` profile this just means nobody ran it). ``tests/test_claims.py`` asserts computed == ``expect`` on
``small``, so a change in either direction is noticed.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import MISSING as MISSING_FIELD
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from common import REPO_ROOT
from common.core.manifest import load
from common.core.profiles import PROFILE_NAMES

CLAIMS_FILE = REPO_ROOT / "claims.yaml"


FIGURES = REPO_ROOT / "figures"


OPS = ("not_null", "null", ">=", "<=")


STATUSES = ("reproduced", "direction_only", "not_at_scale", "not_attempted")


MISSING, NOT_RUN = "missing", "not_run"


TOLERANCE_KINDS = ("rel", "abs")


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
    tolerance: dict | None = None
    paper_note: str = ""
    paper_key: str = ""

    @property
    def key_on_paper(self) -> str:
        """The key on the ``paper`` profile: ``paper_key``, else ``key`` with its model replaced by ``paper_model``."""
        return self.paper_key or f"{self.paper_model}/{self.key.split('/', 1)[1]}"


@dataclass(frozen=True)
class Outcome:
    """A claim evaluated on one profile's manifest."""
    status: str            # one of STATUSES, or MISSING / NOT_RUN
    value: object = None   # our value (None when not recorded)
    record: dict | None = None
    reason: str = ""       # why, for every status but "reproduced"
    paper_value: object = None  # shown next to ours: the record's paper_value, else the claim's
    paper_ref: str = ""


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _validate_tolerance(cid: str, tol: object) -> None:
    if tol is None:
        return
    if not (isinstance(tol, dict) and len(tol) == 1 and next(iter(tol)) in TOLERANCE_KINDS
            and _is_number(next(iter(tol.values()))) and next(iter(tol.values())) >= 0):
        raise ValueError(f"claim {cid}: tolerance must be {{rel: x}} (relative to the paper value) or "
                         f"{{abs: x}} with a number x >= 0, not {tol!r}")


def load_claims(path: Path = CLAIMS_FILE) -> list[Claim]:
    """Parse and validate ``claims.yaml``."""
    known = {f.name for f in fields(Claim)} - {"op", "value"} | {"check"}
    claims, seen = [], set()
    for raw in yaml.safe_load(Path(path).read_text()):
        cid = raw.get("id", "?")
        if "expect" not in raw and "status" in raw:
            raise ValueError(f"claim {cid}: the expected status goes in `expect:` (one of {', '.join(STATUSES)})")
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"claim {cid}: unknown field(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        absent = [f.name for f in fields(Claim) if f.name not in ("op", "value") and f.name not in raw
                  and f.default is MISSING_FIELD]
        if absent:
            raise ValueError(f"claim {cid}: missing field(s) {', '.join(absent)}"
                             + (f" (expect: one of {', '.join(STATUSES)})" if "expect" in absent else ""))
        check = raw.pop("check", None)
        if not isinstance(check, dict) or "op" not in check:
            raise ValueError(f"claim {cid}: needs `check: {{op: ..., value: ...}}`")
        raw["paper_value"] = resolve_paper_value(cid, raw["paper_value"])
        claim = Claim(op=check["op"], value=check.get("value"), **raw)
        if claim.id in seen:
            raise ValueError(f"claim {claim.id}: duplicate id")
        seen.add(claim.id)
        if claim.op not in OPS:
            raise ValueError(f"claim {claim.id}: unknown op {claim.op!r}; known: {', '.join(OPS)}")
        if claim.op in (">=", "<=") and not _is_number(claim.value):
            raise ValueError(f"claim {claim.id}: check {claim.op} needs a numeric value")
        if claim.expect not in STATUSES:
            hint = " (`not_reproduced` is now `not_at_scale`)" if claim.expect == "not_reproduced" else ""
            raise ValueError(f"claim {claim.id}: unknown status expect: {claim.expect!r}{hint}; "
                             f"set expect to one of {', '.join(STATUSES)}")
        if claim.expect != "reproduced" and not str(claim.reason).strip():
            raise ValueError(f"claim {claim.id}: expect: {claim.expect} needs a `reason:` saying why "
                             "(what differs at our scale, or why it is not attempted)")
        if "/" not in claim.key:
            raise ValueError(f"claim {claim.id}: key {claim.key!r} must look like '<model>/<quantity>'")
        _validate_tolerance(claim.id, claim.tolerance)
        claims.append(claim)
    return claims


PAPER_PACKAGES = ("hoc", "inheritune", "sfsd")


def resolve_paper_value(cid: str, value: object) -> object:
    """A claim's ``paper_value`` written ``"<package>.paper:<NAME>[.<key>...]"`` is read from that paper module
    (``common.hoc.paper``, ``common.inheritune.paper``, ``common.sfsd.paper``): the paper's numbers live in one
    place, which the library, the notebooks and claims.yaml all read. Anything else is taken as written."""
    if not (isinstance(value, str) and ".paper:" in value):
        return value
    package, path = value.split(".paper:", 1)
    if package not in PAPER_PACKAGES:
        raise ValueError(f"claim {cid}: paper_value {value!r} names package {package!r}; known: "
                         f"{', '.join(PAPER_PACKAGES)}")
    found: object = importlib.import_module(f"common.{package}.paper")
    name, *keys = path.split(".")
    try:
        found = getattr(found, name)
        for key in keys:
            found = found[key]
    except (AttributeError, KeyError, TypeError) as err:
        raise ValueError(f"claim {cid}: paper_value {value!r} is not in common.{package}.paper ({err})") from err
    return found


def holds(op: str, actual: object, target: object) -> bool:
    """Whether ``actual`` satisfies the check ``op target``."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; known: {', '.join(OPS)}")
    if op == "null":
        return actual is None
    if op == "not_null":
        return actual is not None
    if actual is None:
        return False
    if op == ">=":
        return actual >= target
    return actual <= target


def within(tolerance: dict, actual: float, paper: float) -> bool:
    """Whether ``actual`` is within ``tolerance`` (``{rel: x}`` or ``{abs: x}``) of ``paper``."""
    if not isinstance(tolerance, dict) or len(tolerance) != 1 or next(iter(tolerance)) not in TOLERANCE_KINDS:
        raise ValueError(f"tolerance must be {{rel: x}} or {{abs: x}}, not {tolerance!r}")
    (kind, x), = tolerance.items()
    bound = x * abs(paper) if kind == "rel" else x
    return abs(actual - paper) <= bound + 1e-12 * max(1.0, abs(paper))


def manifest_path(notebook: str, profile: str = "small", root: Path = FIGURES) -> Path:
    if profile not in PROFILE_NAMES:
        raise ValueError(f"unknown profile {profile!r}; known profiles: {', '.join(PROFILE_NAMES)}")
    return Path(root) / profile / notebook / "manifest.json"


def find_record(claim: Claim, profile: str = "small", root: Path = FIGURES) -> tuple[bool, dict | None]:
    """(manifest exists, the record of the claim's key or None) in ``<root>/<profile>/<notebook>/manifest.json``."""
    path = manifest_path(claim.notebook, profile, root)
    if not path.exists():
        return False, None
    key = claim.key if profile != "paper" else claim.key_on_paper
    return True, next((r for r in load(path)["records"] if r["key"] == key), None)


def paper_value(claim: Claim, record: dict | None) -> tuple[object, str]:
    """(value, ref) shown as the paper's: the record's ``paper_value``/``paper_ref`` if it has one, else the claim's."""
    if record is not None and record.get("paper_value") is not None:
        return record["paper_value"], record.get("paper_ref") or claim.paper_ref
    return claim.paper_value, claim.paper_ref


def numeric_paper_value(claim: Claim, record: dict | None) -> float | None:
    """The number a tolerance is measured against: the record's numeric ``paper_value``, else the claim's."""
    if record is not None and _is_number(record.get("paper_value")):
        return record["paper_value"]
    return claim.paper_value if _is_number(claim.paper_value) else None


def evaluate(claim: Claim, profile: str = "small", root: Path = FIGURES) -> Outcome:
    """The claim's status on one profile, with our value, the record and the reason."""
    exists, rec = find_record(claim, profile, root)
    if not exists:
        return Outcome(NOT_RUN, reason=f"no {manifest_path(claim.notebook, profile, root).relative_to(root)}",
                       paper_value=claim.paper_value, paper_ref=claim.paper_ref)
    if rec is None:
        return Outcome(MISSING, reason="key not in the manifest", paper_value=claim.paper_value,
                       paper_ref=claim.paper_ref)
    pv, ref = paper_value(claim, rec)
    value = rec["value"]
    common = {"value": value, "record": rec, "paper_value": pv, "paper_ref": ref}
    if value is None and claim.op in (">=", "<="):
        return Outcome("not_attempted", reason=claim.reason or rec.get("note") or "", **common)
    if not holds(claim.op, value, claim.value):
        return Outcome("not_at_scale", reason=claim.reason, **common)
    if claim.tolerance is not None:
        target = numeric_paper_value(claim, rec)
        if target is None:
            raise ValueError(f"claim {claim.id}: has a tolerance but no numeric paper value: give claims.yaml "
                             f"`paper_value:` a number, or record `paper_value` with {rec['key']!r}")
        if not _is_number(value) or not within(claim.tolerance, value, target):
            return Outcome("direction_only", reason=claim.reason, **common)
    return Outcome("reproduced", reason="", **common)


def status(claim: Claim, profile: str = "small", root: Path = FIGURES) -> tuple[str, object]:
    """(status, value) of one claim (see ``evaluate``)."""
    out = evaluate(claim, profile, root)
    return out.status, out.value
