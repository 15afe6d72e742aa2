"""Per-architecture accessors (DESIGN §6): a table of decoder *layouts* keyed by ``config.model_type``, and,
for a model whose type is not in the table, the layout inferred from its modules.

Everything else in the library reaches layers, attention, FFN projections and norms only through here.
Weight views are normalised to the ``nn.Linear`` layout: up/gate rows are intermediate channels
(``[I, d]``) and the down projection is ``[d, I]``, whatever the storage (GPT-2 ``Conv1D`` stores the
transpose; Phi-3 fuses gate and up into one ``[2I, d]`` matrix, gate first, as its ``chunk(2)`` does).
A mixture-of-experts FFN (``Arch.experts``) has no single up/gate/down: ``common.core.experts`` reaches
its experts' rows.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Arch:
    """Attribute paths of one layout, relative to the causal-LM model and to one decoder layer."""
    backbone: str  # the model without the LM head
    layers: str  # relative to the backbone
    attn: str
    mlp: str  # the FFN module; "" when the FFN's projections sit in the layer itself (OPT)
    up: str  # "" when fused
    gate: str  # "" when the FFN has no gate (GPT-2)
    down: str
    gate_up: str = ""  # fused [gate; up] projection (Phi-3)
    conv1d: bool = False  # weights stored [in, out] (GPT-2 Conv1D)
    post_ffn_norm: str = ""  # norm applied to the FFN output before the residual add (Gemma 2/3, OLMo-2)
    norm_offset: float = 0.0  # RMSNorm gain = offset + weight (Gemma: 1 + w)
    final_norm: str = "norm"  # the norm after the last layer, relative to the backbone
    experts: str = ""  # mixture of experts: the experts module, relative to the FFN module
    attn_write: str = ""  # attention's output projection, where the attention module adds the residual (BLOOM)

    @property
    def layout(self) -> str:
        """The FFN layout in words (what an inferred model is told)."""
        if self.experts:
            return "mixture-of-experts"
        if self.gate_up:
            return "fused gate-up FFN"
        kind = "gated FFN" if self.gate else "ungated FFN"
        return kind + (" (Conv1D)" if self.conv1d else "")


def _gated(backbone: str = "model", **kw) -> Arch:
    """Llama's layout: model.layers[i].{self_attn, mlp.{gate,up,down}_proj}."""
    return Arch(backbone, "layers", "self_attn", "mlp", "up_proj", "gate_proj", "down_proj", **kw)


def _ungated(backbone: str, layers: str, attn: str, mlp: str, up: str, down: str, final_norm: str, **kw) -> Arch:
    """One input and one output projection (GPT-2, GPT-NeoX, Falcon, OPT, Phi, GPT-J)."""
    return Arch(backbone, layers, attn, mlp, up, "", down, final_norm=final_norm, **kw)


def _moe(mlp: str = "mlp") -> Arch:
    """Llama attention with a mixture-of-experts FFN under ``mlp.experts``; a dense layer among them (Qwen-MoE's
    ``mlp_only_layers``) has Llama's gated projections."""
    return Arch("model", "layers", "self_attn", mlp, "up_proj", "gate_proj", "down_proj", experts="experts")


_LLAMA = _gated()
_GEMMA = _gated(norm_offset=1.0)
_GEMMA_POST = _gated(post_ffn_norm="post_feedforward_layernorm", norm_offset=1.0)
_NEOX = _ungated("gpt_neox", "layers", "attention", "mlp", "dense_h_to_4h", "dense_4h_to_h", "final_layer_norm")


