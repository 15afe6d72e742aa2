"""``common.sfsd.decomposition.record_spectra`` on a planted spectra frame, and the paper module.

``common.sfsd``: budgets, targets, cached layer inputs, the four decompositions checked against an
independent reimplementation (module inputs captured with hooks on the dense model, outputs
Y = X W^T + b, numpy/torch eigh and SVD in float64), the eigendecomposition cache, the factorised
modules and their parameter counts, bad input and the spectra summary."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from tiny_families import single_thread
from torch import nn

from common.core import arch, evaluation, models
from common.core.layer_inputs import LayerInputs
from common.sfsd import budgets, decomposition, lowrank, paper
from common.sfsd.budgets import Target
from common.sfsd.decomposition import Decomposition, Moments
from common.sfsd.lowrank import LowRankLinear


def test_record_spectra(records) -> None:
    """Means over modules, their difference, and per kind the values sorted by layer."""
    frame = pd.DataFrame({"layer": [2, 1, 1, 2], "kind": ["q", "q", "v", "v"], "feature": [0.9, 0.8, 0.6, 0.7],
                          "weight": [0.5, 0.4, 0.3, 0.2]})
    decomposition.record_spectra("m", frame)
    rec = {k: r["value"] for k, r in records().items()}
    assert rec["m/lowrank/spectra/feature_energy25"] == pytest.approx(0.75)
    assert rec["m/lowrank/spectra/weight_energy25"] == pytest.approx(0.35)
    assert rec["m/lowrank/spectra/feature_minus_weight_energy25"] == pytest.approx(0.4)
    assert rec["m/lowrank/spectra/q/feature_energy25"] == [0.8, 0.9]
    assert rec["m/lowrank/spectra/v/weight_energy25"] == [0.3, 0.2]


def test_record_spectra_interval_is_paired_over_modules(records) -> None:
    """Modules differ a lot, features by a planted 0.1 over weights in each: the paired interval excludes 0;
    with no gap (feature = weight + noise) it holds 0."""
    rng = np.random.default_rng(0)
    weight = rng.uniform(0.1, 0.8, 40)
    frame = pd.DataFrame({"layer": np.arange(40) // 2, "kind": ["q", "v"] * 20, "weight": weight,
                          "feature": weight + 0.1 + rng.normal(0, 0.02, 40)})
    decomposition.record_spectra("m", frame)
    gap = records()["m/lowrank/spectra/feature_minus_weight_energy25"]
    assert gap["value"] == frame.feature.mean() - frame.weight.mean() and 0.08 < gap["ci95"][0] < gap["value"] < gap["ci95"][1]
    assert "40 modules" in gap["note"]
    decomposition.record_spectra("m", frame.assign(feature=weight + rng.normal(0, 0.02, 40)))
    lo, hi = records()["m/lowrank/spectra/feature_minus_weight_energy25"]["ci95"]
    assert lo < 0.0 < hi


def test_paper_values() -> None:
    """SFSD README Table A / Table B as claims.yaml and the records read them."""
    assert paper.TABLE_A[("feature", 80)] == 64.85 and paper.TABLE_A["dense"] == 69.61
    assert paper.DENSE_PPL == 12.33
    assert paper.TASK_SEARCH_TEST_MINUS_DENSE == pytest.approx((77.21 - 78.23) / 100)
    assert round(paper.TABLE_A_WHOLE_MODEL_PCT[80]) == 80 and round(paper.TABLE_A_WHOLE_MODEL_PCT[50]) == 50
    assert paper.LLAMA_7B_LAYER_PARAMS == 202_383_360  # sfsd.md §1.6
    assert paper.TABLE_A_FEATURE_MINUS_SVD == {"whole80": 0.1444, "whole50": 0.0622}
    assert paper.DENSE_PPL_BY_MODEL == {"llama-7b": 12.33, "mistral-7b": 11.60}


pytestmark = pytest.mark.usefixtures("one_thread")

N_CALIB, T_CALIB = 12, 24  # 288 calibration tokens, more than every input width (<= 256): llama's X^T X is full rank
BATCH = 5  # does not divide N_CALIB on purpose
LLAMA_KINDS = ["q", "k", "v", "o", "gate", "up", "down"]
EXACT = 1e-4  # relative Frobenius error of an exact reconstruction (float32 statistics and factors)


def _ids(n: int, t: int, seed: int) -> torch.Tensor:
    return torch.randint(3, models.TINY_VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def _capture(model: nn.Module, ids: torch.Tensor, batch_size: int = 4) -> dict[str, torch.Tensor]:
    """Each target's input over all tokens, [N T, n] float64, from forward pre-hooks on the dense model."""
    caps: dict[str, list[torch.Tensor]] = {}
    handles = []
    for t in budgets.targets(model):
        def hook(module, args, path=t.path):
            caps.setdefault(path, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).double())
        handles.append(model.get_submodule(t.path).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for s in range(0, len(ids), batch_size):
                model(input_ids=ids[s:s + batch_size], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {p: torch.cat(xs) for p, xs in caps.items()}


def _dense(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [m, n], b [m]) of a dense projection in float64, written out independently of ``weight_of``."""
    w = module.weight.detach().double()
    if type(module).__name__ == "Conv1D":
        w = w.T
    b = module.bias.detach().double() if module.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    return w, b


def _outputs(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return x @ w.T + b


def _apply(factors, x: torch.Tensor) -> torch.Tensor:
    w1, w2, b = factors
    y = (x @ w1.double().T) @ w2.double().T
    return y if b is None else y + b.double()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _eigh_desc(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    vals, vecs = np.linalg.eigh(c)
    return vals[::-1].copy(), vecs[:, ::-1].copy()


# ------------------------------------------------------------------------------- shared fixtures


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return _ids(N_CALIB, T_CALIB, seed=0)


@pytest.fixture(scope="module")
def llama():
    """A dense tiny-llama nobody mutates (tests that change weights load their own)."""
    return models.load_model("tiny-llama")[0]


def _gpt2_with_biases():
    """tiny-gpt2 with non-zero projection biases (GPT-2 initialises them to 0, which would hide b0)."""
    model = models.load_model("tiny-gpt2")[0]
    gen = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for t in budgets.targets(model):
            bias = model.get_submodule(t.path).bias
            bias.copy_(0.02 * torch.randn(bias.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def gpt2():
    return _gpt2_with_biases()


@pytest.fixture(scope="module")
def llama_full(llama, calib):
    """Decompositions keeping every eigenvector (keep >= the widest output, 192) and the hook-captured
    inputs of every module."""
    with single_thread():
        return decomposition.decompose_model(llama, calib, batch_size=BATCH, keep=192), _capture(llama, calib)


@pytest.fixture(scope="module")
def gpt2_full(gpt2, calib):
    with single_thread():
        return decomposition.decompose_model(gpt2, calib, batch_size=BATCH, keep=256), _capture(gpt2, calib)


@pytest.fixture(scope="module")
def llama_kappa(llama, calib):
    """Default decompositions (keep = kappa), all layers."""
    with single_thread():
        return decomposition.decompose_model(llama, calib, batch_size=BATCH)


# ----------------------------------------------------------------------------------- 1. budgets


@pytest.mark.parametrize(("m", "n", "expected"), [(4096, 4096, 2048), (11008, 4096, 2985), (1024, 4096, 819),
                                                  (14336, 4096, 3185), (64, 64, 32), (32, 64, 21), (192, 64, 48),
                                                  (1, 1, 0)])
def test_kappa_is_break_even_rank(m, n, expected) -> None:
    assert budgets.kappa(m, n) == expected == budgets.kappa(n, m)
    if expected:  # a rank-kappa pair is not larger than the dense matrix, rank kappa + 1 is
        assert expected * (m + n) <= m * n < (expected + 1) * (m + n)


@pytest.mark.parametrize(("m", "n"), [(0, 4), (4, 0), (-1, 3)])
def test_kappa_rejects_empty_matrices(m, n) -> None:
    with pytest.raises(ValueError, match="positive"):
        budgets.kappa(m, n)


def test_rank_grid_matches_reference() -> None:
    assert budgets.rank_grid(2048) == [1, 204, 409, 614, 819, 1024, 1228, 1433, 1638, 1843, 2048]
    assert budgets.rank_grid(2985) == [1, 298, 597, 895, 1194, 1492, 1791, 2089, 2388, 2686, 2985]
    # tiny kappa: floor(0.1 k) .. floor(0.9 k) collapse; duplicates and zeros are removed
    assert budgets.rank_grid(3) == [1, 2, 3]
    assert budgets.rank_grid(1) == [1]
    assert budgets.rank_grid(21) == [1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 21]
    with pytest.raises(ValueError):
        budgets.rank_grid(0)


def test_rank_for() -> None:
    assert budgets.rank_for(0.8, 2048) == 1638
    assert budgets.rank_for(1.0, 2048) == 2048
    assert budgets.rank_for(0.5, 2985) == 1492
    assert budgets.rank_for(0.57, 100) == 57  # 0.57 * 100 = 56.99999999999999 in floating point
    assert budgets.rank_for(0.001, 10) == 1  # never 0
    for bad in (0, 0.0, -0.1, 1.5, 80, float("nan")):
        with pytest.raises(ValueError, match="fraction"):
            budgets.rank_for(bad, 2048)


def test_factor_params() -> None:
    assert budgets.factor_params(64, 32, 5, bias=False) == 5 * 96
    assert budgets.factor_params(64, 32, 5, bias=True) == 5 * 96 + 64
    assert budgets.factor_params(4096, 4096, 2048, bias=False) == 4096 * 4096  # kappa breaks even


def test_param_count_counts_tied_weights_once(gpt2, llama) -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    net[1].weight = net[0].weight
    assert budgets.param_count(net) == 16 + 4 + 4
    net[1].weight = nn.Parameter(torch.zeros(4, 4))  # untie: counted twice now
    assert budgets.param_count(net) == 16 + 4 + 16 + 4
    # tiny-gpt2 ties wte and lm_head; tiny-llama does not
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    all_numel = sum(p.numel() for _, p in gpt2.named_parameters(remove_duplicate=False))
    assert budgets.param_count(gpt2) == sum(p.numel() for p in gpt2.parameters())
    assert budgets.param_count(gpt2) == all_numel - models.TINY_VOCAB * 64
    untied = llama.config.vocab_size * 64 * 2 + 4 * (64 * 64 * 2 + 32 * 64 * 2 + 3 * 64 * 192 + 2 * 64) + 64
    assert budgets.param_count(llama) == untied


def test_protected_layers() -> None:
    assert budgets.protected_layers(32) == 4
    assert budgets.protected_layers(30) == 4
    assert budgets.protected_layers(4) == 1
    assert budgets.protected_layers(1) == 1


# ----------------------------------------------------------------------------------- 2. targets


def test_targets_llama(llama) -> None:
    ts = budgets.targets(llama)
    assert len(ts) == 7 * 4
    assert [t.kind for t in ts] == LLAMA_KINDS * 4
    assert [t.layer for t in ts] == [i for i in range(4) for _ in range(7)]
    assert ts[0].path == "model.layers.0.self_attn.q_proj" and ts[-1].path == "model.layers.3.mlp.down_proj"
    for t in ts:
        module = llama.get_submodule(t.path)
        assert isinstance(module, nn.Linear)
        assert module is arch.layers(llama)[t.layer].get_submodule(t.name)
        assert budgets.weight_of(module) is module.weight
    assert [t.path for t in budgets.targets(llama, [2])] == [t.path for t in ts if t.layer == 2]
    shapes = [tuple(budgets.weight_of(llama.get_submodule(t.path)).shape) for t in ts[:7]]
    assert shapes == [(64, 64), (32, 64), (32, 64), (64, 64), (192, 64), (192, 64), (64, 192)]


def test_targets_gpt2_conv1d(gpt2) -> None:
    ts = budgets.targets(gpt2)
    assert [t.name for t in ts[:4]] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert len(ts) == 16 and ts[0].path == "transformer.h.0.attn.c_attn"
    shapes = {"attn.c_attn": (192, 64), "attn.c_proj": (64, 64), "mlp.c_fc": (256, 64), "mlp.c_proj": (64, 256)}
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    for t in ts[:4]:
        module = gpt2.get_submodule(t.path)
        assert type(module).__name__ == "Conv1D"
        w = budgets.weight_of(module)
        assert tuple(w.shape) == shapes[t.name]
        xin = x if w.shape[1] == 64 else torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(2))
        with torch.no_grad():  # [out, in] means F.linear reproduces the module
            torch.testing.assert_close(F.linear(xin, w, module.bias), module(xin))
    # Target.kind: GPT-2 names stay whole (documented), so attn.c_proj and mlp.c_proj stay distinct
    assert [t.kind for t in ts[:4]] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


# ------------------------------------------------------------------------------ 3. layer inputs


@pytest.mark.parametrize("key", ["tiny-llama", "tiny-gpt2"])
def test_layer_inputs_perplexity_from_every_layer(key, llama, gpt2) -> None:
    model = llama if key == "tiny-llama" else gpt2
    ids = _ids(7, 20, seed=3)
    expected = evaluation.perplexity(model, ids)
    for bs in (3, 7):  # 3 does not divide 7
        inputs = LayerInputs(model, ids, batch_size=bs)
        assert len(inputs.batches) == math.ceil(7 / bs)
        assert inputs.n_targets() == 7 * 19
        for layer in range(inputs.n_layers):
            assert inputs.perplexity(layer) == pytest.approx(expected, rel=1e-5)
    # the cache is a dense prefix: a change in the last layer shows up from every start ...
    def perturbed(layer: int):
        module = model.get_submodule(budgets.targets(model, [layer])[-1].path)  # the FFN output projection
        return module, module.weight.detach().clone()

    with torch.no_grad():
        for layer, seen_from in ((3, range(4)), (0, range(1))):
            module, saved = perturbed(layer)
            module.weight.mul_(50.0)
            try:
                changed = evaluation.perplexity(model, ids)
                assert abs(changed - expected) > 1e-3 * expected  # 100x the tolerance below
                for start in range(4):  # ... a change in layer 0 only from start 0 (later inputs are cached)
                    want = changed if start in seen_from else expected
                    assert inputs.perplexity(start) == pytest.approx(want, rel=1e-5), (layer, start)
            finally:
                module.weight.copy_(saved)


def test_layer_inputs_masked_logprobs(llama) -> None:
    ids = _ids(5, 12, seed=4)
    mask = (torch.rand(5, 12, generator=torch.Generator().manual_seed(5)) < 0.4).long()
    mask[:, -1] = 1  # the last column is never scored (nothing follows it)
    mask[2] = 0  # a request with nothing to score
    mask[2, -1] = 1
    inputs = LayerInputs(llama, ids, mask, batch_size=2)
    with torch.no_grad():
        logits = llama(input_ids=ids, use_cache=False).logits.double()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    expected = (lp * mask[:, :-1]).sum(1)
    for start in (0, 2):
        got = inputs.logprobs(start)
        assert got.dtype == torch.float64 and got.shape == (5,)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert got[2] == 0.0
    assert inputs.n_targets() == int(mask[:, :-1].sum())
    unmasked = lp.sum(1)
    assert (got - unmasked).abs().max() > 1.0  # the mask matters
    with pytest.raises(ValueError, match="mask shape"):
        LayerInputs(llama, ids, mask[:, :-1])


@pytest.mark.parametrize("key", ["tiny-llama", "tiny-gpt2"])
def test_keep_first_advance_reproduces_keep_all(key, llama, gpt2) -> None:
    model = llama if key == "tiny-llama" else gpt2
    ids = _ids(8, 16, seed=6)
    full = LayerInputs(model, ids, batch_size=3)  # batches 3, 3, 2
    walk = LayerInputs(model, ids, batch_size=3, keep="first")
    assert all(h is None for h in walk.hidden[1])
    assert walk.perplexity(1) == pytest.approx(full.perplexity(1), rel=1e-6)  # from the nearest cached layer, 0
    for layer in range(walk.n_layers):
        assert walk.layer == layer
        for b in range(len(full.batches)):
            torch.testing.assert_close(walk.hidden[layer][b], full.hidden[layer][b], rtol=1e-5, atol=1e-6)
        assert walk.perplexity(layer) == pytest.approx(full.perplexity(0), rel=1e-5)
        if layer < walk.n_layers - 1:
            walk.advance()
            with pytest.raises(ValueError, match="not cached"):
                walk.logprobs(layer)  # advanced past it: nothing at or below is cached
            assert all(h is None for h in walk.hidden[layer])
    with pytest.raises(RuntimeError):
        walk.advance()


def test_layer_inputs_bad_arguments(llama) -> None:
    with pytest.raises(ValueError):
        LayerInputs(llama, _ids(2, 1, 0))
    with pytest.raises(ValueError):
        LayerInputs(llama, torch.arange(3, 10))
    with pytest.raises(ValueError, match="keep"):
        LayerInputs(llama, _ids(2, 4, 0), keep="some")


# ------------------------------------------------------------------------------ 4. decompositions


def test_decompose_model_shapes_and_order(llama_kappa, llama) -> None:
    assert list(llama_kappa) == [t.path for t in budgets.targets(llama)]
    for p, d in llama_kappa.items():
        w = budgets.weight_of(llama.get_submodule(p))
        assert (d.m, d.n) == tuple(w.shape) and d.target.path == p and not d.has_bias
        assert d.keep == d.kappa == budgets.kappa(d.m, d.n)
        assert d.spectra["centred"][1].shape == (d.m, min(d.kappa, d.m))
        torch.testing.assert_close(d.svd[1].double(), torch.linalg.svdvals(w.detach().double()),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_full_rank_is_exact(which, llama, gpt2, llama_full, gpt2_full) -> None:
    """keep = m: feature at rank m reproduces Y; weight_svd at min(m, n) reproduces W."""
    model, (decomps, caps) = (llama, llama_full) if which == "llama" else (gpt2, gpt2_full)
    for p, d in decomps.items():
        module = model.get_submodule(p)
        w, b = _dense(module)
        x = caps[p]
        y = _outputs(x, w, b)
        full = _rel(_apply(d.factors(module, "feature", d.full_rank("feature")), x), y)
        assert full < EXACT, p
        w1, w2, b_svd = d.factors(module, "weight_svd", min(d.m, d.n))
        assert _rel(w2.double() @ w1.double(), w) < EXACT, p
        assert (b_svd is None) == (module.bias is None)
        # a truncation is not exact (the checks above can fail): rank 1 is far worse than full rank
        assert _rel(_apply(d.factors(module, "feature", 1), x), y) > 100 * full + 1e-7, p
        w1, w2, _ = d.factors(module, "weight_svd", 1)
        assert _rel(w2.double() @ w1.double(), w) > 0.1, p


@pytest.mark.parametrize("which", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["feature_nomean", "feature_uncentred"])
def test_full_rank_is_exact_other_feature_variants(which, method, llama, gpt2, llama_full, gpt2_full) -> None:
    """With all m eigenvectors kept, P_m = I: feature_nomean and feature_uncentred at their accepted full
    rank m reproduce Y too (including m > n modules: gate/up, c_attn, c_fc)."""
    model, (decomps, caps) = (llama, llama_full) if which == "llama" else (gpt2, gpt2_full)
    bad = []
    for p, d in decomps.items():
        module = model.get_submodule(p)
        if method == "feature_nomean" and d.full_rank(method) < d.m:
            continue  # m > n: the n centred directions are not all of R^m, and without the mean term the
            # output mean's part outside them (a bias, here) is lost by design (test_mean_compensation_*)
        w, b = _dense(module)
        err = _rel(_apply(d.factors(module, method, d.full_rank(method)), caps[p]), _outputs(caps[p], w, b))
        if not err < EXACT:
            bad.append((p, d.m, d.n, err))
    assert not bad


def test_factors_have_the_requested_rank(llama, llama_full) -> None:
    """``factors(module, method, r)`` returns an [r, n] / [m, r] pair for every accepted r, or refuses r.

    For m > n (gate/up, 192 x 64) only n (centred) or n + 1 (uncentred) eigenvectors exist although
    ``keep`` = 192: an accepted rank above them must not silently give a smaller pair."""
    decomps, _ = llama_full
    for p in ("model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj", "model.layers.0.mlp.gate_proj"):
        d, module = decomps[p], llama.get_submodule(p)
        for method in decomposition.METHODS:
            for r in sorted({1, d.kappa, min(d.m, d.n), d.full_rank(method)}):
                try:
                    w1, w2, _ = d.factors(module, method, r)
                except ValueError:
                    continue
                assert tuple(w1.shape) == (r, d.n) and tuple(w2.shape) == (d.m, r), (p, method, r)


def test_uncentred_is_the_optimal_fit_and_beats_weight_svd(llama, llama_full) -> None:
    """Bias-free tiny-llama: for every rank r <= kappa, MSE(feature) <= MSE(feature_uncentred) <=
    MSE(weight_svd) on the calibration outputs, and the two feature errors are the Eckart-Young tails of
    the centred covariance / uncentred second moment of Y (numpy eigh)."""
    decomps, caps = llama_full
    strict = 0
    for p, d in decomps.items():
        if d.target.layer not in (0, 3):
            continue
        module = llama.get_submodule(p)
        w, b = _dense(module)
        y = _outputs(caps[p], w, b)
        n_tok = len(y)
        cov_vals = _eigh_desc(np.cov(y.numpy().T, bias=True))[0]
        mom_vals = _eigh_desc((y.T @ y).numpy() / n_tok)[0]
        scale = float((y ** 2).mean())
        for r in range(1, d.kappa + 1):
            mse = {m: float(((_apply(d.factors(module, m, r), caps[p]) - y) ** 2).mean())
                   for m in ("weight_svd", "feature", "feature_uncentred")}
            assert mse["feature_uncentred"] <= mse["weight_svd"] + 1e-7 * scale, (p, r)
            assert mse["feature"] <= mse["feature_uncentred"] + 1e-7 * scale, (p, r)
            assert mse["feature_uncentred"] == pytest.approx(mom_vals[r:].sum() / d.m, rel=1e-4, abs=1e-7 * scale)
            assert mse["feature"] == pytest.approx(cov_vals[r:].sum() / d.m, rel=1e-4, abs=1e-7 * scale)
            strict += mse["feature_uncentred"] < 0.99 * mse["weight_svd"]
    assert strict > 0  # the data-aware fit is really better somewhere


def test_feature_error_is_covariance_tail_with_bias(gpt2, gpt2_full) -> None:
    """GPT-2 (biased Conv1D): feature's error is the centred tail, feature_uncentred's the uncentred tail."""
    decomps, caps = gpt2_full
    for p in ("transformer.h.1.attn.c_attn", "transformer.h.2.mlp.c_fc", "transformer.h.2.mlp.c_proj"):
        d, module = decomps[p], gpt2.get_submodule(p)
        w, b = _dense(module)
        assert d.has_bias and float(b.abs().max()) > 0.01  # the fixture gave the biases non-zero entries
        y = _outputs(caps[p], w, b)
        cov_vals = _eigh_desc(np.cov(y.numpy().T, bias=True))[0]
        mom_vals = _eigh_desc((y.T @ y).numpy() / len(y))[0]
        scale = float((y ** 2).mean())
        for r in (1, d.kappa // 3, d.kappa):
            err_f = float(((_apply(d.factors(module, "feature", r), caps[p]) - y) ** 2).mean())
            err_u = float(((_apply(d.factors(module, "feature_uncentred", r), caps[p]) - y) ** 2).mean())
            assert err_f == pytest.approx(cov_vals[r:].sum() / d.m, rel=1e-4, abs=1e-7 * scale)
            assert err_u == pytest.approx(mom_vals[r:].sum() / d.m, rel=1e-4, abs=1e-7 * scale)


@pytest.mark.parametrize(("which", "path"), [("llama", "model.layers.1.self_attn.q_proj"),
                                             ("llama", "model.layers.2.mlp.gate_proj"),
                                             ("llama", "model.layers.2.self_attn.o_proj"),
                                             ("gpt2", "transformer.h.1.attn.c_attn"),
                                             ("gpt2", "transformer.h.1.mlp.c_proj")])
def test_mean_compensation(which, path, llama, gpt2, llama_full, gpt2_full) -> None:
    model, (decomps, caps) = (llama, llama_full) if which == "llama" else (gpt2, gpt2_full)
    d, module = decomps[path], model.get_submodule(path)
    w, b0 = _dense(module)
    x = caps[path]
    y = _outputs(x, w, b0)
    mu = y.mean(0)
    torch.testing.assert_close(d.mean.double(), mu, rtol=1e-5, atol=1e-5 * float(mu.norm()))
    vals, vecs = _eigh_desc(np.cov(y.numpy().T, bias=True))
    vecs = torch.from_numpy(vecs)
    outside = checked = 0
    for r in (1, d.kappa // 2, d.kappa):
        assert _rel(_apply(d.factors(module, "feature", r), x).mean(0), mu) < 1e-5, r
        p_r = vecs[:, :r] @ vecs[:, :r].T
        nomean = _apply(d.factors(module, "feature_nomean", r), x).mean(0)
        if vals[r - 1] - vals[r] > 1e-2 * vals[0]:  # P_r well determined: numpy's projector
            assert _rel(nomean, p_r @ mu) < 1e-3, r
            checked += 1
        v_lib = d.spectra["centred"][1][:, :r].double()  # elsewhere, the stored one (b = P_r b0, W1 = V^T W)
        assert _rel(nomean, v_lib @ (v_lib.T @ mu)) < 1e-5, r
        gap = float((mu - p_r @ mu).norm() / mu.norm())
        if gap > 0.05:
            outside += 1
            assert _rel(nomean, mu) > 0.5 * gap  # the missing mean is visible
    assert outside > 0 and checked > 0  # mu really has a component outside V_r at some tested rank
    # control: once V_r spans every output (rank m; bias-free: the column space of W, rank min(m, n)),
    # no mean is lost
    if d.m <= d.n or not d.has_bias:
        full = min(d.m, d.n)
        assert _rel(_apply(d.factors(module, "feature_nomean", full), x).mean(0), mu) < 1e-5


@pytest.mark.parametrize("path", ["model.layers.1.self_attn.q_proj", "model.layers.2.self_attn.k_proj",
                                  "model.layers.2.mlp.gate_proj", "model.layers.3.mlp.down_proj"])
def test_uncentred_equals_svd_llm_whitening(path, llama, llama_full) -> None:
    """SVD-LLM: S = chol(X^T X), W S = U Sigma V^T, W' = U_r Sigma_r V_r^T S^-1 gives the same outputs as
    feature_uncentred (bias-free module)."""
    decomps, caps = llama_full
    d, module = decomps[path], llama.get_submodule(path)
    assert module.bias is None
    w, _ = _dense(module)
    x = caps[path]
    gram = x.T @ x
    s = torch.linalg.cholesky(gram + 1e-12 * gram.trace() / len(gram) * torch.eye(len(gram), dtype=gram.dtype))
    u, sig, vh = torch.linalg.svd(w @ s, full_matrices=False)
    for r in (1, d.kappa // 2, d.kappa):
        w_white = (u[:, :r] * sig[:r]) @ vh[:r] @ torch.linalg.inv(s)
        ours = _apply(d.factors(module, "feature_uncentred", r), x)
        assert _rel(ours, x @ w_white.T) < 1e-4, r
        if r < d.kappa:  # and it is not the weight SVD (the equality above is informative)
            assert _rel(_apply(d.factors(module, "weight_svd", r), x), x @ w_white.T) > 1e-3


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_spectra_match_numpy(which, llama, gpt2, llama_full, gpt2_full) -> None:
    """Centred eigenvalues = eigh of the population covariance of Y (divided by N, not N - 1); uncentred =
    eigh of Y^T Y / N; both for m <= n (the m x m output moment) and m > n (gate/up, c_attn, c_fc: the
    thin route from the input moment)."""
    model, (decomps, caps) = (llama, llama_full) if which == "llama" else (gpt2, gpt2_full)
    routes = set()
    for p, d in decomps.items():
        if d.target.layer not in (1, 2):
            continue
        module = model.get_submodule(p)
        w, b = _dense(module)
        y = _outputs(caps[p], w, b).numpy()
        routes.add(d.m > d.n)
        cov = np.cov(y.T, bias=True)
        for variant, ref in (("centred", cov), ("uncentred", y.T @ y / len(y))):
            vals = d.spectra[variant][0].double().numpy()
            expected = _eigh_desc(ref)[0]
            tol = 1e-5 * expected[0]
            k = len(vals)
            assert k >= min(d.m, d.n), (p, variant)
            np.testing.assert_allclose(vals, expected[:k], atol=tol, rtol=0)
            assert np.all(np.abs(expected[k:]) < tol)  # the m > n route drops only zero eigenvalues
            assert np.all(np.diff(vals) <= 0)
            if variant == "centred":  # the normalisation is tested: N - 1 would be off by N/(N-1)
                sample = _eigh_desc(np.cov(y.T, bias=False))[0]
                assert np.abs(vals - sample[:k]).max() > 10 * tol
            # eigenvectors: the top-r subspace matches where there is an eigengap
            vecs = d.spectra[variant][1].double().numpy()
            ref_vecs = _eigh_desc(ref)[1]
            r = 4
            if expected[r - 1] - expected[r] > 1e-2 * expected[0]:
                np.testing.assert_allclose(vecs[:, :r] @ vecs[:, :r].T, ref_vecs[:, :r] @ ref_vecs[:, :r].T,
                                           atol=1e-4)
    assert routes == {True, False}


@pytest.mark.parametrize(("m", "n"), [(9, 5), (12, 4), (6, 6)])
def test_psd_root_and_thin_output_spectrum(m, n) -> None:
    """The m > n route: from L with L L^T = M, the top eigenpairs of W M W^T without the m x m matrix."""
    gen = torch.Generator().manual_seed(m * 10 + n)
    w = torch.randn(m, n, generator=gen, dtype=torch.float64)
    a = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    moment = a @ a.T + torch.diag(torch.tensor([2.0] + [0.0] * (n - 1), dtype=torch.float64))  # rank 4, PSD
    root = decomposition.psd_root(moment)
    torch.testing.assert_close(root @ root.T, moment, rtol=0, atol=1e-12)
    vals, vecs = decomposition.output_spectrum(w, root, keep=3)
    expected, ref_vecs = _eigh_desc((w @ moment @ w.T).numpy())
    k = len(vals)
    assert k >= 4
    np.testing.assert_allclose(vals.numpy(), expected[:k], atol=1e-9 * expected[0])
    assert vecs.shape == (m, 3)
    np.testing.assert_allclose((vecs @ vecs.T).numpy(), ref_vecs[:, :3] @ ref_vecs[:, :3].T, atol=1e-8)
    np.testing.assert_allclose((vecs.T @ vecs).numpy(), np.eye(3), atol=1e-10)


def test_exclude_first_leaves_position_zero_out(calib) -> None:
    """With BOS first, tiny-llama's planted circuit makes position 0 of layer 1's down_proj input massive:
    ``exclude_first`` statistics are those of positions 1.. only (captured here), the default ones include it."""
    model = models.load_model("tiny-llama")[0]
    ids = calib[:6].clone()
    ids[:, 0] = 1  # <bos>
    p = "model.layers.1.mlp.down_proj"
    both = {flag: decomposition.decompose_model(model, ids, layers=[1], batch_size=4, exclude_first=flag)[p]
            for flag in (False, True)}
    x = _capture(model, ids)[p].reshape(6, T_CALIB, -1)
    w, b = _dense(model.get_submodule(p))
    for flag, d in both.items():
        y = _outputs((x[:, 1:] if flag else x).reshape(-1, x.shape[-1]), w, b)
        torch.testing.assert_close(d.mean.double(), y.mean(0), rtol=1e-4, atol=1e-5 * float(y.mean(0).norm()))
        vals = _eigh_desc(np.cov(y.numpy().T, bias=True))[0]
        np.testing.assert_allclose(d.spectra["centred"][0].double().numpy(), vals[:d.m], rtol=0, atol=1e-5 * vals[0])
    assert float(both[False].spectra["centred"][0][0]) > 100 * float(both[True].spectra["centred"][0][0])
    # the gate/up input (the input-side route) is affected the same way
    g = "model.layers.1.mlp.gate_proj"
    assert not torch.allclose(decomposition.decompose_model(model, ids, layers=[1], exclude_first=True)[g].mean,
                              decomposition.decompose_model(model, ids, layers=[1])[g].mean, rtol=1e-3)


def test_shared_inputs_share_statistics(llama, llama_full) -> None:
    """q/k/v (and gate/up) read one tensor: their means are W mu_x of the same mu_x, the captured mean;
    o_proj reads another tensor and is not consistent with it."""
    decomps, caps = llama_full
    for layer in (0, 2):
        pre = f"model.layers.{layer}."
        for group in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")):
            mods = [llama.get_submodule(pre + g) for g in group]
            ws = [_dense(m)[0] for m in mods]
            means = [decomps[pre + g].mean.double() for g in group]
            mu_x = torch.linalg.lstsq(ws[0], means[0][:, None]).solution[:, 0]  # from the first reader only
            x = caps[pre + group[0]]
            torch.testing.assert_close(mu_x, x.mean(0), rtol=1e-4, atol=1e-4 * float(x.mean(0).norm()))
            cov_x = torch.cov(x.T, correction=0)
            for g, w, mean in zip(group, ws, means, strict=True):
                assert _rel(w @ mu_x, mean) < 1e-4, g
                vals = decomps[pre + g].spectra["centred"][0].double()
                expected = torch.linalg.eigvalsh(w @ cov_x @ w.T).flip(0)[:len(vals)]
                torch.testing.assert_close(vals, expected, rtol=0, atol=1e-5 * float(expected[0]))
        # control: o_proj's mean is not W_o mu_x of the q/k/v input
        w_o = _dense(llama.get_submodule(pre + "self_attn.o_proj"))[0]
        mu_qkv = caps[pre + "self_attn.q_proj"].mean(0)
        assert _rel(w_o @ mu_qkv, decomps[pre + "self_attn.o_proj"].mean.double()) > 0.1


def test_moments_second(llama) -> None:
    gen = torch.Generator().manual_seed(7)
    xs = [torch.randn(3, 5, 4, generator=gen) for _ in range(3)]
    mo = Moments(4)
    for x in xs:
        mo.add(x)
    flat = torch.cat([x.reshape(-1, 4) for x in xs]).double()
    aug = torch.cat([flat, torch.ones(len(flat), 1, dtype=torch.float64)], 1)
    assert mo.count == 45
    torch.testing.assert_close(mo.second, aug.T @ aug / 45, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(mo.second[:4, 4], flat.mean(0), rtol=1e-6, atol=1e-7)
    assert mo.second[4, 4] == 1.0


def test_moments_root_follows_later_batches() -> None:
    """``root`` is the square root of the statistics as they are now: a batch added after a first
    ``root`` call must show up in the next one (not a stale cached root)."""
    gen = torch.Generator().manual_seed(15)
    mo = Moments(3)
    a, b = torch.randn(6, 3, generator=gen), 3.0 * torch.randn(6, 3, generator=gen) + 1.0
    mo.add(a)
    first = mo.root("centred")
    torch.testing.assert_close(first @ first.T, torch.cov(a.double().T, correction=0), rtol=1e-5, atol=1e-6)
    mo.add(b)
    both = torch.cat([a, b]).double()
    for variant, expected in (("centred", torch.cov(both.T, correction=0)),
                              ("uncentred", torch.cat([both, torch.ones(12, 1, dtype=torch.float64)], 1).T
                               @ torch.cat([both, torch.ones(12, 1, dtype=torch.float64)], 1) / 12)):
        root = mo.root(variant)
        torch.testing.assert_close(root @ root.T, expected, rtol=1e-5, atol=1e-5)


def test_moments_covariance_is_float64_accurate_under_an_offset() -> None:
    """The moment is documented as float64: the covariance E[x x^T] - mu mu^T of float32 inputs whose
    mean is 30 standard deviations away from zero must keep float64 accuracy (LLM channels with a
    constant offset). A float32 Gram loses ~eps32 (mu / sigma)^2 ~ 1e-4 of it."""
    gen = torch.Generator().manual_seed(8)
    xs = [(torch.randn(512, 16, generator=gen, dtype=torch.float64) + 30.0).float() for _ in range(8)]
    mo = Moments(16)
    for x in xs:
        mo.add(x)
    flat = torch.cat(xs).double()
    expected = torch.cov(flat.T, correction=0)
    mu = mo.second[:16, 16]
    got = mo.second[:16, :16] - torch.outer(mu, mu)
    assert float((got - expected).abs().max() / expected.diagonal().mean()) < 1e-7


# ------------------------------------------------------------------------------- 5. the cache


def test_eigh_spy_cache_and_resume(llama, calib, tmp_path) -> None:
    cache = tmp_path / "decomp"
    decomposition.EIGH_CALLS.clear()
    first = decomposition.decompose_model(llama, calib, batch_size=BATCH, cache=cache)
    paths = [t.path for t in budgets.targets(llama)]
    assert sorted(decomposition.EIGH_CALLS) == sorted(f"{p}:{v}" for p in paths for v in ("centred", "uncentred"))
    assert len(decomposition.EIGH_CALLS) == 2 * 7 * 4
    assert sorted(f.name for f in cache.iterdir()) == [f"layer_{i:02d}.safetensors" for i in range(4)]

    def same(a: Decomposition, b: Decomposition) -> None:
        assert (a.target, a.m, a.n, a.has_bias, a.keep) == (b.target, b.m, b.n, b.has_bias, b.keep)
        assert torch.equal(a.mean, b.mean)
        for v in decomposition.VARIANTS:
            assert all(torch.equal(s, t) for s, t in zip(a.spectra[v], b.spectra[v], strict=True))
        assert all(torch.equal(s, t) for s, t in zip(a.svd, b.svd, strict=True))

    decomposition.EIGH_CALLS.clear()
    again = decomposition.decompose_model(llama, calib, batch_size=BATCH, cache=cache)
    assert decomposition.EIGH_CALLS == []
    assert list(again) == list(first)
    for p in paths:
        same(first[p], again[p])

    (cache / "layer_02.safetensors").unlink()
    decomposition.EIGH_CALLS.clear()
    resumed = decomposition.decompose_model(llama, calib, batch_size=BATCH, cache=cache)
    assert len(decomposition.EIGH_CALLS) == 2 * 7
    assert all(name.startswith("model.layers.2.") for name in decomposition.EIGH_CALLS)
    assert (cache / "layer_02.safetensors").exists()
    for p in paths:
        same(first[p], resumed[p])

    # a layer subset only decomposes (and returns) that layer
    decomposition.EIGH_CALLS.clear()
    sub = decomposition.decompose_model(llama, calib, layers=[1], batch_size=BATCH)
    assert list(sub) == [p for p in paths if ".layers.1." in p] and len(decomposition.EIGH_CALLS) == 14
    torch.testing.assert_close(sub["model.layers.1.mlp.down_proj"].spectra["centred"][0],
                               first["model.layers.1.mlp.down_proj"].spectra["centred"][0])


def test_decompositions_live_on_the_host_in_the_precision_factors_need(calib, tmp_path) -> None:
    """A 16-bit model's uncentred eigenvectors and singular vectors are stored as float16 (the centred
    eigenvectors, which mean compensation needs exactly, values and means stay float32): half their bytes, on
    the host and in the cache, and the factors agree with the float32 decomposition's to 16-bit round-off.
    Only the narrow side's singular vectors are kept."""
    dense = models.load_model("tiny-llama")[0]
    half = models.load_model("tiny-llama", dtype=torch.bfloat16)[0]
    full = decomposition.decompose_model(dense, calib, layers=[1], batch_size=BATCH)
    small = decomposition.decompose_model(half, calib, layers=[1], batch_size=BATCH, cache=tmp_path)
    for p, d in small.items():
        assert d.spectra["uncentred"][1].dtype == d.svd[0].dtype == torch.float16
        assert d.mean.dtype == d.spectra["centred"][1].dtype == d.spectra["centred"][0].dtype == d.svd[1].dtype \
            == torch.float32
        assert all(t.device.type == "cpu" for t in (d.mean, *d.svd))
        assert d.svd[0].shape[0] == min(d.m, d.n)
        assert full[p].spectra["centred"][1].dtype == torch.float32
    assert decomposition.vector_dtype(torch.float32) == torch.float32
    assert decomposition.vector_dtype(torch.float16) == decomposition.vector_dtype(torch.bfloat16) == torch.float16
    vectors = sum(d.spectra["uncentred"][1].numel() + d.svd[0].numel() for d in full.values())
    assert decomposition.stored_bytes(full) - decomposition.stored_bytes(small) == 2 * vectors
    assert abs((tmp_path / "layer_01.safetensors").stat().st_size - decomposition.stored_bytes(small)) < 8192
    path = "model.layers.1.mlp.up_proj"  # m > n: V is stored
    module = half.get_submodule(path)
    for method in ("weight_svd", "feature"):
        got = _apply(small[path].factors(module, method, 8), torch.eye(module.in_features, dtype=torch.float64))
        want = _apply(full[path].factors(dense.get_submodule(path), method, 8),
                      torch.eye(module.in_features, dtype=torch.float64))
        assert _rel(got, want) < 2e-2  # bf16 weights and fp16 vectors against float32 ones


# --------------------------------------------------------------------- 6. factorised modules


def _expected_count(dense: int, decomps, ranks: dict[str, int], method: str) -> int:
    count = dense
    for p, r in ranks.items():
        d = decomps[p]
        gets_bias = method == "feature" or d.has_bias
        count += r * d.n + d.m * r + (d.m if gets_bias else 0) - d.m * d.n - (d.m if d.has_bias else 0)
    return count


@pytest.mark.parametrize("which", ["llama", "gpt2"])
@pytest.mark.parametrize("method", decomposition.METHODS)
def test_decomposed_param_counts_and_restore(which, method, calib) -> None:
    model = models.load_model("tiny-llama")[0] if which == "llama" else _gpt2_with_biases()
    decomps = decomposition.decompose_model(model, calib, layers=[1, 3], batch_size=BATCH)
    ids = _ids(3, 10, seed=9)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    dense = budgets.param_count(model)
    originals = {p: model.get_submodule(p) for p in decomps}
    ranks = lowrank.uniform_ranks(decomps, 80, [1, 3])
    ranks[next(iter(ranks))] = 1  # a mix of ranks
    with lowrank.decomposed(model, decomps, method, ranks) as m:
        assert m is model
        for p, r in ranks.items():
            module = model.get_submodule(p)
            assert isinstance(module, LowRankLinear) and module.rank == r
            d = decomps[p]
            assert (module.first.in_features, module.second.out_features) == (d.n, d.m)
            assert (module.second.bias is not None) == (method == "feature" or d.has_bias)
        count = budgets.param_count(model)
        assert count == _expected_count(dense, decomps, ranks, method)
        share = lowrank.model_share(model, decomps, ranks, method)
        assert round(share * dense) == count and share * dense == pytest.approx(count, abs=1e-6)
        assert share < 1.0
        assert lowrank.dense_param_count(model, decomps) == dense
        with torch.no_grad():
            inside = model(input_ids=ids).logits
        assert (inside - before).abs().max() > 1e-4
    for p, module in originals.items():
        assert model.get_submodule(p) is module
    assert budgets.param_count(model) == dense
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    if which == "llama" and method == "weight_svd":  # bias-free + weight_svd adds no bias at all
        assert count == dense - sum(decomps[p].m * decomps[p].n - r * (decomps[p].m + decomps[p].n)
                                    for p, r in ranks.items())


def test_decomposed_restores_on_error_and_refuses_bad_ranks(llama_kappa, calib) -> None:
    model = models.load_model("tiny-llama")[0]
    decomps = llama_kappa
    ids = _ids(2, 8, seed=10)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    originals = {p: model.get_submodule(p) for p in decomps}
    ranks = lowrank.uniform_ranks(decomps, 50, [0, 1, 2, 3])
    with pytest.raises(RuntimeError, match="boom"), lowrank.decomposed(model, decomps, "feature", ranks):
        assert isinstance(model.get_submodule("model.layers.0.self_attn.q_proj"), LowRankLinear)
        raise RuntimeError("boom")
    assert all(model.get_submodule(p) is m for p, m in originals.items())

    q = "model.layers.2.self_attn.q_proj"
    k = decomps[q].kappa
    with lowrank.decomposed(model, decomps, "feature", {q: k}):  # kappa itself is allowed
        assert model.get_submodule(q).rank == k
    for bad in (k + 1, 0):
        # the first module is already swapped when the second fails: both must come back
        with pytest.raises(ValueError, match="kappa"), \
                lowrank.decomposed(model, decomps, "feature", {"model.layers.0.mlp.up_proj": 3, q: bad}):
            pass
        assert all(model.get_submodule(p) is m for p, m in originals.items())
    with pytest.raises(ValueError, match="unknown method"), lowrank.decomposed(model, decomps, "pca", {q: 2}):
        pass
    with pytest.raises(KeyError), lowrank.decomposed(model, decomps, "feature", {"model.layers.0.nope": 2}):
        pass
    assert all(model.get_submodule(p) is m for p, m in originals.items())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    assert budgets.param_count(model) == lowrank.dense_param_count(model, decomps)


def test_factors_refuse_bad_ranks_and_methods(llama, llama_kappa, llama_full) -> None:
    for p in ("model.layers.0.self_attn.k_proj", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj"):
        module = llama.get_submodule(p)
        d_full = llama_full[0][p]
        for method in decomposition.METHODS:
            top = min(d_full.m, d_full.n) if method == "weight_svd" else d_full.m
            d_full.factors(module, method, min(top, d_full.kappa))  # accepted
            with pytest.raises(ValueError, match="outside"):
                d_full.factors(module, method, top + 1)
            with pytest.raises(ValueError, match="outside"):
                d_full.factors(module, method, 0)
        d = llama_kappa[p]  # keep = kappa eigenvectors stored: more cannot be cut
        with pytest.raises(ValueError, match="keep"):
            d.factors(module, "feature", d.kappa + 1)
        with pytest.raises(ValueError, match="unknown method"):
            d.factors(module, "svd", 2)


def test_low_rank_linear_at_full_rank_is_the_module(llama, gpt2, llama_full, gpt2_full) -> None:
    """A LowRankLinear built from full-rank factors computes the dense module (bias, order, Conv1D)."""
    for model, (decomps, caps), p in ((llama, llama_full, "model.layers.1.mlp.down_proj"),
                                      (gpt2, gpt2_full, "transformer.h.1.attn.c_attn")):
        d, module = decomps[p], model.get_submodule(p)
        x = caps[p][:40].float()
        for method in ("feature", "weight_svd"):
            w1, w2, b = d.factors(module, method, d.full_rank(method))
            lr = LowRankLinear(w1, w2, b, torch.float32)
            assert lr.rank == len(w1) and lr.first.weight.dtype == torch.float32
            with torch.no_grad():
                torch.testing.assert_close(lr(x), module(x), rtol=1e-4, atol=1e-4)


def test_decomposed_scored_from_cached_inputs(llama_kappa, calib) -> None:
    """What the search relies on: with layer 2 factorised, scoring from layer 2's cached (dense) inputs
    equals the full forward of the decomposed model, while starting at layer 3 misses the change."""
    model = models.load_model("tiny-llama")[0]
    ids = _ids(6, 16, seed=11)
    inputs = LayerInputs(model, ids, batch_size=4)
    ranks = lowrank.uniform_ranks(llama_kappa, 50, [2])
    assert set(ranks) == {t.path for t in budgets.targets(model, [2])}
    with lowrank.decomposed(model, llama_kappa, "feature", ranks):
        truth = evaluation.perplexity(model, ids)
        assert inputs.perplexity(2) == pytest.approx(truth, rel=1e-5)
        assert inputs.perplexity(0) == pytest.approx(truth, rel=1e-5)
        assert inputs.perplexity(3) != pytest.approx(truth, rel=1e-4)


def test_uniform_ranks_cover_only_the_layers(llama_kappa) -> None:
    ranks = lowrank.uniform_ranks(llama_kappa, 80, [1, 3])
    assert list(ranks) == [p for p in llama_kappa if ".layers.1." in p or ".layers.3." in p]
    # 80% of kappa: q/o 32 -> 25, k/v 21 -> 16, gate/up/down 48 -> 38
    assert [ranks[f"model.layers.3.{n}"] for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                     "mlp.down_proj")] == [25, 16, 16, 25, 38, 38, 38]
    with pytest.raises(ValueError, match="non-empty and decomposed"):  # no layers would be the dense model
        lowrank.uniform_ranks(llama_kappa, 80, [])
    assert set(lowrank.uniform_ranks(llama_kappa, 100, range(4)).values()) == {32, 21, 48}
    with pytest.raises(ValueError, match="fraction"):
        lowrank.uniform_ranks(llama_kappa, 0, [1])


# -------------------------------------------------------------------------------- 7. bad input


def test_bad_calibration_shapes(llama) -> None:
    with pytest.raises(ValueError, match="calibration"):
        decomposition.decompose_model(llama, _ids(4, 1, 0))
    with pytest.raises(ValueError, match="calibration"):
        decomposition.decompose_model(llama, torch.arange(3, 40))


def test_nan_activations_raise(calib) -> None:
    model = models.load_model("tiny-llama")[0]
    decomposition.decompose_model(model, calib[:4], layers=[1], batch_size=BATCH)  # control: finite, fine
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[3, 5] = float("nan")
    with pytest.raises(FloatingPointError):
        decomposition.decompose_model(model, calib[:4], layers=[1], batch_size=BATCH)
    # the NaN reaches layer 0's own down_proj output (its m <= n statistics) too
    with pytest.raises(FloatingPointError):
        decomposition.decompose_model(model, calib[:4], layers=[0], batch_size=BATCH)
    gen = torch.Generator().manual_seed(14)
    for bad in (float("nan"), float("inf")):
        ok = Moments(3)
        ok.add(torch.randn(4, 3, generator=gen))
        ok.root("centred")  # control: finite statistics are fine
        mo = Moments(3)
        mo.add(torch.randn(4, 3, generator=gen))
        x = torch.ones(2, 3)
        x[1, 2] = bad
        with pytest.raises(FloatingPointError):  # at ``add`` or, at the latest, when the statistics are used
            mo.add(x)
            mo.root("centred")
    with pytest.raises(FloatingPointError):
        decomposition.psd_root(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))


