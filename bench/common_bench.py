"""Helpers shared by the benchmarks: interleaved timing and the JSON result file."""

from __future__ import annotations

import ctypes
import json
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each function, run round-robin so machine noise hits all sides alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _rss_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def peak_memory_mb(fn: Callable[[], object]) -> float:
    """Peak memory ``fn`` adds, in MiB: on CUDA the allocator's peak above what was allocated before; on CPU
    the peak resident-set growth (Linux: the high-water mark reset through /proc/self/clear_refs, freed heap
    returned with malloc_trim first, so one side's leftovers do not hide the other's peak)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = _rss_kb("VmRSS")
    fn()
    return (_rss_kb("VmHWM") - base) / 1024


def save(name: str, result: dict) -> Path:
    """Write ``bench/results/<name>.json`` with the machine it ran on."""
    RESULTS.mkdir(exist_ok=True)
    result = {"benchmark": name, "machine": {"cpu_threads": torch.get_num_threads(),
                                            "cuda": torch.cuda.is_available(), "python": platform.python_version(),
                                            "torch": torch.__version__}, **result}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    write_table()
    return path


def write_table() -> None:
    """Regenerate the table in bench/README.md from every results/*.json."""
    rows = ["| benchmark | ratio | value | target | machine |", "|---|---|---|---|---|"]
    for path in sorted(RESULTS.glob("*.json")):
        res = json.loads(path.read_text())
        m = res["machine"]
        where = f"{'GPU' if m['cuda'] else 'CPU'}, {m['cpu_threads']} threads, torch {m['torch']}"
        for ratio, value in res["ratios"].items():
            rows.append(f"| {res['benchmark']} ({res.get('model', '')}) | {ratio} | {value:.3f}x | "
                        f"{res.get('target', '')} | {where} |")
    readme = Path(__file__).parent / "README.md"
    head = readme.read_text().split("<!-- table -->")[0] if readme.exists() else ""
    readme.write_text(head + "<!-- table -->\n" + "\n".join(rows) + "\n")
