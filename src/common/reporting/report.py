"""``python -m common.reporting.report``: REPORT.md and the README results table, generated from manifests + ``claims.yaml``.

Nothing in either is typed by hand except each claim's wording, reason and paper value (``claims.yaml``, or the
manifest record's ``paper_value``). REPORT.md has one table per paper (the paper's value, ours on ``small`` and
on ``paper`` where ``figures/paper/`` has manifests, check, tolerance, status and reason, figure) and the
provenance of every manifest; the README gets a compact table between its ``results:start`` / ``results:end``
markers, notebooks/README.md the wall time and peak memory of each committed run (``runtime:start`` / ``end``). The output is deterministic (no timestamps), so a test can check the committed files are current;
``python -m common.reporting.report --check`` does the same without writing.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

from common import REPO_ROOT
from common.core.manifest import load, lock_drift, lock_pins
from common.reporting import site
from common.reporting.claims import (
    DEFECTS,
    FIGURES,
    MISSING,
    NO_INTERVAL,
    NOT_RUN,
    PENDING,
    STATUSES,
    Claim,
    Outcome,
    evaluate_all,
    load_claims,
)

README = REPO_ROOT / "README.md"


REPORT = REPO_ROOT / "REPORT.md"


START, END = "<!-- results:start -->", "<!-- results:end -->"


NOTEBOOKS_README = REPO_ROOT / "notebooks" / "README.md"


RUNTIME = ("<!-- runtime:start -->", "<!-- runtime:end -->")


PROFILES = ("small", "paper")


PAPER_ORDER = ("HoC", "SunMA", "Inheritune", "SFSD", "synthesis")


PAPER_TITLES = {
    "HoC": "House of Cards: massive weights and MacDrop (arXiv 2410.01866)",
    "SunMA": "Massive Activations in Large Language Models (Sun et al., arXiv 2402.17762)",
    "Inheritune": "Inheritune: attention degeneration and inherited layers (arXiv 2404.08634)",
    "SFSD": "Surgical Feature-Space Decomposition (arXiv 2405.13039)",
    "synthesis": "Synthesis across the three papers",
    "ours": "Our own checks (not claims of the papers)",
}


LABELS = {"reproduced": "reproduced", "direction_only": "direction only", "inconclusive": "inconclusive",
          "contradicted": "contradicted", "not_attempted": "not attempted", MISSING: "**missing**",
          NOT_RUN: "not run", NO_INTERVAL: "**no interval**", PENDING: "pending"}


MEANING = {
    "reproduced": "the 95% interval excludes the null in the paper's direction (and our value is within the tolerance "
                  "of the paper's where the rule has one); for a no-effect claim, the interval lies inside null ± sesoi",
    "direction_only": "the interval excludes the null in the paper's direction, but our value is outside the tolerance",
    "inconclusive": "the interval holds both the null and effects of interest: this design cannot decide (MDE: the "
                    "smallest effect it detects with 80% power); or a claim it requires is not reproduced",
    "contradicted": "the interval rules out every effect of interest in the paper's direction (or, for a no-effect "
                    "claim, lies wholly outside null ± sesoi)",
    "not_attempted": "recorded as null: not measured in this profile (the reason says why)",
}


def _fmt(value: object) -> str:
    """Compact, deterministic numbers: 4 significant digits, thousands separators from 10,000."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 1e4 else str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return "—" if value is None else str(value)


def _cell(text: object) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _rule(c: Claim) -> str:
    text = c.rule.describe()
    if c.rule.tolerance is not None:
        (kind, x), = c.rule.tolerance.items()
        text += f"; tolerance ±{_fmt(x * 100)}%" if kind == "rel" else f"; tolerance ±{_fmt(x)}"
    if c.requires:
        text += "; requires " + ", ".join(c.requires)
    return _cell(text)


