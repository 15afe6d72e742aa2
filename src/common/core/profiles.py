"""Profiles as data (DESIGN §2): one frozen dataclass per notebook per profile (``smoke`` / ``small`` /
``paper``), and the random-weight dry-run overrides. Nothing else in the library branches on the profile
name: code reads fields of the config. ``REPRO_PROFILE`` overrides the notebook's ``PROFILE`` literal (CI
runs nbval on ``smoke`` that way); ``REPRO_MODEL`` puts your own model in notebooks 01, 02, 04 and 05
(``common.core.user_model``). ``GPTConfig`` (the shape of Inheritune's GPT) lives here because
notebook 04's profiles are built from it; ``common.inheritune.gpt`` builds the model."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from common import REPO_ROOT
from common.core import user_model
from common.core.env import random_weights


@dataclass(unsafe_hash=True)
class GPTConfig:
    """Shape of a GPT. ``_attn_implementation`` is run-time state of the model's own copy (``GPT`` copies
    the config it is given), not part of the shape, its hash or its digest."""
    n_layer: int = 8
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    vocab_size: int = 256
    scale_attn_by_inverse_layer_idx: bool = True
    model_type: str = field(default="nanogpt", init=False)
    _attn_implementation: str = field(default="sdpa", compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head}")
        if min(self.n_layer, self.n_head, self.n_embd, self.block_size, self.vocab_size) < 1:
            raise ValueError(f"every size must be >= 1: {self.shape()}")

    def shape(self) -> dict:
        """The fields that define the model (what caches and checkpoints are keyed on)."""
        d = asdict(self)
        d.pop("_attn_implementation")
        d.pop("model_type")
        return d


PROFILE_NAMES = ("smoke", "small", "paper")


#: Fixed prompt set for massive-weight detection (recorded in every manifest). "Summer is warm. Winter
#: is cold." is SunMA's and HoC's probe sentence; the others vary the first word, which matters for
#: models that add no BOS token (house_of_cards.md §1.3, DESIGN §4).
DETECTION_PROMPTS = (
    "Summer is warm. Winter is cold.",
    "I went to the market yesterday and bought some bread.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The capital of France is Paris.",
    "In 1969, humans walked on the Moon for the first time.",
    "A dog is a loyal companion and a good friend.",
    "Mathematics is the study of numbers, shapes and patterns.",
    "Music has been part of human culture for thousands of years.",
)


@dataclass(frozen=True)
class NotebookConfig:
    """Fields every notebook config has; ``setup`` fills them in."""
    notebook: str = ""
    profile: str = ""
    seed: int = 0
    dry_run: bool = False  # REPRO_WEIGHTS=random: random weights, DRY_RUNS overrides (never committed)
    user_model: str = ""  # REPRO_MODEL: the key of your own model, which replaces the profile's (never committed)

    @property
    def run_name(self) -> str:
        """``<profile>``, or ``<profile>-dryrun`` under the random-weight dry run."""
        return _run_name(self.profile, self.dry_run)

    @property
    def out_dir(self) -> Path:
        """Where figures and the manifest go: committed ``figures/`` except for ``smoke``, dry runs and your own
        model (``figures/user/<slug>/<run_name>/``, git-ignored)."""
        if self.user_model:
            return user_model.out_root(self.user_model, self.run_name) / self.notebook
        scratch = self.profile == "smoke" or self.dry_run
        root = REPO_ROOT / "build" / "figures" if scratch else REPO_ROOT / "figures"
        return root / self.run_name / self.notebook


@dataclass(frozen=True)
class CorpusConfig(NotebookConfig):
    """Models, detection prompts and the corpus windows that several notebooks share."""
    models: tuple[str, ...] = ()
    prompts: tuple[str, ...] = DETECTION_PROMPTS
    corpus: str = "wiki"
    n_windows: int = 8
    window_len: int = 256
    batch_size: int = 4


@dataclass(frozen=True)
class MassiveOriginConfig(CorpusConfig):
    """Notebook 01 (HoC §2.2 / SunMA §2): detection with the top-k channels."""
    top_k: int = 5


@dataclass(frozen=True)
class AblationConfig(CorpusConfig):
    """Notebook 02 (HoC Table 1, Fig. 4; SunMA Table 3): attacks, evaluation tasks and the k-sweep."""
    k: int = 5
    seeds: tuple[int, ...] = (0, 1, 2)
    tasks: tuple[str, ...] = ()
    n_items: int | Mapping[str, int] | None = 50  # per task (or a count per task); None: every item (paper tasks)
    sweep_model: str = ""
    k_grid: tuple[int, ...] = (0, 1, 2, 3, 5, 10, 20, 30, 50, 100)
    sweep_tasks: tuple[str, ...] = ()
    sweep_n_items: int | Mapping[str, int] = 25
    eval_batch_size: int = 4  # lm-eval requests per forward (the perplexity windows: batch_size)


@dataclass(frozen=True)
class TrainSettings:
    """PEFT fine-tuning hyper-parameters (HoC App. A Table 6; LLaMA-Factory defaults for what the paper
    leaves unstated, research §6.10). ``grad_accum`` is per process: the paper's effective batch of 256 is
    8 GPUs x 8 x 4; on one GPU use 32."""
    rank: int = 16
    alpha: int = 16
    dropout: float = 0.0
    lr: float = 1e-4
    epochs: int = 3
    batch_size: int = 8
    grad_accum: int = 4
    max_len: int = 1024
    warmup_ratio: float = 0.05
    scheduler: str = "cosine"
    weight_decay: float = 0.0
    save_steps: int = 50
    gradient_checkpointing: bool = False
    bf16: bool = False  # bf16 mixed precision (GPU); fp32 otherwise


@dataclass(frozen=True)
class MacDropConfig(NotebookConfig):
    """Notebook 03 (HoC §4, Tables 3–5, Fig. 6): which arms to fine-tune on which model with which seeds,
    the instruction data, the evaluation, and the opt-in schedule / scope grids."""
    runs: tuple[tuple[str, tuple[str, ...], tuple[int, ...]], ...] = ()  # (model, arms, seeds)
    prompts: tuple[str, ...] = DETECTION_PROMPTS
    corpus: str = "wiki"  # instruction data (data.instruction_pairs)
    n_train: int | None = 96  # None: every pair
    n_val: int = 32
    settings: TrainSettings = TrainSettings()
    k: int = 5  # massive channels MacDrop drops (HoC: k = 5)
    k_attack: int = 3  # channels zeroed by the Table 4 attack (HoC: top-3)
    tasks: tuple[str, ...] = ()
    n_items: int | Mapping[str, int] | None = 20
    loss_only: tuple[str, ...] = ()  # models scored by held-out loss only (no zero-shot tasks)
    batch_size: int = 8
    full_grid: bool = False  # run the Table 5 / Fig. 6 grids (the notebook's FULL_GRID also turns them on)
    grid_model: str = ""
    grid_settings: TrainSettings = TrainSettings()
    grid_tasks: tuple[str, ...] = ()  # zero-shot tasks of the grid arms (() = held-out loss only)
    grid_kinds: tuple[str, ...] = ("step", "epoch_before", "epoch_after", "exp")
    grid_p0s: tuple[float, ...] = (0.2, 0.5, 0.8, 1.0)
    scope_ps: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.85, 0.95)


@dataclass(frozen=True)
class PretrainSettings:
    """Training recipe of the GPTs Inheritune trains from scratch (inheritune.md §2.4, App. F.2): AdamW
    (0.9, 0.95), weight decay 0.1, linear warmup then cosine to ``min_lr_ratio`` x ``lr``, clip 1.0; a step is
    ``grad_accum`` micro-batches of ``batch_size`` windows; ``n_val`` fixed validation windows (D9)."""
    steps: int = 600
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 60
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_interval: int = 50
    ckpt_interval: int = 100
    n_val: int = 128
    bf16: bool = False  # bf16 autocast (GPU)


@dataclass(frozen=True)
class InherituneConfig(CorpusConfig):
    """Notebook 04. Part 1 (Inheritune §2, Fig. 1/10/14): attention metrics of ``models`` on ``n_windows``
    windows of ``window_len`` (T) tokens. Part 2 (Alg. 1, Tables 4-5, Fig. 3): a ``reference`` GPT trained on
    ``train_corpus`` with ``tokenizer``, then targets of ``reference.n_layer // 2`` layers."""
    tau: float = 0.9
    eta: float = 0.9
    taus: tuple[float, ...] = (0.8, 0.85, 0.9, 0.95)  # Fig. 10's sweep
    example_model: str = ""  # whose early and lazy attention maps are drawn (Fig. 9)
    tokenizer: str = "byte"
    train_corpus: str = "wiki"
    reference: GPTConfig = GPTConfig()
    train: PretrainSettings = PretrainSettings()
    growth_step: int = 2
    max_rounds: int = 2
    n_analysis: int = 32  # validation windows the self-trained GPTs' attention is measured on
    n_seeds: int = 1  # training seeds seed, seed + 1, ...: each trains the reference, the variants and the growth rounds
    # issue 20: S = the first of these step counts at which the reference beats a fresh half-depth model by more than
    # steps_margin nats (95% interval, selection windows; inheritune.steps.choose_steps); () keeps train.steps
    steps_schedule: tuple[int, ...] = ()
    steps_margin: float = 0.02
    # issue 21: False leaves the training to `python -m common.inheritune.pretrain` (the paper profile's long run,
    # on N GPUs): the notebook then reads the runs from the cache, or skips its training sections until they are there
    train_in_notebook: bool = True


