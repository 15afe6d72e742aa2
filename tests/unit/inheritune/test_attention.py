"""The record functions of ``common.inheritune.attention`` (notebook 04 Part 1) on planted statistics.

``common.inheritune.attention``: k*, m* and the other head metrics on hand-built patterns with hand-derived values;
the batched path equals the per-head SVD reference; aggregation; capture on real models restores them."""

from __future__ import annotations

import math

import pytest
import torch

from common.core import arch, manifest
from common.core.profiles import GPTConfig
from common.inheritune import attention, paper
from common.inheritune.attention import AttentionStats, capture_attention, head_metrics, head_metrics_loop
from common.inheritune.gpt import GPT


def _planted_stats(n_layers: int = 3, seed: int = 0) -> AttentionStats:
    """Causal row-stochastic matrices [N=2, L, H=2, T=6] turned into real statistics."""
    g = torch.Generator().manual_seed(seed)
    t = 6
    scores = torch.randn(2, n_layers, 2, t, t, generator=g, dtype=torch.float64)
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    attn = scores.softmax(-1)
    return AttentionStats(attention.head_metrics(attn), attn.mean(0), 0.9, 0.9, t)


def _planted_rank(ranks: list[float]) -> AttentionStats:
    stats = _planted_stats(len(ranks))
    stats.metrics["rank"] = torch.tensor(ranks, dtype=torch.float64).view(1, -1, 1).expand(2, -1, 2).clone()
    return stats


def test_example_layers_picks_the_early_peak_and_the_lowest_layer() -> None:
    """The highest MaxRank in the first third and the overall lowest, as plain ints."""
    stats = _planted_rank([3.0, 9.0, 4.0, 7.0, 1.0, 5.0])
    assert attention.example_layers(stats) == [1, 4]
    assert attention.example_layers(_planted_rank([2.0])) == [0, 0]


def test_record_pretrained_records_the_massive_layer_and_the_papers_curves(records) -> None:
    """The massive layer first, then record_stats' keys with the paper's curve beside a paper model's key."""
    stats = _planted_stats(24)
    attention.record_pretrained("gpt2-medium", stats, 2, attention.SINK_SHARE)
    rec = records()
    keys = list(rec)
    assert keys[0] == "gpt2-medium/massive_layer" and rec[keys[0]]["value"] == 2
    assert rec["gpt2-medium/attn/maxrank"]["value"] == pytest.approx(stats.max_rank().tolist())
    assert rec["gpt2-medium/attn/maxrank"]["paper_value"] == paper.MAXRANK["gpt2-medium"]
    assert rec["gpt2-medium/attn/avgmass"]["paper_value"] == paper.AVGMASS["gpt2-medium"]
    assert "gpt2-medium/attn/sink_minus_massive_layer" in rec


def test_record_pretrained_without_a_massive_layer(records) -> None:
    """No massive layer: recorded as null, and no sink-vs-massive keys."""
    attention.record_pretrained("tiny-gpt2", _planted_stats(), None)
    rec = records()
    assert rec["tiny-gpt2/massive_layer"]["value"] is None
    assert rec["tiny-gpt2/attn/maxrank"]["paper_value"] is None
    assert "tiny-gpt2/attn/sink_minus_massive_layer" not in rec


def test_record_tau_sweep_one_key_per_tau(records) -> None:
    """``<key>/attn/maxrank_tau/<tau>`` = ``rank_at(tau)`` for each tau, with Fig. 10 as reference."""
    stats = _planted_stats()
    attention.record_tau_sweep("m", stats, (0.8, 0.95))
    rec = records()
    assert list(rec) == ["m/attn/maxrank_tau/0.8", "m/attn/maxrank_tau/0.95"]
    assert rec["m/attn/maxrank_tau/0.95"]["value"] == pytest.approx(stats.rank_at(0.95).tolist())
    assert rec["m/attn/maxrank_tau/0.8"]["paper_ref"] == "Inheritune v4 Fig. 10"


T = 100
F64 = torch.float64
count_to_share = attention.count_to_share


# ----------------------------------------------------------------------------------------------- patterns


def _sink(t: int = T) -> torch.Tensor:
    """Every row on column 0."""
    a = torch.zeros(t, t, dtype=F64)
    a[:, 0] = 1
    return a


def _uniform(t: int = T) -> torch.Tensor:
    """Uniform causal attention, A_ij = 1 / (i + 1) for j <= i."""
    return torch.ones(t, t, dtype=F64).tril() / torch.arange(1, t + 1, dtype=F64)[:, None]


def _identity(t: int = T) -> torch.Tensor:
    return torch.eye(t, dtype=F64)


def _previous(t: int = T) -> torch.Tensor:
    """Row 0 on column 0, row i on column i - 1."""
    a = torch.zeros(t, t, dtype=F64)
    a[0, 0] = 1
    a[torch.arange(1, t), torch.arange(t - 1)] = 1
    return a


def _column(c: int, t: int = T) -> torch.Tensor:
    """Rows >= c on column c, earlier rows on themselves: a sink at key position c."""
    a = torch.zeros(t, t, dtype=F64)
    a[torch.arange(t), torch.arange(t).clamp_max(c)] = 1
    return a


def _late(n: int, t: int = T) -> torch.Tensor:
    """Rows < n uniform causal (thin, spread out), rows >= n on themselves: most of the squared mass sits on
    the last t - n columns, one unit each."""
    a = _identity(t)
    a[:n, :n] = _uniform(n)
    return a


