"""``common.reporting.executed``: publishing an executed notebook (outputs kept; widget state, per-cell timings and
local paths dropped; stamped with its manifest's sha256) and telling a published notebook whose manifest changed."""

from __future__ import annotations

import json

import nbformat
import pytest

from common import REPO_ROOT
from common.reporting import executed


def _executed(path) -> None:
    cell = nbformat.v4.new_code_cell("print(1)", metadata={"papermill": {"duration": 1.0}, "execution": {"iopub.status.idle": "2026-12-07T21:00:00Z"}})
    cell.outputs = [nbformat.v4.new_output("stream", text="1\n")]
    nb = nbformat.v4.new_notebook(cells=[cell])
    nb.metadata["widgets"] = {"state": {"big": "x" * 1000}}
    nb.metadata["papermill"] = {"input_path": "nb.ipynb", "output_path": "build/out.ipynb", "duration": 3}
    nbformat.write(nb, path)


def test_publish_keeps_outputs_drops_noise_and_stamps_the_manifest(tmp_path) -> None:
    src, manifest, dest = tmp_path / "run.ipynb", tmp_path / "manifest.json", tmp_path / "pub" / "01_x.ipynb"
    _executed(src)
    manifest.write_text('{"records": []}')
    executed.publish(src, manifest, dest)
    nb = json.loads(dest.read_text())
    assert "".join(nb["cells"][0]["outputs"][0]["text"]) == "1\n"
    assert "widgets" not in nb["metadata"] and "execution" not in nb["cells"][0]["metadata"]
    assert "papermill" not in nb["cells"][0]["metadata"] and nb["metadata"]["papermill"] == {"duration": 3}
    assert nb["metadata"]["repro"]["manifest_sha256"] == executed.digest(manifest)
    nbformat.validate(nbformat.reads(dest.read_text(), as_version=4))
    with pytest.raises(FileNotFoundError, match="after its run wrote its manifest"):
        executed.publish(src, tmp_path / "missing.json", dest)


def test_stale_finds_a_changed_or_missing_manifest_and_a_missing_stamp(tmp_path, monkeypatch) -> None:
    """Stamps are checked against the manifests (paths relative to the repository); a matching one is not stale."""
    manifest = REPO_ROOT / "build" / "test-executed" / "manifest.json"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text('{"records": [1]}')
    try:
        src = tmp_path / "run.ipynb"
        _executed(src)
        executed.publish(src, manifest, tmp_path / "small" / "01_x.ipynb")
        nbformat.write(nbformat.v4.new_notebook(), tmp_path / "small" / "02_y.ipynb")
        assert executed.stale(tmp_path) == ["02_y.ipynb: no 'repro' stamp (publish it with common.reporting.run)"]
        manifest.write_text('{"records": [2]}')
        assert "01_x.ipynb: build/test-executed/manifest.json changed" in executed.stale(tmp_path)[0]
        manifest.unlink()
        assert "is gone" in executed.stale(tmp_path)[0]
    finally:
        manifest.unlink(missing_ok=True)