def _ours(out: Outcome) -> str:
    if out.status == NOT_RUN:
        return "— (not run)"
    if out.status == MISSING:
        return "**missing**"
    text = _fmt(out.value)
    if out.interval is not None and out.interval[0] != out.interval[1]:
        text += f" (95% CI {_fmt(list(out.interval))})"
    return text


def _status(out: Outcome) -> str:
    label = LABELS.get(out.status, out.status)
    if out.status == "inconclusive":
        label += f"; MDE {_fmt(out.mde)}" if out.mde is not None else ""
    return label + (f" — {_cell(out.why)}" if out.why else "")


def _paper_cell(c: Claim) -> str:
    return f"{c.paper_model}: {_cell(_fmt(c.paper_value))} ({_cell(c.paper_source)})"


def _figure(c: Claim) -> str:
    """The claim's figure and the notebook section that makes it (``site.section_link``)."""
    figure = f"[{c.figure.rsplit('/', 1)[-1]}]({c.figure})"
    section = site.section_link(c.figure)
    return f"{figure}; {section}" if section else figure


def outcomes(claims: list[Claim], root: Path = FIGURES) -> list[tuple[Claim, Outcome, Outcome]]:
    """(claim, outcome on small, outcome on paper) for every claim."""
    small, paper = evaluate_all(claims, "small", root), evaluate_all(claims, "paper", root)
    return [(c, small[c.id], paper[c.id]) for c in claims]


def _mark(c: Claim) -> str:
    return " †" if c.seen_changes else ""


def _sections(claims: list[Claim]) -> list[tuple[str, list[Claim]]]:
    """Claims grouped by paper (PAPER_ORDER first, then by first notebook), each sorted by notebook."""
    papers: dict[str, list[Claim]] = {}
    for c in claims:
        papers.setdefault(c.paper, []).append(c)

    def order(p: str) -> tuple:
        known = PAPER_ORDER.index(p) if p in PAPER_ORDER else len(PAPER_ORDER)
        return (known, min(c.notebook for c in papers[p]), p)

    return [(p, sorted(papers[p], key=lambda c: c.notebook)) for p in sorted(papers, key=order)]


def _counts(rows: list[tuple[Claim, Outcome, Outcome]], i: int) -> Counter:
    return Counter(r[i].status for r in rows)


def _count_line(counts: Counter) -> str:
    keys = [*STATUSES, PENDING, *DEFECTS]
    return ", ".join(f"{counts[k]} {LABELS[k].strip('*')}" for k in keys if counts[k])


def _weights(identity: object) -> str:
    text = str(identity)
    return text[:len("sha256:") + 12] if text.startswith("sha256:") else text


