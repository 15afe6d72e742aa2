"""Paper claims (``claims.yaml``): pre-registered decision rules, decided from the manifests' intervals (DESIGN §7).

Each claim names one manifest number (``key``) and a ``rule`` written before the run that decides it:

- ``null``: the value of "no effect" (1 for a ratio to the intact model, 0 for a difference), or, for a claim that
  a number lies past a line (a margin), that line;
- ``direction``: the paper's direction, ``greater`` or ``less`` than the null, or ``equivalent`` (the paper says
  "no effect": within ``sesoi`` of the null);
- ``sesoi``: the smallest effect of interest, in the number's units, measured from the null;
- ``interval``: what the 95% interval is taken over (``items``, ``windows``, ``prompts``, ``sequences``,
  ``layers``, ``modules``, ``seeds``), read from the record's ``ci95``, or ``exact`` for a number with no sampling
  error (a layer index, a weight property); ``paired: true`` when the arms share items or seeds;
- ``tolerance`` (optional): ``{rel: x}`` or ``{abs: x}`` around the paper's numeric value.

The status comes from the interval ``[lo, hi]`` (``decide``), for ``direction: greater`` (``less`` mirrored):

- *contradicted*: ``hi < null + sesoi``: the interval rules out every effect of interest in the paper's direction
  (this includes an interval on the other side of the null);
- *reproduced*: ``lo > null`` and our value is within the tolerance of the paper's (or no tolerance applies);
- *direction only*: ``lo > null``, our value outside the tolerance;
- *inconclusive*: the interval holds the null and effects of interest: the design cannot decide. The report
  prints the minimum detectable effect at 80% power (two-sided 5%), ``(z_.975 + z_.8) * se`` with
  ``se = (hi - lo) / (2 z_.975)``;
- *not attempted*: the manifest records the number as null (the record's note or the claim's ``reason`` says why).

For ``equivalent``: *reproduced* when the interval lies inside ``[null - sesoi, null + sesoi]``, *contradicted*
when it lies wholly outside, else *inconclusive*. A claim may name ``requires``: claims that must come out
*reproduced* or *direction only* for it to be decidable (e.g. "matches the reference" needs a reference that beats a
fresh model); otherwise it is *inconclusive* whatever its own interval.

``history`` lists every change of a claim's rule (date, commit, what, why, and ``seen``: whether its result was
known when the change was made); the report marks claims with a ``seen`` entry. A claim marked ``awaits_rerun``
(its key is newer than the committed run) is *pending* while the manifest lacks the key; the claims tests fail once
the key is there and the mark is not removed. Defects, never a finding:
``missing`` (no such key), ``not_run`` (no manifest), ``no_interval`` (the rule needs a ``ci95`` the record lacks).
"""

from __future__ import annotations

import datetime as dt
import importlib
import math
from dataclasses import MISSING as MISSING_FIELD
from dataclasses import dataclass, fields, replace
from pathlib import Path

import yaml

from common import REPO_ROOT
from common.core.manifest import load
from common.core.profiles import PROFILE_NAMES

CLAIMS_FILE = REPO_ROOT / "claims.yaml"


FIGURES = REPO_ROOT / "figures"


STATUSES = ("reproduced", "direction_only", "inconclusive", "contradicted", "not_attempted")


MISSING, NOT_RUN, NO_INTERVAL = "missing", "not_run", "no_interval"


#: a claim marked ``awaits_rerun`` (its key is new) whose key the committed manifest lacks: the next run records it
PENDING = "pending"


DEFECTS = (MISSING, NOT_RUN, NO_INTERVAL)


DIRECTIONS = ("greater", "less", "equivalent")


INTERVALS = ("exact", "items", "windows", "prompts", "sequences", "layers", "modules", "seeds")


TOLERANCE_KINDS = ("rel", "abs")


#: (z_.975 + z_.8) / (2 z_.975): the minimum detectable effect at 80% power per unit of 95% interval width.
MDE_PER_WIDTH = (1.959964 + 0.841621) / (2 * 1.959964)


DECIDABLE = ("reproduced", "direction_only")


