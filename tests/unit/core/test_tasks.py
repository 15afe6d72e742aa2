"""``common.core.tasks`` (offline zero-shot tasks) and ``evaluation.zero_shot`` / ``average_accuracy`` / the
bootstrap. The wiki corpus is replaced by a synthetic one (the real file is never read); lm-eval runs
end to end on the in-process ``tiny-llama``."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import numpy as np
import pytest

from common.core import data, env, evaluation, prefix_lm, tasks

TOPICS = ["Arts", "Biology", "Geography", "History", "People", "Technology"]
NOUNS = ["harbour", "village", "meadow", "castle", "bridge", "temple", "market", "garden", "forest", "valley",
         "island", "canal", "tower", "library", "museum", "orchard", "quarry", "lagoon", "glacier", "volcano"]
ADJS = ["ancient", "famous", "quiet", "northern", "coastal", "wooden", "crowded", "remote", "sacred", "narrow",
        "fertile", "rugged", "humble", "elegant", "stormy", "golden"]
VERBS = ["attracts", "protects", "borders", "overlooks", "supplies", "shelters", "connects", "feeds"]
PLANT_TITLE = "Zorblax Quintessence"  # a train-split article that must never surface in a task
PLANT_DESC = "Planted train-only zorblaxian contraption"
PLANT_WORD = "zorblaxian"
N_HELDOUT, N_TRAIN = 150, 60


def _fake_corpus() -> tuple[dict, ...]:
    """~210 synthetic articles {title, extract, description, topic}: 150 held-out (6 topics + a few
    'Uncategorized'), 60 train including the planted one."""
    rng = random.Random(7)
    heldout, train, k = [], [], 0
    while len(heldout) < N_HELDOUT or len(train) < N_TRAIN - 1:
        title = f"Fakeplace {k} {NOUNS[k % len(NOUNS)]}"  # a content word in the title: never blanked
        k += 1
        bucket = heldout if data.is_heldout(title) else train
        if len(bucket) >= (N_HELDOUT if bucket is heldout else N_TRAIN - 1):
            continue
        i = len(bucket)
        topic = "Uncategorized" if i % 25 == 24 else TOPICS[i % len(TOPICS)]
        words = lambda n: " ".join(rng.choice(ADJS + NOUNS) for _ in range(n))  # noqa: E731
        extract = (f"{title} is a {rng.choice(ADJS)} {rng.choice(NOUNS)} near the {words(3)} region.\n"
                   f"The {rng.choice(NOUNS)} {rng.choice(VERBS)} the {words(4)} every spring. "
                   f"Visitors {rng.choice(VERBS)} a {rng.choice(ADJS)} {rng.choice(NOUNS)} beside the {words(2)}.")
        desc = f"{rng.choice(ADJS).capitalize()} {rng.choice(NOUNS)} of {topic.lower()} number {i}"
        bucket.append({"title": title, "extract": extract, "description": desc if i % 10 else "", "topic": topic})
    plant = {"title": PLANT_TITLE, "description": PLANT_DESC, "topic": TOPICS[0],
             "extract": f"The {PLANT_WORD} gadget hums loudly beside every {PLANT_WORD}-free harbour at dusk."}
    assert not data.is_heldout(PLANT_TITLE)
    return tuple(sorted([*heldout, *train, plant], key=lambda a: a["title"]))


FAKE = _fake_corpus()
HELDOUT = [a for a in FAKE if data.is_heldout(a["title"])]
BY_TITLE = {a["title"]: a for a in FAKE}


@pytest.fixture(autouse=True)
def fake_wiki(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test here sees the synthetic corpus; reading the real one fails the test."""
    monkeypatch.setattr(data, "wiki_articles", lambda: FAKE)

    def _no_real_corpus():
        raise AssertionError("unit tests must not read the real wiki corpus")

    monkeypatch.setattr(data, "wiki_path", _no_real_corpus)


def _all_text(docs: list[dict]) -> str:
    return "\n".join(d["query"] + "\n" + "\n".join(d["choices"]) for d in docs)