FAMILIES: dict[str, Arch] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "olmo", "granite", "cohere", "stablelm"), _LLAMA),
    "olmo2": _gated(post_ffn_norm="post_feedforward_layernorm"),
    "gemma": _GEMMA,
    "gemma2": _GEMMA_POST,
    # multimodal Gemma-3 (Gemma3ForConditionalGeneration): the text decoder sits under language_model
    "gemma3": _gated("model.language_model", post_ffn_norm="post_feedforward_layernorm", norm_offset=1.0),
    "gemma3_text": _GEMMA_POST,
    "phi3": Arch("model", "layers", "self_attn", "mlp", "", "", "down_proj", gate_up="gate_up_proj"),
    "gpt2": _ungated("transformer", "h", "attn", "mlp", "c_fc", "c_proj", "ln_f", conv1d=True),
    # the compact GPT Inheritune trains (common.inheritune.gpt): GPT-2 names, nn.Linear storage
    "nanogpt": _ungated("transformer", "h", "attn", "mlp", "c_fc", "c_proj", "ln_f"),
    "gpt_bigcode": _ungated("transformer", "h", "attn", "mlp", "c_fc", "c_proj", "ln_f"),
    "starcoder2": _ungated("model", "layers", "self_attn", "mlp", "c_fc", "c_proj", "norm"),
    "gpt_neox": _NEOX,
    "falcon": _ungated("transformer", "h", "self_attention", "mlp", "dense_h_to_4h", "dense_4h_to_h", "ln_f"),
    "bloom": _ungated("transformer", "h", "self_attention", "mlp", "dense_h_to_4h", "dense_4h_to_h", "ln_f",
                      attn_write="dense"),
    "gptj": _ungated("transformer", "h", "attn", "mlp", "fc_in", "fc_out", "ln_f"),
    "phi": _ungated("model", "layers", "self_attn", "mlp", "fc1", "fc2", "final_layernorm"),
    "opt": _ungated("model", "decoder.layers", "self_attn", "", "fc1", "fc2", "decoder.final_layer_norm"),
    **dict.fromkeys(("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe"), _moe()),
    "granitemoe": _moe("block_sparse_moe"),
}


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft ``PeftModel`` (its adapters stay injected and active), else
    ``model`` itself. Every accessor below goes through it, so they all work on peft models too."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


_ATTN = ("self_attn", "attn", "attention", "self_attention")
_FFN = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
_GATED = ("gate_proj", "up_proj", "down_proj")
_PAIRS = (("up_proj", "down_proj"), ("c_fc", "c_proj"), ("fc1", "fc2"), ("fc_in", "fc_out"),
          ("dense_h_to_4h", "dense_4h_to_h"))
_FINAL = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")
_INFERRED: weakref.WeakKeyDictionary[nn.Module, Arch] = weakref.WeakKeyDictionary()  # per model instance
_SAID: set[tuple[type, str, str]] = set()  # (class, model_type, layout) told once per process


def _children(module: nn.Module) -> list[str]:
    return [name for name, _ in module.named_children()]


def _layer_stack(body: nn.Module, n_layers: int | None) -> str | None:
    """The shortest path under ``body`` to a ModuleList of ``n_layers`` modules (the decoder layers)."""
    found = [name for name, m in body.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) == n_layers and name]
    return min(found, key=lambda n: (n.count("."), n)) if found else None


def _probe_offset(norm: nn.Module) -> float:
    """The gain offset of a norm (1.0 for Gemma's ``1 + w``, else 0), read off one input of unit RMS and zero
    mean, where RMSNorm and LayerNorm both return ``gain * x (+ bias)``."""
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.ndim != 1 or len(w) < 2:
        return 0.0
    w = w.detach()
    x = torch.ones(len(w), dtype=w.dtype, device=w.device)
    x[1::2] = -1
    with torch.no_grad():
        out = norm(x[None])[0].float()
    bias = getattr(norm, "bias", None)
    gain = (out - (bias.detach().float() if isinstance(bias, torch.Tensor) else 0)) / x.float()
    return float(round(float((gain - w.float()).median())))


def _body(model: nn.Module) -> tuple[str, nn.Module | None]:
    """A transformers model's ``base_model_prefix`` and the backbone under it (None without one)."""
    prefix = getattr(model, "base_model_prefix", "")
    return prefix, getattr(model, prefix, None) if prefix else None


