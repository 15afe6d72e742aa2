"""One progress channel for the library's long loops (issue 22): training, fine-tunes, decompositions, searches,
the ablation sweeps. A loop calls ``report(task, done, total)`` after each unit of work; nothing else prints
progress.

Where the line goes: under the notebook runner (``common.reporting.run`` sets ``REPRO_PROGRESS_FILE``) it
replaces the content of that file, which the runner shows (off a terminal in its heartbeat, next to the cell it is
in; on one above papermill's bar), so executed notebooks stay free of progress noise; elsewhere (an interactive notebook, a CLI) it goes to stderr. Lines are
throttled to one per ``EVERY_S`` seconds per task (a task's first and last units always report).
``REPRO_QUIET=1`` silences it (CI).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

QUIET_VAR = "REPRO_QUIET"
FILE_VAR = "REPRO_PROGRESS_FILE"
EVERY_S = 10.0

_last: dict[str, float] = {}


def report(task: str, done: int, total: int | None = None, note: str = "") -> None:
    """Say that ``task`` has finished ``done`` of its ``total`` units (``None``: unknown), with an optional
    short ``note`` (e.g. the last validation loss)."""
    if os.environ.get(QUIET_VAR, "") not in ("", "0"):
        return
    now = time.monotonic()
    edge = done <= 1 or (total is not None and done >= total)
    if not edge and now - _last.get(task, -math.inf) < EVERY_S:
        return
    _last[task] = now
    line = f"{task}: {done}/{total if total is not None else '?'}" + (f" {note}" if note else "")
    path = os.environ.get(FILE_VAR)
    if path:
        target = Path(path)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(line + "\n")
        tmp.replace(target)  # atomic: the heartbeat never reads half a line
    else:
        print(line, file=sys.stderr, flush=True)


def each(task: str, items: Iterable[T]) -> Iterator[T]:
    """Yield ``items``, reporting ``task`` after each one (the total is ``len(items)`` where it has one)."""
    total = len(items) if hasattr(items, "__len__") else None
    for done, item in enumerate(items, start=1):
        yield item
        report(task, done, total)


def latest(path: Path) -> str:
    """The last line ``report`` wrote to ``path`` ("" when there is none yet)."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""
