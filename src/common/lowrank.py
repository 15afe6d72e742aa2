"""Low-rank decomposition of LLM projections (SFSD, Chavan et al., arXiv 2405.13039; research sfsd.md).

Every linear projection of a decoder layer (q, k, v, o, gate, up, down; GPT-2's fused ``c_attn`` and its
``Conv1D`` storage through ``arch``) y = W x + b0, W in R^{m x n}, is replaced by a rank-r pair
y ~ W2 (W1 x) + b with W1 in R^{r x n}, W2 in R^{m x r}: r (m + n) (+ m) parameters (§1.1).

- ``weight_svd`` (§1.2): W2 = U_r, W1 = S_r V_r^T, the data-free Eckart-Young truncation of W.
- ``feature`` (§1.3, the method): V_r = the top-r eigenvectors of the covariance of the module's
  *outputs* on calibration data; W2 = V_r, W1 = V_r^T W, and mean compensation b = P_r b0 + (I - P_r) mu
  (P_r = V_r V_r^T, mu the calibration output mean), so the compressed outputs keep mean mu (D2).
- ``feature_nomean``: the same projection without the mean term, b = P_r b0 (what the released code
  computes, §1.3 step 5).
- ``feature_uncentred``: the eigenvectors of the uncentred second moment E[y y^T]; the exact minimiser of
  ||X W^T - X W'^T||_F over rank-r W', i.e. SVD-LLM's truncation-aware whitening (D6).

Statistics are gathered on the dense model one layer at a time from cached layer inputs (D5), as
augmented second moments (float64) on the narrower side of each module: of its outputs y~ = [y; 1] when
m <= n (q, k, v, o, down), else of its input x~ = [x; 1] (gate and up share theirs), from which the output
statistics are exact: E[y y^T] = W~ E[x~ x~^T] W~^T with W~ = [W b0], cov(y) = W cov(x) W^T; that m x m
eigenproblem is then solved in the n x n space (``output_spectrum``), a fraction of the cost for Qwen's
4864-wide gate/up. One eigendecomposition per module and variant, stored as safetensors (top-kappa
eigenvectors, all eigenvalues, the output mean, the weight SVD) and reused for every rank and both searches
(D13: never pickled modules).

Budgets: kappa = floor(mn / (m + n)) is the break-even rank (§1.1); rank pct% of kappa keeps pct% of a
module's parameters. The surgical search (§1.7-1.8) visits modules back to front, leaves the first
``protected`` layers dense (the paper skips 4 of 32) and keeps, per module, the smallest grid rank whose
perplexity stays within base x t^m (m = modules visited) or whose task accuracy does not drop (max over
chunks); candidates are scored from cached layer inputs, re-running only the layers from the changed
module onward.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from common import arch
from common.cache import tensor_digest
from common.manifest import write_json_atomic

METHODS = ("weight_svd", "feature", "feature_nomean", "feature_uncentred")
VARIANTS = ("centred", "uncentred")  # the two output-moment eigendecompositions per module
PCTS = (100, 90, 80, 70, 60, 50)  # DESIGN §9 uniform budgets: rank = pct% of kappa
TOLERANCE = 1.005  # per-module perplexity tolerance of the released perplexity search (§1.8, D8)
SPECTRUM_RANK = 0.25  # the spectra figure reads the energy held by the top 25% of the full rank


# ----------------------------------------------------------------------------------- budgets


def kappa(m: int, n: int) -> int:
    """Break-even rank floor(mn / (m + n)): a rank-kappa pair has the dense module's parameter count (§1.1)."""
    if m < 1 or n < 1:
        raise ValueError(f"matrix dimensions must be positive, got {m} x {n}")
    return (m * n) // (m + n)


def rank_grid(k: int) -> list[int]:
    """The search grid {1, floor(0.1 k), ..., k} exactly as the reference builds it (numpy int32 of
    arange(0.1, 1.1, 0.1) x k), duplicates removed for tiny k."""
    if k < 1:
        raise ValueError(f"kappa must be >= 1, got {k}")
    grid = [1, *(np.arange(0.1, 1.1, 0.1) * k).astype(np.int32).tolist()]
    return sorted({max(1, int(r)) for r in grid})


def rank_for(budget: float, k: int) -> int:
    """Rank that keeps ``budget`` (a fraction in (0, 1]) of a module's parameters: max(1, floor(budget k))."""
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget {budget} must be a fraction in (0, 1] (pct / 100), e.g. 0.8 for 80%")
    if k < 1:
        raise ValueError(f"kappa={k}: a module's break-even rank is >= 1 (lowrank.kappa(m, n))")
    return max(1, math.floor(budget * k + 1e-9))


def factor_params(m: int, n: int, r: int, bias: bool) -> int:
    """Parameters of a rank-r pair: r (m + n), plus m for an output bias."""
    return r * (m + n) + (m if bias else 0)


def param_count(model: nn.Module) -> int:
    """Unique parameters of ``model`` (tied embeddings counted once), the paper's budget denominator (§1.9)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ----------------------------------------------------------------------------------- targets


def _is_projection(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


@dataclass(frozen=True)
class Target:
    """One decomposable projection: layer ``layer``, ``name`` relative to the layer ("self_attn.q_proj"),
    ``path`` relative to the model."""

    layer: int
    name: str
    path: str

    @property
    def kind(self) -> str:
        """Short label: "q_proj" -> "q", GPT-2 "attn.c_proj" stays whole."""
        last = self.name.rsplit(".", 1)[-1]
        return last.removesuffix("_proj") if last.endswith("_proj") and not last.startswith("c_") else self.name


def targets(model: nn.Module, layers: Sequence[int] | None = None) -> list[Target]:
    """Every linear projection of the decoder layers (attention and FFN; not embeddings, norms or the LM
    head, §1.4), in model order: layer ascending, then the order ``named_modules`` gives (q, k, v, o, gate,
    up, down for LLaMA)."""
    stack = arch.layers(model)
    prefix = _path_of(model, stack)
    chosen = range(len(stack)) if layers is None else layers
    bad = [i for i in chosen if not 0 <= i < len(stack)]
    if bad:
        raise ValueError(f"layers {bad} are outside the model's {len(stack)} layers; pick 0 <= layer < {len(stack)}")
    out = []
    for i in chosen:
        for name, module in stack[i].named_modules():
            if name and _is_projection(module):
                out.append(Target(i, name, f"{prefix}.{i}.{name}"))
    return out


def _path_of(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise ValueError("module is not part of the model")


def weight_of(module: nn.Module) -> torch.Tensor:
    """The projection's weight in ``nn.Linear`` layout [out, in] (GPT-2 ``Conv1D`` stores its transpose)."""
    w = module.weight
    return w.T if type(module).__name__ == "Conv1D" else w


# ------------------------------------------------------------------------------- layer inputs


class _Stop(Exception):
    pass


