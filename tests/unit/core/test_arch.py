"""``common.core.arch``: per-family accessors, checked on a tiny random model of every buildable family."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny_families import ALL_FAMILIES as FAMILY_NAMES
from tiny_families import HIDDEN, INFERRED, INTER, N_LAYERS, VOCAB, hooked_forward
from torch import nn

from common.core import arch

GATED = tuple(f for f in FAMILY_NAMES if f in INFERRED or arch.FAMILIES[f].gate or arch.FAMILIES[f].gate_up)
POST_NORM = ("gemma2", "gemma3_text", "olmo2")


def _inter_size(family: str) -> int:
    return 4 * HIDDEN if family in ("gpt2", "bloom") else INTER  # their configs have no FFN width of their own


def _ids(seed: int = 0, shape=(2, 8)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, shape, generator=g)


def _down_inputs(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Full input of every layer's down projection (own hooks, not ``common.core.capture``)."""
    store: list[torch.Tensor | None] = [None] * len(arch.layers(model))
    hooked_forward(model, ids, lambda: [arch.down_proj(model, i).register_forward_pre_hook(
        lambda _m, args, i=i: store.__setitem__(i, args[0].detach().clone())) for i in range(len(store))])
    return store


def _io(module: nn.Module, model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first positional/keyword input, first output) of ``module`` during one forward pass."""
    seen = {}

    def hook(_m, args, kwargs, out):
        seen["in"] = args[0] if args else kwargs["hidden_states"]
        # a copy: Falcon adds the attention output into its MLP's output in place afterwards
        seen["out"] = (out[0] if isinstance(out, tuple) else out).clone()

    h = module.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        h.remove()
    return seen["in"], seen["out"]


@pytest.mark.parametrize("family", [f for f in FAMILY_NAMES if f not in INFERRED])
def test_arch_of_uses_model_type(make_tiny, family: str) -> None:
    """The accessor entry is the table row of the model's ``config.model_type``."""
    model = make_tiny(family)
    assert model.config.model_type == family
    assert arch.arch_of(model) is arch.FAMILIES[family]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_layers_length(make_tiny, family: str) -> None:
    """``layers()`` is the list of all decoder layers."""
    layers = arch.layers(make_tiny(family))
    assert isinstance(layers, nn.ModuleList)
    assert len(layers) == N_LAYERS


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_backbone_output_is_final_hidden_state(make_tiny, family: str) -> None:
    """Calling the backbone gives the model's last hidden state (after the final norm, before the LM head)."""
    model, ids = make_tiny(family), _ids()
    body = arch.backbone(model)
    with torch.no_grad():
        full = model(input_ids=ids, output_hidden_states=True, use_cache=False)
        out = body(input_ids=ids, use_cache=False)
    assert not hasattr(out, "logits") or out.logits is None
    assert out.last_hidden_state.shape == (*ids.shape, HIDDEN)
    torch.testing.assert_close(out.last_hidden_state, full.hidden_states[-1], rtol=0, atol=0)
    # the LM head is not part of the backbone
    head = model.get_output_embeddings()
    assert all(m is not head for m in body.modules())


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_attention_mlp_postnorm_make_up_the_residual_update(make_tiny, family: str) -> None:
    """layer_out = layer_in + attn_branch + ffn_branch, with the branches read from ``attention_output()`` and
    ``ffn_output()`` (through the post-norms where the family has them): the accessors point at the right
    modules, in sequential and parallel (GPT-NeoX, Falcon, Phi, GPT-J, Cohere) layers alike."""
    model, ids = make_tiny(family), _ids(1)
    for i in range(N_LAYERS):
        layer = arch.layers(model)[i]
        x_in, x_out = _io(layer, model, ids)
        _, attn = _io(arch.attention_output(model, i), model, ids)
        _, ffn = _io(arch.ffn_output(model, i), model, ids)
        ffn = ffn.view_as(attn)  # OPT's FFN runs on its tokens flattened to [B * T, d]
        if family in POST_NORM:
            with torch.no_grad():
                attn = layer.post_attention_layernorm(attn)
                ffn = arch.post_ffn_norm(model, i)(ffn)
        torch.testing.assert_close(x_out, x_in + attn + ffn, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_post_ffn_norm_only_for_gemma2_and_3(make_tiny, family: str) -> None:
    """``post_ffn_norm()`` is a module exactly for the families with a post-FFN norm, ``None`` otherwise."""
    model = make_tiny(family)
    norm = arch.post_ffn_norm(model, 0)
    if family in POST_NORM:
        assert isinstance(norm, nn.Module)
        assert norm is arch.layers(model)[0].post_feedforward_layernorm
        assert norm is not arch.post_ffn_norm(model, 1)
    else:
        assert norm is None


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_down_matrix_is_hidden_by_intermediate(make_tiny, family: str) -> None:
    """``down_matrix`` is [hidden, intermediate] in every family and column c is what channel c writes:
    down_proj(e_c) - down_proj(0) == down_matrix[:, c] (the bias cancels). It is a view of the parameter."""
    model = make_tiny(family)
    w = arch.down_matrix(model, 0)
    assert w.shape == (HIDDEN, _inter_size(family))
    down = arch.down_proj(model, 0)
    assert w.data_ptr() == down.weight.data_ptr()
    eye = torch.eye(w.shape[1])
    with torch.no_grad():
        written = down(eye) - down(torch.zeros(1, w.shape[1]))  # row c = what channel c writes
    torch.testing.assert_close(written, w.T.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_intermediate_size_matches_down_proj_input(make_tiny, family: str) -> None:
    """``intermediate_size`` equals the config width and the width of the captured down_proj input."""
    model = make_tiny(family)
    assert arch.intermediate_size(model) == _inter_size(family)
    assert arch.intermediate_size(model, 1) == _inter_size(family)
    assert _down_inputs(model, _ids())[0].shape[-1] == _inter_size(family)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_ffn_input_block_index_selects_only_channel_c(make_tiny, family: str) -> None:
    """Perturbing ``weight[block.index([c])]`` changes channel c of the down_proj input and nothing else."""
    model, ids, c, layer = make_tiny(family), _ids(2), 5, 1
    base = _down_inputs(model, ids)[layer]
    for block in arch.ffn_input_blocks(model, layer):
        with torch.no_grad():
            saved = block.weight.detach().clone()
            sel = block.index(torch.tensor([c]))
            block.weight[sel] += 0.5 * torch.randn_like(block.weight[sel])
        try:
            new = _down_inputs(model, ids)[layer]
        finally:
            with torch.no_grad():
                block.weight.copy_(saved)
        others = torch.ones(base.shape[-1], dtype=torch.bool)
        others[c] = False
        assert not torch.allclose(new[..., c], base[..., c]), block.name
        torch.testing.assert_close(new[..., others], base[..., others], rtol=0, atol=0)


@pytest.mark.parametrize("family", GATED)
def test_zeroing_block_rows_silences_channel(make_tiny, family: str) -> None:
    """Gated FFNs: zeroing channel c's rows in every block makes the down_proj input exactly 0 at c for all
    tokens (act(0) * 0 = 0), while it was non-zero before and other channels are untouched."""
    model, ids, c, layer = make_tiny(family), _ids(3), 7, 0
    base = _down_inputs(model, ids)[layer]
    assert (base[..., c] != 0).all()
    with torch.no_grad():
        for block in arch.ffn_input_blocks(model, layer):
            block.weight[block.index(torch.tensor([c]))] = 0.0
    new = _down_inputs(model, ids)[layer]
    assert torch.equal(new[..., c], torch.zeros_like(new[..., c]))
    keep = [j for j in range(base.shape[-1]) if j != c]
    torch.testing.assert_close(new[..., keep], base[..., keep], rtol=0, atol=0)


def test_gpt2_block_is_transposed_conv1d_slice(make_tiny) -> None:
    """GPT-2 ``c_fc`` (Conv1D, [d, 4d]) is one block along dim 1; zeroing its column c and bias[c] zeroes
    channel c of the down_proj input (GELU(0) = 0), zeroing another column does not touch c."""
    model, ids, c = make_tiny("gpt2"), _ids(4), 9
    (block,) = arch.ffn_input_blocks(model, 0)
    c_fc = arch.mlp(model, 0).c_fc
    assert block.weight is c_fc.weight and block.dim == 1 and block.offset == 0
    assert block.weight[block.index(torch.tensor([c, c + 1]))].shape == (HIDDEN, 2)
    with torch.no_grad():
        block.weight[block.index(torch.tensor([c + 1]))] = 0.0
        c_fc.bias[c + 1] = 0.0
    new = _down_inputs(model, ids)[0]
    assert torch.equal(new[..., c + 1], torch.zeros_like(new[..., c + 1]))
    assert (new[..., c] != 0).all()


@pytest.mark.parametrize("family", GATED)
def test_block_names_up_is_linear_gate_is_not(make_tiny, family: str) -> None:
    """The block called "up" enters the intermediate state linearly (scaling its row by 2 doubles channel c),
    the block called "gate" goes through the activation (scaling by 2 does not double it)."""
    model, ids, c, layer = make_tiny(family), _ids(5), 3, 0
    base = _down_inputs(model, ids)[layer][..., c]
    blocks = {b.name: b for b in arch.ffn_input_blocks(model, layer)}
    assert set(blocks) == {"up", "gate"}
    for name, linear in (("up", True), ("gate", False)):
        block = blocks[name]
        with torch.no_grad():
            saved = block.weight.detach().clone()
            block.weight[block.index(torch.tensor([c]))] *= 2.0
        scaled = _down_inputs(model, ids)[layer][..., c]
        with torch.no_grad():
            block.weight.copy_(saved)
        assert torch.allclose(scaled, 2 * base, rtol=1e-5, atol=1e-7) is linear, name


def test_phi3_fused_gate_up_two_blocks(make_tiny) -> None:
    """Phi-3's fused ``gate_up_proj`` [2I, d] gives a gate block at offset 0 and an up block at offset I."""
    model = make_tiny("phi3")
    gate, up = arch.ffn_input_blocks(model, 0)
    fused = arch.mlp(model, 0).gate_up_proj.weight
    assert (gate.name, gate.offset, gate.dim) == ("gate", 0, 0)
    assert (up.name, up.offset, up.dim) == ("up", INTER, 0)
    assert gate.weight is fused and up.weight is fused and fused.shape == (2 * INTER, HIDDEN)
    assert up.index(torch.tensor([2]))[0].tolist() == [INTER + 2]


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma", "gemma3_text", "gemma2"])
def test_norm_gain_is_effective_scale(make_tiny, family: str) -> None:
    """``norm_gain`` is the per-dim factor the RMSNorm applies: norm(x) == x / rms(x) * gain
    (w for Llama-style norms, 1 + w for Gemma)."""
    model = make_tiny(family)
    norm = arch.layers(model)[0].post_attention_layernorm
    torch.manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(torch.randn_like(norm.weight))
    gain = arch.norm_gain(model, norm)
    w = norm.weight.detach()
    expected_gain = 1 + w if family.startswith("gemma") else w
    torch.testing.assert_close(gain, expected_gain)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    x = torch.randn(3, HIDDEN)
    with torch.no_grad():
        out = norm(x)
    torch.testing.assert_close(out, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain)


def test_unknown_model_type_lists_known_families() -> None:
    """A model of an unknown family (or with no config) raises NotImplementedError naming every family."""
    stranger = nn.Linear(2, 2)
    stranger.config = SimpleNamespace(model_type="bert")
    for model in (stranger, nn.Linear(2, 2)):
        with pytest.raises(NotImplementedError) as err:
            arch.layers(model)
        msg = str(err.value)
        assert all(name in msg for name in arch.FAMILIES)
    assert "'bert'" in str(pytest.raises(NotImplementedError, arch.arch_of, stranger).value)


def test_multimodal_gemma3_reaches_the_text_decoder() -> None:
    """Gemma3ForConditionalGeneration keeps its text layers under model.language_model."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    text = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8)
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision,
                                                        mm_tokens_per_image=4))
    assert len(arch.layers(model)) == 2
    assert arch.intermediate_size(model) == 48
    assert arch.post_ffn_norm(model, 1) is model.model.language_model.layers[1].post_feedforward_layernorm
    out = arch.backbone(model)(input_ids=torch.tensor([[1, 2, 3]]))
    assert out.last_hidden_state.shape == (1, 3, 32)
