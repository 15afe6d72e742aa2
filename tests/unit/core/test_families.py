"""Issue 23: every decoder family the table lists, and two it does not (their layout inferred), on tiny random
models with a planted massive weight: detection finds the planted layer and channel, the HoC edits restore
bit-exactly, the layer-input cache scores like the model, attention capture and the SFSD decomposition run."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from tiny_families import ALL_FAMILIES, INFERRED, VOCAB, build_tiny
from transformers import AutoConfig, AutoModelForCausalLM

from common.core import arch, capture, experts, models
from common.core.layer_inputs import LayerInputs
from common.hoc import detection, edits
from common.inheritune.attention import capture_attention
from common.sfsd import budgets
from common.sfsd.decomposition import decompose_model

pytestmark = pytest.mark.usefixtures("one_thread")

#: The planted circuit (``models.plant_massive_weight``): a gain large enough that an ungated GELU FFN, which
#: does not square its input as a gated one does, still meets Sun's 100-and-1000x criterion.
PLANT = dict(layer=1, channel=7, hidden_dim=11, bos_dim=5, gain=40.0)


def _planted(family: str):
    model = build_tiny(family)
    models.plant_massive_weight(model, **PLANT)
    return model


def _prompts(n: int = 4, length: int = 10) -> list[torch.Tensor]:
    """``n`` [1, T] prompts that start with BOS (id 1), as the registry's BOS models encode them."""
    g = torch.Generator().manual_seed(1)
    return [torch.cat([torch.tensor([[1]]), torch.randint(3, VOCAB, (1, length - 1), generator=g)], 1)
            for _ in range(n)]


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", [f for f in ALL_FAMILIES if f not in INFERRED])
def test_inferred_layout_equals_the_table(family: str) -> None:
    """Reading the layout off the modules gives the table's hand-written entry, norm offset included (Gemma's
    ``1 + w`` is probed, not named): the inference a model of an unlisted type relies on. Only BLOOM's quirk of
    adding the residual inside its attention module (``attn_write``) cannot be read off module names."""
    table = arch.FAMILIES[family]
    assert arch.infer_arch(build_tiny(family)) == dataclasses.replace(table, attn_write="")
    assert bool(table.attn_write) == (family == "bloom")


@pytest.mark.parametrize("family", INFERRED)
def test_unlisted_type_is_inferred_and_said_once(family: str, capsys) -> None:
    """A model_type missing from the table works through its inferred layout; one stderr line names it."""
    assert family not in arch.FAMILIES
    arch._SAID.clear()
    model = build_tiny(family)
    assert arch.arch_of(model).layout == "gated FFN"
    assert arch.arch_of(model) == arch.FAMILIES["llama"]  # these families use Llama's module names
    err = capsys.readouterr().err
    assert err.count("inferred a gated FFN layout") == 1 and repr(family) in err


