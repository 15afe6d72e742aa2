"""Re-implementations of what the papers' reference code does, used as the baselines of the benchmarks.

Each function mirrors one piece of reference code (named in its docstring) closely enough that it does the
same work and stores the same tensors, written from the code's description (research notes) and behaviour,
not copied. They take and return what our functions do, so the benchmarks can check both sides agree
before timing them. lm-eval is not re-implemented: ``lm_eval_perplexity`` calls lm-eval itself.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from common.core import arch
from common.core.capture import Stats

# --------------------------------------------------------------------------- massive activations


@contextmanager
def _raw_last_hidden_state(model: torch.nn.Module):
    """transformers replaces ``hidden_states[-1]`` by the final-norm output unless the config says
    ``tie_last_hidden_states=False``; the reference reads the raw output of every decoder layer."""
    cfg = arch.unwrap(model).config
    had, old = hasattr(cfg, "tie_last_hidden_states"), getattr(cfg, "tie_last_hidden_states", None)
    cfg.tie_last_hidden_states = False
    try:
        yield
    finally:
        if had:
            cfg.tie_last_hidden_states = old
        else:
            del cfg.tie_last_hidden_states


@torch.no_grad()
def stored_massive_stats(model: torch.nn.Module, batches: list[torch.Tensor], k: int = 3) -> Stats:
    """Mirrors locuslab/massive-activations ``main_llm.py --exp2`` (commit 6521c05): run the whole model
    (LM head included, ``model(testseq)``) with every layer's hidden state stored, then post-process the
    stored tensors: per window and layer, ``torch.sort`` of |h| flattened over (token, channel), descending,
    keep the top-k values (and here their flat positions), and ``torch.median(|h|)``; the sort runs in float64
    (the reference stores ``layer.feat`` as a float64 copy).

    Storage: the hidden states come from ``output_hidden_states=True`` (the unpatched way to store them; the
    reference's decoder-layer monkey patch no longer runs on current transformers); the FFN intermediate state
    (input of ``down_proj``, HoC's object, which HF does not return) is stored whole in the same way by a
    forward pre-hook. Both are kept in float32, so the reference's extra float64 copies are not counted: its
    memory here is a lower bound. Returns the same ``Stats`` as ``capture.capture(..., whole=True)``
    (``pos0``, ``top``, ``top_index``, ``median`` of ``hidden`` and ``inter``)."""
    n = len(arch.layers(model))
    dev = next(model.parameters()).device
    inter: list[torch.Tensor | None] = [None] * n

    def keep(i):
        def hook(_module, args):
            inter[i] = args[0].detach()
        return hook

    handles = [arch.down_proj(model, i).register_forward_pre_hook(keep(i)) for i in range(n)]
    rows: dict[tuple[str, str], list[torch.Tensor]] = {}
    try:
        with _raw_last_hidden_state(model):
            for ids in batches:
                out = model(input_ids=ids.to(dev), output_hidden_states=True)
                stored = {"hidden": out.hidden_states[1:], "inter": inter}  # [0] is the embedding output
                for point, states in stored.items():
                    per_seq = {"pos0": [], "top": [], "top_index": [], "median": []}
                    for b in range(len(ids)):
                        cols = {key: [] for key in per_seq}
                        for layer in range(n):
                            feat = states[layer][b]
                            feat_abs = feat.double().abs()
                            s = torch.sort(feat_abs.flatten(), descending=True)
                            cols["pos0"].append(feat[0].float())
                            cols["top"].append(s.values[:k].float())
                            cols["top_index"].append(s.indices[:k])
                            cols["median"].append(torch.median(feat_abs).float())
                        for key, col in cols.items():
                            per_seq[key].append(torch.stack(col))
                    for key, col in per_seq.items():
                        rows.setdefault((key, point), []).append(torch.stack(col).cpu())
                del out, stored
                inter[:] = [None] * n
    finally:
        for h in handles:
            h.remove()
    result = Stats(seq_len=batches[0].shape[1])
    for (key, point), chunks in rows.items():
        getattr(result, key)[point] = torch.cat(chunks)
    return result


# ------------------------------------------------------------------------------ attention rank


def demo_energy_rank(attn: torch.Tensor, tau: float = 0.9) -> torch.Tensor:
    """Mirrors ``approx_rank_90pct_energy`` / ``compute_attention_rank`` of Inheritune's
    attention-collapse-demo/attention_demos.ipynb (sanyalsunny111/LLM-Inheritune, commit ef64cf1): a Python
    loop over the matrices, one float32 ``torch.linalg.svdvals`` each, then the smallest r whose cumulative
    share of sigma^2 reaches ``tau`` (``searchsorted`` + 1). ``attn`` [..., T, T]; returns k* [...], int64."""
    lead = attn.shape[:-2]
    ranks = []
    for a in attn.detach().reshape(-1, *attn.shape[-2:]):
        s = torch.linalg.svdvals(a.to(torch.float32))
        energy = s ** 2
        cum = torch.cumsum(energy / energy.sum(), dim=0)
        ranks.append(int(torch.searchsorted(cum, tau).item()) + 1)
    return torch.tensor(ranks, dtype=torch.long).reshape(lead)


# ------------------------------------------------------------------------------ SFSD decomposition


def sfsd_decompose(y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mirrors SFSD-LLM's ``DecomposeLinearEigen`` initialisation (nyunAI/SFSD-LLM layers.py, research
    sfsd.md §1.3): the module's calibration outputs ``y`` [N, m] in float32, their mean mu, the centred
    outputs' unbiased ``torch.cov``, one full m x m ``torch.linalg.eigh`` (ascending; the whole basis V is
    kept so that any rank can be cut later), and the two vectors its bias is built from: b1 = mu - mu V V^T
    and the mean of the centred outputs (both ~0 up to round-off, §1.3 step 5)."""
    y = y.reshape(-1, y.shape[-1]).float()
    mu = y.mean(0, keepdim=True)
    centred = y - mu
    _, v = torch.linalg.eigh(torch.cov(centred.T))
    return {"V": v, "b1": (mu - mu @ v @ v.T).squeeze(0), "y_sub": centred.mean(0, keepdim=True)}


def sfsd_cut(d: dict[str, torch.Tensor], weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mirrors one candidate of SFSD-LLM's rank searches (perplexity_test.py / surgical.py, sfsd.md §1.7-1.8):
    W2 = V[:, -r:], W1 = W2^T W, bias = b1 + V_prune V_prune^T y_sub with V_prune = V[:, :-r]. Returns
    (W1 [r, n], W2 [m, r], bias [m]), float32."""
    v = d["V"]
    w2 = v[:, -rank:]
    w1 = w2.T @ weight.detach().float()
    prune = v[:, :-rank]
    bias = d["b1"] + (prune @ (prune.T @ d["y_sub"].T)).squeeze(1)
    return w1, w2, bias


def sfsd_factors_recomputed(y: torch.Tensor, weight: torch.Tensor, ranks: list[int]) -> dict[int, tuple]:
    """The naive baseline of the decompose-once benchmark: the covariance and the eigendecomposition
    recomputed for every candidate rank (``sfsd_decompose`` + ``sfsd_cut`` per rank). SFSD-LLM itself
    keeps V and does not do this; what it does is ``sfsd_decompose`` once, then ``sfsd_cut`` per rank."""
    return {r: sfsd_cut(sfsd_decompose(y), weight, r) for r in ranks}


# --------------------------------------------------------------------------------- perplexity


def lm_eval_perplexity(lm, texts: list[str], n_tokens: int) -> tuple[float, list[float]]:
    """lm-eval itself (``HFLM.loglikelihood_rolling``, what its perplexity tasks such as wikitext call):
    one ``loglikelihood_rolling`` request per text, every token of it scored in lm-eval's rolling windows
    of ``lm.max_length`` tokens, the first after lm-eval's prefix token. Returns (exp(-sum of the
    log-likelihoods / ``n_tokens``), the per-text summed log-likelihoods); ``n_tokens``: how many tokens
    lm-eval's tokenisation of ``texts`` has (counted by the caller, outside any timing)."""
    from lm_eval.api.instance import Instance

    requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=i)
                for i, t in enumerate(texts)]
    ll = [float(x) for x in lm.loglikelihood_rolling(requests, disable_tqdm=True)]
    return math.exp(-sum(ll) / n_tokens), ll
