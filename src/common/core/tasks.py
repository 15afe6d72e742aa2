"""Offline zero-shot tasks for lm-eval (HoC §2.3: ARC-E/ARC-C/PIQA by acc_norm, BoolQ/WinoGrande by acc).

The ``paper`` profile evaluates ``PAPER_TASKS`` with lm-eval's own hub datasets. Off the hub (``small``)
the same kinds of judgement come from local tasks built, seeded, from the **held-out** wiki split only
(``data.wiki_split("heldout")``; fine-tuning uses the train split) plus a small hand-written set:

- ``wiki_mc`` (ARC-like): which description fits a title; 3 distractors from the same topic. acc_norm.
- ``wiki_yesno`` (BoolQ-like, passage-free): is this description of the title correct? acc.
- ``wiki_topic``: the topic of an article's first sentence, among the corpus's topics. acc_norm.
- ``wiki_cloze``: the word blanked out of a sentence; distractors of similar length. acc_norm.
- ``commonsense`` (PIQA/ARC-easy flavour): hand-written ``task_data/commonsense.jsonl``. acc.

A doc is ``{"query", "choices", "gold"}``. Queries end without whitespace and choices start without
it: lm-eval scores ``query + target_delimiter + choice`` with ``target_delimiter=" "`` (as its own ARC and
PIQA tasks do), so the model sees exactly one space after "Answer:", and acc_norm divides by the
length of the choice text alone, as for lm-eval's tasks.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from common.core import data
from common.core.env import cache_dir, random_weights

PAPER_TASKS: dict[str, str] = {"arc_easy": "acc_norm", "arc_challenge": "acc_norm", "boolq": "acc",
                               "piqa": "acc_norm", "winogrande": "acc"}


TASK_DATA = Path(__file__).parent / "task_data"


#: lm-eval joins context and continuation with this; choices carry no leading space.
TARGET_DELIMITER = " "


#: ``wiki_topic`` uses the TOPIC_K most frequent held-out topics (ties by name), minus these.
TOPIC_K = 11


EXCLUDED_TOPICS = frozenset({"Uncategorized", ""})


#: Sentence length (words) admitted by ``wiki_topic`` / ``wiki_cloze``: keeps prompts short and whole.
MIN_WORDS, MAX_WORDS = 6, 48


N_DISTRACTORS = 3


Doc = dict  # {"query": str, "choices": list[str], "gold": int}


@dataclass(frozen=True)
class TaskSpec:
    """A local task: its lm-eval name, headline metric, a one-line description and its builder
    ``builder(n_items, seed) -> docs``."""
    name: str
    metric: str  # "acc" | "acc_norm"
    description: str
    builder: Callable[[int, int], list[Doc]]
    analogue: str = ""  # the HoC task it stands in for


def _rng(name: str, seed: int) -> random.Random:
    """A private generator per (task, seed): stable across machines, Python runs and call order."""
    return random.Random(int(hashlib.sha256(f"{name}:{seed}".encode()).hexdigest()[:16], 16))


def _clean(text: str | None) -> str:
    """Collapse all whitespace (extracts contain newlines) and strip."""
    return " ".join((text or "").split())


def _key(text: str) -> str:
    return text.casefold()


def _heldout() -> list[dict]:
    """The held-out articles, in the corpus's fixed (title) order. Never the train split."""
    return data.wiki_split("heldout")


def _too_many(name: str, n_items: int, available: int) -> None:
    if n_items > available:
        raise ValueError(f"{name}: asked for {n_items} items but its data allow at most {available}; "
                         "lower n_items")


def _make_choices(rng: random.Random, gold: str, distractors: list[str]) -> tuple[list[str], int]:
    """Shuffle gold among the distractors; return the choices and the gold index."""
    choices = [gold, *distractors]
    rng.shuffle(choices)
    return choices, choices.index(gold)


