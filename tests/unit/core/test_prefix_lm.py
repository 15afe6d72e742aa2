"""``common.core.prefix_lm``: the shared-prefix lm-eval backend gives stock ``HFLM``'s answers, request by request
(lm-eval's loglikelihood protocol: summed continuation log-prob and is-greedy), and ``zero_shot`` the same items."""

from __future__ import annotations

import copy

import pytest
import torch
from fake_device import fake_accelerator
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.models.huggingface import HFLM

from common.core import evaluation, models, prefix_lm
from common.core.prefix_lm import SharedPrefixHFLM

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH, MAX_LENGTH, TOL = 3, 40, 1e-4


def _greedy(model, context: list[int], n: int) -> list[int]:
    """The ``n`` tokens the model predicts after ``context``: a continuation whose is-greedy is True."""
    ids = list(context)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(context):]


def _requests(model, vocab: int) -> tuple[list, int]:
    """Requests as lm-eval hands them to ``_loglikelihood_tokens``, and how many the shared path should score:
    contexts of 1 to 30 tokens with 2 to 6 continuations of 1 to 7 tokens (one-token ones, a greedy 4-token one)
    over more contexts and continuation rows than a batch holds; a context with one continuation and a context
    that HFLM truncates to ``MAX_LENGTH`` (both left to HFLM)."""
    g = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    shared = {12: [1, 1, 2, 5], 5: [3, 1], 1: [2, 3], 30: [7, 2, 1], 9: [4, 4, 1, 1, 2, 6]}
    reqs = []
    for n_ctx, lengths in shared.items():
        context = ids(n_ctx)
        conts = [ids(n) for n in lengths] + ([_greedy(model, context, 4)] if n_ctx == 12 else [])
        reqs += [((f"c{n_ctx}", str(k)), context, cont) for k, cont in enumerate(conts)]
    n_shared = len(reqs)
    long = ids(MAX_LENGTH)  # + a 3-token continuation: longer than max_length + 1, so HFLM cuts it on the left
    reqs += [(("long", "0"), long, ids(3)), (("long", "1"), long, ids(1)), (("one", "0"), ids(7), ids(3))]
    order = torch.randperm(len(reqs), generator=g).tolist()  # contexts interleaved, as lm-eval may send them
    return [reqs[i] for i in order], n_shared


def _answers(cls, model, tok, requests) -> list[tuple[float, bool]]:
    lm = cls(pretrained=model, tokenizer=tok, batch_size=BATCH, max_length=MAX_LENGTH, device=str(model.device))
    return lm._loglikelihood_tokens(requests, disable_tqdm=True)


def _max_difference(want, got) -> float:
    """Largest per-request |log-likelihood difference|; infinite where an is-greedy flag differs."""
    assert len(got) == len(want)
    return max(abs(a - b) if ga == gb else float("inf") for (a, ga), (b, gb) in zip(want, got, strict=True))


@pytest.fixture(params=["tiny-llama", "gemma3_text", "gpt2"])
def model_vocab(request, make_tiny):
    """A tiny Llama (the registry's, planted), a Gemma-3 with a sliding window of 8 (shorter than the contexts) and
    a GPT-2 (learned absolute positions), with their vocabulary sizes."""
    if request.param == "tiny-llama":
        return models.load_model("tiny-llama")[0], models.TINY_VOCAB
    model = make_tiny(request.param)
    return model, model.config.vocab_size


@pytest.fixture
def scored(monkeypatch) -> list[int]:
    """Number of requests each ``_score_groups`` call answered (the shared path)."""
    calls: list[int] = []
    real = SharedPrefixHFLM._score_groups

    def spy(self, groups):
        out = real(self, groups)
        calls.append(len(out))
        return out

    monkeypatch.setattr(SharedPrefixHFLM, "_score_groups", spy)
    return calls


def test_same_answers_as_hflm(model_vocab, byte_tok, scored) -> None:
    """Per request, the same (log-likelihood, is-greedy) as stock HFLM to 1e-4 (fp32); the shared contexts go
    through the shared path in several passes, the truncated and the single-continuation context through HFLM's."""
    model, vocab = model_vocab
    requests, n_shared = _requests(model, vocab)
    want = _answers(HFLM, model, byte_tok, requests)
    got = _answers(SharedPrefixHFLM, model, byte_tok, requests)
    assert _max_difference(want, got) <= TOL
    assert any(greedy for _, greedy in want) and not all(greedy for _, greedy in want)
    assert sum(scored) == n_shared and len(scored) > 1


