"""``common.core.layer_inputs.LayerInputs.perplexity_and_windows``: the perplexity and the per-window mean NLLs
a paired interval over windows resamples, from one pass (the rest of ``LayerInputs`` is tested with the
decompositions that use it, tests/unit/sfsd/test_decomposition.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.core import models
from common.core.layer_inputs import LayerInputs

pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(n: int, t: int, seed: int) -> torch.Tensor:
    return torch.randint(3, models.TINY_VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def test_perplexity_and_windows(tiny_llama) -> None:
    """The perplexity is ``perplexity(start)``'s, bit for bit; each window's mean NLL is the model's own (a window
    of one repeated token, planted, is far easier than the random ones); exp of their mean is the perplexity."""
    model = tiny_llama[0]
    ids = _ids(5, 16, seed=1)
    ids[3] = ids[3, 0]  # planted: one token repeated
    inputs = LayerInputs(model, ids, batch_size=2)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.double()
    want = -torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0].mean(1)
    for start in (0, 2):
        ppl, nll = inputs.perplexity_and_windows(start)
        assert ppl == inputs.perplexity(start)
        assert isinstance(nll, np.ndarray) and nll.dtype == np.float64 and nll.shape == (5,)
        np.testing.assert_allclose(nll, want.numpy(), rtol=1e-5)
        assert math.exp(nll.mean()) == pytest.approx(ppl, rel=1e-12)
    assert nll[3] < nll[[0, 1, 2, 4]].min()


def test_perplexity_and_windows_refuses_unequal_windows(tiny_llama) -> None:
    """Multiple-choice requests (masks of different lengths) have no per-window perplexity to pair."""
    ids = _ids(3, 10, seed=2)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with pytest.raises(ValueError, match="same number of targets"):
        LayerInputs(tiny_llama[0], ids, mask).perplexity_and_windows()
