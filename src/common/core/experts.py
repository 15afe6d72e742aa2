"""Per-expert access to a mixture-of-experts FFN (``arch.Arch.experts``; issue 23): one expert's input rows,
down matrix, intermediate size and intermediate state, in ``arch``'s conventions (rows ``[I, d]``, down ``[d, I]``).

Two storages are read, each only where its layout is certain:

- ``"fused"``: transformers 5's experts module (Mixtral, Qwen2-/Qwen3-MoE, OLMoE, PhiMoE, GraniteMoE):
  ``gate_up_proj`` ``[E, 2I, d]`` whose forward splits ``linear(x, gate_up_proj[e]).chunk(2)`` gate first,
  ``down_proj`` ``[E, d, I]``, and the ``use_experts_implementation`` flags of that layout (not transposed,
  concatenated, gated, no bias, no post-expert norm, the default ``act(gate) * up``);
- ``"modules"``: ``experts`` an ``nn.ModuleList`` of gated MLPs, ``gate_proj/up_proj/down_proj`` or Mixtral's
  original ``w1`` (gate) / ``w3`` (up) / ``w2`` (down).

Anything else (GPT-OSS's transposed, interleaved, biased ``[E, d, 2I]``; Llama-4's ``[E, d, 2I]``) raises a
NotImplementedError naming the module and its shapes, never a guessed view.

Qwen2-MoE's ``shared_expert`` (a dense gated MLP every token goes through) is exposed as one more expert: index
``num_experts(model, i)``, after the routed ones (``has_shared_expert``).

peft's LoRA on fused expert weights (``ParamWrapper``, what ``target_modules="all-linear"`` does to them) is looked
through: outside its forward the base module's parameters are the frozen base weights, and inside it (where the
capture hooks run) they carry the adapters' delta, as the forward uses them.
"""

from __future__ import annotations

import torch
from torch import nn

from common.core import arch
from common.core.hooks import hooked

_PARTS = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))  # (gate, up, down) names of one gated MLP
_FUSED_FLAGS = {"is_transposed": False, "is_concatenated": True, "has_gate": True, "has_bias": False,
                "has_post_expert_norm": False}


#: Names of the shared expert module in the MoE blocks of transformers 5.
SHARED_NAMES = ("shared_expert", "shared_experts", "shared_mlp")


def _wrapped(model: nn.Module, i: int) -> nn.Module:
    """Layer ``i``'s experts module as it sits in the FFN (a peft wrapper, where there is one); a ValueError for a
    dense FFN."""
    a = arch.arch_of(model)
    if not a.experts:
        raise ValueError(f"model_type {getattr(model.config, 'model_type', None)!r} has a dense FFN, no experts: "
                         "use common.core.arch (ffn_input_blocks, down_matrix) and leave expert=None")
    if not arch.is_moe_layer(model, i):
        raise ValueError(f"layer {i}'s FFN ({type(arch.mlp(model, i)).__name__}) has no {a.experts!r} module: a "
                         "dense layer of a mixture-of-experts model; pick a layer with experts")
    return arch.mlp(model, i).get_submodule(a.experts)


def experts_module(model: nn.Module, i: int) -> nn.Module:
    """The experts module of layer ``i``'s mixture-of-experts FFN, inside any peft wrappers; a ValueError for a
    dense FFN."""
    m = _wrapped(model, i)
    while isinstance(getattr(m, "base_layer", None), nn.Module):
        m = m.base_layer
    return m


def _mlp_parts(mlp: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module] | None:
    """(gate, up, down) projections of a gated MLP with one of the known name sets, else None."""
    children = dict(mlp.named_children())
    for names in _PARTS:
        if all(n in children for n in names):
            return tuple(children[n] for n in names)
    return None