def _described_by_topic(articles: list[dict]) -> dict[str, list[tuple[str, str]]]:
    """topic -> [(title, description)] with descriptions distinct (case-insensitive) within the topic."""
    out: dict[str, list[tuple[str, str]]] = defaultdict(list)
    seen: dict[str, set[str]] = defaultdict(set)
    for a in articles:
        desc, topic = _clean(a.get("description")), _clean(a.get("topic"))
        if desc and _key(desc) not in seen[topic]:
            seen[topic].add(_key(desc))
            out[topic].append((_clean(a["title"]), desc))
    return out


_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def _sentences(extract: str) -> list[str]:
    return [s for s in _SENTENCE_SPLIT.split(_clean(extract)) if s]


def _mc_pool() -> list[tuple[str, str, list[str]]]:
    """(title, description, same-topic distractor candidates) for every usable held-out article."""
    pool = []
    for items in _described_by_topic(_heldout()).values():
        for title, desc in items:
            others = [d for _, d in items if _key(d) != _key(desc)]
            pool.append((title, desc, others))
    return sorted(pool, key=lambda p: p[0])


def build_wiki_mc(n_items: int, seed: int) -> list[Doc]:
    """4-way: "What is {title}?" -> the true description or 3 others from the same topic (ARC-like)."""
    rng = _rng("wiki_mc", seed)
    pool = [p for p in _mc_pool() if len(p[2]) >= N_DISTRACTORS]
    _too_many("wiki_mc", n_items, len(pool))
    docs = []
    for title, desc, others in rng.sample(pool, n_items):
        choices, gold = _make_choices(rng, desc, rng.sample(others, N_DISTRACTORS))
        docs.append({"query": f"Question: What is {title}?\nAnswer:", "choices": choices, "gold": gold})
    return docs


def build_wiki_yesno(n_items: int, seed: int) -> list[Doc]:
    """Passage-free yes/no (BoolQ-like): is the quoted description the title's? Half the items (exactly,
    for even ``n_items``) carry the true description (gold "yes"), half one from another article of the
    same topic (gold "no")."""
    rng = _rng("wiki_yesno", seed)
    pool = [p for p in _mc_pool() if p[2]]
    _too_many("wiki_yesno", n_items, len(pool))
    labels = [1] * (n_items - n_items // 2) + [0] * (n_items // 2)
    rng.shuffle(labels)
    docs = []
    for (title, desc, others), label in zip(rng.sample(pool, n_items), labels, strict=True):
        shown = desc if label else rng.choice(others)
        docs.append({"query": f'Question: Is "{shown}" a correct description of {title}?\nAnswer:',
                     "choices": ["no", "yes"], "gold": label})
    return docs


def topic_names(articles: list[dict] | None = None) -> list[str]:
    """The choices of ``wiki_topic``: the ``TOPIC_K`` most frequent held-out topics (excluding
    ``EXCLUDED_TOPICS``), in alphabetical order."""
    counts = Counter(_clean(a.get("topic")) for a in (_heldout() if articles is None else articles))
    ranked = sorted((t for t in counts if t not in EXCLUDED_TOPICS), key=lambda t: (-counts[t], t))
    return sorted(ranked[:TOPIC_K])


def build_wiki_topic(n_items: int, seed: int) -> list[Doc]:
    """"{first sentence}\\nTopic:" -> one of the topic names; items drawn round-robin over topics (seeded),
    so topics are as balanced as the data allow."""
    rng = _rng("wiki_topic", seed)
    articles = _heldout()
    names = topic_names(articles)
    if len(names) < 2:
        raise ValueError(f"wiki_topic needs at least 2 topics in the held-out split, found {names}")
    by_topic: dict[str, list[str]] = {t: [] for t in names}
    for a in articles:
        topic = _clean(a.get("topic"))
        sents = _sentences(a["extract"])
        if topic in by_topic and sents and MIN_WORDS <= len(sents[0].split()) <= MAX_WORDS:
            by_topic[topic].append(sents[0])
    _too_many("wiki_topic", n_items, sum(map(len, by_topic.values())))
    queues = {t: rng.sample(s, len(s)) for t, s in by_topic.items()}
    order = rng.sample(names, len(names))
    picked: list[tuple[str, str]] = []
    while len(picked) < n_items:
        for t in order:
            if queues[t] and len(picked) < n_items:
                picked.append((t, queues[t].pop()))
    rng.shuffle(picked)
    return [{"query": f"{sent}\nTopic:", "choices": list(names), "gold": names.index(t)} for t, sent in picked]


_WORD = re.compile(r"(?<![\w'’-])([a-z]{4,})(?![\w'’-])")


_STOPWORDS = frozenset("""
about above after again against also although among another because been before being below between both
could does doing down during each either else even ever every from further have having here hers herself
himself however into itself just least less many might more most much must neither never none only other
others ought over same several shall should since some such than that their theirs them themselves then
there these they this those though through thus together under unless until upon very were what whatever
when where whether which while whom whose will with within without would your yours also often became become
known called include includes including used using usually
""".split())


def _content_words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text) if w not in _STOPWORDS]