def _first(out):
    return out[0] if isinstance(out, tuple) else out


class LayerInputs:
    """Inputs of every decoder layer on fixed token batches, from one dense forward pass, plus the other
    arguments each layer was called with (positions, masks): ``run(start)`` re-runs only layers
    ``start..L-1`` and the head, which is what a candidate evaluation of the surgical search needs.

    ``targets`` [N, T] are the next-token ids scored where ``mask`` [N, T] is 1 (perplexity windows: every
    position but the last; multiple-choice requests: the continuation tokens). ``keep="all"`` caches every
    layer's input, a list of layer indices only those (what a caller will start from: memory is
    N x T x d per layer); ``keep="first"`` only layer 0's (``advance`` then walks the stack one layer at a time).
    The cached inputs are held on the host (a paper task search caches tens of GiB) and each batch goes to
    its layer's device when it runs; the call arguments (positions, masks) stay on the device."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None,
                 batch_size: int = 8, keep: str | Sequence[int] = "all"):
        if ids.ndim != 2 or ids.shape[1] < 2 or len(ids) == 0:
            raise ValueError(f"ids must be [N, T] with N >= 1 and T >= 2, got shape {tuple(ids.shape)}")
        arch.check_ids(model, ids)
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        n_layers = len(arch.layers(model))
        if isinstance(keep, str) and keep not in ("all", "first"):
            raise ValueError(f"keep must be 'all', 'first' or a list of layer indices, got {keep!r}")
        kept = set(range(n_layers)) if keep == "all" else {0} if keep == "first" else set(keep)
        if not kept or not kept <= set(range(n_layers)):
            raise ValueError(f"keep={keep!r}: layer indices must lie in [0, {n_layers})")
        self.model, self.stack = model, arch.layers(model)
        dev = next(model.parameters()).device
        self.ids = ids
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != ids shape {tuple(ids.shape)}")
        self.mask = torch.ones_like(ids) if mask is None else mask  # [:, -1] is never read: nothing follows
        self.batches = [slice(s, min(s + batch_size, len(ids))) for s in range(0, len(ids), batch_size)]
        # each batch runs only up to its last scored position (+ the token it predicts): right padding
        # beyond it never reaches a scored position under causal attention, and would cost memory and time
        self.widths = [self._width(self.mask[sl]) for sl in self.batches]
        self.hidden: list[list[torch.Tensor | None]] = [[None] * len(self.batches) for _ in range(n_layers)]
        self.calls: list[list[tuple]] = [[None] * len(self.batches) for _ in range(n_layers)]
        self.layer = 0  # with keep="first": the layer whose inputs ``hidden[layer]`` holds

        at = {"b": 0, "stop": False}
        shapes: dict[tuple, int] = {}  # batch shape -> first batch of that shape (its calls are reused)

        def pre_hook(i):
            def hook(module, args, kwargs):
                h = args[0] if args else kwargs["hidden_states"]
                rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                if i in kept:
                    self.hidden[i][at["b"]] = h.detach().to("cpu")  # no copy on a CPU run
                self.calls[i][at["b"]] = (args[1:], rest)
                if at["stop"]:
                    raise _Stop
            return hook

        handles = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, layer in enumerate(self.stack)]
        try:
            with torch.no_grad():
                for at["b"], sl in enumerate(self.batches):
                    batch = ids[sl, :self.widths[at["b"]]]
                    shape = tuple(batch.shape)
                    # keep="first": positions and masks depend on the batch shape only, so a batch whose
                    # shape was seen stops after layer 0 and borrows the other layers' call arguments
                    at["stop"] = keep == "first" and shape in shapes
                    shapes.setdefault(shape, at["b"])
                    try:
                        arch.backbone(model)(input_ids=batch.to(dev), use_cache=False)
                    except _Stop:
                        ref = shapes[shape]
                        for i in range(1, n_layers):
                            self.calls[i][at["b"]] = self.calls[i][ref]
        finally:
            for h in handles:
                h.remove()

    @staticmethod
    def _width(mask: torch.Tensor) -> int:
        """Columns a batch needs: through its last scored position and the token that position predicts."""
        scored = mask[:, :-1].nonzero()
        return int(scored[:, 1].max()) + 2 if len(scored) else 2

    @property
    def n_layers(self) -> int:
        return len(self.stack)

    def _layer(self, i: int, b: int, h: torch.Tensor) -> torch.Tensor:
        """Layer ``i`` on batch ``b``'s hidden states ``h``, moved to the layer's device (a layer that
        accelerate dispatched moves them itself: its weights may be offloaded placeholders)."""
        args, kwargs = self.calls[i][b]
        layer = self.stack[i]
        if getattr(layer, "_hf_hook", None) is None:
            h = h.to(next(layer.parameters()).device)
        return _first(layer(h, *args, **kwargs))

    @torch.no_grad()
    def advance(self) -> None:
        """Replace the cached inputs of ``self.layer`` by its outputs (the next layer's inputs)."""
        i = self.layer
        if i >= self.n_layers - 1:
            raise RuntimeError("already at the last layer")
        self.hidden[i + 1] = [self._layer(i, b, h).to("cpu") for b, h in enumerate(self.hidden[i])]
        self.hidden[i] = [None] * len(self.batches)
        self.layer = i + 1

    @torch.no_grad()
    def logprobs(self, start: int = 0) -> torch.Tensor:
        """Per sequence, the summed log-probability of its masked target tokens, running layers
        ``start..L-1``, the final norm and the LM head from the cached inputs of layer ``start``, or of the
        nearest cached layer below it (the layers in between must be unchanged: callers change only layers
        >= ``start``, so caching every k-th layer trades k - 1 layers of compute for 1/k of the memory)."""
        if not 0 <= start < self.n_layers:
            raise ValueError(f"start={start} is outside the model's {self.n_layers} layers; pick 0 <= start < "
                             f"{self.n_layers}")
        base = next((i for i in range(start, -1, -1) if self.hidden[i][0] is not None), None)
        if base is None:
            raise ValueError(f"layer {start}'s inputs are not cached, nor a lower layer's (keep='all' caches "
                             "every layer)")
        norm, head = arch.final_norm(self.model), arch.lm_head(self.model)
        cap = getattr(getattr(arch.unwrap(self.model), "config", None), "final_logit_softcapping", None)
        out = []
        for b, sl in enumerate(self.batches):
            h = self.hidden[base][b]
            for i in range(base, self.n_layers):
                h = self._layer(i, b, h)
            w = self.widths[b]
            ids, mask = self.ids[sl, 1:w].to(h.device), self.mask[sl, :w - 1].to(h.device).bool()
            rows = norm(h)[:, :-1][mask]  # the head only where a token is scored (multiple choice: a few)
            logits = head(rows).float()
            if cap:
                logits = torch.tanh(logits / cap) * cap
            lp = -F.cross_entropy(logits, ids[mask], reduction="none").double()
            per_seq = torch.zeros(mask.shape[0], dtype=torch.float64, device=h.device)
            per_seq.index_add_(0, mask.nonzero()[:, 0], lp)
            out.append(per_seq.cpu())
        return torch.cat(out)

    def n_targets(self) -> int:
        return int(self.mask[:, :-1].sum())

    def perplexity(self, start: int = 0) -> float:
        """exp(mean NLL over the masked targets), from layer ``start`` on."""
        return math.exp(-float(self.logprobs(start).sum()) / self.n_targets())


# ----------------------------------------------------------------------------------- statistics


class Moments:
    """Augmented second moment E[x~ x~^T] (x~ = [x; 1]) over calibration tokens, float64-accurate: each
    batch's Gram matrix is taken in float32 about a fixed shift (the first batch's mean), so a large mean
    offset (massive activations, biases) does not swamp the covariance, and accumulated in float64."""

    def __init__(self, n: int):
        self.n = n
        self.shift: torch.Tensor | None = None
        self.gram: torch.Tensor | None = None  # allocated by the first ``add``, on its samples' device
        self.total: torch.Tensor | None = None
        self.count = 0
        self._roots: dict[str, torch.Tensor] = {}

    def add(self, x: torch.Tensor) -> None:
        """Accumulate samples [..., n]. The sums live where the first samples came from (the module's device:
        under ``device_map`` each layer's statistics stay on that layer's GPU)."""
        if x.shape[-1] != self.n:
            raise ValueError(f"samples of width {x.shape[-1]} added to moments of width {self.n}")
        x = x.reshape(-1, x.shape[-1]).float()  # a NaN / Inf propagates into the sums: checked once when used
        if self.shift is None:
            self.shift = x.mean(0)
            self.gram = torch.zeros(self.n, self.n, dtype=torch.float64, device=x.device)
            self.total = torch.zeros(self.n, dtype=torch.float64, device=x.device)
        x = x.to(self.gram.device)
        xs = x - self.shift
        self.gram += (xs.T @ xs).double()
        self.total += xs.double().sum(0)
        self.count += len(x)
        self._roots.clear()

    @property
    def mean(self) -> torch.Tensor:
        self._check_count()
        return self.total / self.count + self.shift.double()

    def _check_count(self) -> None:
        if self.count == 0:
            raise ValueError("moments of no samples: add() calibration activations first")

    @property
    def cov(self) -> torch.Tensor:
        """Population covariance (divided by the token count)."""
        self._check_count()
        m = self.total / self.count
        return self.gram / self.count - torch.outer(m, m)

    @property
    def second(self) -> torch.Tensor:
        """E[x~ x~^T] [n+1, n+1]; its last column is [mu_x; 1]."""
        mu = self.mean
        out = torch.empty(self.n + 1, self.n + 1, dtype=torch.float64, device=mu.device)
        out[:self.n, :self.n] = self.cov + torch.outer(mu, mu)
        out[:self.n, self.n] = out[self.n, :self.n] = mu
        out[self.n, self.n] = 1.0
        return out

    def subset(self, idx: torch.Tensor) -> Moments:
        """The moments of the coordinates ``idx`` only (of an output moment: a subset of the rows)."""
        self._check_count()
        idx = idx.to(self.gram.device)
        out = Moments(len(idx))
        out.shift, out.count = self.shift[idx], self.count
        out.gram, out.total = self.gram[idx][:, idx].clone(), self.total[idx].clone()
        return out

    def root(self, variant: str) -> torch.Tensor:
        """``psd_root`` of cov(x) ("centred", [n, n]) or of E[x~ x~^T] ("uncentred", [n+1, n+1]), computed
        once per variant (gate and up, which read the same input, share it)."""
        if variant not in self._roots:
            self._roots[variant] = psd_root(self.cov if variant == "centred" else self.second)
        return self._roots[variant]


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        raise FloatingPointError(f"{name}: non-finite calibration statistics (fp16 overflow?); gather them in "
                                 "float32 (load the model with dtype=torch.float32)")


EIGH_CALLS: list[str] = []  # names of every output eigendecomposition computed (a spy for the tests)


def _top_eigen(c: torch.Tensor, keep: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All eigenvalues (descending, >= 0) and the top ``keep`` eigenvectors of a symmetric PSD matrix."""
    EIGH_CALLS.append(name)
    _check_finite(name, c)
    vals, vecs = torch.linalg.eigh(c.double())
    return vals.flip(0).clamp_min(0), vecs.flip(1)[:, :keep].contiguous()


def psd_root(moment: torch.Tensor) -> torch.Tensor:
    """L with L L^T = ``moment`` (float64, through eigh; negative round-off eigenvalues clamped to 0)."""
    _check_finite("input moment", moment)
    lam, q = torch.linalg.eigh(moment.double())
    return q * lam.clamp_min(0).sqrt()


def output_spectrum(w: torch.Tensor, root: torch.Tensor, keep: int, name: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (all non-zero ones, descending) and the top ``keep`` eigenvectors [m, keep] of
    C = W M W^T for an input moment M = L L^T (``root`` = L, see ``psd_root``) and W [m, n] with m > n,
    without forming the m x m matrix: C's non-zero eigenpairs are those of the n x n matrix
    B = L^T W^T W L = Q diag(s^2) Q^T, mapped by u = W L q / s (the thin SVD of W L; float64)."""
    wl = w.double() @ root.to(w.device)
    vals, vecs = _top_eigen(wl.T @ wl, keep, name)
    live = int((vals[:vecs.shape[1]] > 1e-12 * vals[0].clamp_min(1e-300)).sum())  # null directions have no u
    u = (wl @ vecs[:, :live]) / vals[:live].sqrt()
    return vals, u.contiguous()


def weight_svd(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U [m, k], S [k], Vh [k, n], k = min(m, n), descending) in float64 through the Gram matrix of
    the narrow side: one k x k eigh instead of an m x n SVD (singular values below ~1e-7 s_1 are not resolved)."""
    w = w.double()
    tall = w.shape[0] >= w.shape[1]
    g = w.T @ w if tall else w @ w.T
    vals, vecs = torch.linalg.eigh(g)
    vals, vecs = vals.flip(0).clamp_min(0), vecs.flip(1)
    s = vals.sqrt()
    inv = torch.where(s > 0, 1 / s.clamp_min(1e-300), torch.zeros_like(s))
    if tall:
        return (w @ vecs) * inv, s, vecs.T
    return vecs, s, (vecs.T @ w) * inv[:, None]


def vector_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """Storage precision of the uncentred eigenvectors and the singular vectors: float16 for a 16-bit model (its
    factors are cast to 16 bits anyway; entries |v| <= 1 keep 3 more mantissa bits in float16 than in bfloat16),
    float32 otherwise. The centred eigenvectors stay float32 on every model: mean compensation restores
    (I - P_r) mu, a small remainder of a mean that massive activations make large, which float16 projectors
    would drown (~1e-3 |mu|). Eigenvalues, singular values and means stay float32."""
    return torch.float16 if weight_dtype in (torch.float16, torch.bfloat16) else torch.float32


@dataclass
class Decomposition:
    """Everything one module's factors are cut from, at any rank up to ``keep``. Held on the host (a 7B
    model's decompositions are tens of GiB: never on the GPU), in the precisions of ``vector_dtype``; ``factors``
    moves the slices it needs to the module's device."""

    target: Target
    m: int
    n: int
    has_bias: bool
    mean: torch.Tensor  # [m] calibration output mean mu
    spectra: dict[str, tuple[torch.Tensor, torch.Tensor]]  # variant -> (eigvals [*], eigvecs [m, keep])
    svd: tuple[torch.Tensor, torch.Tensor]  # singular vectors of the narrow side [min(m, n), keep], S (all)
    keep: int

    @property
    def weight_energy(self) -> torch.Tensor:
        """Squared singular values of W (the weight spectrum)."""
        return self.svd[1].double().square()

    @property
    def kappa(self) -> int:
        return kappa(self.m, self.n)

    @property
    def right_singular(self) -> bool:
        """Whether ``svd`` holds V (the right singular vectors, m >= n) rather than U (m < n)."""
        return self.m >= self.n

    def full_rank(self, method: str) -> int:
        """Highest rank ``factors`` can cut for ``method``: the stored singular vectors (<= min(m, n)) or
        eigenvectors (<= m; an output covariance has rank <= n + 1, so fewer when m > n)."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
        if method == "weight_svd":
            return self.svd[0].shape[1]
        return self.spectra["uncentred" if method == "feature_uncentred" else "centred"][1].shape[1]

    def pair_has_bias(self, method: str) -> bool:
        """Whether ``method``'s pair carries a bias: the module's own, or mean compensation's (``feature``)."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
        return self.has_bias or method == "feature"

    def discarded(self, x: torch.Tensor, rank: int) -> torch.Tensor:
        """(I - P_r) x in float64 on ``x``'s device: the part of ``x`` ([m] or [m, k]) outside the top-``rank``
        centred output directions, i.e. what the feature-space projection drops and mean compensation
        restores (§1.3)."""
        if not 1 <= rank <= self.full_rank("feature"):
            raise ValueError(f"{self.target.path}: rank {rank} outside [1, {self.full_rank('feature')}], the stored "
                             "eigenvectors; use a lower rank or decompose with a larger keep")
        v = self.spectra["centred"][1][:, :rank].to(x.device, torch.float64)
        x = x.double()
        return x - v @ (v.T @ x)

    def factors(self, module: nn.Module, method: str, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(W1 [r, n], W2 [m, r], b [m] or None) of ``method`` at ``rank`` for the dense ``module``, in float64
        on the module's device."""
        if not 1 <= rank <= self.full_rank(method):
            raise ValueError(f"{self.target.path}: rank {rank} outside [1, {self.full_rank(method)}], the vectors "
                             f"stored for {method} (keep={self.keep}, matrix {self.m} x {self.n}); use a lower "
                             "rank or decompose with a larger keep")
        w = weight_of(module).detach().double()
        b0 = module.bias.detach().double() if module.bias is not None else None
        if method == "weight_svd":  # the top-r singular subspace: W V_r V_r^T = U_r U_r^T W = U_r S_r V_r^T
            q = self.svd[0][:, :rank].to(w.device, torch.float64)
            return (q.T.contiguous(), w @ q, b0) if self.right_singular else (q.T @ w, q, b0)
        v = self.spectra["uncentred" if method == "feature_uncentred" else "centred"][1][:, :rank]
        v = v.to(w.device, torch.float64)
        w1 = v.T @ w
        b = None if b0 is None else v @ (v.T @ b0)
        if method == "feature":
            comp = self.discarded(self.mean.to(w.device), rank)
            b = comp if b is None else b + comp
        return w1, v, b


def _decompose(target: Target, module: nn.Module, moments: Moments, side: str, keep: int | None) -> Decomposition:
    """``moments`` of the module's outputs (``side`` "output", used when m <= n) or of its input ("input",
    shared by the modules that read it, used when m > n); the same output statistics either way. Computed
    on the module's device in float64, returned on the host (``vector_dtype`` vectors)."""
    w = weight_of(module).detach().double()
    m, n = w.shape
    keep = kappa(m, n) if keep is None else keep
    b0 = module.bias.detach().double() if module.bias is not None else torch.zeros(m, dtype=torch.float64, device=w.device)
    second = moments.second.to(w.device)
    _check_finite(target.path, second)
    k = min(keep, m)
    if side == "output":  # E[y~ y~^T] of y~ = [y; 1]
        mean = second[:m, m]
        spectra = {"centred": _top_eigen(moments.cov, k, f"{target.path}:centred"),
                   "uncentred": _top_eigen(second[:m, :m], k, f"{target.path}:uncentred")}
    else:  # E[x~ x~^T]: E[y y^T] = W~ E[x~ x~^T] W~^T, cov(y) = W cov(x) W^T
        mean = w @ second[:n, n] + b0
        w_aug = torch.cat([w, b0[:, None]], dim=1)
        spectra = {"centred": output_spectrum(w, moments.root("centred"), k, f"{target.path}:centred"),
                   "uncentred": output_spectrum(w_aug, moments.root("uncentred"), k, f"{target.path}:uncentred")}
    u, s, vh = weight_svd(w)
    k = min(keep, len(s))
    narrow = vh[:k].T if m >= n else u[:, :k]  # the exact side of weight_svd's Gram eigh
    vec = vector_dtype(weight_of(module).dtype)

    def host(t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return t.to("cpu", dtype).contiguous()

    return Decomposition(target, m, n, module.bias is not None, host(mean),
                         {v: (host(e), host(q, vec if v == "uncentred" else torch.float32))
                          for v, (e, q) in spectra.items()},
                         (host(narrow, vec), host(s)), keep)


def _save_layer(path: Path, decomps: list[Decomposition]) -> None:
    tensors, meta = {}, []
    for i, d in enumerate(decomps):
        tensors[f"{i}.mean"] = d.mean
        for v, (vals, vecs) in d.spectra.items():
            tensors[f"{i}.{v}.vals"], tensors[f"{i}.{v}.vecs"] = vals, vecs
        tensors[f"{i}.svd.vecs"], tensors[f"{i}.svd.vals"] = d.svd
        meta.append({"layer": d.target.layer, "name": d.target.name, "path": d.target.path, "m": d.m, "n": d.n,
                     "has_bias": d.has_bias, "keep": d.keep})
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"modules": json.dumps(meta)})
    tmp.replace(path)


def _load_layer(path: Path) -> list[Decomposition]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["modules"])
    t = load_file(str(path))  # on the host, where decompositions live
    return [Decomposition(Target(e["layer"], e["name"], e["path"]), e["m"], e["n"], e["has_bias"], t[f"{i}.mean"],
                          {v: (t[f"{i}.{v}.vals"], t[f"{i}.{v}.vecs"]) for v in VARIANTS},
                          (t[f"{i}.svd.vecs"], t[f"{i}.svd.vals"]), e["keep"])
            for i, e in enumerate(meta)]


def stored_bytes(decomps: dict[str, Decomposition]) -> int:
    """Bytes the decompositions hold (host memory, and about their safetensors cache on disk)."""
    tensors = [t for d in decomps.values() for t in (d.mean, *d.svd, *(x for pair in d.spectra.values() for x in pair))]
    return sum(t.numel() * t.element_size() for t in tensors)


def _layer_moments(modules: dict[str, nn.Module], inputs: LayerInputs, i: int, layer_targets: list[Target],
                   exclude_first: bool) -> dict[str, tuple[Moments, str]]:
    """Per target of layer ``i``, over the cached batches: the moments of its outputs when m <= n (the
    smaller side), else of its input, one per distinct input tensor (gate/up read the same one)."""
    out: dict[str, tuple[Moments, str]] = {}
    shared: dict[str, Moments] = {}
    last: dict = {"x": None, "group": None}

    def add(key: str, store: dict, x: torch.Tensor) -> Moments:
        if key not in store:
            store[key] = Moments(x.shape[-1])
        store[key].add(x[:, 1:] if exclude_first else x)
        return store[key]

    def input_hook(t: Target):
        def fn(module, args):
            x = args[0]
            if x is not last["x"]:  # a new input tensor (held in ``last``, so identity is safe)
                last.update(x=x, group=t.path)
                add(t.path, shared, x)
            out[t.path] = (shared[last["group"]], "input")
        return fn

    def output_hook(t: Target):
        def fn(module, args, y):
            out[t.path] = (add(t.path, outputs, y), "output")
        return fn

    outputs: dict[str, Moments] = {}
    handles = []
    for t in layer_targets:
        m, n = weight_of(modules[t.path]).shape
        module = modules[t.path]
        handles.append(module.register_forward_hook(output_hook(t)) if m <= n
                       else module.register_forward_pre_hook(input_hook(t)))
    try:
        with torch.no_grad():
            for b, h in enumerate(inputs.hidden[i]):
                inputs._layer(i, b, h)
                last.update(x=None, group=None)
    finally:
        for h in handles:
            h.remove()
    return out


def decompose_model(model: nn.Module, calibration: torch.Tensor, layers: Sequence[int] | None = None,
                    batch_size: int = 8, keep: int | None = None, cache: Path | None = None,
                    exclude_first: bool = False, progress: Callable | None = None) -> dict[str, Decomposition]:
    """Statistics and decompositions of every target in ``layers`` (default all), gathered on the dense model
    one layer at a time from cached layer inputs (D5) over ``calibration`` [N, T] windows.

    ``keep``: eigenvectors stored per module (default kappa). ``cache``: a directory; each layer's
    decompositions are written there atomically as ``layer_XX.safetensors`` and read back on the next
    call, so an interrupted run resumes at the first missing layer. ``exclude_first``: leave position 0 out
    of the statistics. Returns ``{target.path: Decomposition}``."""
    if calibration.ndim != 2 or calibration.shape[1] < 2:
        raise ValueError(f"calibration must be [N, T] windows with T >= 2, got shape {tuple(calibration.shape)}; "
                         "the corpus is shorter than one window: lower the window length or add text")
    if keep is not None and keep < 1:
        raise ValueError(f"keep={keep}: store at least one eigenvector per module (default: kappa)")
    n_layers = len(arch.layers(model))
    wanted = sorted(set(range(n_layers) if layers is None else layers))
    if not wanted or not 0 <= wanted[0] <= wanted[-1] < n_layers:
        raise ValueError(f"layers {wanted} must be non-empty and inside the model's {n_layers} layers")
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    out: dict[str, Decomposition] = {}
    todo = [i for i in wanted if cache is None or not (cache / f"layer_{i:02d}.safetensors").exists()]
    for i in wanted:
        if i not in todo:
            out.update({d.target.path: d for d in _load_layer(cache / f"layer_{i:02d}.safetensors")})
    if not todo:
        return out
    inputs = LayerInputs(model, calibration, batch_size=batch_size, keep="first")
    modules = dict(model.named_modules())
    for i in range(max(todo) + 1):
        if i in todo:
            layer_targets = targets(model, [i])
            moments = _layer_moments(modules, inputs, i, layer_targets, exclude_first)
            decomps = [_decompose(t, modules[t.path], *moments[t.path], keep) for t in layer_targets]
            if cache is not None:
                _save_layer(cache / f"layer_{i:02d}.safetensors", decomps)
            out.update({d.target.path: d for d in decomps})
            if progress:
                progress(i)
        if i < max(todo):
            inputs.advance()
    return {t.path: out[t.path] for t in targets(model, wanted)}


# ------------------------------------------------------------------------------ factorised modules


class LowRankLinear(nn.Module):
    """y = second(first(x)): a real factorised pair (r (m + n) parameters and MACs), not a dense matrix of
    lower rank."""

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        r, n = w1.shape
        m = w2.shape[0]
        self.first = nn.Linear(n, r, bias=False, device=w1.device, dtype=dtype)
        self.second = nn.Linear(r, m, bias=bias is not None, device=w1.device, dtype=dtype)
        with torch.no_grad():
            self.first.weight.copy_(w1)
            self.second.weight.copy_(w2)
            if bias is not None:
                self.second.bias.copy_(bias)

    @property
    def rank(self) -> int:
        return self.first.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


def check_rank(d: Decomposition, rank: int) -> None:
    """A factorised module above kappa has more parameters than the dense one: refuse it."""
    if not 1 <= rank <= d.kappa:
        raise ValueError(f"{d.target.path}: rank {rank} outside [1, kappa={d.kappa}]; above kappa the pair has "
                         f"more parameters than the dense {d.m} x {d.n} matrix (keep it dense instead)")


def factorised(model: nn.Module, d: Decomposition, method: str, rank: int) -> LowRankLinear:
    """The rank-``rank`` replacement of ``d``'s module in ``model``."""
    check_rank(d, rank)
    module = model.get_submodule(d.target.path)
    w1, w2, b = d.factors(module, method, rank)
    return LowRankLinear(w1, w2, b, weight_of(module).dtype)


@contextmanager
def swapped(model: nn.Module, replacements: dict[str, nn.Module | Callable[[], nn.Module]]) -> Iterator[nn.Module]:
    """Within the block, each module path of ``replacements`` is the given module (or what the callable
    builds, once the previous ones are in place); the original modules are put back afterwards (also on
    errors), untouched."""
    originals = {p: model.get_submodule(p) for p in replacements}
    try:
        for p, new in replacements.items():
            model.set_submodule(p, new() if callable(new) and not isinstance(new, nn.Module) else new)
        yield model
    finally:
        for p, module in originals.items():
            model.set_submodule(p, module)


def decomposed(model: nn.Module, decomps: dict[str, Decomposition], method: str,
               ranks: dict[str, int]):
    """Context: within the block, every module in ``ranks`` ({path: rank}) is its factorised pair; the
    dense modules are put back afterwards (also on errors), untouched."""
    unknown = [p for p in ranks if p not in decomps]
    if unknown:
        raise KeyError(f"no decomposition for {unknown[:3]}; decompose those layers first")
    return swapped(model, {p: (lambda p=p, r=r: factorised(model, decomps[p], method, r)) for p, r in ranks.items()})


def model_share(model: nn.Module, decomps: dict[str, Decomposition], ranks: dict[str, int], method: str = "feature") -> float:
    """Whole-model parameter share after replacing ``ranks``' modules (embeddings, head and norms included,
    §1.9), computed exactly from the shapes: the dense total minus each dense module plus its pair."""
    total = dense_param_count(model, decomps)
    after = total
    for p, r in ranks.items():
        d = decomps[p]
        after += factor_params(d.m, d.n, r, d.pair_has_bias(method)) - d.m * d.n - (d.m if d.has_bias else 0)
    return after / total


def dense_param_count(model: nn.Module, decomps: dict[str, Decomposition]) -> int:
    """``param_count`` of the dense model, also while some modules are factorised (``decomposed``)."""
    total = param_count(model)
    for p, d in decomps.items():
        module = model.get_submodule(p)
        if isinstance(module, LowRankLinear):
            total += d.m * d.n + (d.m if d.has_bias else 0) - sum(q.numel() for q in module.parameters())
    return total


def uniform_ranks(decomps: dict[str, Decomposition], pct: float, layers: Sequence[int]) -> dict[str, int]:
    """Rank pct% of kappa in every module of ``layers`` (the uniform budgets, D4)."""
    chosen = set(layers)
    missing = sorted(chosen - {d.target.layer for d in decomps.values()})
    if not chosen or missing:
        raise ValueError(f"layers {sorted(chosen)} must be non-empty and decomposed; no decompositions for {missing} "
                         "(decompose_model(..., layers=...) first, or pick decomposed layers)")
    return {p: rank_for(pct / 100, d.kappa) for p, d in decomps.items() if d.target.layer in chosen}


def protected_layers(n_layers: int) -> int:
    """Leading layers every search leaves dense: round(L / 8) (the paper: 4 of 32, module index < 28)."""
    if n_layers < 1:
        raise ValueError(f"n_layers={n_layers}: a model has at least one layer")
    return max(1, round(n_layers / 8))


# --------------------------------------------------------------------- row-protected pairs (notebook 06)


def layer_moments(model: nn.Module, calibration: torch.Tensor, layer: int, batch_size: int = 8,
                  exclude_first: bool = False) -> dict[str, tuple[Moments, str]]:
    """The statistics ``decompose_model`` gathers for the targets of ``layer`` ({path: (moments, side)},
    side "output" or "input"), kept so that parts of a module can be decomposed from them."""
    if calibration.ndim != 2 or calibration.shape[1] < 2:
        raise ValueError(f"calibration must be [N, T] windows with T >= 2, got shape {tuple(calibration.shape)}")
    inputs = LayerInputs(model, calibration, batch_size=batch_size, keep=[layer])
    return _layer_moments(dict(model.named_modules()), inputs, layer, targets(model, [layer]), exclude_first)


def _other_rows(rows: torch.Tensor, m: int) -> torch.Tensor:
    """The indices of [0, m) not in ``rows``, ascending, on ``rows``' device."""
    keep = torch.ones(m, dtype=torch.bool, device=rows.device)
    keep[rows] = False
    return keep.nonzero().flatten()


class RowProtectedLinear(nn.Module):
    """y[rows] = W[rows] x + b0[rows] exactly (``exact``); every other output row from a low-rank ``pair``
    (a ``LowRankLinear`` cut from those rows alone)."""

    def __init__(self, exact: nn.Linear, pair: LowRankLinear, rows: torch.Tensor, m: int):
        super().__init__()
        self.exact, self.pair, self.m = exact, pair, m
        self.register_buffer("rows", rows.clone(), persistent=False)
        self.register_buffer("rest", _other_rows(rows, m), persistent=False)

    @property
    def rank(self) -> int:
        return self.pair.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.new_empty(*x.shape[:-1], self.m)
        y[..., self.rest] = self.pair(x)
        y[..., self.rows] = self.exact(x)
        return y


def protected_rank(m: int, n: int, k: int, rank: int, bias: bool) -> int:
    """The largest rank r' at which k exact rows plus a rank-r' pair over the other m - k rows have no more
    parameters than the unprotected rank-``rank`` pair of the m x n module (the same budget)."""
    if not 0 < k < m:
        raise ValueError(f"k={k} protected rows must lie in [1, {m - 1}] for a {m} x {n} module")
    spare = factor_params(m, n, rank, bias) - k * n - (m if bias else 0)
    r = spare // (m - k + n)
    if r < 1:
        raise ValueError(f"rank {rank} leaves no budget for a pair after {k} exact rows of a {m} x {n} module "
                         f"({k * n:,} parameters): raise the rank or protect fewer rows")
    return r


def protected_factorised(module: nn.Module, moments: Moments, side: str, rows: Sequence[int], method: str,
                         rank: int) -> RowProtectedLinear:
    """Keep the output ``rows`` of ``module`` exact and decompose the others with ``method`` at ``rank``,
    from the module's calibration ``moments`` (``layer_moments``: input moments serve any row subset,
    output moments are restricted to the kept rows)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    w = weight_of(module).detach()
    m, n = w.shape
    idx = torch.as_tensor(sorted(set(int(r) for r in rows)), dtype=torch.long, device=w.device)
    if len(idx) != len(rows) or len(idx) == 0 or int(idx.min()) < 0 or int(idx.max()) >= m:
        raise ValueError(f"rows must be distinct indices in [0, {m}), got {list(rows)[:8]}")
    if len(idx) == m:
        raise ValueError(f"all {m} rows protected: nothing left to decompose (keep the module dense instead)")
    rest = _other_rows(idx, m)
    bias = module.bias.detach() if module.bias is not None else None

    def linear(weight: torch.Tensor, b: torch.Tensor | None) -> nn.Linear:
        lin = nn.Linear(n, len(weight), bias=b is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(weight)
            if b is not None:
                lin.bias.copy_(b)
        return lin

    sub = linear(w[rest], None if bias is None else bias[rest])
    sub_moments = moments if side == "input" else moments.subset(rest.to(moments.gram.device))
    d = _decompose(Target(-1, "rest", "rest"), sub, sub_moments, side, rank)
    check_rank(d, rank)
    w1, w2, b = d.factors(sub, method, rank)
    return RowProtectedLinear(linear(w[idx], None if bias is None else bias[idx]),
                              LowRankLinear(w1, w2, b, w.dtype), idx, m)


# --------------------------------------------------------------------------------- spectra


def energy_at(values: torch.Tensor, share: float = SPECTRUM_RANK, full: int | None = None) -> float:
    """Share of sum(values) held by the top ceil(share x full) values (``full`` defaults to their count).
    For a weight pass S^2; for output features the eigenvalues of their covariance."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share={share} must be a fraction of the full rank in (0, 1], e.g. {SPECTRUM_RANK}")
    v = values.double().sort(descending=True).values
    full = len(v) if full is None else full
    k = max(1, math.ceil(share * full))
    return float(v[:k].sum() / v.sum()) if v.sum() > 0 else float("nan")