@dataclass(frozen=True)
class LowRankConfig(NotebookConfig):
    """Notebook 05 (SFSD, arXiv 2405.13039): uniform budgets on ``models``; spectra, the mean-compensation
    diagnosis and both surgical searches on ``search_model``. Calibration: ``calib_windows`` x ``calib_len``
    tokens of the train split (paper: 512 x 128); perplexity: ``eval_windows`` x ``eval_len`` held-out
    tokens; the perplexity search scores ``search_windows`` x ``search_len`` held-out windows disjoint
    from those; the task search splits ``task_items`` docs of ``task`` into 3 chunks of ``chunk`` each,
    the 20% search split and the 80% test split (§1.7). Table A's accuracy: ``tasks`` with ``n_items`` (a count,
    or one per task) at the budgets ``acc_pcts`` (None: all ``pcts``) and on the dense model."""
    models: tuple[str, ...] = ()
    search_model: str = ""
    corpus: str = "wiki"
    calib_windows: int = 64
    calib_len: int = 128
    eval_windows: int = 8
    eval_len: int = 256
    batch_size: int = 8
    pcts: tuple[int, ...] = (100, 90, 80, 70, 60, 50)
    methods: tuple[str, ...] = ("weight_svd", "feature", "feature_nomean", "feature_uncentred")
    tasks: tuple[str, ...] = ()
    n_items: int | Mapping[str, int] | None = 20
    acc_pcts: tuple[int, ...] | None = None  # budgets scored on the tasks besides the dense model (None: every pct)
    tolerance: float = 1.005
    scan: str = "linear"  # "bisect": ~4 candidates a module instead of up to 10 (assumes monotone ppl)
    search_windows: int = 8
    search_len: int = 128
    task: str = ""
    task_items: int = 300
    chunk: float = 0.0666
    delta: float = 0.0
    task_layers: int | None = None  # search only the last N layers (None: every unprotected layer)
    cache_every: int = 1  # task search: cache every k-th searched layer's inputs (host memory / k, <= k-1 more layers a candidate)


