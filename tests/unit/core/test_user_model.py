"""``common.core.user_model`` (issue 23): your own model checked before any work (each bad input refused with what
to do), its BOS policy read off its tokenizer, its identity the sha256 of its weight files, and its entry in the
registry (``models.get_spec`` / ``load_model`` / ``encode`` / ``weights_id``) and in the manifest."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants
import pytest
import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tokenizer_models
from transformers import (
    AutoModelForCausalLM,
    BartConfig,
    BertConfig,
    HeliumConfig,
    LlamaConfig,
    MambaConfig,
    MixtralConfig,
    PreTrainedTokenizerFast,
)
from user_models import save_config_only, save_tiny_llama, using

from common import REPO_ROOT
from common.core import gpu, manifest, models, style, user_model


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    return save_tiny_llama(tmp_path / "my_tiny")


def _word_tokenizer(**kw) -> PreTrainedTokenizerFast:
    raw = Tokenizer(tokenizer_models.WordLevel({"<bos>": 0, "x": 1, "<unk>": 2}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, **kw)


# ------------------------------------------------------------------------------------------ BOS policy


def test_detect_bos_reads_the_tokenizer(byte_tok) -> None:
    """BOS first in ``tok("x")`` (a post-processor, or ``add_bos_token``): yes; a BOS token it does not add: no; no
    BOS token at all: no."""
    assert user_model.detect_bos(byte_tok)
    assert user_model.detect_bos(_word_tokenizer(bos_token="<bos>", add_bos_token=True))
    assert not user_model.detect_bos(_word_tokenizer(bos_token="<bos>"))
    assert not user_model.detect_bos(_word_tokenizer())


def test_parse_bos() -> None:
    assert (user_model.parse_bos("yes"), user_model.parse_bos("no"), user_model.parse_bos(None)) == (True, False, None)
    with pytest.raises(ValueError, match="yes or no"):
        user_model.parse_bos("true")


def test_bos_policy_detected_or_given(tiny_dir: Path, tmp_path: Path) -> None:
    """The byte tokenizer adds BOS: detected yes; ``bos=False`` overrides it; ``bos=True`` on a tokenizer without a
    BOS token is refused."""
    assert user_model.check_user_model(str(tiny_dir)).prepend_bos
    given = user_model.check_user_model(str(tiny_dir), bos=False)
    assert not given.prepend_bos and given.bos_given and given.describe()["bos_from"] == "--bos"
    no_bos = save_config_only(tmp_path / "no_bos", LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                              intermediate_size=128, vocab_size=3), tokenizer=False)
    _word_tokenizer().save_pretrained(no_bos)
    assert not user_model.check_user_model(str(no_bos)).prepend_bos
    with pytest.raises(ValueError, match="no BOS token: use --bos no"):
        user_model.check_user_model(str(no_bos), bos=True)


# ------------------------------------------------------------------------------------------ identity


def test_weights_sha256_is_the_files_and_follows_a_changed_weight(tiny_dir: Path) -> None:
    """One weight file: its own sha256 (what ``sha256sum`` prints); saving a changed weight changes it."""
    file_sha = hashlib.sha256((tiny_dir / "model.safetensors").read_bytes()).hexdigest()
    assert user_model.weights_sha256(tiny_dir) == file_sha
    assert user_model.check_user_model(str(tiny_dir)).sha256 == file_sha
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[0, 0] += 1e-3
    model.save_pretrained(tiny_dir)
    assert user_model.weights_sha256(tiny_dir) not in (file_sha, "")


def test_file_digests_memo_follows_the_file(tmp_path: Path) -> None:
    """The cached digest is keyed on the file's size and mtime: same-size new bytes are hashed again."""
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"a" * 64)
    first = user_model.file_digests([f])["model.safetensors"]
    st = f.stat()
    f.write_bytes(b"b" * 64)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    assert first == hashlib.sha256(b"a" * 64).hexdigest()
    assert user_model.file_digests([f])["model.safetensors"] == hashlib.sha256(b"b" * 64).hexdigest()