def build_wiki_cloze(n_items: int, seed: int) -> list[Doc]:
    """"{sentence with ____}\\nThe missing word is:" -> the blanked word (lower-case, 4+ letters, not in
    the title, once in its sentence) or 3 words of similar length (+-1 letter) from other held-out
    extracts that do not occur in this article."""
    rng = _rng("wiki_cloze", seed)
    articles = _heldout()
    vocab = [set(_content_words(_clean(a["extract"]))) for a in articles]
    by_len: dict[int, list[str]] = defaultdict(list)
    for w in sorted(set().union(*vocab)):
        by_len[len(w)].append(w)
    candidates: list[tuple[int, list[tuple[str, str]]]] = []
    for i, a in enumerate(articles):
        title = _clean(a["title"]).casefold()
        cands = []
        for sent in _sentences(a["extract"]):
            if not MIN_WORDS <= len(sent.split()) <= MAX_WORDS:
                continue
            counts = Counter(w.casefold() for w in re.findall(r"[A-Za-z]+", sent))
            for w in _content_words(sent):
                if w not in title and counts[w] == 1:
                    cands.append((sent, w))
        if cands:
            candidates.append((i, cands))
    _too_many("wiki_cloze", n_items, len(candidates))
    docs = []
    for i, cands in rng.sample(candidates, len(candidates)):
        if len(docs) == n_items:
            break
        sent, word = rng.choice(cands)
        near = [w for d in (0, -1, 1) for w in by_len.get(len(word) + d, ()) if w not in vocab[i]]
        if len(near) < N_DISTRACTORS:
            continue
        choices, gold = _make_choices(rng, word, rng.sample(near, N_DISTRACTORS))
        blanked = _WORD.sub(lambda m, w=word: "____" if m.group(1) == w else m.group(0), sent)
        docs.append({"query": f"{blanked}\nThe missing word is:", "choices": choices, "gold": gold})
    _too_many("wiki_cloze", n_items, len(docs))
    return docs


