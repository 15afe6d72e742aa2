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

import contextlib
import contextvars
import hashlib
import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from safetensors.torch import load_model, save_model

from common import __version__
from common.core import profiling, progress, timeplan
from common.core.env import cache_dir, write_json_atomic
from common.core.gpu import Shape, device, local_rank
from common.core.profiles import GPTConfig, PretrainSettings
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
    frac = min(1.0, (step - s.warmup) / max(1, total - s.warmup))
    low = s.min_lr_ratio * s.lr
    return low + 0.5 * (1 + math.cos(math.pi * frac)) * (s.lr - low)


def make_optimizer(model: GPT, s: PretrainSettings) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and embeddings (dim >= 2), none on LayerNorm gains (nanoGPT); the fused
    implementation on a GPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": s.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = next(model.parameters()).device.type == "cuda"  # one kernel for all parameters on a GPU
    return torch.optim.AdamW(groups, lr=s.lr, betas=s.betas, fused=fused)


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
    step_s: float | None = None  # median seconds of an optimizer step, the first of a launch (compilation) left out
    mfu: float | None = None  # model FLOPs of a step / (step_s x the processes' dense bf16 peak); None on CPU

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


class NotCached(RuntimeError):
    """Raised by ``train`` under ``cache_only`` for a run that is not in the cache."""


_CACHE_ONLY = contextvars.ContextVar("inheritune_cache_only", default=False)


@contextlib.contextmanager
def cache_only():
    """Within this context ``train`` returns cached runs and raises ``NotCached`` instead of training (notebook 04
    on a profile whose long runs belong to ``python -m common.inheritune.pretrain``)."""
    token = _CACHE_ONLY.set(True)
    try:
        yield
    finally:
        _CACHE_ONLY.reset(token)


def _digest(key: dict) -> str:
    full = {"run_version": RUN_VERSION, "code": __version__, **key}
    return hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:16]


def _save_checkpoint(path: str, model: GPT, opt: torch.optim.Optimizer, step: int, curve: list, seconds: float) -> None:
    tmp = path + ".tmp"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "curve": curve,
                "seconds": seconds}, tmp)
    os.replace(tmp, path)


