"""Process environment shared by every layer: the cache root, the random-weight dry-run switch, seeding, file
digests and atomic JSON writes. Imports nothing from ``common`` (the bottom of the core, beside ``gpu``)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import REPO_ROOT


def random_weights() -> int | None:
    """The dry run's shrink factor (1: the paper's shapes) when ``REPRO_WEIGHTS=random``, else None."""
    mode = os.environ.get("REPRO_WEIGHTS", "")
    if mode not in ("", "random"):
        raise ValueError(f"REPRO_WEIGHTS={mode!r}: the only value is 'random' (the dry run); unset it for real weights")
    if not mode:
        return None
    shrink = os.environ.get("REPRO_RANDOM_SHRINK", "1")
    if not shrink.isdigit() or int(shrink) < 1:
        raise ValueError(f"REPRO_RANDOM_SHRINK={shrink!r}: use a positive integer (1 = the paper's shapes)")
    return int(shrink)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA), unconditionally (anchors_style.md §3.3)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cache_dir() -> Path:
    """Root of every content-addressed cache: ``$REPRO_CACHE`` or ``build/cache``."""
    return Path(os.environ.get("REPRO_CACHE") or REPO_ROOT / "build" / "cache")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def json_ready(value: Any) -> Any:
    """JSON-able python numbers/lists from tensors, numpy values and tuples; NaN/inf become None."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    elif isinstance(value, np.ndarray | np.generic):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
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
