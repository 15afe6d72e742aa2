"""``common.core.profiles`` (profiles as data, the REPRO_PROFILE override) and ``common.core.env`` (seeds, cache dir)."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

from common import REPO_ROOT
from common.core import env, profiles

NB = "01_massive_activation_origin"


def test_unknown_profile_lists_known() -> None:
    """An unknown profile raises ValueError naming the three profiles."""
    with pytest.raises(ValueError, match="smoke, small, paper") as err:
        profiles.load_config(NB, "huge")
    assert "'huge'" in str(err.value)


def test_unknown_notebook_lists_known() -> None:
    """A notebook without a config in the profile raises ValueError naming the known notebooks."""
    with pytest.raises(ValueError, match=NB) as err:
        profiles.load_config("99_nope", "smoke")
    assert "'99_nope'" in str(err.value)


def test_load_config_fills_run_fields() -> None:
    """The profile's row, with notebook/profile/seed filled in; profiles differ in data, not code."""
    smoke = profiles.load_config(NB, "smoke", seed=7)
    assert isinstance(smoke, profiles.MassiveOriginConfig)
    assert (smoke.notebook, smoke.profile, smoke.seed) == (NB, "smoke", 7)
    assert smoke.models == ("tiny-llama", "tiny-gpt2") and smoke.corpus == "synthetic"
    small = profiles.load_config(NB, "small")
    assert small.corpus == "wiki" and small.models != smoke.models and small.seed == 0
    assert profiles.PROFILES["smoke"][NB].notebook == ""  # the table itself is not mutated


def test_repro_profile_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    """REPRO_PROFILE wins over the notebook's literal; an empty value does not."""
    monkeypatch.setenv("REPRO_PROFILE", "small")
    assert profiles.load_config(NB, "smoke").profile == "small"
    assert profiles.resolve_profile("paper") == "small"
    monkeypatch.setenv("REPRO_PROFILE", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        profiles.load_config(NB, "smoke")
    monkeypatch.setenv("REPRO_PROFILE", "")
    assert profiles.resolve_profile("paper") == "paper"


def test_configs_are_frozen() -> None:
    """Configs cannot be changed after loading."""
    cfg = profiles.load_config(NB, "smoke")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_windows = 99  # type: ignore[misc]


def test_out_dir_smoke_vs_committed() -> None:
    """smoke writes under build/figures (not committed); small and paper under figures/."""
    assert profiles.load_config(NB, "smoke").out_dir == REPO_ROOT / "build" / "figures" / "smoke" / NB
    for profile in ("small", "paper"):
        assert profiles.load_config(NB, profile).out_dir == REPO_ROOT / "figures" / profile / NB


def test_your_own_model_replaces_the_profiles(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """REPRO_MODEL: every model field of notebooks 01, 02, 04, 05 names its key, the profile's other settings stay,
    outputs go under figures/user/<slug>/<profile>/, and notebook 04 trains no GPT (no seeds, no step schedule: its
    sections on the self-trained GPTs are skipped, tests/unit/inheritune). Nothing is loaded or checked here."""
    (tmp_path / "My_Model").mkdir()
    monkeypatch.setenv("REPRO_MODEL", str(tmp_path / "My_Model"))
    key = "user-my-model"
    for nb, fields in (("01_massive_activation_origin", ()), ("02_massive_weight_ablation", ("sweep_model",)),
                       ("04_attention_degeneration_inheritune", ("example_model",)),
                       ("05_lowrank_decomposition", ("search_model",))):
        for profile in ("smoke", "small"):
            cfg, base = profiles.load_config(nb, profile), profiles.PROFILES[profile][nb]
            assert cfg.models == (key,) and all(getattr(cfg, f) == key for f in fields) and cfg.user_model == key
            assert cfg.corpus == base.corpus and cfg.batch_size == base.batch_size
            assert cfg.out_dir == REPO_ROOT / "figures" / "user" / "my-model" / profile / nb
    nb04 = profiles.load_config("04_attention_degeneration_inheritune", "small")
    assert (nb04.n_seeds, nb04.steps_schedule) == (0, ())
    for nb in ("03_macdrop_finetuning", "06_synthesis"):
        with pytest.raises(ValueError, match="does not run on your own model"):
            profiles.load_config(nb, "small")
    monkeypatch.delenv("REPRO_MODEL")
    assert profiles.load_config(NB, "small").user_model == ""


def test_seed_everything() -> None:
    """Python, numpy and torch draws repeat after re-seeding and differ for another seed."""
    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    env.seed_everything(3)
    a = draws()
    env.seed_everything(3)
    assert draws() == a
    env.seed_everything(4)
    assert draws() != a


def test_cache_dir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$REPRO_CACHE wins; otherwise build/cache in the repo."""
    monkeypatch.setenv("REPRO_CACHE", str(tmp_path / "c"))
    assert env.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("REPRO_CACHE")
    assert env.cache_dir() == REPO_ROOT / "build" / "cache"