def _random_causal(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> torch.Tensor:
    """Causal softmax of seeded Gaussian logits, [..., t, t]."""
    t = shape[-1]
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g, dtype=F64) * scale
    return logits.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)


# Hand derivations (T = 100, tau = eta = 0.9; energies and column norms in units of the total):
# sink: rank 1, one nonzero column -> (1, 1). identity: sigma_i = 1 and column norms 1, 90 of 100 -> (90, 90).
# previous-token: orthogonal columns of squared norm 2, 1 x 98, 0; total 100: 2 + (k - 1) >= 90 -> (89, 89).
# uniform causal: sigma^2 shares 0.51, ... cross 0.9 at the 5th value; column norms sum_{i>=j} 1/(i+1)^2,
# decreasing, cross 0.9 at the 30th column (research notes) -> (5, 30).
# 0.5 sink + 0.5 uniform: sigma_1 alone holds 0.98 and column 0 alone 0.97 -> (1, 1).
# 0.5 sink + 0.5 identity: column 0 holds 1 + 99/4 = 25.75, the others 1/4 each, total 50.5;
# 25.75 + (m - 1) / 4 >= 45.45 -> m = 80; k* = 79 (research notes).
REFERENCE = [
    ("sink", _sink, 1, 1),
    ("uniform_causal", _uniform, 5, 30),
    ("identity", _identity, 90, 90),
    ("previous_token", _previous, 89, 89),
    ("half_sink_half_uniform", lambda: 0.5 * _sink() + 0.5 * _uniform(), 1, 1),
    ("half_sink_half_identity", lambda: 0.5 * _sink() + 0.5 * _identity(), 79, 80),
]


# ------------------------------------------------------------------------------------------ head_metrics


@pytest.mark.parametrize(("name", "build", "rank", "mass"), REFERENCE, ids=[r[0] for r in REFERENCE])
def test_reference_patterns(name, build, rank, mass) -> None:
    """k*(0.9) and m*(0.9) of the six reference patterns are the hand-derived integers, batched and looped."""
    a = build()
    m = head_metrics(a)
    assert (int(m["rank"]), int(m["mass"])) == (rank, mass), name
    loop = head_metrics_loop(a[None])
    assert (int(loop["rank"][0]), int(loop["mass"][0])) == (rank, mass), name


@pytest.mark.parametrize("t", [10, 37, 64, 100])
def test_identity_rank_is_ceil_tau_t(t: int) -> None:
    """All sigma^2 and column norms of the identity are equal, so k* = m* = ceil(tau T) at any T and tau
    (T = 10 and 100 sit exactly on the level: 9 x 0.1 sums to 0.8999999999999999 in floats)."""
    m = head_metrics(_identity(t))
    assert int(m["rank"]) == int(m["mass"]) == math.ceil(0.9 * t)
    assert int(head_metrics(_identity(t), tau=0.5)["rank"]) == math.ceil(0.5 * t)
    assert int(head_metrics(_identity(t), tau=1.0)["rank"]) == t


def test_previous_token_spectrum() -> None:
    """The stored normalised spectrum of the previous-token pattern is (2, 1 x 98, 0) / 100 (orthogonal
    columns), descending and summing to 1."""
    energy = head_metrics(_previous())["energy"]
    expected = torch.full((T,), 0.01, dtype=F64)
    expected[0], expected[-1] = 0.02, 0.0
    torch.testing.assert_close(energy, expected, rtol=0, atol=1e-12)


def test_shares_sink_vs_identity() -> None:
    """Rank one (sink) vs flat spectrum (identity): sigma1_share ~1 vs exactly 1/T, erank ~1 vs ~T,
    maxcol_share 1 vs 1/T, pos0_share 1 vs 1/T; the sink sits at key 0."""
    s, i = head_metrics(_sink()), head_metrics(_identity())
    assert float(s["sigma1_share"]) == pytest.approx(1.0, abs=1e-12)
    assert float(i["sigma1_share"]) == 1 / T
    assert float(s["erank"]) == pytest.approx(1.0, abs=1e-5)  # Gram eigenvalue noise ~1e-14 -> sigma ~1e-7
    assert float(i["erank"]) == pytest.approx(T, rel=1e-12)
    assert float(s["maxcol_share"]) == 1.0 and float(i["maxcol_share"]) == 1 / T
    assert float(s["pos0_share"]) == 1.0 and float(i["pos0_share"]) == 1 / T
    assert int(s["sink"]) == 0
    assert s["rank"].dtype == s["sink"].dtype == torch.int64 and s["erank"].dtype == F64


def test_sink_off_position_zero() -> None:
    """Mass planted on column 7 (rows >= 7 there, earlier rows on themselves): sink 7, maxcol_share 93/100,
    pos0_share only row 0's 1/100; column 7 holds 93 of 100 of both energies -> k* = m* = 1, while index order
    first passes the 7 unit columns -> mass_index 8. Without the plant (identity) the sink is not at 7."""
    m = head_metrics(_column(7))
    assert int(m["sink"]) == 7
    assert float(m["maxcol_share"]) == pytest.approx(0.93, abs=1e-15)
    assert float(m["pos0_share"]) == pytest.approx(0.01, abs=1e-15)
    assert (int(m["rank"]), int(m["mass"]), int(m["mass_index"])) == (1, 1, 8)
    assert int(head_metrics(_identity())["sink"]) != 7