def spectra_frame(decomps: dict[str, Decomposition], share: float = SPECTRUM_RANK):
    """Per module, the energy held by the top ``share`` of the full rank min(m, n): of the output features
    (eigenvalues of their centred covariance) and of the weights (squared singular values); a DataFrame
    with columns layer, kind, feature, weight (research §6.2 check 1)."""
    import pandas as pd

    rows = []
    for d in decomps.values():
        full = min(d.m, d.n)
        rows.append({"layer": d.target.layer, "kind": d.target.kind,
                     "feature": energy_at(d.spectra["centred"][0], share, full),
                     "weight": energy_at(d.weight_energy, share, full)})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------ surgical search


@dataclass
class SearchState:
    """A search's decisions so far, saved after every module (``path``), so an interrupted search resumes.
    ``steps``: one dict per visited module, back to front: path, layer, kind, rank (None = kept dense),
    tried ({rank: score}), share (whole-model parameter share after the decision), bound."""

    criterion: str
    method: str
    settings: dict
    base: dict
    steps: list[dict] = field(default_factory=list)

    @property
    def ranks(self) -> dict[str, int]:
        return {s["path"]: s["rank"] for s in self.steps if s["rank"] is not None}

    def save(self, path: Path | None) -> None:
        if path is not None:
            write_json_atomic(path, {"criterion": self.criterion, "method": self.method, "settings": self.settings,
                                     "base": self.base, "steps": self.steps})

    @classmethod
    def load(cls, path: Path | None, criterion: str, method: str, settings: dict) -> SearchState | None:
        if path is None or not path.exists():
            return None
        raw = json.loads(path.read_text())
        if (raw["criterion"], raw["method"], raw["settings"]) != (criterion, method, settings):
            raise ValueError(f"{path} holds a search with other settings ({raw['settings']}); delete it or use "
                             "another path")
        return cls(**raw)


