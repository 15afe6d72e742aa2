"""Bad input across the public ``common`` API (issue 9 §3, DESIGN §6 "errors name the fix").

Wrong shapes and dtypes, k / rank / budget / layer / tolerance out of range, windows longer than the text,
empty strings and lists, unknown names and NaN each raise one specific exception whose message names the
problem or the fix: never a silent wrong number, an obscure error from deep inside torch, or a hang (every
call runs under an alarm). Property tests check cheap invariants on valid input, and fuzz tests check that
any input either gives a valid result or a clear refusal.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.core import arch, capture, data, evaluation, layer_inputs, manifest, models, profiles, tasks
from common.core.profiles import PretrainSettings
from common.hoc import ablation, detection, edits, finetune, macdrop
from common.inheritune import attention, gpt, training
from common.reporting import claims
from common.sfsd import budgets, decomposition, lowrank, search
from common.sfsd import experiments as sfsd_experiments
from common.synthesis import experiments as synthesis_experiments
from common.synthesis import protected

pytestmark = pytest.mark.usefixtures("one_thread")

LIMIT_S = 20  # far above any single call here (all well under a second): only a hang reaches it
N_LAYERS, WIDTH, HIDDEN = 4, 192, 64  # tiny-llama
#: Small, deterministic example budgets: the whole file runs in well under a minute on two cores.
FUZZ = settings(max_examples=40, deadline=5000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
FUZZ_MODEL = settings(FUZZ, max_examples=25)


@contextmanager
def time_limit(seconds: int = LIMIT_S) -> Iterator[None]:
    """Raise TimeoutError in the block once it has run ``seconds``: a hang fails the test instead of the suite."""
    def expire(_signum, _frame):
        raise TimeoutError(f"the call ran past {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def refused(exc: type[Exception], match: str, call: Callable[[], object]) -> None:
    """``call()`` raises ``exc`` with a message matching ``match``, in time."""
    with time_limit(), pytest.raises(exc, match=match):
        call()


def entered(cm: AbstractContextManager) -> None:
    """Enter and leave a context manager (the weight edits validate when entered)."""
    with cm:
        pass


def _long(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, models.TINY_VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def env() -> SimpleNamespace:
    """Tiny models and the cheap objects built from them, shared by every case (nothing here mutates them)."""
    llama, tok = models.load_model("tiny-llama")
    llama.requires_grad_(False)  # MacDrop masks frozen weights
    gpt2 = models.load_model("tiny-gpt2")[0]
    ids = _long(2, 8)
    stats = capture.capture(llama, [ids], points=("hidden", "inter"))
    profile = synthesis_experiments.sink_profile(llama, ids)
    decomps = decomposition.decompose_model(llama, ids, [0])
    d = next(iter(decomps.values()))
    run = training.Run("a", 1, 1, [], [1.0, 2.0, 3.0], 0.0, 0.0, 0, {})
    return SimpleNamespace(
        llama=llama, gpt2=gpt2, tok=tok, ids=ids, stats=stats, inter=stats.pos0["inter"], profile=profile,
        inputs=layer_inputs.LayerInputs(llama, ids), decomps=decomps, d=d, macdrop=macdrop.MacDrop(llama, 1, [37, 5]),
        run=run, short_run=training.Run("b", 1, 1, [], [1.0], 0.0, 0.0, 0, {}),
        state=search.SearchState("perplexity", "feature", {}, {}, [{"path": d.target.path, "layer": 0, "rank": 1}]),
        gpt=gpt.GPT(profiles.GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=256)),
        claim=claims.Claim("c", "p", "claim", "ref", "m", 1.0, "source", "m/q", "01_massive_activation_origin",
                           claims.Rule(0.0, "greater", 0.0, "exact"), "fig", ()))


def case(name: str, exc: type[Exception], match: str, call: Callable[[SimpleNamespace], object]) -> pytest.ParameterSet:
    """One table row: ``call(env)`` must raise ``exc`` matching ``match``; ``name`` is the test id."""
    return pytest.param(exc, match, call, id=name)


NAN = float("nan")
F64 = torch.float64

# A case named "(silently ...)" or "(was ...)" gave a wrong number or an obscure error before its validation in
# src/common; the others were already refused clearly and stay so.
CASES = [
    # ------------------------------------------------------------------------------------ arch / layers
    case("arch.layer -1 wrapped around", ValueError, r"layer -1 is outside the model's 4 layers",
         lambda e: arch.attention(e.llama, -1)),
    case("arch.layer past the end (was IndexError)", ValueError, r"layer 4 is outside.*0 <= layer < 4", lambda e: arch.mlp(e.llama, 4)),
    case("zero_channels layer -1 zeroed the last layer", ValueError, r"layer -1 is outside",
         lambda e: entered(edits.zero_channels(e.llama, {-1: [0]}))),
    case("zero_channels layer 9 (was IndexError)", ValueError, r"layer 9 is outside", lambda e: entered(edits.zero_channels(e.llama, {9: [0]}))),
    case("set_hidden layer -1 (silently the last layer)", ValueError, r"layer -1 is outside",
         lambda e: entered(edits.set_hidden(e.llama, -1, [0], torch.zeros(1)))),
    case("example_maps layer 9 (was IndexError)", ValueError, r"layer 9 is outside", lambda e: attention.example_maps(e.llama, e.ids, [9])),
    case("MacDrop layer 4", ValueError, r"massive layer 4 is outside", lambda e: macdrop.MacDrop(e.llama, 4, [0])),
    # ------------------------------------------------------------------------------------ token ids
    case("capture float ids (was RuntimeError in the embedding)", TypeError, r"torch.long token ids, got torch.float32.*\.long\(\)",
         lambda e: capture.capture(e.llama, [e.ids.float()])),
    case("perplexity int32 windows (was RuntimeError in cross_entropy)", TypeError, r"torch.long token ids, got torch.int32",
         lambda e: evaluation.perplexity(e.llama, e.ids.int())),
    case("capture 1-d ids (was a shape error inside attention)", ValueError, r"\[B, T\] tensor of token ids, got shape \(8,\)",
         lambda e: capture.capture(e.llama, [e.ids[0]])),
    case("capture 3-d ids (was a shape error inside attention)", ValueError, r"\[B, T\]", lambda e: capture.capture(e.llama, [e.ids[None]])),
    case("capture ids past the vocabulary (was IndexError in the embedding)", ValueError, r"token id 1258, outside the model's vocabulary \[0, 259\)",
         lambda e: capture.capture(e.llama, [torch.tensor([[5, 1258]])])),
    case("capture negative id (was IndexError in the embedding)", ValueError, r"token id -1, outside", lambda e: capture.capture(e.llama, [torch.tensor([[-1, 5]])])),
    case("capture empty text with a no-BOS model (was a reshape error)", ValueError, r"non-empty \[B, T\]",
         lambda e: detection.massive_layer(e.llama, e.tok, "smollm2-135m", ("",))),
    case("capture no batches (silently empty Stats)", ValueError, r"no batches", lambda e: capture.capture(e.llama, [])),
    case("massive_weights no prompts (was KeyError 'inter')", ValueError, r"no batches",
         lambda e: detection.massive_weights(e.llama, [], 3)),
    case("capture whole k=0 (silently empty top-k)", ValueError, r"k=0.*k >= 1", lambda e: capture.capture(e.llama, [e.ids], whole=True, k=0)),
    case("capture_attention float ids (was RuntimeError in the embedding)", TypeError, r"torch.long", lambda e: attention.capture_attention(e.llama, [e.ids.float()])),
    case("capture_attention ids past the vocabulary (was IndexError)", ValueError, r"vocabulary",
         lambda e: attention.capture_attention(e.gpt2, [e.ids + 300])),
    case("sink_profile 1-d windows", ValueError, r"\[B, T\]", lambda e: synthesis_experiments.sink_profile(e.llama, e.ids[0])),
    case("perplexity float windows (was RuntimeError in the embedding)", TypeError, r"torch.long", lambda e: evaluation.perplexity(e.llama, e.ids.float())),
    case("perplexity no windows (was ZeroDivisionError)", ValueError, r"non-empty",
         lambda e: evaluation.perplexity(e.llama, e.ids[:0])),
    case("perplexity ids past the vocabulary (was IndexError)", ValueError, r"vocabulary", lambda e: evaluation.perplexity(e.gpt2, e.ids + 300)),
    case("perplexity batch_size 0 (was range() error)", ValueError, r"batch_size must be a positive int, got 0",
         lambda e: evaluation.perplexity(e.llama, e.ids, 0)),
    case("LayerInputs float ids (was RuntimeError in the embedding)", TypeError, r"torch.long", lambda e: layer_inputs.LayerInputs(e.llama, e.ids.float())),
    case("LayerInputs batch_size 0 (was range() error)", ValueError, r"batch_size=0 must be >= 1", lambda e: layer_inputs.LayerInputs(e.llama, e.ids, batch_size=0)),
    case("LayerInputs batch_size -1 (was IndexError later)", ValueError, r"batch_size=-1", lambda e: layer_inputs.LayerInputs(e.llama, e.ids, batch_size=-1)),
    case("decompose_model float calibration (was RuntimeError in the embedding)", TypeError, r"torch.long", lambda e: decomposition.decompose_model(e.llama, e.ids.double(), [0])),
    # ------------------------------------------------------------------------------------ massive
    case("detect_massive_layer 2-d (silently None)", ValueError, r"\[N, L, D\].*got shape \(4, 192\)",
         lambda e: detection.detect_massive_layer(e.inter[0])),
    case("detect_massive_layer int activations (was RuntimeError in mean)", TypeError, r"floating point activations, got torch.int64",
         lambda e: detection.detect_massive_layer(e.inter.long())),
    case("detect_massive_layer NaN (silently 'no layer')", ValueError, r"NaN/inf.*float32",
         lambda e: detection.detect_massive_layer(torch.full_like(e.inter, NAN))),
    case("layer_profile empty (was IndexError in max)", ValueError, r"non-empty", lambda e: detection.layer_profile(e.inter[:0])),
    case("top_channels layer -1 (silently the last layer)", ValueError, r"layer -1 is outside the 4 captured layers",
         lambda e: detection.top_channels(e.inter, -1, 3)),
    case("top_channels layer 10 (was IndexError)", ValueError, r"layer 10 is outside", lambda e: detection.top_channels(e.inter, 10, 3)),
    case("top_channels k too large", ValueError, r"k=193 must be between 1 and the intermediate size 192",
         lambda e: detection.top_channels(e.inter, 1, 193)),
    case("top_channels k 0", ValueError, r"k=0", lambda e: detection.top_channels(e.inter, 1, 0)),
    case("super_weight negative dim (silently the last)", ValueError, r"entry \(-1, 0\) is outside layer 0's 64 x 192",
         lambda e: edits.super_weight(e.llama, 0, -1, 0)),
    case("zero_super_weight channel past the width (was IndexError)", ValueError, r"0 <= channel < 192",
         lambda e: entered(edits.zero_super_weight(e.llama, 0, 0, 192))),
    case("set_hidden dim past the hidden size (was IndexError inside the hook)", ValueError, r"hidden dims \[64\] must lie in \[0, 64\)",
         lambda e: entered(edits.set_hidden(e.llama, 1, [64], torch.zeros(1)))),
    case("set_hidden values for other dims (was a shape error inside the hook)", ValueError, r"3 values for 2 hidden dims",
         lambda e: entered(edits.set_hidden(e.llama, 1, [0, 1], torch.zeros(3)))),
    case("zero_massive k beyond the ranked channels", ValueError, r"k=3 exceeds the 2 ranked channels",
         lambda e: edits.zero_massive(e.llama, 1, [37, 5], 3)),
    case("keep_only_massive k > layer", ValueError, r"k=300 is out of range.*192",
         lambda e: edits.keep_only_massive(e.llama, 1, [37], 300)),
    case("random_channels k > pool", ValueError, r"k=5 is out of range", lambda e: edits.random_channels(6, 5, 0, [0, 1])),
    case("zero_channels channel out of range", ValueError, r"channel index out of range for layer 1: must be in \[0, 192\)",
         lambda e: entered(edits.zero_channels(e.llama, {1: [192]}))),
    case("set_norm_gain on a family without post-norm", ValueError, r"no post-FFN norm",
         lambda e: entered(edits.set_norm_gain(e.llama, [0], 0))),
    case("find_massive windows without medians", ValueError, r"whole=True", lambda e: detection.find_massive(e.stats, e.stats)),
    case("table1 without a massive layer", ValueError, r"no detectable massive layer",
         lambda e: ablation.table1(detection.MassiveReport(None, [], [], [], [], 0, [], 0.0, 0.0, 0.0), [], 1, 8, (0,))),
    case("unknown attack kind", ValueError, r"unknown attack kind 'melt'; known: base",
         lambda e: ablation.Attack("x", "melt").context(e.llama)),
    case("unknown capture point", ValueError, r"unknown capture point 'logits'; known: hidden",
         lambda e: capture.capture(e.llama, [e.ids], points=("logits",))),
    # ------------------------------------------------------------------------------------ attention
    case("head_metrics NaN (was LinAlgError)", ValueError, r"finite.*NaN/inf", lambda e: attention.head_metrics(torch.full((5, 5), NAN))),
    case("head_metrics T=0 (was IndexError)", ValueError, r"non-empty", lambda e: attention.head_metrics(torch.zeros(0, 0))),
    case("head_metrics all-zero matrix (silently rank 1)", ValueError, r"all-zero attention matrix",
         lambda e: attention.head_metrics(torch.zeros(5, 5))),
    case("count_to_share NaN (silently 1)", ValueError, r"finite", lambda e: attention.count_to_share(torch.tensor([NAN, 1.0]), 0.9)),
    case("count_to_share empty (was IndexError in argmax)", ValueError, r"non-empty", lambda e: attention.count_to_share(torch.zeros(0), 0.9)),
    case("head_metrics not square", ValueError, r"\[\.\.\., T, T\], got shape \(3, 4\)", lambda e: attention.head_metrics(torch.ones(3, 4))),
    case("head_metrics int matrices", TypeError, r"floating point", lambda e: attention.head_metrics(torch.ones(3, 3, dtype=torch.long))),
    case("head_metrics tau 0", ValueError, r"tau=0.0 must be in \(0, 1\]", lambda e: attention.head_metrics(torch.eye(3), tau=0.0)),
    case("head_metrics eta NaN", ValueError, r"eta=nan", lambda e: attention.head_metrics(torch.eye(3), eta=NAN)),
    case("rank_at tau 1.5", ValueError, r"share=1.5", lambda e: e.profile.attention.rank_at(1.5)),
    case("sink_vs_massive layer -1 (silently sliced)", ValueError, r"massive layer -1 is outside the 4 layers",
         lambda e: attention.sink_vs_massive(e.profile.attention, -1)),
    case("sink_summary layer 4 (was IndexError)", ValueError, r"massive layer 4 is outside",
         lambda e: synthesis_experiments.sink_summary(e.profile, 4)),
    case("per_head unknown metric", ValueError, r"unknown metric 'ranks'; known: rank", lambda e: e.profile.attention.per_head("ranks")),
    case("per_layer unknown aggregate", ValueError, r"heads='min'", lambda e: e.profile.attention.per_layer("rank", "min")),
    case("capture_attention no batches", ValueError, r"no batches", lambda e: attention.capture_attention(e.llama, [])),
    case("capture_attention T beyond the context", ValueError, r"T=17 exceeds the model's context of 16 tokens",
         lambda e: attention.capture_attention(e.gpt, [torch.zeros(1, 17, dtype=torch.long)])),
    case("GPT sequence beyond block_size", ValueError, r"exceeds block_size=16", lambda e: e.gpt(torch.zeros(1, 17, dtype=torch.long))),
    case("unknown attention implementation", ValueError, r"unknown attention implementation 'flash'; known: sdpa",
         lambda e: e.gpt.set_attn_implementation("flash")),
    # ------------------------------------------------------------------------------------ lowrank
    case("rank_for kappa 0 (silently rank 1 > kappa)", ValueError, r"kappa=0", lambda e: budgets.rank_for(0.5, 0)),
    case("rank_for budget 80 (a pct)", ValueError, r"budget 80 must be a fraction in \(0, 1\].*0.8 for 80%",
         lambda e: budgets.rank_for(80, 100)),
    case("rank_for budget NaN", ValueError, r"budget nan", lambda e: budgets.rank_for(NAN, 100)),
    case("kappa of an empty matrix", ValueError, r"must be positive, got 0 x 5", lambda e: budgets.kappa(0, 5)),
    case("rank_grid kappa 0", ValueError, r"kappa must be >= 1", lambda e: budgets.rank_grid(0)),
    case("targets layer -1 (silently path 'layers.-1')", ValueError, r"layers \[-1\] are outside the model's 4 layers",
         lambda e: budgets.targets(e.llama, [-1])),
    case("targets layer 9 (was IndexError)", ValueError, r"layers \[9\]", lambda e: budgets.targets(e.llama, [9])),
    case("decompose_model layer 9 (was RuntimeError after every layer ran)", ValueError, r"layers \[9\] must be non-empty and inside the model.s 4 layers", lambda e: decomposition.decompose_model(e.llama, e.ids, [9])),
    case("decompose_model keep -1 (silently kept m-1)", ValueError, r"keep=-1: store at least one",
         lambda e: decomposition.decompose_model(e.llama, e.ids, [0], keep=-1)),
    case("decompose_model keep 0 (silently no eigenvectors)", ValueError, r"keep=0", lambda e: decomposition.decompose_model(e.llama, e.ids, [0], keep=0)),
    case("decompose_model window shorter than 2", ValueError, r"T >= 2.*lower the window length",
         lambda e: decomposition.decompose_model(e.llama, e.ids[:, :1])),
    case("perplexity from layer -1 (silently ran the last layer first)", ValueError, r"start=-1 is outside the model's 4 layers",
         lambda e: e.inputs.perplexity(-1)),
    case("perplexity from layer 4 (was IndexError)", ValueError, r"start=4", lambda e: e.inputs.logprobs(4)),
    case("LayerInputs keep unknown", ValueError, r"keep must be 'all', 'first'", lambda e: layer_inputs.LayerInputs(e.llama, e.ids, keep="some")),
    case("LayerInputs mask shape", ValueError, r"mask shape", lambda e: layer_inputs.LayerInputs(e.llama, e.ids, e.ids[:1])),
    case("Moments of another width (was a broadcast error)", ValueError, r"width 7 added to moments of width 8",
         lambda e: decomposition.Moments(8).add(torch.ones(3, 7))),
    case("Moments mean of nothing (was AttributeError)", ValueError, r"no samples", lambda e: decomposition.Moments(8).mean),
    case("Moments cov of nothing (silently NaN)", ValueError, r"no samples", lambda e: decomposition.Moments(8).cov),
    case("factors rank above the stored vectors", ValueError, r"rank 999 outside \[1, ", lambda e: e.d.factors(e.llama.get_submodule(e.d.target.path), "feature", 999)),
    case("factors unknown method", ValueError, r"unknown method 'svd'; known: weight_svd", lambda e: e.d.full_rank("svd")),
    case("model_share unknown method (silently a share)", ValueError, r"unknown method 'fetaure'",
         lambda e: lowrank.model_share(e.llama, e.decomps, {e.d.target.path: 1}, "fetaure")),
    case("factorised rank above kappa", ValueError, r"above kappa", lambda e: lowrank.factorised(e.llama, e.d, "feature", e.d.kappa + 1)),
    case("decomposed unknown path", KeyError, r"no decomposition for.*decompose those layers",
         lambda e: lowrank.decomposed(e.llama, e.decomps, "feature", {"nope": 1})),
    case("uniform_ranks undecomposed layer (silently the dense model)", ValueError, r"no decompositions for \[3\]",
         lambda e: lowrank.uniform_ranks(e.decomps, 80, [3])),
    case("uniform_ranks no layers (silently the dense model)", ValueError, r"non-empty", lambda e: lowrank.uniform_ranks(e.decomps, 80, [])),
    case("uniform_ranks pct 0", ValueError, r"budget 0.0", lambda e: lowrank.uniform_ranks(e.decomps, 0, [0])),
    case("protected_layers of 0 layers (silently 1)", ValueError, r"n_layers=0", lambda e: budgets.protected_layers(0)),
    case("search_order protected -1", ValueError, r"protected must be >= 0", lambda e: search.search_order(e.decomps, -1)),
    case("energy_at share 2 (silently 1.0)", ValueError, r"share=2.0 must be a fraction", lambda e: decomposition.energy_at(torch.ones(4), 2.0)),
    case("energy_at share 0 (silently the top value)", ValueError, r"share=0", lambda e: decomposition.energy_at(torch.ones(4), 0)),
    case("perplexity_search tolerance NaN (silently never compressed)", ValueError, r"tolerance nan must be >= 1",
         lambda e: search.perplexity_search(e.llama, e.decomps, e.inputs, tolerance=NAN)),
    case("perplexity_search tolerance below 1", ValueError, r"tolerance 0.99", lambda e: search.perplexity_search(e.llama, e.decomps, e.inputs, tolerance=0.99)),
    case("task_search no chunks (was max() of empty)", ValueError, r"at least one chunk",
         lambda e: search.task_search(e.llama, e.decomps, [], None)),
    case("protected_rank k = m", ValueError, r"k=64 protected rows must lie in \[1, 63\]", lambda e: protected.protected_rank(64, 64, 64, 8, False)),
    case("protected_rank no budget left", ValueError, r"leaves no budget", lambda e: protected.protected_rank(64, 64, 60, 1, False)),
    case("multiple_choice no docs", ValueError, r"at least one doc", lambda e: evaluation.multiple_choice(e.llama, e.tok, "tiny-llama", [], "acc")),
    case("multiple_choice unknown metric", ValueError, r"'acc' or 'acc_norm', got 'f1'",
         lambda e: evaluation.multiple_choice(e.llama, e.tok, "tiny-llama", [{"query": "q", "choices": ["a", "b"], "gold": 0}], "f1")),
    # ------------------------------------------------------------------------------------ lowrank_eval
    case("paired_noise broadcast (silently 5 copies of one window)", ValueError, r"same windows, got shapes \(5,\) and \(1,\)",
         lambda e: sfsd_experiments.paired_noise(torch.zeros(5), torch.zeros(1), 10)),
    case("paired_noise tokens_per_window 0 (silently -inf)", ValueError, r"tokens_per_window=0",
         lambda e: sfsd_experiments.paired_noise(torch.zeros(5), torch.ones(5), 0)),
    case("heldout_windows search_len 1 (was ZeroDivisionError)", ValueError, r"search_len=1 must be >= 2",
         lambda e: sfsd_experiments.heldout_windows(e.tok, "tiny-llama", "synthetic", 2, 16, 2, 1)),
    case("task_splits no chunks (silently empty)", ValueError, r"need 0 < 0 x chunk",
         lambda e: sfsd_experiments.task_splits(list(range(100)), n_chunks=0)),
    case("task_splits search 1", ValueError, r"<= search \(1\) < 1", lambda e: sfsd_experiments.task_splits(list(range(100)), search=1)),
    case("task_splits too few docs", ValueError, r"give empty chunks.*use more docs", lambda e: sfsd_experiments.task_splits(list(range(5)))),
    case("trajectory m=0 (was min() of empty)", ValueError, r"decision counts \[0\] must lie in \[1, 1\]",
         lambda e: sfsd_experiments.trajectory(e.llama, e.decomps, e.state, [0], lambda start: 0.0)),
    case("trajectory m past the search (silently truncated)", ValueError, r"\[2\]", lambda e: sfsd_experiments.trajectory(e.llama, e.decomps, e.state, [2], lambda start: 0.0)),
    case("suite unknown task", ValueError, r"unknown task 'nope'", lambda e: sfsd_experiments.suite(e.llama, e.tok, "tiny-llama", ("nope",), 4)),
    # ------------------------------------------------------------------------------------ evaluation
    case("response_loss no examples (was ZeroDivisionError)", ValueError, r"0 examples hold no response token",
         lambda e: evaluation.response_loss(e.llama, [], 0)),
    case("response_loss only prompt tokens (was ZeroDivisionError)", ValueError, r"no response token",
         lambda e: evaluation.response_loss(e.llama, [{"input_ids": [1, 5, 6], "labels": [data.IGNORE] * 3}], 0)),
    case("response_loss batch_size 0 (was range() error)", ValueError, r"batch_size must be a positive int", lambda e: evaluation.response_loss(e.llama, [], 0, 0)),
    case("bootstrap_ci 0 resamples (was IndexError)", ValueError, r"n_resamples=0 must be >= 1",
         lambda e: evaluation.bootstrap_ci([1.0, 0.0], n_resamples=0)),
    case("bootstrap_ci level 2 (was numpy's percentile error)", ValueError, r"level=2 must be in \(0, 1\)", lambda e: evaluation.bootstrap_ci([1.0, 0.0], level=2)),
    case("bootstrap_ci NaN score (silently NaN interval)", ValueError, r"finite per-item scores", lambda e: evaluation.bootstrap_ci([1.0, NAN])),
    case("bootstrap_ci no scores", ValueError, r"non-empty", lambda e: evaluation.bootstrap_ci([])),
    case("average_accuracy 0 resamples (was IndexError)", ValueError, r"n_resamples=0",
         lambda e: evaluation.average_accuracy({"t": {"acc": 1.0, "correct": [1.0], "chance": 0.5}}, n_resamples=0)),
    case("average_accuracy no tasks", ValueError, r"at least one task", lambda e: evaluation.average_accuracy({})),
    case("average_accuracy without per-item scores", ValueError, r"'correct'.*missing",
         lambda e: evaluation.average_accuracy({"t": {"acc": 1.0, "chance": 0.5}})),
    case("zero_shot unknown task", ValueError, r"distinct names from the local tasks", lambda e: evaluation.zero_shot(e.llama, e.tok, ["mmlu"], 4)),
    case("zero_shot no tasks", ValueError, r"got \[\]", lambda e: evaluation.zero_shot(e.llama, e.tok, [], 4)),
    case("zero_shot batch_size auto", ValueError, r"never 'auto'", lambda e: evaluation.zero_shot(e.llama, e.tok, ["wiki_mc"], 4, batch_size="auto")),
    # ------------------------------------------------------------------------------------ synthesis
    case("mean_parts seq_len 0 (silently inf)", ValueError, r"seq_len=0 must be the calibration window length",
         lambda e: synthesis_experiments.mean_parts({}, {}, 0, "all")),
    case("lost_mean_share seq_len 0 (was ZeroDivisionError)", ValueError, r"seq_len=0", lambda e: synthesis_experiments.lost_mean_share({}, {}, 0, 50)),
    case("mean_consistency seq_len 0 (silently inf)", ValueError, r"seq_len=0", lambda e: synthesis_experiments.mean_consistency({}, {}, 0)),
    case("mean_consistency nothing (was max() of empty)", ValueError, r"at least one decomposition",
         lambda e: synthesis_experiments.mean_consistency({}, {}, 8)),
    case("mean_parts unknown part", ValueError, r"unknown part 'first'; known: all", lambda e: synthesis_experiments.mean_parts({}, {}, 8, "first")),
    case("mean_parts missing means", KeyError, r"no first-token means", lambda e: synthesis_experiments.mean_parts(e.decomps, {}, 8, "all")),
    case("ablation_frame layer -1 (silently every layer)", ValueError, r"massive layer -1 must lie inside every profile's layers \[4\]",
         lambda e: synthesis_experiments.ablation_frame({"base": e.profile}, -1)),
    case("ablation_frame no profiles (was a pandas error)", ValueError, r"at least one profile", lambda e: synthesis_experiments.ablation_frame({}, 0)),
    case("rank_correlation ragged", ValueError, r"equal length", lambda e: synthesis_experiments.rank_correlation([1, 2, 3], [1, 2])),
    case("rank_correlation too few pairs", ValueError, r"at least 3 complete pairs", lambda e: synthesis_experiments.rank_correlation([1, NAN, 3], [1, 2, 3])),
    case("layer_fraction empty", ValueError, r"non-empty \[layer\]\[kind\]", lambda e: synthesis_experiments.layer_fraction([])),
    case("first_token_means 1-d", ValueError, r"\[N, T\] windows with T >= 2", lambda e: synthesis_experiments.first_token_means(e.llama, e.ids[0], [])),
    case("massive_layer_perplexity wrong kinds", ValueError, r"of kinds \['qq'\]",
         lambda e: synthesis_experiments.massive_layer_perplexity(e.llama, e.decomps, {}, e.inputs, 0, [1], "feature", 50, False, "qq")),
    # ------------------------------------------------------------------------------------ macdrop
    case("Schedule.p 0 epochs (was ZeroDivisionError)", ValueError, r"n_epochs=0.*1-based counts",
         lambda e: macdrop.Schedule("epoch_before").p(1, 10, 0)),
    case("Schedule.p epoch 0 (silently p = 1.6 > 1)", ValueError, r"epoch=0", lambda e: macdrop.Schedule("epoch_before").p(1, 10, 1, epoch=0)),
    case("Schedule.alpha_for 0 steps (was ZeroDivisionError)", ValueError, r"total_steps=0", lambda e: macdrop.Schedule("exp").alpha_for(0)),
    case("Schedule.p step 0", ValueError, r"step 0 is outside 1..10", lambda e: macdrop.Schedule().p(0, 10)),
    case("Schedule unknown kind", ValueError, r"unknown MacDrop schedule 'linear'; known: step", lambda e: macdrop.Schedule("linear")),
    case("Schedule p0 above 1", ValueError, r"p0=1.5 is not a probability", lambda e: macdrop.Schedule(p0=1.5)),
    case("Schedule p0 NaN", ValueError, r"p0=nan", lambda e: macdrop.Schedule(p0=NAN)),
    case("Schedule alpha 0", ValueError, r"alpha=0 must be > 0", lambda e: macdrop.Schedule("exp", alpha=0)),
    case("MacDrop.apply a broadcast mask (silently masked every row alike)", ValueError, r"keep-mask of shape \(64,\); MacDrop needs \(2, 64\)",
         lambda e: e.macdrop.apply(torch.ones(64))),
    case("MacDrop.mask p above 1", ValueError, r"drop probability 1.2 is outside \[0, 1\]", lambda e: e.macdrop.mask(1.2, 1)),
    case("MacDrop duplicate channels", ValueError, r"1..192 distinct channels", lambda e: macdrop.MacDrop(e.llama, 1, [5, 5])),
    case("MacDrop no channels", ValueError, r"distinct channels", lambda e: macdrop.MacDrop(e.llama, 1, [])),
    case("MacDrop trainable base weight", ValueError, r"trainable.*PEFT adapter", lambda e: macdrop.MacDrop(e.gpt2, 1, [0])),
    # ------------------------------------------------------------------------------------ inheritune / gpt
    case("train_batch batch_size 0 (was stack of empty)", ValueError, r"batch_size=0 and block=8 must be >= 1",
         lambda e: training.train_batch(torch.arange(100), 0, 0, 0, 8)),
    case("train_batch block 0 (silently empty inputs)", ValueError, r"block=0", lambda e: training.train_batch(torch.arange(100), 0, 0, 2, 0)),
    case("train_batch window longer than the text", ValueError, r"shorter than one window of 101",
         lambda e: training.train_batch(torch.arange(50), 0, 0, 2, 100)),
    case("val_windows block 0 (silently 1-token windows)", ValueError, r"block=0 must be >= 1", lambda e: training.val_windows(torch.arange(100), 2, 0)),
    case("val_windows too many", ValueError, r"cannot hold 20 windows of 9", lambda e: training.val_windows(torch.arange(100), 20, 8)),
    case("lr_at negative step (silently a negative lr)", ValueError, r"step=-5 must be >= 0", lambda e: training.lr_at(-5, PretrainSettings())),
    case("window_losses 1-d windows (was IndexError)", ValueError, r"\[n, T\].*got shape \(9,\)",
         lambda e: training.window_losses(e.gpt, torch.zeros(9, dtype=torch.long))),
    case("window_losses batch_size 0 (was range() error)", ValueError, r"batch_size=0", lambda e: training.window_losses(e.gpt, torch.zeros(2, 9, dtype=torch.long), 0)),
    case("paired_difference other windows (silently broadcast)", ValueError, r"evaluated on 3 and 1 windows",
         lambda e: training.paired_difference(e.run, e.short_run)),
    case("choose_layers all of them", ValueError, r"n_layers=4 must be between 1 and 3", lambda e: training.choose_layers(4, 4)),
    case("choose_layers unknown choice", ValueError, r"unknown layer choice 'top'; known: first", lambda e: training.choose_layers(4, 2, "top")),
    case("choose_layers explicit out of range", ValueError, r"explicit layers \[0, 9\]", lambda e: training.choose_layers(4, 2, [0, 9])),
    case("grow step 0", ValueError, r"step=0 and max_rounds=3 must be >= 1", lambda e: training.grow(lambda n: e.run, e.run, 1, 0)),
    case("run_experiment unknown variant", ValueError, r"unknown variants \['inherit_all'\]; known: inherit_first",
         lambda e: training.run_experiment(e.gpt.config, PretrainSettings(), torch.arange(10), torch.arange(10), variants=("inherit_all",))),
    case("GPTConfig n_embd 0 (silently a zero-width model)", ValueError, r"every size must be >= 1", lambda e: profiles.GPTConfig(n_embd=0, n_head=1)),
    case("GPTConfig heads do not divide", ValueError, r"n_embd=10 must be a multiple of n_head=4", lambda e: profiles.GPTConfig(n_embd=10, n_head=4)),
    # ------------------------------------------------------------------------------------ data / tasks
    case("token_windows 0 windows (silently a float [0, T] tensor)", ValueError, r"n_windows=0 and window_len=16: need n_windows >= 1",
         lambda e: data.token_windows(e.tok, "tiny-llama", "synthetic", 0, 16)),
    case("token_windows length 1 (silently BOS-only windows)", ValueError, r"window_len >= 2",
         lambda e: data.token_windows(e.tok, "tiny-llama", "synthetic", 2, 1)),
    case("token_windows length 0 (silently 2-token windows)", ValueError, r"window_len=0", lambda e: data.token_windows(e.tok, "tiny-llama", "synthetic", 2, 0)),
    case("token_windows longer than the text", ValueError, r"corpus 'synthetic'/heldout has \d+ tokens.*Lower n_windows or window_len",
         lambda e: data.token_windows(e.tok, "tiny-llama", "synthetic", 4, 100_000)),
    case("token_windows unknown corpus", ValueError, r"unknown corpus 'wikipedia'; known: wiki",
         lambda e: data.token_windows(e.tok, "tiny-llama", "wikipedia", 2, 16)),
    case("token_windows unknown model", KeyError, r"unknown model 'tiny-llama2'; known models: tiny-llama",
         lambda e: data.token_windows(e.tok, "tiny-llama2", "synthetic", 2, 16)),
    case("collate nothing (was max() of empty)", ValueError, r"at least one example", lambda e: data.collate([], 0)),
    case("tokenize_pairs empty text", ValueError, r"max_len=1 cuts every response token",
         lambda e: data.tokenize_pairs(e.tok, "tiny-llama", [{"prompt": "", "response": ""}], 1)),
    case("instruction_pairs more than the pool", ValueError, r"synthetic/val has 400 instruction pairs; asked for 401",
         lambda e: data.instruction_pairs("synthetic", "val", 401)),
    case("instruction_pairs unknown corpus", ValueError, r"unknown corpus 'alpaca'; known: wiki, synthetic, alpaca-gpt4",
         lambda e: data.instruction_pairs("alpaca", "train", 4)),
    case("instruction_pairs unknown split", ValueError, r"unknown instruction split 'test'", lambda e: data.instruction_pairs("wiki", "test", 4)),
    case("wiki_split unknown split", ValueError, r"unknown split 'dev'", lambda e: data.wiki_split("dev")),
    case("token_stream unknown tokenizer", ValueError, r"unknown tokenizer 'bpe'; known: byte, gpt2", lambda e: data.token_stream("synthetic", "train", "bpe")),
    case("build_docs unknown task", ValueError, r"unknown local task 'boolq'; available local tasks: wiki_mc",
         lambda e: tasks.build_docs("boolq", 4)),
    case("build_docs 0 items", ValueError, r"n_items must be a positive int, got 0", lambda e: tasks.build_docs("wiki_mc", 0)),
    case("build_docs too many items", ValueError, r"commonsense: asked for 100000 items.*lower n_items", lambda e: tasks.build_docs("commonsense", 100_000)),
    case("chance_level no docs", ValueError, r"at least one doc", lambda e: tasks.chance_level("wiki_mc", [])),
    case("lm_eval_task_config unknown task", ValueError, r"unknown local task", lambda e: tasks.lm_eval_task_config("nope", "x.jsonl")),
    # ------------------------------------------------------------------------------------ names, claims, manifest
    case("unknown model", KeyError, r"unknown model 'llama-4'; known models: tiny-llama, tiny-gpt2", lambda e: models.load_model("llama-4")),
    case("weights_id unknown model", KeyError, r"known models", lambda e: models.weights_id("gpt5")),
    case("unknown profile", ValueError, r"unknown profile 'tiny'; known profiles: smoke, small, paper",
         lambda e: profiles.load_config("01_massive_activation_origin", "tiny")),
    case("unknown notebook", ValueError, r"notebook '07_x' has no config in profile 'small'; known: 01_", lambda e: profiles.load_config("07_x", "small")),
    case("unknown family", NotImplementedError, r"no accessors for model_type None; known families: llama",
         lambda e: arch.layers(torch.nn.Linear(2, 2))),
    case("unknown arm scope", ValueError, r"unknown MacDrop scope 'half'; known: massive",
         lambda e: finetune.Arm("x", scope="half")),
    case("decide on a list (was a TypeError deep in a comparison)", ValueError, r"a claim decides a finite number",
         lambda e: claims.decide(e.claim.rule, [1, 2], None)),
    case("within unknown tolerance kind (silently absolute)", ValueError, r"tolerance must be \{rel: x\} or \{abs: x\}, not \{'pct': 1\}",
         lambda e: claims.within({"pct": 1}, 1.0, 2.0)),
    case("within empty tolerance (was an unpacking error)", ValueError, r"tolerance must be", lambda e: claims.within({}, 1.0, 2.0)),
    case("claims on an unknown profile (silently 'not_run')", ValueError, r"unknown profile 'smal'; known profiles: smoke, small, paper",
         lambda e: claims.evaluate(e.claim, "smal")),
    case("record a key without a model", ValueError, r"'<model>/<quantity>'", lambda e: manifest.record("ppl", 1.0)),
    case("record without setup", RuntimeError, r"call common.reporting.session.setup", lambda e: manifest.record("m/ppl", 1.0)),
    case("upstream unknown notebook", ValueError, r"has no config in profile", lambda e: manifest.upstream("09_nope", "small")),
    case("upstream not run yet", FileNotFoundError, r"run notebook 06_synthesis on this profile first \(make reproduce NB=06",
         lambda e: manifest.upstream("06_synthesis", "paper")),
]


@pytest.mark.parametrize("exc, match, call", CASES)
def test_bad_input_is_refused_with_a_clear_message(env: SimpleNamespace, exc, match, call) -> None:
    refused(exc, match, lambda: call(env))


def test_refused_weight_edits_leave_the_model_untouched(env: SimpleNamespace) -> None:
    """A refused edit changes nothing: the weights are bit-identical afterwards."""
    before = {k: v.clone() for k, v in env.llama.state_dict().items()}
    for bad in ({-1: [0]}, {1: [0, 192]}, {9: [0]}):
        refused(ValueError, r"outside|out of range", lambda bad=bad: entered(edits.zero_channels(env.llama, bad)))
    refused(ValueError, r"outside", lambda: entered(edits.zero_super_weight(env.llama, 1, -1, 0)))
    refused(ValueError, r"keep-mask", lambda: env.macdrop.apply(torch.ones(1, 64)))
    assert not env.macdrop.active
    assert all(torch.equal(v, before[k]) for k, v in env.llama.state_dict().items())


# ------------------------------------------------------------------------------------ fuzzing


def _ids_strategy() -> st.SearchStrategy:
    """Tensors that may or may not be token ids: 0-3 dims of 0-4, several dtypes, ids in [-3, 262]."""
    shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3)
    dtypes = st.sampled_from([torch.long, torch.int32, torch.uint8, torch.float32, torch.bool])
    return st.tuples(shapes, dtypes, st.integers(-3, models.TINY_VOCAB + 3), st.integers(0, 2**16))


def _make_ids(shape: list[int], dtype: torch.dtype, top: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(-3, max(top, -2) + 1, shape, generator=g)
    return values.to(dtype) if dtype is not torch.long else values


def _valid_ids(ids: torch.Tensor) -> bool:
    return (ids.ndim == 2 and ids.numel() > 0 and ids.dtype == torch.long and int(ids.min()) >= 0
            and int(ids.max()) < models.TINY_VOCAB)


@FUZZ_MODEL
@given(_ids_strategy())
def test_capture_fuzz_valid_or_refused(env: SimpleNamespace, spec) -> None:
    """Any tensor fed to ``capture``: per-layer statistics of the right shape, or a ValueError / TypeError that
    says what token ids must be."""
    ids = _make_ids(*spec)
    with time_limit():
        if _valid_ids(ids):
            s = capture.capture(env.llama, [ids], points=("inter",))
            assert s.pos0["inter"].shape == (ids.shape[0], N_LAYERS, WIDTH)
            assert torch.isfinite(s.pos0["inter"]).all()
        else:
            with pytest.raises((ValueError, TypeError), match=r"token ids|torch.long|vocabulary"):
                capture.capture(env.llama, [ids], points=("inter",))


@FUZZ
@given(st.integers(-6, 10))
def test_layer_index_fuzz(env: SimpleNamespace, i: int) -> None:
    """Every per-layer accessor takes exactly the layers 0..L-1; anything else names the range."""
    if 0 <= i < N_LAYERS:
        assert arch.attention(env.llama, i) is arch.layers(env.llama)[i].self_attn
        assert arch.intermediate_size(env.llama, i) == WIDTH
    else:
        for call in (arch.attention, arch.mlp, arch.down_proj, arch.intermediate_size, arch.ffn_input_blocks):
            refused(ValueError, rf"layer {i} is outside the model's {N_LAYERS} layers", lambda call=call: call(env.llama, i))


@FUZZ
@given(st.lists(st.integers(1, 6), min_size=0, max_size=4), st.sampled_from([torch.float32, torch.float64, torch.long]),
       st.sampled_from(["ok", "nan", "inf", "zero"]), st.integers(0, 2**16))
def test_head_metrics_fuzz(shape: list[int], dtype: torch.dtype, fill: str, seed: int) -> None:
    """Random stacks: causal row-stochastic float matrices give metrics inside their ranges; every other input
    (not square, not float, NaN / inf, all zero) is refused."""
    t = shape[-1] if shape else 0
    full = [*shape[:-1], t, t] if shape else [0]
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(full, generator=g, dtype=torch.float64) + 1e-3
    if len(full) >= 2:
        a = a.tril()
        a = a / a.sum(-1, keepdim=True)
    if fill == "nan" and a.numel():
        a.view(-1)[0] = NAN
    elif fill == "inf" and a.numel():
        a.view(-1)[-1] = math.inf
    elif fill == "zero":
        a = torch.zeros_like(a)
    a = a.to(dtype)
    valid = len(full) >= 2 and t > 0 and dtype.is_floating_point and fill == "ok"
    with time_limit():
        if not valid:
            with pytest.raises((ValueError, TypeError), match=r"\[\.\.\., T, T\]|floating point|finite|all-zero"):
                attention.head_metrics(a)
            return
        out = attention.head_metrics(a)
    for name in ("rank", "mass", "mass_index"):
        assert ((out[name] >= 1) & (out[name] <= t)).all(), name
    assert ((out["sink"] >= 0) & (out["sink"] < t)).all()
    for name in ("sigma1_share", "maxcol_share", "pos0_share"):
        assert ((out[name] >= 0) & (out[name] <= 1 + 1e-9)).all(), name
    assert ((out["erank"] >= 1 - 1e-6) & (out["erank"] <= t + 1e-6)).all()
    assert torch.allclose(out["energy"].sum(-1), torch.ones((), dtype=F64))


@FUZZ
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 200)), st.integers(-3, 5000))
def test_rank_for_fuzz(budget: float, k: int) -> None:
    """``rank_for``: a rank in [1, kappa] for a budget in (0, 1] and kappa >= 1, else a ValueError naming it."""
    if 0 < budget <= 1 and k >= 1:
        r = budgets.rank_for(budget, k)
        assert 1 <= r <= k and (r == 1 or r <= budget * k + 1e-6)
    else:
        refused(ValueError, r"budget|kappa", lambda: budgets.rank_for(budget, k))


@FUZZ
@given(st.integers(-2, 3000), st.integers(-2, 3000))
def test_kappa_fuzz_is_the_break_even_rank(m: int, n: int) -> None:
    """kappa is the largest rank whose factor pair has no more parameters than the dense m x n matrix."""
    if m < 1 or n < 1:
        refused(ValueError, r"must be positive", lambda: budgets.kappa(m, n))
        return
    k = budgets.kappa(m, n)
    assert 0 <= k <= min(m, n)
    assert budgets.factor_params(m, n, k, False) <= m * n < budgets.factor_params(m, n, k + 1, False)


@FUZZ
@given(st.integers(1, 5000))
def test_rank_grid_property(k: int) -> None:
    grid = budgets.rank_grid(k)
    assert grid == sorted(set(grid)) and grid[0] == 1 and grid[-1] == k and all(1 <= r <= k for r in grid)


@FUZZ
@given(st.sampled_from(macdrop.SCHEDULES), st.floats(0, 1), st.integers(1, 300), st.integers(1, 5),
       st.one_of(st.none(), st.floats(1e-4, 1.0)), st.data())
def test_schedule_p_is_a_probability_below_p0_and_never_rises(kind: str, p0: float, total: int, n_epochs: int,
                                                              alpha: float | None, draw) -> None:
    """p_t in [0, p0] at every step, non-increasing over the run (epoch spread evenly over the steps)."""
    s = macdrop.Schedule(kind, p0, alpha)
    steps = sorted(draw.draw(st.lists(st.integers(1, total), min_size=1, max_size=8)))
    ps = [s.p(t, total, n_epochs) for t in steps]
    assert all(0.0 <= p <= p0 + 1e-12 for p in ps)
    assert all(a >= b - 1e-12 for a, b in zip(ps, ps[1:], strict=False))


@FUZZ
@given(st.sampled_from(macdrop.SCHEDULES), st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 5),
       st.integers(-3, 5), st.integers(-2, 4))
def test_schedule_fuzz_valid_or_refused(kind: str, p0: float, step: int, total: int, n_epochs: int) -> None:
    """Any (p0, step, T, epochs): a probability, or a ValueError naming the bad argument."""
    if not 0 <= p0 <= 1:
        refused(ValueError, r"p0=.*not a probability", lambda: macdrop.Schedule(kind, p0))
        return
    s = macdrop.Schedule(kind, p0)
    if not 1 <= step <= total or n_epochs < 1:
        refused(ValueError, r"step .* is outside|n_epochs=", lambda: s.p(step, total, n_epochs))
    else:
        assert 0.0 <= s.p(step, total, n_epochs) <= p0


@FUZZ
@given(st.integers(1, 6), st.integers(1, 40), st.integers(-3, 45), st.integers(-1, 6), st.integers(0, 2**16))
def test_top_channels_fuzz(n: int, width: int, k: int, layer: int, seed: int) -> None:
    """Top-k channels: k distinct in-range indices ranked by mean |x| (descending), or a ValueError naming k
    or the layer."""
    pos0 = torch.randn(n, 3, width, generator=torch.Generator().manual_seed(seed))
    if not 0 < k <= width or not 0 <= layer < 3:
        refused(ValueError, r"k=|layer", lambda: detection.top_channels(pos0, layer, k))
        return
    idx, vals = detection.top_channels(pos0, layer, k)
    assert len(set(idx)) == k and all(0 <= c < width for c in idx)
    assert vals == sorted(vals, reverse=True)
    assert vals[-1] >= float(pos0[:, layer].abs().mean(0).sort(descending=True).values[k - 1]) - 1e-6


@FUZZ
@given(st.integers(1, 60), st.integers(-2, 62), st.integers(0, 100), st.lists(st.integers(-3, 64), max_size=10))
def test_random_channels_fuzz(width: int, k: int, seed: int, exclude: list[int]) -> None:
    pool = [c for c in range(width) if c not in set(exclude)]
    if not 0 < k <= width - len(set(exclude)):
        refused(ValueError, r"k=.* is out of range", lambda: edits.random_channels(width, k, seed, exclude))
        return
    got = edits.random_channels(width, k, seed, exclude)
    assert len(got) == len(set(got)) == k and set(got) <= set(pool)


@FUZZ
@given(st.lists(st.floats(0, 100), min_size=1, max_size=12), st.floats(0.01, 1))
def test_count_to_share_property(values: list[float], share: float) -> None:
    """The count is in [1, K] and the first ``count`` values reach ``share`` of the total (when there is one)."""
    v = torch.tensor(values, dtype=F64)
    c = int(attention.count_to_share(v, share))
    assert 1 <= c <= len(values)
    if v.sum() > 0:
        assert float(v[:c].sum()) >= (share - 1e-6) * float(v.sum())


@FUZZ
@given(st.lists(st.sampled_from([0.0, 1.0]), min_size=1, max_size=30), st.floats(0.5, 0.99), st.integers(0, 50))
def test_bootstrap_interval_property(correct: list[float], level: float, seed: int) -> None:
    lo, hi = evaluation.bootstrap_ci(correct, n_resamples=50, seed=seed, level=level)
    assert min(correct) <= lo <= hi <= max(correct)


@FUZZ
@given(st.integers(2, 12), st.integers(-2, 14), st.sampled_from(["first", "last", "middle"]))
def test_choose_layers_fuzz(n_ref: int, n_layers: int, which: str) -> None:
    if not 0 < n_layers < n_ref:
        refused(ValueError, rf"n_layers={n_layers} must be between 1 and {n_ref - 1}", lambda: training.choose_layers(n_ref, n_layers, which))
        return
    idx = training.choose_layers(n_ref, n_layers, which)
    assert len(idx) == len(set(idx)) == n_layers and all(0 <= i < n_ref for i in idx) and idx == sorted(idx)


@FUZZ
@given(st.integers(-1, 6), st.integers(-1, 40), st.sampled_from(["tiny-llama", "smollm2-135m"]))
def test_token_windows_fuzz(env: SimpleNamespace, n_windows: int, window_len: int, key: str) -> None:
    """Windows of the synthetic corpus: [n, T] long, BOS first exactly when the model's policy says so, and
    consecutive (the text read back in order); or a ValueError naming the counts."""
    call = lambda: data.token_windows(env.tok, key, "synthetic", n_windows, window_len)  # noqa: E731
    if n_windows < 1 or window_len < 2:
        refused(ValueError, r"n_windows=.*window_len=", call)
        return
    with time_limit():
        w = call()
    assert w.shape == (n_windows, window_len) and w.dtype == torch.long
    bos = models.get_spec(key).prepend_bos
    assert bool((w[:, 0] == env.tok.bos_token_id).all()) == bos
    body = w[:, int(bos):].reshape(-1)
    text = env.tok.decode(body.tolist())
    assert data.synthetic_text().startswith(text)


@FUZZ
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=0, max_size=6))
def test_bootstrap_fuzz_valid_or_refused(values: list[float]) -> None:
    if values and all(np.isfinite(values)):
        lo, hi = evaluation.bootstrap_ci(values, n_resamples=20)
        assert min(values) - 1e-6 <= lo <= hi <= max(values) + 1e-6
    else:
        refused(ValueError, r"non-empty 1-d sequence of finite", lambda: evaluation.bootstrap_ci(values))


@FUZZ
@given(st.floats(-5, 5), st.floats(0, 3), st.floats(-5, 5), st.floats(0, 4), st.floats(0, 1))
def test_claims_decide_fuzz(null: float, sesoi: float, lo: float, width: float, at: float) -> None:
    """Any interval gets exactly one status; the statuses mean what the docstring says; `less` mirrors `greater`."""
    hi, value = lo + width, lo + at * width
    up = claims.decide(claims.Rule(null, "greater", sesoi, "items"), value, (lo, hi))
    down = claims.decide(claims.Rule(-null, "less", sesoi, "items"), -value, (-hi, -lo))
    assert up.status == down.status and up.status in claims.STATUSES
    if up.status == "reproduced":
        assert lo > null and hi >= null + sesoi
    if up.status == "contradicted":
        assert hi < null + sesoi
    if up.status == "inconclusive":
        assert lo <= null and hi >= null + sesoi and up.mde == pytest.approx(claims.MDE_PER_WIDTH * width)
