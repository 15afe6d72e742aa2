"""``python -m common.report``: the README results table, generated from manifests + ``claims.yaml``.

Nothing in the table is typed by hand except each claim's wording and paper value (in ``claims.yaml``).
The table replaces the text between the ``results:start`` / ``results:end`` markers of README.md.
"""

from __future__ import annotations

import re

from common import REPO_ROOT
from common.claims import load_claims, status

README = REPO_ROOT / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return "—" if value is None else str(value)


def results_table(profile: str = "small") -> str:
    """Markdown table: claim, paper value, ours, check, status, figure."""
    lines = [f"| claim | paper (model) | ours (`{profile}`) | check | status | figure |",
             "|---|---|---|---|---|---|"]
    for c in load_claims():
        state, value = status(c, profile)
        check = c.op if c.value is None else f"{c.op} {_fmt(c.value)}"
        note = f"{state}" + (f" — {c.reason}" if c.reason and state != "reproduced" else "")
        lines.append(f"| **{c.id}**: {c.claim} ({c.paper_ref}) | {_fmt(c.paper_value)} ({c.paper_model}) | "
                     f"`{c.key}` = {_fmt(value)} | {check} | {note} | [{c.figure.split('/')[-1]}]({c.figure}) |")
    return "\n".join(lines)


def update_readme(profile: str = "small") -> None:
    """Rewrite the generated section of README.md."""
    text = README.read_text()
    if START not in text or END not in text:
        raise ValueError(f"README.md lacks the {START} / {END} markers")
    block = f"{START}\n{results_table(profile)}\n{END}"
    README.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S))


if __name__ == "__main__":
    update_readme()
    print(f"updated the results table in {README.relative_to(REPO_ROOT)}")