def infer_arch(model: nn.Module) -> Arch | None:
    """The layout of a transformers causal LM read off its modules (no table entry needed), or None when
    none matches: the backbone is ``base_model``, the layers the ModuleList of ``num_hidden_layers`` modules
    in it, attention and FFN the layer children of the usual names, the FFN projections one of the known
    gated / fused / ungated name sets, or an ``experts`` child (mixture of experts)."""
    prefix, body = _body(model)
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n_layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
    stack = _layer_stack(body, n_layers) if isinstance(body, nn.Module) else None
    if stack is None:
        return None
    layer = body.get_submodule(stack)[0]
    names = _children(layer)
    attn = next((n for n in _ATTN if n in names), None)
    mlp = next((n for n in _FFN if n in names), "")
    ffns = [other.get_submodule(mlp) if mlp else other for other in body.get_submodule(stack)]
    kinds = {tuple(_children(f)) for f in ffns}
    moe = [f for f in ffns if hasattr(f, "experts")]
    if moe and all(all(hasattr(f, n) for n in _GATED) for f in ffns if f not in moe):
        ffn = moe[0]  # MoE layers among gated dense ones (DeepSeek's first dense layers): one MoE entry serves both
    elif len(kinds) == 1:
        ffn = ffns[0]
    else:
        return None  # layers of different FFN layouts that no one entry describes
    inside = _children(ffn)
    parent = stack.rpartition(".")[0]  # OPT: the final norm sits beside the layers, under model.decoder
    final = next((f"{parent}.{n}".lstrip(".") for n in _FINAL if n in _children(body.get_submodule(parent))), None)
    if attn is None or final is None:
        return None
    common = dict(post_ffn_norm="post_feedforward_layernorm" if "post_feedforward_layernorm" in names else "",
                  norm_offset=_probe_offset(body.get_submodule(final)), final_norm=final)
    if mlp and "experts" in inside:
        return Arch(prefix, stack, attn, mlp, "up_proj", "gate_proj", "down_proj", experts="experts", **common)
    if "gate_up_proj" in inside and "down_proj" in inside:
        return Arch(prefix, stack, attn, mlp, "", "", "down_proj", gate_up="gate_up_proj", **common)
    if all(n in inside for n in _GATED):
        return Arch(prefix, stack, attn, mlp, "up_proj", "gate_proj", "down_proj", **common)
    for up, down in _PAIRS:
        if up in inside and down in inside:
            conv1d = type(ffn.get_submodule(up)).__name__ == "Conv1D"
            return Arch(prefix, stack, attn, mlp, up, "", down, conv1d=conv1d, **common)
    return None


def _describe(model: nn.Module) -> str:
    """What a model's modules look like, for the error when no layout matches."""
    prefix, body = _body(model)
    if not isinstance(body, nn.Module):
        return f"no transformers backbone ({type(model).__name__} has no base_model_prefix)"
    lists = [f"{n} ({len(m)})" for n, m in body.named_modules() if isinstance(m, nn.ModuleList)][:4]
    out = f"backbone {prefix!r} with children {_children(body)}; module lists {lists}"
    if lists:
        first = body.get_submodule(lists[0].split(" ")[0])[0]
        out += f"; a layer's children {_children(first)}"
        ffn = next((n for n in _FFN if n in _children(first)), None)
        if ffn:
            out += f"; its {ffn!r} children {_children(first.get_submodule(ffn))}"
    return out


