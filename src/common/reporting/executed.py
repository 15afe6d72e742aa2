"""The executed notebooks a reader sees without running anything (issue 22): after a committed profile's run
(``small`` or ``paper``; not ``smoke`` nor a dry run) the runner publishes papermill's executed copy to
``notebooks/executed/<profile>/`` with its outputs, minus widget state, per-cell timings and local paths, and
stamped with the sha256 of the manifest the same run wrote; ``stale`` tells which published notebooks no longer
match their committed manifest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from common import REPO_ROOT
from common.core.env import write_json_atomic

EXECUTED = REPO_ROOT / "notebooks" / "executed"
STAMP = "repro"


def digest(path: Path) -> str:
    """sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def publish(executed: Path, manifest: Path, dest: Path) -> Path:
    """Write the executed notebook ``executed`` to ``dest`` (atomically) without widget state, per-cell papermill
    and execution timings, or the run's local paths, stamped with ``manifest``'s sha256 and path."""
    if not manifest.exists():
        raise FileNotFoundError(f"{manifest} does not exist: publish an executed notebook only after its run wrote "
                                "its manifest")
    nb = json.loads(Path(executed).read_text())
    nb["metadata"].pop("widgets", None)
    for key in ("input_path", "output_path"):
        nb["metadata"].get("papermill", {}).pop(key, None)
    for cell in nb["cells"]:
        for key in ("papermill", "execution"):
            cell.get("metadata", {}).pop(key, None)
    nb["metadata"][STAMP] = {"manifest": manifest.relative_to(REPO_ROOT).as_posix() if manifest.is_relative_to(REPO_ROOT)
                             else str(manifest), "manifest_sha256": digest(manifest)}
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(dest, nb)
    return dest


def stale(root: Path = EXECUTED) -> list[str]:
    """Published notebooks under ``root`` whose stamp does not match their manifest as it is now (changed or
    missing), each with the reason; [] when every one matches."""
    out = []
    for path in sorted(Path(root).glob("*/*.ipynb")):
        stamp = json.loads(path.read_text())["metadata"].get(STAMP)
        if not stamp:
            out.append(f"{path.name}: no {STAMP!r} stamp (publish it with common.reporting.run)")
            continue
        manifest = REPO_ROOT / stamp["manifest"]
        if not manifest.exists():
            out.append(f"{path.name}: its manifest {stamp['manifest']} is gone")
        elif digest(manifest) != stamp["manifest_sha256"]:
            out.append(f"{path.name}: {stamp['manifest']} changed since the run that executed it")
    return out
