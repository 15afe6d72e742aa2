"""Run notebooks headless: ``python -m common.reporting.run [NN ...] --profile P [--seed S]`` (DESIGN §3).

Each notebook is executed by papermill into ``build/<profile>/NN_name.ipynb`` (never into
``notebooks/``; ``build/paper-dryrun/`` under ``REPRO_WEIGHTS=random``), with ``PROFILE`` and ``SEED``
injected, and any ``--param NAME=VALUE`` (a notebook's other parameters, e.g. ``STEPS=20`` for notebook 04's paper
dry run or ``FULL_GRID=True`` for notebook 03). A failing notebook keeps its executed copy (with the traceback) in
``build/``; the others still run, and the exit status is non-zero. A committed profile's finished notebook is
published with its outputs to ``notebooks/executed/<profile>/`` (``executed.publish``).

Your own model (issue 23): ``--model DIR|HUB_ID [--bos yes|no]`` checks it before any work
(``user_model.check_user_model``), hands it to the kernels in ``REPRO_MODEL`` and runs notebooks 01, 02, 04 and 05 (the
default; 03 and 06 are refused) on it, with the profile's data and settings; figures and manifests go to
``figures/user/<slug>/<profile>/``, executed copies to ``build/user/<slug>/<profile>/``, and nothing is published.
``python -m common.run`` is the same command.

It says where it is (issue 22): a start line per notebook with the time its last committed run took; while it
runs, papermill's bar on a terminal, else a heartbeat every ``HEARTBEAT_S`` seconds (cell k of N, elapsed, the
cell's first line, read from papermill's autosaved copy); at the end a table of each notebook's time against the
expected one.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

from common import REPO_ROOT
from common.core import progress, user_model
from common.core.profiles import PROFILE_NAMES, is_dry_run, load_config, run_name
from common.reporting import executed

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
FIGURES = REPO_ROOT / "figures"
HEARTBEAT_S = 30.0


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


def _manifest(path: Path, profile: str) -> Path:
    """Where notebook ``path``'s run of ``profile`` writes its manifest (your own model's: its config's ``out_dir``)."""
    if user_model.requested():
        return load_config(path.stem, profile).out_dir / "manifest.json"
    return FIGURES / run_name(profile) / path.stem / "manifest.json"


def executed_copy(path: Path, profile: str) -> Path:
    """Where papermill writes notebook ``path``'s executed copy: ``build/<run_name>/``, or your own model's
    ``build/user/<slug>/<run_name>/``."""
    key, run = user_model.requested_key(), run_name(profile)
    return (user_model.out_root(key, run, REPO_ROOT / "build") if key else REPO_ROOT / "build" / run) / path.name