def test_mass_sorted_vs_index_order() -> None:
    """Rows < 50 uniform causal, rows >= 50 on themselves: squared column norms are 1.625, 0.625, 0.375, ...
    (first 50, summing to H_50 = 4.50) and 1 for each of the last 50; total 54.50, 0.9 of it 49.05.
    Sorted: 1.625 + 0.625 + 47 ones = 49.25 -> m* = 49; index order: 4.50 + 45 ones -> 95.
    On the sink (and uniform causal, whose column norms already decrease) both orders agree."""
    late = head_metrics(_late(50))
    assert (int(late["mass"]), int(late["mass_index"])) == (49, 95)
    sink = head_metrics(_sink())
    assert int(sink["mass"]) == int(sink["mass_index"]) == 1
    uniform = head_metrics(_uniform())
    assert int(uniform["mass"]) == int(uniform["mass_index"]) == 30


def test_invariant_to_positive_scaling() -> None:
    """k* and m* are ratios of energies, so scaling A by any c > 0 leaves them unchanged (random stack and
    the reference patterns); the shares too."""
    stack = torch.cat([_random_causal((6, 40, 40), seed=1),
                       torch.stack([_sink(40), _uniform(40), _identity(40), _previous(40), _late(20, 40)])])
    base = head_metrics(stack)
    for c in (1e-3, 3.7, 250.0):
        scaled = head_metrics(c * stack)
        for name in ("rank", "mass", "mass_index", "sink"):
            assert torch.equal(scaled[name], base[name]), (c, name)
        torch.testing.assert_close(scaled["sigma1_share"], base["sigma1_share"], rtol=1e-9, atol=1e-12)


def test_head_permutation_commutes() -> None:
    """Permuting the head axis of an [N, L, H, T, T] stack permutes every output the same way (heads are
    computed independently; no reduction runs over a leading axis)."""
    stack = _random_causal((2, 3, 4, 30, 30), seed=2, scale=2.0)
    stack[1, 2, 0] = _sink(30)  # a planted, distinguishable head
    perm = torch.tensor([2, 0, 3, 1])
    base, permuted = head_metrics(stack), head_metrics(stack[:, :, perm])
    for name in attention.METRICS:
        expected = base[name][:, :, perm]
        if expected.dtype == torch.int64:
            assert torch.equal(permuted[name], expected), name
        else:
            torch.testing.assert_close(permuted[name], expected, rtol=1e-12, atol=1e-15)
    assert int(permuted["rank"][1, 2, 1]) == 1  # the sink moved from head 0 to head perm^-1(0) = 1


def test_batched_equals_loop_reference() -> None:
    """Batched Gram-eigvalsh metrics equal the per-head SVD reference on a seeded random causal stack:
    integers exactly, shares to rtol 1e-9. erank only to rtol 1e-6: random lower-triangular softmax matrices
    have sigma_min ~1e-18 here, below the Gram route's floor sqrt(eps) sigma_1, and those sigmas enter erank
    (not the energy sums) at the 1e-8 level."""
    stack = _random_causal((3, 2, 4, 50, 50), seed=0)
    batched, loop = head_metrics(stack), head_metrics_loop(stack)
    assert set(batched) == set(loop) == set(attention.METRICS)
    for name in attention.METRICS:
        assert batched[name].shape == loop[name].shape, name
        assert batched[name].dtype == loop[name].dtype, name
        if batched[name].dtype == torch.int64:
            assert torch.equal(batched[name], loop[name]), name
        elif name == "erank":
            torch.testing.assert_close(batched[name], loop[name], rtol=1e-6, atol=0)
        else:
            torch.testing.assert_close(batched[name], loop[name], rtol=1e-9, atol=1e-12)
    assert batched["energy"].shape == (3, 2, 4, 50)
    assert len(set(batched["rank"].flatten().tolist())) > 1  # the stack is not degenerate


def test_single_matrix_batched_and_loop() -> None:
    """A single [T, T] matrix (no leading dims) is accepted by both routes ("[..., T, T]"), giving 0-d
    integer metrics and a [T] spectrum: identity at T = 10 -> k* = 9."""
    a = _identity(10)
    m = head_metrics(a)
    assert m["rank"].shape == () and m["energy"].shape == (10,) and int(m["rank"]) == 9
    loop = head_metrics_loop(a)
    assert loop["rank"].shape == () and loop["energy"].shape == (10,) and int(loop["rank"]) == 9


def test_float32_input_same_integers() -> None:
    """float32 probabilities (what models return) are analysed in float64: same integers as the float64
    input of the same values, float64 outputs; energy_rank is the same k* (previous-token: 89)."""
    stack = _random_causal((4, 32, 32), seed=3).float()
    m32, m64 = head_metrics(stack), head_metrics(stack.double())
    assert torch.equal(m32["rank"], m64["rank"]) and torch.equal(m32["mass"], m64["mass"])
    assert m32["erank"].dtype == F64
    assert int(attention.energy_rank(_previous())) == 89


# ------------------------------------------------------------------------------- count_to_share / inputs


def test_count_to_share_basics() -> None:
    """Fewest leading entries reaching the share: [5, 3, 1, 1] (total 10) needs 1 for 0.5 (exactly reached),
    2 for 0.8, 3 for 0.81, 4 for 1.0; trailing zeros are never counted; batched along the last axis."""
    v = torch.tensor([5.0, 3.0, 1.0, 1.0], dtype=F64)
    assert [int(count_to_share(v, s)) for s in (0.5, 0.8, 0.81, 0.95, 1.0)] == [1, 2, 3, 4, 4]
    assert int(count_to_share(torch.tensor([5.0, 3.0, 2.0, 0.0, 0.0]), 1.0)) == 3
    batch = torch.stack([v, v.flip(0), torch.full((4,), 2.5, dtype=F64)])
    assert count_to_share(batch, 0.5).tolist() == [1, 3, 2]