def _provenance(root: Path) -> list[str]:
    lines = ["## Provenance", "",
             "The `run` block of every manifest: the commit the notebook ran at (`dirty`: uncommitted changes "
             "under `src/`), seed, device and library versions; models: the weights' sha256 (first 12 hex digits) "
             "or pinned revision; lock: the recorded versions against `requirements/gpu.lock`, what `make setup` "
             "installs (= where they are its pins; torch's build tag aside).", "",
             "| profile | notebook | git sha | dirty | seed | device | dtype | torch | transformers | peft | lm_eval | lock "
             "| models |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    pins = lock_pins()
    for profile in PROFILES:
        for path in sorted((Path(root) / profile).glob("*/manifest.json")):
            run = load(path).get("run") or {}
            ver = run.get("versions") or {}
            models = ", ".join(f"{k} `{_weights(v)}`" for k, v in sorted((run.get("models") or {}).items())) or "—"
            sha = run.get("git_sha") or "—"
            lines.append(f"| `{profile}` | {path.parent.name} | `{sha[:12]}` | {_fmt(run.get('dirty'))} | "
                         f"{_fmt(run.get('seed'))} | {_fmt(run.get('device'))} | {_fmt(run.get('dtype'))} | "
                         f"{_fmt(ver.get('torch'))} | {_fmt(ver.get('transformers'))} | {_fmt(ver.get('peft'))} | "
                         f"{_fmt(ver.get('lm_eval'))} | {_cell('; '.join(lock_drift(run, pins)) or '=')} | "
                         f"{_cell(models)} |")
    return lines


def _history(claims: list[Claim]) -> list[str]:
    lines = ["## Rule history", "",
             "Every change of a claim's decision rule, from `claims.yaml`'s `history`. **seen**: the claim's result "
             "was known when the change was made; such claims carry † in the tables above.", ""]
    for c in claims:
        lines.append(f"- **{c.id}**{_mark(c)}: " + "; ".join(
            f"{h.date} `{h.commit}`{' (seen)' if h.seen else ''}: {h.change} — {h.why}" for h in c.history))
    return lines + [""]


def report_markdown(claims: list[Claim] | None = None, root: Path = FIGURES) -> str:
    """The text of REPORT.md."""
    claims = load_claims() if claims is None else claims
    rows = outcomes(claims, root)
    by_id = {c.id: (s, p) for c, s, p in rows}
    small, paper = _counts(rows, 1), _counts(rows, 2)
    paper_run = any((Path(root) / "paper").glob("*/manifest.json"))
    marked = sum(bool(c.seen_changes) for c in claims)
    lines = [
        "# Replication report", "",
        "Generated by `make report` (`python -m common.reporting.report`) from [`claims.yaml`](claims.yaml) and "
        "`figures/<profile>/<notebook>/manifest.json`: do not edit by hand. Each claim's status is derived from "
        "its pre-registered rule (null, the paper's direction, the smallest effect of interest, the interval) and "
        "the 95% interval its notebook recorded; only the wording, the reason and the paper's value and source are "
        "typed. Paper values are in our units (fractions, not %; ratios to the intact model); layer indices are "
        "0-based (the papers' are 1-based).", "",
        f"**`small`: {len(rows)} claims — {_count_line(small)}.** "
        + (f"`paper`: {_count_line(paper)}." if paper_run else "`paper`: not run (no `figures/paper/*/manifest.json`)."),
        f"{marked} of {len(claims)} claims (†) had their rule written or changed with their result known: see the "
        "rule history at the end.",
        "", "| status | meaning | `small` | `paper` |", "|---|---|---|---|"]
    for s in STATUSES:
        lines.append(f"| {LABELS[s]} | {MEANING[s]} | {small[s]} | {paper[s] if paper_run else '—'} |")
    if small[PENDING]:
        lines.append(f"| {LABELS[PENDING]} | the claim's number is newer than the committed `small` run (`awaits_rerun`): "
                     f"the next `make reproduce` records and decides it | {small[PENDING]} | — |")
    for s, what in ((MISSING, "the claim's key is not in the `small` manifest"), (NOT_RUN, "no `small` manifest"),
                    (NO_INTERVAL, "the rule needs a 95% interval the record lacks (the run predates it)")):
        if small[s]:
            lines.append(f"| {LABELS[s]} | a defect: {what} | {small[s]} | — |")
    lines += ["", "Rule: `> null by ≥ sesoi` (the paper's direction and the smallest effect of interest), or "
              "`= null within ±sesoi` for a no-effect claim, and what the 95% interval is over; the tolerance around "
              "the paper's number decides *reproduced* vs *direction only*. `ours (paper)` is the same claim on the "
              "`paper` profile (key: `paper_key`, by default the key with the paper's model).", ""]
    for paper_name, group in _sections(claims):
        title = PAPER_TITLES.get(paper_name, paper_name)
        lines += [f"## {paper_name}" + (f" — {title}" if title != paper_name else ""), "",
                  "| claim | paper (model: value, source) | ours (`small`) | ours (`paper`) | rule | status | figure |",
                  "|---|---|---|---|---|---|---|"]
        for c in group:
            s, p = by_id[c.id]
            if p.status in (MISSING, PENDING):  # not a defect on `paper`: a claim about a small model has no paper key
                ours_paper = f"— (no `{c.key_on_paper}`)"
            else:
                ours_paper = _ours(p) + ("" if p.status == NOT_RUN else f" ({LABELS[p.status]})")
            reason = f" *{_cell(c.reason)}*" if c.reason and s.status not in ("reproduced", "not_attempted") else ""
            lines.append(f"| **{c.id}**{_mark(c)}: {_cell(c.claim)} ({_cell(c.paper_ref)}) | {_paper_cell(c)} | "
                         f"`{c.key}` = {_ours(s)} | {ours_paper} | {_rule(c)} | {_status(s)}{reason} | {_figure(c)} |")
        lines.append("")
    lines += _history(claims)
    lines += _provenance(root)
    return "\n".join(lines) + "\n"


def results_table(claims: list[Claim] | None = None, root: Path = FIGURES) -> str:
    """The README's compact table: claim id, status, ours on ``small``, figure."""
    claims = load_claims() if claims is None else claims
    rows = outcomes(claims, root)
    lines = [f"{len(rows)} claims on `small`: {_count_line(_counts(rows, 1))}. The paper's values and sources, the "
             "rules, the `paper` profile, the rule history and provenance are in [REPORT.md](REPORT.md).", "",
             "| claim | status | ours (`small`) | figure |", "|---|---|---|---|"]
    for c, s, _ in rows:
        label = LABELS.get(s.status, s.status)
        if s.status == "inconclusive" and s.mde is not None:
            label += f" (MDE {_fmt(s.mde)})"
        lines.append(f"| **{c.id}**{_mark(c)} ({_cell(c.paper)}) | {label} | {_ours(s)} | {_figure(c)} |")
    return "\n".join(lines)


def render_readme(text: str, table: str, markers: tuple[str, str] = (START, END), name: str = "README.md") -> str:
    """``text`` with the generated section between ``markers`` replaced by ``table``."""
    start, end = markers
    if start not in text or end not in text:
        raise ValueError(f"{name} lacks the {start} / {end} markers")
    block = f"{start}\n{table}\n{end}"
    return re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)


