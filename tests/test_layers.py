"""The library's layering (docs/ARCHITECTURE.md): imports point one way (core -> paper packages -> synthesis ->
reporting), paper packages do not import each other, no import cycle, no function-local import of a library
module (which is how cycles hide), and no module over ~500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from common import REPO_ROOT

SRC = REPO_ROOT / "src"
LAYER = {"core": 0, "hoc": 1, "inheritune": 1, "sfsd": 1, "synthesis": 2, "reporting": 3, "run": 4}  # common.run: the runner's short name
PAPERS = ("hoc", "inheritune", "sfsd")
MAX_LINES = 520
#: Each step of the GPU check imports what it exercises, so a broken import fails that step, not the whole
#: report (the point of a check run once on a rented GPU box).
LOCAL_IMPORTS_ALLOWED = {"common.reporting.gpu_check"}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted((SRC / "common").rglob("*.py"))}


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported library module, whether the import sits inside a function) for every ``common`` import."""
    tree = ast.parse(path.read_text())
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "common":
            for alias in node.names:
                target = f"{node.module}.{alias.name}"
                found.append((target if target in MODULES else node.module, id(node) in local))
        elif isinstance(node, ast.Import):
            found += [(a.name, id(node) in local) for a in node.names if a.name.split(".")[0] == "common"]
    return found


def package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYER) else None


def graph() -> dict[str, set[str]]:
    return {m: {t for t, _ in imports(p) if t in MODULES and t != m} for m, p in MODULES.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (found := visit(t)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_every_module_is_in_a_layer() -> None:
    loose = [m for m in MODULES if m != "common" and package(m) not in LAYER]
    assert not loose, f"modules outside core/hoc/inheritune/sfsd/synthesis/reporting: {loose}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module: str) -> None:
    here = package(module)
    if here is None:
        return
    for target, _ in imports(MODULES[module]):
        there = package(target)
        if there is None:
            continue
        assert LAYER[there] <= LAYER[here], f"{module} imports {target}: {there} is above {here}"
        if here in PAPERS and there in PAPERS:
            assert there == here, f"{module} imports {target}: paper packages import only the core"


def test_no_function_local_library_imports() -> None:
    offenders = [f"{m} -> {t}" for m, p in MODULES.items() if m not in LOCAL_IMPORTS_ALLOWED
                 for t, local in imports(p) if local]
    assert not offenders, f"import these at the top of the module: {offenders}"


def test_no_import_cycle() -> None:
    assert find_cycle(graph()) is None, f"import cycle: {' -> '.join(find_cycle(graph()))}"


def test_the_cycle_finder_finds_a_planted_cycle() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(edges) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "d": {"a", "b"}}) is None


def test_local_imports_are_detected(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("from common.core import arch\n\ndef f():\n    from common.core.data import token_windows\n")
    assert imports(src) == [("common.core.arch", False), ("common.core.data", True)]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_small(module: str) -> None:
    n = len(MODULES[module].read_text().splitlines())
    assert n <= MAX_LINES, f"{module} has {n} lines: split it by job (DESIGN: each module has one job)"


def test_one_hook_mechanism() -> None:
    """Every forward hook of the library goes through ``common.core.hooks.hooked`` (registration and removal in
    one place)."""
    offenders = [m for m, p in MODULES.items() if m != "common.core.hooks"
                 and any(s in p.read_text() for s in ("register_forward_hook", "register_forward_pre_hook"))]
    assert not offenders, f"register hooks with common.core.hooks.hooked instead: {offenders}"
