"""The results manifest: every reported number, with the paper's value next to it (DESIGN §9).

``record(key, value, ...)`` appends to ``<out_dir>/manifest.json`` and rewrites the file atomically
(temporary file + rename), so an interrupted run never leaves a truncated manifest. Keys are
``<model>/<quantity>``; layer indices are 0-based (the papers' are 1-based: say so in ``note``).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common import REPO_ROOT
from common.core import user_model
from common.core.env import json_ready, write_json_atomic
from common.core.gpu import device
from common.core.models import loaded_dtype, weights_id
from common.core.profiles import load_config


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
    """Begin a fresh manifest for a notebook run (called by ``reporting.session.setup``); a run of your own model
    records what it is in ``run.user_model`` (reference, BOS policy and where it came from, sha256 per weight file)."""
    global _CURRENT
    _CURRENT = Manifest(cfg.notebook, cfg.profile, cfg.out_dir, run_metadata(cfg.seed))
    if getattr(cfg, "user_model", ""):
        _CURRENT.run["user_model"] = user_model.active().describe()
    _CURRENT.save()
    return _CURRENT


def current() -> Manifest:
    """The active manifest; ``setup(...)`` must have been called."""
    if _CURRENT is None:
        raise RuntimeError("no active manifest: call common.reporting.session.setup(notebook, PROFILE, SEED) first")
    return _CURRENT


def record(key: str, value: Any, paper: Any = None, paper_ref: str | None = None, tolerance: Any = None,
           ci95: Any = None, note: str | None = None, volatile: bool = False) -> Any:
    """Record one reported number (replacing an earlier record of the same key); returns ``value``.
    ``volatile``: a wall-clock measurement, which the determinism check (``differences``) skips."""
    if "/" not in key:
        raise ValueError(f"manifest key {key!r} must look like '<model>/<quantity>'")
    m = current()
    entry = {"key": key, "value": json_ready(value), "paper_value": json_ready(paper), "paper_ref": paper_ref,
             "tolerance": json_ready(tolerance), "ci95": json_ready(ci95), "note": note}
    if volatile:
        entry["volatile"] = True
    try:
        json.dumps(entry, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise TypeError(f"cannot record {key!r}: {err}; record numbers, strings or lists/dicts of them") from err
    m.records = [r for r in m.records if r["key"] != key] + [entry]
    m.save()
    return value


def record_model(key: str, dtype: str | None = None) -> None:
    """Add a model's weight identity (sha256 or pinned revision) to the run block, and the precision of its numbers
    to ``run.dtypes``: ``dtype``, else the dtype ``models.load_model`` last loaded it in. A record's precision is
    ``run.dtypes`` of the model its key starts with, else ``run.dtype`` (fp32, the statistics' precision)."""
    m = current()
    m.run["models"][key] = weights_id(key)
    precision = dtype or loaded_dtype(key)
    if precision:
        m.run.setdefault("dtypes", {})[key] = precision
    m.save()


def load(path: Path) -> dict:
    """Read a manifest file."""
    return json.loads(Path(path).read_text())


def upstream(notebook: str, profile: str) -> dict:
    """The manifest an earlier notebook wrote on ``profile`` (notebook 06 builds on notebooks 01-05):
    ``{"run": ..., "records": {key: record}}``; a clear error names the command that writes it."""
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
    run's cost in the manifest's run block: ``wall_s`` since ``setup``, the kernel's ``peak_rss_mb`` and, on a
    GPU, ``peak_gpu_mb`` beside the planner's ``plan.peak_gpu_mb`` (read by notebooks/README.md's runtime table,
    docs/PAPER_DRYRUN.md and docs/GPU.md)."""
    import pandas as pd

    m = current()
    m.run["wall_s"] = round(time.perf_counter() - m.started, 1)
    m.run["peak_rss_mb"] = round(peak_memory_mb())
    if torch.cuda.is_available():
        m.run["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    m.save()
    rows = m.records if records is None else records
    df = pd.DataFrame(rows, columns=["key", "value", "ci95", "paper_value", "paper_ref", "note"])
    return df.set_index("key")


#: Run-block fields that measure the machine, not the result (skipped by ``differences``).
VOLATILE_RUN = ("wall_s", "peak_rss_mb", "peak_gpu_mb")

#: The lock the committed results are made with (issue 22; cpu.lock is it without torch's CUDA build), and the lock's
#: name of each library a manifest's run block records.
LOCK = REPO_ROOT / "requirements" / "gpu.lock"
RECORDED = {"torch": "torch", "transformers": "transformers", "peft": "peft", "lm_eval": "lm-eval"}


def lock_pins(path: Path = LOCK) -> dict[str, str]:
    """``{normalised name: version}`` of a lock's ``name==version`` lines (pip-tools / uv format)."""
    out = {}
    for line in Path(path).read_text().splitlines():
        if m := re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line):
            out[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return out


def lock_drift(run: dict, pins: dict[str, str]) -> list[str]:
    """Each library version a manifest's ``run`` block records that is not the lock's, as ``"transformers 5.24.0
    (lock 5.25.0)"`` (torch's local build tag, ``+cpu`` / ``+cu128``, is the machine's, not a version): a result made
    in another environment than ``make setup`` installs."""
    versions = run.get("versions") or {}
    drift = []
    for name, locked in RECORDED.items():
        have = str(versions.get(name) or "").split("+")[0]
        if have and pins.get(locked) and have != pins[locked]:
            drift.append(f"{name} {have} (lock {pins[locked]})")
    return drift


def _value_diffs(a: Any, b: Any, rel: float, where: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys differ ({sorted(a.keys() ^ b.keys())})"]
        return [d for k in a for d in _value_diffs(a[k], b[k], rel, f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: lengths {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _value_diffs(x, y, rel, f"{where}[{i}]")]
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        same = a == b if rel == 0 else math.isclose(a, b, rel_tol=rel, abs_tol=rel * 1e-6)
    else:
        same = a == b
    return [] if same else [f"{where}: {a!r} != {b!r}"]


def differences(a: dict, b: dict, rel: float = 0.0) -> list[str]:
    """Where two manifests of the same notebook disagree: every record's value and interval (exactly, or to
    relative tolerance ``rel``; GPU kernels are not bit-reproducible), the figure list and the run block, except
    volatile records and ``VOLATILE_RUN`` fields. Empty when the runs agree (issue 9 §3, determinism)."""
    run_a, run_b = ({k: v for k, v in m["run"].items() if k not in VOLATILE_RUN} for m in (a, b))
    recs_a, recs_b = ({r["key"]: r for r in m["records"] if not r.get("volatile")} for m in (a, b))
    out = _value_diffs(run_a, run_b, 0.0, "run") + _value_diffs(a["figures"], b["figures"], 0.0, "figures")
    for key in sorted(recs_a.keys() | recs_b.keys()):
        if key not in recs_a or key not in recs_b:
            out.append(f"{key}: only in the {'first' if key in recs_a else 'second'} manifest")
            continue
        for field_ in ("value", "ci95"):
            out += _value_diffs(recs_a[key][field_], recs_b[key][field_], rel, f"{key}.{field_}")
    return out


def compare_dirs(first: Path, second: Path, rel: float = 0.0) -> dict[str, list[str]]:
    """``differences`` for every ``<notebook>/manifest.json`` under ``first`` and ``second`` (a notebook in
    only one of them is a difference too)."""
    names = {p.parent.name for root in (first, second) for p in Path(root).glob("*/manifest.json")}
    if not names:
        raise FileNotFoundError(f"no */manifest.json under {first} or {second}")
    out = {}
    for name in sorted(names):
        pa, pb = Path(first) / name / "manifest.json", Path(second) / name / "manifest.json"
        out[name] = (differences(load(pa), load(pb), rel) if pa.exists() and pb.exists()
                     else [f"manifest only under {first if pa.exists() else second}"])
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m common.core.manifest compare FIRST SECOND [--rel R]``: exit 1 if any manifest differs."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("action", choices=["compare"])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--rel", type=float, default=0.0, help="relative tolerance (0: exact, the CPU check)")
    args = parser.parse_args(argv)
    found = compare_dirs(args.first, args.second, args.rel)
    for name, diffs in found.items():
        print(f"{'same' if not diffs else 'DIFFERENT'}  {name}" + "".join(f"\n    {d}" for d in diffs[:20]))
    return 1 if any(found.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