def runtime_table(root: Path = FIGURES) -> str:
    """notebooks/README.md's cost table: per notebook and profile, the wall time and the kernel's peak
    memory of the run that wrote the committed manifest (``run.wall_s``, ``run.peak_rss_mb``)."""
    lines = ["| notebook | profile | wall time | peak memory (kernel RSS) | device | commit |", "|---|---|---|---|---|---|"]
    for profile in PROFILES:
        for path in sorted((Path(root) / profile).glob("*/manifest.json")):
            run = load(path).get("run") or {}
            wall, rss = run.get("wall_s"), run.get("peak_rss_mb")
            lines.append(f"| {path.parent.name} | `{profile}` | {'—' if wall is None else f'{wall / 60:.1f} min'} | "
                         f"{'—' if rss is None else f'{rss / 1024:.1f} GB'} | {_fmt(run.get('device'))} | "
                         f"`{(run.get('git_sha') or '—')[:9]}` |")
    return "\n".join(lines)


def outputs(root: Path = FIGURES, readme: Path = README, report: Path = REPORT,
            notebooks_readme: Path = NOTEBOOKS_README) -> dict[Path, str]:
    """What ``make report`` writes: {path: text}."""
    claims = load_claims()
    return {report: report_markdown(claims, root), readme: render_readme(readme.read_text(), results_table(claims, root)),
            notebooks_readme: render_readme(notebooks_readme.read_text(), runtime_table(root), RUNTIME,
                                            "notebooks/README.md")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.reporting.report", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if REPORT.md or README.md is out of date")
    args = parser.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path.relative_to(REPO_ROOT))
        if not args.check:
            path.write_text(text)
    if args.check:
        print("out of date (run `make report`): " + ", ".join(map(str, stale)) if stale else "up to date")
        return 1 if stale else 0
    print("updated " + (", ".join(map(str, stale)) if stale else "nothing (already up to date)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
