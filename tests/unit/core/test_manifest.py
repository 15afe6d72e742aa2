"""``common.core.profiles`` (profiles), ``common.core.manifest`` (atomic JSON records), ``common.core.evaluation``
(perplexity) and ``common.core.style`` (deterministic figure files). Nothing is written into the repo."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import matplotlib
import numpy as np
import pytest
import torch
from torch import nn

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common import REPO_ROOT
from common.core import data, env, evaluation, manifest, models, profiles, style
from common.reporting import session

NB = "01_massive_activation_origin"


# --------------------------------------------------------------------------------------- config


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


# ------------------------------------------------------------------------------------- manifest


def _cfg(tmp_path: Path) -> SimpleNamespace:
    return SimpleNamespace(notebook="x", profile="smoke", seed=0, out_dir=tmp_path / "out")


def _temp_files(d: Path) -> list[Path]:
    return [p for p in d.iterdir() if p.name != "manifest.json"]


def test_record_before_start_raises() -> None:
    """Without ``start`` there is no manifest to record into."""
    with pytest.raises(RuntimeError, match="setup"):
        manifest.record("m/q", 1.0)
    with pytest.raises(RuntimeError):
        manifest.current()


def test_start_and_record_write_valid_json(tmp_path: Path) -> None:
    """``start`` writes the file at once; ``record`` appends an entry with every field and returns value."""
    m = manifest.start(_cfg(tmp_path))
    assert m is manifest.current() and m.path == tmp_path / "out" / "manifest.json"
    assert manifest.load(m.path)["records"] == []
    assert manifest.record("tiny-llama/layer", 1, paper=2, paper_ref="HoC Tab. 1", tolerance=0,
                           ci95=(0.5, 1.5), note="0-based") == 1
    saved = json.loads(m.path.read_text())
    assert saved["notebook"] == "x" and saved["profile"] == "smoke"
    assert saved["records"] == [{"key": "tiny-llama/layer", "value": 1, "paper_value": 2, "paper_ref": "HoC Tab. 1",
                                 "tolerance": 0, "ci95": [0.5, 1.5], "note": "0-based"}]


def test_record_same_key_keeps_one(tmp_path: Path) -> None:
    """Recording a key again replaces its entry (latest value wins); other keys are kept."""
    manifest.start(_cfg(tmp_path))
    manifest.record("a/x", 1.0)
    manifest.record("b/x", 2.0)
    manifest.record("a/x", 3.0)
    records = manifest.load(manifest.current().path)["records"]
    assert sorted(r["key"] for r in records) == ["a/x", "b/x"]
    assert {r["key"]: r["value"] for r in records} == {"a/x": 3.0, "b/x": 2.0}


def test_record_converts_tensors_numpy_nan(tmp_path: Path) -> None:
    """Tensors, numpy values and tuples become plain JSON; NaN and inf become null."""
    manifest.start(_cfg(tmp_path))
    manifest.record("m/tensor", torch.tensor([1.5, float("nan")]), paper=np.float32(2.5))
    manifest.record("m/scalar", torch.tensor(4.0), tolerance=np.int64(3), ci95=np.array([[1, 2], [3, 4]]))
    manifest.record("m/nan", float("nan"), paper=(float("inf"), -float("inf"), 1))
    text = manifest.current().path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    recs = {r["key"]: r for r in json.loads(text)["records"]}
    assert recs["m/tensor"]["value"] == [1.5, None] and recs["m/tensor"]["paper_value"] == 2.5
    assert recs["m/scalar"]["value"] == 4.0 and recs["m/scalar"]["tolerance"] == 3
    assert recs["m/scalar"]["ci95"] == [[1, 2], [3, 4]]
    assert recs["m/nan"]["value"] is None and recs["m/nan"]["paper_value"] == [None, None, 1]


def test_plain_direct() -> None:
    """``json_ready`` converts nested lists/tuples of numpy/torch values and leaves plain values alone."""
    assert env.json_ready((np.float64(1.0), [torch.tensor(2), "s", None])) == [1.0, [2, "s", None]]
    assert env.json_ready(float("-inf")) is None and env.json_ready(7) == 7
    assert type(env.json_ready(np.float32(0.5))) is float


def test_key_without_slash_rejected(tmp_path: Path) -> None:
    """Keys must look like '<model>/<quantity>'; nothing is recorded otherwise."""
    manifest.start(_cfg(tmp_path))
    with pytest.raises(ValueError, match="<model>/<quantity>"):
        manifest.record("layer", 1)
    assert manifest.load(manifest.current().path)["records"] == []


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that dies midway leaves the previous manifest intact and no temporary file behind."""
    manifest.start(_cfg(tmp_path))
    manifest.record("m/ok", 1.0)
    path = manifest.current().path
    before = path.read_text()

    def dying_dump(obj, f, **kw):
        f.write('{"notebook": "x", "rec')  # a truncated document
        raise OSError("disk full")

    monkeypatch.setattr(manifest.json, "dump", dying_dump)
    with pytest.raises(OSError, match="disk full"):
        manifest.record("m/new", 2.0)
    assert path.read_text() == before
    assert json.loads(before)["records"][0]["key"] == "m/ok"
    assert _temp_files(path.parent) == []