@dataclass(frozen=True)
class SynthesisConfig(NotebookConfig):
    """Notebook 06 (issue 8): sinks and the ablation on ``models`` (``n_windows`` x ``window_len`` held-out
    tokens, notebook 04's tau / eta); the low-rank experiments on notebook 05's search model, from its
    cached decompositions (``compress_pcts``: budgets of the massive layer, pct of kappa; ``mean_pct``:
    the mean-term experiment's uniform budget); the MacDrop experiment on notebook 03's adapters of
    ``macdrop_arms`` (every seed notebook 03 trained). ``k``: massive rows zeroed or kept exact."""
    models: tuple[str, ...] = ()
    corpus: str = "wiki"
    n_windows: int = 16
    window_len: int = 100
    batch_size: int = 8
    k: int = 5
    random_seeds: tuple[int, ...] = (0, 1, 2)
    compress_pcts: tuple[int, ...] = (50, 25, 10)
    mean_pct: int = 80
    macdrop_arms: tuple[str, ...] = ("lora", "lora_macdrop")
    macdrop_pcts: tuple[int, ...] = (50, 25)


# Fine-tuning on the small profile: ~36 optimizer steps per run on 2 CPU cores, so the learning rate is 10x
# the paper's (which trains 579 steps); recorded.
_SMALL_TRAIN = TrainSettings(lr=1e-3, epochs=3, batch_size=8, grad_accum=1, max_len=96, save_steps=12)