@pytest.mark.parametrize("level", [0.0, -0.1, 1.0001, 2.0, float("nan")])
def test_levels_outside_unit_interval_raise(level: float) -> None:
    """tau and eta must lie in (0, 1] everywhere they are accepted."""
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        count_to_share(torch.ones(4), level)
    with pytest.raises(ValueError, match="tau"):
        head_metrics(_identity(5), tau=level)
    with pytest.raises(ValueError, match="eta"):
        head_metrics(_identity(5), eta=level)
    with pytest.raises(ValueError):
        capture_attention(_gpt(), [torch.zeros(1, 4, dtype=torch.long)], tau=level)
    assert int(count_to_share(torch.ones(4), 1.0)) == 4  # the closed end is allowed


@pytest.mark.parametrize("fn", [head_metrics, head_metrics_loop], ids=["batched", "loop"])
def test_bad_matrices_raise(fn) -> None:
    """Non-square or 1-D input raises ValueError, integer input TypeError (probabilities are floats)."""
    with pytest.raises(ValueError, match="T, T"):
        fn(torch.ones(3, 4, dtype=F64))
    with pytest.raises(ValueError, match="T, T"):
        fn(torch.ones(5, dtype=F64))
    with pytest.raises(TypeError, match="floating point"):
        fn(torch.eye(4, dtype=torch.long))
    assert int(fn(torch.eye(4, dtype=F64)[None])["rank"][0]) == 4


# ---------------------------------------------------------------------------------------- AttentionStats


def _stats(stack: torch.Tensor) -> AttentionStats:
    """AttentionStats of a hand-made [N, L, H, T, T] stack, built as capture_attention builds it."""
    return AttentionStats(head_metrics(stack), stack.mean(0), 0.9, 0.9, stack.shape[-1])


def _two_sequence_stack() -> torch.Tensor:
    """[N=2, L=2, H=2, T, T]. Layer 0: the column-7 sink in every head and sequence. Layer 1, head 0:
    previous-token in both sequences; head 1: sink (seq 0), identity (seq 1), the head where the mean of k*
    and k* of the mean differ."""
    s = torch.zeros(2, 2, 2, T, T, dtype=F64)
    s[:, 0] = _column(7)
    s[:, 1, 0] = _previous()
    s[0, 1, 1], s[1, 1, 1] = _sink(), _identity()
    return s


def test_stats_aggregation() -> None:
    """Rank(h, l) is the mean over sequences of the per-sequence k* (eq. 3): layer 1 head 0 (89 + 89) / 2,
    head 1 (1 + 90) / 2; MaxRank the max over heads, AvgMass the mean over heads of the mean m*; the column-7
    layer is lazy, its heads collapsed, its sink at 7; maxcol_share layer 1 = (0.02 + (1 + 0.01) / 2) / 2."""
    stats = _stats(_two_sequence_stack())
    assert stats.n_sequences == 2 and stats.seq_len == T
    assert stats.per_head("rank").tolist() == [[1.0, 1.0], [89.0, 45.5]]
    assert stats.per_head("mass").tolist() == [[1.0, 1.0], [89.0, 45.5]]
    assert stats.max_rank().tolist() == [1.0, 89.0]
    assert stats.avg_mass().tolist() == [1.0, 67.25]
    assert stats.per_layer("rank", "mean").tolist() == [1.0, 67.25]
    assert stats.per_layer("mass", "max").tolist() == [1.0, 89.0]
    assert stats.lazy_layers() == [0]
    assert stats.collapsed_heads().tolist() == [[True, True], [False, False]]
    assert stats.sink_position().tolist() == [7, 0]  # identity ties resolve to the first column (torch.max)
    torch.testing.assert_close(stats.per_layer("maxcol_share"), torch.tensor([0.93, 0.2625], dtype=F64))


def test_demo_rank_is_k_of_the_mean_matrix() -> None:
    """demo_rank is k* of the batch-mean matrix, not the mean of k*: for the head with a sink sequence and an
    identity sequence the mean matrix is 0.5 sink + 0.5 identity -> 79, while Rank(h, l) = 45.5; heads whose
    sequences agree (column-7 sink, previous-token) keep their k*."""
    stats = _stats(_two_sequence_stack())
    assert stats.demo_rank().tolist() == [[1, 1], [89, 79]]
    assert stats.per_head("rank")[1, 1] == 45.5


def test_rank_at_rereads_the_spectra() -> None:
    """rank_at(0.9) equals max_rank(); at tau 0.8 by hand: identity ceil(80) = 80, previous-token
    (k + 1) / 100 >= 0.8 -> 79, sink 1 -> layer 1 heads 79 and 40.5, max 79; never above the 0.9 curve."""
    stats = _stats(_two_sequence_stack())
    assert torch.equal(stats.rank_at(0.9), stats.max_rank())
    assert stats.rank_at(0.8).tolist() == [1.0, 79.0]
    assert (stats.rank_at(0.8) <= stats.max_rank()).all()
    with pytest.raises(ValueError):
        stats.rank_at(0.0)


def test_spread_and_bad_arguments() -> None:
    """spread is the std over sequences of the per-sequence layer aggregate: layer 1 per-sequence mean k*
    (89 + 1) / 2 and (89 + 90) / 2 -> |45 - 89.5| / sqrt(2); layer 0 is constant. Unknown metrics and head
    aggregations are rejected."""
    stats = _stats(_two_sequence_stack())
    torch.testing.assert_close(stats.spread("rank"), torch.tensor([0.0, 44.5 / math.sqrt(2)], dtype=F64))
    with pytest.raises(ValueError, match="unknown metric"):
        stats.per_head("sink")
    with pytest.raises(ValueError, match="heads="):
        stats.per_layer("rank", "median")