@cache
def commonsense_items() -> tuple[Doc, ...]:
    """The hand-written items shipped in ``task_data/commonsense.jsonl`` (checked on load)."""
    path = TASK_DATA / "commonsense.jsonl"
    items = tuple(json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    for k, doc in enumerate(items):
        _check_doc(doc, f"{path.name}:{k + 1}")
    return items


def build_commonsense(n_items: int, seed: int) -> list[Doc]:
    """A seeded sample of the hand-written PIQA/ARC-easy-style items, choices reshuffled per seed."""
    rng = _rng("commonsense", seed)
    items = commonsense_items()
    _too_many("commonsense", n_items, len(items))
    docs = []
    for item in rng.sample(items, n_items):
        choices, gold = _make_choices(rng, item["choices"][item["gold"]],
                                      [c for k, c in enumerate(item["choices"]) if k != item["gold"]])
        docs.append({"query": item["query"], "choices": choices, "gold": gold})
    return docs


LOCAL_TASKS: dict[str, TaskSpec] = {s.name: s for s in [
    TaskSpec("wiki_mc", "acc_norm", "4-way: which description fits the title (same-topic distractors)",
             build_wiki_mc, analogue="ARC-E / ARC-C"),
    TaskSpec("wiki_yesno", "acc", "yes/no: is this description of the title correct (balanced)",
             build_wiki_yesno, analogue="BoolQ"),
    TaskSpec("wiki_topic", "acc_norm", "topic of an article's first sentence, among the corpus topics",
             build_wiki_topic, analogue="topic classification"),
    TaskSpec("wiki_cloze", "acc_norm", "4-way cloze: the word blanked out of a sentence",
             build_wiki_cloze, analogue="WinoGrande-like fill-in"),
    TaskSpec("commonsense", "acc", "hand-written everyday physics and facts, 2-4 choices",
             build_commonsense, analogue="PIQA / ARC-easy"),
]}


def _check_doc(doc: Doc, where: str) -> None:
    """A doc is well formed: non-empty query without trailing space, >=2 distinct stripped choices, valid gold."""
    choices = doc.get("choices")
    ok = (isinstance(doc.get("query"), str) and doc["query"] and doc["query"] == doc["query"].rstrip()
          and isinstance(choices, list) and len(choices) >= 2
          and all(isinstance(c, str) and c and c == c.strip() for c in choices)
          and len({_key(c) for c in choices}) == len(choices)
          and isinstance(doc.get("gold"), int) and 0 <= doc["gold"] < len(choices))
    if not ok:
        raise ValueError(f"malformed task doc ({where}): {doc!r}")


def _spec(name: str) -> TaskSpec:
    if name not in LOCAL_TASKS:
        raise ValueError(f"unknown local task {name!r}; available local tasks: {', '.join(LOCAL_TASKS)}"
                         f" (lm-eval hub tasks for the paper profile: {', '.join(PAPER_TASKS)})")
    return LOCAL_TASKS[name]


def build_docs(name: str, n_items: int, seed: int = 0) -> list[Doc]:
    """``n_items`` docs ``{"query", "choices", "gold"}`` of local task ``name``; a function of
    ``(name, n_items, seed)`` and the corpus only. ValueError for an unknown task or too many items."""
    spec = _spec(name)
    if not isinstance(n_items, int) or n_items < 1:
        raise ValueError(f"n_items must be a positive int, got {n_items!r}")
    docs = spec.builder(n_items, seed)
    if len(docs) != n_items:
        raise RuntimeError(f"{name}: built {len(docs)} docs, expected {n_items}")
    for k, doc in enumerate(docs):
        _check_doc(doc, f"{name}[{k}]")
    return docs


ItemCounts = int | Mapping[str, int] | None  # one count for every task, a count per task, or None: all (paper tasks)


def items_per_task(names: list[str] | tuple[str, ...], n_items: ItemCounts) -> dict[str, int | None]:
    """How many docs each of ``names`` gets: ``n_items`` for every task (an int, or None: every doc of a paper task),
    or ``n_items[name]`` from a mapping, which must name exactly ``names`` (issue 20: a fixed-size task such as
    commonsense, 60 items, runs whole beside wiki tasks of several hundred)."""
    if not isinstance(n_items, Mapping):
        return {name: n_items for name in names}
    missing, extra = [n for n in names if n not in n_items], [n for n in n_items if n not in names]
    if missing or extra:
        raise ValueError(f"n_items must give a count for each task and no other: missing {missing}, extra {extra}; "
                         f"tasks {list(names)}")
    return {name: n_items[name] for name in names}


def describe_items(names: list[str] | tuple[str, ...], n_items: ItemCounts) -> str:
    """``"wiki_mc 150, commonsense 60 items (210 in all)"`` or ``"20 items each"``, for records' notes."""
    if not isinstance(n_items, Mapping):
        return f"{n_items or 'all'} items each"
    counts = items_per_task(names, n_items)
    return f"{', '.join(f'{n} {c}' for n, c in counts.items())} items ({sum(counts.values())} in all)"


def metric(name: str) -> str:
    """The headline metric of a local or paper task (acc / acc_norm)."""
    if name in PAPER_TASKS:
        return PAPER_TASKS[name]
    return _spec(name).metric


def chance_level(name: str, docs: list[Doc]) -> float:
    """Expected accuracy of a uniform random guess: the mean of 1/len(choices) over ``docs``
    (0.25 for the 4-way tasks, 0.5 for yes/no, 1/K for topics)."""
    metric(name)
    if not docs:
        raise ValueError("chance_level needs at least one doc")
    return sum(1.0 / len(d["choices"]) for d in docs) / len(docs)


def docs_path(name: str, n_items: int, seed: int, root: Path) -> Path:
    """Where ``materialise`` writes a task's docs."""
    return Path(root) / f"{name}-n{n_items}-s{seed}.jsonl"


def lm_eval_task_config(name: str, docs_path: str | os.PathLike, task: str | None = None) -> dict:
    """Inline lm-eval task config (lm-eval ``TaskConfig`` as a dict) reading the JSONL at ``docs_path``
    (made absolute: datasets resolves relative paths against the CWD) of local task ``name``, registered as
    ``task`` (default ``name``; a paper task's name for its dry-run stand-in). Zero-shot, multiple choice,
    acc and acc_norm; datasets' Arrow files go next to the docs, not to ``~/.cache``, and are rebuilt on
    every load."""
    _spec(name)
    path = Path(docs_path).resolve()
    return {
        "task": task or name,
        "dataset_path": "json",
        # datasets fingerprints local files by path and mtime, not content: never trust its Arrow cache
        # (re-parsing a few hundred lines costs milliseconds).
        "dataset_kwargs": {"data_files": {"test": str(path)}, "cache_dir": str(path.parent / ".hf_datasets"),
                           "download_mode": "force_redownload"},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{query}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "gold",
        "target_delimiter": TARGET_DELIMITER,
        "num_fewshot": 0,
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
        "metadata": {"version": 1.0},
    }


def _jsonl(docs: list[Doc]) -> str:
    return "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)


def _write(path: Path, text: str) -> None:
    """Write ``text`` atomically (temporary file + rename); an unchanged file is left untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def materialise(names: list[str], n_items: ItemCounts, seed: int, root: str | os.PathLike) -> list[dict]:
    """Write each task's docs (``items_per_task``) to ``root/<name>-n<n>-s<seed>.jsonl`` (atomic: temporary file +
    rename; an unchanged file is left untouched) and return the inline lm-eval configs, in ``names`` order."""
    configs = []
    for name, n in items_per_task(names, n_items).items():
        path = docs_path(name, n, seed, Path(root))
        _write(path, _jsonl(build_docs(name, n, seed)))
        configs.append(lm_eval_task_config(name, path))
    return configs


#: Under the paper dry run (``REPRO_WEIGHTS=random``: no hub) each paper task is lm-eval-loaded from local docs
#: under its own name, so the paper-task code path runs on CPU: (local task whose docs stand in, seed).
#: WinoGrande's stand-in keeps its multiple-input form (one context per choice, one shared continuation).
STAND_INS = {"arc_easy": ("wiki_mc", 0), "arc_challenge": ("wiki_mc", 1), "boolq": ("wiki_yesno", 0),
             "piqa": ("commonsense", 0), "winogrande": ("wiki_cloze", 0)}


STAND_IN_ITEMS = 40  # docs of a stand-in asked for "all" (n_items None)


def _winogrande_docs(docs: list[Doc], seed: int) -> list[dict]:
    """wiki_cloze docs in WinoGrande's schema: the sentence with "_", the gold word and one distractor."""
    rng = _rng("winogrande-stand-in", seed)
    out = []
    for d in docs:
        sentence = d["query"].split("\n")[0].replace("____", "_")
        gold, other = d["choices"][d["gold"]], d["choices"][(d["gold"] + 1) % len(d["choices"])]
        first = rng.random() < 0.5
        out.append({"sentence": sentence, "option1": gold if first else other, "option2": other if first else gold,
                    "answer": "1" if first else "2"})
    return out


