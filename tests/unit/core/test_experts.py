"""``common.core.experts`` and ``common.core.expert_capture`` on tiny mixture-of-experts models: per-expert views of
transformers 5's fused experts and of ModuleList experts, the shared expert, refusals of storage without a certain
view (GPT-OSS, Llama-4), and the position-0 capture of the routed experts' intermediate states."""

from __future__ import annotations

import pytest
import torch
from tiny_families import build_tiny, hooked_forward
from tiny_moe import (
    CHANNEL,
    EXPERT,
    FUSED,
    INTER,
    LAYER,
    N_EXPERTS,
    PROMPTS,
    ListExperts,
    build_moe,
    moe_config,
)
from torch import nn
from transformers import AutoModelForCausalLM, GptOssConfig, Llama4TextConfig
from transformers.models.llama4.modeling_llama4 import Llama4TextExperts

from common.core import arch, experts
from common.core.expert_capture import capture_experts

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = (*FUSED, "mixtral-list")


def _build(variant: str, planted: bool = True) -> nn.Module:
    family, _, kind = variant.partition("-")
    return build_moe(family, planted=planted, module_list=kind == "list")


def test_row_block_index_dense_unchanged_and_expert_leading() -> None:
    """A dense block's index is what it always was; an expert's block leads with the expert and its matrix is that
    expert's slice."""
    w = torch.arange(24.0).view(2, 3, 4)
    idx = torch.tensor([0, 2])
    dense = arch.RowBlock("up", w[0], 0, 1)
    assert dense.index(idx)[0].tolist() == [1, 3] and len(dense.index(idx)) == 1 and dense.matrix is dense.weight
    conv = arch.RowBlock("up", w[0], 1, 0)
    assert conv.index(idx)[0] == slice(None) and conv.index(idx)[1].tolist() == [0, 2]
    fused = arch.RowBlock("gate", w, 0, 1, expert=1)
    assert torch.equal(w[fused.index(torch.tensor([0]))], w[1, 1:2])
    assert torch.equal(fused.matrix, w[1])


