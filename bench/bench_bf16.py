"""bf16 on CPU (issue 20): is it faster here, and how far do the suite's numbers move? Side by side in one process,
interleaved: a 2048^3 matmul in fp32 and in bf16; SmolLM2-135M in fp32 and a bf16 copy on the same inputs for
notebook 02's perplexity (held-out wiki windows), zero-shot answers (lm-eval through ``evaluation.zero_shot``) and
notebook 03's held-out response loss.

Reported: the speed ratios (fp32 seconds over bf16 seconds: above 1, bf16 is faster), the CPU's bf16 instructions,
and the differences bf16 makes: perplexity ratio bf16 / fp32 and the largest per-window NLL change, the share of
items whose chosen answer changes and the accuracy change, the response-loss change. Where bf16 is slower (no
avx512_bf16 / AMX: emulated) the suite stays fp32 on CPU whatever the differences, and every manifest says so
(``run.dtype``).

    python bench/bench_bf16.py [--windows 8] [--items 30] [--matmul 2048] [--threads N]
"""

import argparse
import copy
from pathlib import Path

import numpy as np
import torch
from common_bench import interleaved, save

from common.core import data, evaluation, models
from common.core.profiles import load_config

KEY = "smollm2-135m"
TASKS = ("wiki_mc", "wiki_topic", "wiki_cloze", "commonsense")


def cpu_bf16_flags() -> list[str]:
    """The CPU's native bf16 instructions (empty: bf16 matmuls are emulated)."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    return sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})


def matmul_ratio(n: int) -> dict:
    a32, b32 = torch.randn(n, n), torch.randn(n, n)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    t = interleaved({"fp32": lambda: a32 @ b32, "bf16": lambda: a16 @ b16}, repeats=3)
    return {"seconds": t, "fp32_over_bf16": t["fp32"] / t["bf16"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=8, help="held-out wiki windows of 256 tokens")
    ap.add_argument("--items", type=int, default=30, help="items per zero-shot task")
    ap.add_argument("--matmul", type=int, default=2048, help="side of the square matmul")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    matmul = matmul_ratio(args.matmul)
    print(f"{args.matmul}^3 matmul: fp32 / bf16 time {matmul['fp32_over_bf16']:.3f}x; native bf16: {cpu_bf16_flags() or 'none'}")

    fp32, tok = models.load_model(KEY)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    sides = {"fp32": fp32, "bf16": bf16}
    windows = data.token_windows(tok, KEY, "wiki", args.windows, 256)
    nll = {s: evaluation.window_nll(m, windows) for s, m in sides.items()}
    ppl_time = interleaved({s: (lambda m=m: evaluation.window_nll(m, windows)) for s, m in sides.items()},
                           repeats=1, warmup=0)
    ppl = {s: float(np.exp(np.mean(v))) for s, v in nll.items()}

    n_items = {t: min(args.items, 60) if t == "commonsense" else args.items for t in TASKS}
    answers = {}

    def score(side: str) -> None:
        answers[side] = evaluation.zero_shot(sides[side], tok, list(TASKS), n_items)

    zs_time = interleaved({s: (lambda s=s: score(s)) for s in sides}, repeats=1, warmup=0)
    changed = sum(a != b for t in TASKS for a, b in zip(answers["fp32"][t]["answers"], answers["bf16"][t]["answers"], strict=True))
    total = sum(len(answers["fp32"][t]["answers"]) for t in TASKS)
    acc = {s: float(np.mean([answers[s][t]["acc"] for t in TASKS])) for s in sides}

    cfg = load_config("03_macdrop_finetuning", "small")
    pairs = data.tokenize_pairs(tok, KEY, data.instruction_pairs(cfg.corpus, "val", 32, 0), cfg.settings.max_len)
    pad = data.pad_id(tok)
    loss = {s: evaluation.response_loss(m, pairs, pad) for s, m in sides.items()}

    diffs = {"ppl_bf16_over_fp32": ppl["bf16"] / ppl["fp32"],
             "max_abs_window_nll_change": float(np.max(np.abs(nll["bf16"] - nll["fp32"]))),
             "answers_changed_share": changed / total, "accuracy_change": acc["bf16"] - acc["fp32"],
             "response_loss_change": loss["bf16"] - loss["fp32"]}
    ratios = {f"matmul_{args.matmul}_fp32_over_bf16_time": matmul["fp32_over_bf16"],
              "perplexity_fp32_over_bf16_time": ppl_time["fp32"] / ppl_time["bf16"],
              "zero_shot_fp32_over_bf16_time": zs_time["fp32"] / zs_time["bf16"]}
    for name, r in ratios.items():
        print(f"{name:40s} {r:6.3f}x")
    for name, d in diffs.items():
        print(f"{name:40s} {d:+.5f}")
    print(f"({args.windows} windows x 256 tokens, {total} zero-shot items, {len(pairs)} held-out pairs; {KEY})")
    save("bf16", {"model": KEY, "native_bf16": cpu_bf16_flags(), "windows": args.windows, "items": n_items,
                  "seconds": {"matmul": matmul["seconds"], "perplexity": ppl_time, "zero_shot": zs_time},
                  "perplexity": ppl, "accuracy": acc, "response_loss": loss, "differences": diffs, "ratios": ratios,
                  "target": ">= 2x (matmul) where the CPU has native bf16"})


if __name__ == "__main__":
    main()
