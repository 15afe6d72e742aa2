"""Faults (issue 9 §3): a real crash (SIGKILL) in the middle of every cached, resumable step (GGUF
conversion, a fine-tune, the decomposition cache, the surgical search, an Inheritune run, a manifest or
cache write) leaves nothing half-written where a reader looks, and the next run resumes from what was saved.

Each crash happens in a forked child of the test process (``_crash``). The child plants a patch that
SIGKILLs it at the moment under test, then runs the real code. A SIGKILL cannot be caught: no ``finally``,
no ``atexit``, no flush of Python's buffers, so what is on disk is what the OOM killer or a pre-empted node
would leave. The child is forked rather than started with ``sys.executable`` because a fresh interpreter
spends ~6 s importing torch/transformers/peft on 2 cores, which would put this file far over the unit
tier's budget; a forked child inherits the imports and the module fixtures, and its memory is its own.
The next run is the test process itself, reading only what the child left on disk.

Every test first checks that the kill came at the planted moment (exit code -9, and on disk the
half-written file or the unpublished temp directory it was writing), so if the code wrote in place the
truncated file would be where the reader looks, and the test would fail.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NoReturn

import pytest
import torch
import transformers.trainer
from safetensors.torch import load_file
from tiny_families import sharpen, single_thread
from torch import nn
from transformers import LlamaForCausalLM, TrainerState

from common.core import cache, data, evaluation, layer_inputs, manifest, models, progress, tasks
from common.core.env import cache_dir
from common.core.profiles import DETECTION_PROMPTS, GPTConfig, PretrainSettings, TrainSettings
from common.hoc import detection, finetune, macdrop
from common.inheritune import training
from common.sfsd import decomposition, experiments
from common.sfsd import search as sfsd_search

pytestmark = pytest.mark.usefixtures("one_thread")

KEY = "tiny-llama"
GGUF_KEY = "smollm2-135m"  # any GGUF registry entry: its GGUF-only steps are faked (``_fake_gguf``)


# ----------------------------------------------------------------------------------------- crashing


def _die() -> NoReturn:
    """SIGKILL this process now."""
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable: SIGKILL returned")


def _crash(scenario: Callable[[], Any], timeout: float = 120.0) -> None:
    """Run ``scenario`` in a forked child and check that the child SIGKILLed itself (exit code -9) rather
    than finishing (exit code 0: the planted moment never came) or raising (1: its traceback is in the
    captured stderr)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            torch.set_num_threads(1)
            scenario()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)  # never return into pytest
    deadline = time.monotonic() + timeout
    while (status := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the child hung for {timeout:.0f} s")
        time.sleep(0.02)
    code = os.waitstatus_to_exitcode(status[1])
    assert code == -signal.SIGKILL, f"the child exited with {code} instead of dying at the planted moment"


def _half_dump(obj: Any, fp: io.TextIOBase, **kw: Any) -> NoReturn:
    """Stand-in for ``json.dump``: write the first half of the JSON, flush it to the OS, die."""
    text = json.dumps(obj, **kw)
    fp.write(text[: len(text) // 2])
    fp.flush()
    _die()


def _truncate_then_die(path: str | Path) -> NoReturn:
    """Cut a file that was just written to half its size, then die (killed halfway through writing it)."""
    os.truncate(path, os.path.getsize(path) // 2)
    _die()


def _die_on_replace(is_target: Callable[[Path, Path], bool]) -> None:
    """Make ``os.replace`` die instead of renaming when ``is_target(src, dst)``."""
    real = os.replace

    def replace(src, dst, **kw):
        if is_target(Path(src), Path(dst)):
            _die()
        real(src, dst, **kw)

    os.replace = replace


def _parses(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------------- GGUF conversion


def _fake_gguf(setattr_: Callable[[Any, str, Any], None], conversions: list[str]) -> None:
    """Fake the GGUF-only steps of ``convert_gguf``: the "GGUF file" is four bytes and loading it with
    ``gguf_file=`` gives ``tiny-llama`` (appending to ``conversions``); loading the float cache stays real."""
    real_tok, real_model = models.AutoTokenizer, models.AutoModelForCausalLM

    class Tok:
        @staticmethod
        def from_pretrained(path, **kw):
            return models.byte_tokenizer() if "gguf_file" in kw else real_tok.from_pretrained(path, **kw)

    class Model:
        @staticmethod
        def from_pretrained(path, **kw):
            if "gguf_file" not in kw:
                return real_model.from_pretrained(path, **kw)
            conversions.append(kw["gguf_file"])
            return models._build_tiny(KEY)

    setattr_(models, "_assemble_gguf", lambda _src, dest: (dest.write_bytes(b"GGUF"), dest)[1])
    setattr_(models, "AutoTokenizer", Tok)
    setattr_(models, "AutoModelForCausalLM", Model)


@pytest.mark.parametrize("moment", ["mid_weights", "before_rename"])
def test_gguf_conversion_killed_is_redone(monkeypatch: pytest.MonkeyPatch, moment: str) -> None:
    """Kill ``load_model`` of a GGUF model while the float weights are half on disk, or after the
    conversion finished (COMPLETE written) but before its directory was renamed into place: no cache
    directory exists afterwards (an in-place write would leave one without its full weights); the next
    ``load_model`` converts once more, undisturbed by the killed run's temp dir or a stale one under its own
    pid, and returns tiny-llama's exact weights; the one after that reads the cache."""
    spec = models.get_spec(GGUF_KEY)
    final = models.float_cache_path(spec)

    def scenario() -> None:
        _fake_gguf(setattr, [])
        if moment == "mid_weights":
            real_save = LlamaForCausalLM.save_pretrained

            def save(self, out, **kw):
                real_save(self, out, **kw)
                _truncate_then_die(next(Path(out).glob("*.safetensors")))

            LlamaForCausalLM.save_pretrained = save
        else:
            _die_on_replace(lambda src, dst: dst == final)
        models.load_model(GGUF_KEY)

    _crash(scenario)
    assert not final.exists()
    (left,) = final.parent.glob(f".{final.name}.tmp-*")
    assert (left / "hf" / "COMPLETE").exists() == (moment == "before_rename")  # killed where planted
    stale = final.parent / f".{final.name}.tmp-{os.getpid()}"  # a killed run whose pid this process reuses
    shutil.copytree(left, stale)
    (stale / "hf" / "stale.txt").write_text("from a killed run")

    conversions: list[str] = []
    _fake_gguf(monkeypatch.setattr, conversions)
    model, tok = models.load_model(GGUF_KEY)
    assert conversions == ["model.gguf"]
    assert json.loads((final / "COMPLETE").read_text()) == {"gguf_sha256": spec.gguf.sha256}
    assert not (final / "stale.txt").exists() and not stale.exists()
    want = models._build_tiny(KEY).state_dict()
    got = model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert tok("héllo")["input_ids"] == models.byte_tokenizer()("héllo")["input_ids"]
    models.load_model(GGUF_KEY)
    assert conversions == ["model.gguf"]


# ------------------------------------------------------------------------------------------ fine-tune


STEPS = 6  # 12 examples, batch 2, one epoch; a checkpoint every 2 steps


@dataclass
class _Tuning:
    layer: int
    channels: list[int]
    train: list[dict]
    settings: TrainSettings
    reference: finetune.FineTune

    def run(self) -> finetune.FineTune:
        return finetune.finetune(KEY, finetune.ARMS["lora_macdrop"], 0, self.settings, self.train, self.layer,
                                 self.channels)


@pytest.fixture(scope="module")
def tuning(tmp_path_factory: pytest.TempPathFactory) -> _Tuning:
    """lora_macdrop on tiny-llama (the planted massive layer), and its uninterrupted run in its own cache."""
    with single_thread(), pytest.MonkeyPatch.context() as mp:
        mp.setenv("REPRO_CACHE", str(tmp_path_factory.mktemp("uninterrupted")))
        model, tok = models.load_model(KEY)
        layer, channels = detection.massive_weights(model, [models.encode(tok, KEY, p) for p in DETECTION_PROMPTS],
                                                  k=5)
        train = data.tokenize_pairs(tok, KEY, data.instruction_pairs("synthetic", "train", 2 * STEPS), 128)
        settings = TrainSettings(rank=4, alpha=8, lr=1e-3, epochs=1, batch_size=2, grad_accum=1, max_len=128,
                                 save_steps=2)
        t = _Tuning(layer, channels, train, settings, None)
        t.reference = t.run()
    assert t.reference.steps == STEPS and [h["step"] for h in t.reference.macdrop] == list(range(1, STEPS + 1))
    return t


def _count_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The optimizer steps the Trainer takes from now on (seen by MacDrop before each optimizer step)."""
    steps: list[int] = []
    real = macdrop.MacDropCallback.on_pre_optimizer_step

    def spy(self, args, state, control, **kw):
        steps.append(state.global_step + 1)
        return real(self, args, state, control, **kw)

    monkeypatch.setattr(macdrop.MacDropCallback, "on_pre_optimizer_step", spy)
    return steps


def _plant_finetune_kill(moment: str) -> None:
    """In the child: SIGKILL at ``moment`` of the fine-tune (see the test)."""
    if moment == "after_checkpoint":  # the first checkpoint is complete, MacDrop's history included
        real_on_save = macdrop.MacDropCallback.on_save

        def on_save(self, args, state, control, **kw):
            real_on_save(self, args, state, control, **kw)
            if state.global_step == 2:
                _die()

        macdrop.MacDropCallback.on_save = on_save
    elif moment == "mid_trainer_state":  # checkpoint-4's trainer_state.json half written
        real_state = TrainerState.save_to_json

        def save_to_json(self, path):
            real_state(self, path)
            if self.global_step == 4:
                _truncate_then_die(path)

        TrainerState.save_to_json = save_to_json
    elif moment == "before_callbacks_save":  # checkpoint-4 written and checkpoint-2 rotated away by the
        real_rotate = transformers.trainer.rotate_checkpoints  # Trainer, before any callback's on_save

        def rotate(*a, **kw):
            real_rotate(*a, **kw)
            if Path(kw["output_dir"], "checkpoint-4").is_dir():
                _die()

        transformers.trainer.rotate_checkpoints = rotate
    else:  # "publishing": trained, the result staged with COMPLETE, not yet renamed into place
        _die_on_replace(lambda src, dst: dst.parent.name == "finetune" and src.name.endswith(".tmp"))


#: moment -> (the optimizer steps the resumed run takes, the checkpoints the killed run leaves)
RESUMES = {
    "after_checkpoint": (list(range(3, STEPS + 1)), ["checkpoint-2"]),
    "mid_trainer_state": (list(range(3, STEPS + 1)), ["checkpoint-2", "checkpoint-4"]),
    "before_callbacks_save": ([5, 6], ["checkpoint-4"]),
    "publishing": ([], [f"checkpoint-{STEPS}"]),
}


@pytest.mark.parametrize("moment", list(RESUMES))
def test_finetune_killed_resumes_from_its_last_checkpoint(tuning: _Tuning, monkeypatch: pytest.MonkeyPatch,
                                                          moment: str) -> None:
    """Kill a MacDrop fine-tune (6 steps, checkpoints every 2) right after its first checkpoint, halfway
    through writing checkpoint-4's trainer_state.json, between the Trainer's checkpoint-4 (the older one
    already rotated away) and the callbacks' on_save, or while publishing the finished result: no result
    directory exists; the next call resumes from the last *complete* checkpoint (its global step continues,
    it never trains from 0 or reads the broken state) and ends exactly where the uninterrupted run ends:
    6 steps, the same log, MacDrop's history of every step, the same adapter."""
    _crash(lambda: (_plant_finetune_kill(moment), tuning.run()))
    root = cache_dir() / "finetune"
    (work,) = root.glob("*.work")
    assert not (root / work.name.removesuffix(".work")).exists()  # no result where finetune() looks
    resumed_steps, left = RESUMES[moment]
    assert sorted(p.name for p in work.glob("checkpoint-*")) == left
    if moment == "mid_trainer_state":
        assert not _parses(work / "checkpoint-4" / "trainer_state.json")

    steps = _count_steps(monkeypatch)
    result = tuning.run()
    ref = tuning.reference
    assert steps == resumed_steps
    assert result.steps == STEPS and [e["step"] for e in result.log] == list(range(1, STEPS + 1))
    assert [e["loss"] for e in result.log] == pytest.approx([e["loss"] for e in ref.log], rel=1e-5)
    assert result.macdrop == ref.macdrop  # every step's p, drop rate and masks, also those before the kill
    got, want = (load_file(r.path / "adapter_model.safetensors") for r in (result, ref))
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)
    assert (result.path / "COMPLETE").exists() and not work.exists()
    assert tuning.run().macdrop == ref.macdrop and steps == resumed_steps  # now cached: nothing trains


# ------------------------------------------------------------------ decompositions and surgical search


@dataclass
class _Search:
    model: nn.Module
    calibration: torch.Tensor
    decomps: dict[str, decomposition.Decomposition]
    windows: layer_inputs.LayerInputs  # the perplexity search's split
    chunks: list[evaluation.MultipleChoice]  # the task search's chunks and split
    split: evaluation.MultipleChoice
    references: dict[str, sfsd_search.SearchState] = field(default_factory=dict)
    evaluations: dict[str, int] = field(default_factory=dict)

    def run(self, criterion: str, state_path: Path | None) -> sfsd_search.SearchState:
        if criterion == "perplexity":
            return sfsd_search.perplexity_search(self.model, self.decomps, self.windows, "feature", 1.03, 2,
                                             state_path=state_path)
        return sfsd_search.task_search(self.model, self.decomps, self.chunks, self.split, "feature", 0.0, 2,
                                   state_path=state_path)


def _count_evaluations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every score a search computes from now on: a perplexity or a task accuracy (the bases and each
    candidate rank), one entry each."""
    calls: list[int] = []
    for cls, name in ((layer_inputs.LayerInputs, "perplexity"), (evaluation.MultipleChoice, "accuracy")):
        real = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda self, start=0, real=real: calls.append(start) or real(self, start))
    return calls


@pytest.fixture(scope="module")
def search() -> _Search:
    """``sharp`` tiny-llama of test_lowrank_search.py (decoder projections x10, LM head x30, so that layers
    matter), its decompositions, windows sampled from itself for the perplexity search, the commonsense
    task's chunks and split for the task search, and each search uninterrupted (a mix of rank-1,
    intermediate and dense decisions) with its number of evaluations."""
    with single_thread(), pytest.MonkeyPatch.context() as mp:
        model, tok = models.load_model(KEY)
        sharpen(model)
        g = torch.Generator().manual_seed(0)
        calibration = torch.randint(3, 259, (8, 24), generator=g)
        decomps = decomposition.decompose_model(model, calibration, batch_size=4)
        ids = torch.full((16, 1), tok.bos_token_id)
        with torch.no_grad():
            for _ in range(23):
                ids = torch.cat([ids, torch.multinomial(model(ids).logits[:, -1].softmax(-1), 1, generator=g)], 1)
        splits = experiments.task_splits(tasks.build_docs("commonsense", 60, 0), chunk=0.1, search=0.4)

        def scorer(docs: list[dict]) -> evaluation.MultipleChoice:
            return evaluation.multiple_choice(model, tok, KEY, docs, tasks.LOCAL_TASKS["commonsense"].metric, 16,
                                           tasks.TARGET_DELIMITER)

        s = _Search(model, calibration, decomps, layer_inputs.LayerInputs(model, ids, batch_size=8),
                    [scorer(c) for c in splits.chunks], scorer(splits.search))
        for criterion in ("perplexity", "task"):
            calls = _count_evaluations(mp)
            s.references[criterion] = s.run(criterion, None)
            s.evaluations[criterion] = len(calls)
            kept = [step["rank"] for step in s.references[criterion].steps]
            assert None in kept and 1 in kept and any(r not in (None, 1) for r in kept)
            mp.undo()
    return s


def test_decomposition_cache_killed_mid_layer_resumes_at_that_layer(search: _Search, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Kill ``decompose_model(cache=...)`` halfway through writing layer 2's safetensors: layers 0-1 are
    cached, layer 2 only as a truncated temp file (written in place, ``layer_02.safetensors`` would be
    truncated and read back); the next call loads 0-1, computes only 2-3, and gives the uncached result."""
    folder = tmp_path / "decompositions"

    def scenario() -> None:
        real_save = decomposition.save_file

        def save(tensors, path, metadata=None):
            real_save(tensors, path, metadata=metadata)
            if "layer_02" in Path(path).name:
                _truncate_then_die(path)

        decomposition.save_file = save
        decomposition.decompose_model(search.model, search.calibration, batch_size=4, cache=folder)

    _crash(scenario)
    assert sorted(p.name for p in folder.iterdir()) == ["layer_00.safetensors", "layer_01.safetensors",
                                                        "layer_02.tmp"]
    computed: list[int] = []
    monkeypatch.setattr(progress, "report", lambda task, done, total=None, note="": computed.append((done, total)))
    resumed = decomposition.decompose_model(search.model, search.calibration, batch_size=4, cache=folder)
    assert computed == [(1, 2), (2, 2)]  # layers 2 and 3 only: the two the crash left undone
    assert list(resumed) == list(search.decomps)
    assert decomposition.decomposition_digest(resumed) == decomposition.decomposition_digest(search.decomps)
    for p, d in search.decomps.items():
        for a, b in zip(d.svd, resumed[p].svd, strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize(("criterion", "moment"), [("perplexity", "after_save"), ("perplexity", "mid_save"),
                                                  ("task", "mid_save")])  # a task search costs 5 s
def test_search_killed_resumes_without_recomputing(search: _Search, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch, criterion: str,
                                                   moment: str) -> None:
    """Kill a surgical search (perplexity or task criterion) right after its state was saved for the 3rd
    module, or halfway through writing that save: the state file parses and holds the first 3 (or 2)
    decisions; the next call resumes there, scores only the remaining modules' candidates (never the bases
    again) and chooses exactly the uninterrupted run's ranks."""
    path = tmp_path / "search.json"

    def scenario() -> None:
        real_save = sfsd_search.SearchState.save

        def save(self, p):
            if len(self.steps) == 3 and moment == "mid_save":
                json.dump = _half_dump
            real_save(self, p)
            if len(self.steps) == 3:
                _die()

        sfsd_search.SearchState.save = save
        search.run(criterion, path)

    _crash(scenario)
    done = 3 if moment == "after_save" else 2
    ref = search.references[criterion]
    assert json.loads(path.read_text())["steps"] == ref.steps[:done]
    calls = _count_evaluations(monkeypatch)
    state = search.run(criterion, path)
    assert state.steps == ref.steps and state.ranks == ref.ranks and state.base == ref.base
    assert len(calls) == sum(len(s["tried"]) for s in ref.steps[done:])
    assert len(calls) < search.evaluations[criterion]  # the bases and the first modules are not redone
    assert json.loads(path.read_text())["steps"] == ref.steps


# ----------------------------------------------------------------------------------------- Inheritune


def _gpt_run(stream: torch.Tensor, val: torch.Tensor, s: PretrainSettings) -> training.Run:
    model, init = training.random_init(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=16), 0)
    return training.train("r", model, init, stream, val, s)


@pytest.mark.parametrize("moment", ["mid_checkpoint", "publishing"])
def test_inheritune_killed_resumes_from_its_checkpoint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                       moment: str) -> None:
    """Kill an 8-step GPT run (checkpoints every 2 steps) halfway through writing its step-4 checkpoint,
    or after training while publishing the run: the last complete checkpoint (step 2, or 6) is intact and
    no run is cached; the next call trains only the steps after it and gives the uninterrupted run."""
    s = PretrainSettings(steps=8, batch_size=4, lr=1e-2, warmup=2, eval_interval=2, ckpt_interval=2, n_val=4)
    stream = torch.tensor(list(b"abcdefg") * 200, dtype=torch.uint8)
    val = training.val_windows(stream, 4, 16)

    def scenario() -> None:
        if moment == "mid_checkpoint":
            real_save = torch.save

            def save(obj, f, *a, **kw):
                real_save(obj, f, *a, **kw)
                if obj["step"] == 4:
                    _truncate_then_die(f)

            torch.save = save
        else:
            _die_on_replace(lambda src, dst: dst.parent.name == "inheritune")
        _gpt_run(stream, val, s)

    _crash(scenario)
    root = cache_dir() / "inheritune"
    (work,) = root.glob("*.work")
    assert not (root / work.name.removesuffix(".work")).exists()
    start = 2 if moment == "mid_checkpoint" else 6
    assert torch.load(work / "ckpt.pt", weights_only=True)["step"] == start

    calls: list[int] = []
    real_batch = training.train_batch
    monkeypatch.setattr(training, "train_batch", lambda stream, step, *a: calls.append(step) or real_batch(stream, step, *a))
    resumed = _gpt_run(stream, val, s)
    assert calls == list(range(start, 8))
    monkeypatch.setenv("REPRO_CACHE", str(tmp_path / "uninterrupted"))
    straight = _gpt_run(stream, val, s)
    assert resumed.window_losses == straight.window_losses and resumed.curve == straight.curve
    assert not work.exists()


# -------------------------------------------------------------------------------- manifest and cache


@pytest.mark.parametrize("moment", ["mid_dump", "at_replace"])
def test_manifest_write_killed_keeps_the_previous_manifest(tmp_path: Path, moment: str) -> None:
    """Kill ``record`` halfway through writing the manifest JSON, or just before its rename: manifest.json
    still parses and is the previous manifest (written in place it would be truncated), the half-written
    temp file is a dot-file beside it; the next run's manifest replaces it cleanly."""
    cfg = SimpleNamespace(notebook="99_faults", profile="smoke", out_dir=tmp_path / "figures", seed=0)
    m = manifest.start(cfg)
    manifest.record("tiny-llama/a", 1.0)
    before = manifest.load(m.path)

    def scenario() -> None:
        if moment == "mid_dump":
            json.dump = _half_dump
        else:
            _die_on_replace(lambda src, dst: dst.name == "manifest.json")
        manifest.record("tiny-llama/b", list(range(1000)))

    _crash(scenario)
    assert manifest.load(m.path) == before
    (stray,) = (p for p in cfg.out_dir.iterdir() if p.name != "manifest.json")
    assert stray.name.startswith(".manifest.json.") and _parses(stray) == (moment == "at_replace")

    manifest.start(cfg)
    manifest.record("tiny-llama/a", 1.0)
    manifest.record("tiny-llama/b", list(range(1000)))
    assert [r["key"] for r in manifest.load(m.path)["records"]] == ["tiny-llama/a", "tiny-llama/b"]


@pytest.mark.parametrize("moment", ["mid_dump", "at_replace"])
def test_cache_write_killed_is_recomputed(moment: str) -> None:
    """Kill ``cached`` halfway through writing its result, or just before the rename: no entry exists at
    the cache path (written in place, a truncated one would be read back and fail to parse); the next call
    computes once and stores a complete entry; the one after reads it."""
    calls: list[int] = []

    def compute() -> dict:
        calls.append(1)
        return {"values": list(range(1000))}

    def scenario() -> None:
        if moment == "mid_dump":
            json.dump = _half_dump
        else:
            _die_on_replace(lambda src, dst: dst.suffix == ".json")
        cache.cached("faults", {"n": 1000}, compute)

    _crash(scenario)
    path = cache.cache_path("faults", {"n": 1000})
    assert not path.exists() and len(list(path.parent.iterdir())) == 1  # the half-written temp file only
    assert cache.cached("faults", {"n": 1000}, compute) == {"values": list(range(1000))} and calls == [1]
    assert json.loads(path.read_text())["result"] == {"values": list(range(1000))}
    assert cache.cached("faults", {"n": 1000}, compute) == {"values": list(range(1000))} and calls == [1]