def expected_seconds(path: Path, profile: str) -> float | None:
    """The wall time of ``path``'s last committed run of ``profile`` (its manifest's ``run.wall_s``), or None."""
    try:
        return float(json.loads(_manifest(path, profile).read_text())["run"]["wall_s"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _minutes(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds / 60:.1f} min"


def progress_file(out: Path) -> Path:
    """Where the kernel's library loops write their latest progress line (``common.core.progress``)."""
    return out.with_suffix(".progress")


def _loop_line(out: Path, cell: dict) -> str:
    """The library's latest progress line, if it was written while ``cell`` ran (else "": it is an earlier cell's)."""
    path = progress_file(out)
    line = progress.latest(path)
    started = cell.get("metadata", {}).get("papermill", {}).get("start_time")
    try:
        fresh = started and path.stat().st_mtime >= datetime.fromisoformat(started.replace("Z", "+00:00")).timestamp()
    except (OSError, ValueError):
        return ""
    return line if line and fresh else ""


def _current_cell(out: Path) -> tuple[int, list[dict]] | None:
    """(index of the running, else the last finished, code cell; the code cells) of papermill's autosaved ``out``;
    None before papermill has written it."""
    try:
        cells = [c for c in json.loads(out.read_text())["cells"] if c["cell_type"] == "code"]
    except (OSError, ValueError, KeyError):
        return None
    status = [c.get("metadata", {}).get("papermill", {}).get("status") for c in cells]
    k = next((i for i, st in enumerate(status) if st == "running"), None)
    if k is None:
        done = [i for i, st in enumerate(status) if st == "completed"]
        if not done:
            return None
        k = done[-1]
    return k, cells


def where(out: Path, elapsed: float) -> str | None:
    """A heartbeat from papermill's autosaved ``out``: the running (else the last finished) code cell as ``cell k
    of N``, the elapsed time and the cell's first line, then the library's latest progress line from that cell
    (``progress_file``); None before papermill has written it."""
    if (found := _current_cell(out)) is None:
        return None
    k, cells = found
    first = next((line for line in "".join(cells[k]["source"]).splitlines() if line.strip()), "")
    loop = _loop_line(out, cells[k])
    return (f"cell {k + 1} of {len(cells)}, {int(elapsed // 60)}:{int(elapsed % 60):02d} elapsed: {first[:80]}"
            + (f" | {loop}" if loop else ""))


class Heartbeat(threading.Thread):
    """Prints ``where(out, ...)`` every ``every`` seconds until stopped (a daemon: never outlives the run). On a
    terminal (``tty``), where papermill's bar already names the cell, only a new library progress line is printed,
    above the bar (``tqdm.write``)."""

    def __init__(self, out: Path, label: str, every: float = HEARTBEAT_S, tty: bool = False) -> None:
        super().__init__(daemon=True)
        self.out, self.label, self.every, self.tty = out, label, every, tty
        self.start_time, self.done = time.perf_counter(), threading.Event()

    def run(self) -> None:
        said = ""
        while not self.done.wait(self.every):
            if not self.tty:
                if line := where(self.out, time.perf_counter() - self.start_time):
                    print(f"  {self.label}: {line}", flush=True)
            elif (loop := self._loop()) and loop != said:
                from tqdm import tqdm

                tqdm.write(f"  {self.label}: {loop}")
                said = loop

    def _loop(self) -> str:
        """The running cell's latest library progress line ("" when there is none)."""
        found = _current_cell(self.out)
        return _loop_line(self.out, found[1][found[0]]) if found else ""


def run_notebook(path: Path, profile: str, seed: int, params: dict | None = None,
                 heartbeat: float | None = HEARTBEAT_S) -> tuple[bool, float]:
    """Execute one notebook with papermill; returns (succeeded, seconds). On a terminal papermill's bar shows
    the cells and the library's progress lines appear above it; otherwise a heartbeat every ``heartbeat`` seconds
    (None: quiet)."""
    import papermill as pm

    out = executed_copy(path, profile)
    out.parent.mkdir(parents=True, exist_ok=True)
    tty = sys.stdout.isatty()
    beat = Heartbeat(out, path.stem[:2], heartbeat if not tty else 2.0, tty) if heartbeat else None
    out.unlink(missing_ok=True)  # the heartbeat reads this run's copy only
    progress_file(out).unlink(missing_ok=True)
    os.environ[progress.FILE_VAR] = str(progress_file(out))  # the kernel inherits it: loops report there, not to stderr
    start = time.perf_counter()
    if beat:
        beat.start()
    try:
        pm.execute_notebook(str(path), str(out), parameters={"PROFILE": profile, "SEED": seed, **(params or {})},
                            kernel_name="python3", cwd=str(NOTEBOOK_DIR),
                            progress_bar={"disable": False, "desc": path.stem[:2]} if tty else False,
                            autosave_cell_every=max(1, round(heartbeat or 30)))
        ok = True
    except pm.PapermillExecutionError as err:
        print(f"FAILED {path.name}: {err.ename}: {err.evalue} (executed copy: {out.relative_to(REPO_ROOT)})")
        ok = False
    finally:
        os.environ.pop(progress.FILE_VAR, None)
        if beat:
            beat.done.set()
            beat.join()
    if ok and profile != "smoke" and not is_dry_run(profile) and not user_model.requested():
        executed.publish(out, _manifest(path, profile), executed.EXECUTED / run_name(profile) / path.name)
    return ok, time.perf_counter() - start


def use_model(ref: str | None, bos: str | None, numbers: list[str]) -> list[str]:
    """Check your own model ``ref`` before any work and hand it to the notebooks (``user_model.activate``); returns
    the notebook numbers to run. Any problem (03 / 06 asked, bad input, too large) exits with its message."""
    if ref is None:
        raise SystemExit("--bos goes with --model: it overrides your own model's BOS policy")
    try:
        numbers = user_model.notebook_numbers(numbers)
    except ValueError as err:
        raise SystemExit(f"--model {ref}: {err}") from err
    user = user_model.check_cli(ref, bos)
    user_model.activate(user)
    print(user.summary(), flush=True)
    return numbers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", help="notebook numbers, e.g. 01 03 (default: all)")
    parser.add_argument("--profile", default="small", choices=PROFILE_NAMES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="another notebook parameter (repeatable), e.g. STEPS=20")
    parser.add_argument("--model", metavar="DIR|HUB_ID",
                        help="your own model: a save_pretrained directory or a hub id in the local hub cache; runs "
                             "notebooks 01, 02, 04, 05 on it (the default with --model)")
    parser.add_argument("--bos", choices=("yes", "no"),
                        help="with --model: whether every sequence starts with BOS (default: the tokenizer's policy)")
    args = parser.parse_args(argv)
    params = dict(parse_param(p) for p in args.param)
    numbers = use_model(args.model, args.bos, args.notebooks) if args.model or args.bos else args.notebooks
    failed, rows = [], []
    for nb in select_notebooks(numbers):
        expected = expected_seconds(nb, args.profile)
        print(f"start  {nb.stem} (profile {args.profile}): expected {_minutes(expected)} (its last committed run)",
              flush=True)
        ok, seconds = run_notebook(nb, args.profile, args.seed, params)
        print(f"{'ok' if ok else 'FAILED':6s} {nb.stem:40s} {seconds:7.1f} s  (profile {args.profile})", flush=True)
        rows.append((nb.stem, seconds, expected, ok))
        if not ok:
            failed.append(nb.stem)
    print(f"\n{'notebook':40s} {'time':>10s} {'expected':>10s}  status")
    for stem, seconds, expected, ok in rows:
        print(f"{stem:40s} {_minutes(seconds):>10s} {_minutes(expected):>10s}  {'ok' if ok else 'FAILED'}")
    if failed:
        print(f"{len(failed)} notebook(s) failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
