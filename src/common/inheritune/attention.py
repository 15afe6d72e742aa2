"""Attention degeneration metrics (Inheritune, arXiv 2404.08634 v4 §2, App. C, Def. G.1).

Per head h of layer l and input sequence n, on the causal post-softmax matrix A (T x T, row-stochastic,
lower-triangular; the matrix the model uses, decision D3):

- ``rank``: k*(tau), the fewest singular values holding ``tau`` of the squared energy sum sigma_i^2 (eq. 2);
- ``mass``: m*(eta), the fewest columns, largest first, holding ``eta`` of ||A||_F^2 (App. C; sorted, D4);
  ``mass_index`` is the same sum taken in column-index order, as the paper's formula is written;
- ``sigma1_share``: sigma_1^2 / sum sigma_i^2, and ``erank``: the entropy effective rank exp(H(sigma / sum sigma))
  (Roy & Vetterli 2007), both free of any tolerance (a causal softmax matrix is never exactly rank 1);
- ``energy``: the normalised spectrum sigma_i^2 / sum sigma^2 (descending, T values a head), so k* can be
  re-read at any tau without another pass (Fig. 10's sweep, ``AttentionStats.rank_at``);
- ``maxcol_share``: the largest column's share of the probability mass, max_j sum_i A_ij / T, and ``sink``
  that column's key position; ``pos0_share``: the share landing on position 0 (the first-token sink).

The singular values come from ``eigvalsh`` of the symmetric Gram matrix A A^T (its eigenvalues are the
sigma_i^2), in float64 and batched over sequences x heads, which is cheaper than an SVD per head and exact
for these energy sums (k*, m* and the shares equal the SVD's; the entropy effective rank agrees to ~1e-7
relative, because sigma_i below ~1e-8 sigma_1 are not resolved through A A^T). ``head_metrics_loop`` is the per-head SVD reference (test oracle, benchmark baseline).

Aggregation as the paper does (eq. 3-4): Rank(h, l) = mean over sequences of k*; MaxRank(l) = max over
heads; AvgMass(l) = mean over heads of the per-head mean m*. ``AttentionStats`` also gives the other
aggregations (mean over heads, max over heads) and the demo notebook's k* of the batch-mean matrix (D2).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from common.core import arch, intervals
from common.core.hooks import hooked
from common.core.manifest import record
from common.inheritune import paper

METRICS = ("energy", "rank", "mass", "mass_index", "sigma1_share", "erank", "maxcol_share", "pos0_share", "sink")


#: Relative slack when comparing a cumulative energy with tau: sums of float64 values that equal tau in
#: exact arithmetic (the identity at T = 100 holds exactly 0.9 after 90 values) must count as reaching it.
_SLACK = 1e-9


LAZY_LAYER = 2.0  # decision D12: a layer is lazy when MaxRank(l) < 2, i.e. floor(MaxRank) = 1


COLLAPSED_HEAD = 1.5  # decision D12: a head is collapsed when Rank(h, l) < 1.5


#: A layer "has the sink" when its heads put at least this share of their mass on position 0 (uniform causal
#: attention puts H_T / T there, about 5% at T = 100).
SINK_SHARE = 0.3


def _check_square(attn: torch.Tensor) -> int:
    if attn.ndim < 2 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attention matrices must be [..., T, T], got shape {tuple(attn.shape)}")
    if not attn.is_floating_point():
        raise TypeError(f"attention matrices must be floating point, got {attn.dtype}")
    if attn.shape[-1] == 0 or not torch.isfinite(attn).all():
        raise ValueError(f"attention matrices must be non-empty and finite, got shape {tuple(attn.shape)} with "
                         "NaN/inf or no entries (fp16 overflow? capture them in float32)")
    return attn.shape[-1]


def _check_level(name: str, value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name}={value} must be in (0, 1]; the paper uses 0.9")


def count_to_share(values: torch.Tensor, share: float) -> torch.Tensor:
    """The fewest leading entries of ``values`` ([..., K], sorted as they should be summed) whose cumulative
    sum reaches ``share`` of the total: the counting step of k* (eq. 2) and m* (App. C)."""
    _check_level("share", share)
    if values.shape[-1] == 0 or not torch.isfinite(values).all():
        raise ValueError(f"values must be non-empty and finite, got shape {tuple(values.shape)} with NaN/inf or no "
                         "entries (an all-zero attention matrix has no energy to share)")
    cum = values.cumsum(-1)
    total = cum[..., -1:]
    reached = cum >= (share - _SLACK) * total
    return reached.int().argmax(-1) + 1


def _from_squared_singular_values(sq: torch.Tensor, colmass: torch.Tensor, colsq: torch.Tensor, tau: float,
                                  eta: float) -> dict[str, torch.Tensor]:
    """All metrics from sigma_i^2 (descending), column sums and squared column norms, each [..., T]."""
    t = colmass.shape[-1]
    sq = sq.clamp_min(0)
    sigma = sq.sqrt()
    p = sigma / sigma.sum(-1, keepdim=True)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(-1)
    maxcol, sink = colmass.max(-1)
    energy = sq / sq.sum(-1, keepdim=True)
    return {"energy": energy, "rank": count_to_share(energy, tau),
            "mass": count_to_share(colsq.sort(-1, descending=True).values, eta), "mass_index": count_to_share(colsq, eta),
            "sigma1_share": energy[..., 0], "erank": entropy.exp(), "maxcol_share": maxcol / t,
            "pos0_share": colmass[..., 0] / t, "sink": sink}


def head_metrics(attn: torch.Tensor, tau: float = 0.9, eta: float = 0.9) -> dict[str, torch.Tensor]:
    """Every metric of ``METRICS`` for a stack of attention matrices ``attn`` [..., T, T] (any leading
    dims: sequences, layers, heads), batched: one ``eigvalsh`` call on the float64 Gram matrices A A^T.
    Integer metrics (``rank``, ``mass``, ``mass_index``, ``sink``) are int64, ``energy`` [..., T] and the
    others float64."""
    _check_square(attn)
    _check_level("tau", tau)
    _check_level("eta", eta)
    a = attn.detach().double()
    sq = torch.linalg.eigvalsh(a @ a.mT).flip(-1)  # ascending -> descending sigma^2
    return _from_squared_singular_values(sq, a.sum(-2), (a * a).sum(-2), tau, eta)


def head_metrics_loop(attn: torch.Tensor, tau: float = 0.9, eta: float = 0.9) -> dict[str, torch.Tensor]:
    """Reference implementation: one float64 SVD per head in a Python loop, as the authors' demo does.
    Same outputs as ``head_metrics``; kept as the test oracle and the benchmark baseline."""
    t = _check_square(attn)
    lead = attn.shape[:-2]
    flat = attn.detach().double().reshape(-1, t, t)
    rows = [_from_squared_singular_values(torch.linalg.svdvals(a) ** 2, a.sum(0), (a * a).sum(0), tau, eta)
            for a in flat]
    return {name: torch.stack([r[name] for r in rows]).reshape(lead + rows[0][name].shape) for name in METRICS}


def energy_rank(attn: torch.Tensor, tau: float = 0.9) -> torch.Tensor:
    """k*(tau) of each matrix of ``attn`` [..., T, T] (eq. 2)."""
    return head_metrics(attn, tau)["rank"]


@dataclass
class AttentionStats:
    """Per (sequence, layer, head) metrics, each ``[N, L, H]`` (``energy`` [N, L, H, T]), plus the per-head
    batch-mean matrices ``mean_matrix`` [L, H, T, T] (the demo notebook's object, decision D2)."""
    metrics: dict[str, torch.Tensor]
    mean_matrix: torch.Tensor
    tau: float
    eta: float
    seq_len: int
    n_sequences: int = field(init=False)

    def __post_init__(self) -> None:
        self.n_sequences = int(self.metrics["rank"].shape[0])

    def per_head(self, metric: str) -> torch.Tensor:
        """Mean over sequences: Rank(h, l) for ``rank``, m(h, l) for ``mass`` (eq. 3); [L, H]."""
        scalar = [m for m in METRICS if m not in ("sink", "energy")]
        if metric not in scalar:
            raise ValueError(f"unknown metric {metric!r}; known: {', '.join(scalar)}")
        return self.metrics[metric].double().mean(0)

    def rank_at(self, tau: float) -> torch.Tensor:
        """MaxRank(l) at another energy level ``tau``, from the stored spectra (Fig. 10); [L]."""
        return count_to_share(self.metrics["energy"], tau).double().mean(0).max(-1).values

    def per_layer(self, metric: str, heads: str = "mean") -> torch.Tensor:
        """Per-layer aggregate over heads of ``per_head(metric)``: ``heads`` is "max" or "mean"; [L]."""
        if heads not in ("max", "mean"):
            raise ValueError(f"heads={heads!r}: aggregate over heads with 'max' or 'mean'")
        ph = self.per_head(metric)
        return ph.max(-1).values if heads == "max" else ph.mean(-1)

    def max_rank(self) -> torch.Tensor:
        """MaxRank(l) = max_h mean_n k* (eq. 4, the paper's Fig. 1 curve); [L]."""
        return self.per_layer("rank", "max")

    def avg_mass(self) -> torch.Tensor:
        """AvgMass(l) = mean_h mean_n m* (App. C, Fig. 14); [L]."""
        return self.per_layer("mass", "mean")

    def per_sequence(self, metric: str, heads: str = "mean") -> torch.Tensor:
        """Per sequence, the layer aggregate over heads (``heads``: "max" or "mean") of ``metric``; [N, L]."""
        m = self.metrics[metric].double()
        return m.max(-1).values if heads == "max" else m.mean(-1)

    def spread(self, metric: str, heads: str = "mean") -> torch.Tensor:
        """Std over sequences of the per-sequence layer aggregate (the band of the paper's Fig. 1); [L]."""
        per_seq = self.per_sequence(metric, heads)
        return per_seq.std(0) if self.n_sequences > 1 else torch.zeros(per_seq.shape[1], dtype=torch.float64)

    def demo_rank(self) -> torch.Tensor:
        """k* of the batch-mean attention matrix per head (the authors' demo aggregation, not the paper's); [L, H]."""
        return energy_rank(self.mean_matrix, self.tau)

    def sink_position(self) -> torch.Tensor:
        """Per layer, the key position that most often takes the largest column mass; [L]."""
        sink = self.metrics["sink"]
        return sink.transpose(0, 1).reshape(sink.shape[1], -1).mode(-1).values

    def lazy_layers(self, threshold: float = LAZY_LAYER) -> list[int]:
        """0-based layers whose MaxRank is below ``threshold`` (Def. G.1 with decision D12)."""
        return (self.max_rank() < threshold).nonzero().flatten().tolist()

    def collapsed_heads(self, threshold: float = COLLAPSED_HEAD) -> torch.Tensor:
        """Boolean [L, H]: heads whose mean rank is below ``threshold`` (D12)."""
        return self.per_head("rank") < threshold


def first_sink_layer(stats: AttentionStats, threshold: float = SINK_SHARE) -> int | None:
    """The first 0-based layer whose heads put, on average, at least ``threshold`` of their mass on
    position 0 (the first-token sink), or ``None``."""
    share = stats.per_layer("pos0_share", "mean")
    hits = (share >= threshold).nonzero().flatten()
    return int(hits[0]) if len(hits) else None


def sink_vs_massive(stats: AttentionStats, massive_layer: int | None,
                    threshold: float = SINK_SHARE) -> dict[str, float | None]:
    """Where the first-token sink starts relative to the massive layer (notebook 01's criterion): the first
    sink layer, their difference, and the largest mean mass on position 0 in the layers before the massive one."""
    share = stats.per_layer("pos0_share", "mean")
    if massive_layer is not None and not 0 <= massive_layer < len(share):
        raise ValueError(f"massive layer {massive_layer} is outside the {len(share)} layers of the statistics")
    first = first_sink_layer(stats, threshold)
    if massive_layer is None:
        return {"first_sink_layer": first, "sink_minus_massive_layer": None, "pos0_share_before_massive": None}
    before = float(share[:massive_layer].max()) if massive_layer > 0 else None
    return {"first_sink_layer": first, "sink_minus_massive_layer": None if first is None else first - massive_layer,
            "pos0_share_before_massive": before}


def context_length(model: torch.nn.Module) -> int | None:
    """The longest sequence the model's position scheme accepts, when its config says so."""
    cfg = getattr(arch.unwrap(model), "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    for name in ("block_size", "n_positions", "max_position_embeddings"):
        if (value := getattr(cfg, name, None)) is not None:
            return int(value)
    return None


@contextmanager
def eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """Switch ``model`` to explicit softmax attention (transformers' "eager"), which returns the
    probabilities, for the analysis pass only; the previous implementation is restored on exit."""
    m = arch.unwrap(model)
    old = m.config._attn_implementation
    if old != "eager":
        m.set_attn_implementation("eager")
    try:
        yield
    finally:
        if old != "eager":
            m.set_attn_implementation(old)


@torch.no_grad()
def capture_attention(model: torch.nn.Module, batches: Iterable[torch.Tensor], tau: float = 0.9,
                      eta: float = 0.9) -> AttentionStats:
    """Run the backbone on each ``[B, T]`` batch of token ids with eager attention; a forward hook on every
    layer's attention module turns its probabilities into ``head_metrics`` at once and drops them, so only
    statistics (and the per-head mean matrix) are kept. Raises if ``T`` exceeds the model's context, an
    attention module returns no probabilities, or returns them in less than float32 (a bf16 model on a GPU)."""
    _check_level("tau", tau)
    _check_level("eta", eta)
    n_layers = len(arch.layers(model))
    per_layer: list[list[dict[str, torch.Tensor]]] = [[] for _ in range(n_layers)]
    sums: list[torch.Tensor | None] = [None] * n_layers
    context = context_length(model)
    dev = next(model.parameters()).device

    def hook(i: int):
        def observe(_module, _args, out):
            probs = out[1] if isinstance(out, tuple) and len(out) > 1 else None
            if probs is None:
                raise RuntimeError(f"the attention module of layer {i} returned no probabilities although eager "
                                   "attention was requested; load the model with attn_implementation='eager' "
                                   "(its family may not support switching at run time)")
            if probs.dtype not in (torch.float32, torch.float64):
                raise ValueError(f"layer {i}'s attention probabilities are {probs.dtype}: k*, m* and the lazy-layer "
                                 "calls need float32 or wider (DESIGN §6); load the model with "
                                 "dtype=gpu.STATISTICS_DTYPE (models.load_model(key, dtype=...))")
            per_layer[i].append({k: v.cpu() for k, v in head_metrics(probs, tau, eta).items()})
            s = probs.detach().double().sum(0)
            sums[i] = s if sums[i] is None else sums[i] + s
        return observe

    seq_len = n_seq = 0
    body = arch.backbone(model)
    with hooked((arch.attention(model, i), "output", hook(i)) for i in range(n_layers)), eager_attention(model):
        for ids in batches:
            arch.check_ids(model, ids, "each batch")
            if context is not None and ids.shape[1] > context:
                raise ValueError(f"T={ids.shape[1]} exceeds the model's context of {context} tokens; "
                                 "use shorter windows")
            seq_len, n_seq = ids.shape[1], n_seq + ids.shape[0]
            body(input_ids=ids.to(dev), use_cache=False)
    if n_seq == 0:
        raise ValueError("no batches: pass at least one [B, T] batch of token ids")
    metrics = {name: torch.stack([torch.cat([c[name] for c in chunks]) for chunks in per_layer], dim=1)
               for name in METRICS}
    # sums to the CPU per layer: under device_map="auto" the layers live on different GPUs
    return AttentionStats(metrics, torch.stack([s.cpu() for s in sums]) / n_seq, tau, eta, seq_len)


@torch.no_grad()
def example_maps(model: torch.nn.Module, ids: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """The attention probabilities [H, T, T] of the first sequence of ``ids`` at ``layers`` (for the example
    maps of the paper's Fig. 9; a few small matrices, not a capture of the whole model)."""
    kept: dict[int, torch.Tensor] = {}
    keep = [(arch.attention(model, i), "output", lambda _m, _a, out, i=i: kept.__setitem__(i, out[1][0].detach().float().cpu()))
            for i in layers]
    with hooked(keep), eager_attention(model):
        arch.backbone(model)(input_ids=ids[:1].to(next(model.parameters()).device), use_cache=False)
    return kept


_PAPER_REF = "Inheritune v4 Fig. 1 (MaxRank), Fig. 14 (AvgMass)"


_PAPER_NOTE = ("paper: the authors' self-trained OpenWebText GPT-2 (100K steps, inverse-layer logit scaling), read "
               "off their images; 0-based layers")


def depth_thirds(values: torch.Tensor) -> list[float]:
    """Mean of a per-layer curve over the first, middle and last third of the layers."""
    parts = torch.tensor_split(values.double(), 3)
    return [float(p.mean()) for p in parts]


def thirds_ratio(stats: AttentionStats, metric: str) -> dict:
    """Mean of ``metric`` (mean over heads) over the last third of the layers over the first third, from the
    per-sequence third means, with the paired bootstrap over sequences (``intervals.ratio_of_means``). Equals
    ``depth_thirds(stats.per_layer(metric))``'s last / first, because both are means over sequences and heads."""
    per_seq = stats.per_sequence(metric)
    if per_seq.shape[1] < 3:
        raise ValueError(f"{per_seq.shape[1]} layers have no first and last third; need >= 3")
    first, _, last = (part.mean(1).numpy() for part in torch.tensor_split(per_seq, 3, dim=1))
    return intervals.ratio_of_means(last, first)


def min_maxrank_second_half(stats: AttentionStats) -> dict:
    """The smallest MaxRank among the second half of the layers (0-based L // 2 .. L - 1; a lazy layer has
    MaxRank < ``LAZY_LAYER``), with its bootstrap over sequences: on each resample of sequences MaxRank(l) = max
    over heads of the mean k* is recomputed from the per-sequence k*, then the minimum over those layers taken."""
    rank = stats.metrics["rank"].double()
    half = rank[:, rank.shape[1] // 2:]
    n, layers, heads = half.shape
    return intervals.function_of_means(half.reshape(n, -1).numpy(),
                                       lambda means: means.reshape(len(means), layers, heads).max(-1).min(-1))


def pos0_share_before(stats: AttentionStats, massive_layer: int) -> dict:
    """``sink_vs_massive``'s ``pos0_share_before_massive`` (the largest mean mass on position 0 in the layers
    before ``massive_layer``) with its bootstrap over sequences (the layer maximum recomputed on each resample)."""
    if not 0 < massive_layer <= stats.metrics["pos0_share"].shape[1]:
        raise ValueError(f"massive layer {massive_layer}: no layers before it among the statistics' layers")
    before = stats.per_sequence("pos0_share")[:, :massive_layer].numpy()
    return intervals.function_of_means(before, lambda means: means.max(-1))


def record_stats(key: str, stats: AttentionStats, sink_threshold: float = SINK_SHARE, paper_key: str | None = None,
                 massive_layer: int | None = None) -> None:
    """Record notebook 04's per-layer attention keys for ``key`` (DESIGN §9: ``attn/maxrank``, ``attn/avgmass``,
    ``attn/maxcol_share``) and the diagnostics beside them; the paper's curves go next to ``paper_key``'s; with
    the model's ``massive_layer``, where the sink starts relative to it (``sink_vs_massive``)."""
    paper_rank = paper.MAXRANK.get(paper_key) if paper_key else None
    paper_mass = paper.AVGMASS.get(paper_key) if paper_key else None
    note = f"N={stats.n_sequences} windows of T={stats.seq_len}, tau={stats.tau}, eta={stats.eta}; 0-based layers"
    if paper_rank:
        note += f"; {_PAPER_NOTE}. Ours are the OpenAI checkpoints, not the paper's self-trained models"
    record(f"{key}/attn/maxrank", stats.max_rank(), paper=paper_rank, paper_ref=_PAPER_REF, note=note)
    record(f"{key}/attn/avgmass", stats.avg_mass(), paper=paper_mass, paper_ref=_PAPER_REF, note=note)
    record(f"{key}/attn/maxcol_share", stats.per_layer("maxcol_share"),
           note="largest column's share of the probability mass, max_j sum_i A_ij / T, mean over heads")
    thirds = {"maxcol_share": depth_thirds(stats.per_layer("maxcol_share")), "avgmass": depth_thirds(stats.avg_mass()),
              "maxrank": depth_thirds(stats.max_rank())}
    record(f"{key}/attn/maxcol_share_thirds", thirds["maxcol_share"],
           note="mean of maxcol_share over the first / middle / last third of the layers")
    paired = {"maxcol_share": "maxcol_share", "avgmass": "mass"}  # means over sequences: a paired ratio per sequence
    for name, (first, _, last) in thirds.items():
        ci = thirds_ratio(stats, paired[name])["ci95"] if name in paired and len(stats.max_rank()) >= 3 else None
        over = (f"95% paired bootstrap over {stats.n_sequences} sequences" if ci else
                "no interval (MaxRank is a max over heads, not a mean over sequences; or fewer than 3 layers)")
        record(f"{key}/attn/{name}_last_over_first_third", last / first, ci95=ci,
               note=f"mean {name} over the last third of the layers / over the first third ({first:.3g} -> {last:.3g}); "
                    f"{over}")
    record(f"{key}/attn/meanrank", stats.per_layer("rank", "mean"), note="k* mean over heads (diagnostic, D5)")
    record(f"{key}/attn/maxmass", stats.per_layer("mass", "max"), note="m* max over heads (diagnostic, D5)")
    record(f"{key}/attn/avgmass_index_order", stats.per_layer("mass_index", "mean"),
           note="m* summing columns in index order, as the paper's formula is written (D4)")
    record(f"{key}/attn/sigma1_share", stats.per_layer("sigma1_share"), note="sigma_1^2 energy share, mean over heads")
    record(f"{key}/attn/erank", stats.per_layer("erank"), note="entropy effective rank, mean over heads")
    record(f"{key}/attn/demo_maxrank", stats.demo_rank().double().max(-1).values,
           note="k* of the batch-mean matrix, max over heads: the authors' demo aggregation, not the paper's (D2)")
    record(f"{key}/attn/pos0_share", stats.per_layer("pos0_share"), note="attention mass on position 0, mean over heads")
    sink = sink_vs_massive(stats, massive_layer, sink_threshold)
    record(f"{key}/attn/first_sink_layer", sink["first_sink_layer"],
           note=f"first layer whose mean mass on position 0 is >= {sink_threshold}; 0-based")
    if massive_layer is not None:
        record(f"{key}/attn/sink_minus_massive_layer", sink["sink_minus_massive_layer"],
               note=f"first sink layer - massive layer ({massive_layer}, notebook 01's criterion)")
        before = pos0_share_before(stats, massive_layer)["ci95"] if massive_layer > 0 else None
        record(f"{key}/attn/pos0_share_before_massive", sink["pos0_share_before_massive"], ci95=before,
               note="largest mean attention mass on position 0 in the layers before the massive layer; " +
                    (f"95% bootstrap over {stats.n_sequences} sequences (layer maximum recomputed per resample)"
                     if before else "none: the massive layer is layer 0"))
    record(f"{key}/attn/lazy_layers", stats.lazy_layers(),
           note=f"layers with MaxRank < {LAZY_LAYER} (Def. G.1 with D12); 0-based")
    record(f"{key}/attn/n_lazy_layers", len(stats.lazy_layers()), note=f"of {len(stats.max_rank())} layers")
    low = min_maxrank_second_half(stats)
    record(f"{key}/attn/min_maxrank_second_half", low["value"], ci95=low["ci95"],
           note=f"smallest MaxRank among layers {len(stats.max_rank()) // 2}.. (lazy: < {LAZY_LAYER}, D12); 95% "
                f"bootstrap over {stats.n_sequences} sequences (MaxRank recomputed from per-sequence k* per resample)")
    record(f"{key}/attn/collapsed_head_share", float(stats.collapsed_heads().double().mean()),
           note=f"share of heads with Rank(h, l) < {COLLAPSED_HEAD} (D12)")


def example_layers(stats: AttentionStats) -> list[int]:
    """The two layers whose maps notebook 04 draws (Fig. 9): the highest MaxRank in the first third of the
    layers (an early, attentive layer) and the lowest MaxRank overall (the most degenerate one)."""
    rank = stats.max_rank()
    return [int(rank[: max(1, len(rank) // 3)].argmax()), int(rank.argmin())]


def record_pretrained(key: str, stats: AttentionStats, massive_layer: int | None,
                      sink_threshold: float = SINK_SHARE) -> None:
    """Notebook 04 Part 1 for one pretrained model: its massive layer (notebook 01's criterion) and
    ``record_stats`` with the paper's curves beside the model's own (``paper_key=key``)."""
    record(f"{key}/massive_layer", massive_layer, note="notebook 01's criterion on the detection prompts; 0-based")
    record_stats(key, stats, sink_threshold, paper_key=key, massive_layer=massive_layer)


def record_tau_sweep(key: str, stats: AttentionStats, taus) -> None:
    """``<key>/attn/maxrank_tau/<tau>``: MaxRank per layer re-read at each energy level (Fig. 10)."""
    for tau in taus:
        record(f"{key}/attn/maxrank_tau/{tau}", stats.rank_at(tau), paper_ref="Inheritune v4 Fig. 10")


def record_paper_references(run_keys: tuple[str, ...]) -> None:
    """The paper's curves for the GPT-2 models this profile did not run (``value: null``, DESIGN §9)."""
    for key in paper.MAXRANK:
        if key not in run_keys:
            record(f"{key}/attn/maxrank", None, paper=paper.MAXRANK[key], paper_ref=_PAPER_REF, note=_PAPER_NOTE)
            record(f"{key}/attn/avgmass", None, paper=paper.AVGMASS[key], paper_ref=_PAPER_REF, note=_PAPER_NOTE)


def overview(stats: dict[str, AttentionStats], massive_layers: dict[str, int | None] | None = None,
             sink_threshold: float = SINK_SHARE):
    """One row per model: depth, the first / middle / last-third means of the largest-column share, AvgMass
    and MaxRank, the lazy layers, the share of collapsed heads, and (given) the massive and first sink layers."""
    import pandas as pd

    rows = {}
    for key, s in stats.items():
        row = {"layers": len(s.max_rank()),
               "maxcol share (thirds)": [round(v, 2) for v in depth_thirds(s.per_layer("maxcol_share"))],
               "AvgMass (thirds)": [round(v, 1) for v in depth_thirds(s.avg_mass())],
               "MaxRank (thirds)": [round(v, 1) for v in depth_thirds(s.max_rank())],
               "lazy layers": s.lazy_layers(), "collapsed heads": f"{float(s.collapsed_heads().double().mean()):.0%}",
               "first sink layer": first_sink_layer(s, sink_threshold)}
        if massive_layers is not None:
            row["massive layer"] = massive_layers.get(key)
        rows[key] = row
    return pd.DataFrame(rows).T