def test_unmatched_modules_list_what_was_found() -> None:
    """A model whose FFN matches no known layout is refused with what was found and the entry to add."""
    model = build_tiny("llama")
    model.config.model_type = "mystery"
    for layer in model.model.layers:
        layer.mlp.w_in = layer.mlp.up_proj
        del layer.mlp.up_proj
    arch._INFERRED.clear()
    with pytest.raises(NotImplementedError, match=r"no accessors for model_type 'mystery'.*'mlp' children "
                                                  r"\['gate_proj', 'down_proj', 'act_fn', 'w_in'\].*FAMILIES\['mystery'\]"):
        arch.layers(model)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_planted_massive_weight_is_found(family: str) -> None:
    """HoC §2.2 detection finds the planted layer and channel; the same model unplanted has no massive layer."""
    assert detection.massive_weights(_planted(family), _prompts(), k=1) == (PLANT["layer"], [PLANT["channel"]])
    with pytest.raises(ValueError, match="no massive layer"):
        detection.massive_weights(build_tiny(family), _prompts(), k=1)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_edits_act_and_restore_bit_exactly(family: str) -> None:
    """Zero / keep-only / random edits (HoC §2.3) change the output (zeroing silences the planted channel
    exactly), and every parameter is bit-identical afterwards."""
    model, ids = _planted(family), _prompts(1)[0]
    layer, channel = PLANT["layer"], PLANT["channel"]
    before, clean = _state(model), model(input_ids=ids, use_cache=False).logits
    attacks = [edits.zero_massive(model, layer, [channel], 1), edits.keep_only_massive(model, layer, [channel], 1),
               edits.zero_random(model, layer, 2, seed=0, exclude=[channel])]
    for attack in attacks:
        with attack, torch.no_grad():
            assert not torch.equal(model(input_ids=ids, use_cache=False).logits, clean)
        after = _state(model)
        assert all(torch.equal(before[k], after[k]) for k in before)
    with edits.zero_massive(model, layer, [channel], 1):
        inter = capture.capture(model, [ids], points=("inter",)).pos0["inter"]
    assert float(inter[0, layer, channel]) == 0.0


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_layer_inputs_score_like_the_model(family: str) -> None:
    """Re-running the cached layers, the final norm and ``arch.logits`` gives the model's own log-likelihoods
    (the SFSD searches' evaluator: a wrong final norm or a missing logit scale would show here)."""
    model = _planted(family)
    ids = torch.cat(_prompts(3))
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
    own = -F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").double().sum(1)
    torch.testing.assert_close(LayerInputs(model, ids, keep="first").logprobs(), own, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_attention_capture_gives_probabilities(family: str) -> None:
    """Inheritune's attention capture runs: per-layer, per-head metrics and mean maps whose rows sum to 1."""
    model = build_tiny(family)
    stats = capture_attention(model, [torch.cat(_prompts(2))])
    n_layers = len(arch.layers(model))
    assert stats.metrics["rank"].shape[:2] == (2, n_layers)
    torch.testing.assert_close(stats.mean_matrix.sum(-1), torch.ones(stats.mean_matrix.shape[:-1], dtype=torch.float64))


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_sfsd_decomposes_every_projection(family: str) -> None:
    """The SFSD decomposition covers every linear projection of every layer, with finite descending spectra."""
    model = build_tiny(family)
    decomps = decompose_model(model, torch.cat(_prompts(4, 12)))
    assert list(decomps) == [t.path for t in budgets.targets(model)]
    assert len(decomps) >= 2 * len(arch.layers(model))  # attention and FFN projections of each layer
    for d in decomps.values():
        values = d.weight_energy
        assert torch.isfinite(values).all() and bool((values[:-1] >= values[1:] - 1e-6).all())


_MOE_KW = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts_per_tok=2)


def test_a_dense_layer_of_a_moe_model_is_reached_as_dense() -> None:
    """Qwen3-MoE's ``mlp_only_layers``: layer 0 is a gated MLP, reached by the dense accessors; layer 1 is a
    mixture of experts, which they refuse (pointing at ``common.core.experts``)."""
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3_moe", num_experts=4, mlp_only_layers=[0],
                                                                  **_MOE_KW))
    assert [b.name for b in arch.ffn_input_blocks(model, 0)] == ["up", "gate"]
    assert arch.down_matrix(model, 0).shape == (32, 48)
    with pytest.raises(ValueError, match="layer 1's FFN is a mixture of experts.*common.core.experts"):
        arch.ffn_input_blocks(model, 1)


def test_inferred_moe_with_dense_first_layers_is_per_instance() -> None:
    """DeepSeek-V3 (not in the table) with its first layer dense infers a mixture-of-experts layout whose dense layer
    the gated names reach, its plural ``shared_experts`` found; an all-MoE instance of the same class, inferred in
    the same process, gets its own answer (the layout is cached per model, not per class)."""
    def build(first_dense: int):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(
            "deepseek_v3", n_routed_experts=4, first_k_dense_replace=first_dense, n_group=1, topk_group=1, **_MOE_KW))
    all_moe, mixed = build(0), build(1)
    assert arch.arch_of(all_moe).experts == arch.arch_of(mixed).experts == "experts"
    assert [arch.is_moe_layer(mixed, i) for i in range(2)] == [False, True]
    assert [arch.is_moe_layer(all_moe, i) for i in range(2)] == [True, True]
    assert arch.intermediate_size(mixed, 0) == 48 and experts.has_shared_expert(mixed, 1)
