"""Findings rendered from the manifest (in the spirit of MyST's ``glue``): a notebook's "What we find" prose is a
template in ``notebooks/findings/<notebook>.md`` whose numbers are manifest keys, so the text always states this
run's numbers and a rerun cannot leave it stale.

Template syntax, inside ``{...}``:

- ``{[model/quantity]}`` or ``{[model/quantity]:.2f}``: a manifest value with an optional format spec (lists
  are formatted element by element);
- an arithmetic expression over keys, numbers, ``abs``/``min``/``max``/``len``/``round`` and indexing:
  ``{[a/ppl] / [a/base]:.1f}``, ``{[a/list][0]}`` (keys contain a slash, so ``[0]`` is an index);
- a sign choice, ``{expr ? text if > 0 | text otherwise}``: a sentence that states a direction takes it from the
  number it is about (``MacDrop {[x] - [y] ? lowers | does not lower} the loss``), so it cannot contradict it;
- ``{{`` and ``}}`` for literal braces.

``keys(template)`` lists the keys a template names (the tests check them against the committed manifests);
``render`` refuses a template that names a key the records lack, naming the key.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from pathlib import Path

from common import REPO_ROOT
from common.core import manifest

FINDINGS_DIR = REPO_ROOT / "notebooks" / "findings"

_FIELD = re.compile(r"(?<!\{)\{(?!\{)(?P<body>[^{}]+)\}(?!\})")
_KEY = re.compile(r"\[(?P<key>[^\[\]/]+/[^\[\]]+)\]")  # keys contain a slash; [0] is an index
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_FUNCTIONS = {"abs": abs, "min": min, "max": max, "len": len, "round": round}


def template_path(notebook: str) -> Path:
    """``notebooks/findings/<notebook>.md``."""
    return FINDINGS_DIR / f"{notebook}.md"


def keys(template: str) -> list[str]:
    """Every manifest key a template names, in order of first use."""
    found = [k.group("key") for f in _FIELD.finditer(template) for k in _KEY.finditer(f.group("body"))]
    return list(dict.fromkeys(found))


def _evaluate(expr: str, values: dict[str, object]) -> object:
    names: dict[str, object] = {}

    def name_of(match: re.Match) -> str:
        key = match.group("key")
        if key not in values:
            raise KeyError(f"findings template names {key!r}, which this run's manifest does not have")
        names[f"_k{len(names)}"] = values[key]
        return f"_k{len(names) - 1}"

    tree = ast.parse(_KEY.sub(name_of, expr.strip()), mode="eval")

    def walk(node: ast.AST) -> object:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.Name) and node.id in names:
            return names[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](walk(node.operand))
        if isinstance(node, ast.Subscript):
            return walk(node.value)[walk(node.slice)]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS:
            return _FUNCTIONS[node.func.id](*(walk(a) for a in node.args))
        raise ValueError(f"findings expression {expr!r}: only [keys], numbers, + - * / **, indexing and "
                         f"{', '.join(_FUNCTIONS)} are allowed")

    return walk(tree)


def _format(value: object, spec: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_format(v, spec) for v in value) + "]"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if spec:
        return format(value, spec)
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _field(body: str, values: dict[str, object]) -> str:
    if "?" in body:
        expr, choices = body.split("?", 1)
        if "|" not in choices:
            raise ValueError(f"findings choice {{{body}}}: write {{expr ? text if > 0 | text otherwise}}")
        positive, otherwise = (c.strip() for c in choices.split("|", 1))
        value = _evaluate(expr, values)
        return positive if value is not None and value > 0 else otherwise
    expr, _, spec = body.rpartition(":") if re.search(r":[^\]]*$", body) else (body, "", "")
    return _format(_evaluate(expr, values), spec.strip())


def render(template: str, records: list[dict]) -> str:
    """The template with every field replaced by this run's values (KeyError naming a key the records lack)."""
    values = {r["key"]: r["value"] for r in records}
    text = _FIELD.sub(lambda m: _field(m.group("body"), values), template)
    return text.replace("{{", "{").replace("}}", "}")


def missing(template: str, records: list[dict]) -> list[str]:
    """The keys a template names that the records lack."""
    present = {r["key"] for r in records}
    return [k for k in keys(template) if k not in present]


def show(notebook: str | None = None):
    """Render the active notebook's findings from its manifest as Markdown. Under a profile whose manifest
    lacks the template's keys (``smoke`` and your own model run other models), say so instead of printing a partial
    text."""
    from IPython.display import Markdown

    current = manifest.current()
    notebook = notebook or current.notebook
    template = template_path(notebook).read_text()
    absent = missing(template, current.records)
    if absent:
        return Markdown(f"*The findings are written for the `small` profile's models; this run (`{current.profile}`, "
                        f"models: {', '.join(current.run['models']) or 'none'}) lacks {len(absent)} of their keys, "
                        f"e.g. `{absent[0]}`: the table below has its numbers.*")
    return Markdown(render(template, current.records))