def process() -> tuple[int, int]:
    """``(rank, world size)`` of the process group a launcher started (``torchrun``, ``accelerate launch``: joined
    by ``pretrain.main``), else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_world(s: PretrainSettings, world: int) -> None:
    """Refuse a process count that cannot share the recipe's global batch (``batch_size`` x ``grad_accum`` windows)
    equally, naming the counts that can."""
    rows = s.batch_size * s.grad_accum
    if world < 1 or rows % world:
        raise ValueError(f"{world} processes cannot share a global batch of {rows} windows (batch_size "
                         f"{s.batch_size} x grad_accum {s.grad_accum}) equally; launch a number of processes that "
                         f"divides {rows}: {', '.join(str(n) for n in range(1, rows + 1) if rows % n == 0)}")


def step_batches(stream: torch.Tensor, step: int, seed: int, s: PretrainSettings, block: int, rank: int = 0,
                 world: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Process ``rank``'s micro-batches of optimizer step ``step``. The step's global batch is the same on any number
    of processes: ``s.grad_accum`` micro-batches of ``s.batch_size`` windows (micro-batch j drawn by ``train_batch``
    with index step x grad_accum + j), their rows in order; process r takes the r-th of ``world`` equal shares, in
    micro-batches of at most ``s.batch_size`` rows. One process gets exactly the micro-batches ``train_batch`` draws."""
    check_world(s, world)
    if not 0 <= rank < world:
        raise ValueError(f"rank={rank} must be in [0, {world})")
    share, bs = s.batch_size * s.grad_accum // world, s.batch_size
    lo, hi = rank * share, (rank + 1) * share
    xs, ys = [], []
    for j in range(lo // bs, (hi - 1) // bs + 1):
        x, y = train_batch(stream, step * s.grad_accum + j, seed, bs, block)
        keep = slice(max(lo - j * bs, 0), min(hi - j * bs, bs))
        xs.append(x[keep])
        ys.append(y[keep])
    return list(zip(torch.cat(xs).split(bs), torch.cat(ys).split(bs), strict=True))


def _evaluate(model: GPT, val: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """``window_losses`` of ``val``; with several processes each scores its share and all receive the whole list."""
    if world == 1:
        return window_losses(model, val)
    shard = val.tensor_split(world)[rank]
    mine = window_losses(model, shard) if len(shard) else torch.empty(0, dtype=torch.float64)
    parts: list = [None] * world
    dist.all_gather_object(parts, mine)
    return torch.cat(parts)


def compiled(net: torch.nn.Module, dev: torch.device) -> torch.nn.Module:
    """``torch.compile`` of the training module on a GPU (``REPRO_COMPILE=0`` turns it off); unchanged on CPU,
    where compiling a small model costs more than it saves and the runs stay bit-reproducible."""
    if dev.type != "cuda" or os.environ.get("REPRO_COMPILE", "1") == "0":
        return net
    return torch.compile(net)


def _cached(final) -> Run:
    saved = json.loads((final / "run.json").read_text())
    return Run(**{**saved, "curve": [tuple(c) for c in saved["curve"]], "path": str(final)})


def train(name: str, model: GPT, init: dict, stream: torch.Tensor, val: torch.Tensor, s: PretrainSettings,
          seed: int = 0, steps: int | None = None,
          data_id: dict | None = None) -> Run:
    """Train ``model`` (already initialised as ``init`` describes) for ``steps`` (default ``s.steps``) with
    the recipe ``s``, or return the cached run. Resumes from the last checkpoint of an interrupted run.
    ``data_id`` (``{"train": ..., "val": ...}`` digests) spares hashing the streams again for every run.
    Under a launcher (``process``: N processes) it trains with DDP: each process takes its share of every step's
    global batch (``step_batches``), so the run, its cache key and its data are those of one process up to float
    rounding; process 0 writes the checkpoints and the result, which the others read after a barrier."""
    steps = s.steps if steps is None else steps
    data_id = data_id or {"train": data_digest(stream), "val": data_digest(val)}
    key = {"shape": model.config.shape(), "settings": asdict(s), "steps": steps, "seed": seed, "init": init,
           **data_id}
    final = cache_dir() / "inheritune" / _digest(key)
    if (final / "COMPLETE").exists():
        return _cached(final)
    if _CACHE_ONLY.get():
        raise NotCached(f"run {name!r} ({model.config.n_layer} layers, {steps} steps, seed {seed}) is not in the cache "
                        f"{final.parent}")
    rank, world = process()
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
        curve = [(0, float(_evaluate(model, val, rank, world).mean()))]
    net = compiled(model, dev)  # compiled, then wrapped (nanoGPT's order)
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[local_rank()] if dev.type == "cuda" else None)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=s.bf16)
    block, rows = model.config.block_size, s.batch_size * s.grad_accum
    times = []
    for step in range(start, steps):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s, steps)
        micro = step_batches(stream, step, seed, s, block, rank, world)
        for i, (x, y) in enumerate(micro):
            sync = world == 1 or i == len(micro) - 1  # DDP all-reduces the gradients once, on the last micro-batch
            with contextlib.nullcontext() if sync else net.no_sync(), autocast:
                loss = net(x.to(dev), labels=y.to(dev)).loss / (rows / (len(x) * world))  # the global batch's mean
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        seconds += times[-1]
        done = step + 1
        if done % s.eval_interval == 0 or done == steps:
            last = _evaluate(model, val, rank, world)
            curve.append((done, float(last.mean())))
            if rank == 0:
                progress.report(f"train {name}", done, steps, f"val {curve[-1][1]:.4f}")
        if done % s.ckpt_interval == 0 and done < steps and rank == 0:
            _save_checkpoint(ckpt, model, opt, done, curve, seconds)
    losses = (_evaluate(model, val, rank, world) if last is None else last).tolist()  # the final step was evaluated
    model.eval()
    if rank != 0:
        dist.barrier()  # process 0 publishes the run
        return _cached(final)
    step_s = statistics.median(times[1:] or times) if times else None
    peak = profiling.peak_flops(dev)
    flops = 3 * timeplan.forward_flops(Shape.from_config(model.config), block) * rows * block  # one step
    run = Run(name, model.config.n_layer, steps, curve, losses,
              tokens_per_s=steps * rows * block / max(seconds, 1e-9), seconds=seconds,
              n_params=model.n_params(), init=init, shape=model.config.shape(), step_s=step_s,
              mfu=flops / (step_s * peak * world) if step_s and peak else None)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    write_json_atomic(tmp / "run.json", {k: v for k, v in asdict(run).items() if k != "path"})
    (tmp / "COMPLETE").write_text("")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    shutil.rmtree(work, ignore_errors=True)
    if world > 1:
        dist.barrier()
    run.path = str(final)
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
                   data_id: dict) -> Run:
    """The reference: ``ref_cfg`` freshly initialised (``seed``) and trained for ``s.steps`` (cached)."""
    model, init = random_init(ref_cfg, seed)
    return train("reference", model, init, stream, val, s, seed, data_id=data_id)


