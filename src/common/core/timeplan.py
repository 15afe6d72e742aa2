"""The time planner (issue 21), beside the memory planner (``gpu.notebook_plan``): from a profile's configs and
its models' shapes, the model FLOPs of every notebook's work and of each long training, and the hours they take
at a stated MFU on a named GPU, on one GPU or on N.

FLOPs follow PaLM (Chowdhery et al. 2022, App. B), as ``profiling`` does: a forward token costs ``2 N + 4 L d T``
(``N`` matmul parameters, the LM head included; ``d`` the attention width; ``T`` the sequence length, no causal
discount); training costs three forward passes (forward, and a backward of twice its cost); LoRA with gradient
checkpointing also costs three (the forward again, and a backward that skips the frozen weights' gradients).
Zero-shot tokens are lm-eval's requests (context + continuation, unpadded) at their mean length.

What it leaves out, and the MFU absorbs: padding, model loading, tokenising, host work (SFSD's float64
eigendecompositions, the searches' bookkeeping) and evaluation during training (``eval_interval``). The MFU
assumed for each kind of work (``MFU``) is a planning figure, not a measurement: ``make gpu-check`` measures one
training step of the GPT-2-medium recipe on the GPU it runs on and reports it next to this planner's prediction.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from common.core.gpu import Shape, task_requests
from common.core.profiling import PEAK_BF16_TFLOPS

#: Dense bf16 peak FLOP/s of the GPUs the planner names: ``profiling``'s table (vendor figures, SXM parts).
PEAK = {chip.lower(): PEAK_BF16_TFLOPS[chip] * 1e12 for chip in ("H100", "H200", "A100")}

#: Model-FLOPs utilisation assumed per kind of work: pre-training a GPT (issue 21's target for the GPT-2-medium
#: recipe with compile, fused AdamW, bf16 and SDPA), LoRA / DoRA fine-tuning with gradient checkpointing, and
#: evaluation (perplexity and zero-shot batches, padded).
MFU = {"train": 0.40, "finetune": 0.30, "eval": 0.25}

#: Share of N GPUs' speed a data-parallel launch keeps (gradient all-reduce, stragglers).
DP_EFFICIENCY = 0.90

#: Mean tokens of one alpaca-gpt4 training example (instruction, input, GPT-4 answer and the chat template; an
#: estimate: GPT-4's answers run to ~200 words, not measured here, no hub) and the number of examples.
ALPACA_TOKENS, ALPACA_EXAMPLES = 300, 52_002

#: MacDrop's Fig. 6 dropout scopes (``hoc.finetune.SCOPES``; this bottom layer cannot import it, a test compares).
GRID_SCOPES = 3

DAY, LONG = "day", "long"  # the one-GPU tier of `make reproduce PROFILE=paper`, and the long runs' own targets


@dataclass(frozen=True)
class Job:
    """One piece of a notebook's work: its FLOPs, the kind of work (an ``MFU`` key), its tier, and the command
    that runs it on N GPUs (long runs; the day tier runs in the notebooks, one process)."""
    notebook: str
    name: str
    model: str
    flops: float
    kind: str
    tier: str = DAY
    launch: str = ""

    def command(self, n_gpus: int | str) -> str:
        """``launch`` with its process count ``N`` filled in."""
        return re.sub(r"\bN\b", str(n_gpus), self.launch)

    def hours(self, gpu: str, n_gpus: int = 1) -> float:
        """Expected hours on ``n_gpus`` of ``gpu`` (a ``PEAK`` key); only long runs use more than one GPU."""
        if gpu not in PEAK:
            raise ValueError(f"unknown GPU {gpu!r}; known: {', '.join(PEAK)}")
        if n_gpus < 1:
            raise ValueError(f"n_gpus={n_gpus} must be >= 1")
        n = n_gpus if self.tier == LONG else 1
        speed = PEAK[gpu] * MFU[self.kind] * n * (DP_EFFICIENCY if n > 1 else 1.0)
        return self.flops / speed / 3600


def matmul_params(shape: Shape) -> int:
    """Parameters that take part in a matmul: every projection of every layer and the LM head (not the embedding
    lookup)."""
    return shape.layers * sum(m * n for m, n in shape.projections) + shape.vocab * shape.hidden


def forward_flops(shape: Shape, seq: int) -> float:
    """FLOPs of one forward token at sequence length ``seq``: ``2 N + 4 L d T`` (module docstring)."""
    if seq < 1:
        raise ValueError(f"seq must be >= 1, got {seq}")
    return 2.0 * matmul_params(shape) + 4.0 * shape.layers * shape.heads * shape.head_dim * seq


def task_tokens(tasks: tuple[str, ...], n_items) -> int:
    """Tokens of the zero-shot requests of ``tasks`` (``n_items`` as ``gpu.task_requests`` reads it)."""
    return int(sum(reqs * mean for reqs, mean, _ in task_requests(tasks, n_items)))


def _eval(notebook: str, name: str, model: str, shape: Shape, tokens: float, seq: int) -> Job:
    return Job(notebook, name, model, tokens * forward_flops(shape, seq), "eval")


def jobs_massive(cfg, shapes: dict[str, Shape]) -> list[Job]:
    """Notebook 01: one capture pass over the windows of each model (the prompts are a few hundred tokens)."""
    return [_eval(cfg.notebook, "capture", key, shapes[key], cfg.n_windows * cfg.window_len, cfg.window_len)
            for key in cfg.models]


#: Notebook 02's evaluations per model (``ablation.table1_rows``): base, zero top-k, keep top-k and the first
#: random seed with the tasks; the other random seeds and the circuit attacks with perplexity only (at most 6).
TABLE1_TASK_ROWS, PERPLEXITY_ROWS = 4, 8


def jobs_ablation(cfg, shapes: dict[str, Shape]) -> list[Job]:
    """Notebook 02: Table 1's rows and the circuit attacks on each model; Fig. 4's sweep (zero and keep-only with
    the sweep tasks, random with perplexity) on ``sweep_model``."""
    ppl = cfg.n_windows * cfg.window_len
    out = []
    for key in cfg.models:
        tokens = (TABLE1_TASK_ROWS + PERPLEXITY_ROWS) * ppl + TABLE1_TASK_ROWS * task_tokens(cfg.tasks, cfg.n_items)
        out.append(_eval(cfg.notebook, "Table 1 + circuit", key, shapes[key], tokens, cfg.window_len))
    if cfg.sweep_model:
        k = len(cfg.k_grid)
        tokens = 3 * k * ppl + 2 * k * task_tokens(cfg.sweep_tasks, cfg.sweep_n_items)
        out.append(_eval(cfg.notebook, "Fig. 4 k-sweep", cfg.sweep_model, shapes[cfg.sweep_model], tokens,
                         cfg.window_len))
    return out


def _finetune(cfg, name: str, key: str, shape: Shape, settings, n_train: int, tier: str, launch: str) -> Job:
    tokens = n_train * ALPACA_TOKENS * settings.epochs
    return Job(cfg.notebook, name, key, 3 * tokens * forward_flops(shape, ALPACA_TOKENS), "finetune", tier, launch)


def _score(cfg, key: str, shape: Shape, arms: int, tasks: tuple[str, ...]) -> Job:
    """Held-out loss and zero-shot tasks of ``arms`` fine-tuned arms, each plain and under the top-3 attack."""
    tokens = 2 * arms * (cfg.n_val * ALPACA_TOKENS + task_tokens(tasks, cfg.n_items))
    return _eval(cfg.notebook, f"score {arms} arms", key, shape, tokens, ALPACA_TOKENS)


def grid_jobs(cfg, shape: Shape) -> list[Job]:
    """Notebook 03's Table 5 / Fig. 6 grids on ``cfg.grid_model`` (of ``shape``): its fine-tunes (schedule kinds
    x p0s, scopes x ps; the LoRA baseline is a main arm) and their scoring."""
    grid = len(cfg.grid_kinds) * len(cfg.grid_p0s) + GRID_SCOPES * len(cfg.scope_ps)
    key, n_train = cfg.grid_model, cfg.n_train or ALPACA_EXAMPLES
    one = _finetune(cfg, "", key, shape, cfg.grid_settings, n_train, LONG, "")
    score = _score(cfg, key, shape, grid, cfg.grid_tasks)
    return [Job(cfg.notebook, f"Table 5 / Fig. 6 grid ({grid} fine-tunes)", key, grid * one.flops, "finetune", LONG,
                f"accelerate launch --num_processes N -m common.hoc.finetune --profile {cfg.profile} --grid"),
            Job(cfg.notebook, f"score the grid ({grid} arms)", key, score.flops, "eval", LONG,
                f"make macdrop-score PROFILE={cfg.profile} GRID=1 GPUS=N")]


def jobs_finetune(cfg, shapes: dict[str, Shape]) -> list[Job]:
    """Notebook 03: each main arm's fine-tune (tier ``day``) and its scoring; the Table 5 / Fig. 6 grids on
    ``grid_model`` (schedule kinds x p0s, scopes x ps; the LoRA baseline is a main arm), a long run of their own
    (``make macdrop-grid``; the notebook scores them with ``FULL_GRID = True``)."""
    n_train = cfg.n_train or ALPACA_EXAMPLES
    out = []
    for key, arms, seeds in cfg.runs:
        for arm in arms:
            for seed in seeds:
                cmd = (f"accelerate launch --num_processes N -m common.hoc.finetune --profile {cfg.profile} "
                       f"--model {key} --arm {arm} --seed {seed}")
                out.append(_finetune(cfg, f"fine-tune {arm} seed {seed}", key, shapes[key], cfg.settings, n_train,
                                     DAY, cmd))
        out.append(_score(cfg, key, shapes[key], len(arms) * len(seeds) + 1, cfg.tasks))  # + the base model
    if cfg.grid_model:
        out += grid_jobs(cfg, shapes[cfg.grid_model])
    return out


def pretraining(cfg) -> Job:
    """Notebook 04's long run: per training seed, the reference for S steps, the five half-depth variants
    (random_2x at 2S) and the growth rounds beyond the first (``max_rounds`` - 1 rounds of +``growth_step``
    layers, each S steps)."""
    ref, s = cfg.reference, cfg.train
    tokens = s.steps * s.batch_size * s.grad_accum * ref.block_size

    def run(layers: int, steps_x: int = 1) -> float:
        shape = Shape.from_config(type(ref)(**{**ref.shape(), "n_layer": layers}))
        return 3 * steps_x * tokens * forward_flops(shape, ref.block_size)

    half = ref.n_layer // 2
    growth = [n for n in (half + cfg.growth_step * r for r in range(1, cfg.max_rounds)) if n < ref.n_layer]
    flops = run(ref.n_layer) + 4 * run(half) + run(half, 2) + sum(run(n) for n in growth)
    return Job(cfg.notebook, f"pre-training: reference {ref.n_layer}L, 5 variants {half}L, growth {growth}, "
                             f"{cfg.n_seeds} seed(s)", "gpt", cfg.n_seeds * flops, "train", LONG,
               f"torchrun --standalone --nproc_per_node N -m common.inheritune.pretrain --profile {cfg.profile}")


def jobs_inheritune(cfg, shapes: dict[str, Shape]) -> list[Job]:
    """Notebook 04: the attention analysis of the pretrained models (tier ``day``), and ``pretraining``: a long
    run where the profile leaves it to the launcher (``train_in_notebook`` False), else the notebook's own work."""
    out = [_eval(cfg.notebook, "attention analysis", key, shapes[key], cfg.n_windows * cfg.window_len, cfg.window_len)
           for key in cfg.models]
    train = pretraining(cfg)
    return [*out, train if not cfg.train_in_notebook else replace(train, tier=DAY)]


