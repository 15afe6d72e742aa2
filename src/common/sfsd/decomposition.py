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
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from common.core import arch, intervals, progress
from common.core.hooks import hooked
from common.core.layer_inputs import LayerInputs
from common.core.manifest import record
from common.sfsd.budgets import Target, kappa, targets, weight_of

METHODS = ("weight_svd", "feature", "feature_nomean", "feature_uncentred")


VARIANTS = ("centred", "uncentred")  # the two output-moment eigendecompositions per module


SPECTRUM_RANK = 0.25  # the spectra figure reads the energy held by the top 25% of the full rank


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


def decompose_target(target: Target, module: nn.Module, moments: Moments, side: str, keep: int | None) -> Decomposition:
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


def gather_layer_moments(modules: dict[str, nn.Module], inputs: LayerInputs, i: int, layer_targets: list[Target],
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
    def hook(t: Target):
        m, n = weight_of(modules[t.path]).shape
        return (modules[t.path], "output", output_hook(t)) if m <= n else (modules[t.path], "input", input_hook(t))

    with hooked(hook(t) for t in layer_targets), torch.no_grad():
        for b, h in enumerate(inputs.hidden[i]):
            inputs._layer(i, b, h)
            last.update(x=None, group=None)
    return out


def decompose_model(model: nn.Module, calibration: torch.Tensor, layers: Sequence[int] | None = None,
                    batch_size: int = 8, keep: int | None = None, cache: Path | None = None,
                    exclude_first: bool = False) -> dict[str, Decomposition]:
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
            moments = gather_layer_moments(modules, inputs, i, layer_targets, exclude_first)
            decomps = [decompose_target(t, modules[t.path], *moments[t.path], keep) for t in layer_targets]
            if cache is not None:
                _save_layer(cache / f"layer_{i:02d}.safetensors", decomps)
            out.update({d.target.path: d for d in decomps})
            progress.report("SFSD decomposition (layers)", todo.index(i) + 1, len(todo))
        if i < max(todo):
            inputs.advance()
    return {t.path: out[t.path] for t in targets(model, wanted)}


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


def record_spectra(key: str, frame) -> None:
    """Notebook 05's spectra keys from ``spectra_frame``: ``<key>/lowrank/spectra/{feature,weight}_energy25``
    (mean over the decomposed modules), their difference (with its 95% interval, paired over modules), and per
    module kind the per-layer values."""
    record(f"{key}/lowrank/spectra/feature_energy25", frame.feature.mean(), note="mean over decomposed modules")
    record(f"{key}/lowrank/spectra/weight_energy25", frame.weight.mean(), note="mean over decomposed modules")
    diff = intervals.paired_difference(frame.feature, frame.weight)
    record(f"{key}/lowrank/spectra/feature_minus_weight_energy25", frame.feature.mean() - frame.weight.mean(),
           ci95=diff["ci95"], note=f"mean over modules; 95% paired bootstrap over {diff['n']} modules")
    for kind, f in frame.groupby("kind"):
        record(f"{key}/lowrank/spectra/{kind}/feature_energy25", f.sort_values("layer").feature.tolist(),
               note="per decomposed layer")
        record(f"{key}/lowrank/spectra/{kind}/weight_energy25", f.sort_values("layer").weight.tolist(),
               note="per decomposed layer")


DECOMPOSITION_FORMAT = 2


def decomposition_digest(decomps: dict[str, Decomposition]) -> str:
    """Short identity of a set of decompositions (the format, their modules and vector precisions, output means
    and leading eigenvalues): part of every cached result and search state computed from them."""
    h = hashlib.sha256(f"format {DECOMPOSITION_FORMAT}".encode())
    for p, d in decomps.items():
        h.update(f"{p}|{d.spectra['uncentred'][1].dtype}|{d.svd[0].dtype}".encode())
        stats = torch.cat([d.mean, d.spectra["centred"][0][:8], d.spectra["uncentred"][0][:8]])
        h.update(stats.to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()[:16]