def half_depth_run(name: str, ref_cfg: GPTConfig, s: PretrainSettings, stream: torch.Tensor, val: torch.Tensor,
                    seed: int, steps: int, data_id: dict) -> Run:
    """A fresh model of half the reference's depth trained for ``steps`` (cached): Table 5's "random"."""
    target, how = random_init(GPTConfig(**{**ref_cfg.shape(), "n_layer": ref_cfg.n_layer // 2}), seed)
    return train(name, target, how, stream, val, s, seed, steps=steps, data_id=data_id)


def run_experiment(ref_cfg: GPTConfig, s: PretrainSettings, stream: torch.Tensor, val: torch.Tensor, seed: int = 0,
                   growth_step: int = 2, max_rounds: int = 2, variants: tuple[str, ...] = VARIANTS) -> Experiment:
    """Train (or load from the cache) the reference, the ``variants`` at half its depth — ``inherit_first``
    (Inheritune's initialisation), ``inherit_last`` (lazy layers, Fig. 3), ``inherit_middle`` (Table 4),
    ``random`` at S and ``random_2x`` at 2S steps (Table 5) — and the growth rounds from the first half, each
    restarted from the reference (round 1 is ``inherit_first`` itself, read from the cache)."""
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    data_id = {"train": data_digest(stream), "val": data_digest(val)}  # hashed once for every run
    ref = reference_run(ref_cfg, s, stream, val, seed, data_id)
    reference = ref.load()
    half = ref_cfg.n_layer // 2
    ref_id = os.path.basename(ref.path)

    def inherited(which: str, n_layers: int = half, name: str = "") -> Run:
        target, how = inherit(reference, n_layers, which, seed=seed, reference_id=ref_id)
        return train(name or f"inherit_{which}", target, how, stream, val, s, seed, data_id=data_id)

    def scratch(name: str, steps: int) -> Run:
        return half_depth_run(name, ref_cfg, s, stream, val, seed, steps, data_id)

    build = {"inherit_first": lambda: inherited("first"), "inherit_last": lambda: inherited("last"),
             "inherit_middle": lambda: inherited("middle"), "random": lambda: scratch("random", s.steps),
             "random_2x": lambda: scratch("random_2x", 2 * s.steps)}
    runs = {name: build[name]() for name in variants}
    tolerance = max(0.01, 2 * ref.val_se)
    growth = grow(lambda n: inherited("first", n, f"inheritune_{n}L"), ref, half, growth_step, tolerance, max_rounds)
    return Experiment(ref, runs, growth)