def arch_of(model: nn.Module) -> Arch:
    """The accessor entry for ``model``: the table's row for ``config.model_type``, else the layout inferred
    from its modules (said once per model class and layout), else a NotImplementedError listing what was found."""
    model = unwrap(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if model in _INFERRED:  # per instance: one class can take different layouts by config (dense first layers)
        return _INFERRED[model]
    inferred = infer_arch(model)
    if inferred is None:
        raise NotImplementedError(
            f"no accessors for model_type {model_type!r}; known families: {', '.join(FAMILIES)}. No known "
            f"layout matches its modules: {_describe(model)}. Add one entry to common.core.arch.FAMILIES, "
            f"e.g. FAMILIES[{model_type!r}] = Arch(backbone, layers, attn, mlp, up, gate, down, ...)")
    said = (type(model), str(model_type), inferred.layout)
    if said not in _SAID:
        _SAID.add(said)
        print(f"common.core.arch: model_type {model_type!r} is not in the table; inferred a {inferred.layout} "
              f"layout from its modules ({inferred.backbone}.{inferred.layers}[i].{inferred.mlp or '<layer>'})",
              file=sys.stderr)
    _INFERRED[model] = inferred
    return inferred


def _get(obj: nn.Module, path: str) -> nn.Module:
    """``obj``'s submodule at dotted ``path`` ("" is ``obj`` itself)."""
    return obj.get_submodule(path) if path else obj


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


def logits(model: nn.Module, normed: torch.Tensor) -> torch.Tensor:
    """The model's float32 logits from final-normed hidden states: the LM head, then the family's transform of
    its logits where it has one (Gemma-2/3 ``final_logit_softcapping``, Cohere's ``logit_scale`` multiplier,
    Granite's ``logits_scaling`` divisor), as its own forward applies them."""
    out = lm_head(model)(normed).float()
    cfg = getattr(unwrap(model), "config", None)
    if cap := getattr(cfg, "final_logit_softcapping", None):
        out = torch.tanh(out / cap) * cap
    if isinstance(scale := getattr(unwrap(model), "logit_scale", None), (int, float)):
        out = out * scale
    if (divisor := getattr(cfg, "logits_scaling", None)) is not None:
        out = out / divisor
    return out


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
    """FFN module of layer ``i`` (the layer itself where the projections sit in it, as in OPT)."""
    return _get(layer(model, i), arch_of(model).mlp)


def attention_output(model: nn.Module, i: int) -> nn.Module:
    """The module whose output is what layer ``i``'s attention writes (before any post-norm): the attention
    module, or its output projection where the module adds the residual itself (BLOOM)."""
    return _get(attention(model, i), arch_of(model).attn_write)


def ffn_output(model: nn.Module, i: int) -> nn.Module:
    """The module whose output is what layer ``i``'s FFN writes (before any post-norm): the down projection of
    a dense FFN (OPT's FFN has no module of its own; BLOOM's adds the residual inside its MLP module), the
    whole block of a mixture of experts (the routed experts' weighted sum, plus any shared expert)."""
    return mlp(model, i) if arch_of(model).experts else down_proj(model, i)


def is_moe_layer(model: nn.Module, i: int) -> bool:
    """Whether layer ``i``'s FFN holds an experts module (False for a dense model, or a dense layer of a MoE one)."""
    name = arch_of(model).experts
    return bool(name) and hasattr(mlp(model, i), name)


def _dense(model: nn.Module, i: int) -> Arch:
    """The layout, or a ValueError when layer ``i``'s FFN is a mixture of experts (no single up/gate/down)."""
    if is_moe_layer(model, i):
        raise ValueError(f"layer {i}'s FFN is a mixture of experts: it has no single up/gate/down projection; "
                         "reach one expert's rows through common.core.experts")
    return arch_of(model)


def down_proj(model: nn.Module, i: int) -> nn.Module:
    """The FFN output projection of layer ``i``: its *input* is the intermediate state (HoC eq. 1)."""
    return _get(mlp(model, i), _dense(model, i).down)


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
    ``dim`` (0 for ``nn.Linear``, 1 for ``Conv1D``). For one expert of a fused ``[E, rows, d]`` expert
    weight (``common.core.experts``), ``expert`` is its leading index: the rows are those of ``weight[expert]``."""
    name: str
    weight: nn.Parameter
    dim: int
    offset: int
    bias: nn.Parameter | None = None  # per-channel bias of this block, if the projection has one
    expert: int | None = None  # leading index into a fused 3-D expert weight

    def index(self, channels: torch.Tensor) -> tuple:
        """Index tuple selecting ``channels`` in ``weight``."""
        idx = channels + self.offset
        lead = () if self.expert is None else (self.expert,)
        return (*lead, idx) if self.dim == 0 else (*lead, slice(None), idx)

    @property
    def matrix(self) -> torch.Tensor:
        """The 2-D weight whose rows (``dim`` 0) or columns (``dim`` 1) are the channels: ``weight`` itself,
        or the expert's slice of a fused 3-D weight."""
        return self.weight if self.expert is None else self.weight[self.expert]


def ffn_input_blocks(model: nn.Module, i: int) -> list[RowBlock]:
    """The weights whose rows produce the intermediate channels of layer ``i``: up and gate (HoC's
    "massive weights" live here), fused gate_up as two blocks, or GPT-2's single ``c_fc``."""
    a, m = _dense(model, i), mlp(model, i)
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
