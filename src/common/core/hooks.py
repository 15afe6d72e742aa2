"""The one way the library hooks a forward pass (DESIGN §6: hooks, never forward monkey-patching).

``hooked(pairs)`` registers forward hooks (``"output"``: ``hook(module, args, output)``) or pre-hooks
(``"input"``: ``hook(module, args)``; ``"input_kwargs"``: ``hook(module, args, kwargs)``) on modules and removes
every one of them on exit, also on exceptions, so registration and removal live in one place. Named capture
points (``hidden``, ``inter``, ...) are built on it in ``common.core.capture``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from torch import nn

KINDS = ("output", "input", "input_kwargs")

Hook = tuple[nn.Module, str, Callable]


@contextmanager
def hooked(hooks: Iterable[Hook]) -> Iterator[None]:
    """Register ``(module, kind, fn)`` hooks (kind in ``KINDS``) for the body of the ``with``; all removed on exit."""
    handles = []
    try:
        for module, kind, fn in hooks:
            if kind == "output":
                handles.append(module.register_forward_hook(fn))
            elif kind == "input":
                handles.append(module.register_forward_pre_hook(fn))
            elif kind == "input_kwargs":
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
            else:
                raise ValueError(f"unknown hook kind {kind!r}; known: {', '.join(KINDS)}")
        yield
    finally:
        for handle in handles:
            handle.remove()


def first(out):
    """The hidden-state tensor of a module output (decoder layers and attention return tuples in some versions)."""
    return out[0] if isinstance(out, tuple) else out