_SMOKE_TRAIN = TrainSettings(lr=1e-3, epochs=2, batch_size=4, grad_accum=2, max_len=128, save_steps=2)


_PAPER_TRAIN = TrainSettings(grad_accum=32, gradient_checkpointing=True, bf16=True, save_steps=50)


# Issue 20's power on `small`: >= 500 paired items per accuracy comparison (the commonsense task has 60 items:
# all of them), >= 5 fine-tuning seeds
_POWERED_ITEMS_4 = {"wiki_mc": 150, "wiki_topic": 150, "wiki_cloze": 150, "commonsense": 60}
_POWERED_ITEMS_5 = {"wiki_mc": 150, "wiki_yesno": 150, "wiki_topic": 150, "wiki_cloze": 150, "commonsense": 60}
_FIVE_SEEDS = (0, 1, 2, 3, 4)


PROFILES: dict[str, dict[str, NotebookConfig]] = {
    "smoke": {
        "01_massive_activation_origin": MassiveOriginConfig(
            models=("tiny-llama", "tiny-gpt2"), corpus="synthetic", n_windows=4, window_len=64),
        "02_massive_weight_ablation": AblationConfig(
            models=("tiny-llama", "tiny-gpt2"), corpus="synthetic", n_windows=4, window_len=64,
            tasks=("commonsense",), n_items=8, sweep_model="tiny-llama", k_grid=(0, 1, 2, 5, 10),
            sweep_tasks=("commonsense",), sweep_n_items=8),
        "03_macdrop_finetuning": MacDropConfig(
            runs=(("tiny-llama", ("lora", "lora_macdrop"), (0, 1)), ("tiny-llama", ("dora", "dora_macdrop"), (0,))),
            corpus="synthetic", n_train=16, n_val=8, settings=_SMOKE_TRAIN, tasks=("commonsense",), n_items=8,
            batch_size=4, full_grid=True, grid_model="tiny-llama", grid_settings=_SMOKE_TRAIN, grid_p0s=(1.0,),
            scope_ps=(0.5,)),
        "04_attention_degeneration_inheritune": InherituneConfig(
            models=("tiny-llama", "tiny-gpt2"), corpus="synthetic", n_windows=4, window_len=32, batch_size=4,
            taus=(0.8, 0.9), example_model="tiny-llama", train_corpus="synthetic",
            reference=GPTConfig(n_layer=4, n_head=2, n_embd=32, block_size=32),
            train=PretrainSettings(steps=30, batch_size=8, lr=3e-3, warmup=5, eval_interval=10, n_val=16),
            max_rounds=1, n_analysis=8, steps_schedule=(15, 30)),
        "05_lowrank_decomposition": LowRankConfig(
            models=("tiny-llama", "tiny-gpt2"), search_model="tiny-llama", corpus="synthetic", calib_windows=8,
            calib_len=32, eval_windows=4, eval_len=32, batch_size=4, pcts=(100, 80, 50), tasks=("commonsense",),
            n_items={"commonsense": 8}, acc_pcts=(80,), search_windows=4, search_len=32, task="commonsense", task_items=60, task_layers=1),
        "06_synthesis": SynthesisConfig(models=("tiny-llama", "tiny-gpt2"), corpus="synthetic", n_windows=4,
                                        window_len=32, batch_size=4, k=2, random_seeds=(0,), compress_pcts=(50, 25)),
    },
    "small": {
        "01_massive_activation_origin": MassiveOriginConfig(
            models=("smollm2-135m", "qwen2.5-0.5b", "gemma3-270m"), corpus="wiki", n_windows=8, window_len=256),
        # 32 windows: the perplexity ratios' intervals are a paired bootstrap over windows (issue 20). Accuracy
        # (issue 20: >= 500 paired items a comparison): 150 items of each wiki task and all 60 commonsense items,
        # 510 when a model's constant wiki_yesno answers drop it; the sweep 440 + 60 = 500 items at 7 values of k
        "02_massive_weight_ablation": AblationConfig(
            models=("smollm2-135m", "qwen2.5-0.5b", "gemma3-270m"), corpus="wiki", n_windows=32, window_len=256,
            tasks=("wiki_mc", "wiki_yesno", "wiki_topic", "wiki_cloze", "commonsense"), n_items=_POWERED_ITEMS_5,
            sweep_model="smollm2-135m", k_grid=(0, 1, 2, 3, 5, 10, 50), sweep_tasks=("wiki_mc", "commonsense"),
            sweep_n_items={"wiki_mc": 440, "commonsense": 60}),
        # wiki_yesno is left out: SmolLM2 and Gemma answer "no" throughout (notebook 02), so it cannot move.
        # Issue 20: 5 seeds per arm, 256 held-out pairs, 510 zero-shot items (150 per wiki task + all 60 commonsense)
        "03_macdrop_finetuning": MacDropConfig(
            runs=(("smollm2-135m", ("lora", "lora_macdrop"), _FIVE_SEEDS),
                  ("smollm2-135m", ("dora", "dora_macdrop"), _FIVE_SEEDS),
                  ("gemma3-270m", ("lora", "lora_macdrop"), _FIVE_SEEDS)),
            corpus="wiki", n_train=96, n_val=256, settings=_SMALL_TRAIN,
            tasks=("wiki_mc", "wiki_topic", "wiki_cloze", "commonsense"), n_items=_POWERED_ITEMS_4,
            loss_only=("gemma3-270m",),
            grid_model="smollm2-135m", grid_settings=replace(_SMALL_TRAIN, epochs=2),
            grid_tasks=("wiki_mc", "wiki_topic", "wiki_cloze", "commonsense")),
        # a byte-level 8-layer GPT on the wiki train split, 16 x 128 bytes a step. At 600 steps a fresh 4-layer model
        # ties it (2.197 vs 2.194, 2026-12-07), so S doubles until the reference is clearly better (issue 20), up to
        # 2400 steps; two training seeds
        "04_attention_degeneration_inheritune": InherituneConfig(
            models=("smollm2-135m", "qwen2.5-0.5b", "gemma3-270m"), corpus="wiki", n_windows=32, window_len=100,
            batch_size=8, example_model="smollm2-135m",
            reference=GPTConfig(n_layer=8, n_head=4, n_embd=128, block_size=128),
            train=PretrainSettings(steps=600, batch_size=16, lr=2e-3, warmup=60, eval_interval=50),
            n_seeds=2, steps_schedule=(600, 1200, 2400)),
        # 2 CPU cores: the perplexity search scores 16 x 128 held-out tokens (issue 20: >= 16 windows) and bisects
        # the rank grid; perplexity on 32 x 256 tokens (the intervals resample windows); the task search covers the
        # last 3 layers (the paper's Table B reports after 35 / 70 / 140 modules). Accuracy on 220 + 220 + 60 = 500
        # items (issue 20), at the two budgets the per-budget claims read (80% and 50% of kappa) and dense
        "05_lowrank_decomposition": LowRankConfig(
            models=("smollm2-135m", "qwen2.5-0.5b"), search_model="smollm2-135m", corpus="wiki",
            tasks=("wiki_mc", "wiki_cloze", "commonsense"), n_items={"wiki_mc": 220, "wiki_cloze": 220, "commonsense": 60},
            acc_pcts=(80, 50), scan="bisect", search_windows=16,
            eval_windows=32, task="wiki_mc", task_items=300, task_layers=3),
        # 32 windows: the sink and ablation intervals resample windows (issue 20)
        "06_synthesis": SynthesisConfig(models=("smollm2-135m", "qwen2.5-0.5b", "gemma3-270m"), n_windows=32),
    },
    "paper": {
        # SunMA exp2 uses 10 RedPajama windows of 4096 tokens; RedPajama is not among the downloaded paper
        # data, so the windows come from WikiText-2's test split (said in the notebook).
        "01_massive_activation_origin": MassiveOriginConfig(
            models=("llama-2-7b", "llama-3-8b", "mistral-7b"), corpus="wikitext2", n_windows=10, window_len=4096,
            batch_size=1),
        # HoC Table 1's WikiText-2 column with 4096-token windows (C4 / PG-19 are downloaded too: set
        # corpus="c4" or "pg19" for those columns). The zero-shot tasks are the paper's five.
        "02_massive_weight_ablation": AblationConfig(
            models=("llama-3-8b", "llama-2-7b", "mistral-7b"), corpus="wikitext2", n_windows=10, window_len=4096,
            batch_size=1, tasks=("arc_easy", "arc_challenge", "boolq", "piqa", "winogrande"), n_items=None,
            eval_batch_size=32, sweep_model="llama-3-8b", sweep_tasks=("arc_easy", "boolq"), sweep_n_items=200),
        # HoC §4.1: alpaca-gpt4, LoRA/DoRA r16 a16 on all linear layers, lr 1e-4, 3 epochs, effective batch
        # 256 (one GPU: 8 x 32; under `accelerate launch` on 8 GPUs set grad_accum=4), bf16, seed 42.
        "03_macdrop_finetuning": MacDropConfig(
            runs=(("llama-3-8b", ("lora", "lora_macdrop", "dora", "dora_macdrop"), (42,)),
                  ("mistral-7b", ("lora", "lora_macdrop", "dora", "dora_macdrop"), (42,))),
            corpus="alpaca-gpt4", n_train=None, n_val=2600,
            settings=_PAPER_TRAIN,
            tasks=("arc_easy", "arc_challenge", "boolq", "piqa", "winogrande"), n_items=None, batch_size=8,
            full_grid=False, grid_model="llama-3-8b",  # the grids are a long run of their own (make macdrop-grid)
            grid_settings=_PAPER_TRAIN,
            grid_tasks=("arc_easy", "arc_challenge", "boolq", "piqa", "winogrande")),
        # Inheritune §2 / App. F.2: the OpenAI GPT-2 checkpoints (not the paper's self-trained models) on
        # N = 100 windows of T = 100 tokens, and the paper's GPT-2 medium recipe: 24 layers, d 1024, 16 heads,
        # context 1024, GPT-2 BPE padded to 50,304, 394K tokens per step (12 x 1024 x 32), lr 3e-4 -> 1e-5,
        # 2K warmup, 100K steps, bf16, scaled attention logits; Inheritune target 12 layers, +2 per round.
        "04_attention_degeneration_inheritune": InherituneConfig(
            models=("gpt2-medium", "gpt2-large"), corpus="openwebtext", n_windows=100, window_len=100,
            batch_size=10, example_model="gpt2-medium", tokenizer="gpt2", train_corpus="openwebtext",
            reference=GPTConfig(n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50304),
            train=PretrainSettings(steps=100_000, batch_size=12, grad_accum=32, lr=3e-4, min_lr_ratio=1e-5 / 3e-4,
                                   warmup=2000, eval_interval=1000, ckpt_interval=1000, n_val=400, bf16=True),
            max_rounds=3, n_analysis=100, train_in_notebook=False),
        # SFSD §2: LLaMA-7B (LLaMA-1) and Mistral-7B, 512 x 128 calibration tokens, the six commonsense
        # tasks, tolerance 1.005 / module, the full linear scan, the task search over every layer from 4.
        # WikiText-2 at seq 128 is the paper's perplexity; calibration reads WikiText-2's train split
        # (the paper calibrates on its task mixture, research sfsd.md §2.1; said in the notebook).
        "05_lowrank_decomposition": LowRankConfig(
            models=("llama-7b", "mistral-7b"), search_model="mistral-7b", corpus="wikitext2", calib_windows=512,
            calib_len=128, eval_windows=64, eval_len=128, batch_size=8,
            tasks=("arc_easy", "arc_challenge", "boolq", "piqa", "winogrande"), n_items=None, scan="linear",
            search_windows=128, search_len=128, task="piqa", task_items=1838, cache_every=4),
        # Inheritune's N = 100 windows of T = 100; the paper models of notebooks 01/02 (Llama-2-13B /
        # Llama-3-70B need several GPUs) and notebook 05's Mistral-7B; notebook 03's seed-42 adapters.
        "06_synthesis": SynthesisConfig(models=("llama-2-7b", "llama-3-8b", "mistral-7b"), corpus="wikitext2", n_windows=100,
                                        window_len=100, batch_size=4, random_seeds=(0,)),
    },
}


