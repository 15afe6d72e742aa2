"""Claim statuses and the generated report on planted manifests and claims in a temporary directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from common.reporting import report
from common.reporting.claims import (
    MISSING,
    NO_INTERVAL,
    NOT_RUN,
    PENDING,
    evaluate,
    evaluate_all,
    load_claims,
)

NB = "01_planted"
RUN = {"git_sha": "0123456789abcdef0123", "dirty": False, "seed": 0, "device": "cpu", "dtype": "float32",
       "versions": {"torch": "9.9", "transformers": "8.8", "peft": "7.7", "lm_eval": None},
       "models": {"m": "sha256:" + "ab" * 32}}


def rec(key, value, paper_value=None, note=None, ci95=None, paper_ref=None):
    return {"key": key, "value": value, "paper_value": paper_value, "paper_ref": paper_ref, "tolerance": None,
            "ci95": ci95, "note": note}


HISTORY = [{"date": "2026-12-07", "commit": "abc1234", "change": "registered", "why": "planted", "seen": False}]


def claim(cid, key, null=0.0, direction="greater", sesoi=0.0, interval="exact", **extra):
    rule = {"null": null, "direction": direction, "sesoi": sesoi, "interval": interval}
    for k in ("paired", "tolerance"):
        if k in extra:
            rule[k] = extra.pop(k)
    c = {"id": cid, "paper": extra.pop("paper", "HoC"), "claim": f"wording of {cid}", "paper_ref": "Paper Tab. 1",
         "paper_model": "big-model", "paper_value": extra.pop("paper_value", "described"),
         "paper_source": "Paper Tab. 1, row x, big-model, corpus", "key": key,
         "notebook": extra.pop("notebook", NB), "rule": rule, "figure": f"figures/small/{NB}/fig.png",
         "history": extra.pop("history", HISTORY)}
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
    rec("m/ok", 5.0, ci95=[4.0, 6.0]),
    rec("m/other_side", -0.5, ci95=[-0.8, -0.2]),
    rec("m/unclear", 0.2, ci95=[-0.3, 0.7]),
    rec("m/null", None, note="not measured here: CPU budget"),
    rec("m/ratio", 3.0, ci95=[2.5, 3.5]),         # paper 15: rel 0.2 -> outside
    rec("m/ratio_close", 14.0, ci95=[13.0, 15.0]),  # paper 15: rel 0.2 -> inside
    rec("m/no_ci", 5.0),
    rec("m/layer", 1),
    rec("m/ci", 0.2, ci95=[0.1, 0.3]),
]

CLAIMS = [
    claim("c-reproduced", "m/ok", interval="windows"),
    claim("c-contradicted", "m/other_side", interval="items"),
    claim("c-inconclusive", "m/unclear", sesoi=0.2, interval="seeds"),
    claim("c-not-attempted-note", "m/null"),
    claim("c-direction-rel", "m/ratio", null=1.0, interval="windows", tolerance={"rel": 0.2}, paper_value=15),
    claim("c-reproduced-rel", "m/ratio_close", null=1.0, interval="windows", tolerance={"rel": 0.2}, paper_value=15),
    claim("c-no-interval", "m/no_ci", interval="prompts"),
    claim("c-exact", "m/layer", null=1, direction="equivalent"),
    claim("c-missing", "m/not_recorded"),
    claim("c-requires", "m/ci", interval="layers", paper="SFSD", notebook="05_planted", requires=["c-inconclusive"]),
]


@pytest.fixture
def planted(tmp_path):
    root = tmp_path / "figures"
    write_manifest(root, RECORDS)
    write_manifest(root, RECORDS, notebook="05_planted")
    return root, {c.id: c for c in load_claims(write_claims(tmp_path, CLAIMS))}


@pytest.mark.parametrize("cid, status", [
    ("c-reproduced", "reproduced"), ("c-contradicted", "contradicted"), ("c-inconclusive", "inconclusive"),
    ("c-not-attempted-note", "not_attempted"), ("c-direction-rel", "direction_only"),
    ("c-reproduced-rel", "reproduced"), ("c-no-interval", NO_INTERVAL), ("c-exact", "reproduced"),
    ("c-missing", MISSING), ("c-requires", "inconclusive")])
def test_status_on_planted_manifest(planted, cid, status):
    root, claims = planted
    assert evaluate_all(list(claims.values()), root=root)[cid].status == status


def test_requires_downgrades_only_through_evaluate_all(planted):
    """c-requires' own interval excludes 0; it is inconclusive because the claim it requires is."""
    root, claims = planted
    assert evaluate(claims["c-requires"], root=root).status == "reproduced"
    out = evaluate_all(list(claims.values()), root=root)["c-requires"]
    assert "needs c-inconclusive (inconclusive)" in out.why and "by its own interval: reproduced" in out.why