def test_first_sink_layer() -> None:
    """First layer whose mean pos0_share >= threshold: layers identity (0.01), 0.5 sink + 0.5 identity
    ((1 + 99/2) / 100 = 0.505), sink (1.0) -> layer 1 at 0.5, layer 2 at 0.6, None at 0.5 once the sinks are
    removed (all identity)."""
    s = torch.zeros(1, 3, 2, T, T, dtype=F64)
    s[0, 0], s[0, 1], s[0, 2] = _identity(), 0.5 * (_sink() + _identity()), _sink()
    stats = _stats(s)
    torch.testing.assert_close(stats.per_layer("pos0_share"), torch.tensor([0.01, 0.505, 1.0], dtype=F64))
    assert attention.first_sink_layer(stats, 0.5) == 1
    assert attention.first_sink_layer(stats, 0.6) == 2
    assert attention.first_sink_layer(_stats(_identity().expand(1, 3, 2, T, T).clone())) is None


# ------------------------------------------------------------------------------------ capture on models


def _gpt(seed: int = 0, block_size: int = 32) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=block_size)).eval()


def _ids(seed: int, b: int, t: int) -> torch.Tensor:
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))


def _n_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _manual_probs(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """[N, L, H, T, T] causal softmax probabilities recomputed in float64 from each layer's ln_1 output and
    its c_attn weights, with the 1 / sqrt(head_dim) / (layer + 1) logit scale (no common.inheritune.attention code)."""
    cfg = model.config
    inputs: dict[int, torch.Tensor] = {}
    handles = [block.ln_1.register_forward_hook(lambda _m, _a, out, i=i: inputs.__setitem__(i, out.detach()))
               for i, block in enumerate(model.transformer.h)]
    try:
        with torch.no_grad():
            model.transformer(ids)
    finally:
        for h in handles:
            h.remove()
    b, t = ids.shape
    d, nh = cfg.n_embd, cfg.n_head
    mask = torch.ones(t, t, dtype=torch.bool).triu(1)
    out = []
    for i, block in enumerate(model.transformer.h):
        w = block.attn.c_attn.weight.detach().double()
        x = inputs[i].double()
        q, k = (x @ w[j * d:(j + 1) * d].T for j in (0, 1))
        q, k = (z.view(b, t, nh, d // nh).transpose(1, 2) for z in (q, k))
        logits = q @ k.mT / math.sqrt(d // nh) / (i + 1)
        out.append(logits.masked_fill(mask, float("-inf")).softmax(-1))
    return torch.stack(out, dim=1)


def test_capture_matches_manual_softmax() -> None:
    """capture_attention's metrics on a random GPT (q/k weights scaled up so heads differ) equal head_metrics
    of probabilities recomputed by hand; mean_matrix is their mean over sequences; example_maps returns the
    first sequence's maps."""
    model = _gpt(seed=3)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight[:32] *= 40
    ids = _ids(2, 3, 24)
    stats = capture_attention(model, [ids])
    probs = _manual_probs(model, ids)
    ref = head_metrics(probs)
    assert stats.metrics["rank"].shape == (3, 2, 2) and stats.seq_len == 24 and stats.n_sequences == 3
    for name in attention.METRICS:
        if ref[name].dtype == torch.int64:
            assert torch.equal(stats.metrics[name], ref[name]), name
        else:
            torch.testing.assert_close(stats.metrics[name], ref[name], rtol=1e-4, atol=1e-6)
    assert len(set(ref["rank"].flatten().tolist())) > 1  # heads differ: a head mix-up would show
    torch.testing.assert_close(stats.mean_matrix, probs.mean(0), rtol=0, atol=1e-5)
    maps = attention.example_maps(model, ids, [0, 1])
    assert sorted(maps) == [0, 1]
    for i in (0, 1):
        torch.testing.assert_close(maps[i], probs[0, i].float(), rtol=0, atol=1e-5)


def test_capture_finds_planted_sink_in_gpt() -> None:
    """A sink planted in layer 0 of a GPT (T = 100): token embeddings zeroed, position 0 embeds to u0 =
    (1 x 8, -1 x 8), the others to u1 = (1, -1) x 8 (orthogonal, mean 0, variance 1, so ln_1 keeps them);
    q = 1 for both, k = 20 * 1 at position 0 and 0 elsewhere -> logit 20 * 8 / sqrt(8) = 57 on key 0. Layer 1
    gets zero query weights -> exactly uniform causal attention. Expected from the reference table: layer 0
    k* = m* = 1, pos0_share ~1 (lazy, collapsed, first sink layer 0); layer 1 k* = 5, m* = 30. The unplanted
    model (near-uniform small logits) has no sink layer."""
    model = _gpt(seed=0, block_size=T)
    ids = _ids(1, 2, T)
    control = capture_attention(model, [ids])
    assert attention.first_sink_layer(control) is None and control.lazy_layers() == []
    assert (control.per_head("rank") > 1).all() and (control.per_head("pos0_share") < 0.5).all()

    d = 16
    u0 = torch.tensor([1.0] * 8 + [-1.0] * 8)
    u1 = torch.tensor([1.0, -1.0] * 8)
    with torch.no_grad():
        model.transformer.wte.weight.zero_()
        model.transformer.wpe.weight[0], model.transformer.wpe.weight[1:] = u0, u1
        w0 = model.transformer.h[0].attn.c_attn.weight
        w0[:d] = torch.outer(torch.ones(d), (u0 + u1) / 16)
        w0[d:2 * d] = 20 * torch.outer(torch.ones(d), u0 / 16)
        model.transformer.h[1].attn.c_attn.weight[:d] = 0
    stats = capture_attention(model, [ids])
    assert stats.metrics["rank"][:, 0].unique().tolist() == [1]
    assert stats.metrics["mass"][:, 0].unique().tolist() == [1]
    assert (stats.metrics["pos0_share"][:, 0] > 1 - 1e-12).all()
    assert stats.metrics["rank"][:, 1].unique().tolist() == [5]
    assert stats.metrics["mass"][:, 1].unique().tolist() == [30]
    assert attention.first_sink_layer(stats) == 0
    assert stats.lazy_layers() == [0]
    assert stats.collapsed_heads().tolist() == [[True, True], [False, False]]
    assert stats.sink_position()[0] == 0
    assert stats.demo_rank().tolist() == [[1, 1], [5, 5]]


def test_capture_accumulates_batches() -> None:
    """Batches stack along N in order and equal separate captures; mean_matrix is the mean over all N."""
    model = _gpt(seed=4)
    b1, b2 = _ids(5, 2, 16), _ids(6, 1, 16)
    both = capture_attention(model, [b1, b2])
    one, two = capture_attention(model, [b1]), capture_attention(model, [b2])
    assert both.n_sequences == 3
    for name in attention.METRICS:
        torch.testing.assert_close(both.metrics[name], torch.cat([one.metrics[name], two.metrics[name]]))
    torch.testing.assert_close(both.mean_matrix, (2 * one.mean_matrix + two.mean_matrix) / 3)


def test_capture_restores_implementation_and_checks_length() -> None:
    """capture_attention switches to eager only for its pass: "sdpa" is back afterwards, also when it raises
    because T exceeds block_size (its own check, before the model's) or no batch came; a model already on
    eager stays on eager. No hook is left behind."""
    model = _gpt()
    hooks = _n_hooks(model)
    capture_attention(model, [_ids(0, 1, 32)])
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="exceeds the model's context of 32"):
        capture_attention(model, [_ids(0, 1, 33)])
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="no batches"):
        capture_attention(model, [])
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        capture_attention(model, [torch.zeros(8, dtype=torch.long)])
    assert model.config._attn_implementation == "sdpa"
    assert _n_hooks(model) == hooks
    model.set_attn_implementation("eager")
    capture_attention(model, [_ids(0, 1, 8)])
    assert model.config._attn_implementation == "eager"


def test_capture_without_probabilities_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model that cannot switch (set_attn_implementation a no-op, so it stays on sdpa and returns None
    probabilities) raises a RuntimeError naming eager attention, and leaves no hook; the unpatched model works."""
    model = _gpt()
    hooks = _n_hooks(model)
    monkeypatch.setattr(GPT, "set_attn_implementation", lambda self, name: None)
    with pytest.raises(RuntimeError, match="eager"):
        capture_attention(model, [_ids(0, 1, 8)])
    assert _n_hooks(model) == hooks and model.config._attn_implementation == "sdpa"
    monkeypatch.undo()
    assert capture_attention(model, [_ids(0, 1, 8)]).metrics["rank"].shape == (1, 2, 2)


def test_capture_on_tiny_llama(tiny_llama) -> None:
    """On the HF tiny Llama (loaded with sdpa): shapes [N, L, H] and [N, L, H, T], every k* in 1..T, mean maps
    row-stochastic, and the implementation is sdpa again afterwards."""
    model, _ = tiny_llama
    assert model.config._attn_implementation == "sdpa"
    ids = _ids(7, 2, 16) + 3
    ids[:, 0] = 1
    stats = capture_attention(model, [ids])
    n_layers, n_heads = len(arch.layers(model)), model.config.num_attention_heads
    assert stats.metrics["rank"].shape == (2, n_layers, n_heads)
    assert stats.metrics["energy"].shape == (2, n_layers, n_heads, 16)
    assert stats.mean_matrix.shape == (n_layers, n_heads, 16, 16)
    assert ((stats.metrics["rank"] >= 1) & (stats.metrics["rank"] <= 16)).all()
    torch.testing.assert_close(stats.mean_matrix.sum(-1), torch.ones(n_layers, n_heads, 16, dtype=F64))
    assert torch.equal(stats.mean_matrix.triu(1), torch.zeros_like(stats.mean_matrix))  # causal
    assert model.config._attn_implementation == "sdpa"


# --------------------------------------------------------------------------------------------- manifest


def test_record_stats_writes_design_keys() -> None:
    """record_stats writes <key>/attn/maxrank, /avgmass, /maxcol_share as per-layer lists (hand values of the
    two-sequence stack: MaxRank [1, 89], AvgMass [1, 67.25], maxcol_share [0.93, 0.2625]) plus diagnostics."""
    from common.reporting import session

    session.setup("04_attention_degeneration_inheritune", "smoke", 0)
    attention.record_stats("tiny", _stats(_two_sequence_stack()), sink_threshold=0.5)
    records = {r["key"]: r for r in manifest.current().records}
    for name in ("maxrank", "avgmass", "maxcol_share"):
        assert len(records[f"tiny/attn/{name}"]["value"]) == 2, name
    assert records["tiny/attn/maxrank"]["value"] == [1.0, 89.0]
    assert records["tiny/attn/avgmass"]["value"] == [1.0, 67.25]
    assert records["tiny/attn/maxcol_share"]["value"] == pytest.approx([0.93, 0.2625], abs=1e-12)
    assert records["tiny/attn/maxrank"]["paper_value"] is None
    assert records["tiny/attn/lazy_layers"]["value"] == [0]
    assert records["tiny/attn/first_sink_layer"]["value"] is None  # pos0 shares 0.01 and 0.2625
    assert records["tiny/attn/demo_maxrank"]["value"] == [1.0, 89.0]


def test_overview_reads_each_model_and_its_massive_layer() -> None:
    """One row per model with the values of the hand-made stack: 2 layers, layer 0 lazy (the column-7 sink),
    half of the heads collapsed, no position-0 sink at 0.3 (position 0 gets 0.01 and 0.26); the identity-only
    model has no lazy layer and no collapsed head; the massive layer column appears only when given."""
    eye = torch.eye(T, dtype=torch.float64).expand(1, 2, 2, T, T)
    frame = attention.overview({"planted": _stats(_two_sequence_stack()), "identity": _stats(eye)},
                               {"planted": 1, "identity": None})
    assert list(frame.index) == ["planted", "identity"]
    assert frame.loc["planted", "layers"] == 2 and frame.loc["planted", "lazy layers"] == [0]
    assert frame.loc["planted", "collapsed heads"] == "50%" and frame.loc["identity", "collapsed heads"] == "0%"
    assert frame.loc["identity", "lazy layers"] == [] and frame.loc["planted", "massive layer"] == 1
    assert frame.loc["planted", "first sink layer"] is None
    assert "massive layer" not in attention.overview({"identity": _stats(eye)}).columns


def test_sink_vs_massive_reads_the_onset_relative_to_the_massive_layer() -> None:
    """Layers 0-1 identity (1% of the mass on position 0), layer 2 all on position 0: with the massive layer at
    2 the sink starts there (difference 0) and the layers before carry 0.01; at massive layer 1 the difference
    is +1; without a massive layer only the sink onset is reported."""
    eye, sink = torch.eye(T, dtype=torch.float64), torch.zeros(T, T, dtype=torch.float64)
    sink[:, 0] = 1.0
    stack = torch.stack([eye, eye, sink])[:, None].expand(2, 3, 3, T, T)  # [N, L, H, T, T]: layer 2 sinks
    stats = _stats(stack)
    at = attention.sink_vs_massive(stats, 2, 0.3)
    assert at["first_sink_layer"] == 2 and at["sink_minus_massive_layer"] == 0
    assert at["pos0_share_before_massive"] == pytest.approx(1 / T)
    assert attention.sink_vs_massive(stats, 1, 0.3)["sink_minus_massive_layer"] == 1
    assert attention.sink_vs_massive(stats, None, 0.3) == {
        "first_sink_layer": 2, "sink_minus_massive_layer": None, "pos0_share_before_massive": None}
    assert attention.sink_vs_massive(stats, 0, 0.3)["pos0_share_before_massive"] is None


def test_context_length_and_eager_switch_restore_on_error(tiny_llama) -> None:
    """The context comes from the config (GPT block_size, Llama max_position_embeddings), None without one; the
    eager switch is undone even when the body raises."""
    gpt = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=24))
    assert attention.context_length(gpt) == 24
    assert attention.context_length(tiny_llama[0]) == tiny_llama[0].config.max_position_embeddings
    assert attention.context_length(torch.nn.Linear(2, 2)) is None
    with pytest.raises(KeyError), attention.eager_attention(gpt):
        assert gpt.config._attn_implementation == "eager"
        raise KeyError("planted")
    assert gpt.config._attn_implementation == "sdpa"


def test_paper_references_are_recorded_only_for_models_not_run() -> None:
    """The paper's GPT-2 curves go in as value null for the GPT-2 models the profile did not run; a run model
    keeps its own record (written by record_stats, not overwritten here)."""
    from common.reporting import session

    session.setup("04_attention_degeneration_inheritune", "smoke", 0)
    attention.record_paper_references(("gpt2-medium",))
    records = {r["key"]: r for r in manifest.current().records}
    assert "gpt2-medium/attn/maxrank" not in records
    large = records["gpt2-large/attn/maxrank"]
    assert large["value"] is None and large["paper_value"] == attention.paper.MAXRANK["gpt2-large"]
    assert len(records["gpt2-large/attn/avgmass"]["paper_value"]) == 36


def test_notebook04_attention_figures_draw_what_they_are_given() -> None:
    """Each figure has one panel per model (+ the paper panel), the heatmap marks exactly the collapsed heads,
    the tau sweep one line per tau, the sink figure one line per model and a marker per massive layer."""
    import matplotlib

    matplotlib.use("Agg")
    from common.inheritune import figures

    stats = {"a": _stats(_two_sequence_stack()), "b": _stats(_two_sequence_stack())}
    fig = figures.plot_layer_metric(stats, "rank", "max", "MaxRank", paper={"p": [None, 2.0, 1.0]}, log=True)
    assert len(fig.axes) == 3 and list(fig.axes[0].lines[0].get_ydata()) == [1.0, 89.0]
    fig = figures.plot_rank_heatmap(stats, attention.COLLAPSED_HEAD)
    marked = fig.axes[0].collections[0].get_offsets()
    assert len(marked) == int(stats["a"].collapsed_heads().sum()) == 2  # the two heads of the column-7 layer
    assert len(figures.plot_tau_sweep(stats["a"], (0.8, 0.9), "t").axes[0].lines) == 2
    fig = figures.plot_sink_vs_massive(stats, {"a": 1, "b": None})
    assert len(fig.axes[0].lines) == 2 + 1
    fig = figures.plot_rank_compare({k: (s.max_rank(), s.spread("rank", "max")) for k, s in stats.items()})
    assert len(fig.axes[0].lines) == 2 + 1  # two curves and the lazy threshold
    maps = {0: torch.eye(4).expand(2, 4, 4), 3: torch.eye(4).expand(2, 4, 4)}
    assert len(figures.plot_attention_maps(maps, heads=2, title="t").axes) == 4
    assert len(figures.plot_attention_maps(maps, heads=4, title="t").axes) == 4  # the maps have only 2 heads


def test_capture_refuses_16bit_probabilities(tiny_llama) -> None:
    """A bf16 model (how a GPU box loads the paper models) returns bf16 probabilities: k*, m* and the lazy-layer
    calls would then differ from the fp32 CPU runs, so capture refuses them and names the fix; in fp32 the same
    model is measured."""
    model = tiny_llama[0]
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    capture_attention(model, [ids])
    with pytest.raises(ValueError, match="STATISTICS_DTYPE"):
        capture_attention(model.to(torch.bfloat16), [ids])


# ------------------------------------------------------------------------- intervals over sequences


def _with(n: int, layers: int, **metrics: torch.Tensor) -> AttentionStats:
    """Real statistics of [N=n, L=layers, H=2] with the given metrics ([N, L, H]) planted over them."""
    g = torch.Generator().manual_seed(1)
    t = 6
    scores = torch.randn(n, layers, 2, t, t, generator=g, dtype=torch.float64)
    attn = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    stats = AttentionStats(attention.head_metrics(attn), attn.mean(0), 0.9, 0.9, t)
    stats.metrics.update(metrics)
    return stats


def _noise(n: int, layers: int, seed: int, centre: float = 1.0) -> torch.Tensor:
    return centre + 0.1 * torch.randn(n, layers, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_thirds_ratio_is_the_paired_ratio_of_the_recorded_thirds() -> None:
    """The value is depth_thirds' last / first; a last third planted 2x higher on every sequence gives an interval
    above 1.5, a flat curve one holding 1; fewer than 3 layers have no thirds."""
    flat = _with(40, 6, maxcol_share=_noise(40, 6, 0))
    first, _, last = attention.depth_thirds(flat.per_layer("maxcol_share"))
    ratio = attention.thirds_ratio(flat, "maxcol_share")
    assert ratio["value"] == pytest.approx(last / first) and ratio["n"] == 40
    assert ratio["ci95"][0] < 1.0 < ratio["ci95"][1]
    rising = _noise(40, 6, 1)
    rising[:, 4:] *= 2
    assert attention.thirds_ratio(_with(40, 6, maxcol_share=rising), "maxcol_share")["ci95"][0] > 1.5
    with pytest.raises(ValueError, match="no first and last third"):
        attention.thirds_ratio(_with(4, 2), "mass")


def test_min_maxrank_second_half_recomputes_maxrank_per_resample() -> None:
    """The value is min over layers L//2.. of MaxRank; a second-half layer whose heads are all rank 1 on every
    sequence gives the point interval [1, 1] (lazy); ranks scattered around 2 give an interval holding 2."""
    rank = _noise(30, 4, 2, centre=5.0)
    rank[:, 3] = 1.0
    lazy = _with(30, 4, rank=rank)
    low = attention.min_maxrank_second_half(lazy)
    assert low["value"] == float(lazy.max_rank()[2:].min()) == 1.0 and low["ci95"] == [1.0, 1.0]
    scattered = rank.clone()
    scattered[:, 3] = torch.tensor([1.0, 3.0]).repeat(15)[:, None]  # both heads 1 or 3: MaxRank about 2
    around = attention.min_maxrank_second_half(_with(30, 4, rank=scattered))
    assert around["ci95"][0] < 2.0 < around["ci95"][1]


def test_pos0_share_before_is_sink_vs_massives_value_with_an_interval() -> None:
    share = _noise(30, 5, 3, centre=0.1)
    share[:, 3:] = 0.9
    stats = _with(30, 5, pos0_share=share)
    before = attention.pos0_share_before(stats, 3)
    assert before["value"] == pytest.approx(attention.sink_vs_massive(stats, 3)["pos0_share_before_massive"])
    assert before["ci95"][1] < attention.SINK_SHARE
    with pytest.raises(ValueError, match="no layers before it"):
        attention.pos0_share_before(stats, 0)


def test_record_stats_records_the_intervals_over_sequences(records) -> None:
    stats = _planted_stats(6)
    attention.record_stats("tiny", stats, massive_layer=2)
    rec = records()
    for key in ("maxcol_share_last_over_first_third", "avgmass_last_over_first_third", "pos0_share_before_massive",
                "min_maxrank_second_half"):
        lo, hi = rec[f"tiny/attn/{key}"]["ci95"]
        assert lo <= rec[f"tiny/attn/{key}"]["value"] + 1e-12 and rec[f"tiny/attn/{key}"]["value"] <= hi + 1e-12, key
        assert "2 sequences" in rec[f"tiny/attn/{key}"]["note"], key
    assert rec["tiny/attn/maxrank_last_over_first_third"]["ci95"] is None
    assert rec["tiny/attn/min_maxrank_second_half"]["value"] == float(stats.max_rank()[3:].min())