# The random-weight dry run (DESIGN §2, ``REPRO_WEIGHTS=random``): the profile's models at their shipped
# configs with random weights, on the ``small`` data (no hub: the paper corpora are replaced by the wiki corpus,
# and lm-eval's hub tasks keep their names and code path but read local stand-in docs, ``tasks.STAND_INS``),
# with few items and steps, so every notebook's paper code
# path (dtype, GQA shapes, 4096-token windows, Conv1D GPT-2, gradient checkpointing, the search) runs in
# minutes on one GPU. Sequence lengths and batch sizes stay the paper's: the memory footprint is the point.
# ``REPRO_RANDOM_SHRINK=N`` (the CPU test) also divides the models' width and depth by N, and
# ``SHRUNK_DRY_RUNS`` shortens the sequences so the same path takes seconds on CPU.
_DRY_TRAIN = dict(epochs=1, save_steps=2)


_DRY_TASKS = ("arc_easy", "winogrande")  # paper tasks on local stand-ins (tasks.STAND_INS): one of each request form


DRY_RUNS: dict[str, dict[str, dict]] = {"paper": {
    "01_massive_activation_origin": dict(n_windows=2),
    "02_massive_weight_ablation": dict(n_windows=2, tasks=_DRY_TASKS, n_items=20, seeds=(0,), k_grid=(0, 5, 50),
                                       sweep_tasks=("arc_easy",), sweep_n_items=10),
    # 03's grids and 04's pre-training are the paper's long runs (commands of their own); the dry run runs both in
    # the notebook, at paper shape
    "03_macdrop_finetuning": dict(
        corpus="wiki", n_train=64, n_val=16, tasks=_DRY_TASKS, n_items=20,
        settings=replace(_PAPER_TRAIN, grad_accum=2, **_DRY_TRAIN),
        grid_settings=replace(_PAPER_TRAIN, grad_accum=2, **_DRY_TRAIN), grid_tasks=("arc_easy",),
        grid_kinds=("step", "exp"), grid_p0s=(0.8,), scope_ps=(0.5,), full_grid=True),
    "04_attention_degeneration_inheritune": dict(
        n_windows=20, n_analysis=20, max_rounds=1, train_in_notebook=True,
        train=PretrainSettings(steps=20, batch_size=12, grad_accum=2, lr=3e-4, warmup=5, eval_interval=10,
                               ckpt_interval=10, n_val=16, bf16=True)),
    "05_lowrank_decomposition": dict(
        calib_windows=32, eval_windows=8, tasks=_DRY_TASKS, n_items=20, search_windows=8, task_items=60,
        task_layers=2),
    "06_synthesis": dict(n_windows=16),
}}


