"""The results manifest: every reported number, with the paper's value next to it (DESIGN §9).

``record(key, value, ...)`` appends to ``<out_dir>/manifest.json`` and rewrites the file atomically
(temporary file + rename), so an interrupted run never leaves a truncated manifest. Keys are
``<model>/<quantity>``; layer indices are 0-based (the papers' are 1-based: say so in ``note``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import REPO_ROOT


def _plain(value: Any) -> Any:
    """JSON-able python numbers/lists from tensors, numpy values and tuples; NaN/inf become None."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    elif isinstance(value, np.ndarray | np.generic):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` via a temporary file in the same directory and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates owner-only files; a manifest is for everyone to read
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=False, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def run_metadata(seed: int) -> dict:
    """Provenance of a run: git state, seed, device, library versions."""
    import peft
    import transformers

    try:
        import lm_eval
        lm_eval_version = lm_eval.__version__
    except ImportError:
        lm_eval_version = None
    from common.config import device

    return {"git_sha": _git("rev-parse", "HEAD"), "dirty": bool(_git("status", "--porcelain", "--", "src")),
            "seed": seed, "device": str(device()), "dtype": "float32",
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": peft.__version__, "lm_eval": lm_eval_version},
            "models": {}}


@dataclass
class Manifest:
    notebook: str
    profile: str
    out_dir: Path
    run: dict
    records: list[dict] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    @property
    def path(self) -> Path:
        return self.out_dir / "manifest.json"

    def save(self) -> None:
        write_json_atomic(self.path, {"notebook": self.notebook, "profile": self.profile, "run": self.run,
                                      "figures": sorted(set(self.figures)), "records": self.records})


_CURRENT: Manifest | None = None


def start(cfg) -> Manifest:
    """Begin a fresh manifest for a notebook run (called by ``config.setup``)."""
    global _CURRENT
    _CURRENT = Manifest(cfg.notebook, cfg.profile, cfg.out_dir, run_metadata(cfg.seed))
    _CURRENT.save()
    return _CURRENT


def current() -> Manifest:
    """The active manifest; ``setup(...)`` must have been called."""
    if _CURRENT is None:
        raise RuntimeError("no active manifest: call common.config.setup(notebook, PROFILE, SEED) first")
    return _CURRENT


def record(key: str, value: Any, paper: Any = None, paper_ref: str | None = None, tolerance: Any = None,
           ci95: Any = None, note: str | None = None) -> Any:
    """Record one reported number (replacing an earlier record of the same key); returns ``value``."""
    if "/" not in key:
        raise ValueError(f"manifest key {key!r} must look like '<model>/<quantity>'")
    m = current()
    entry = {"key": key, "value": _plain(value), "paper_value": _plain(paper), "paper_ref": paper_ref,
             "tolerance": _plain(tolerance), "ci95": _plain(ci95), "note": note}
    try:
        json.dumps(entry, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise TypeError(f"cannot record {key!r}: {err}; record numbers, strings or lists/dicts of them") from err
    m.records = [r for r in m.records if r["key"] != key] + [entry]
    m.save()
    return value


def record_model(key: str) -> None:
    """Add a model's weight identity (sha256 or pinned revision) to the run block."""
    from common.models import weights_id

    m = current()
    m.run["models"][key] = weights_id(key)
    m.save()


def load(path: Path) -> dict:
    """Read a manifest file."""
    return json.loads(Path(path).read_text())


def upstream(notebook: str, profile: str) -> dict:
    """The manifest an earlier notebook wrote on ``profile`` (notebook 06 builds on notebooks 01-05):
    ``{"run": ..., "records": {key: record}}``; a clear error names the command that writes it."""
    from common.config import load_config

    cfg = load_config(notebook, profile)
    path = cfg.out_dir / "manifest.json"
    if not path.exists():
        number = notebook.split("_", 1)[0]
        raise FileNotFoundError(f"{path.relative_to(REPO_ROOT)} does not exist: run notebook {notebook} on this "
                                f"profile first (make reproduce NB={number} PROFILE={cfg.profile})")
    data = load(path)
    return {"run": data["run"], "records": {r["key"]: r for r in data["records"]}}


def upstream_value(notebook: str, profile: str, key: str) -> Any:
    """One recorded value of an earlier notebook's manifest (``upstream``); KeyError names what is missing."""
    records = upstream(notebook, profile)["records"]
    if key not in records:
        raise KeyError(f"{notebook}'s manifest on profile {profile!r} has no {key!r}; re-run that notebook "
                       "(its manifest predates the key)")
    return records[key]["value"]


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MB (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def summary(records: list[dict] | None = None):
    """This run's numbers next to the paper's, as a DataFrame (the notebooks' last cell). Also stores the
    run's cost in the manifest's run block: ``wall_s`` since ``setup`` and the kernel's ``peak_rss_mb``
    (read by notebooks/README.md's runtime table)."""
    import pandas as pd

    m = current()
    m.run["wall_s"] = round(time.perf_counter() - m.started, 1)
    m.run["peak_rss_mb"] = round(peak_memory_mb())
    m.save()
    rows = m.records if records is None else records
    df = pd.DataFrame(rows, columns=["key", "value", "ci95", "paper_value", "paper_ref", "note"])
    return df.set_index("key")
