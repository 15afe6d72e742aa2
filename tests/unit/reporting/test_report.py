"""Claim statuses and the generated report on planted manifests and claims in a temporary directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from common.reporting import report
from common.reporting.claims import MISSING, NOT_RUN, evaluate, load_claims

NB = "01_planted"
RUN = {"git_sha": "0123456789abcdef0123", "dirty": False, "seed": 0, "device": "cpu", "dtype": "float32",
       "versions": {"torch": "9.9", "transformers": "8.8", "peft": "7.7", "lm_eval": None},
       "models": {"m": "sha256:" + "ab" * 32}}


def rec(key, value, paper_value=None, note=None, ci95=None, paper_ref=None):
    return {"key": key, "value": value, "paper_value": paper_value, "paper_ref": paper_ref, "tolerance": None,
            "ci95": ci95, "note": note}


def claim(cid, key, op=">=", value=1.0, expect="reproduced", **extra):
    c = {"id": cid, "paper": extra.pop("paper", "HoC"), "claim": f"wording of {cid}", "paper_ref": "Paper Tab. 1",
         "paper_model": "big-model", "paper_value": extra.pop("paper_value", "described"), "key": key,
         "notebook": extra.pop("notebook", NB), "check": {"op": op, "value": value}, "expect": expect,
         "figure": f"figures/small/{NB}/fig.png"}
    if expect != "reproduced":
        c.setdefault("reason", f"why {cid}")
    c.update(extra)
    return c


def write_manifest(root: Path, records, profile="small", notebook=NB, run=RUN):
    path = root / profile / notebook / "manifest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"notebook": notebook, "profile": profile, "run": run, "figures": ["fig.png"],
                                "records": records}))
    return path


def write_claims(tmp_path: Path, entries) -> Path:
    path = tmp_path / "claims.yaml"
    path.write_text(yaml.safe_dump(entries, sort_keys=False))
    return path


RECORDS = [
    rec("m/ok", 5.0),
    rec("m/fails", 0.5),
    rec("m/null", None, note="not measured here: CPU budget"),
    rec("m/ratio", 3.0),                           # paper 15 (claims.yaml): rel 0.2 -> outside
    rec("m/ratio_close", 14.0),                    # paper 15: rel 0.2 -> inside
    rec("m/delta", -0.017, paper_value=-0.010),    # the record's paper value wins: abs 0.015 -> inside
    rec("m/delta_far", -0.05, paper_value=-0.010),  # abs 0.015 -> outside
    rec("m/absent_layer", None, note="no massive layer"),
    rec("m/ci", 0.2, ci95=[0.1, 0.3]),
]

CLAIMS = [
    claim("c-reproduced", "m/ok"),
    claim("c-not-at-scale", "m/fails", expect="not_at_scale"),
    claim("c-not-attempted-note", "m/null", expect="not_attempted", reason=""),
    claim("c-direction-rel", "m/ratio", value=2.0, tolerance={"rel": 0.2}, paper_value=15, expect="direction_only"),
    claim("c-reproduced-rel", "m/ratio_close", value=2.0, tolerance={"rel": 0.2}, paper_value=15),
    claim("c-reproduced-abs", "m/delta", value=-0.03, tolerance={"abs": 0.015}),
    claim("c-direction-abs", "m/delta_far", value=-0.1, tolerance={"abs": 0.015}, expect="direction_only"),
    claim("c-missing", "m/not_recorded"),
    claim("c-null-op", "m/absent_layer", op="null", value=None),
    claim("c-not-null-op", "m/absent_layer", op="not_null", value=None, expect="not_at_scale"),
    claim("c-ci", "m/ci", value=0.0, paper="SFSD", notebook="05_planted"),
]


@pytest.fixture
def planted(tmp_path):
    root = tmp_path / "figures"
    write_manifest(root, RECORDS)
    write_manifest(root, RECORDS, notebook="05_planted")
    # load_claims rejects an empty reason on a non-reproduced claim; c-not-attempted-note relies on the note
    entries = [dict(c, reason=c.get("reason") or "see the record") for c in CLAIMS]
    return root, {c.id: c for c in load_claims(write_claims(tmp_path, entries))}


@pytest.mark.parametrize("cid, status", [
    ("c-reproduced", "reproduced"), ("c-not-at-scale", "not_at_scale"), ("c-not-attempted-note", "not_attempted"),
    ("c-direction-rel", "direction_only"), ("c-reproduced-rel", "reproduced"), ("c-reproduced-abs", "reproduced"),
    ("c-direction-abs", "direction_only"), ("c-missing", MISSING), ("c-null-op", "reproduced"),
    ("c-not-null-op", "not_at_scale")])
def test_status_on_planted_manifest(planted, cid, status):
    root, claims = planted
    assert evaluate(claims[cid], root=root).status == status


def test_not_attempted_reason_falls_back_to_the_record_note(tmp_path):
    root = tmp_path / "figures"
    write_manifest(root, RECORDS)
    c = claim("c", "m/null", expect="not_attempted", reason="claim's own reason")
    (with_reason,) = load_claims(write_claims(tmp_path, [c]))
    assert evaluate(with_reason, root=root).reason == "claim's own reason"
    # a reproduced-declared claim may carry no reason: then the null record's note says why
    (without,) = load_claims(write_claims(tmp_path, [claim("c", "m/null")]))
    out = evaluate(without, root=root)
    assert (out.status, out.reason) == ("not_attempted", "not measured here: CPU budget")


def test_record_paper_value_wins_for_display_and_tolerance(planted):
    root, claims = planted
    out = evaluate(claims["c-reproduced-abs"], root=root)
    assert out.paper_value == -0.010 and out.value == -0.017
    # with the claims.yaml value (a description) there would be nothing to measure the tolerance against
    assert evaluate(claims["c-reproduced"], root=root).paper_value == "described"


def test_tolerance_without_a_paper_number_is_an_error(tmp_path):
    root = tmp_path / "figures"
    write_manifest(root, RECORDS)
    (c,) = load_claims(write_claims(tmp_path, [claim("c", "m/ok", tolerance={"rel": 0.1})]))
    with pytest.raises(ValueError, match="numeric paper value"):
        evaluate(c, root=root)


def test_no_manifest_is_not_run(tmp_path):
    (c,) = load_claims(write_claims(tmp_path, [claim("c", "m/ok")]))
    assert evaluate(c, root=tmp_path / "figures").status == NOT_RUN


@pytest.mark.parametrize("change, message", [
    ({"expect": "not_reproduced"}, "`not_reproduced` is now `not_at_scale`"),
    ({"expect": "mostly"}, "set expect to one of reproduced, direction_only, not_at_scale, not_attempted"),
    ({"expect": "direction_only"}, "needs a `reason:`"),
    ({"expect": "not_attempted", "reason": "  "}, "needs a `reason:`"),
    ({"tolerance": {"pct": 5}}, r"tolerance must be \{rel: x\}"),
    ({"tolerance": {"rel": -1}}, r"tolerance must be \{rel: x\}"),
    ({"check": {"op": "=="}}, "unknown op"),
    ({"check": {"op": ">="}}, "needs a numeric value"),
    ({"colour": "red"}, "unknown field"),
    ({"status": "reproduced"}, "unknown field"),
])
def test_load_claims_rejects(tmp_path, change, message):
    c = claim("bad", "m/ok")
    c.update(change)
    with pytest.raises(ValueError, match=message):
        load_claims(write_claims(tmp_path, [c]))


def test_load_claims_names_a_missing_expect(tmp_path):
    c = claim("bad", "m/ok")
    del c["expect"]
    with pytest.raises(ValueError, match="missing field.*expect.*one of reproduced"):
        load_claims(write_claims(tmp_path, [c]))


def test_load_claims_rejects_duplicate_ids(tmp_path):
    with pytest.raises(ValueError, match="duplicate id"):
        load_claims(write_claims(tmp_path, [claim("a", "m/ok"), claim("a", "m/fails")]))


def test_paper_key_defaults_to_the_paper_model(tmp_path):
    (c, d) = load_claims(write_claims(tmp_path, [claim("c", "small-model/x/y"),
                                                 claim("d", "small-model/x/y", paper_key="other/z")]))
    assert c.key_on_paper == "big-model/x/y" and d.key_on_paper == "other/z"


def test_paper_column(planted):
    root, claims = planted
    text = report.report_markdown(list(claims.values()), root)
    row = next(line for line in text.splitlines() if "**c-reproduced**" in line)
    assert "— (not run)" in row and "`paper`: not run" in text
    write_manifest(root, [rec("big-model/ok", 0.25), rec("big-model/ratio", 14.5)], profile="paper")
    text = report.report_markdown(list(claims.values()), root)
    rows = {c: next(line for line in text.splitlines() if f"**{c}**" in line)
            for c in ("c-reproduced", "c-direction-rel", "c-not-at-scale")}
    cells = [cell.strip() for cell in rows["c-reproduced"].split(" | ")]
    assert cells[2] == "`m/ok` = 5" and cells[3] == "0.25 (not at this scale)"
    assert "14.5 (reproduced)" in rows["c-direction-rel"]  # big-model/ratio: within 20% of 15 on `paper`
    assert "— (no `big-model/fails`)" in rows["c-not-at-scale"]  # the paper manifest lacks that key
    assert "| `paper` | 01_planted |" in text          # provenance of the paper manifest
    assert "`paper`: 1 reproduced, 1 not at this scale, 8 missing, 1 not run." in text


def test_report_contents(planted):
    root, claims = planted
    text = report.report_markdown(list(claims.values()), root)
    assert text == report.report_markdown(list(claims.values()), root)  # deterministic
    assert text.startswith("# Replication report\n") and "make report" in text
    assert ("**`small`: 11 claims — 5 reproduced, 2 direction only, 2 not at this scale, 1 not attempted, "
            "1 missing.**") in text
    assert text.index("## HoC") < text.index("## SFSD") < text.index("## Provenance")
    row = next(line for line in text.splitlines() if "**c-direction-rel**" in line)
    for part in ("wording of c-direction-rel (Paper Tab. 1)", "big-model: 15", "`m/ratio` = 3", ">= 2", "±20%",
                 "direction only — why c-direction-rel", f"[fig.png](figures/small/{NB}/fig.png)"):
        assert part in row, part
    row = next(line for line in text.splitlines() if "**c-reproduced-abs**" in line)
    assert "±0.015" in row and "big-model: -0.01" in row
    row = next(line for line in text.splitlines() if "**c-not-attempted-note**" in line)
    assert "not attempted — see the record" in row
    assert "0.2 (95% CI [0.1, 0.3])" in text
    assert "| `small` | 01_planted | `0123456789ab` | false | 0 | cpu | float32 | 9.9 | 8.8 | 7.7 | — |" in text
    assert "m `sha256:abababababab`" in text


def test_results_table_and_readme_block(planted):
    root, claims = planted
    table = report.results_table(list(claims.values()), root)
    assert "[REPORT.md](REPORT.md)" in table
    assert "| **c-direction-rel** (HoC) | direction only | 3 | [fig.png](figures/small/01_planted/fig.png) |" in table
    readme = f"intro\n{report.START}\nold table\n{report.END}\noutro\n"
    new = report.render_readme(readme, table)
    assert "old table" not in new and table in new and new.startswith("intro\n") and new.endswith("outro\n")
    with pytest.raises(ValueError, match="markers"):
        report.render_readme("no markers", table)


def test_fmt():
    assert report._fmt(13751.68) == "13,752" and report._fmt(0.99928) == "0.9993" and report._fmt(12500) == "12,500"
    assert report._fmt(None) == "—" and report._fmt([1, 0.5]) == "[1, 0.5]" and report._fmt(True) == "true"


def test_main_check_and_write(tmp_path, monkeypatch, capsys):
    target = tmp_path / "REPORT.md"
    monkeypatch.setattr(report, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(report, "outputs", lambda: {target: "generated\n"})
    assert report.main(["--check"]) == 1 and not target.exists()
    assert "run `make report`" in capsys.readouterr().out
    assert report.main([]) == 0 and target.read_text() == "generated\n"
    assert report.main(["--check"]) == 0


@pytest.mark.parametrize("layer, status", [(1, "reproduced"), (2, "direction_only"), (11, "not_at_scale"),
                                           (None, "not_attempted")])
def test_real_paper_model_claim_on_a_fake_paper_manifest(tmp_path, layer, status):
    """claims.yaml's Llama-3-8B claim, read from a planted figures/paper manifest (never the repo's)."""
    (c,) = [c for c in load_claims() if c.id == "hoc-massive-layer-llama3"]
    write_manifest(tmp_path, [rec("llama-3-8b/massive_layer", layer, paper_value=1, note="planted")],
                   profile="paper", notebook=c.notebook)
    assert evaluate(c, "paper", tmp_path).status == status
    assert evaluate(c, "small", tmp_path).status == NOT_RUN


def test_runtime_table_reads_each_manifests_cost(tmp_path) -> None:
    """notebooks/README.md's cost table comes from the manifests' run block; a manifest that predates the
    cost fields shows a dash rather than a made-up number."""
    write_manifest(tmp_path, [], run=RUN | {"wall_s": 90.0, "peak_rss_mb": 2048})
    write_manifest(tmp_path, [], notebook="02_old")
    table = report.runtime_table(tmp_path)
    rows = [line for line in table.splitlines() if line.startswith(f"| {NB}") or line.startswith("| 02_old")]
    assert "1.5 min" in rows[0] and "2.0 GB" in rows[0] and "`012345678`" in rows[0]
    assert rows[1].split(" | ")[2:4] == ["—", "—"]
    readme = f"intro\n{report.RUNTIME[0]}\nstale\n{report.RUNTIME[1]}\n"
    assert "1.5 min" in report.render_readme(readme, table, report.RUNTIME) and "stale" not in report.render_readme(
        readme, table, report.RUNTIME)
    with pytest.raises(ValueError, match="notebooks/README.md lacks"):
        report.render_readme("no markers", table, report.RUNTIME, "notebooks/README.md")