# ------------------------------------------------------------------------------------------ builders


@pytest.mark.parametrize("name", list(tasks.LOCAL_TASKS))
def test_builders_are_deterministic_and_seeded(name: str) -> None:
    """Same (name, n, seed) -> identical docs; another seed -> different docs."""
    a, b = tasks.build_docs(name, 12, seed=0), tasks.build_docs(name, 12, seed=0)
    assert a == b and len(a) == 12
    assert tasks.build_docs(name, 12, seed=1) != a


@pytest.mark.parametrize("name", list(tasks.LOCAL_TASKS))
def test_docs_are_well_formed(name: str) -> None:
    """Gold is a valid index, choices distinct and unpadded, queries end without whitespace."""
    for d in tasks.build_docs(name, 20, seed=3):
        assert set(d) == {"query", "choices", "gold"}
        assert 0 <= d["gold"] < len(d["choices"]) and len(d["choices"]) >= 2
        assert len({c.casefold() for c in d["choices"]}) == len(d["choices"])
        assert all(c == c.strip() and c for c in d["choices"])
        assert d["query"] == d["query"].rstrip() and "  " not in d["query"]


@pytest.mark.parametrize("name", ["wiki_mc", "wiki_yesno", "wiki_topic", "wiki_cloze"])
def test_only_heldout_articles_are_used(name: str) -> None:
    """The planted train-split article (title, description, a word unique to its extract) never appears,
    nor does any other train title."""
    docs = tasks.build_docs(name, 40, seed=0)
    text = _all_text(docs)
    assert PLANT_TITLE not in text and PLANT_DESC not in text and PLANT_WORD not in text
    train_titles = {a["title"] for a in FAKE if not data.is_heldout(a["title"])}
    mentioned = set(re.findall(r"Fakeplace \d+ [a-z]+", text))
    assert mentioned and not (mentioned & train_titles)


def test_wiki_mc_gold_is_the_true_description() -> None:
    """Gold == the article's description; the 3 distractors are descriptions of the same topic."""
    topic_of = {a["description"]: a["topic"] for a in HELDOUT if a["description"]}
    for d in tasks.build_docs("wiki_mc", 30, seed=0):
        title = re.fullmatch(r"Question: What is (.+)\?\nAnswer:", d["query"]).group(1)
        art = BY_TITLE[title]
        assert d["choices"][d["gold"]] == art["description"] and len(d["choices"]) == 4
        assert all(topic_of[c] == art["topic"] for c in d["choices"])
    golds = Counter(d["gold"] for d in tasks.build_docs("wiki_mc", 60, seed=0))
    assert len(golds) == 4  # the gold position is shuffled


