"""Your own model (issue 23): a directory written by ``save_pretrained`` (or a hub id already in the local hub
cache) run through notebooks 01, 02, 04 (the pretrained models' attention only) and 05 in place of a profile's
models, on that profile's data and settings.

``python -m common.reporting.run --model REF [--bos yes|no]`` calls ``check_user_model`` before any work and hands
the model to the notebook kernels in ``REPRO_MODEL`` / ``REPRO_MODEL_BOS`` (``activate``). ``profiles.load_config``
then puts its key, ``user-<slug>``, in those notebooks' model fields (``overrides``) and their outputs under
``figures/user/<slug>/<profile>/``; ``models.get_spec`` registers it on first use (a ``ModelSpec`` made on the fly,
loaded from its directory, identified by the sha256 of its weight files). Imports only the core's bottom
(``env``, ``gpu``, ``cache``) and ``arch``: ``models`` and ``profiles`` import it."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from common import REPO_ROOT
from common.core import arch, gpu
from common.core.cache import cached
from common.core.env import random_weights, sha256_file

MODEL_ENV, BOS_ENV = "REPRO_MODEL", "REPRO_MODEL_BOS"
PREFIX = "user-"

#: The notebooks that run on your own model, and why the other two do not.
NOTEBOOKS = ("01_massive_activation_origin", "02_massive_weight_ablation", "04_attention_degeneration_inheritune",
             "05_lowrank_decomposition")
WHY_NOT = {"03": "notebook 03 fine-tunes LoRA/DoRA adapters per arm and seed (MacDrop): hours of training whose claims "
                 "compare the profile's own models",
           "06": "notebook 06 builds on notebook 03's adapters and on every notebook's results for the profile's models"}

#: Config fields naming one model (notebook 02's k-sweep, 04's attention maps, 05's searches) and notebook 04's
#: settings that leave out its self-trained GPTs (no training seeds, no step schedule: the sections are skipped).
SINGLE_MODEL_FIELDS = ("sweep_model", "example_model", "search_model")
PRETRAINED_ONLY = {"n_seeds": 0, "steps_schedule": ()}


@dataclass(frozen=True)
class UserModel:
    """A checked model: ``ref`` (an absolute directory, or the hub id), where it loads from, its BOS policy and
    the sha256 of each weight file."""
    ref: str
    path: Path
    source: str  # "local" | "hub"
    prepend_bos: bool
    bos_given: bool  # True: --bos; False: detected from the tokenizer
    files: dict[str, str]
    model_type: str
    planned_bytes: int
    revision: str = ""  # hub: the cached snapshot's commit

    @property
    def key(self) -> str:
        return key_for(self.ref)

    @property
    def sha256(self) -> str:
        return combined_sha256(self.files)

    def describe(self) -> dict:
        """What the manifest's run block records (``run.user_model``)."""
        return {"ref": self.ref, "source": self.source, "revision": self.revision or None,
                "model_type": self.model_type, "prepend_bos": self.prepend_bos,
                "bos_from": "--bos" if self.bos_given else "tokenizer", "sha256": self.sha256, "files": self.files}

    def summary(self) -> str:
        """One line for the runner: key, source, BOS policy, identity, planned weight memory."""
        return (f"your own model {self.key}: {self.model_type} from {self.ref}; BOS "
                f"{'prepended' if self.prepend_bos else 'not prepended'} ({'--bos' if self.bos_given else 'detected'}); "
                f"weights sha256:{self.sha256[:16]}…, ~{self.planned_bytes / gpu.GiB:.2f} GiB planned")


def slug(ref: str) -> str:
    """Folder name of ``ref``'s results: a directory's name, else the hub id, lower-cased, [a-z0-9.-] only."""
    path = Path(ref).expanduser()
    name = path.resolve().name if path.is_dir() else ref
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-.") or "model"


def key_for(ref: str) -> str:
    """The model key of ``ref`` in configs, manifests and caches: ``user-<slug>``."""
    return PREFIX + slug(ref)


