"""``common.reporting.session.setup``: seeds, starts the manifest and the figure style, and on a GPU box checks the memory plan first."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common.core import env, manifest, profiles
from common.reporting import session

NB = "01_massive_activation_origin"


def test_setup_seeds_starts_manifest_and_styles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    """``setup`` returns the config, seeds, starts the manifest in out_dir and applies the figure style."""
    monkeypatch.setattr(profiles, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(session, "REPO_ROOT", tmp_path)
    with matplotlib.rc_context():
        cfg = session.setup(NB, "smoke", seed=11)
        assert plt.rcParams["pdf.fonttype"] == 42
    first = torch.rand(1)
    assert cfg.out_dir == tmp_path / "build" / "figures" / "smoke" / NB
    saved = manifest.load(cfg.out_dir / "manifest.json")
    assert saved["notebook"] == NB and saved["profile"] == "smoke" and saved["run"]["seed"] == 11
    assert manifest.current().path == cfg.out_dir / "manifest.json"
    assert "profile=smoke" in capsys.readouterr().out
    env.seed_everything(11)
    assert torch.equal(torch.rand(1), first)


def test_setup_checks_the_memory_plan_on_a_gpu_box(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a GPU, ``setup`` refuses a notebook whose planned peak does not fit, before any work (no manifest
    written), naming what to change; one that fits gets the prediction in its manifest's run block. Without a
    GPU nothing is planned."""
    from common.core import gpu

    monkeypatch.setattr(profiles, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(session, "REPO_ROOT", tmp_path)
    nb02 = "02_massive_weight_ablation"
    monkeypatch.setattr(gpu, "gpu_memory", lambda: [8 * gpu.GiB])
    with pytest.raises(MemoryError, match=r"needs ~.* GiB but the GPU has 8.0 GiB .* use "):
        session.setup(nb02, "paper")
    assert not (tmp_path / "figures").exists()
    monkeypatch.setattr(gpu, "gpu_memory", lambda: [80 * gpu.GiB])
    with matplotlib.rc_context():
        cfg = session.setup(nb02, "smoke")
    plan = manifest.load(cfg.out_dir / "manifest.json")["run"]["plan"]
    assert plan["peak_gpu_mb"] > 0 and plan["peak_step"] in ("perplexity", "zero-shot")
    monkeypatch.setattr(gpu, "gpu_memory", lambda: [])
    with matplotlib.rc_context():
        cfg = session.setup(nb02, "smoke")
    assert "plan" not in manifest.load(cfg.out_dir / "manifest.json")["run"]