def test_wiki_yesno_is_balanced_and_correct() -> None:
    """Exactly half yes; 'yes' items show the title's description, 'no' items another of its topic."""
    for n, seed in [(20, 1), (20, 2), (40, 3), (6, 4)]:
        assert Counter(d["gold"] for d in tasks.build_docs("wiki_yesno", n, seed)) == {0: n // 2, 1: n // 2}
    assert sorted(Counter(d["gold"] for d in tasks.build_docs("wiki_yesno", 7, 0)).values()) == [3, 4]
    docs = tasks.build_docs("wiki_yesno", 20, seed=0)
    topic_of = {a["description"]: a["topic"] for a in HELDOUT if a["description"]}
    for d in docs:
        shown, title = re.fullmatch(r'Question: Is "(.+)" a correct description of (.+)\?\nAnswer:',
                                    d["query"]).groups()
        assert d["choices"] == ["no", "yes"]
        art = BY_TITLE[title]
        assert (shown == art["description"]) == (d["gold"] == 1)
        assert topic_of[shown] == art["topic"]


def test_wiki_topic_is_balanced_over_real_topics() -> None:
    """Choices are the corpus topics in a fixed order (no 'Uncategorized'); items spread evenly; gold is
    the article's topic."""
    docs = tasks.build_docs("wiki_topic", 30, seed=0)
    assert all(d["choices"] == sorted(TOPICS) for d in docs)
    counts = Counter(d["choices"][d["gold"]] for d in docs)
    assert len(counts) == len(TOPICS) and max(counts.values()) - min(counts.values()) <= 1
    first = {a["extract"].split("\n")[0]: a["topic"] for a in HELDOUT}
    for d in docs:
        assert first[d["query"].removesuffix("\nTopic:")] == d["choices"][d["gold"]]
    assert tasks.chance_level("wiki_topic", docs) == pytest.approx(1 / len(TOPICS))


def test_wiki_cloze_blanks_a_word_of_its_sentence() -> None:
    """Filling the blank with gold gives a held-out sentence; the word is 4+ letters and not in the title;
    distractors have similar length and do not occur in that article."""
    for d in tasks.build_docs("wiki_cloze", 30, seed=0):
        assert d["query"].count("____") == 1 and d["query"].endswith("\nThe missing word is:")
        gold = d["choices"][d["gold"]]
        sentence = d["query"].removesuffix("\nThe missing word is:").replace("____", gold)
        owners = [a for a in HELDOUT if sentence in " ".join(a["extract"].split())]
        assert len(owners) >= 1
        art = owners[0]
        assert len(gold) >= 4 and gold.isalpha() and gold not in art["title"].casefold()
        assert not re.search(rf"\b{gold}\b", d["query"], re.IGNORECASE)  # blanked word occurs once
        for c in d["choices"]:
            if c != gold:
                assert abs(len(c) - len(gold)) <= 1 and not re.search(rf"\b{c}\b", art["extract"])


def test_commonsense_file_and_docs() -> None:
    """The shipped JSONL has >= 30 valid items; docs keep each item's answer under reshuffling."""
    items = tasks.commonsense_items()
    assert len(items) >= 30 and all(2 <= len(i["choices"]) <= 4 for i in items)
    answers = {i["query"]: i["choices"][i["gold"]] for i in items}
    docs = tasks.build_docs("commonsense", len(items), seed=5)
    assert all(d["choices"][d["gold"]] == answers[d["query"]] for d in docs)
    chance = tasks.chance_level("commonsense", docs)
    assert chance == pytest.approx(np.mean([1 / len(i["choices"]) for i in items]))
    assert (tasks.TASK_DATA / "commonsense.jsonl").is_file()


def test_chance_levels() -> None:
    assert tasks.chance_level("wiki_mc", tasks.build_docs("wiki_mc", 10)) == 0.25
    assert tasks.chance_level("wiki_yesno", tasks.build_docs("wiki_yesno", 10)) == 0.5
    assert tasks.chance_level("wiki_cloze", tasks.build_docs("wiki_cloze", 10)) == 0.25


def test_unknown_task_lists_the_available_ones() -> None:
    with pytest.raises(ValueError, match="nope") as err:
        tasks.build_docs("nope", 5)
    assert all(name in str(err.value) for name in tasks.LOCAL_TASKS)


@pytest.mark.parametrize("name", list(tasks.LOCAL_TASKS))
def test_too_many_items_raise(name: str) -> None:
    with pytest.raises(ValueError, match="at most"):
        tasks.build_docs(name, 10_000)


def test_bad_n_items_raise() -> None:
    with pytest.raises(ValueError, match="positive"):
        tasks.build_docs("wiki_mc", 0)


def test_paper_tasks_and_metrics() -> None:
    """HoC §2.3: acc_norm for ARC-E/ARC-C/PIQA, acc for BoolQ/WinoGrande; local metrics are acc/acc_norm."""
    assert tasks.PAPER_TASKS == {"arc_easy": "acc_norm", "arc_challenge": "acc_norm", "boolq": "acc",
                                 "piqa": "acc_norm", "winogrande": "acc"}
    assert {s.metric for s in tasks.LOCAL_TASKS.values()} <= {"acc", "acc_norm"}
    assert tasks.LOCAL_TASKS["wiki_mc"].metric == "acc_norm" and tasks.LOCAL_TASKS["wiki_yesno"].metric == "acc"


# --------------------------------------------------------------------------- lm-eval config / files


def test_task_config_uses_absolute_paths(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = tasks.lm_eval_task_config("wiki_mc", "sub/wiki_mc.jsonl")
    path = cfg["dataset_kwargs"]["data_files"]["test"]
    assert path == str(tmp_path / "sub" / "wiki_mc.jsonl") and path.startswith("/")
    assert cfg["dataset_kwargs"]["cache_dir"].startswith(str(tmp_path))
    assert cfg["task"] == "wiki_mc" and cfg["dataset_path"] == "json" and cfg["test_split"] == "test"
    assert cfg["output_type"] == "multiple_choice" and cfg["target_delimiter"] == " "
    assert (cfg["doc_to_text"], cfg["doc_to_choice"], cfg["doc_to_target"]) == ("{{query}}", "{{choices}}", "gold")
    assert [m["metric"] for m in cfg["metric_list"]] == ["acc", "acc_norm"]
    with pytest.raises(ValueError, match="wiki_yesno"):
        tasks.lm_eval_task_config("arc_easy", "x.jsonl")


def test_materialise_writes_atomically_and_is_idempotent(tmp_path) -> None:
    names = ["wiki_mc", "commonsense"]
    cfgs = tasks.materialise(names, 6, 2, tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert files == ["commonsense-n6-s2.jsonl", "wiki_mc-n6-s2.jsonl"]  # no temporary files left
    for name, cfg in zip(names, cfgs, strict=True):
        lines = (tmp_path / f"{name}-n6-s2.jsonl").read_text().splitlines()
        assert [json.loads(x) for x in lines] == tasks.build_docs(name, 6, 2)
        assert cfg["dataset_kwargs"]["data_files"]["test"] == str(tmp_path / f"{name}-n6-s2.jsonl")
    stamp = (tmp_path / "wiki_mc-n6-s2.jsonl").stat().st_mtime_ns
    assert tasks.materialise(names, 6, 2, tmp_path) == cfgs
    assert (tmp_path / "wiki_mc-n6-s2.jsonl").stat().st_mtime_ns == stamp  # unchanged file not rewritten


def test_items_per_task_and_materialise_with_a_count_per_task(tmp_path) -> None:
    """A mapping gives each task its own count (commonsense whole beside a longer wiki task); it must name exactly
    the tasks asked for; an int or None applies to every task."""
    assert tasks.items_per_task(["wiki_mc", "commonsense"], 5) == {"wiki_mc": 5, "commonsense": 5}
    assert tasks.items_per_task(["arc_easy"], None) == {"arc_easy": None}
    counts = {"wiki_mc": 9, "commonsense": 60}
    assert tasks.items_per_task(["wiki_mc", "commonsense"], counts) == counts
    with pytest.raises(ValueError, match=r"missing \['commonsense'\]"):
        tasks.items_per_task(["wiki_mc", "commonsense"], {"wiki_mc": 9})
    with pytest.raises(ValueError, match=r"extra \['wiki_cloze'\]"):
        tasks.items_per_task(["wiki_mc"], {"wiki_mc": 9, "wiki_cloze": 3})
    tasks.materialise(["wiki_mc", "commonsense"], counts, 0, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["commonsense-n60-s0.jsonl", "wiki_mc-n9-s0.jsonl"]
    assert len((tmp_path / "commonsense-n60-s0.jsonl").read_text().splitlines()) == 60
    assert tasks.describe_items(["wiki_mc", "commonsense"], counts) == "wiki_mc 9, commonsense 60 items (69 in all)"
    assert tasks.describe_items(["wiki_mc"], 20) == "20 items each"
    assert tasks.describe_items(["arc_easy"], None) == "all items each"


def test_changed_docs_are_never_read_from_a_stale_datasets_cache(tmp_path) -> None:
    """datasets keys local files by path and mtime: a rewrite with the same mtime and size must still be
    read afresh with the config's dataset_kwargs."""
    import os

    import datasets

    path = tmp_path / "t.jsonl"
    kwargs = tasks.lm_eval_task_config("wiki_mc", path)["dataset_kwargs"]
    seen = []
    for word in ("AAAA", "BBBB"):
        stamp = path.stat() if path.exists() else None
        path.write_text(json.dumps({"query": word, "choices": ["x", "y"], "gold": 0}) + "\n")
        if stamp:
            os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
        seen.append(datasets.load_dataset("json", **kwargs)["test"][0]["query"])
    assert seen == ["AAAA", "BBBB"]


def test_materialise_failure_leaves_nothing(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the rename fails, neither the target nor a temporary file remains."""
    def _fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(tasks.os, "replace", _fail)
    with pytest.raises(OSError, match="disk full"):
        tasks.materialise(["wiki_yesno"], 4, 0, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_requests_of_a_local_task_are_what_lm_eval_scores() -> None:
    """A local doc's requests: the query as context, delimiter + choice as each continuation."""
    docs = tasks.build_docs("wiki_mc", 3, 0)
    for doc, req in zip(docs, tasks.requests("wiki_mc", 3, 0), strict=True):
        assert req["pairs"] == [[doc["query"], " " + c] for c in doc["choices"]]
        assert (req["choices"], req["gold"]) == (doc["choices"], doc["gold"])


@pytest.mark.parametrize("name", sorted(tasks.PAPER_TASKS))
def test_paper_task_requests_through_lm_eval_on_dry_run_stand_ins(name, tmp_path, monkeypatch) -> None:
    """The paper-task branch (lm-eval's own request construction) on the dry run's local stand-ins: one
    request per choice, the gold among them; WinoGrande's per-choice contexts and shared continuation."""
    monkeypatch.setenv("REPRO_WEIGHTS", "random")
    reqs = tasks.requests(name, 6, root=tmp_path)
    assert len(reqs) == 6 and tasks.metric(name) == tasks.PAPER_TASKS[name]
    for r in reqs:
        assert len(r["pairs"]) == len(r["choices"]) >= 2 and 0 <= r["gold"] < len(r["choices"])
        contexts = {c for c, _ in r["pairs"]}
        continuations = {c for _, c in r["pairs"]}
        if name == "winogrande":
            assert len(contexts) == 2 and len(continuations) == 1 and [c for c, _ in r["pairs"]] == r["choices"]
        else:
            assert len(contexts) == 1 and [c for _, c in r["pairs"]] == [" " + c for c in r["choices"]]
    local, seed = tasks.STAND_INS[name]
    if name != "winogrande":  # the stand-in's docs are the local task's, in order
        assert [r["gold"] for r in reqs] == [d["gold"] for d in tasks.build_docs(local, 6, seed)]
    monkeypatch.delenv("REPRO_WEIGHTS")
    assert tasks.paper_sources([name], 6, tmp_path) == [name]  # off the dry run: the hub task by name
    with pytest.raises(ValueError, match="not paper tasks"):
        tasks.paper_sources(["wiki_mc"], 6, tmp_path)
    with pytest.raises(ValueError, match="unknown task"):
        tasks.requests("nope", 3)


# ------------------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci() -> None:
    assert evaluation.bootstrap_ci([1.0] * 9) == [1.0, 1.0]
    assert evaluation.bootstrap_ci([0.0] * 9) == [0.0, 0.0]
    mixed = [1, 0, 1, 1, 0, 1, 0, 1, 1, 1]
    lo, hi = evaluation.bootstrap_ci(mixed, seed=3)
    assert lo < np.mean(mixed) < hi and [lo, hi] == evaluation.bootstrap_ci(mixed, seed=3)
    with pytest.raises(ValueError):
        evaluation.bootstrap_ci([])


def test_average_accuracy_is_the_unweighted_mean() -> None:
    per_task = {"a": {"acc": 0.5, "chance": 0.25, "correct": [1, 0, 1, 0]},
                "b": {"acc": 1.0, "chance": 0.5, "correct": [1.0] * 10}}
    avg = evaluation.average_accuracy(per_task, seed=1)
    assert avg["acc"] == pytest.approx(0.75) and avg["chance"] == pytest.approx(0.375)
    assert avg["ci95"][0] <= 0.75 <= avg["ci95"][1] and avg["ci95"][1] <= 1.0
    assert avg == evaluation.average_accuracy(per_task, seed=1) and avg["n_tasks"] == 2
    with pytest.raises(ValueError, match="correct"):
        evaluation.average_accuracy({"a": {"acc": 0.5, "chance": 0.25}})


# ---------------------------------------------------------------------------------- lm-eval runs


def test_hflm_honours_add_bos_token(tiny_llama) -> None:
    """HFLM puts <bos> (id 1) before the context exactly when add_bos_token is set; the continuation
    tokens are the same either way and start with the delimiter space."""
    from lm_eval.models.huggingface import HFLM

    model, tok = tiny_llama
    enc = {}
    for bos in (True, False):
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=1, add_bos_token=bos, device="cpu")
        enc[bos] = lm._encode_pair("Question: x?\nAnswer:", " yes")
    assert enc[True][0][0] == tok.bos_token_id == 1 and enc[False][0][0] != 1
    assert enc[True][0][1:] == enc[False][0]
    assert enc[True][1] == enc[False][1] == tok(" yes", add_special_tokens=False)["input_ids"]


def test_zero_shot_end_to_end(tiny_llama, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two local tasks x 8 items through lm-eval on tiny-llama: numbers in range, n, chance, intervals, answers;
    lm-eval sees our query and " " + choice; every context scored starts with <bos>; caller's RNG untouched."""
    from lm_eval.models.huggingface import HFLM

    model, tok = tiny_llama
    pairs: list[tuple[str, str]] = []
    original = HFLM._encode_pair

    def spy(self, context, continuation):
        pairs.append((context, continuation))
        return original(self, context, continuation)

    monkeypatch.setattr(HFLM, "_encode_pair", spy)
    first_ids: list[int] = []
    scored = prefix_lm.SharedPrefixHFLM._loglikelihood_tokens

    def spy_requests(self, requests, *args, **kwargs):  # each request: ((context, continuation), ctx ids, cont ids)
        first_ids.extend(req[1][0] for req in requests)
        return scored(self, requests, *args, **kwargs)

    monkeypatch.setattr(prefix_lm.SharedPrefixHFLM, "_loglikelihood_tokens", spy_requests)
    random.seed(11)
    model.train()
    res = evaluation.zero_shot(model, tok, ["wiki_mc", "wiki_yesno"], n_items=8, seed=0, batch_size=8,
                               prepend_bos=True)
    assert random.random() == random.Random(11).random()  # simple_evaluate's reseeding is undone
    assert model.training  # HFLM's model.eval() is undone too
    assert list(res) == ["wiki_mc", "wiki_yesno"]
    for name, chance in (("wiki_mc", 0.25), ("wiki_yesno", 0.5)):
        r = res[name]
        assert r["metric"] == tasks.LOCAL_TASKS[name].metric and r["n"] == 8 and len(r["correct"]) == 8
        assert 0.0 <= r["acc"] <= 1.0 and r["acc"] == pytest.approx(np.mean(r["correct"]))
        assert r["ci95"][0] <= r["acc"] <= r["ci95"][1]
        assert r["chance"] == chance and set(r["scores"]) == {"acc", "acc_norm"}
        choices = {c for d in tasks.build_docs(name, 8, 0) for c in d["choices"]}
        assert len(r["answers"]) == 8 and {a.strip() for a in r["answers"]} <= choices
        assert r["varies"] == (len(set(r["answers"])) > 1)
    docs = tasks.build_docs("wiki_mc", 8, 0) + tasks.build_docs("wiki_yesno", 8, 0)
    expected = {(d["query"], " " + c) for d in docs for c in d["choices"]}
    assert set(pairs) == expected  # exactly one space between "Answer:" and the choice
    assert first_ids and set(first_ids) == {tok.bos_token_id}
    avg = evaluation.average_accuracy(res)
    assert avg["acc"] == pytest.approx((res["wiki_mc"]["acc"] + res["wiki_yesno"]["acc"]) / 2)
    files = {p.name for p in (env.cache_dir() / "tasks").glob("*.jsonl")}
    assert files == {"wiki_mc-n8-s0.jsonl", "wiki_yesno-n8-s0.jsonl"}


def test_chosen_answer_and_varying_tasks() -> None:
    """The answer is lm-eval's argmax (per character for acc_norm); a task answered the same way throughout is
    the one varying_tasks drops."""
    sample = {"arguments": [("Q:", " no"), ("Q:", " yes please")], "filtered_resps": [(-3.0, False), (-4.0, False)]}
    assert evaluation.chosen_answer(sample, "acc") == " no"
    assert evaluation.chosen_answer(sample, "acc_norm") == " yes please"  # -4 / 11 > -3 / 3
    per_task = {"mc": {"varies": True}, "yesno": {"varies": False}}
    assert evaluation.varying_tasks(per_task) == (["mc"], ["yesno"])


def test_zero_shot_without_bos(tiny_llama) -> None:
    """prepend_bos=False: no row starts with <bos>."""
    model, tok = tiny_llama
    first_ids: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda mod, args, kwargs: first_ids.extend((args[0] if args else kwargs["input_ids"])[:, 0].tolist()),
        with_kwargs=True)
    try:
        res = evaluation.zero_shot(model, tok, ["commonsense"], n_items=4, prepend_bos=False)
    finally:
        hook.remove()
    assert first_ids and tok.bos_token_id not in first_ids
    assert res["commonsense"]["n"] == 4


def test_zero_shot_rejects_bad_arguments(tiny_llama) -> None:
    model, tok = tiny_llama
    with pytest.raises(ValueError, match="wiki_mc"):
        evaluation.zero_shot(model, tok, ["nope"], n_items=4)
    with pytest.raises(ValueError, match="auto"):
        evaluation.zero_shot(model, tok, ["wiki_mc"], n_items=4, batch_size="auto")


def test_zero_shot_paper_tasks_go_to_lm_eval_by_name(tiny_llama, monkeypatch: pytest.MonkeyPatch) -> None:
    """Paper tasks are passed by name with the full task index and limit=n_items; the headline metric is
    the paper's; chance comes from the number of choices lm-eval scored."""
    import lm_eval

    model, tok = tiny_llama
    seen = {}

    def fake_evaluate(**kwargs):
        seen.update(kwargs)
        samples = [{"doc_id": i, "acc": float(i % 2), "acc_norm": 1.0, "arguments": [("q", " a"), ("q", " b")],
                    "filtered_resps": [(-1.0, True), (-2.0, False)]} for i in range(4)]
        return {"results": {"boolq": {"acc,none": 0.5, "acc_norm,none": 1.0}}, "samples": {"boolq": samples}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_evaluate)
    monkeypatch.setattr(evaluation, "_task_manager", lambda include_defaults: ("tm", include_defaults))
    res = evaluation.zero_shot(model, tok, ["boolq"], n_items=4)
    assert seen["tasks"] == ["boolq"] and seen["limit"] == 4 and seen["task_manager"] == ("tm", True)
    assert seen["num_fewshot"] == 0 and seen["bootstrap_iters"] == 0 and seen["log_samples"] is True
    assert res["boolq"] == {"acc": 0.5, "metric": "acc", "n": 4, "ci95": res["boolq"]["ci95"], "chance": 0.5,
                            "scores": {"acc": 0.5, "acc_norm": 1.0}, "correct": [0.0, 1.0, 0.0, 1.0],
                            "answers": [" a"] * 4, "varies": False}