@pytest.mark.parametrize("family", FUSED)
def test_fused_storage_counts_and_views(family: str) -> None:
    """Fused experts: 4 experts, gate rows first in gate_up_proj[e], up rows after them, down [d, I], all views."""
    model = build_moe(family, planted=False)
    fused = arch.mlp(model, 1).experts
    assert arch.is_moe_layer(model, 1) and experts.storage(model, 1) == "fused"
    assert experts.num_experts(model, 1) == N_EXPERTS
    assert experts.has_shared_expert(model, 1) == (family == "qwen2_moe")
    gate, up = experts.expert_input_blocks(model, 1, 3)
    assert (gate.name, gate.offset, up.name, up.offset) == ("gate", 0, "up", INTER)
    assert gate.weight is fused.gate_up_proj and gate.expert == up.expert == 3 and gate.bias is None
    assert torch.equal(gate.matrix[:INTER], fused.gate_up_proj[3, :INTER])
    down = experts.expert_down_matrix(model, 1, 3)
    assert down.shape == (32, INTER) and down.data_ptr() == fused.down_proj[3].data_ptr()
    assert experts.expert_intermediate_size(model, 1, 3) == INTER
    with torch.no_grad():  # the index reaches the stored rows of that expert only
        fused.gate_up_proj[gate.index(torch.tensor([5]))] = 7.0
    assert bool((fused.gate_up_proj[3, 5] == 7).all()) and not bool((fused.gate_up_proj[2, 5] == 7).any())
    assert experts.expert_module(model, 1, 3) is fused
    with pytest.raises(ValueError, match="outside layer 1's"):
        experts.expert_input_blocks(model, 1, N_EXPERTS + (family == "qwen2_moe"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_expert_intermediate_is_what_the_forward_feeds_down(variant: str) -> None:
    """For every expert, down(expert_intermediate(x)) is the experts module's own output for x routed to it alone."""
    model = _build(variant)
    module = arch.mlp(model, LAYER).experts
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    for e in range(N_EXPERTS):
        with torch.no_grad():
            out = module(x, torch.full((3, 1), e), torch.ones(3, 1))
            inter = experts.expert_intermediate(model, LAYER, e, x)
            mine = nn.functional.linear(inter, experts.expert_down_matrix(model, LAYER, e))
        assert inter.shape == (3, INTER)
        torch.testing.assert_close(mine, out, rtol=1e-5, atol=1e-6)


def test_module_list_views_equal_fused() -> None:
    """The same experts as a ModuleList: storage "modules", up then gate blocks (dense order) holding the same rows,
    the same down matrix and intermediate state."""
    fused, listed = build_moe("mixtral"), build_moe("mixtral", module_list=True)
    assert experts.storage(listed, LAYER) == "modules" and experts.num_experts(listed, LAYER) == N_EXPERTS
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(1))
    for e in range(N_EXPERTS):
        a = {b.name: b.matrix[b.offset:b.offset + INTER] for b in experts.expert_input_blocks(fused, LAYER, e)}
        blocks = experts.expert_input_blocks(listed, LAYER, e)
        assert [b.name for b in blocks] == ["up", "gate"] and all(b.expert is None for b in blocks)
        assert all(torch.equal(b.weight, a[b.name]) for b in blocks)
        assert blocks[0].weight is arch.mlp(listed, LAYER).experts[e].w3.weight
        assert torch.equal(experts.expert_down_matrix(listed, LAYER, e), experts.expert_down_matrix(fused, LAYER, e))
        assert experts.expert_module(listed, LAYER, e) is arch.mlp(listed, LAYER).experts[e]
        with torch.no_grad():
            torch.testing.assert_close(experts.expert_intermediate(listed, LAYER, e, x),
                                       experts.expert_intermediate(fused, LAYER, e, x))


def test_shared_expert_is_the_last_index() -> None:
    """Qwen2-MoE's shared expert is expert 4 (after the routed 0..3): its up/gate Linear rows and down matrix."""
    model = build_moe("qwen2_moe", planted=False)
    shared = arch.mlp(model, 0).shared_expert
    assert experts.shared_expert(model, 0) is shared
    up, gate = experts.expert_input_blocks(model, 0, N_EXPERTS)
    assert up.weight is shared.up_proj.weight and gate.weight is shared.gate_proj.weight
    assert experts.expert_down_matrix(model, 0, N_EXPERTS) is shared.down_proj.weight
    assert experts.shared_expert(build_moe("mixtral", planted=False), 0) is None


def test_dense_model_and_dense_dispatch() -> None:
    """A dense model has no experts (a ValueError naming arch's accessors); expert=None dispatches to arch."""
    model = build_tiny("llama")
    assert not arch.is_moe_layer(model, 0)
    with pytest.raises(ValueError, match="dense FFN"):
        experts.experts_module(model, 0)
    assert experts.row_blocks(model, 1) == arch.ffn_input_blocks(model, 1)
    assert experts.width(model, 1) == arch.intermediate_size(model, 1)
    moe = build_moe("olmoe", planted=False)
    assert experts.row_blocks(moe, 1, 2) == experts.expert_input_blocks(moe, 1, 2)
    assert experts.width(moe, 1, 2) == INTER
    with pytest.raises(ValueError, match="no mixture-of-experts layer"):
        capture_experts(model, PROMPTS)


def test_dense_layer_of_a_moe_model() -> None:
    """Qwen2-MoE with layer 0 dense (mlp_only_layers): no experts there, and capture records none for it."""
    config = moe_config("qwen2_moe")
    config.mlp_only_layers = [0]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert not arch.is_moe_layer(model, 0) and arch.is_moe_layer(model, 1)
    with pytest.raises(ValueError, match="dense layer"):
        experts.experts_module(model, 0)
    stats = capture_experts(model, PROMPTS[:2])
    assert stats.n_experts == [0, N_EXPERTS + 1]
    assert bool((stats.expert[:, 0] == -1).all()) and bool((stats.expert[:, 1] >= 0).all())


def test_gpt_oss_storage_is_refused() -> None:
    """GPT-OSS stores gate_up transposed and interleaved ([E, d, 2I], with bias): a NotImplementedError naming the
    module and its shapes, from every accessor and from capture, never a view."""
    config = GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=INTER, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=N_EXPERTS,
                          num_experts_per_tok=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert arch.is_moe_layer(model, 0)
    for call in (lambda: experts.storage(model, 0), lambda: experts.expert_input_blocks(model, 0, 0),
                 lambda: experts.expert_down_matrix(model, 0, 0), lambda: capture_experts(model, PROMPTS)):
        with pytest.raises(NotImplementedError, match=r"GptOssExperts.*\(4, 32, 96\).*add its layout"):
            call()


def test_llama4_storage_is_refused() -> None:
    """Llama-4's [E, d, 2I] experts (no transformers 5 layout flags) in a Mixtral: refused, naming the module."""
    model = build_moe("mixtral", planted=False)
    config = Llama4TextConfig(hidden_size=32, intermediate_size=INTER, num_local_experts=N_EXPERTS)
    arch.mlp(model, 1).experts = Llama4TextExperts(config)
    experts.storage(model, 0)
    with pytest.raises(NotImplementedError, match=r"Llama4TextExperts.*\(4, 32, 96\)"):
        experts.num_experts(model, 1)


def _moe_input(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The [B, T, d] input of layer LAYER's MoE block, read by the tests' own hook."""
    seen = []
    hooked_forward(model, ids, lambda: [arch.mlp(model, LAYER).register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach().clone()))])
    return seen[0]


@pytest.mark.parametrize("family", FUSED)
def test_capture_matches_an_independent_computation(family: str) -> None:
    """Capture's routed experts are the router's top-2 for position 0, and their states act(gate x) * up x computed
    here from the MoE input and the stored weights; the planted expert's channel is massive."""
    model = build_moe(family)
    stats = capture_experts(model, PROMPTS)
    shared = family == "qwen2_moe"
    assert stats.pos0.shape == (len(PROMPTS), 2, 2 + shared, INTER)
    assert stats.n_experts == [N_EXPERTS + shared] * 2
    mlp = arch.mlp(model, LAYER)
    for n, ids in enumerate(PROMPTS):
        x = _moe_input(model, ids)[0, 0]
        top = (mlp.gate.weight @ x).topk(2).indices.sort().values.tolist()
        assert stats.expert[n, LAYER].tolist() == top + ([N_EXPERTS] if shared else [])
        for j, e in enumerate(top):
            gate, up = (mlp.experts.gate_up_proj[e] @ x).chunk(2)
            torch.testing.assert_close(stats.pos0[n, LAYER, j], (nn.functional.silu(gate) * up).detach())
    j = stats.expert[0, LAYER].tolist().index(EXPERT)
    assert float(stats.pos0[:, LAYER, j, CHANNEL].abs().min()) > 1000


def test_capture_batched_equals_one_by_one_and_module_list_equals_fused() -> None:
    """One [4, T] batch gives what the 4 prompts give one by one (position 0 of each row); the ModuleList experts
    give the fused experts' numbers."""
    model = build_moe("qwen2_moe")
    single = capture_experts(model, PROMPTS)
    batched = capture_experts(model, [torch.cat(PROMPTS)])
    assert torch.equal(single.expert, batched.expert)
    torch.testing.assert_close(single.pos0, batched.pos0)
    fused, listed = capture_experts(build_moe("mixtral"), PROMPTS), capture_experts(
        build_moe("mixtral", module_list=True), PROMPTS)
    assert torch.equal(fused.expert, listed.expert)
    torch.testing.assert_close(fused.pos0, listed.pos0)


class _LoopingBlock(nn.Module):
    """An older MoE block: routes, then calls each expert of its ModuleList directly (never the container)."""
    def __init__(self, block: nn.Module):
        super().__init__()
        self.gate, self.experts = block.gate, ListExperts(block.experts)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        _, weights, index = self.gate(flat)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(index == e)
            out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])
        return out.view_as(hidden)


def test_capture_refuses_experts_that_are_never_called() -> None:
    """A block that bypasses the experts module's call gives a RuntimeError, not empty statistics."""
    model = build_moe("mixtral")
    layer = arch.layer(model, 1)
    layer.mlp = _LoopingBlock(layer.mlp)
    with pytest.raises(RuntimeError, match=r"layers \[1\] were not called"):
        capture_experts(model, PROMPTS)
    with pytest.raises(ValueError, match="no batches"):
        capture_experts(build_moe("mixtral"), [])


def test_capture_rejects_bad_ids() -> None:
    """Ids outside the vocabulary are refused before any forward."""
    with pytest.raises(ValueError, match="vocabulary"):
        capture_experts(build_moe("olmoe"), [torch.tensor([[1, 64]])])

