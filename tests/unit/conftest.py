"""Shared fixtures for the CPU unit tests: environment isolation and tiny in-process models.

Nothing here touches the network, the real models or the wiki corpus.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest
from tiny_families import build_tiny, single_thread
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from common.core import manifest, models


@pytest.fixture(autouse=True)
def _isolate(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Every test: no profile/weights/model override, a private cache dir, offline hub, no active manifest."""
    for var in ("REPRO_PROFILE", "REPRO_WEIGHTS", "REPRO_RANDOM_SHRINK", "REPRO_MODEL", "REPRO_MODEL_BOS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("REPRO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(manifest, "_CURRENT", None)


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny models train as fast on one, the runs stay bit-reproducible, and a
    second busy process on a 2-core box then costs nothing (two OpenMP threads competing with it make the
    Trainer tests 10-20x slower). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    with single_thread():
        yield


@pytest.fixture
def make_tiny() -> Callable[..., PreTrainedModel]:
    """Builder ``make_tiny(family, seed=0)`` of tiny random models of any supported family."""
    return build_tiny


@pytest.fixture
def tiny_llama() -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A fresh ``tiny-llama`` (planted massive weight) and its byte tokenizer."""
    return models.load_model("tiny-llama")


@pytest.fixture
def tiny_gpt2() -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A fresh ``tiny-gpt2`` (nothing planted) and its byte tokenizer."""
    return models.load_model("tiny-gpt2")


@pytest.fixture
def byte_tok() -> PreTrainedTokenizerFast:
    """The in-process byte-level tokenizer."""
    return models.byte_tokenizer()


@pytest.fixture
def records(tmp_path) -> Callable[[], dict[str, dict]]:
    """Start a manifest under ``tmp_path``; call the fixture's value to read its records by key, in record order
    (the record functions of every paper package are tested through it)."""
    manifest.start(SimpleNamespace(notebook="x", profile="smoke", seed=0, out_dir=tmp_path / "out"))
    return lambda: {r["key"]: r for r in manifest.load(manifest.current().path)["records"]}