@dataclass(frozen=True)
class Rule:
    """A claim's pre-registered decision rule (see the module docstring)."""
    null: float
    direction: str
    sesoi: float
    interval: str
    paired: bool = False
    tolerance: dict | None = None

    def describe(self) -> str:
        """One line: ``> 1 by >= 1 (95% over windows, paired)``."""
        sign = {"greater": ">", "less": "<", "equivalent": "="}[self.direction]
        effect = f"within ±{_num(self.sesoi)}" if self.direction == "equivalent" else f"by ≥ {_num(self.sesoi)}"
        over = "exact" if self.interval == "exact" else f"95% over {self.interval}" + (", paired" if self.paired else "")
        return f"{sign} {_num(self.null)} {effect} ({over})"


@dataclass(frozen=True)
class Change:
    """One entry of a claim's ``history``."""
    date: str
    commit: str
    change: str
    why: str
    seen: bool


@dataclass(frozen=True)
class Claim:
    id: str
    paper: str
    claim: str
    paper_ref: str
    paper_model: str
    paper_value: object
    paper_source: str
    key: str
    notebook: str
    rule: Rule
    figure: str
    history: tuple[Change, ...]
    reason: str = ""
    paper_key: str = ""
    requires: tuple[str, ...] = ()
    awaits_rerun: bool = False

    @property
    def key_on_paper(self) -> str:
        """The key on the ``paper`` profile: ``paper_key``, else ``key`` with its model replaced by ``paper_model``."""
        return self.paper_key or f"{self.paper_model}/{self.key.split('/', 1)[1]}"

    @property
    def seen_changes(self) -> tuple[Change, ...]:
        """The history entries made with the claim's result known (the report marks such claims)."""
        return tuple(h for h in self.history if h.seen)


@dataclass(frozen=True)
class Decision:
    """What a rule decides from one number and its interval."""
    status: str
    interval: tuple[float, float] | None = None
    mde: float | None = None   # minimum detectable effect at 80% power (inconclusive claims)
    why: str = ""


@dataclass(frozen=True)
class Outcome:
    """A claim evaluated on one profile's manifest."""
    status: str
    value: object = None
    record: dict | None = None
    interval: tuple[float, float] | None = None
    mde: float | None = None
    why: str = ""          # how the interval decided, or what is missing


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _num(x: float) -> str:
    return f"{x:.4g}"


def _validate_tolerance(where: str, tol: object) -> None:
    if tol is None:
        return
    if not (isinstance(tol, dict) and len(tol) == 1 and next(iter(tol)) in TOLERANCE_KINDS
            and _is_number(next(iter(tol.values()))) and next(iter(tol.values())) >= 0):
        raise ValueError(f"{where}: tolerance must be {{rel: x}} (relative to the paper value) or "
                         f"{{abs: x}} with a number x >= 0, not {tol!r}")


def parse_rule(cid: str, raw: object) -> Rule:
    """A ``rule:`` mapping, validated; errors name the field to fix."""
    known = {f.name for f in fields(Rule)}
    if not isinstance(raw, dict):
        raise ValueError(f"claim {cid}: needs `rule: {{null: ..., direction: ..., sesoi: ..., interval: ...}}`")
    unknown, absent = set(raw) - known, [f.name for f in fields(Rule) if f.default is MISSING_FIELD and f.name not in raw]
    if unknown or absent:
        raise ValueError(f"claim {cid}: rule has unknown field(s) {sorted(unknown)} / lacks {absent}; "
                         f"fields: {', '.join(f.name for f in fields(Rule))}")
    rule = Rule(**raw)
    if not _is_number(rule.null) or not _is_number(rule.sesoi) or rule.sesoi < 0:
        raise ValueError(f"claim {cid}: rule null must be a number and sesoi a number >= 0")
    if rule.direction not in DIRECTIONS:
        raise ValueError(f"claim {cid}: rule direction {rule.direction!r}; known: {', '.join(DIRECTIONS)}")
    if rule.interval not in INTERVALS:
        raise ValueError(f"claim {cid}: rule interval {rule.interval!r}; known: {', '.join(INTERVALS)}")
    _validate_tolerance(f"claim {cid}", rule.tolerance)
    if rule.tolerance is not None and rule.direction == "equivalent":
        raise ValueError(f"claim {cid}: an equivalent claim is decided by its band (null ± sesoi): drop the tolerance")
    return rule


