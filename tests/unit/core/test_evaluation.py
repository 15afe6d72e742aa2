"""``common.core.evaluation``: perplexity over fixed windows."""

from __future__ import annotations

import math
from types import SimpleNamespace

import matplotlib
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