def test_combined_sha256_of_shards() -> None:
    """Shards: the sha256 of their ``sha256sum`` listing in name order, whatever order they come in."""
    digests = {"model-00002-of-00002.safetensors": "b" * 64, "model-00001-of-00002.safetensors": "a" * 64}
    listing = f"{'a' * 64}  model-00001-of-00002.safetensors\n{'b' * 64}  model-00002-of-00002.safetensors\n"
    assert user_model.combined_sha256(digests) == hashlib.sha256(listing.encode()).hexdigest()
    assert user_model.combined_sha256({"model.safetensors": "c" * 64}) == "c" * 64


def test_weight_files_are_the_safetensors_only(tmp_path: Path) -> None:
    """Shards in name order; a pickled *.bin is never a weight file, and a directory with only one is refused saying
    why (a pickle can run code)."""
    for name in ("pytorch_model.bin", "b.safetensors", "a.safetensors"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in user_model.weight_files(tmp_path)] == ["a.safetensors", "b.safetensors"]
    for name in ("a.safetensors", "b.safetensors"):
        (tmp_path / name).unlink()
    assert user_model.weight_files(tmp_path) == []
    LlamaConfig().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no weight files \(\*.safetensors\).*pytorch_model.bin \(\*.bin "
                                                r"checkpoints are pickles"):
        user_model.check_user_model(str(tmp_path))


def test_slug_and_key(tmp_path: Path) -> None:
    """A directory is named after itself, a hub id after the id; lower case, [a-z0-9.-] only."""
    (tmp_path / "My_Model v2").mkdir()
    assert user_model.key_for(str(tmp_path / "My_Model v2")) == "user-my-model-v2"
    assert user_model.slug("Qwen/Qwen2.5-0.5B") == "qwen-qwen2.5-0.5b"
    assert user_model.out_root("user-x", "smoke") == REPO_ROOT / "figures" / "user" / "x" / "smoke"


# ------------------------------------------------------------------------------------------ bad input


def test_empty_directory_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no config.json and no weight files .*found: nothing.*save_pretrained"):
        user_model.check_user_model(str(tmp_path))


def test_directory_without_weights_lists_what_it_found(tmp_path: Path) -> None:
    LlamaConfig().save_pretrained(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"no weight files \(\*.safetensors\); found: config.json, "
                                                r"notes.txt"):
        user_model.check_user_model(str(tmp_path))


def test_non_causal_config_is_refused(tmp_path: Path) -> None:
    """An encoder (BERT: it also has a causal head, but as an encoder) and an encoder-decoder (BART) are refused."""
    for name, config in (("bert", BertConfig()), ("bart", BartConfig())):
        save_config_only(tmp_path / name, config)
        with pytest.raises(ValueError, match=rf"{type(config).__name__} \(model_type '{name}'\), not a causal"):
            user_model.check_user_model(str(tmp_path / name))


def test_is_causal_lm() -> None:
    assert user_model.is_causal_lm(LlamaConfig()) and user_model.is_causal_lm(BertConfig(is_decoder=True))
    assert not user_model.is_causal_lm(BertConfig()) and not user_model.is_causal_lm(BartConfig())
    # the saved class decides: a Llama saved as a classifier has no LM head (loaded as a causal LM it would be random)
    assert user_model.is_causal_lm(LlamaConfig(architectures=["LlamaForCausalLM"]))
    assert user_model.is_causal_lm(LlamaConfig(architectures=["GPT2LMHeadModel"]))
    assert not user_model.is_causal_lm(LlamaConfig(architectures=["LlamaForSequenceClassification"]))