def _wg_text(doc: dict) -> int:  # lm-eval's WinoGrande: the gold option's index, one context per option
    return {"1": 0, "2": 1}[doc["answer"]]


def _wg_target(doc: dict) -> str:
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


def _wg_choice(doc: dict) -> list[str]:
    head = doc["sentence"][:doc["sentence"].index("_")]
    return [head + doc["option1"], head + doc["option2"]]


def stand_in(name: str, n_items: int | None, root: str | os.PathLike) -> dict:
    """The dry-run lm-eval config of paper task ``name``: local docs (``STAND_INS``) under the paper task's
    name and metric (WinoGrande's with its multiple-input functions)."""
    if name not in STAND_INS:
        raise ValueError(f"no stand-in for {name!r}; paper tasks: {', '.join(STAND_INS)}")
    local, seed = STAND_INS[name]
    n = STAND_IN_ITEMS if n_items is None else n_items
    docs = build_docs(local, n, seed)
    path = Path(root) / "stand-ins" / f"{name}-n{n}-s{seed}.jsonl"
    if name != "winogrande":
        _write(path, _jsonl(docs))
        return lm_eval_task_config(local, path, task=name)
    _write(path, _jsonl(_winogrande_docs(docs, seed)))
    config = lm_eval_task_config(local, path, task=name)
    config.update(doc_to_text=_wg_text, doc_to_target=_wg_target, doc_to_choice=_wg_choice,
                  metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}])
    return config