def test_write_json_atomic_creates_dirs(tmp_path: Path) -> None:
    """``write_json_atomic`` creates parent dirs, writes parseable JSON and leaves only the target."""
    target = tmp_path / "a" / "b" / "f.json"
    env.write_json_atomic(target, {"x": [1, 2]})
    assert json.loads(target.read_text()) == {"x": [1, 2]}
    assert list(target.parent.iterdir()) == [target]


def test_run_metadata() -> None:
    """Provenance block: seed, device, dtype, library versions, empty model table."""
    meta = manifest.run_metadata(5)
    assert meta["seed"] == 5 and meta["device"] == str(torch.device("cuda" if torch.cuda.is_available() else "cpu")) and meta["models"] == {}
    assert meta["versions"]["torch"] == torch.__version__
    assert {"git_sha", "dirty", "dtype"} <= set(meta)
    json.dumps(meta)


def test_record_model_and_summary(tmp_path: Path) -> None:
    """``record_model`` stores the weights identity; ``summary`` tabulates records indexed by key."""
    manifest.start(_cfg(tmp_path))
    manifest.record_model("tiny-llama")
    assert manifest.load(manifest.current().path)["run"]["models"] == {"tiny-llama": models.weights_id("tiny-llama")}
    manifest.record("tiny-llama/ppl", 12.5, paper=10.0, note="n")
    df = manifest.summary()
    assert list(df.index) == ["tiny-llama/ppl"]
    assert df.loc["tiny-llama/ppl", "value"] == 12.5 and df.loc["tiny-llama/ppl", "paper_value"] == 10.0
    other = manifest.summary([{"key": "z/q", "value": 1, "paper_value": None, "paper_ref": None, "note": None}])
    assert list(other.index) == ["z/q"]


def test_summary_stores_the_runs_cost(tmp_path: Path) -> None:
    """``summary`` (every notebook's last cell) writes the wall time since ``setup`` and the kernel's peak
    memory into the manifest's run block (notebooks/README.md's cost table reads them)."""
    manifest.start(_cfg(tmp_path))
    assert "wall_s" not in manifest.load(manifest.current().path)["run"]
    ballast = bytearray(64 * 2**20)  # 64 MB touched: the peak cannot be below it
    ballast[:: 4096] = b"x" * len(ballast[:: 4096])
    manifest.current().started -= 5.0  # as if setup ran 5 s ago
    manifest.summary()
    run = manifest.load(manifest.current().path)["run"]
    assert 5.0 <= run["wall_s"] < 60 and run["peak_rss_mb"] >= 64
    assert run["peak_rss_mb"] == pytest.approx(manifest.peak_memory_mb(), abs=1)
    del ballast


# ----------------------------------------------------------------------------------- evaluation


class _LogitModel(nn.Module):
    """Returns ``make_logits(ids)`` as ``.logits``; one parameter so ``next(parameters())`` works."""

    def __init__(self, make_logits):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1))
        self.make_logits = make_logits

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.make_logits(input_ids))