def test_too_large_for_the_machine_states_both_sizes(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The planner's bytes against this machine's (a host of 512 KiB here): refused before anything is loaded."""
    monkeypatch.setattr(gpu, "gpu_memory", lambda: [])
    monkeypatch.setattr(gpu, "host_memory", lambda: 2**19)
    with pytest.raises(MemoryError, match=r"too large.*0\.00 B parameters at ~0\.0 GiB in float32.*~0\.0 GiB usable "
                                          r"\(host memory"):
        user_model.check_user_model(str(tiny_dir))
    monkeypatch.setattr(gpu, "host_memory", lambda: 2**40)
    assert user_model.check_user_model(str(tiny_dir)).planned_bytes == gpu.weights(
        gpu.Shape.from_config(LlamaConfig.from_pretrained(tiny_dir)), torch.float32)


def test_room_is_the_gpus_when_there_are_some(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "gpu_memory", lambda: [80 * gpu.GiB, 80 * gpu.GiB])
    assert user_model.room() == (int(gpu.USABLE * 160 * gpu.GiB), "2 GPU(s) with 160.0 GiB")
    monkeypatch.setattr(gpu, "gpu_memory", lambda: [])
    monkeypatch.setattr(gpu, "host_memory", lambda: 10 * gpu.GiB)
    assert user_model.room()[0] == int(gpu.USABLE * 10 * gpu.GiB)


def test_layout_arch_cannot_infer_is_archs_error(tmp_path: Path) -> None:
    """A causal LM without attention layers (Mamba) gets ``arch``'s own error, listing what it found."""
    path = save_config_only(tmp_path / "mamba", MambaConfig(hidden_size=16, num_hidden_layers=2, vocab_size=300,
                                                            state_size=4))
    with pytest.raises(NotImplementedError, match="no accessors for model_type 'mamba'"):
        user_model.check_user_model(str(path))


def test_mixture_of_experts_is_refused_naming_the_library_path(tmp_path: Path) -> None:
    """The notebooks measure dense FFNs: a Mixtral is refused before any work, pointing at common.hoc.moe."""
    path = save_config_only(tmp_path / "moe", MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                           num_attention_heads=2, num_key_value_heads=1, vocab_size=300,
                                                           num_local_experts=4))
    with pytest.raises(NotImplementedError, match=r"mixture-of-experts model \(mixtral\).*common.hoc.moe"):
        user_model.check_user_model(str(path))


def test_layout_is_read_off_a_model_without_weights() -> None:
    """A table family directly; a type outside the table inferred from meta-device modules, norms probed at gain 1."""
    assert user_model.layout(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)).gate == "gate_proj"
    inferred = user_model.layout(HeliumConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=64))
    assert (inferred.up, inferred.down, inferred.norm_offset) == ("up_proj", "down_proj", 0.0)


