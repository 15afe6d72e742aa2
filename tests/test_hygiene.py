"""Committed notebooks are stripped, use kernel ``python3``, and follow the notebook contract."""

import json

import pytest

from common import REPO_ROOT

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stripped_and_follows_the_contract(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "commit stripped"
    tags = [c.get("metadata", {}).get("tags", []) for c in nb["cells"]]
    assert sum("parameters" in t for t in tags) == 1
    assert not any("injected-parameters" in t for t in tags)
    params = next(c for c, t in zip(nb["cells"], tags, strict=True) if "parameters" in t)
    assert 'PROFILE = "small"' in "".join(params["source"])
    assert nb["cells"][0]["cell_type"] == "markdown"
    assert any(f'setup("{path.stem}"' in "".join(c["source"]) for c in code)


MAX_CELL_LINES = 15


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebooks_only_narrate(path):
    """Cells orchestrate and narrate; a code cell over 15 lines is a library function waiting to be written."""
    nb = json.loads(path.read_text())
    long = [(i, len("".join(c["source"]).splitlines())) for i, c in enumerate(nb["cells"])
            if c["cell_type"] == "code" and len("".join(c["source"]).splitlines()) > MAX_CELL_LINES]
    assert not long, f"{path.stem}: code cells over {MAX_CELL_LINES} lines (cell index, lines): {long}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_findings_are_rendered_from_the_manifest(path):
    """The "What we find" prose is a template of manifest keys (notebooks/findings/), shown by a code cell, never
    measured numbers typed into a markdown cell."""
    nb = json.loads(path.read_text())
    sources = ["".join(c["source"]) for c in nb["cells"]]
    header = next(i for i, s in enumerate(sources) if s.startswith("## What we find"))
    assert nb["cells"][header + 1]["cell_type"] == "code" and "findings.show()" in sources[header + 1]
    assert (REPO_ROOT / "notebooks" / "findings" / f"{path.stem}.md").exists()