def _windows(n=6, t=9, vocab=13, seed=0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def test_perplexity_uniform_is_vocab_size() -> None:
    """Uniform predictions over V tokens have perplexity exactly V."""
    vocab = 13
    model = _LogitModel(lambda ids: torch.zeros(*ids.shape, vocab))
    assert evaluation.perplexity(model, _windows(vocab=vocab)) == pytest.approx(vocab, rel=1e-6)


def test_perplexity_scores_next_token() -> None:
    """A model that puts its mass on the *next* token has perplexity ~1; one that predicts the current
    token (off by one) has a large one: position t is scored against token t+1."""
    vocab = 13
    ids = _windows(vocab=vocab)

    def oracle(shift):
        def make(x):
            target = torch.roll(x, -shift, dims=1)
            return 30.0 * nn.functional.one_hot(target, vocab).float()
        return make

    assert evaluation.perplexity(_LogitModel(oracle(1)), ids) == pytest.approx(1.0, abs=1e-6)
    assert evaluation.perplexity(_LogitModel(oracle(0)), ids) > vocab


def test_perplexity_tiny_llama_finite_and_batch_invariant(tiny_llama) -> None:
    """On tiny-llama: finite and > 1, and the same for batch size 1 and 4."""
    model, tok = tiny_llama
    windows = data.token_windows(tok, "tiny-llama", "synthetic", 5, 32)
    p4 = evaluation.perplexity(model, windows, batch_size=4)
    p1 = evaluation.perplexity(model, windows, batch_size=1)
    assert math.isfinite(p4) and p4 > 1
    assert p1 == pytest.approx(p4, rel=1e-5)


@pytest.mark.parametrize("shape", [(10,), (3, 1), (2, 3, 4)])
def test_perplexity_bad_shape(shape) -> None:
    """Windows must be [N, T] with T >= 2."""
    model = _LogitModel(lambda ids: torch.zeros(*ids.shape, 5))
    with pytest.raises(ValueError, match="windows must be"):
        evaluation.perplexity(model, torch.zeros(shape, dtype=torch.long))


# ------------------------------------------------------------------------------------- plotting


def _figure() -> plt.Figure:
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1, 2], [1, 3, 2], label="tiny-llama")
    ax.set_title("test")
    ax.legend()
    return fig


def test_save_figure_requires_manifest() -> None:
    """Figures go to the active notebook's directory: none active, no save."""
    fig = _figure()
    try:
        with pytest.raises(RuntimeError):
            style.save_figure(fig, "figX_test")
    finally:
        plt.close(fig)


def test_save_figure_png_pdf_deterministic(tmp_path: Path) -> None:
    """PNG and PDF are written to out_dir, the PNG path is returned and listed, and saving again gives
    byte-identical files (no timestamps in the PDF)."""
    manifest.start(_cfg(tmp_path))
    fig = _figure()
    try:
        png = style.save_figure(fig, "figX_test")
        pdf = png.with_suffix(".pdf")
        first_pdf, first_png = pdf.read_bytes(), png.read_bytes()
        style.save_figure(fig, "figX_test")
    finally:
        plt.close(fig)
    assert png == tmp_path / "out" / "figX_test.png"
    assert first_png.startswith(b"\x89PNG") and first_pdf.startswith(b"%PDF")
    assert b"CreationDate" not in first_pdf
    assert pdf.read_bytes() == first_pdf
    assert png.read_bytes() == first_png
    assert "figX_test.png" in manifest.current().figures


def test_apply_style_and_names() -> None:
    """The style sets TrueType PDF fonts; registry keys get display names and a fixed colour each."""
    with matplotlib.rc_context():
        plt.rcParams["pdf.fonttype"] = 3
        style.apply_style()
        assert plt.rcParams["pdf.fonttype"] == 42 and plt.rcParams["savefig.bbox"] == "tight"
    assert style.display_name("tiny-llama") == models.REGISTRY["tiny-llama"].display
    assert style.display_name("unregistered") == "unregistered"
    assert set(style.MODEL_COLORS) == set(models.REGISTRY)
    assert style.MODEL_COLORS["tiny-llama"] != style.MODEL_COLORS["tiny-gpt2"]


def test_record_converts_inside_dicts(tmp_path: Path) -> None:
    """NaN and numpy scalars nested in a dict become plain JSON (NaN -> null)."""
    manifest.start(_cfg(tmp_path))
    manifest.record("m/d", {"a": float("nan"), "b": np.float32(1.5), "c": torch.tensor([1, 2])})
    data = json.loads((tmp_path / "out" / "manifest.json").read_text())  # strict JSON: no bare NaN
    assert data["records"][0]["value"] == {"a": None, "b": 1.5, "c": [1, 2]}


def test_unserialisable_record_does_not_poison_the_manifest(tmp_path: Path) -> None:
    """A bad value raises a clear TypeError and later records still work."""
    manifest.start(_cfg(tmp_path))
    with pytest.raises(TypeError, match="cannot record 'm/bad'"):
        manifest.record("m/bad", object())
    manifest.record("m/good", 1)
    keys = [r["key"] for r in json.loads((tmp_path / "out" / "manifest.json").read_text())["records"]]
    assert keys == ["m/good"]


def test_manifest_is_world_readable_and_lists_figures_once(tmp_path: Path) -> None:
    manifest.start(_cfg(tmp_path))
    fig = _figure()
    style.save_figure(fig, "figY")
    style.save_figure(fig, "figY")
    path = tmp_path / "out" / "manifest.json"
    assert path.stat().st_mode & 0o044 == 0o044
    assert json.loads(path.read_text())["figures"] == ["figY.png"]