def _parse_history(cid: str, raw: object) -> tuple[Change, ...]:
    known = [f.name for f in fields(Change)]
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"claim {cid}: needs a `history:` list with at least the entry that registered it "
                         f"({', '.join(known)})")
    out = []
    for entry in raw:
        if not isinstance(entry, dict) or sorted(entry) != sorted(known):
            raise ValueError(f"claim {cid}: each history entry has exactly {', '.join(known)}, not {entry!r}")
        if not isinstance(entry["seen"], bool):
            raise ValueError(f"claim {cid}: history `seen` is true or false (was the result known?)")
        date = entry["date"]
        dt.date.fromisoformat(str(date))  # raises on a malformed date
        out.append(Change(**{**entry, "date": str(date)}))
    return tuple(out)


def load_claims(path: Path = CLAIMS_FILE) -> list[Claim]:
    """Parse and validate ``claims.yaml``."""
    known = {f.name for f in fields(Claim)}
    claims, seen = [], set()
    for raw in yaml.safe_load(Path(path).read_text()):
        cid = raw.get("id", "?")
        for old, new in (("check", "rule"), ("expect", "nothing: statuses are derived"), ("tolerance", "rule.tolerance")):
            if old in raw:
                raise ValueError(f"claim {cid}: `{old}:` is gone; use {new} (see the claims.yaml header)")
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"claim {cid}: unknown field(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        absent = [f.name for f in fields(Claim) if f.name not in raw and f.default is MISSING_FIELD]
        if absent:
            raise ValueError(f"claim {cid}: missing field(s) {', '.join(absent)}")
        if not isinstance(raw.get("awaits_rerun", False), bool):
            raise ValueError(f"claim {cid}: awaits_rerun is true or false")
        claim = Claim(**{**raw, "rule": parse_rule(cid, raw["rule"]), "history": _parse_history(cid, raw["history"]),
                         "paper_value": resolve_paper_value(cid, raw["paper_value"]),
                         "requires": tuple(raw.get("requires") or ())})
        if claim.id in seen:
            raise ValueError(f"claim {claim.id}: duplicate id")
        seen.add(claim.id)
        if "/" not in claim.key:
            raise ValueError(f"claim {claim.id}: key {claim.key!r} must look like '<model>/<quantity>'")
        if claim.rule.tolerance is not None and not _is_number(claim.paper_value):
            raise ValueError(f"claim {claim.id}: a tolerance needs a numeric paper_value, not {claim.paper_value!r}")
        claims.append(claim)
    for c in claims:
        unknown = [r for r in c.requires if r not in seen or r == c.id]
        if unknown:
            raise ValueError(f"claim {c.id}: requires unknown claim(s) {unknown}")
    return claims


PAPER_PACKAGES = ("hoc", "inheritune", "sfsd")


def resolve_paper_value(cid: str, value: object) -> object:
    """A claim's ``paper_value`` written ``"<package>.paper:<NAME>[.<key>...]"`` is read from that paper module
    (``common.hoc.paper``, ``common.inheritune.paper``, ``common.sfsd.paper``; a list is indexed by an integer,
    ``.-1`` its last entry): the paper's numbers live in one
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
            found = found[int(key)] if isinstance(found, list | tuple) else found[key]
    except (AttributeError, KeyError, TypeError, IndexError, ValueError) as err:
        raise ValueError(f"claim {cid}: paper_value {value!r} is not in common.{package}.paper ({err})") from err
    return found


def within(tolerance: dict, actual: float, paper: float) -> bool:
    """Whether ``actual`` is within ``tolerance`` (``{rel: x}`` or ``{abs: x}``) of ``paper``."""
    if not isinstance(tolerance, dict) or len(tolerance) != 1 or next(iter(tolerance)) not in TOLERANCE_KINDS:
        raise ValueError(f"tolerance must be {{rel: x}} or {{abs: x}}, not {tolerance!r}")
    (kind, x), = tolerance.items()
    bound = x * abs(paper) if kind == "rel" else x
    return abs(actual - paper) <= bound + 1e-12 * max(1.0, abs(paper))


def minimum_detectable_effect(interval: tuple[float, float]) -> float:
    """The effect a two-sided 5% test detects with 80% power, from a 95% interval's width (normal approximation)."""
    lo, hi = interval
    return MDE_PER_WIDTH * (hi - lo)