def parse_bos(text: str | None) -> bool | None:
    """``yes`` / ``no`` -> True / False; None or "" -> None (detect from the tokenizer)."""
    if not text:
        return None
    if text not in ("yes", "no"):
        raise ValueError(f"BOS policy {text!r}: write yes or no, or leave it out to detect it from the tokenizer")
    return text == "yes"


def requested() -> tuple[str, bool | None] | None:
    """(ref, BOS override) from ``REPRO_MODEL`` / ``REPRO_MODEL_BOS``; None when no model of your own is set."""
    ref = os.environ.get(MODEL_ENV, "")
    return (ref, parse_bos(os.environ.get(BOS_ENV))) if ref else None


def requested_key() -> str:
    """The key of the model ``REPRO_MODEL`` names (no checks, nothing loaded), or ""."""
    found = requested()
    return key_for(found[0]) if found else ""


def active() -> UserModel | None:
    """The model the environment names, checked once per process (``check_user_model``), or None."""
    found = requested()
    return _checked(*found) if found else None


@cache
def _checked(ref: str, bos: bool | None) -> UserModel:
    return check_user_model(ref, bos)


def activate(user: UserModel) -> None:
    """Hand ``user`` to this process and the notebook kernels it starts (they inherit its environment)."""
    os.environ[MODEL_ENV] = user.ref
    if user.bos_given:
        os.environ[BOS_ENV] = "yes" if user.prepend_bos else "no"
    else:
        os.environ.pop(BOS_ENV, None)


def notebook_numbers(asked: list[str]) -> list[str]:
    """The notebook numbers a run of your own model executes: ``asked``, or 01, 02, 04, 05 when empty; a ValueError
    saying why for 03 and 06."""
    refused = [WHY_NOT[p.zfill(2)] for p in asked if p.zfill(2) in WHY_NOT]
    if refused:
        raise ValueError(f"your own model runs notebooks {', '.join(nb[:2] for nb in NOTEBOOKS)}: "
                         + "; ".join(refused))
    return asked or [nb[:2] for nb in NOTEBOOKS]


def overrides(notebook: str, cfg, key: str) -> dict:
    """The config values that run ``notebook`` on the model ``key`` instead of ``cfg``'s (a profile's config):
    every model field, notebook 04 without its self-trained GPTs, and ``user_model`` (where outputs go)."""
    if notebook not in NOTEBOOKS:
        raise ValueError(f"{notebook} does not run on your own model ({WHY_NOT.get(notebook[:2], 'unknown notebook')}); "
                         f"it runs notebooks {', '.join(NOTEBOOKS)}")
    values = {"user_model": key, "models": (key,)}
    values.update({name: key for name in SINGLE_MODEL_FIELDS if hasattr(cfg, name)})
    values.update({name: v for name, v in PRETRAINED_ONLY.items() if hasattr(cfg, name)})
    return values


def out_root(key: str, run_name: str, root: Path = REPO_ROOT / "figures") -> Path:
    """Where a run of your own model ``key`` on ``run_name`` writes under ``root`` (``figures``: figures and
    manifests; ``build``: executed notebooks): ``<root>/user/<slug>/<run_name>/``."""
    return root / "user" / key.removeprefix(PREFIX) / run_name