def test_other_bad_references(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub id not in the cache names the download command; a file is not a directory; weights without a tokenizer
    say how to save one; the random-weight dry run is not for your own model."""
    with pytest.raises(FileNotFoundError, match=r"`hf download nobody/no-such-model-xyz`"):
        user_model.check_user_model("nobody/no-such-model-xyz")
    (tmp_path / "f.safetensors").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        user_model.check_user_model(str(tmp_path / "f.safetensors"))
    bare = save_config_only(tmp_path / "bare", LlamaConfig(), tokenizer=False)
    with pytest.raises(FileNotFoundError, match=r"tokenizer.save_pretrained"):
        user_model.check_user_model(str(bare))
    monkeypatch.setenv("REPRO_WEIGHTS", "random")
    with pytest.raises(ValueError, match="unset it"):
        user_model.check_user_model(str(bare))


def test_check_cli_exits_with_the_message(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=rf"--model {tmp_path}: .*no config.json"):
        user_model.check_cli(str(tmp_path))
    with pytest.raises(SystemExit, match="yes or no"):
        user_model.check_cli(str(tmp_path), "maybe")


# ------------------------------------------------------------------------------------------ runs


def test_notebook_numbers_default_and_refusals() -> None:
    assert user_model.notebook_numbers([]) == ["01", "02", "04", "05"]
    assert user_model.notebook_numbers(["1", "05"]) == ["1", "05"]
    for asked, why in ((["03"], "fine-tunes"), (["01", "6"], "builds on notebook 03")):
        with pytest.raises(ValueError, match=why):
            user_model.notebook_numbers(asked)


def test_activate_hands_the_model_to_the_environment(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``activate`` sets REPRO_MODEL (an absolute directory) and REPRO_MODEL_BOS only when the policy was given;
    ``requested`` / ``requested_key`` / ``active`` read them back."""
    with using(monkeypatch, "unused"):
        user_model.activate(user_model.check_user_model(str(tiny_dir), bos=False))
        assert user_model.requested() == (str(tiny_dir.resolve()), False)
        assert user_model.requested_key() == "user-my-tiny" == user_model.active().key
        user_model.activate(user_model.check_user_model(str(tiny_dir)))
        assert user_model.requested() == (str(tiny_dir.resolve()), None) and user_model.active().prepend_bos
    monkeypatch.delenv(user_model.MODEL_ENV)
    assert user_model.requested() is None and user_model.requested_key() == "" and user_model.active() is None


# ------------------------------------------------------------------------------------------ the registry


def test_registered_on_first_use(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch, byte_tok) -> None:
    """``get_spec`` registers the model REPRO_MODEL names; ``load_model``, ``encode``, ``weights_id``, ``model_config``
    and the figure style work on it unchanged; the planted circuit survives the round trip."""
    with using(monkeypatch, tiny_dir) as key:
        spec = models.get_spec(key)
        assert (spec.source, spec.prepend_bos, spec.path, spec.display) == ("local", True, str(tiny_dir.resolve()),
                                                                            "my_tiny")
        assert models.weights_id(key) == "sha256:" + hashlib.sha256((tiny_dir / "model.safetensors").read_bytes()).hexdigest()
        assert models.model_config(key).num_hidden_layers == 4
        model, tok = models.load_model(key)
        assert not model.training and models.loaded_dtype(key) == "float32"
        ids = models.encode(tok, key, "Summer")
        assert ids[0, 0].item() == tok.bos_token_id and ids.shape[1] == len("Summer") + 1
        assert model.model.layers[1].mlp.down_proj.weight[11, 37].item() == pytest.approx(3.0)
        assert style.display_name(key) == "my_tiny" and style.MODEL_COLORS[key] in style.PALETTE
    assert key not in models.REGISTRY


def test_bos_override_reaches_encode(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch, byte_tok) -> None:
    with using(monkeypatch, tiny_dir, bos="no") as key:
        assert models.encode(byte_tok, key, "ab").tolist() == [byte_tok("ab", add_special_tokens=False)["input_ids"]]


def test_a_bad_model_fails_on_first_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with using(monkeypatch, tmp_path) as key, pytest.raises(FileNotFoundError, match="no config.json"):
        models.get_spec(key)


def test_manifest_records_the_model(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A run of your own model: ``run.user_model`` holds its reference, BOS policy and per-file sha256."""
    with using(monkeypatch, tiny_dir) as key:
        m = manifest.start(SimpleNamespace(notebook="x", profile="smoke", seed=0, out_dir=tmp_path / "o", user_model=key))
        assert m.run["user_model"]["ref"] == str(tiny_dir.resolve())
        assert m.run["user_model"]["bos_from"] == "tokenizer" and m.run["user_model"]["prepend_bos"]
        assert set(m.run["user_model"]["files"]) == {"model.safetensors"}


def test_a_hub_id_loads_offline_from_the_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub id in the local hub cache: its snapshot's directory, source "hub", revision the snapshot's commit; it
    loads from there (never from the network) under the key of the id."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny"
    save_tiny_llama(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    user = user_model.check_user_model("org/tiny")
    assert (user.ref, user.source, user.revision, user.key) == ("org/tiny", "hub", commit, "user-org-tiny")
    with using(monkeypatch, "org/tiny") as key:
        spec = models.get_spec(key)
        assert (spec.source, spec.hub_id, spec.revision) == ("hub", "org/tiny", commit)
        model, _ = models.load_model(key)
        assert model.config.num_hidden_layers == 4 and models.weights_id(key) == f"sha256:{user.sha256}"
