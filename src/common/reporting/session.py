"""The one call every notebook starts with: ``setup(notebook, PROFILE, SEED)`` seeds, loads the profile,
checks the memory plan on a GPU box, starts the notebook's manifest and figure style, and prints a header."""

from __future__ import annotations

import torch

from common import REPO_ROOT
from common.core import gpu, manifest, models, style
from common.core.env import seed_everything
from common.core.gpu import device
from common.core.profiles import NotebookConfig, load_config, notebook_models


def setup(notebook: str, profile: str, seed: int = 0) -> NotebookConfig:
    """Seed, load the profile, and on a GPU check the memory plan against it (refusing, before any work, with
    what to change; the prediction goes into the manifest's run block, ``summary`` puts the measured peak
    beside it); start this notebook's manifest and figure style; print a run header."""
    cfg = load_config(notebook, profile, seed)
    seed_everything(seed)
    plan = None
    if gpu.gpu_memory():
        plan = gpu.notebook_plan(cfg, models.shapes(notebook_models(cfg)), models.default_dtype(notebook_models(cfg)))
        gpu.check(plan)
        warning = gpu.host_warning(plan)
        if warning:
            print(f"WARNING {warning}")
    manifest.start(cfg)
    if plan is not None:
        manifest.current().run["plan"] = {"peak_gpu_mb": round(plan.peak.gpu / 2**20), "peak_step": plan.peak.name,
                                          "host_mb": round(plan.host / 2**20), "disk_mb": round(plan.disk / 2**20)}
        manifest.current().save()
    style.apply_style()
    print(f"{notebook} | profile={cfg.profile} | seed={seed} | device={device()} | "
          f"torch {torch.__version__} | output -> {cfg.out_dir.relative_to(REPO_ROOT)}")
    return cfg
