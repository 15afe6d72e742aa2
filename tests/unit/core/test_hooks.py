"""``common.core.hooks``: every hook fires inside the ``with`` and none survives it, also on exceptions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.core.hooks import first, hooked


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def _n_hooks(net: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules())


def test_each_kind_sees_what_it_should_and_is_removed() -> None:
    net, x = _net(), torch.randn(3, 4)
    seen: dict[str, torch.Tensor] = {}
    hooks = [(net[0], "output", lambda m, a, out: seen.__setitem__("out", out)),
             (net[2], "input", lambda m, args: seen.__setitem__("in", args[0])),
             (net[0], "input_kwargs", lambda m, args, kwargs: seen.__setitem__("kw", args[0]))]
    with hooked(hooks):
        assert _n_hooks(net) == 3
        y = net(x)
    assert _n_hooks(net) == 0
    assert torch.equal(seen["out"], net[0](x)) and torch.equal(seen["kw"], x)
    assert torch.equal(seen["in"], torch.relu(net[0](x)))
    assert torch.equal(net(x), y)  # nothing left behind changes the output


def test_hooks_are_removed_when_the_body_raises() -> None:
    net = _net()
    with pytest.raises(RuntimeError, match="boom"), hooked([(net[0], "output", lambda *a: None)]):
        assert _n_hooks(net) == 1
        raise RuntimeError("boom")
    assert _n_hooks(net) == 0


def test_unknown_kind_refused_and_earlier_hooks_removed() -> None:
    net = _net()
    with pytest.raises(ValueError, match="unknown hook kind 'post'; known: output, input, input_kwargs"):
        with hooked([(net[0], "output", lambda *a: None), (net[2], "post", lambda *a: None)]):
            pass
    assert _n_hooks(net) == 0


def test_a_hook_that_replaces_the_output() -> None:
    """An output hook that returns a value replaces the module's output (how weight-free interventions work)."""
    net, x = _net(), torch.randn(2, 4)
    with hooked([(net[0], "output", lambda m, a, out: torch.zeros_like(out))]):
        assert torch.equal(net(x), net[2](torch.zeros(2, 4)))
    assert not torch.equal(net(x), net[2](torch.zeros(2, 4)))


def test_first_takes_the_tensor_of_a_tuple_output() -> None:
    t = torch.ones(2)
    assert first((t, None)) is t and first(t) is t
