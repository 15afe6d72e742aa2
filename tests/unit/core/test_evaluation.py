"""``common.core.evaluation``: perplexity and per-window NLL over fixed windows."""

from __future__ import annotations

import math
from types import SimpleNamespace

import matplotlib
import numpy as np
import pytest
import torch
from torch import nn

matplotlib.use("Agg")

from common.core import data, evaluation

NB = "01_massive_activation_origin"


class _LogitModel(nn.Module):
    """Returns ``make_logits(ids)`` as ``.logits``; one parameter so ``next(parameters())`` works."""

    def __init__(self, make_logits):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1))
        self.make_logits = make_logits

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.make_logits(input_ids))


def _windows(n=6, t=9, vocab=13, seed=0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def test_perplexity_uniform_is_vocab_size() -> None:
    """Uniform predictions over V tokens have perplexity exactly V."""
    vocab = 13
    model = _LogitModel(lambda ids: torch.zeros(*ids.shape, vocab))
    assert evaluation.perplexity(model, _windows(vocab=vocab)) == pytest.approx(vocab, rel=1e-6)


def test_perplexity_scores_next_token() -> None:
    """A model that puts its mass on the *next* token has perplexity ~1; one that predicts the current
    token (off by one) has a large one: position t is scored against token t+1."""
    vocab = 13
    ids = _windows(vocab=vocab)

    def oracle(shift):
        def make(x):
            target = torch.roll(x, -shift, dims=1)
            return 30.0 * nn.functional.one_hot(target, vocab).float()
        return make

    assert evaluation.perplexity(_LogitModel(oracle(1)), ids) == pytest.approx(1.0, abs=1e-6)
    assert evaluation.perplexity(_LogitModel(oracle(0)), ids) > vocab


def test_perplexity_tiny_llama_finite_and_batch_invariant(tiny_llama) -> None:
    """On tiny-llama: finite and > 1, and the same for batch size 1 and 4."""
    model, tok = tiny_llama
    windows = data.token_windows(tok, "tiny-llama", "synthetic", 5, 32)
    p4 = evaluation.perplexity(model, windows, batch_size=4)
    p1 = evaluation.perplexity(model, windows, batch_size=1)
    assert math.isfinite(p4) and p4 > 1
    assert p1 == pytest.approx(p4, rel=1e-5)


@pytest.mark.parametrize("shape", [(10,), (3, 1), (2, 3, 4)])
def test_perplexity_bad_shape(shape) -> None:
    """Windows must be [N, T] with T >= 2."""
    model = _LogitModel(lambda ids: torch.zeros(*ids.shape, 5))
    with pytest.raises(ValueError, match="windows must be"):
        evaluation.perplexity(model, torch.zeros(shape, dtype=torch.long))


def test_window_nll_scores_each_window_on_its_own() -> None:
    """One value per window, in window order: a model that knows the next token of the even windows only has
    NLL ~0 there and log V (uniform) on the odd ones, whatever the batch split."""
    vocab, ids = 13, _windows(n=5, vocab=13)
    knows = {tuple(w.tolist()): float(i % 2 == 0) for i, w in enumerate(ids)}

    def make(x):
        sure = torch.tensor([knows[tuple(w.tolist())] for w in x])[:, None, None]
        return 30.0 * sure * nn.functional.one_hot(torch.roll(x, -1, dims=1), vocab).float()

    for batch_size in (1, 2, 5):
        nll = evaluation.window_nll(_LogitModel(make), ids, batch_size)
        assert nll.shape == (5,) and nll.dtype == np.float64
        assert np.allclose(nll[0::2], 0.0, atol=1e-6) and np.allclose(nll[1::2], math.log(vocab), rtol=1e-6)


def test_perplexity_is_exp_of_total_nll_over_tokens(tiny_llama) -> None:
    """Every window scores T - 1 tokens, so exp(mean of the window means) is today's exp(total NLL / tokens)."""
    model, tok = tiny_llama
    windows = data.token_windows(tok, "tiny-llama", "synthetic", 5, 32)
    with torch.no_grad():
        logits = model(input_ids=windows).logits.float()
    total = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten(), reduction="sum")
    want = math.exp(float(total) / windows[:, 1:].numel())
    nll = evaluation.window_nll(model, windows, batch_size=2)
    assert evaluation.perplexity(model, windows, batch_size=2) == pytest.approx(want, rel=1e-6)
    assert math.exp(nll.mean()) == pytest.approx(want, rel=1e-6) and len(set(nll.round(6))) == 5


def test_zero_shot_paper_tasks_share_one_limit() -> None:
    """lm-eval limits every hub task alike: a per-task mapping that gives paper tasks different counts is refused
    before anything is scored (local tasks may differ: they are built to their own counts)."""
    with pytest.raises(ValueError, match="one limit"):
        evaluation.zero_shot(None, None, ["arc_easy", "boolq"], {"arc_easy": 5, "boolq": 6})
    with pytest.raises(ValueError, match="missing"):
        evaluation.zero_shot(None, None, ["wiki_mc", "commonsense"], {"wiki_mc": 5})