def decide(rule: Rule, value: object, interval: tuple[float, float] | None, paper: object = None) -> Decision:
    """The status ``rule`` gives our ``value`` with its 95% ``interval`` (``None``: the rule's interval is exact);
    ``paper`` is the paper's value the tolerance is measured against."""
    if value is None:
        return Decision("not_attempted", why="recorded as null")
    if not _is_number(value):
        raise ValueError(f"a claim decides a finite number, not {value!r}")
    if interval is None:
        if rule.interval != "exact":
            return Decision(NO_INTERVAL, why=f"the rule needs a 95% interval over {rule.interval}; the record has none")
        interval = (float(value), float(value))
    lo, hi = sorted(float(x) for x in interval)
    if rule.direction == "equivalent":
        band = (rule.null - rule.sesoi, rule.null + rule.sesoi)
        if band[0] <= lo and hi <= band[1]:
            return Decision("reproduced", (lo, hi), why=f"interval inside {_num(band[0])}..{_num(band[1])}")
        if hi < band[0] or lo > band[1]:
            return Decision("contradicted", (lo, hi), why=f"interval outside {_num(band[0])}..{_num(band[1])}")
        return Decision("inconclusive", (lo, hi), minimum_detectable_effect((lo, hi)),
                        why=f"interval crosses an edge of {_num(band[0])}..{_num(band[1])}")
    # Mirror ``less`` onto ``greater``: s * x > s * null is "in the paper's direction".
    s = 1.0 if rule.direction == "greater" else -1.0
    near, far = (lo, hi) if s > 0 else (hi, lo)
    if s * far < s * rule.null + rule.sesoi:
        return Decision("contradicted", (lo, hi), why="the interval rules out an effect of interest "
                        f"(beyond {_num(rule.null + s * rule.sesoi)})")
    if s * near > s * rule.null:
        if rule.tolerance is not None and _is_number(paper) and not within(rule.tolerance, float(value), paper):
            return Decision("direction_only", (lo, hi), why=f"excludes {_num(rule.null)}; outside the tolerance of the paper's {_num(paper)}")
        return Decision("reproduced", (lo, hi), why=f"excludes {_num(rule.null)}")
    return Decision("inconclusive", (lo, hi), minimum_detectable_effect((lo, hi)),
                    why=f"the interval holds {_num(rule.null)} and effects of interest")


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


def _record_interval(record: dict) -> tuple[float, float] | None:
    ci = record.get("ci95")
    if isinstance(ci, list | tuple) and len(ci) == 2 and all(_is_number(x) for x in ci):
        return float(ci[0]), float(ci[1])
    return None


def evaluate(claim: Claim, profile: str = "small", root: Path = FIGURES) -> Outcome:
    """The claim's status on one profile by its own rule (``evaluate_all`` also applies ``requires``)."""
    exists, rec = find_record(claim, profile, root)
    if not exists:
        return Outcome(NOT_RUN, why=f"no {manifest_path(claim.notebook, profile, root).relative_to(root)}")
    if rec is None:
        if claim.awaits_rerun:
            return Outcome(PENDING, why="its key is newer than the committed run: the next `make reproduce` records it")
        return Outcome(MISSING, why="key not in the manifest")
    interval = None if claim.rule.interval == "exact" else _record_interval(rec)
    d = decide(claim.rule, rec["value"], interval, claim.paper_value)
    why = claim.reason or rec.get("note") or d.why if d.status == "not_attempted" else d.why
    return Outcome(d.status, rec["value"], rec, d.interval, d.mde, why)


def evaluate_all(claims: list[Claim], profile: str = "small", root: Path = FIGURES) -> dict[str, Outcome]:
    """Every claim's outcome on one profile; a claim whose ``requires`` are not all reproduced (or direction
    only) is inconclusive, with the unmet requirement named."""
    out = {c.id: evaluate(c, profile, root) for c in claims}
    for c in claims:
        unmet = [r for r in c.requires if out[r].status not in DECIDABLE]
        if unmet and out[c.id].status in (*DECIDABLE, "contradicted"):
            o = out[c.id]
            out[c.id] = replace(o, status="inconclusive", mde=None, why=f"needs {', '.join(unmet)} "
                                f"({', '.join(out[r].status for r in unmet)}); by its own interval: {o.status}")
    return out
