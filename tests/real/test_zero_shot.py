"""Real-corpus / real-model checks of the offline zero-shot suite (marker ``real``).

The tasks are built from the installed wiki corpus (held-out split); SmolLM2-135M must beat chance on
``wiki_mc`` (research measured acc_norm 0.60 at n=100, offline_resources.md §5; bound kept loose).
"""

import time

import pytest

from common.core import data, evaluation, models, tasks

pytestmark = pytest.mark.real
KEY = "smollm2-135m"
N = 40


@pytest.mark.parametrize("name", list(tasks.LOCAL_TASKS))
def test_local_task_from_the_real_corpus(name: str) -> None:
    """Deterministic per seed, different across seeds, well formed, at the expected chance level."""
    docs = tasks.build_docs(name, N, seed=0)
    assert docs == tasks.build_docs(name, N, seed=0) != tasks.build_docs(name, N, seed=1)
    assert len(docs) == N and all(0 <= d["gold"] < len(d["choices"]) for d in docs)
    chance = tasks.chance_level(name, docs)
    expected = {"wiki_mc": 0.25, "wiki_yesno": 0.5, "wiki_cloze": 0.25,
                "wiki_topic": 1 / len(tasks.topic_names())}.get(name)
    if expected is not None:
        assert chance == pytest.approx(expected)
    else:
        assert 0.25 <= chance <= 0.5


def test_real_topics_and_heldout_titles() -> None:
    """The topic task has the 11 named topics (no 'Uncategorized'); wiki_mc asks only held-out titles."""
    names = tasks.topic_names()
    assert len(names) == tasks.TOPIC_K and "Uncategorized" not in names and "People" in names
    titles = [d["query"].removeprefix("Question: What is ").removesuffix("?\nAnswer:")
              for d in tasks.build_docs("wiki_mc", N)]
    assert all(data.is_heldout(t) for t in titles)


def test_smollm2_beats_chance_on_wiki_mc() -> None:
    """acc_norm well above 0.25 at n=60, in well under 90 s including the model load."""
    start = time.perf_counter()
    model, tok = models.load_model(KEY)
    res = evaluation.zero_shot(model, tok, ["wiki_mc"], n_items=60, seed=0, batch_size=8,
                               prepend_bos=models.get_spec(KEY).prepend_bos)["wiki_mc"]
    elapsed = time.perf_counter() - start
    print(f"\n{KEY} wiki_mc n=60: acc_norm={res['acc']:.3f} ci95={res['ci95']} in {elapsed:.1f} s")
    assert res["metric"] == "acc_norm" and res["n"] == 60 and res["chance"] == 0.25
    assert res["acc"] > 0.35 and res["ci95"][0] <= res["acc"] <= res["ci95"][1]
    assert elapsed < 90
