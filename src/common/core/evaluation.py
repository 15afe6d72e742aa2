"""Evaluation: perplexity over fixed token windows (SunMA / HoC protocol, house_of_cards.md §1.2), and
zero-shot accuracy with lm-eval (HoC §2.3) with bootstrap intervals.

Perplexity = exp(total next-token NLL / number of predicted tokens) over all windows; each window is
scored independently (no carried context), and the first token of a window is never predicted.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import random
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.core import arch, data, intervals
from common.core import tasks as task_sets
from common.core.env import cache_dir
from common.core.gpu import world_size
from common.core.layer_inputs import LayerInputs
from common.core.models import get_spec
from common.core.prefix_lm import SharedPrefixHFLM


def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """Perplexity of ``model`` on ``windows`` ([N, T] token ids): exp of the mean of ``window_nll`` (every window
    scores T - 1 tokens, so this is exp(total NLL / tokens))."""
    return math.exp(float(window_nll(model, windows, batch_size).mean()))


@torch.no_grad()
def window_nll(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4) -> np.ndarray:
    """Mean next-token NLL of each window of ``windows`` ([N, T] token ids), ``[N]`` float64: the units a paired
    perplexity interval resamples (``intervals.perplexity_ratio``). Batched; logits are never kept whole."""
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [N, T] with T >= 2, got shape {tuple(windows.shape)}")
    arch.check_ids(model, windows, "windows")
    _check_batch_size(batch_size)
    dev = next(model.parameters()).device
    out = []
    for start in range(0, len(windows), batch_size):
        ids = windows[start:start + batch_size].to(dev)
        logits = model(input_ids=ids, use_cache=False).logits.float()  # a no-op (no copy) in float32
        # targets shifted left, the last position ignored (NLL 0): no copy of the [B, T - 1, V] logits slice
        target = F.pad(ids[:, 1:], (0, 1), value=-100)
        nll = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="none")
        out.append(nll.view(len(ids), -1).cpu().double().sum(1))  # [B, T]: small; float64 sums on the host
    return torch.cat(out).numpy() / (windows.shape[1] - 1)


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r} (a fixed size: never 'auto')")


@torch.no_grad()
def response_loss(model: torch.nn.Module, examples: list[dict], pad_id: int, batch_size: int = 16) -> float:
    """Mean next-token NLL over the response tokens of ``examples`` (the held-out loss of HoC-style SFT)."""
    _check_batch_size(batch_size)
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for start in range(0, len(examples), batch_size):
            b = {k: v.to(dev) for k, v in data.collate(examples[start:start + batch_size], pad_id).items()}
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
            target = b["labels"][:, 1:]
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                                  ignore_index=data.IGNORE, reduction="sum")
            total, count = total + float(nll), count + int((target != data.IGNORE).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError(f"{len(examples)} examples hold no response token to score (labels all {data.IGNORE}); "
                         "pass data.tokenize_pairs output")
    return total / count


#: Known-harmless lm-eval warnings when an in-memory model is evaluated (silenced during the call).
_LM_EVAL_NOISE = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
    "Overwriting default num_fewshot",
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(record.getMessage().startswith(m) for m in _LM_EVAL_NOISE)


@contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """For the call: lm-eval loggers at WARNING without the known-harmless warnings, no datasets
    progress bars (lm-eval's stderr is shown only if the call fails); and python/numpy/torch RNG states restored afterwards (simple_evaluate reseeds them
    globally, which must not perturb the caller's seeded stream)."""
    import datasets

    names = ["lm-eval", "lm_eval", *(n for n in logging.root.manager.loggerDict if n.startswith("lm_eval."))]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    noise = _DropNoise()
    bars = datasets.is_progress_bar_enabled()
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
           torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    for lg in loggers:
        lg.setLevel(logging.WARNING)
        lg.addFilter(noise)
    datasets.disable_progress_bars()
    captured = io.StringIO()  # lm-eval's own tqdm bars ignore TQDM_DISABLE: keep them out of notebooks
    try:
        with contextlib.redirect_stderr(captured):
            yield
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
            lg.removeFilter(noise)
        if bars:
            datasets.enable_progress_bars()
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        if rng[3] is not None:
            torch.cuda.set_rng_state_all(rng[3])


@lru_cache(maxsize=2)
def _task_manager(include_defaults: bool):
    """lm-eval's TaskManager. Indexing its ~14k built-in task YAMLs costs several seconds, so local-only
    runs skip it (inline configs need no index) and the full index is built once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=include_defaults)


def bootstrap_ci(correct: Sequence[float], n_resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> list[float]:
    """Percentile-bootstrap interval of the mean of per-item scores (items resampled with replacement)."""
    values = np.asarray(correct, dtype=float)
    if values.ndim != 1 or values.size == 0 or not np.isfinite(values).all():
        raise ValueError(f"need a non-empty 1-d sequence of finite per-item scores, got shape {values.shape}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level} must be in (0, 1), e.g. 0.95")
    _check_resamples(n_resamples)
    means = intervals.stratified_resamples([values], n_resamples, seed)
    tail = 100 * (1 - level) / 2
    return [float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))]


def _check_resamples(n_resamples: int) -> None:
    if n_resamples < 1:
        raise ValueError(f"n_resamples={n_resamples} must be >= 1 (1000 is the default)")


def zero_shot(model: torch.nn.Module, tok, tasks: list[str], n_items: task_sets.ItemCounts, seed: int = 0,
              batch_size: int = 8, prepend_bos: bool = False) -> dict[str, dict]:
    """Zero-shot accuracy of the in-memory ``model`` with lm-eval (HoC §2.3 protocol).

    ``tasks``: names from ``common.core.tasks.LOCAL_TASKS`` (built from the held-out split, ``n_items`` each, or
    ``n_items[task]`` from a mapping, ``tasks.items_per_task``;
    seeded by ``seed``, written under ``cache_dir()/"tasks"``) and/or ``PAPER_TASKS`` (lm-eval's hub
    datasets; ``n_items`` then limits each to its first items, ``None`` = all; under the dry run their local
    stand-ins, ``tasks.paper_sources``). ``prepend_bos``: the
    model's registry policy (``models.get_spec(key).prepend_bos``), handed to HFLM as ``add_bos_token``.
    ``batch_size`` is fixed (never "auto"). A model spread over several GPUs (``device_map="auto"``, 13B-70B)
    is evaluated as it lies, in this one process: lm-eval feeds the batches to ``model.device`` (the first
    layer's GPU) and accelerate's hooks bring the logits back there (lm-eval's ``parallelize=True``). Not for
    ``accelerate launch``: lm-eval shards requests over processes only for models it loads itself.

    Returns ``{task: {"acc", "metric", "n", "answers", "varies", "ci95", "chance", "scores", "correct"}}``:
    ``answers`` is the choice the headline metric picked for each item and ``varies`` whether they are not all the
    same answer (a model that answers "no" to every yes/no item has no accuracy to lose); ``acc`` is the
    task's headline metric (``metric``: acc or acc_norm), ``ci95`` a percentile bootstrap over items
    (1000 resamples, seeded by ``seed``), ``scores`` both lm-eval metrics, ``correct`` the per-item 0/1
    of the headline metric in doc order (what ``average_accuracy`` resamples).
    """
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in task_sets.LOCAL_TASKS and t not in task_sets.PAPER_TASKS]
    if not tasks or unknown or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must be distinct names from the local tasks ({', '.join(task_sets.LOCAL_TASKS)}) "
                         f"or the paper tasks ({', '.join(task_sets.PAPER_TASKS)}); got {tasks}")
    _check_batch_size(batch_size)
    if world_size() > 1:
        raise RuntimeError("zero_shot runs in one process: under `accelerate launch` every process would score "
                           "every item of an in-memory model (lm-eval shards only models it loads). Run the "
                           "notebook with python/jupyter; device_map='auto' spreads a large model over the GPUs")
    names = [t for t in tasks if t in task_sets.LOCAL_TASKS]
    paper = [t for t in tasks if t in task_sets.PAPER_TASKS]
    counts = task_sets.items_per_task(tasks, n_items)
    if any(counts[t] is None for t in names):
        raise ValueError("local tasks need n_items")
    limits = {counts[t] for t in paper}
    if len(limits) > 1:
        raise ValueError(f"paper tasks share lm-eval's one limit: give them one count, got {sorted(map(str, limits))}")
    limit = limits.pop() if limits else None
    docs = {t: task_sets.build_docs(t, counts[t], seed) for t in names}
    configs = task_sets.materialise(names, {t: counts[t] for t in names}, seed, cache_dir() / "tasks") if names else []
    sources = task_sets.paper_sources(paper, limit, cache_dir() / "tasks")  # hub names, or the dry run's stand-ins

    import lm_eval
    import lm_eval.evaluator  # noqa: F401  (import now, so _quiet_lm_eval sees every lm-eval logger)
    import lm_eval.tasks  # noqa: F401

    was_training = model.training
    try:
        with _quiet_lm_eval():
            # lm-eval's HFLM, scoring each context once for all its choices (prefix_lm). For an in-memory model
            # HFLM ignores ``device`` and feeds batches to model.device: the first layer's device when
            # device_map spread it; accelerate's hooks return the logits there
            lm = SharedPrefixHFLM(pretrained=model, tokenizer=tok, batch_size=batch_size,
                                  add_bos_token=prepend_bos, device=str(model.device))
            out = lm_eval.simple_evaluate(
                model=lm, tasks=[*configs, *sources], task_manager=_task_manager(any(isinstance(x, str) for x in sources)), num_fewshot=0,
                limit=limit, random_seed=seed, numpy_random_seed=1234,
                torch_random_seed=1234, fewshot_random_seed=1234, bootstrap_iters=0, log_samples=True)
    finally:
        model.train(was_training)  # HFLM switches the model to eval mode

    results = {}
    for t in tasks:
        metric = task_sets.PAPER_TASKS.get(t) or task_sets.LOCAL_TASKS[t].metric
        samples = sorted(out["samples"][t], key=lambda s: s["doc_id"])
        correct = [float(s[metric]) for s in samples]
        acc = float(out["results"][t][f"{metric},none"])
        if not math.isclose(acc, sum(correct) / len(correct), abs_tol=1e-9):
            raise RuntimeError(f"{t}: lm-eval's {metric} {acc} disagrees with its per-sample mean")
        if t in docs and len(samples) != len(docs[t]):
            raise RuntimeError(f"{t}: lm-eval scored {len(samples)} docs, built {len(docs[t])}")
        # chance: local tasks from their docs; hub tasks from the number of choices lm-eval scored
        chance = (task_sets.chance_level(t, docs[t]) if t in docs
                  else float(np.mean([1.0 / len(s["arguments"]) for s in samples])))
        answers = [chosen_answer(smp, metric) for smp in samples]
        results[t] = {"acc": acc, "metric": metric, "n": len(samples), "answers": answers,
                      "varies": len(set(answers)) > 1,
                      "ci95": bootstrap_ci(correct, seed=seed), "chance": chance,
                      "scores": {m: float(out["results"][t][f"{m},none"]) for m in ("acc", "acc_norm")
                                 if f"{m},none" in out["results"][t]},
                      "correct": correct}
    return results


def chosen_answer(sample: dict, metric: str) -> str:
    """The continuation lm-eval's ``metric`` picks in one logged sample: the argmax of the log-likelihoods
    (``acc_norm``: per character of the continuation, as lm-eval normalises)."""
    choices = [args[1] for args in sample["arguments"]]
    lls = [float(resp[0]) for resp in sample["filtered_resps"]]
    if metric == "acc_norm":
        lls = [ll / max(1, len(c)) for ll, c in zip(lls, choices, strict=True)]
    return choices[int(np.argmax(lls))]


def varying_tasks(per_task: dict[str, dict]) -> tuple[list[str], list[str]]:
    """(tasks whose answers vary, tasks answered the same way on every item) of one ``zero_shot`` result. Means
    and differences over tasks use the first list of the intact model for every arm of that model (a task the
    intact model answers constantly cannot show an attack's effect: issue 20's rule, fixed before the run)."""
    kept = [t for t, r in per_task.items() if r["varies"]]
    return kept, [t for t in per_task if t not in kept]


def average_accuracy(per_task: dict[str, dict], n_resamples: int = 1000, seed: int = 0) -> dict:
    """Unweighted mean over tasks of the headline metric (HoC's "average accuracy"), with a percentile
    bootstrap interval that resamples items within each task independently. ``per_task``: ``zero_shot``'s
    result (each entry needs its ``correct`` list)."""
    if not per_task:
        raise ValueError("average_accuracy needs at least one task")
    _check_resamples(n_resamples)
    missing = [t for t, r in per_task.items() if not r.get("correct")]
    if missing:
        raise ValueError(f"per-item scores ('correct') missing for {missing}; pass zero_shot's result")
    means = intervals.stratified_resamples([np.asarray(r["correct"], dtype=float) for r in per_task.values()],
                                           n_resamples, seed)
    return {"acc": float(np.mean([r["acc"] for r in per_task.values()])),
            "ci95": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))],
            "chance": float(np.mean([r["chance"] for r in per_task.values()])),
            "n_tasks": len(per_task), "tasks": list(per_task)}


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
