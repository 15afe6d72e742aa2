"""Inheritune (arXiv 2404.08634 v4 Alg. 1, §4, App. F.2): train a reference GPT, then smaller models that
inherit its first layers, grown by +2 layers per round until they match it; and the paper's baselines.

- ``train``: nanoGPT's recipe (AdamW 0.9/0.95, weight decay 0.1 on matrices, linear warmup then cosine to
  ``min_lr_ratio`` x peak, gradient clipping 1.0) on random windows drawn *with replacement* (nanoGPT
  ``get_batch``), evaluated on a fixed list of validation windows (deterministic, decision D9). The batch of
  step s is drawn from a generator seeded by (seed, s), so a resumed run sees exactly the batches it would have.
  Every run is cached (content-addressed: shape, recipe, seed, data, initialisation, code version) and
  checkpointed while it trains, so an interrupted notebook resumes.
- ``inherit``: a target with the reference's first (or last, or middle) n blocks, its token embedding and so
  its tied LM head; positions and the final LayerNorm stay fresh unless asked (the authors' code, D7).
- ``grow``: rounds of l, l + 2, ... layers, each restarted from the reference (D8), until the validation loss
  is within ``tolerance`` of the reference's (D9).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from common import __version__
from common.core import intervals
from common.core.env import cache_dir, write_json_atomic
from common.core.gpu import device
from common.core.manifest import current, record
from common.core.profiles import GPTConfig, PretrainSettings
from common.inheritune import paper
from common.inheritune.gpt import GPT

RUN_VERSION = 3


LAYER_CHOICES = ("first", "last", "middle")


def train_batch(stream: torch.Tensor, step: int, seed: int, batch_size: int, block: int) -> tuple[torch.Tensor, ...]:
    """Inputs and next-token targets [B, block] of optimizer step ``step``: random windows of ``stream``
    with replacement, from a generator seeded by (seed, step)."""
    if batch_size < 1 or block < 1:
        raise ValueError(f"batch_size={batch_size} and block={block} must be >= 1")
    if len(stream) < block + 1:
        raise ValueError(f"token stream of {len(stream)} tokens is shorter than one window of {block + 1}")
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - block, (batch_size,), generator=g)
    rows = torch.stack([stream[s:s + block + 1] for s in starts.tolist()]).long()
    return rows[:, :-1], rows[:, 1:]


def val_windows(stream: torch.Tensor, n: int, block: int, shift: bool = False) -> torch.Tensor:
    """``[n, block + 1]`` fixed, non-overlapping validation windows spread evenly over ``stream``: at i * stride
    (stride = len // n), or with ``shift`` at i * stride + stride // 2, halfway between, disjoint from the unshifted
    ones (the selection windows of ``choose_steps``)."""
    span = block + 1
    if block < 1:
        raise ValueError(f"block={block} must be >= 1 (a window is block inputs + 1 target)")
    if n < 1 or len(stream) < n * span * (2 if shift else 1):
        raise ValueError(f"validation stream of {len(stream)} tokens cannot hold {n} windows of {span}"
                         f"{' and as many between them' if shift else ''}; lower n_val or block_size")
    stride = len(stream) // n
    start = stride // 2 if shift else 0
    return torch.stack([stream[i * stride + start:i * stride + start + span] for i in range(n)]).long()


def data_digest(stream: torch.Tensor) -> str:
    """Short sha256 of a token stream (part of every cache key)."""
    return hashlib.sha256(stream.contiguous().numpy().tobytes()).hexdigest()[:16]


def lr_at(step: int, s: PretrainSettings, total: int | None = None) -> float:
    """Linear warmup over ``s.warmup`` steps, then cosine from ``s.lr`` down to ``s.min_lr_ratio * s.lr`` at
    step ``total`` (default ``s.steps``): a run of other length gets its own full schedule (D10)."""
    total = s.steps if total is None else total
    if step < 0:
        raise ValueError(f"step={step} must be >= 0 (0-based optimizer step)")
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = min(1.0, (step - s.warmup) / max(1, total - s.warmup))
    low = s.min_lr_ratio * s.lr
    return low + 0.5 * (1 + math.cos(math.pi * progress)) * (s.lr - low)


def make_optimizer(model: GPT, s: PretrainSettings) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and embeddings (dim >= 2), none on LayerNorm gains (nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": s.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=s.lr, betas=s.betas, fused=False)


@torch.no_grad()
def window_losses(model: GPT, windows: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Mean next-token cross-entropy (nats per token) of each validation window; [n], float64."""
    if windows.ndim != 2 or windows.shape[1] < 2 or len(windows) == 0 or batch_size < 1:
        raise ValueError(f"windows must be [n, T] with n >= 1 and T >= 2 (val_windows), got shape "
                         f"{tuple(windows.shape)}; batch_size={batch_size} must be >= 1")
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = []
    try:
        for start in range(0, len(windows), batch_size):
            w = windows[start:start + batch_size].to(dev)
            logits = model(w[:, :-1]).logits.float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), w[:, 1:], reduction="none")
            out.append(nll.mean(1).double().cpu())
    finally:
        model.train(was)
    return torch.cat(out)


