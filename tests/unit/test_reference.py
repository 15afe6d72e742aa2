"""bench/reference.py, the baselines of the benchmarks against the papers' reference code (issue 9 §2): each
re-implementation must compute what our function computes, or a ratio between them would compare different
work. Planted cases with known answers, plus agreement with our side on the same inputs."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from common import REPO_ROOT
from common.core import capture, evaluation, models
from common.inheritune import attention

pytestmark = pytest.mark.usefixtures("one_thread")

_spec = importlib.util.spec_from_file_location("reference", REPO_ROOT / "bench" / "reference.py")
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)


def _ids(seed: int, n: int = 3, t: int = 24) -> torch.Tensor:
    return torch.randint(3, 259, (n, t), generator=torch.Generator().manual_seed(seed))


def test_stored_states_give_the_hook_statistics(tiny_llama) -> None:
    """locuslab's store-then-sort gives our hooks' position-0 vectors, top-3 and medians (hidden and
    intermediate, every layer); the planted massive channel of tiny-llama tops layer 1's intermediate state in
    both. The raw last layer output is read, not transformers' final-norm replacement."""
    model, _ = tiny_llama
    batches = [_ids(0), _ids(1)]
    ours = capture.capture(model, batches, points=("hidden", "inter"), whole=True)
    ref = reference.stored_massive_stats(model, batches)
    for point in ("hidden", "inter"):
        for kind in ("pos0", "top", "median"):
            a, b = getattr(ours, kind)[point], getattr(ref, kind)[point]
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    width = ours.pos0["inter"].shape[-1]
    layer = models.PLANT["layer"]
    assert bool((ref.top_index["inter"][:, layer, 0] % width == models.PLANT["channel"]).all())
    other = reference.stored_massive_stats(model, [_ids(2)])
    assert not torch.allclose(other.median["hidden"], ref.median["hidden"][:3])  # the statistics see the input
    assert not hasattr(model.config, "tie_last_hidden_states") or model.config.tie_last_hidden_states is not False


def test_demo_energy_rank_known_ranks_and_our_k_star() -> None:
    """Identity (flat spectrum): k* = ceil(0.9 T); a rank-1 matrix: k* = 1; on random attention probabilities
    the demo's float32 loop gives our batched k*."""
    t = 10
    assert reference.demo_energy_rank(torch.eye(t)).item() == math.ceil(0.9 * t)
    row = torch.softmax(torch.randn(t, generator=torch.Generator().manual_seed(0)), 0)
    assert reference.demo_energy_rank(row.expand(t, t).clone()).item() == 1
    logits = torch.randn(2, 3, t, t, generator=torch.Generator().manual_seed(1)) * 3
    attn = torch.softmax(logits.masked_fill(torch.ones(t, t).triu(1).bool(), float("-inf")), -1)
    got = reference.demo_energy_rank(attn)
    assert got.shape == (2, 3) and torch.equal(got, attention.head_metrics(attn)["rank"])


def test_sfsd_factors_project_onto_the_planted_output_subspace() -> None:
    """Outputs y = x W^T varying (almost) only in a planted 2-d subspace: at rank 2 SFSD's W2 spans it and
    W2 W1 is W projected onto it; at full rank W2 W1 = W; the per-rank recomputation is bit-identical to the
    once-computed basis; SFSD's two bias vectors are round-off."""
    g = torch.Generator().manual_seed(0)
    m, n = 6, 8
    basis = torch.linalg.qr(torch.randn(m, 2, generator=g)).Q  # the planted subspace of the outputs
    weight = basis @ torch.randn(2, n, generator=g) + 1e-3 * torch.randn(m, n, generator=g)
    y = torch.randn(4000, n, generator=g) @ weight.T + 5.0  # an offset mean, which SFSD centres away
    d = reference.sfsd_decompose(y)
    w1, w2, bias = reference.sfsd_cut(d, weight, 2)
    assert w1.shape == (2, n) and w2.shape == (m, 2) and bias.shape == (m,)
    proj = basis @ basis.T
    torch.testing.assert_close(w2 @ w2.T, proj, atol=2e-3, rtol=0)
    torch.testing.assert_close(w2 @ w1, proj @ weight, atol=2e-3, rtol=0)
    full = reference.sfsd_cut(d, weight, m)
    torch.testing.assert_close(full[1] @ full[0], weight, atol=1e-5, rtol=0)
    assert float(bias.abs().max()) < 1e-3 * float(y.mean(0).abs().max())
    recomputed = reference.sfsd_factors_recomputed(y, weight, [1, 2, m])
    for r in (1, 2, m):
        assert all(torch.equal(a, b) for a, b in zip(recomputed[r], reference.sfsd_cut(d, weight, r), strict=True))


def test_lm_eval_rolling_perplexity_is_ours_on_the_same_windows(tiny_llama) -> None:
    """lm-eval's loglikelihood_rolling (max_length 32) on a text of 64 lm-eval tokens t scores the windows [prefix] + t[:31]
    and t[31:63]; ours on [prefix] + t[:32] and t[31:64] scores the same 64 tokens: the same perplexity.
    A different text gives a different one."""
    from lm_eval.models.huggingface import HFLM

    model, tok = tiny_llama
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=2, max_length=32)
    special = len(lm.tok_encode("a")) - 1  # the byte tokenizer's <bos>, which lm-eval's encoding keeps
    text = "The river was built in the north of the country, for its history."[:64 - special]
    ids = lm.tok_encode(text)
    assert len(ids) == 64  # one byte, one token
    ppl, ll = reference.lm_eval_perplexity(lm, [text], len(ids))
    seq = [lm.prefix_token_id, *ids]
    ours = evaluation.perplexity(model, torch.tensor([seq[:33], seq[32:65]]), 2)
    assert len(ll) == 1 and math.isclose(ppl, ours, rel_tol=1e-5)
    other, _ = reference.lm_eval_perplexity(lm, ["z" * (64 - special)], 64)
    assert not math.isclose(other, ppl, rel_tol=1e-3)
