"""Content-addressed JSON cache for expensive results (DESIGN §6): key = what was computed, on which
weights and data, with which code version. Writes are atomic, so an interrupted run resumes cleanly."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from common import __version__
from common.core.env import cache_dir, write_json_atomic

CACHE_VERSION = 1


def tensor_digest(t: torch.Tensor) -> str:
    """Short sha256 of a tensor's values (e.g. the token windows an evaluation used)."""
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def cache_path(stage: str, key: dict) -> Path:
    """``<cache>/<stage>/<sha256(key)[:16]>.json`` for a JSON-able ``key``."""
    full = {"stage": stage, "cache_version": CACHE_VERSION, "code": __version__, **key}
    digest = hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / stage / f"{digest}.json"


def cached(stage: str, key: dict, compute: Callable[[], dict]) -> dict:
    """Return the cached result for ``key`` or compute, store (atomically) and return it."""
    path = cache_path(stage, key)
    if path.exists():
        return json.loads(path.read_text())["result"]
    result = compute()
    write_json_atomic(path, {"key": key, "result": result})
    return result