def resolve(ref: str) -> tuple[Path, str, str]:
    """(directory, "local" | "hub", revision) of ``ref``: an existing directory, else a hub id already in the local
    hub cache (never downloaded); FileNotFoundError naming the download command otherwise."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path.resolve(), "local", ""
    if path.exists():
        raise NotADirectoryError(f"{ref} is a file: give the directory save_pretrained wrote (config.json, weights, "
                                 "tokenizer) or a hub id")
    try:
        snapshot = Path(snapshot_download(ref, local_files_only=True))
    except (HFValidationError, LocalEntryNotFoundError) as err:
        raise FileNotFoundError(f"{ref} is neither a directory nor a model in the local hub cache: download it first, "
                                f"on a machine with hub access, with `hf download {ref}` (`huggingface-cli download "
                                f"{ref}` in older huggingface_hub), or give the directory save_pretrained wrote") from err
    return snapshot, "hub", snapshot.name


def weight_files(path: Path) -> list[Path]:
    """The weight files the suite reads in ``path``: its *.safetensors (one file or shards). Pickled ``*.bin``
    checkpoints are never loaded (a pickle can run code: the suite reads safetensors only, tests/test_security.py)."""
    return sorted(path.glob("*.safetensors"))


def file_digests(files: list[Path]) -> dict[str, str]:
    """sha256 of each file by name, memoised in the cache on path, size and modification time (a model of many GB
    is read once, not once per notebook)."""
    out = {}
    for f in files:
        st = f.stat()
        key = {"path": str(f.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        out[f.name] = cached("file_sha256", key, lambda f=f: {"sha256": sha256_file(f)})["sha256"]
    return out


def combined_sha256(digests: dict[str, str]) -> str:
    """The weights' identity: a single file's sha256; for shards, the sha256 of their ``sha256sum`` listing in name
    order (``sha256sum model-*.safetensors | sha256sum`` in the directory prints it)."""
    if len(digests) == 1:
        return next(iter(digests.values()))
    return hashlib.sha256("".join(f"{d}  {name}\n" for name, d in sorted(digests.items())).encode()).hexdigest()


def weights_sha256(path: Path) -> str:
    """``combined_sha256`` of the weight files in ``path``."""
    return combined_sha256(file_digests(weight_files(path)))


def is_causal_lm(config: PretrainedConfig) -> bool:
    """Whether ``config`` is a decoder-only language model: transformers has an AutoModelForCausalLM class for its
    type, it is no encoder-decoder, and no encoder (BERT, RoBERTa, ... have a masked-LM head and a causal head only
    when their config says ``is_decoder``), and the saved class, where the config names one, is a causal LM (a
    ``LlamaForSequenceClassification`` has no LM head: loaded as a causal LM its head would be random)."""
    kind = config.model_type
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or getattr(config, "is_encoder_decoder", False):
        return False
    causal = {n for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for n in ([v] if isinstance(v, str) else v)}
    if any(name not in causal for name in getattr(config, "architectures", None) or []):
        return False
    return kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES or bool(getattr(config, "is_decoder", False))


def detect_bos(tok: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer starts a text with its BOS token (as ``tok("x")`` encodes it; no BOS token: False)."""
    if tok.bos_token_id is None:
        return False
    ids = tok("x")["input_ids"]
    return bool(ids) and ids[0] == tok.bos_token_id


def room() -> tuple[int, str]:
    """(usable bytes, what they are) of this machine for a model's weights: the visible GPUs' memory (``device_map``
    spreads a model over them), else the host's, each at ``gpu.USABLE``."""
    gpus = gpu.gpu_memory()
    if gpus:
        return int(gpu.USABLE * sum(gpus)), f"{len(gpus)} GPU(s) with {sum(gpus) / gpu.GiB:.1f} GiB"
    return int(gpu.USABLE * gpu.host_memory()), f"host memory, {gpu.host_memory() / gpu.GiB:.1f} GiB (no GPU)"