# ------------------------------------------------------------------------------- 8. spectra


def test_energy_at() -> None:
    assert decomposition.energy_at(torch.tensor([10.0, 0.0, 0.0, 0.0])) == 1.0
    assert decomposition.energy_at(torch.ones(8)) == pytest.approx(0.25)  # top ceil(0.25 * 8) = 2 of 8
    assert decomposition.energy_at(torch.tensor([1.0, 4.0, 2.0, 3.0]), share=0.5) == pytest.approx(0.7)  # sorted first
    assert decomposition.energy_at(torch.ones(4), share=0.25, full=8) == pytest.approx(0.5)  # ceil(2) of 4 values
    assert decomposition.energy_at(torch.ones(3), share=0.01) == pytest.approx(1 / 3)  # at least one value
    assert math.isnan(decomposition.energy_at(torch.zeros(5)))


def test_spectra_frame_finds_planted_low_rank_features(llama) -> None:
    """Calibration of two token ids only: layer 0's q/k/v input (the normed embedding) takes two values, so
    their output covariance has rank 1 (feature energy 1) while the random weights spread their energy;
    with random calibration the same modules are not low rank."""
    two = torch.where(torch.rand(6, 16, generator=torch.Generator().manual_seed(12)) < 0.5, 40, 41)
    planted = decomposition.spectra_frame(decomposition.decompose_model(llama, two, layers=[0]))
    control = decomposition.spectra_frame(decomposition.decompose_model(llama, _ids(6, 16, 13), layers=[0]))
    assert list(planted.columns) == ["layer", "kind", "feature", "weight"]
    assert list(planted["kind"]) == LLAMA_KINDS and set(planted["layer"]) == {0}
    for frame, low in ((planted, True), (control, False)):
        for kind in ("q", "k", "v"):
            row = frame[frame["kind"] == kind].iloc[0]
            assert row["weight"] < 0.8
            assert (row["feature"] > 1 - 1e-6) == low, (kind, row["feature"])
    # the weight column is the weight spectrum's energy at 25% of min(m, n), computed here
    w = llama.model.layers[0].mlp.gate_proj.weight.detach().double()
    s2 = torch.linalg.svdvals(w) ** 2
    assert planted[planted["kind"] == "gate"].iloc[0]["weight"] == pytest.approx(float(s2[:16].sum() / s2.sum()),
                                                                                 rel=1e-5)


def test_spectra_frame_synthetic_decomposition() -> None:
    t = Target(5, "mlp.up_proj", "model.layers.5.mlp.up_proj")
    m, n = 8, 4
    feat = torch.tensor([9.0, 1.0, 0.0, 0.0])  # top ceil(0.25 * 4) = 1 of 10
    d = Decomposition(t, m, n, False, torch.zeros(m),
                      {"centred": (feat, torch.eye(m)[:, :2]), "uncentred": (feat, torch.eye(m)[:, :2])},
                      (torch.eye(n)[:, :2], torch.tensor([2.0, 1.0, 1.0, 1.0])), 2)
    frame = decomposition.spectra_frame({t.path: d})
    row = frame.iloc[0]
    assert (row["layer"], row["kind"]) == (5, "up")
    assert row["feature"] == pytest.approx(0.9)
    assert row["weight"] == pytest.approx(4 / 7)