def paper_sources(names: list[str], n_items: int | None, root: str | os.PathLike) -> list[str | dict]:
    """What lm-eval loads for paper tasks: their names (hub datasets), or under the dry run their stand-ins."""
    unknown = [n for n in names if n not in PAPER_TASKS]
    if unknown:
        raise ValueError(f"{unknown} are not paper tasks ({', '.join(PAPER_TASKS)})")
    if random_weights() is None:
        return list(names)
    return [stand_in(n, n_items, root) for n in names]


def requests(name: str, n_items: int | None, seed: int = 0, root: str | os.PathLike | None = None) -> list[dict]:
    """Each doc's log-likelihood requests as lm-eval scores them: ``{"pairs": [[context, continuation], ...]
    (one per choice), "choices", "gold"}``, for a local task (``n_items`` docs of ``build_docs``) or a paper
    task (its first ``n_items`` evaluation docs, None: all, built by lm-eval's own ``construct_requests``:
    WinoGrande's per-choice contexts included; its stand-in under the dry run, ``root`` holding the docs)."""
    if name in LOCAL_TASKS:
        return [{"pairs": [[d["query"], TARGET_DELIMITER + c] for c in d["choices"]], "choices": d["choices"],
                 "gold": d["gold"]} for d in build_docs(name, n_items, seed)]
    if name not in PAPER_TASKS:
        raise ValueError(f"unknown task {name!r}; local: {', '.join(LOCAL_TASKS)}; paper: {', '.join(PAPER_TASKS)}")
    # lm-eval loads slowly: imported only when a paper task is asked for
    from lm_eval.tasks import TaskManager, get_task_dict

    source = paper_sources([name], n_items, root or cache_dir() / "tasks")[0]
    task = get_task_dict([source], TaskManager(include_defaults=isinstance(source, str)))[name]
    task.build_all_requests(limit=n_items, rank=0, world_size=1)
    by_doc: dict[int, list] = defaultdict(list)
    for inst in task.instances:
        by_doc[inst.doc_id].append(inst)
    docs = []
    for doc_id in sorted(by_doc):
        insts = sorted(by_doc[doc_id], key=lambda i: i.idx)
        doc = insts[0].doc
        choices = list(task.doc_to_choice(doc))
        gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
        docs.append({"pairs": [list(i.arguments) for i in insts], "choices": choices,
                     "gold": choices.index(gold) if isinstance(gold, str) else int(gold)})
    return docs