def layout(config: PretrainedConfig) -> arch.Arch:
    """``arch``'s layout of the model ``config`` describes (``arch``'s own error when none fits), read off a copy
    without weights: modules on the meta device, only the norms (``arch`` probes their gain) on the host, at gain 1."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    for module in model.modules():
        own = dict(module.named_parameters(recurse=False))
        if own and all(p.ndim == 1 for p in own.values()):
            module.to_empty(device="cpu", recurse=False)
            with torch.no_grad():
                for name, p in module.named_parameters(recurse=False):
                    p.fill_(1.0 if name == "weight" else 0.0)
    return arch.arch_of(model)


def _tokenizer(path: Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        raise FileNotFoundError(f"{path} has no tokenizer transformers can load ({err}); save it beside the weights "
                                "with tokenizer.save_pretrained(dir)") from err


def check_user_model(ref: str, bos: bool | None = None) -> UserModel:
    """Everything that can be wrong with ``ref`` before any work, each refused with what to do: not a directory nor a
    cached hub model; no config.json or no weight files (saying what was found); a config that is no causal LM; a
    tokenizer missing, or without a BOS token under ``bos=True``; a layout ``arch`` cannot infer, or a mixture of
    experts (the notebooks measure dense FFNs; ``common.hoc.moe`` is the library's path); weights larger than this
    machine's memory (the planner's bytes against the GPUs', else the host's). ``bos``: the BOS policy (None:
    detected from the tokenizer). Returns the checked model, its weights hashed."""
    if random_weights() is not None:
        raise ValueError("REPRO_WEIGHTS=random is the paper models' dry run: unset it to run your own model")
    path, source, revision = resolve(ref)
    files, has_config = weight_files(path), (path / "config.json").exists()
    if not files or not has_config:
        lacks = [what for what, ok in (("config.json", has_config), ("weight files (*.safetensors)", files)) if not ok]
        found = sorted(p.name for p in path.iterdir())
        pickled = " (*.bin checkpoints are pickles, which the suite never loads: load and re-save the model, " \
                  "save_pretrained writes safetensors)" if any(n.endswith(".bin") for n in found) else ""
        raise FileNotFoundError(
            f"{path} has no {' and no '.join(lacks)}; found: {', '.join(found[:12]) or 'nothing'}{pickled}. Your own "
            "model is the directory model.save_pretrained(dir) and tokenizer.save_pretrained(dir) write: config.json, "
            "model.safetensors (or its shards) and the tokenizer files")
    config = AutoConfig.from_pretrained(path)
    if not is_causal_lm(config):
        raise ValueError(f"{ref} holds a {type(config).__name__} (model_type {config.model_type!r}), not a causal "
                         "language model: the notebooks need a decoder-only model that AutoModelForCausalLM loads")
    tok = _tokenizer(path)
    prepend = detect_bos(tok) if bos is None else bos
    if prepend and tok.bos_token_id is None:
        raise ValueError(f"BOS policy yes, but {ref}'s tokenizer has no BOS token: use --bos no")
    if layout(config).experts:
        raise NotImplementedError(
            f"{ref} is a mixture-of-experts model ({config.model_type}): the notebooks measure dense FFNs. Its experts "
            "are reached from the library: common.hoc.moe.massive_expert_weights (which layer, expert and channels), "
            "common.hoc.edits.zero_massive(..., expert=e) and common.hoc.macdrop.MacDrop(..., expert=e)")
    shape, dtype = gpu.Shape.from_config(config), gpu.weight_dtype(source, gpu.device())
    planned, (usable, where) = gpu.weights(shape, dtype), room()
    if planned > usable:
        raise MemoryError(f"{ref} is too large for this machine: the planner puts its {shape.params / 1e9:.2f} B "
                          f"parameters at ~{planned / gpu.GiB:.1f} GiB in {str(dtype).removeprefix('torch.')}, and "
                          f"this machine has ~{usable / gpu.GiB:.1f} GiB usable ({where}, {gpu.USABLE:.0%}): run it "
                          "on a machine with more memory")
    return UserModel(str(path) if source == "local" else ref, path, source, prepend, bos is not None,
                     file_digests(files), config.model_type, planned, revision)


def check_cli(ref: str, bos: str | None = None) -> UserModel:
    """``check_user_model`` for a command line (``bos``: "yes" / "no" / None): a problem exits with its message."""
    try:
        return check_user_model(ref, parse_bos(bos))
    except (OSError, ValueError, MemoryError, NotImplementedError) as err:
        raise SystemExit(f"--model {ref}: {err}") from err
