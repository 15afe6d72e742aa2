"""Shared fixtures of the hoc tests: a manifest started in a temporary directory."""

from __future__ import annotations

import json
import types

import pytest

from common.core import manifest


@pytest.fixture
def records(tmp_path):
    """Start a manifest under ``tmp_path``; call the fixture's value to read its records by key."""
    manifest.start(types.SimpleNamespace(notebook="hoc-test", profile="smoke", seed=0, out_dir=tmp_path))
    return lambda: {r["key"]: r for r in json.loads((tmp_path / "manifest.json").read_text())["records"]}