@dataclass
class Run:
    """A finished training run: validation curve [(step, loss)], per-window final losses, throughput."""
    name: str
    n_layer: int
    steps: int
    curve: list[tuple[int, float]]
    window_losses: list[float]
    tokens_per_s: float
    seconds: float
    n_params: int
    init: dict
    path: str = ""
    shape: dict = field(default_factory=dict)  # GPTConfig.shape() of the trained model

    @property
    def val_loss(self) -> float:
        """Mean of the final per-window losses (nats per token)."""
        return sum(self.window_losses) / len(self.window_losses)

    @property
    def val_se(self) -> float:
        """Standard error of ``val_loss`` over the fixed windows (the evaluation noise, D9)."""
        return float(torch.tensor(self.window_losses, dtype=torch.float64).std() / math.sqrt(len(self.window_losses)))

    def load(self) -> GPT:
        """The trained model (eval mode, on the run's device)."""
        model = GPT(GPTConfig(**self.shape))
        load_model(model, os.path.join(self.path, "model.safetensors"))
        return model.to(device()).eval()


def _digest(key: dict) -> str:
    full = {"run_version": RUN_VERSION, "code": __version__, **key}
    return hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:16]


def _save_checkpoint(path: str, model: GPT, opt: torch.optim.Optimizer, step: int, curve: list, seconds: float) -> None:
    tmp = path + ".tmp"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "curve": curve,
                "seconds": seconds}, tmp)
    os.replace(tmp, path)


def train(name: str, model: GPT, init: dict, stream: torch.Tensor, val: torch.Tensor, s: PretrainSettings,
          seed: int = 0, steps: int | None = None, progress: Callable[[str], None] | None = None,
          data_id: dict | None = None) -> Run:
    """Train ``model`` (already initialised as ``init`` describes) for ``steps`` (default ``s.steps``) with
    the recipe ``s``, or return the cached run. Resumes from the last checkpoint of an interrupted run.
    ``data_id`` (``{"train": ..., "val": ...}`` digests) spares hashing the streams again for every run."""
    steps = s.steps if steps is None else steps
    data_id = data_id or {"train": data_digest(stream), "val": data_digest(val)}
    key = {"shape": model.config.shape(), "settings": asdict(s), "steps": steps, "seed": seed, "init": init,
           **data_id}
    final = cache_dir() / "inheritune" / _digest(key)
    if (final / "COMPLETE").exists():
        saved = json.loads((final / "run.json").read_text())
        return Run(**{**saved, "curve": [tuple(c) for c in saved["curve"]], "path": str(final)})
    work = final.parent / f"{final.name}.work"
    work.mkdir(parents=True, exist_ok=True)
    ckpt = str(work / "ckpt.pt")
    dev = device()
    model.to(dev).train()
    opt = make_optimizer(model, s)
    start, curve, seconds, last = 0, [], 0.0, None
    if os.path.exists(ckpt):
        state = torch.load(ckpt, map_location=dev, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, curve, seconds = state["step"], [tuple(c) for c in state["curve"]], state["seconds"]
    if start == 0:
        curve = [(0, float(window_losses(model, val).mean()))]
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=s.bf16)
    block = model.config.block_size
    for step in range(start, steps):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s, steps)
        for micro in range(s.grad_accum):
            x, y = train_batch(stream, step * s.grad_accum + micro, seed, s.batch_size, block)
            with autocast:
                loss = model(x.to(dev), labels=y.to(dev)).loss / s.grad_accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - t0
        done = step + 1
        if done % s.eval_interval == 0 or done == steps:
            last = window_losses(model, val)
            curve.append((done, float(last.mean())))
            if progress:
                progress(f"{name}: step {done}/{steps} val {curve[-1][1]:.4f}")
        if done % s.ckpt_interval == 0 and done < steps:
            _save_checkpoint(ckpt, model, opt, done, curve, seconds)
    losses = (window_losses(model, val) if last is None else last).tolist()  # the final step was just evaluated
    run = Run(name, model.config.n_layer, steps, curve, losses,
              tokens_per_s=steps * s.grad_accum * s.batch_size * block / max(seconds, 1e-9), seconds=seconds,
              n_params=model.n_params(), init=init, shape=model.config.shape())
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    write_json_atomic(tmp / "run.json", {k: v for k, v in asdict(run).items() if k != "path"})
    (tmp / "COMPLETE").write_text("")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    shutil.rmtree(work, ignore_errors=True)
    run.path = str(final)
    model.eval()
    return run