def jobs_lowrank(cfg, shapes: dict[str, Shape]) -> list[Job]:
    """Notebook 05, per model: calibration, perplexity of every method x budget (and dense), zero-shot on the
    dense model and the accuracy budgets; on ``search_model`` the perplexity search (every module, a linear scan of
    up to 11 ranks: half on average, over half the layers thanks to the cached prefix) and the task search."""
    out = []
    for key in cfg.models:
        s = shapes[key]
        cells = len(cfg.methods) * len(cfg.pcts) + 1
        acc_cells = 1 + len(cfg.methods) * len(cfg.acc_pcts if cfg.acc_pcts is not None else cfg.pcts)
        tokens = (cfg.calib_windows * cfg.calib_len + cells * cfg.eval_windows * cfg.eval_len
                  + (acc_cells * task_tokens(cfg.tasks, cfg.n_items) if cfg.tasks else 0))
        out.append(_eval(cfg.notebook, "uniform budgets", key, s, tokens, cfg.eval_len))
    if cfg.search_model:
        s = shapes[cfg.search_model]
        modules = s.layers * len(s.projections)
        tokens = modules * 6 * 0.5 * cfg.search_windows * cfg.search_len
        if cfg.task:
            tokens += modules * 6 * 0.5 * 0.2 * task_tokens((cfg.task,), cfg.task_items)
        out.append(_eval(cfg.notebook, "surgical searches", cfg.search_model, s, tokens, cfg.search_len))
    return out


