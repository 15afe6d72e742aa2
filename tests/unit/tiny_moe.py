"""Tiny random mixture-of-experts models (transformers 5's fused experts, and the same experts as an
``nn.ModuleList`` of gated MLPs) with a massive weight planted in one expert (issue 23)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM, MixtralConfig, OlmoeConfig, PretrainedConfig, Qwen2MoeConfig

from common.core import arch

FUSED = ("mixtral", "qwen2_moe", "olmoe")
N_EXPERTS, INTER = 4, 48
PRIVATE, LAYER, EXPERT, CHANNEL, WRITES = 0, 1, 2, 7, 5  # BOS's private hidden dim; the planted expert's place
GAIN = 10.0  # gate and up rows of CHANNEL read PRIVATE with this gain: position-0 state ~ (GAIN * sqrt(d))^2 ~ 3e3

#: detection prompts: BOS first, every id inside the vocabulary of 64
PROMPTS = [torch.tensor([[1, 5 + j, 9, 11 + j, 3, 20 + 2 * j]]) for j in range(4)]


def moe_config(family: str) -> PretrainedConfig:
    """A 2-layer config of ``family`` with hidden 32, 4 experts of intermediate 48, top-2 routing."""
    base = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0, num_experts_per_tok=2)
    if family == "mixtral":
        return MixtralConfig(**base, intermediate_size=INTER, num_local_experts=N_EXPERTS)
    if family == "qwen2_moe":
        return Qwen2MoeConfig(**base, intermediate_size=INTER, moe_intermediate_size=INTER,
                              shared_expert_intermediate_size=INTER, num_experts=N_EXPERTS)
    if family == "olmoe":
        return OlmoeConfig(**base, intermediate_size=INTER, num_experts=N_EXPERTS)
    raise KeyError(family)


class GatedExpert(nn.Module):
    """Mixtral's original expert MLP: w2(act(w1 x) * w3 x)."""
    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act: nn.Module):
        super().__init__()
        self.w1, self.w3, self.w2 = (nn.Linear(w.shape[1], w.shape[0], bias=False) for w in (gate, up, down))
        with torch.no_grad():
            for linear, w in ((self.w1, gate), (self.w3, up), (self.w2, down)):
                linear.weight.copy_(w)
        self.act_fn = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class ListExperts(nn.ModuleList):
    """The experts of a fused experts module as a ModuleList of ``GatedExpert`` (copied weights), called as
    transformers 5 calls its experts: ``(hidden_states [tokens, d], top_k_index, top_k_weights)``."""
    def __init__(self, fused: nn.Module):
        half = fused.gate_up_proj.shape[1] // 2
        super().__init__(GatedExpert(w[:half], w[half:], down, fused.act_fn)
                         for w, down in zip(fused.gate_up_proj.detach(), fused.down_proj.detach(), strict=True))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token, slot = torch.where(top_k_index == e)
            if len(token):
                out.index_add_(0, token, expert(hidden_states[token]) * top_k_weights[token, slot, None])
        return out


def as_module_list(model: nn.Module) -> nn.Module:
    """``model`` with every layer's fused experts replaced by an equal ``ListExperts`` (in place)."""
    for i in range(len(arch.layers(model))):
        arch.mlp(model, i).experts = ListExperts(arch.mlp(model, i).experts)
    return model


def _rows(model: nn.Module, i: int, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate, up, down) weights of expert ``e`` at layer ``i`` (index N_EXPERTS: the shared expert), views into the
    model's storage, read off transformers' modules directly (not through the code under test)."""
    mlp = arch.mlp(model, i)
    if e == N_EXPERTS:
        shared = mlp.shared_expert
        return shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight
    gate, up = mlp.experts.gate_up_proj[e].chunk(2, dim=0)  # the forward's chunk(2): gate first
    return gate, up, mlp.experts.down_proj[e]


@torch.no_grad()
def plant(model: nn.Module, expert: int = EXPERT) -> nn.Module:
    """Plant a massive weight (in place): BOS alone carries hidden dim PRIVATE (nothing else writes it); at LAYER,
    ``expert``'s gate and up rows of CHANNEL read PRIVATE with GAIN (its other rows x0.1), its down column of
    CHANNEL writes hidden dim WRITES, and the router sends BOS to it (a routed expert; ``expert`` =
    N_EXPERTS: Qwen2-MoE's shared expert, which every token goes through)."""
    emb = model.get_input_embeddings().weight
    emb[:, PRIVATE] = 0
    emb[1, PRIVATE] = 1.0
    for i in range(len(arch.layers(model))):
        arch.attention(model, i).o_proj.weight[PRIVATE] = 0
        for e in range(N_EXPERTS + hasattr(arch.mlp(model, i), "shared_expert")):
            _rows(model, i, e)[2][PRIVATE] = 0
    gate, up, down = _rows(model, LAYER, expert)
    gate.mul_(0.1)
    up.mul_(0.1)
    gate[CHANNEL, PRIVATE] = up[CHANNEL, PRIVATE] = GAIN
    down[WRITES, CHANNEL] = 1.0
    if expert < N_EXPERTS:
        arch.mlp(model, LAYER).gate.weight[expert, PRIVATE] = 2.0  # logit ~11: routed first, no underflow to ties
    return model


def build_moe(family: str, planted: bool = True, module_list: bool = False, seed: int = 0,
              expert: int = EXPERT) -> nn.Module:
    """A seeded tiny ``family`` model in eval mode (fp32, CPU), planted unless ``planted=False``; with
    ``module_list``, its experts as ``ListExperts`` (planted before the conversion: the same weights)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(moe_config(family)).eval()
    if planted:
        plant(model, expert)
    return as_module_list(model) if module_list else model