SHRUNK_DRY_RUNS: dict[str, dict[str, dict]] = {"paper": {
    "01_massive_activation_origin": dict(window_len=256),
    "02_massive_weight_ablation": dict(window_len=128, n_items=8, sweep_n_items=8),
    "03_macdrop_finetuning": dict(
        runs=(("llama-3-8b", ("lora", "lora_macdrop", "dora_macdrop"), (42,)),), n_train=16, n_val=8, n_items=8,
        tasks=("arc_easy",), full_grid=False,  # the grids' code is the smoke profile's (nbval); here only its settings
        settings=replace(_PAPER_TRAIN, grad_accum=1, batch_size=8, max_len=128, **_DRY_TRAIN)),
    "04_attention_degeneration_inheritune": dict(
        n_windows=8, n_analysis=8, reference=GPTConfig(n_layer=4, n_head=2, n_embd=64, block_size=128, vocab_size=50304),
        train=PretrainSettings(steps=6, batch_size=4, lr=3e-4, warmup=2, eval_interval=3, ckpt_interval=3, n_val=8)),
    "05_lowrank_decomposition": dict(calib_windows=8, calib_len=32, eval_windows=4, eval_len=32, search_windows=4,
                                     search_len=32, n_items=8, task_items=60, task_layers=1, scan="bisect"),
    "06_synthesis": dict(n_windows=4, window_len=32),
}}