def jobs_synthesis(cfg, shapes: dict[str, Shape]) -> list[Job]:
    """Notebook 06: per model, the sink / ablation, mean-term and MacDrop-under-compression passes over the
    windows (a few passes each: 10 in all, with the random seeds' controls)."""
    passes = 10 + 2 * len(cfg.random_seeds)
    return [_eval(cfg.notebook, "synthesis passes", key, shapes[key], passes * cfg.n_windows * cfg.window_len,
                  cfg.window_len) for key in cfg.models]


JOBS: dict[str, Callable[..., list[Job]]] = {
    "01_massive_activation_origin": jobs_massive, "02_massive_weight_ablation": jobs_ablation,
    "03_macdrop_finetuning": jobs_finetune, "04_attention_degeneration_inheritune": jobs_inheritune,
    "05_lowrank_decomposition": jobs_lowrank, "06_synthesis": jobs_synthesis}


def detected() -> tuple[str, int]:
    """The visible GPUs as a ``PEAK`` key and their count; ``("h200", 1)`` without a GPU the planner knows."""
    if not torch.cuda.is_available():
        return "h200", 1
    name = torch.cuda.get_device_name(0).lower()
    return next((g for g in PEAK if g in name), "h200"), torch.cuda.device_count()


def estimate(job: Job, gpu: str | None = None, n_gpus: int | None = None) -> str:
    """One line a long run prints before it starts: its FLOPs and the planner's hours on this hardware."""
    found = detected()
    gpu, n = gpu or found[0], n_gpus or found[1]
    return (f"time plan: {job.name}: {job.flops / 1e15:,.0f} PFLOP, about {job.hours(gpu, n):,.1f} h on {n} "
            f"{gpu.upper()} at {MFU[job.kind]:.0%} MFU (common.core.timeplan; `make plan` for the rest)")


def notebook_jobs(cfg, shapes: dict[str, Shape]) -> list[Job]:
    """The jobs of ``cfg.notebook`` under its config, for models of ``shapes``."""
    if cfg.notebook not in JOBS:
        raise ValueError(f"no time planner for notebook {cfg.notebook!r}; known: {', '.join(JOBS)}")
    return JOBS[cfg.notebook](cfg, shapes)
