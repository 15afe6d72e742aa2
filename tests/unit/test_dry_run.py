"""The random-weight dry run's plumbing (DESIGN §2, issue 9 §1): the DRY_RUNS overlay of the paper profile,
where its outputs go, the paper datasets (pins, the download lock, the offline errors, the dry run's
substitution), and ``common.core.profiling`` (model FLOPs, MFU) with bench/paper_dryrun.py's table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from common import REPO_ROOT
from common.core import data, env, models, prepare, profiles, profiling, tasks

NB03 = "03_macdrop_finetuning"


@pytest.fixture
def dry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPRO_WEIGHTS", "random")


# ------------------------------------------------------------------------------------------ config


def test_random_weights_reads_and_checks_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset: None; 'random': shrink 1 unless REPRO_RANDOM_SHRINK says otherwise; bad values name the fix."""
    assert env.random_weights() is None
    monkeypatch.setenv("REPRO_WEIGHTS", "random")
    assert env.random_weights() == 1
    monkeypatch.setenv("REPRO_RANDOM_SHRINK", "16")
    assert env.random_weights() == 16
    for bad in ("0", "-2", "x"):
        monkeypatch.setenv("REPRO_RANDOM_SHRINK", bad)
        with pytest.raises(ValueError, match="positive integer"):
            env.random_weights()
    monkeypatch.setenv("REPRO_WEIGHTS", "zeros")
    with pytest.raises(ValueError, match="only value is 'random'"):
        env.random_weights()


def test_dry_run_overlays_the_paper_profile_only(dry: None) -> None:
    """Under REPRO_WEIGHTS=random the paper config takes DRY_RUNS' values (small data, few paper tasks, one
    epoch) and keeps the rest (models, arms, bf16, gradient checkpointing); smoke and small are untouched."""
    paper = profiles.PROFILES["paper"][NB03]
    cfg = profiles.load_config(NB03, "paper")
    assert cfg.dry_run and profiles.is_dry_run("paper")
    assert cfg.corpus == "wiki" and cfg.tasks == profiles.DRY_RUNS["paper"][NB03]["tasks"]
    assert all(t in tasks.PAPER_TASKS for t in (*cfg.tasks, *cfg.grid_tasks))  # the paper-task path, on stand-ins
    assert cfg.runs == paper.runs and cfg.settings.bf16 and cfg.settings.gradient_checkpointing
    assert cfg.settings.epochs == 1 and paper.settings.epochs == 3
    for profile in ("smoke", "small"):
        assert not profiles.is_dry_run(profile)
        cfg = profiles.load_config(NB03, profile)
        assert not cfg.dry_run and (cfg.corpus, cfg.settings) == (profiles.PROFILES[profile][NB03].corpus,
                                                                   profiles.PROFILES[profile][NB03].settings)


def test_every_paper_notebook_has_a_dry_run_on_local_data(dry: None, tmp_path) -> None:
    """Each paper notebook's dry run reads nothing from the hub: corpora are replaced, and its tasks are paper
    tasks (so the paper-task branch runs, issue 18) whose lm-eval sources are local stand-in configs."""
    for notebook in profiles.PROFILES["paper"]:
        assert notebook in profiles.DRY_RUNS["paper"] and notebook in profiles.SHRUNK_DRY_RUNS["paper"]
        cfg = profiles.load_config(notebook, "paper")
        names = [t for n in ("tasks", "sweep_tasks", "grid_tasks") for t in getattr(cfg, n, ())]
        names += [cfg.task] if getattr(cfg, "task", "") else []
        assert all(t in tasks.PAPER_TASKS for t in names), notebook
        assert all(isinstance(s, dict) for s in tasks.paper_sources(sorted(set(names)), 4, tmp_path))