def test_not_attempted_reason_falls_back_to_the_record_note(tmp_path):
    root = tmp_path / "figures"
    write_manifest(root, RECORDS)
    (with_reason,) = load_claims(write_claims(tmp_path, [claim("c", "m/null", reason="claim's own reason")]))
    assert evaluate(with_reason, root=root).why == "claim's own reason"
    (without,) = load_claims(write_claims(tmp_path, [claim("c", "m/null")]))
    out = evaluate(without, root=root)
    assert (out.status, out.why) == ("not_attempted", "not measured here: CPU budget")


def test_a_claim_awaiting_its_rerun_is_pending_not_missing(tmp_path):
    root = tmp_path / "figures"
    write_manifest(root, RECORDS)
    waiting, old = load_claims(write_claims(tmp_path, [claim("waiting", "m/not_yet", awaits_rerun=True),
                                                      claim("old", "m/not_yet")]))
    assert evaluate(waiting, root=root).status == PENDING and evaluate(old, root=root).status == MISSING
    assert "1 pending" in report.report_markdown([waiting], root)
    with pytest.raises(ValueError, match="awaits_rerun is true or false"):
        load_claims(write_claims(tmp_path, [claim("bad", "m/ok", awaits_rerun="soon")]))


def test_no_manifest_is_not_run(tmp_path):
    (c,) = load_claims(write_claims(tmp_path, [claim("c", "m/ok")]))
    assert evaluate(c, root=tmp_path / "figures").status == NOT_RUN


@pytest.mark.parametrize("change, message", [
    ({"expect": "reproduced"}, "`expect:` is gone"),
    ({"check": {"op": ">="}}, "`check:` is gone"),
    ({"tolerance": {"rel": 0.1}}, "`tolerance:` is gone; use rule.tolerance"),
    ({"rule": {"null": 0, "direction": "up", "sesoi": 0, "interval": "exact"}}, "rule direction 'up'"),
    ({"rule": {"null": 0, "direction": "greater", "sesoi": -1, "interval": "exact"}}, "sesoi a number >= 0"),
    ({"rule": {"null": 0, "direction": "greater", "sesoi": 0, "interval": "people"}}, "rule interval 'people'"),
    ({"rule": {"null": 0, "direction": "greater", "sesoi": 0}}, r"lacks \['interval'\]"),
    ({"rule": {"null": 0, "direction": "equivalent", "sesoi": 0, "interval": "exact", "tolerance": {"abs": 1}}},
     "drop the tolerance"),
    ({"rule": {"null": 0, "direction": "greater", "sesoi": 0, "interval": "exact", "tolerance": {"pct": 5}}},
     r"tolerance must be \{rel: x\}"),
    ({"rule": {"null": 0, "direction": "greater", "sesoi": 0, "interval": "exact", "tolerance": {"rel": 0.1}}},
     "a tolerance needs a numeric paper_value"),
    ({"history": []}, "needs a `history:` list"),
    ({"history": [{"date": "2026-12-07", "commit": "x", "change": "y", "why": "z"}]}, "exactly date, commit"),
    ({"history": [{"date": "2026-12-07", "commit": "x", "change": "y", "why": "z", "seen": "yes"}]}, "true or false"),
    ({"history": [{"date": "07/12/2026", "commit": "x", "change": "y", "why": "z", "seen": True}]}, "isoformat"),
    ({"requires": ["nobody"]}, r"requires unknown claim\(s\) \['nobody'\]"),
    ({"colour": "red"}, "unknown field"),
])
def test_load_claims_rejects(tmp_path, change, message):
    c = claim("bad", "m/ok")
    c.update(change)
    with pytest.raises(ValueError, match=message):
        load_claims(write_claims(tmp_path, [c]))


def test_load_claims_names_a_missing_field(tmp_path):
    c = claim("bad", "m/ok")
    del c["paper_source"]
    with pytest.raises(ValueError, match="missing field.*paper_source"):
        load_claims(write_claims(tmp_path, [c]))


def test_load_claims_rejects_duplicate_ids(tmp_path):
    with pytest.raises(ValueError, match="duplicate id"):
        load_claims(write_claims(tmp_path, [claim("a", "m/ok"), claim("a", "m/other_side")]))