#: Bump when what a ``Decomposition`` holds, or how factors are cut from it, changes (part of every digest).
DECOMPOSITION_FORMAT = 2


def decomposition_digest(decomps: dict[str, Decomposition]) -> str:
    """Short identity of a set of decompositions (the format, their modules and vector precisions, output means
    and leading eigenvalues): part of every cached result and search state computed from them."""
    import hashlib

    h = hashlib.sha256(f"format {DECOMPOSITION_FORMAT}".encode())
    for p, d in decomps.items():
        h.update(f"{p}|{d.spectra['uncentred'][1].dtype}|{d.svd[0].dtype}".encode())
        stats = torch.cat([d.mean, d.spectra["centred"][0][:8], d.spectra["uncentred"][0][:8]])
        h.update(stats.to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()[:16]


def search_order(decomps: dict[str, Decomposition], protected: int) -> list[Target]:
    """Modules back to front (last layer's last module first), skipping the first ``protected`` layers."""
    if protected < 0:
        raise ValueError(f"protected must be >= 0, got {protected}")
    return [d.target for d in reversed(list(decomps.values())) if d.target.layer >= protected]


def _smallest_passing(grid: list[int], passes: Callable[[int], bool], scan: str) -> int | None:
    """Smallest rank of ``grid[:-1]`` that passes (the last entry, kappa, saves nothing), or None.
    ``linear``: ascending scan, the reference protocol. ``bisect``: assumes the criterion is monotone in
    the rank; checks 0.9 kappa first, then bisects (about 4 evaluations instead of up to 10)."""
    candidates = grid[:-1]
    if scan == "linear":
        return next((r for r in candidates if passes(r)), None)
    if scan != "bisect":
        raise ValueError(f"scan must be 'linear' or 'bisect', got {scan!r}")
    if not candidates or not passes(candidates[-1]):
        return None
    lo, hi = 0, len(candidates) - 1  # candidates[hi] passes
    while lo < hi:
        mid = (lo + hi) // 2
        if passes(candidates[mid]):
            hi = mid
        else:
            lo = mid + 1
    return candidates[hi]


def _run_search(model: nn.Module, decomps: dict[str, Decomposition], method: str, order: list[Target],
                state: SearchState, decide: Callable[[Target, int, dict[str, int]], tuple[int | None, dict, float]],
                state_path: Path | None, progress: Callable | None) -> SearchState:
    done = {s["path"] for s in state.steps}
    for m, t in enumerate(order, start=1):
        if t.path in done:
            continue
        rank, tried, bound = decide(t, m, state.ranks)
        ranks = {**state.ranks, **({t.path: rank} if rank is not None else {})}
        state.steps.append({"path": t.path, "layer": t.layer, "kind": t.kind, "rank": rank,
                            "kappa": decomps[t.path].kappa, "tried": tried, "bound": bound,
                            "share": model_share(model, decomps, ranks, method)})
        state.save(state_path)
        if progress:
            progress(m, len(order))
    return state


def perplexity_search(model: nn.Module, decomps: dict[str, Decomposition], inputs: LayerInputs,
                      method: str = "feature", tolerance: float = TOLERANCE, protected: int | None = None,
                      scan: str = "linear", cached_prefix: bool = True, state_path: Path | None = None,
                      progress: Callable | None = None) -> SearchState:
    """The perplexity-driven surgical search (§1.8): for the m-th module visited (back to front), the
    smallest grid rank with ppl <= base x tolerance^m on ``inputs`` (the search split), else dense.

    ``cached_prefix``: score a candidate of layer l from the cached inputs of layer l (False: re-run the
    whole model, the reference's cost; same decisions). ``state_path``: JSON saved after every module;
    a later call with the same settings resumes there."""
    if not tolerance >= 1.0:
        raise ValueError(f"tolerance {tolerance} must be >= 1 (a per-module perplexity factor, e.g. 1.005)")
    protected = protected_layers(inputs.n_layers) if protected is None else protected
    settings = {"tolerance": tolerance, "protected": protected, "scan": scan, "windows": tensor_digest(inputs.ids),
                "decompositions": decomposition_digest(decomps)}
    state = SearchState.load(state_path, "perplexity", method, settings)
    if state is None:
        state = SearchState("perplexity", method, settings, {"ppl": inputs.perplexity(0)})
    base = state.base["ppl"]

    def decide(t: Target, m: int, ranks: dict[str, int]):
        bound = base * tolerance ** m
        tried: dict[str, float] = {}
        start = t.layer if cached_prefix else 0

        def passes(r: int) -> bool:
            with decomposed(model, decomps, method, {**ranks, t.path: r}):
                tried[str(r)] = inputs.perplexity(start)
            return tried[str(r)] <= bound

        return _smallest_passing(rank_grid(decomps[t.path].kappa), passes, scan), tried, bound

    return _run_search(model, decomps, method, search_order(decomps, protected), state, decide, state_path, progress)


def task_search(model: nn.Module, decomps: dict[str, Decomposition], chunks: Sequence[MultipleChoice],
                split: MultipleChoice, method: str = "feature", delta: float = 0.0, protected: int | None = None,
                layers: Sequence[int] | None = None, scan: str = "linear", state_path: Path | None = None,
                progress: Callable | None = None) -> SearchState:
    """The task-specific surgical search (§1.7): per module, on each chunk the smallest grid rank whose
    accuracy is >= the dense chunk accuracy - ``delta`` (none: kappa); the module takes the max over
    chunks, and is kept only if that rank < kappa and the accuracy on the whole search ``split`` stays >=
    its dense value - ``delta``. ``layers``: search only these layers (default: all unprotected)."""
    if not chunks:
        raise ValueError("task_search needs at least one chunk (lowrank_eval.task_splits(...).chunks)")
    n_layers = split.inputs.n_layers
    protected = protected_layers(n_layers) if protected is None else protected
    settings = {"delta": delta, "protected": protected, "scan": scan, "layers": None if layers is None else list(layers),
                "chunks": [tensor_digest(c.inputs.ids) for c in chunks], "split": tensor_digest(split.inputs.ids),
                "decompositions": decomposition_digest(decomps)}
    state = SearchState.load(state_path, "task", method, settings)
    if state is None:
        state = SearchState("task", method, settings,
                            {"chunks": [c.accuracy(0) for c in chunks], "split": split.accuracy(0)})
    order = [t for t in search_order(decomps, protected) if layers is None or t.layer in set(layers)]

    def decide(t: Target, m: int, ranks: dict[str, int]):
        k = decomps[t.path].kappa
        grid, tried, chosen = rank_grid(k), {}, []
        for i, chunk in enumerate(chunks):
            def passes(r: int, i=i, chunk=chunk) -> bool:
                with decomposed(model, decomps, method, {**ranks, t.path: r}):
                    tried[f"{i}:{r}"] = chunk.accuracy(t.layer)
                return tried[f"{i}:{r}"] >= state.base["chunks"][i] - delta - 1e-12

            chosen.append(_smallest_passing(grid, passes, scan) or k)
            if max(chosen) == k:
                break
        rank = max(chosen)
        if rank == k:
            return None, tried, state.base["split"] - delta
        with decomposed(model, decomps, method, {**ranks, t.path: rank}):
            tried[f"split:{rank}"] = split.accuracy(t.layer)
        keep = tried[f"split:{rank}"] >= state.base["split"] - delta - 1e-12
        return (rank if keep else None), tried, state.base["split"] - delta

    return _run_search(model, decomps, method, order, state, decide, state_path, progress)


# ------------------------------------------------------------------------- multiple-choice scoring


@dataclass
class MultipleChoice:
    """A multiple-choice task scored from cached layer inputs (research D11: lm-eval's zero-shot scoring,
    summed continuation log-likelihood; ``acc_norm`` divides by the choice's length in characters).
    Requests are right-padded: under causal attention padding never reaches the scored positions."""

    docs: list[dict]
    metric: str
    inputs: LayerInputs
    doc_of: list[int]  # request -> doc index
    lengths: list[int]  # request -> len(choice) in characters

    def scores(self, start: int = 0) -> list[list[float]]:
        lp = self.inputs.logprobs(start).tolist()
        out: list[list[float]] = [[] for _ in self.docs]
        for j, d in enumerate(self.doc_of):
            out[d].append(lp[j] / self.lengths[j] if self.metric == "acc_norm" else lp[j])
        return out

    def correct(self, start: int = 0) -> list[float]:
        return [float(int(np.argmax(s)) == doc["gold"]) for s, doc in zip(self.scores(start), self.docs, strict=True)]

    def accuracy(self, start: int = 0) -> float:
        """Share of docs whose gold choice scores highest, running layers ``start..`` from the cache."""
        c = self.correct(start)
        return sum(c) / len(c)


def multiple_choice(model: nn.Module, tok, key: str, docs: list[dict], metric: str, batch_size: int = 16,
                    delimiter: str = " ", keep: str | Sequence[int] = "all") -> MultipleChoice:
    """Tokenise ``docs`` the way lm-eval does and cache the inputs of the layers in ``keep`` (``LayerInputs``:
    the layers scoring will start from). A doc is ``tasks.requests``' ``{"pairs": [[context, continuation],
    ...], "choices", "gold"}`` (any task, WinoGrande's per-choice contexts included) or a local task's
    ``{"query", "choices", "gold"}`` (context ``query``, continuation ``delimiter + choice``). As in lm-eval's
    ``_encode_pair``, trailing spaces of the context move to the continuation, and the continuation is the
    tokens of context + continuation beyond the context's."""
    from common.models import get_spec

    if not docs:
        raise ValueError("multiple_choice needs at least one doc")
    if metric not in ("acc", "acc_norm"):
        raise ValueError(f"metric must be 'acc' or 'acc_norm', got {metric!r}")
    bos = [tok.bos_token_id] if get_spec(key).prepend_bos else []
    seqs, starts, doc_of, lengths = [], [], [], []
    for i, doc in enumerate(docs):
        pairs = doc.get("pairs") or [(doc["query"], delimiter + c) for c in doc["choices"]]
        if len(pairs) != len(doc["choices"]):
            raise ValueError(f"doc {i}: {len(pairs)} requests for {len(doc['choices'])} choices")
        for (context, continuation), choice in zip(pairs, doc["choices"], strict=True):
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            ctx = bos + tok(context, add_special_tokens=False)["input_ids"]
            whole = bos + tok(context + continuation, add_special_tokens=False)["input_ids"]
            seqs.append(whole)
            starts.append(len(ctx))
            doc_of.append(i)
            lengths.append(len(choice))
    width = max(map(len, seqs))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, (s, c) in enumerate(zip(seqs, starts, strict=True)):
        ids[j, :len(s)] = torch.tensor(s)
        mask[j, c - 1:len(s) - 1] = 1  # position t scores token t + 1
    return MultipleChoice(docs, metric, LayerInputs(model, ids, mask, batch_size, keep), doc_of, lengths)