@pytest.mark.parametrize("corrupt", ["wrong_context", "one_token_short"])
def test_a_corrupted_cache_expansion_is_caught(corrupt, tiny_llama, byte_tok, monkeypatch) -> None:
    """The equality test can fail: continuations scored against another context's cache, or against a cache that
    lost its last token, differ from HFLM far beyond the tolerance."""
    model, _ = tiny_llama
    requests, _ = _requests(model, models.TINY_VOCAB)
    want = _answers(HFLM, model, byte_tok, requests)
    real = prefix_lm.expand_cache

    def broken(cache, rows):
        if corrupt == "wrong_context":
            return real(cache, torch.zeros_like(rows))
        out = real(cache, rows)
        out.crop(-1)
        return out

    monkeypatch.setattr(prefix_lm, "expand_cache", broken)
    assert _max_difference(want, _answers(SharedPrefixHFLM, model, byte_tok, requests)) > 100 * TOL


def test_strings_go_through_lm_evals_tokenisation_and_cache_hook(tiny_llama) -> None:
    """From lm-eval ``Instance``s: lm-eval's ``_encode_pair`` (trailing context space moved to the continuation),
    HFLM's answers, and each shared answer handed to the cache hook under its request strings."""
    model, tok = tiny_llama
    pairs = [("Water boils at", " 100 degrees"), ("Water boils at", " 50 degrees"), ("Water boils at ", "1"),
             ("The sky is", " blue"), ("The sky is", " green, mostly")]
    insts = [Instance("loglikelihood", {}, pair, k) for k, pair in enumerate(pairs)]
    want = HFLM(pretrained=model, tokenizer=tok, batch_size=BATCH).loglikelihood(insts, disable_tqdm=True)
    lm = SharedPrefixHFLM(pretrained=model, tokenizer=tok, batch_size=BATCH)
    hooked = {}
    lm.cache_hook.add_partial = lambda kind, key, answer: hooked.update({key: answer})
    got = lm.loglikelihood(insts, disable_tqdm=True)
    assert _max_difference(want, got) <= TOL
    assert hooked == {pair: answer for pair, answer in zip(pairs, got, strict=True)}


def test_rolling_loglikelihood_stays_hflms(tiny_llama, scored) -> None:
    """``loglikelihood_rolling`` (perplexity tasks) is HFLM's own: same values, no shared path."""
    model, tok = tiny_llama
    insts = [Instance("loglikelihood_rolling", {}, (text,), k)
             for k, text in enumerate(["the same text", "the same text", "x" * 90])]
    want = HFLM(pretrained=model, tokenizer=tok, batch_size=BATCH, max_length=32).loglikelihood_rolling(insts)
    got = SharedPrefixHFLM(pretrained=model, tokenizer=tok, batch_size=BATCH, max_length=32).loglikelihood_rolling(insts)
    assert got == pytest.approx(want, abs=TOL) and not scored


def test_registered_with_lm_eval() -> None:
    assert get_model("hf-shared-prefix") is SharedPrefixHFLM


def test_zero_shot_same_items_as_hflm(tiny_llama, monkeypatch, scored) -> None:
    """``zero_shot`` on a local task: the same per-item ``correct`` and scores with stock HFLM as with the
    shared-prefix backend it uses."""
    model, tok = tiny_llama
    got = evaluation.zero_shot(model, tok, ["commonsense"], 8, batch_size=BATCH)["commonsense"]
    assert scored
    monkeypatch.setattr(evaluation, "SharedPrefixHFLM", HFLM)
    want = evaluation.zero_shot(model, tok, ["commonsense"], 8, batch_size=BATCH)["commonsense"]
    assert got["correct"] == want["correct"] and got["scores"] == pytest.approx(want["scores"])


def test_model_on_a_device(tiny_llama, byte_tok) -> None:
    """With the model on a device that is not the host's, the answers are the host's (every tensor on the
    model's device)."""
    model, _ = tiny_llama
    requests, _ = _requests(model, models.TINY_VOCAB)
    want = _answers(SharedPrefixHFLM, model, byte_tok, requests)
    with fake_accelerator() as dev:
        got = _answers(SharedPrefixHFLM, copy.deepcopy(model).to(dev), byte_tok, requests)
    assert _max_difference(want, got) <= TOL