def is_dry_run(profile: str) -> bool:
    """Whether ``profile`` runs as the random-weight dry run (``REPRO_WEIGHTS=random`` and a DRY_RUNS entry)."""
    return random_weights() is not None and profile in DRY_RUNS


def _run_name(profile: str, dry_run: bool) -> str:
    return f"{profile}-dryrun" if dry_run else profile


def run_name(profile: str) -> str:
    """Where a run of ``profile`` writes under build/: the profile, or ``<profile>-dryrun`` under the dry run."""
    return _run_name(profile, is_dry_run(profile))


def resolve_profile(profile: str) -> str:
    """The ``REPRO_PROFILE`` environment variable wins over the notebook literal."""
    env = os.environ.get("REPRO_PROFILE")
    profile = env or profile
    if profile not in PROFILE_NAMES:
        source = " (from the REPRO_PROFILE environment variable)" if env else ""
        raise ValueError(f"unknown profile {profile!r}{source}; known profiles: {', '.join(PROFILE_NAMES)}")
    return profile


def load_config(notebook: str, profile: str, seed: int = 0) -> NotebookConfig:
    """The frozen config of ``notebook`` under ``profile`` (after the env override), with your own model in place of
    the profile's when ``REPRO_MODEL`` names one (``user_model.overrides``)."""
    profile = resolve_profile(profile)
    table = PROFILES[profile]
    if notebook not in table:
        raise ValueError(f"notebook {notebook!r} has no config in profile {profile!r}; "
                         f"known: {', '.join(sorted(table))}")
    base = table[notebook]
    values = {f.name: getattr(base, f.name) for f in fields(base)}
    values.update(notebook=notebook, profile=profile, seed=seed)
    if is_dry_run(profile):
        values.update(DRY_RUNS[profile].get(notebook, {}), dry_run=True)
        if random_weights() > 1:
            values.update(SHRUNK_DRY_RUNS[profile].get(notebook, {}))
    if key := user_model.requested_key():
        values.update(user_model.overrides(notebook, base, key))
    return type(base)(**values)


def notebook_models(cfg: NotebookConfig) -> list[str]:
    """Registry keys of the models a notebook config loads (``models``, the fine-tuning ``runs``)."""
    keys = [*getattr(cfg, "models", ()), *(run[0] for run in getattr(cfg, "runs", ()))]
    return list(dict.fromkeys(keys))