def test_shrunk_dry_run_shortens_sequences(dry: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """REPRO_RANDOM_SHRINK > 1 adds SHRUNK_DRY_RUNS (the CPU test's sizes); at 1 the paper's 4096 stays."""
    nb = "01_massive_activation_origin"
    assert profiles.load_config(nb, "paper").window_len == 4096
    monkeypatch.setenv("REPRO_RANDOM_SHRINK", "16")
    assert profiles.load_config(nb, "paper").window_len == profiles.SHRUNK_DRY_RUNS["paper"][nb]["window_len"] < 4096


def test_dry_run_writes_outside_the_committed_figures(dry: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dry run's manifest and figures go to build/figures/paper-dryrun/, never to figures/paper/."""
    cfg = profiles.load_config(NB03, "paper")
    assert cfg.out_dir == REPO_ROOT / "build" / "figures" / "paper-dryrun" / NB03 and cfg.run_name == "paper-dryrun"
    assert profiles.run_name("paper") == "paper-dryrun" and profiles.run_name("small") == "small"  # common.reporting.run's copies
    monkeypatch.delenv("REPRO_WEIGHTS")
    assert profiles.load_config(NB03, "paper").out_dir == REPO_ROOT / "figures" / "paper" / NB03
    assert profiles.run_name("paper") == "paper"


def test_shipped_configs_have_the_paper_shapes() -> None:
    """Every paper model now has a shipped config; Llama-2-7B/13B have their published shapes."""
    assert all(s.config_file for s in models.REGISTRY.values() if s.source == "hub")
    shapes = {k: models.random_config(models.get_spec(k)) for k in ("llama-2-7b", "llama-2-13b")}
    assert (shapes["llama-2-7b"].num_hidden_layers, shapes["llama-2-7b"].intermediate_size) == (32, 11008)
    assert (shapes["llama-2-13b"].hidden_size, shapes["llama-2-13b"].num_attention_heads) == (5120, 40)


# -------------------------------------------------------------------------------------------- data


def test_dry_run_replaces_every_paper_corpus(dry: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the dry run every paper corpus reads the wiki split instead (never the hub)."""
    fake = [{"title": "A", "extract": "doc a"}]
    monkeypatch.setattr(data, "wiki_split", lambda split: fake)
    monkeypatch.setattr(data, "dataset_rows", lambda *a: pytest.fail("the dry run must not read a hub dataset"))
    for corpus in ("wikitext2", "c4", "pg19", "openwebtext"):
        assert data.corpus_texts(corpus, "heldout") == ["doc a"]


def test_paper_corpus_reads_its_pinned_revision(monkeypatch: pytest.MonkeyPatch) -> None:
    """A paper corpus is loaded from its repo/config/split at the pinned commit, and its text column is used."""
    calls = []

    def load_dataset(repo, cfg, split, revision):
        calls.append((repo, cfg, split, revision))
        return {"text": ["row one", "row two"]}

    import datasets
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert data.corpus_texts("wikitext2", "heldout") == ["row one", "row two"]
    spec = data.PAPER_DATA["wikitext2"]
    assert calls == [(spec.repo, "wikitext-2-raw-v1", "test", spec.revision)] and len(spec.revision) == 40
    with pytest.raises(ValueError, match="pg19 has no 'train' split"):
        data.corpus_texts("pg19", "train")
    with pytest.raises(ValueError, match="known: wiki, synthetic, wikitext2"):
        data.corpus_texts("redpajama")


def test_unpinned_dataset_needs_its_download_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unpinned dataset (pg19) without a lock entry says to run `make models PROFILE=paper`; once the lock
    names a commit, that commit is read."""
    with pytest.raises(FileNotFoundError, match="make models PROFILE=paper"):
        data.dataset_revision("pg19")
    lock = data.lock_path()
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"pg19": "f" * 40}))
    assert data.dataset_revision("pg19") == "f" * 40


def test_offline_dataset_error_names_the_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """datasets' own offline error becomes a FileNotFoundError naming the command, with the cause chained."""
    import datasets

    def offline(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match="make models PROFILE=paper") as err:
        data.corpus_texts("c4", "heldout")
    assert isinstance(err.value.__cause__, ConnectionError)


def test_download_locks_unpinned_datasets_and_fetches_the_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    """download_paper_data resolves each unpinned dataset's current commit once (written to the lock), loads
    every split at its revision, and asks lm-eval for the paper tasks (which downloads their datasets)."""
    import datasets
    import huggingface_hub
    import lm_eval.tasks

    loaded, asked = [], []
    monkeypatch.setattr(datasets, "load_dataset", lambda repo, cfg, split, revision: loaded.append((repo, revision))
                        or _FakeRows())
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda self, repo: type("I", (), {"sha": "a" * 40}))
    monkeypatch.setattr(lm_eval.tasks, "get_task_dict", lambda names, manager: asked.append(names))
    revisions = prepare.download_paper_data()
    unpinned = [n for n, d in data.PAPER_DATA.items() if not d.revision]
    assert {n: revisions[n] for n in unpinned} == {n: "a" * 40 for n in unpinned}
    assert json.loads(data.lock_path().read_text()) == {n: "a" * 40 for n in unpinned}
    assert revisions["wikitext2"] == data.PAPER_DATA["wikitext2"].revision
    assert len(loaded) == sum(len(d.splits) for d in data.PAPER_DATA.values())
    assert asked == [list(tasks.PAPER_TASKS)]


class _FakeRows(dict):
    def train_test_split(self, **kwargs):
        return {"train": self, "test": self}