def choose_layers(n_ref: int, n_layers: int, which: str | Sequence[int] = "first") -> list[int]:
    """0-based reference blocks a target of ``n_layers`` takes: the first, last or middle ones, or an
    explicit list. ``n_layers`` must be below the reference's depth (the whole stack is the reference)."""
    if not 0 < n_layers < n_ref:
        raise ValueError(f"n_layers={n_layers} must be between 1 and {n_ref - 1} (the reference has {n_ref} "
                         "layers; inheriting all of them is the reference itself)")
    if not isinstance(which, str):
        idx = [int(i) for i in which]
        if len(idx) != n_layers or not all(0 <= i < n_ref for i in idx):
            raise ValueError(f"explicit layers {idx} must be {n_layers} indices in [0, {n_ref})")
        return idx
    if which == "first":
        return list(range(n_layers))
    if which == "last":
        return list(range(n_ref - n_layers, n_ref))
    if which == "middle":
        start = (n_ref - n_layers) // 2
        return list(range(start, start + n_layers))
    raise ValueError(f"unknown layer choice {which!r}; known: {', '.join(LAYER_CHOICES)} or a list of indices")


def random_init(cfg: GPTConfig, seed: int) -> tuple[GPT, dict]:
    """A freshly initialised GPT (nanoGPT init, seeded) and its ``init`` record for the cache key."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT(cfg), {"kind": "random", "seed": seed}


@torch.no_grad()
def inherit(reference: GPT, n_layers: int, which: str | Sequence[int] = "first", copy_pos_and_final_ln: bool = False,
            seed: int = 0, reference_id: str = "") -> tuple[GPT, dict]:
    """Inheritune's initialisation (Alg. 1 step 1): a ``n_layers``-deep target holding the reference's chosen
    blocks (in order), token embedding and tied LM head; everything else freshly initialised (seeded).
    ``reference_id`` (e.g. the reference run's cache path) identifies the source in the ``init`` record."""
    idx = choose_layers(reference.config.n_layer, n_layers, which)
    cfg = GPTConfig(**{**reference.config.shape(), "n_layer": n_layers})
    target, _ = random_init(cfg, seed)
    ref = reference.transformer
    target.transformer.wte.weight.copy_(ref.wte.weight)
    for new, old in enumerate(idx):
        target.transformer.h[new].load_state_dict(ref.h[old].state_dict())
    if copy_pos_and_final_ln:
        target.transformer.wpe.weight.copy_(ref.wpe.weight)
        target.transformer.ln_f.load_state_dict(ref.ln_f.state_dict())
    return target.to(next(reference.parameters()).device), {
        "kind": "inherit", "reference": reference_id, "layers": idx, "copy_pos_and_final_ln": copy_pos_and_final_ln,
        "seed": seed}


@dataclass
class Growth:
    """Inheritune's rounds (Alg. 1): one run per target depth, and whether the last one matched."""
    rounds: list[Run] = field(default_factory=list)
    tolerance: float = 0.0
    matched: bool = False

    @property
    def final(self) -> Run:
        return self.rounds[-1]


def grow(train_target: Callable[[int], Run], reference: Run, start: int, step: int = 2, tolerance: float = 0.01,
         max_rounds: int = 3) -> Growth:
    """Rounds of ``train_target(l)`` for l = start, start + step, ... (each restarted from the reference),
    until the target's validation loss is <= the reference's + ``tolerance`` or ``max_rounds`` (or the
    reference's depth) is reached."""
    if step < 1 or max_rounds < 1:
        raise ValueError(f"step={step} and max_rounds={max_rounds} must be >= 1")
    out = Growth(tolerance=tolerance)
    n = start
    while len(out.rounds) < max_rounds and n < reference.n_layer:
        run = train_target(n)
        out.rounds.append(run)
        if run.val_loss <= reference.val_loss + tolerance:
            out.matched = True
            break
        n += step
    return out


def paired_difference(a: Run, b: Run) -> tuple[float, float]:
    """Mean and standard error of the per-window loss difference a - b on the same fixed windows."""
    if len(a.window_losses) != len(b.window_losses):
        raise ValueError(f"runs {a.name!r} and {b.name!r} were evaluated on {len(a.window_losses)} and "
                         f"{len(b.window_losses)} windows; pair runs on the same validation windows")
    d = torch.tensor(a.window_losses, dtype=torch.float64) - torch.tensor(b.window_losses, dtype=torch.float64)
    return float(d.mean()), float(d.std() / math.sqrt(len(d)))


VARIANTS = ("inherit_first", "inherit_last", "inherit_middle", "random", "random_2x")


@dataclass
class Experiment:
    """Inheritune's comparison at one scale: the reference, the half-depth variants at equal steps (random
    also at twice the steps), and the growth rounds (with the stopping rule's tolerance, D9)."""
    reference: Run
    variants: dict[str, Run]
    growth: Growth

    @property
    def runs(self) -> dict[str, Run]:
        return {"reference": self.reference, **self.variants}


def reference_run(ref_cfg: GPTConfig, s: PretrainSettings, stream: torch.Tensor, val: torch.Tensor, seed: int,
                   progress: Callable[[str], None] | None, data_id: dict) -> Run:
    """The reference: ``ref_cfg`` freshly initialised (``seed``) and trained for ``s.steps`` (cached)."""
    model, init = random_init(ref_cfg, seed)
    return train("reference", model, init, stream, val, s, seed, progress=progress, data_id=data_id)


def half_depth_run(name: str, ref_cfg: GPTConfig, s: PretrainSettings, stream: torch.Tensor, val: torch.Tensor,
                    seed: int, steps: int, progress: Callable[[str], None] | None, data_id: dict) -> Run:
    """A fresh model of half the reference's depth trained for ``steps`` (cached): Table 5's "random"."""
    target, how = random_init(GPTConfig(**{**ref_cfg.shape(), "n_layer": ref_cfg.n_layer // 2}), seed)
    return train(name, target, how, stream, val, s, seed, steps=steps, progress=progress, data_id=data_id)


def run_experiment(ref_cfg: GPTConfig, s: PretrainSettings, stream: torch.Tensor, val: torch.Tensor, seed: int = 0,
                   growth_step: int = 2, max_rounds: int = 2, variants: tuple[str, ...] = VARIANTS,
                   progress: Callable[[str], None] | None = None) -> Experiment:
    """Train (or load from the cache) the reference, the ``variants`` at half its depth — ``inherit_first``
    (Inheritune's initialisation), ``inherit_last`` (lazy layers, Fig. 3), ``inherit_middle`` (Table 4),
    ``random`` at S and ``random_2x`` at 2S steps (Table 5) — and the growth rounds from the first half, each
    restarted from the reference (round 1 is ``inherit_first`` itself, read from the cache)."""
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    data_id = {"train": data_digest(stream), "val": data_digest(val)}  # hashed once for every run
    ref = reference_run(ref_cfg, s, stream, val, seed, progress, data_id)
    reference = ref.load()
    half = ref_cfg.n_layer // 2
    ref_id = os.path.basename(ref.path)

    def inherited(which: str, n_layers: int = half, name: str = "") -> Run:
        target, how = inherit(reference, n_layers, which, seed=seed, reference_id=ref_id)
        return train(name or f"inherit_{which}", target, how, stream, val, s, seed, progress=progress,
                     data_id=data_id)

    def scratch(name: str, steps: int) -> Run:
        return half_depth_run(name, ref_cfg, s, stream, val, seed, steps, progress, data_id)

    build = {"inherit_first": lambda: inherited("first"), "inherit_last": lambda: inherited("last"),
             "inherit_middle": lambda: inherited("middle"), "random": lambda: scratch("random", s.steps),
             "random_2x": lambda: scratch("random_2x", 2 * s.steps)}
    runs = {name: build[name]() for name in variants}
    tolerance = max(0.01, 2 * ref.val_se)
    growth = grow(lambda n: inherited("first", n, f"inheritune_{n}L"), ref, half, growth_step, tolerance, max_rounds)
    return Experiment(ref, runs, growth)


def _seed_mean(exps: list[Experiment], name: str) -> np.ndarray:
    """The per-window validation losses of run ``name``, averaged over the experiments' training seeds."""
    return np.mean([e.runs[name].window_losses for e in exps], axis=0)


def record_experiment(key: str, exps: Experiment | list[Experiment]) -> None:
    """Record ``<key>/inheritune/<variant>/val_loss`` (DESIGN §9) with the paper's values beside them, the
    evaluation noise, the paired differences the claims and acceptance checks read (S4, S5), and the growth rounds.
    With several experiments (one per training seed, same validation windows) every loss and difference is the
    mean over seeds, its interval the paired bootstrap over windows of the seed-averaged per-window losses, and the
    per-seed values are recorded beside it; curves and growth rounds are the first seed's."""
    exps = [exps] if isinstance(exps, Experiment) else list(exps)
    exp = exps[0]
    current().run["models"][key] = f"self-trained:inheritune/{os.path.basename(exp.reference.path)}"
    current().run.setdefault("dtypes", {})[key] = "float32"  # fp32 weights evaluated without autocast (window_losses)
    current().save()
    seeds = f"; mean over {len(exps)} training seeds" if len(exps) > 1 else ""
    window_note = f"{len(exp.reference.window_losses)} fixed validation windows; nats per token{seeds}"
    for name, run in exp.runs.items():
        value, ref = paper.VAL_LOSS.get(name, (None, None))
        losses = _seed_mean(exps, name)
        record(f"{key}/inheritune/{name}/val_loss", float(losses.mean()), paper=value,
               paper_ref=ref and f"Inheritune {ref}", ci95=intervals.mean(losses)["ci95"],
               note=f"{run.n_layer} layers, {run.steps} steps, {run.n_params:,} parameters; {window_note}; 95% "
                    "bootstrap over the windows")
        if len(exps) > 1:
            record(f"{key}/inheritune/{name}/val_loss_seeds", [e.runs[name].val_loss for e in exps],
                   note="one value per training seed")
        record(f"{key}/inheritune/{name}/curve", [list(c) for c in run.curve], note="[step, validation loss]")
        record(f"{key}/inheritune/{name}/tokens_per_s", run.tokens_per_s, note="training throughput, no evaluation",
               volatile=True)
    record(f"{key}/inheritune/eval_se", exp.reference.val_se, note="standard error of the reference's validation loss")
    for a, b in (("inherit_first", "random"), ("inherit_first", "reference"), ("inherit_first", "random_2x"),
                 ("inherit_last", "random"), ("inherit_last", "inherit_first"), ("inherit_middle", "inherit_first"),
                 ("random", "reference")):
        if a in exp.runs and b in exp.runs:
            diff = intervals.paired_difference(_seed_mean(exps, a), _seed_mean(exps, b))
            record(f"{key}/inheritune/diff/{a}-{b}", diff["value"], ci95=diff["ci95"],
                   note=f"validation loss {a} - {b}, nats per token{seeds}; 95% paired bootstrap over {diff['n']} "
                        "windows" + (" (the seeds' own spread is not in it: see /seeds)" if seeds else ""))
            if len(exps) > 1:
                record(f"{key}/inheritune/diff/{a}-{b}/seeds", [e.runs[a].val_loss - e.runs[b].val_loss for e in exps],
                       note="one difference per training seed")
    g = exp.growth
    record(f"{key}/inheritune/growth/layers", [r.n_layer for r in g.rounds], note="target depth of each round")
    record(f"{key}/inheritune/growth/val_loss", [r.val_loss for r in g.rounds],
           paper=paper.GROWTH_VAL_LOSS, paper_ref=paper.GROWTH_VAL_LOSS_REF)
    record(f"{key}/inheritune/growth/matched", g.matched,
           note=f"last round within tolerance {g.tolerance:.4f} = max(0.01, 2 x eval se) of the reference (D9)")


def _over(d: float, se: float) -> float | None:
    """``d`` in units of its standard error (None when the error is 0: identical windows)."""
    return d / se if se > 0 else None


def _curve_at(run: Run, step: int) -> float:
    """The validation loss logged closest to ``step``."""
    return min(run.curve, key=lambda c: abs(c[0] - step))[1]


def acceptance(exp: Experiment, ref_stats, target_stats) -> dict[str, float | bool | None]:
    """Research inheritune.md §5.2 on one experiment: S1-S3 on the reference's attention (``ref_stats``), S4
    and S5 on the validation losses (paired over the fixed windows; "noise" = the paired s.e.), S6 on the
    Inheritune model's attention (``target_stats``). Values are reported; only S4a is a pass criterion on CPU."""
    rank, mass = ref_stats.max_rank(), ref_stats.avg_mass()
    n = len(rank)
    last_third, first_half = slice(n - max(1, n // 3), None), slice(0, max(1, n // 2))
    out: dict[str, float | bool | None] = {
        "s1_maxrank_last_third_over_first_half": float(rank[last_third].mean() / rank[first_half].mean()),
        "s2_avgmass_last_third": float(mass[last_third].mean()),
        "s2_avgmass_first3_over_last_third": float(mass[:3].mean() / mass[last_third].mean()),
        "s3_lazy_layers": len(ref_stats.lazy_layers())}
    v, tol = exp.runs, exp.growth.tolerance
    first, rnd = v.get("inherit_first"), v.get("random")
    if first and rnd:
        d, se = paired_difference(first, rnd)
        out.update({"s4a_first_minus_random": d, "s4a_noise_se": se, "s4a_over_se": _over(d, se),
                    "s4a_first_beats_random": d < -3 * se})
    if first:
        out["s4b_first_within_tol_of_reference"] = first.val_loss <= exp.reference.val_loss + tol
        out["s4b_after_growth"] = exp.growth.matched
    if first and "random_2x" in v:
        out["s4c_first_within_tol_of_random_2x"] = first.val_loss <= v["random_2x"].val_loss + tol
    if first and rnd and "inherit_last" in v:
        last_run = v["inherit_last"]
        d, se = paired_difference(last_run, rnd)
        early = max(1, exp.reference.steps // 10)
        out.update({"s5_last_minus_random": d, "s5_over_se": _over(d, se), "s5_last_within_noise_of_random": abs(d) <= 3 * se,
                    "s5_last_minus_first": paired_difference(last_run, first)[0],
                    "s5_early_last_minus_random": _curve_at(last_run, early) - _curve_at(rnd, early),
                    "s5_early_first_minus_random": _curve_at(first, early) - _curve_at(rnd, early)})
    out["s6_lazy_share_reference"] = len(ref_stats.lazy_layers()) / n
    out["s6_lazy_share_inheritune"] = len(target_stats.lazy_layers()) / len(target_stats.max_rank())
    return out


def record_acceptance(key: str, checks: dict[str, float | bool | None]) -> None:
    """``<key>/inheritune/check/<name>`` for each reading of ``acceptance`` (research inheritune.md §5.2)."""
    for name, value in checks.items():
        record(f"{key}/inheritune/check/{name}", value, paper_ref="research inheritune.md §5.2")


def runs_frame(exp: Experiment):
    """One row per run (the variants, then the growth rounds): depth, steps, validation loss and its s.e.,
    parameters, training throughput and seconds."""
    import pandas as pd

    runs = {**exp.runs, **{f"round {r.n_layer}L": r for r in exp.growth.rounds}}
    return pd.DataFrame({name: {"layers": r.n_layer, "steps": r.steps, "val loss": round(r.val_loss, 4),
                                "± s.e.": round(r.val_se, 4), "params": f"{r.n_params:,}",
                                "tokens/s": round(r.tokens_per_s), "train s": round(r.seconds)}
                         for name, r in runs.items()}).T