def test_paper_key_defaults_to_the_paper_model(tmp_path):
    (c, d) = load_claims(write_claims(tmp_path, [claim("c", "small-model/x/y"),
                                                 claim("d", "small-model/x/y", paper_key="other/z")]))
    assert c.key_on_paper == "big-model/x/y" and d.key_on_paper == "other/z"


def test_paper_column(planted):
    root, claims = planted
    text = report.report_markdown(list(claims.values()), root)
    row = next(line for line in text.splitlines() if "**c-reproduced**" in line)
    assert "— (not run)" in row and "`paper`: not run" in text
    write_manifest(root, [rec("big-model/ok", 0.25, ci95=[-0.1, 0.6]), rec("big-model/ratio", 14.5, ci95=[14, 15])],
                   profile="paper")
    text = report.report_markdown(list(claims.values()), root)
    rows = {c: next(line for line in text.splitlines() if f"**{c}**" in line)
            for c in ("c-reproduced", "c-direction-rel", "c-contradicted")}
    cells = [cell.strip() for cell in rows["c-reproduced"].split(" | ")]
    assert cells[2] == "`m/ok` = 5 (95% CI [4, 6])" and cells[3] == "0.25 (95% CI [-0.1, 0.6]) (inconclusive)"
    assert "14.5 (95% CI [14, 15]) (reproduced)" in rows["c-direction-rel"]  # within 20% of 15 on `paper`
    assert "— (no `big-model/other_side`)" in rows["c-contradicted"]  # the paper manifest lacks that key
    assert "| `paper` | 01_planted |" in text          # provenance of the paper manifest


def test_report_contents(planted):
    root, claims = planted
    text = report.report_markdown(list(claims.values()), root)
    assert text == report.report_markdown(list(claims.values()), root)  # deterministic
    assert text.startswith("# Replication report\n") and "make report" in text
    assert ("**`small`: 10 claims — 3 reproduced, 1 direction only, 2 inconclusive, 1 contradicted, "
            "1 not attempted, 1 missing, 1 no interval.**") in text
    assert text.index("## HoC") < text.index("## SFSD") < text.index("## Rule history") < text.index("## Provenance")
    row = next(line for line in text.splitlines() if "**c-direction-rel**" in line)
    for part in ("wording of c-direction-rel (Paper Tab. 1)", "big-model: 15 (Paper Tab. 1, row x", "`m/ratio` = 3",
                 "> 1 by ≥ 0 (95% over windows); tolerance ±20%", "direction only — excludes 1; outside the tolerance",
                 f"[fig.png](figures/small/{NB}/fig.png)"):
        assert part in row, part
    row = next(line for line in text.splitlines() if "**c-inconclusive**" in line)
    assert "inconclusive; MDE 0.7147" in row  # (z.975 + z.8) / (2 z.975) * width 1.0
    row = next(line for line in text.splitlines() if "**c-not-attempted-note**" in line)
    assert "not attempted — not measured here: CPU budget" in row
    assert "0.2 (95% CI [0.1, 0.3])" in text and "0 of 10 claims (†)" in text and " †:" not in text
    assert "| `small` | 01_planted | `0123456789ab` | false | 0 | cpu | float32 | 9.9 | 8.8 | 7.7 | — |" in text
    assert "m `sha256:abababababab`" in text


def test_claims_changed_with_their_result_seen_are_marked(tmp_path):
    root = tmp_path / "figures"
    write_manifest(root, RECORDS)
    amended = HISTORY + [{"date": "2026-12-08", "commit": "def5678", "change": "sesoi 0 -> 0.1", "why": "planted",
                          "seen": True}]
    claims = load_claims(write_claims(tmp_path, [claim("fresh", "m/ok"), claim("amended", "m/ok", history=amended)]))
    text = report.report_markdown(claims, root)
    assert "**amended** †:" in text and "**fresh**:" in text and "1 of 2 claims (†)" in text
    assert "2026-12-08 `def5678` (seen): sesoi 0 -> 0.1 — planted" in text


def test_results_table_and_readme_block(planted):
    root, claims = planted
    table = report.results_table(list(claims.values()), root)
    assert "[REPORT.md](REPORT.md)" in table
    assert "| **c-direction-rel** (HoC) | direction only | 3 (95% CI [2.5, 3.5]) | [fig.png](figures/small/01_planted/fig.png) |" in table
    assert "| inconclusive (MDE 0.7147) |" in table
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


@pytest.mark.parametrize("layer, status", [(1, "reproduced"), (2, "contradicted"), (None, "not_attempted")])
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