def _is_fused(m: nn.Module) -> bool:
    """Whether ``m`` is a transformers 5 experts module in the one fused layout read here (module docstring)."""
    gate_up, down = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.ndim == down.ndim == 3):
        return False
    n, rows, d = gate_up.shape
    flags = all(getattr(m, k, None) is v for k, v in _FUSED_FLAGS.items())
    default_gate = getattr(getattr(type(m), "_apply_gate", None), "__qualname__", None) == "_default_apply_gate"
    return (flags and default_gate and callable(getattr(m, "act_fn", None)) and rows % 2 == 0
            and tuple(down.shape) == (n, d, rows // 2))


def _unsupported(m: nn.Module, what: str) -> NotImplementedError:
    shapes = {n: tuple(p.shape) for n, p in list(m.named_parameters())[:6]}
    flags = {k: getattr(m, k) for k in _FUSED_FLAGS if hasattr(m, k)}
    return NotImplementedError(
        f"{what} ({type(m).__name__}) stores its weights as {shapes}{f' with flags {flags}' if flags else ''}: "
        "common.core.experts reads only transformers 5's fused experts (gate_up_proj [E, 2I, d] split gate-first by "
        "chunk(2), down_proj [E, d, I], no bias, act(gate) * up) and an nn.ModuleList of gated MLPs (gate_proj/"
        "up_proj/down_proj or w1/w3/w2). Transposed or interleaved storage (GPT-OSS, Llama-4) has no certain row "
        "view here: add its layout to common.core.experts")


def storage(model: nn.Module, i: int) -> str:
    """How layer ``i`` stores its experts: ``"fused"`` or ``"modules"`` (module docstring); else a
    NotImplementedError naming the module and its shapes."""
    m = experts_module(model, i)
    if isinstance(m, nn.ModuleList) and len(m) and all(_mlp_parts(e) is not None for e in m):
        return "modules"
    if _is_fused(m):
        return "fused"
    raise _unsupported(m, f"layer {i}'s experts module")


def num_experts(model: nn.Module, i: int) -> int:
    """The number of routed experts of layer ``i`` (the shared expert, where there is one, not counted)."""
    m = experts_module(model, i)
    return len(m) if storage(model, i) == "modules" else m.gate_up_proj.shape[0]


def shared_expert(model: nn.Module, i: int) -> nn.Module | None:
    """Layer ``i``'s shared expert, the dense gated MLP every token goes through (Qwen2-MoE's ``shared_expert``,
    DeepSeek's and GLM-4-MoE's ``shared_experts``, GraniteMoeShared's ``shared_mlp``), or None."""
    ffn = arch.mlp(model, i)
    return next((m for name in SHARED_NAMES if isinstance(m := getattr(ffn, name, None), nn.Module)), None)


def has_shared_expert(model: nn.Module, i: int) -> bool:
    """Whether layer ``i`` has a shared expert (then expert index ``num_experts(model, i)`` is it)."""
    return shared_expert(model, i) is not None


def _expert_mlp(model: nn.Module, i: int, e: int) -> nn.Module | None:
    """Expert ``e``'s own gated MLP (``"modules"`` storage, or the shared expert), None for a fused expert;
    a ValueError for an index outside the layer's experts."""
    kind, n = storage(model, i), num_experts(model, i)
    shared = shared_expert(model, i)
    total = n + (shared is not None)
    if not 0 <= e < total:
        raise ValueError(f"expert {e} is outside layer {i}'s {total} experts ({n} routed"
                         f"{', then the shared one' if shared is not None else ''}); pick 0 <= expert < {total}")
    mlp = shared if e == n else (experts_module(model, i)[e] if kind == "modules" else None)
    if mlp is not None and _mlp_parts(mlp) is None:
        raise _unsupported(mlp, f"layer {i}'s expert {e}")
    return mlp


def expert_module(model: nn.Module, i: int, e: int) -> nn.Module:
    """The module holding expert ``e``'s projections, with any peft wrappers (for checks on them): its own MLP,
    or the fused experts module."""
    mlp = _expert_mlp(model, i, e)
    return _wrapped(model, i) if mlp is None else mlp


def expert_input_blocks(model: nn.Module, i: int, e: int) -> list[arch.RowBlock]:
    """The weights whose rows make expert ``e``'s intermediate channels at layer ``i`` (HoC's massive weights):
    a fused expert's gate and up halves of ``gate_up_proj[e]`` (``RowBlock.expert = e``), or its MLP's up and
    gate ``nn.Linear`` weights."""
    mlp = _expert_mlp(model, i, e)
    if mlp is None:
        w = experts_module(model, i).gate_up_proj
        half = w.shape[1] // 2
        return [arch.RowBlock("gate", w, 0, 0, expert=e), arch.RowBlock("up", w, 0, half, expert=e)]
    gate, up, _ = _mlp_parts(mlp)
    return [arch.RowBlock("up", up.weight, 0, 0, up.bias), arch.RowBlock("gate", gate.weight, 0, 0, gate.bias)]


def expert_down_matrix(model: nn.Module, i: int, e: int) -> torch.Tensor:
    """Expert ``e``'s down projection at layer ``i`` as a ``[d, I]`` view (column c writes channel c)."""
    mlp = _expert_mlp(model, i, e)
    return experts_module(model, i).down_proj[e] if mlp is None else _mlp_parts(mlp)[2].weight


def expert_intermediate_size(model: nn.Module, i: int, e: int) -> int:
    """Width of expert ``e``'s intermediate state at layer ``i``."""
    return expert_down_matrix(model, i, e).shape[1]


def expert_intermediate(model: nn.Module, i: int, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e``'s intermediate state act(W_gate x) * W_up x for the ``[n, d]`` FFN inputs ``x`` (HoC eq. 1):
    what its forward feeds its down projection. Fused: recomputed from ``gate_up_proj[e]`` as the forward does;
    an MLP expert: the input of its down projection, read by a hook while the expert runs on ``x``."""
    mlp = _expert_mlp(model, i, e)
    if mlp is None:
        m = experts_module(model, i)
        gate, up = nn.functional.linear(x, m.gate_up_proj[e]).chunk(2, dim=-1)
        return m.act_fn(gate) * up
    seen: list[torch.Tensor] = []
    with hooked([(_mlp_parts(mlp)[2], "input", lambda _m, args: seen.append(args[0]))]):
        mlp(x)
    return seen[0]


def row_blocks(model: nn.Module, i: int, expert: int | None = None) -> list[arch.RowBlock]:
    """The input rows of layer ``i``'s intermediate channels: the dense FFN's (``expert=None``,
    ``arch.ffn_input_blocks``) or expert ``expert``'s (``expert_input_blocks``)."""
    return arch.ffn_input_blocks(model, i) if expert is None else expert_input_blocks(model, i, expert)


def width(model: nn.Module, i: int, expert: int | None = None) -> int:
    """The intermediate size of layer ``i``'s dense FFN (``expert=None``) or of expert ``expert``."""
    return arch.intermediate_size(model, i) if expert is None else expert_intermediate_size(model, i, expert)
