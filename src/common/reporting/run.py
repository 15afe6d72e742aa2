"""Run notebooks headless: ``python -m common.reporting.run [NN ...] --profile P [--seed S]`` (DESIGN §3).

Each notebook is executed by papermill into ``build/<profile>/NN_name.ipynb`` (never into
``notebooks/``; ``build/paper-dryrun/`` under ``REPRO_WEIGHTS=random``), with ``PROFILE`` and ``SEED``
injected, and any ``--param NAME=VALUE`` (a notebook's other parameters, e.g. ``STEPS=20`` for notebook 04's paper dry run or ``FULL_GRID=True`` for notebook 03). A failing notebook keeps its executed copy
(with the traceback) in ``build/``; the others still run, and the exit status is non-zero.
"""

from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path

from common import REPO_ROOT
from common.core.profiles import PROFILE_NAMES, run_name

NOTEBOOK_DIR = REPO_ROOT / "notebooks"


def select_notebooks(prefixes: list[str]) -> list[Path]:
    """Notebooks whose number matches one of ``prefixes`` (all when empty), in order."""
    books = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    if not prefixes:
        return books
    chosen = [b for b in books if any(b.name.startswith(p.zfill(2)) for p in prefixes)]
    missing = [p for p in prefixes if not any(b.name.startswith(p.zfill(2)) for b in books)]
    if missing:
        raise SystemExit(f"no notebook numbered {', '.join(missing)}; available: "
                         f"{', '.join(b.stem for b in books)}")
    return chosen


def parse_param(text: str) -> tuple[str, object]:
    """``NAME=VALUE`` -> (NAME, VALUE as a Python literal, or the string itself)."""
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise SystemExit(f"--param {text!r}: write NAME=VALUE, e.g. STEPS=20")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def run_notebook(path: Path, profile: str, seed: int, params: dict | None = None) -> tuple[bool, float]:
    """Execute one notebook with papermill; returns (succeeded, seconds)."""
    import papermill as pm

    out = REPO_ROOT / "build" / run_name(profile) / path.name
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        pm.execute_notebook(str(path), str(out), parameters={"PROFILE": profile, "SEED": seed, **(params or {})},
                            kernel_name="python3", cwd=str(NOTEBOOK_DIR), progress_bar=False)
        ok = True
    except pm.PapermillExecutionError as err:
        print(f"FAILED {path.name}: {err.ename}: {err.evalue} (executed copy: {out.relative_to(REPO_ROOT)})")
        ok = False
    return ok, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", help="notebook numbers, e.g. 01 03 (default: all)")
    parser.add_argument("--profile", default="small", choices=PROFILE_NAMES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="another notebook parameter (repeatable), e.g. STEPS=20")
    args = parser.parse_args(argv)
    params = dict(parse_param(p) for p in args.param)
    failed = []
    for nb in select_notebooks(args.notebooks):
        ok, seconds = run_notebook(nb, args.profile, args.seed, params)
        print(f"{'ok' if ok else 'FAILED':6s} {nb.stem:40s} {seconds:7.1f} s  (profile {args.profile})", flush=True)
        if not ok:
            failed.append(nb.stem)
    if failed:
        print(f"{len(failed)} notebook(s) failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
