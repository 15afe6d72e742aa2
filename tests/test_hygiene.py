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
