"""Per-architecture accessors: one table entry per model family (DESIGN §6), so a new family is one line.

Everything else in the library reaches layers, attention, FFN projections and norms only through here.
Weight views are normalised to the ``nn.Linear`` layout: up/gate rows are intermediate channels
(``[I, d]``) and the down projection is ``[d, I]``, whatever the storage (GPT-2 ``Conv1D`` stores the
transpose; Phi-3 fuses gate and up into one ``[2I, d]`` matrix, gate first, as its ``chunk(2)`` does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Arch:
    """Attribute paths of one family, relative to the causal-LM model and to one decoder layer."""
    backbone: str  # the model without the LM head
    layers: str  # relative to the backbone
    attn: str
    mlp: str
    up: str  # "" when fused
    gate: str  # "" when the FFN has no gate (GPT-2)
    down: str
    gate_up: str = ""  # fused [gate; up] projection (Phi-3)
    conv1d: bool = False  # weights stored [in, out] (GPT-2 Conv1D)
    post_ffn_norm: str = ""  # norm applied to the FFN output before the residual add (Gemma 2/3)
    norm_offset: float = 0.0  # RMSNorm gain = offset + weight (Gemma: 1 + w)
    final_norm: str = "norm"  # the norm after the last layer, relative to the backbone


_LLAMA = Arch("model", "layers", "self_attn", "mlp", "up_proj", "gate_proj", "down_proj")


_GEMMA = Arch("model", "layers", "self_attn", "mlp", "up_proj", "gate_proj", "down_proj", norm_offset=1.0)


_GEMMA_POST = Arch("model", "layers", "self_attn", "mlp", "up_proj", "gate_proj", "down_proj",
                   post_ffn_norm="post_feedforward_layernorm", norm_offset=1.0)


FAMILIES: dict[str, Arch] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gemma": _GEMMA,
    "gemma2": _GEMMA_POST,
    # multimodal Gemma-3 (Gemma3ForConditionalGeneration): the text decoder sits under language_model
    "gemma3": Arch("model.language_model", "layers", "self_attn", "mlp", "up_proj", "gate_proj", "down_proj",
                   post_ffn_norm="post_feedforward_layernorm", norm_offset=1.0),
    "gemma3_text": _GEMMA_POST,
    "phi3": Arch("model", "layers", "self_attn", "mlp", "", "", "down_proj", gate_up="gate_up_proj"),
    "gpt2": Arch("transformer", "h", "attn", "mlp", "c_fc", "", "c_proj", conv1d=True, final_norm="ln_f"),
    # the compact GPT Inheritune trains (common.inheritune.gpt): GPT-2 names, nn.Linear storage
    "nanogpt": Arch("transformer", "h", "attn", "mlp", "c_fc", "", "c_proj", final_norm="ln_f"),
}


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft ``PeftModel`` (its adapters stay injected and active), else
    ``model`` itself. Every accessor below goes through it, so they all work on peft models too."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def arch_of(model: nn.Module) -> Arch:
    """The accessor entry for ``model`` (by ``config.model_type``); unknown families list the known ones."""
    model = unwrap(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise NotImplementedError(f"no accessors for model_type {model_type!r}; known families: "
                                  f"{', '.join(FAMILIES)}. Add one entry to common.core.arch.FAMILIES.")
    return FAMILIES[model_type]


def _get(obj: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def backbone(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (call it to skip the vocabulary projection)."""
    return _get(unwrap(model), arch_of(model).backbone)


def layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers."""
    return _get(backbone(model), arch_of(model).layers)


def layer(model: nn.Module, i: int) -> nn.Module:
    """Decoder layer ``i``: a ValueError for ``i`` outside [0, L) (never Python's wrap-around of -1)."""
    stack = layers(model)
    if not 0 <= i < len(stack):
        raise ValueError(f"layer {i} is outside the model's {len(stack)} layers; pick 0 <= layer < {len(stack)}")
    return stack[i]


def final_norm(model: nn.Module) -> nn.Module:
    """The norm between the last decoder layer and the LM head."""
    return _get(backbone(model), arch_of(model).final_norm)


def lm_head(model: nn.Module) -> nn.Module:
    """The vocabulary projection (tied or not)."""
    model = unwrap(model)
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else model.lm_head


def check_ids(model: nn.Module, ids: torch.Tensor, name: str = "ids") -> None:
    """Refuse anything but a non-empty [B, T] torch.long tensor of ids inside the model's vocabulary (torch would
    fail deep inside the embedding, or on CUDA with a device-side assert). The vocabulary is the rows of the
    model's LM head; a model without one (a bare scorer returning ``.logits``) gets the shape checks only."""
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.numel() == 0:
        raise ValueError(f"{name} must be a non-empty [B, T] tensor of token ids, got shape "
                         f"{tuple(getattr(ids, 'shape', ()))}")
    if ids.dtype != torch.long:
        raise TypeError(f"{name} must be torch.long token ids, got {ids.dtype}; tokenise the text, or call .long()")
    try:
        vocab = lm_head(model).weight.shape[0]
    except AttributeError:  # no LM head to read the vocabulary from
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"{name} holds token id {lo if lo < 0 else hi}, outside the model's vocabulary [0, {vocab}); "
                         "encode with the model's own tokenizer")


def attention(model: nn.Module, i: int) -> nn.Module:
    """Self-attention module of layer ``i``."""
    return _get(layer(model, i), arch_of(model).attn)


def mlp(model: nn.Module, i: int) -> nn.Module:
    """FFN module of layer ``i``."""
    return _get(layer(model, i), arch_of(model).mlp)


def down_proj(model: nn.Module, i: int) -> nn.Module:
    """The FFN output projection of layer ``i``: its *input* is the intermediate state (HoC eq. 1)."""
    return _get(mlp(model, i), arch_of(model).down)


def post_ffn_norm(model: nn.Module, i: int) -> nn.Module | None:
    """Norm applied to the FFN output before the residual add (Gemma 2/3), else ``None``."""
    a = arch_of(model)
    return _get(layer(model, i), a.post_ffn_norm) if a.post_ffn_norm else None


def norm_gain(model: nn.Module, norm: nn.Module) -> torch.Tensor:
    """Effective per-dim gain of an RMSNorm (Gemma stores ``w`` and scales by ``1 + w``)."""
    return norm.weight.detach().float() + arch_of(model).norm_offset


def intermediate_size(model: nn.Module, i: int = 0) -> int:
    """Width of the FFN intermediate state of layer ``i``."""
    return down_matrix(model, i).shape[1]


def down_matrix(model: nn.Module, i: int) -> torch.Tensor:
    """Down-projection weight of layer ``i`` as a ``[d, I]`` view (column c writes channel c)."""
    w = down_proj(model, i).weight
    return w.T if arch_of(model).conv1d else w


@dataclass(frozen=True)
class RowBlock:
    """Intermediate-channel rows of one FFN input weight: channel c is ``weight[c + offset]`` along
    ``dim`` (0 for ``nn.Linear``, 1 for ``Conv1D``)."""
    name: str
    weight: nn.Parameter
    dim: int
    offset: int
    bias: nn.Parameter | None = None  # per-channel bias of this block, if the projection has one

    def index(self, channels: torch.Tensor) -> tuple:
        """Index tuple selecting ``channels`` in ``weight``."""
        idx = channels + self.offset
        return (idx,) if self.dim == 0 else (slice(None), idx)


def ffn_input_blocks(model: nn.Module, i: int) -> list[RowBlock]:
    """The weights whose rows produce the intermediate channels of layer ``i``: up and gate (HoC's
    "massive weights" live here), fused gate_up as two blocks, or GPT-2's single ``c_fc``."""
    a, m = arch_of(model), mlp(model, i)
    if a.gate_up:
        proj = _get(m, a.gate_up)
        n = proj.weight.shape[0] // 2
        return [RowBlock("gate", proj.weight, 0, 0, proj.bias), RowBlock("up", proj.weight, 0, n, proj.bias)]
    up = _get(m, a.up)
    blocks = [RowBlock("up", up.weight, 1 if a.conv1d else 0, 0, up.bias)]
    if a.gate:
        gate = _get(m, a.gate)
        blocks.append(RowBlock("gate", gate.weight, 0, 0, gate.bias))
    return blocks
