"""Every notebook's findings template names only keys of its committed `small` manifest and renders completely
(a template that names a key the manifest lacks fails here, before a reader sees a stale or broken text)."""

from __future__ import annotations

import json

import pytest

from common import REPO_ROOT
from common.reporting import findings

NOTEBOOKS = sorted(p.stem for p in (REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def committed_small_records(notebook: str) -> list[dict]:
    """The records of ``figures/small/<notebook>/manifest.json``."""
    return json.loads((REPO_ROOT / "figures" / "small" / notebook / "manifest.json").read_text())["records"]


def test_every_notebook_has_a_template() -> None:
    assert NOTEBOOKS and all(findings.template_path(nb).exists() for nb in NOTEBOOKS)


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_template_keys_exist_and_render(notebook: str) -> None:
    template = findings.template_path(notebook).read_text()
    records = committed_small_records(notebook)
    assert findings.keys(template), f"{notebook}: the template names no manifest key"
    assert findings.missing(template, records) == []
    text = findings.render(template, records)
    assert "{" not in text and "}" not in text, f"{notebook}: a field was left unrendered"