def test_alpaca_pairs_come_from_its_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """alpaca-gpt4 rows become prompt/response pairs (input appended to the instruction), split 95/5."""
    rows = [{"instruction": f"Do {i}", "input": "x" if i % 2 else "", "output": f"Done {i}"} for i in range(40)]
    monkeypatch.setattr(data, "dataset_rows", lambda name, split: rows)
    train = data.instruction_pairs("alpaca-gpt4", "train", None)
    val = data.instruction_pairs("alpaca-gpt4", "val", None)
    assert (len(train), len(val)) == (38, 2)
    assert {p["response"] for p in train}.isdisjoint({p["response"] for p in val})
    assert any("\n\nx" in p["prompt"] for p in train + val)


# --------------------------------------------------------------------------------------- profiling


def test_matmul_params_and_forward_flops() -> None:
    """2N + 4LdT, N = the linear weights (LM head included, embedding lookup not), on tiny-llama by hand."""
    model = models.load_model("tiny-llama")[0]
    c = model.config
    kv = c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    per_layer = 2 * c.hidden_size**2 + 2 * c.hidden_size * kv + 3 * c.hidden_size * c.intermediate_size
    n = c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size
    assert profiling.matmul_params(model) == n
    assert profiling.forward_flops(model, 100) == 2 * n + 4 * c.num_hidden_layers * c.hidden_size * 100
    with pytest.raises(ValueError, match="seq_len"):
        profiling.forward_flops(model, 0)


def test_peak_flops_unknown_on_cpu_unless_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """No peak on CPU (MFU is then not reported), REPRO_PEAK_TFLOPS overrides it."""
    assert profiling.peak_flops(torch.device("cpu")) is None
    monkeypatch.setenv("REPRO_PEAK_TFLOPS", "2.5")
    assert profiling.peak_flops(torch.device("cpu")) == 2.5e12


def test_perplexity_pass_reports_consistent_rates(monkeypatch: pytest.MonkeyPatch) -> None:
    """The timed pass's perplexity is evaluation.perplexity's; tokens/s, TFLOP/s and MFU agree with each other."""
    from common.core import evaluation

    model = models.load_model("tiny-llama")[0]
    windows = torch.randint(3, 259, (4, 32), generator=torch.Generator().manual_seed(0))
    monkeypatch.setenv("REPRO_PEAK_TFLOPS", "1")
    r = profiling.perplexity_pass(model, windows, batch_size=2)
    assert r["perplexity"] == pytest.approx(evaluation.perplexity(model, windows, 2), rel=1e-6)
    assert r["tokens"] == 128 and r["tokens_per_s"] == pytest.approx(128 / r["seconds"])
    assert r["tflops"] == pytest.approx(profiling.forward_flops(model, 32) * r["tokens_per_s"] / 1e12)
    assert r["mfu"] == pytest.approx(r["tflops"]) and r["peak_mem_mb"] is None


def test_paper_dryrun_table_on_shrunk_configs(dry: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """bench/paper_dryrun.py's measurement and table on a 16x-shrunk Llama-3-8B and GPT-2 medium (the same
    code a GPU box runs at full size) and a notebook manifest; MFU is 'n/a' on CPU."""
    monkeypatch.setenv("REPRO_RANDOM_SHRINK", "16")
    spec = importlib.util.spec_from_file_location("paper_dryrun", REPO_ROOT / "bench" / "paper_dryrun.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.model_rows(["llama-3-8b", "gpt2-medium"], n_windows=2, max_len=64)
    assert [r["seq_len"] for r in rows] == [64, 64] and all(r["tokens_per_s"] > 0 for r in rows)
    nb = tmp_path / "runs" / "01_massive_activation_origin"
    nb.mkdir(parents=True)
    (nb / "manifest.json").write_text(json.dumps({"run": {"wall_s": 90.0, "peak_rss_mb": 2048}}))
    failed = tmp_path / "runs" / "02_massive_weight_ablation"  # setup() ran, summary() never did
    failed.mkdir()
    (failed / "manifest.json").write_text(json.dumps({"run": {"seed": 0}}))
    path = bench.write(rows, bench.notebook_rows(tmp_path / "runs"), tmp_path / "docs")
    text = path.read_text()
    assert "shrunk 16x" in text and "| llama-3-8b | float32 |" in text and "| n/a |" in text
    assert "| 01_massive_activation_origin | ok | 1.5 | 2.0 | n/a |" in text
    assert "| 02_massive_weight_ablation | failed |" in text  # what passed is still written
    assert json.loads((tmp_path / "docs" / "paper_dryrun.json").read_text())["shrink"] == 16
