"""The paper-shape dry run's cost table (issue 9 §1), for a GPU box: ``make dry-run`` runs every notebook's
``paper`` path with ``REPRO_WEIGHTS=random`` (bf16, full-size configs, the small data), then this script

1. times one perplexity pass of every paper model with a shipped config (random bf16 weights, ``N_WINDOWS``
   windows of its context up to 4096 tokens, batch 1): tokens/s, peak GPU memory, MFU (common.core.profiling);
2. reads each notebook's dry-run manifest (``build/figures/paper-dryrun/*/manifest.json``): wall time, peak
   host memory, peak GPU memory;

and writes both to ``docs/PAPER_DRYRUN.md`` (and ``docs/paper_dryrun.json``). On CPU, set
``REPRO_RANDOM_SHRINK`` (the CI test does): the same code on shrunk configs, and the table says so.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from common import REPO_ROOT
from common.core import data, env, models, profiling

N_WINDOWS = 4
MAX_LEN = 4096
DOCS = REPO_ROOT / "docs"


def model_rows(keys: list[str], n_windows: int = N_WINDOWS, max_len: int = MAX_LEN) -> list[dict]:
    """One timed perplexity pass per model (random weights; ``REPRO_WEIGHTS=random`` must be set)."""
    rows = []
    for key in keys:
        model, tok = models.load_model(key)
        seq = min(max_len, model.config.max_position_embeddings)
        windows = data.token_windows(tok, key, "wiki", n_windows, seq)
        stats = profiling.perplexity_pass(model, windows, batch_size=1)
        rows.append({"model": key, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                     "seq_len": seq, "params_b": sum(p.numel() for p in model.parameters()) / 1e9, **stats})
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def notebook_rows(root: Path) -> list[dict]:
    """Wall time and peak memory of each notebook's dry run, from its manifest's run block."""
    rows = []
    for path in sorted(root.glob("*/manifest.json")):
        run = json.loads(path.read_text())["run"]
        # a notebook that failed never reached summary(): it has no wall time (and is reported as failed)
        rows.append({"notebook": path.parent.name, "status": "ok" if "wall_s" in run else "failed",
                     "wall_min": run.get("wall_s", float("nan")) / 60,
                     "peak_rss_gb": run.get("peak_rss_mb", float("nan")) / 1024,
                     "peak_gpu_gb": (run["peak_gpu_mb"] / 1024) if run.get("peak_gpu_mb") else None})
    return rows


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def write(models_: list[dict], notebooks: list[dict], out: Path = DOCS) -> Path:
    """``PAPER_DRYRUN.md`` (two tables) and ``paper_dryrun.json`` under ``out``."""
    shrink = env.random_weights()
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    lines = ["# Paper-shape dry run", "",
             f"Random weights, the paper models' shipped configs{f' shrunk {shrink}x' if shrink and shrink > 1 else ''}, "
             f"on {dev} (torch {torch.__version__}). Regenerate with `make dry-run` on a GPU box; the numbers say "
             "what the `paper` profile costs, never what it finds (the weights are random).", ""]
    if dev == "CPU":
        lines += ["**No GPU ran this table.** It comes from the CPU test path: every code path of the paper profile ran, "
                  "but the speeds, memory and MFU of a shrunk model on a CPU say nothing about a GPU box. The "
                  "7B/8B-shape table needs `make dry-run` on one.", ""]
    lines += ["## Perplexity pass (one model at a time, batch 1)", "",
              "| model | dtype | params (M) | seq | tokens/s | peak GPU (GB) | TFLOP/s | MFU |", "|---|---|---|---|---|---|---|---|"]
    for r in models_:
        lines.append(f"| {r['model']} | {r['dtype']} | {r['params_b'] * 1e3:,.0f} | {r['seq_len']} | {r['tokens_per_s']:,.0f} | "
                     f"{_fmt(r['peak_mem_mb'] and r['peak_mem_mb'] / 1024, '.1f')} | {r['tflops']:.1f} | "
                     f"{_fmt(r['mfu'], '.1%')} |")
    run = "make test-dryrun" if shrink and shrink > 1 else "make dry-run"
    lines += ["", f"## Notebooks (`{run}`)", "",
              "| notebook | status | wall (min) | peak host memory (GB) | peak GPU memory (GB) |", "|---|---|---|---|---|"]
    for r in notebooks:
        lines.append(f"| {r['notebook']} | {r['status']} | {r['wall_min']:.1f} | {r['peak_rss_gb']:.1f} | "
                     f"{_fmt(r['peak_gpu_gb'], '.1f')} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "paper_dryrun.json").write_text(json.dumps({"device": dev, "shrink": shrink, "models": models_,
                                                      "notebooks": notebooks}, indent=1) + "\n")
    path = out / "PAPER_DRYRUN.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    if env.random_weights() is None:
        raise SystemExit("set REPRO_WEIGHTS=random (make dry-run does): this table is of the random-weight dry run")
    keys = [k for k, s in models.REGISTRY.items() if s.config_file]
    # CPU (the shrunk test path): shorter windows, the 128K-entry vocabulary's logits would take GBs
    rows = model_rows(keys) if torch.cuda.is_available() else model_rows(keys, n_windows=2, max_len=512)
    for r in rows:
        print(f"{r['model']:12s} {r['tokens_per_s']:10,.0f} tok/s  MFU {_fmt(r['mfu'], '.1%')}")
    root = REPO_ROOT / "build" / "figures" / "paper-dryrun"
    print("->", write(rows, notebook_rows(root), Path(os.environ.get("REPRO_DRYRUN_DOCS", DOCS))))


if __name__ == "__main__":
    main()
