"""The locked environment (issue 22): requirements/gpu.lock pins every package; cpu.lock is the same lock without
torch and its CUDA libraries (CPU machines install the Makefile's CPU build of the same torch first); the packages
a manifest records are pinned, and this environment is the lock's unless `make setup UNLOCKED=1` installed it."""

from __future__ import annotations

import os
import re
from importlib.metadata import version

import pytest

from common import REPO_ROOT
from common.core import manifest

LOCKS = REPO_ROOT / "requirements"
RECORDED = ("torch", "transformers", "peft", "lm-eval")  # what every manifest's run block records


pins = manifest.lock_pins


def test_pins_parse_names_and_versions(tmp_path) -> None:
    lock = tmp_path / "x.lock"
    lock.write_text("lm_eval==0.4.13   # via x\n# a comment\n    # via y\nTorch==2.13.0\n")
    assert pins(lock) == {"lm-eval": "0.4.13", "torch": "2.13.0"}


def test_cpu_lock_is_the_gpu_lock_without_torch_and_its_cuda_libraries() -> None:
    gpu, cpu = pins(LOCKS / "gpu.lock"), pins(LOCKS / "cpu.lock")
    dropped = set(gpu) - set(cpu)
    assert "torch" in dropped and set(cpu) <= set(gpu)
    assert all(n in ("torch", "triton") or n.startswith(("nvidia-", "cuda-")) for n in dropped), sorted(dropped)
    assert all(cpu[n] == gpu[n] for n in cpu)
    assert all(n in gpu for n in RECORDED)


def test_the_makefiles_cpu_torch_is_the_locked_torch() -> None:
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert re.search(r"^CPU_TORCH := torch==(\S+)$", makefile, re.M).group(1) == pins(LOCKS / "gpu.lock")["torch"]


def test_this_environment_is_the_lock() -> None:
    """The recorded packages installed here are the lock's versions (torch's local build tag, +cpu / +cu128,
    aside), so what a run records is what the lock says."""
    if os.environ.get("UNLOCKED"):
        pytest.skip("installed with make setup UNLOCKED=1: pyproject's ranges, not the lock, by the user's choice")
    locked = pins(LOCKS / "gpu.lock")
    assert {n: version(n).split("+")[0] for n in RECORDED} == {n: locked[n] for n in RECORDED}
