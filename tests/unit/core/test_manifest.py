"""``common.core.manifest``: atomic JSON records, run metadata, the summary. Nothing is written into the repo."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

from common.core import env, manifest, models

NB = "01_massive_activation_origin"


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


def test_record_model_records_the_precision_its_numbers_have(tmp_path: Path, monkeypatch) -> None:
    """run.dtypes[key]: the dtype load_model last loaded the model in (bf16 here), or the one given; nothing for a
    model never loaded in this process."""
    monkeypatch.setattr(models, "_LOADED_DTYPES", {})
    manifest.start(_cfg(tmp_path))
    manifest.record_model("tiny-llama")
    assert "dtypes" not in manifest.load(manifest.current().path)["run"]  # never loaded: no precision to state
    models.load_model("tiny-llama", dtype=torch.bfloat16)
    manifest.record_model("tiny-llama")
    manifest.record_model("tiny-gpt2", dtype="float32")
    assert manifest.load(manifest.current().path)["run"]["dtypes"] == {"tiny-llama": "bfloat16", "tiny-gpt2": "float32"}
    models.load_model("tiny-llama")  # the default on CPU
    manifest.record_model("tiny-llama")
    assert manifest.load(manifest.current().path)["run"]["dtypes"]["tiny-llama"] == "float32"


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


def test_lock_drift_names_each_version_the_lock_does_not_pin(tmp_path) -> None:
    """A recorded version other than the lock's is named with the lock's; torch's build tag is not a version; a
    library the run did not record, or the lock does not pin, is no drift."""
    lock = tmp_path / "gpu.lock"
    lock.write_text("torch==2.13.0   # via x\nTransformers==5.25.0\nlm_eval==0.4.13\n")
    pins = manifest.lock_pins(lock)
    same = {"versions": {"torch": "2.13.0+cpu", "transformers": "5.25.0", "peft": "0.21.2", "lm_eval": "0.4.13"}}
    assert manifest.lock_drift(same, pins) == []
    old = {"versions": {"torch": "2.12.1+cu128", "transformers": "5.24.0", "lm_eval": None}}
    assert manifest.lock_drift(old, pins) == ["torch 2.12.1 (lock 2.13.0)", "transformers 5.24.0 (lock 5.25.0)"]
    assert manifest.lock_drift({}, pins) == []
