"""Instruction data for MacDrop's fine-tuning (``data.instruction_pairs`` / ``tokenize_pairs`` / ``collate``) and
the held-out response loss (``evaluation.response_loss``)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from common.core import data, evaluation, models

KEY = "tiny-llama"
NO_BOS_KEY = "smollm2-135m"  # registry policy: no BOS (only the policy is read; the model is never loaded)
_INSTRUCTION = re.compile(r"### Instruction:\n(.*)\n\n### Response:\n", re.S)


pytestmark = pytest.mark.usefixtures("one_thread")


def _title(prompt: str) -> str:
    """The article title inside a wiki instruction prompt ("What is X?" / "Summarize X in one sentence.")."""
    instruction = _INSTRUCTION.fullmatch(prompt).group(1)
    m = re.fullmatch(r"What is (.+)\?", instruction) or re.fullmatch(r"Summarize (.+) in one sentence\.", instruction)
    assert m, instruction
    return m.group(1)


@pytest.fixture
def wiki():
    """The real wiki corpus (installed package), read fresh: no fake articles cached by another test."""
    data.wiki_articles.cache_clear()
    yield
    data.wiki_articles.cache_clear()


# ---------------------------------------------------------------------------------- instruction_pairs


def test_synthetic_pairs_are_seeded() -> None:
    """Same (corpus, split, n, seed) -> same pairs; another seed -> different pairs; prompts use the template."""
    a = data.instruction_pairs("synthetic", "train", 20, seed=0)
    assert a == data.instruction_pairs("synthetic", "train", 20, seed=0)
    assert a != data.instruction_pairs("synthetic", "train", 20, seed=1)
    assert len(a) == 20 and all(set(p) == {"prompt", "response"} for p in a)
    assert all(_INSTRUCTION.fullmatch(p["prompt"]) for p in a)
    assert data.instruction_pairs("synthetic", "val", 20, seed=0) != a


def test_wiki_pairs_seeded_disjoint_and_never_heldout(wiki) -> None:
    """Wiki pairs: seeded; train and val share no article title; no title is a held-out article (and the
    check would catch one: a pair made from a held-out title is flagged)."""
    train = data.instruction_pairs("wiki", "train", 3000, seed=0)
    val = data.instruction_pairs("wiki", "val", 1000, seed=0)
    assert train == data.instruction_pairs("wiki", "train", 3000, seed=0)
    assert train[:50] != data.instruction_pairs("wiki", "train", 3000, seed=1)[:50]
    train_titles, val_titles = {_title(p["prompt"]) for p in train}, {_title(p["prompt"]) for p in val}
    assert len(train_titles) > 1000 and len(val_titles) > 300
    assert not train_titles & val_titles
    assert not any(data.is_heldout(t) for t in train_titles | val_titles)
    # the whole pools, not only a sample
    full = {s: {_title(p["prompt"]) for p in data.instruction_pairs("wiki", s, len(data._wiki_instructions(s)))}
            for s in ("train", "val")}
    assert not full["train"] & full["val"] and not any(data.is_heldout(t) for t in full["train"] | full["val"])
    held = data.wiki_split("heldout")[0]["title"]
    planted = data.PROMPT_TEMPLATE.format(instruction=f"What is {held}?")
    assert data.is_heldout(_title(planted))


@pytest.mark.parametrize("corpus, split, n, match", [
    ("synthetic", "test", 5, "split"),
    ("synthetic", "heldout", 5, "split"),
    ("c4", "train", 5, "corpus"),
    ("synthetic", "train", 401, "400"),
])
def test_instruction_pairs_bad_input(corpus: str, split: str, n: int, match: str) -> None:
    """Unknown split, unknown corpus, or n above the pool size (400 synthetic pairs) raise ValueError."""
    with pytest.raises(ValueError, match=match):
        data.instruction_pairs(corpus, split, n)
    assert len(data.instruction_pairs("synthetic", "train", 400)) == 400


# ------------------------------------------------------------------------------------- tokenize_pairs


PAIRS = [{"prompt": "### Instruction:\nSay hi\n\n### Response:\n", "response": "hi there"},
         {"prompt": "### Instruction:\nCount\n\n### Response:\n", "response": "one two three"}]


@pytest.mark.parametrize("key, bos", [(KEY, True), (NO_BOS_KEY, False)])
def test_tokenize_pairs_labels_only_the_response_and_eos(byte_tok, key: str, bos: bool) -> None:
    """ids = [BOS iff the model's policy] prompt response EOS; labels are IGNORE exactly on BOS + prompt and
    the token's own id on response + EOS."""
    assert models.get_spec(key).prepend_bos is bos
    out = data.tokenize_pairs(byte_tok, key, PAIRS, max_len=512)
    for pair, ex in zip(PAIRS, out, strict=True):
        prompt = byte_tok(pair["prompt"], add_special_tokens=False)["input_ids"]
        response = byte_tok(pair["response"], add_special_tokens=False)["input_ids"] + [byte_tok.eos_token_id]
        assert len(prompt) == len(pair["prompt"]) and byte_tok.bos_token_id not in prompt  # one token per byte
        head = [byte_tok.bos_token_id] if bos else []
        assert ex["input_ids"] == head + prompt + response
        assert ex["labels"] == [data.IGNORE] * (len(head) + len(prompt)) + response
        assert (ex["input_ids"][0] == byte_tok.bos_token_id) is bos


def test_tokenize_pairs_truncates_and_refuses_when_no_response_survives(byte_tok) -> None:
    """max_len cuts ids and labels alike; a max_len that keeps no response token raises ValueError."""
    full = data.tokenize_pairs(byte_tok, KEY, PAIRS[:1], max_len=512)[0]
    n_prompt = full["labels"].count(data.IGNORE)
    cut = data.tokenize_pairs(byte_tok, KEY, PAIRS[:1], max_len=n_prompt + 2)[0]
    assert cut["input_ids"] == full["input_ids"][:n_prompt + 2] and cut["labels"] == full["labels"][:n_prompt + 2]
    assert sum(label != data.IGNORE for label in cut["labels"]) == 2
    with pytest.raises(ValueError, match="max_len"):
        data.tokenize_pairs(byte_tok, KEY, PAIRS[:1], max_len=n_prompt)
    assert data.tokenize_pairs(byte_tok, KEY, PAIRS[:1], max_len=n_prompt + 1)[0]["labels"][-1] != data.IGNORE


# -------------------------------------------------------------------------------------------- collate


def test_collate_right_pads_with_masked_ignored_padding() -> None:
    """Right padding with pad_id; attention_mask 1 on real tokens and 0 on padding; labels IGNORE on padding."""
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    out = data.collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in out.values())
    assert data.collate(batch, pad_id=9)["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]


# ------------------------------------------------------------------------------------- response_loss


def test_response_loss_equals_a_hand_computation(tiny_llama) -> None:
    """Batched and padded, ``response_loss`` equals the per-example, unpadded mean NLL over all response
    tokens; it leaves the model's train/eval mode as it was; a different response set scores differently."""
    model, tok = tiny_llama
    pairs = data.instruction_pairs("synthetic", "val", 5, seed=3)
    pairs[1] = {**pairs[1], "response": pairs[1]["response"] + " And then some more words."}  # ragged lengths
    examples = data.tokenize_pairs(tok, KEY, pairs, max_len=256)
    assert len({len(e["input_ids"]) for e in examples}) > 1
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e["input_ids"]])
            logp = F.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            for pos in range(1, len(e["input_ids"])):
                if e["labels"][pos] != data.IGNORE:
                    total -= float(logp[pos - 1, e["labels"][pos]])
                    count += 1
    assert count == sum(len(tok(p["response"], add_special_tokens=False)["input_ids"]) + 1 for p in pairs)
    model.train()
    got = evaluation.response_loss(model, examples, tok.pad_token_id, batch_size=2)
    assert model.training
    assert got == pytest.approx(total / count, rel=1e-5)
    other = data.tokenize_pairs(tok, KEY, data.instruction_pairs("synthetic", "val", 5, seed=4), max_len=256)
    assert evaluation.response_loss(model, other, tok.pad_token_id) != pytest.approx(got, rel=1e-5)
