"""Mixture of experts in House of Cards (issue 23): detection of the massive (layer, expert, channels), the attacks
on one expert's rows and MacDrop on one expert's rows, on tiny Mixtral / Qwen2-MoE / OLMoE models (fused experts)
and Mixtral with ModuleList experts, each with a planted massive weight (``tiny_moe``)."""

from __future__ import annotations

import pytest
import torch
from tiny_moe import CHANNEL, EXPERT, FUSED, INTER, LAYER, N_EXPERTS, PROMPTS, build_moe
from torch import nn

from common.core import arch
from common.core.expert_capture import ExpertStats, capture_experts
from common.hoc import edits, moe
from common.hoc.macdrop import MacDrop, MacDropCallback

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = (*FUSED, "mixtral-list")
IDS = torch.tensor([[1, 5, 9, 11, 3, 20, 7, 30]])


def _build(variant: str, planted: bool = True) -> nn.Module:
    family, _, kind = variant.partition("-")
    return build_moe(family, planted=planted, module_list=kind == "list")


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(model: nn.Module, before: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]


@torch.no_grad()
def _logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=IDS, use_cache=False).logits


def _expert_state(model: nn.Module, expert: int = EXPERT) -> torch.Tensor:
    """[N, I] position-0 intermediate state of ``expert`` at LAYER over the prompts (each routed there)."""
    stats = capture_experts(model, PROMPTS)
    hit = stats.expert[:, LAYER] == expert
    assert bool(hit.any(-1).all()), "every prompt's BOS must be routed to the planted expert"
    return stats.pos0[:, LAYER][hit]


@pytest.mark.parametrize("variant", VARIANTS)
def test_detects_the_planted_expert(variant: str) -> None:
    """Planted: (layer 1, expert 2, channel 7 first), every prompt routed there; the Alg. 1 helper returns it."""
    report = moe.find_massive_expert(capture_experts(_build(variant), PROMPTS), k=3)
    assert (report.layer, report.expert, report.channels[0]) == (LAYER, EXPERT, CHANNEL)
    assert report.found and report.experts_at_layer == [EXPERT] and report.n_routed == report.n_prompts == 4
    assert report.channel_values[0] > 1000 > report.channel_values[1]
    layer, expert, channels = moe.massive_expert_weights(_build(variant), PROMPTS, k=3)
    assert (layer, expert, channels) == (LAYER, EXPERT, report.channels)


@pytest.mark.parametrize("variant", VARIANTS)
def test_nothing_planted_nothing_found(variant: str) -> None:
    """Without the plant no (layer, expert) meets Sun's criterion: no answer, and the Alg. 1 helper refuses."""
    model = _build(variant, planted=False)
    report = moe.find_massive_expert(capture_experts(model, PROMPTS))
    assert not report.found and report.expert is None and report.channels == []
    with pytest.raises(ValueError, match="no massive expert"):
        moe.massive_expert_weights(model, PROMPTS)


def test_shared_expert_found() -> None:
    """Planted in Qwen2-MoE's shared expert: detection names expert 4 (the shared one, after the routed 0..3)."""
    report = moe.find_massive_expert(capture_experts(build_moe("qwen2_moe", expert=N_EXPERTS), PROMPTS))
    assert (report.layer, report.expert, report.channels[0]) == (LAYER, N_EXPERTS, CHANNEL)


def test_module_list_numbers_equal_fused() -> None:
    """ModuleList experts and fused experts with the same weights give the same report."""
    fused = moe.find_massive_expert(capture_experts(build_moe("mixtral"), PROMPTS))
    listed = moe.find_massive_expert(capture_experts(build_moe("mixtral", module_list=True), PROMPTS))
    assert (fused.layer, fused.expert, fused.channels) == (listed.layer, listed.expert, listed.channels)
    torch.testing.assert_close(fused.channel_values, listed.channel_values)


def _stats(routed: list[list[list[int]]], values: dict[tuple[int, int, int], dict[int, float]],
           n_experts: int = 3, width: int = 8) -> ExpertStats:
    """Hand-made statistics: ``routed[n][l]`` the experts of prompt n at layer l; ``values[n, l, e]`` its channels
    set to {channel: value} over a background of 0.01."""
    n_prompts, n_layers = len(routed), len(routed[0])
    expert = torch.tensor(routed)
    pos0 = torch.full((n_prompts, n_layers, expert.shape[-1], width), 0.01)
    for (n, layer, e), chans in values.items():
        j = routed[n][layer].index(e)
        for c, v in chans.items():
            pos0[n, layer, j, c] = v
    return ExpertStats(expert, pos0, [[width] * n_experts for _ in range(n_layers)])


def test_expert_profile_means_over_routed_prompts_only() -> None:
    """The profile averages |x| over the prompts routed to each (layer, expert) and counts them; unrouted is 0."""
    stats = _stats([[[0, 1]], [[0, 2]]], {(0, 0, 0): {3: 4.0}, (1, 0, 0): {3: -2.0}, (0, 0, 1): {5: 6.0}})
    profile, counts = moe.expert_profile(stats)
    assert profile.shape == (1, 3, 8) and counts.tolist() == [[2, 1, 1]]
    assert float(profile[0, 0, 3]) == pytest.approx(3.0) and float(profile[0, 1, 5]) == pytest.approx(6.0)
    stats.expert[1, 0, 1] = -1  # padding is skipped
    profile, counts = moe.expert_profile(stats)
    assert counts.tolist() == [[2, 1, 0]] and float(profile[0, 2].sum()) == 0


def test_first_layer_wins_then_the_largest_expert() -> None:
    """An expert massive at layer 0 beats a larger one at layer 1; at one layer the largest qualifying expert is
    named and every qualifying one listed; below the criterion nothing is."""
    stats = _stats([[[0, 1], [1, 2]]] * 2, {(n, 0, 1): {2: 500.0} for n in range(2)}
                   | {(n, 0, 0): {4: 800.0, 1: 2.0} for n in range(2)} | {(n, 1, 2): {6: 9000.0} for n in range(2)})
    report = moe.find_massive_expert(stats, k=2)
    assert (report.layer, report.expert, report.channels, report.experts_at_layer) == (0, 0, [4, 1], [0, 1])
    assert report.n_routed == 2 and report.channel_values[0] == pytest.approx(800.0)
    assert not moe.find_massive_expert(_stats([[[0, 1]]], {(0, 0, 1): {2: 50.0}})).found


def test_a_narrow_expert_is_judged_over_its_own_width() -> None:
    """Qwen2-MoE's shared expert is wider than the routed ones, so a routed expert's row is zero-padded: a value of 200
    over a background of 1 (ratio 200 on the expert's own 8 channels) is not massive, although over the padded 32
    channels the median would be 0 and any ratio pass."""
    stats = _stats([[[0, 1]]], {(0, 0, 0): {2: 200.0, **{c: 1.0 for c in range(8) if c != 2}}}, n_experts=2, width=32)
    stats.widths = [[8, 32]]
    stats.pos0[0, 0, 0, 8:] = 0.0  # the padding
    assert not moe.find_massive_expert(stats).found
    stats.widths = [[32, 32]]  # read as if the expert were 32 wide: the padding's zeros make it "massive"
    assert moe.find_massive_expert(stats).found


@pytest.mark.parametrize("variant", VARIANTS)
def test_attacks_on_one_expert_and_exact_restore(variant: str) -> None:
    """Zeroing the massive channel of the expert silences it (detection then finds nothing) and moves the logits;
    keep-only leaves it the only nonzero channel of that expert; random rows zero exactly those channels and keep
    the massive one. Each touches only that expert's rows and restores every parameter bit-exactly."""
    model = _build(variant)
    before, logits = _state(model), _logits(model)
    with edits.zero_massive(model, LAYER, [CHANNEL], 1, expert=EXPERT):
        changed = _changed(model, before)
        assert not torch.equal(_logits(model), logits)
        assert not moe.find_massive_expert(capture_experts(model, PROMPTS)).found
        assert bool((_expert_state(model)[:, CHANNEL] == 0).all())
    assert not _changed(model, before)
    fused = "list" not in variant
    assert changed == ([f"model.layers.{LAYER}.mlp.experts.gate_up_proj"] if fused else
                       [f"model.layers.{LAYER}.mlp.experts.{EXPERT}.{w}.weight" for w in ("w1", "w3")])
    if fused:  # inside the fused weight, only rows CHANNEL and I + CHANNEL of the expert were zeroed
        with edits.zero_massive(model, LAYER, [CHANNEL], 1, expert=EXPERT):
            diff = (model.state_dict()[changed[0]] != before[changed[0]]).any(-1).nonzero().tolist()
        assert diff and set(map(tuple, diff)) <= {(EXPERT, CHANNEL), (EXPERT, INTER + CHANNEL)}

    with edits.keep_only_massive(model, LAYER, [CHANNEL, 3], 1, expert=EXPERT):
        state = _expert_state(model)
        assert bool((state[:, CHANNEL].abs() > 1000).all()) and int((state != 0).sum()) == len(PROMPTS)
        assert not torch.equal(_logits(model), logits)
    assert not _changed(model, before)

    with edits.zero_random(model, LAYER, 5, seed=0, exclude=[CHANNEL], expert=EXPERT):
        picked = edits.random_channels(INTER, 5, 0, [CHANNEL])
        state = _expert_state(model)
        assert bool((state[:, picked] == 0).all()) and bool((state[:, CHANNEL].abs() > 1000).all())
        assert moe.find_massive_expert(capture_experts(model, PROMPTS)).expert == EXPERT
        assert not torch.equal(_logits(model), logits)
    assert not _changed(model, before)


def test_expert_edits_refuse_bad_input() -> None:
    """Without expert= a MoE layer has no dense rows (arch's ValueError pointing at experts); a channel or expert
    outside the expert is a ValueError; the model is left untouched."""
    model = build_moe("olmoe")
    before = _state(model)
    for kw, channel, match in (({}, CHANNEL, "mixture of experts"), ({"expert": EXPERT}, INTER, r"\[0, 48\)"),
                               ({"expert": N_EXPERTS}, CHANNEL, "outside layer 1's 4 experts")):
        with pytest.raises(ValueError, match=match), edits.zero_channels(model, {LAYER: [channel]}, **kw):
            pass
    with pytest.raises(ValueError, match="k=49"):
        edits.keep_only_massive(model, LAYER, [CHANNEL], INTER + 1, expert=EXPERT)
    assert not _changed(model, before)


@pytest.mark.parametrize("variant", VARIANTS)
def test_macdrop_masks_only_the_experts_rows(variant: str) -> None:
    """MacDrop on (layer 1, expert 2, channels 7 and 9): one k x d mask multiplied into that expert's gate and up
    rows only, every other weight (other experts' rows of the same channels included) unchanged; restore exact."""
    model = _build(variant).requires_grad_(False)
    before = _state(model)
    drop = MacDrop(model, LAYER, [CHANNEL, 9], seed=3, expert=EXPERT)
    assert drop.shape == (2, 32) and drop.expert == EXPERT
    keep = drop.mask(0.5, step=1)
    assert 0 < int(keep.sum()) < keep.numel()
    drop.apply(keep)
    state = model.state_dict()
    if "list" in variant:
        names = {f"model.layers.{LAYER}.mlp.experts.{EXPERT}.{w}.weight": slice(None) for w in ("w1", "w3")}
        rows = {name: [CHANNEL, 9] for name in names}
    else:
        names = {f"model.layers.{LAYER}.mlp.experts.gate_up_proj": EXPERT}
        rows = {next(iter(names)): [CHANNEL, 9, INTER + CHANNEL, INTER + 9]}
    assert sorted(_changed(model, before)) == sorted(names)
    for name, at in names.items():
        new, old = state[name], before[name]
        old_e, new_e = (old[at], new[at]) if isinstance(at, int) else (old, new)
        torch.testing.assert_close(new_e[rows[name]], old_e[rows[name]] * keep.repeat(len(rows[name]) // 2, 1),
                                   rtol=0, atol=0)
        others = [r for r in range(new_e.shape[0]) if r not in rows[name]]
        assert torch.equal(new_e[others], old_e[others])
        if isinstance(at, int):
            assert torch.equal(new[:at], old[:at]) and torch.equal(new[at + 1:], old[at + 1:])
    drop.restore()
    assert not _changed(model, before) and not drop.active


def test_macdrop_expert_refusals_and_callback() -> None:
    """MacDrop on an expert refuses trainable base weights and experts outside the layer; the callback passes
    expert= through."""
    model = build_moe("mixtral")
    with pytest.raises(ValueError, match="trainable"):
        MacDrop(model, LAYER, [CHANNEL], expert=EXPERT)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="outside layer 1's 4 experts"):
        MacDrop(model, LAYER, [CHANNEL], expert=N_EXPERTS)
    callback = MacDropCallback(model, LAYER, [CHANNEL], expert=EXPERT)
    assert callback.macdrop.expert == EXPERT and {b.expert for b in callback.macdrop.blocks} == {EXPERT}
    assert callback.macdrop.blocks[0].weight is arch.mlp(model, LAYER).experts.gate_up_proj


@pytest.mark.parametrize("variant", ["mixtral", "mixtral-list"])
def test_macdrop_on_an_expert_under_peft(variant: str) -> None:
    """Under the project's LoRA wrapping (every linear layer; peft wraps fused expert weights in ParamWrappers)
    MacDrop masks the expert's frozen base rows, never an adapter, the adapted forward sees the mask, and the rows
    are restored exactly; capture inside the adapted forward sees the adapters (as merging them does); with DoRA on
    an MLP expert's projections a fully dropped row is refused; merged adapters are refused."""
    from peft import LoraConfig, get_peft_model

    from common.hoc import finetune

    torch.manual_seed(0)
    pm = finetune.peft_model(_build(variant), finetune.ARMS["lora"], finetune.TrainSettings(rank=4, alpha=8))
    before, logits = _state(pm), _logits(pm)
    drop = MacDrop(pm, LAYER, [CHANNEL], expert=EXPERT)
    drop.apply(drop.mask(0.5, step=1))
    changed = _changed(pm, before)
    assert changed and all(f"layers.{LAYER}.mlp.experts" in n and "lora" not in n for n in changed)
    assert not torch.equal(_logits(pm), logits)
    drop.restore()
    assert not _changed(pm, before) and torch.equal(_logits(pm), logits)
    if "list" not in variant:  # capture inside the adapted forward sees the adapters' delta: what merging gives
        with torch.no_grad():
            for name, param in pm.named_parameters():
                if "experts" in name and "lora_B" in name:
                    param.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        adapted = capture_experts(pm, PROMPTS)
        assert not torch.allclose(adapted.pos0, capture_experts(_build(variant), PROMPTS).pos0)
    if "list" in variant:  # all-linear leaves MLP experts alone: adapt them by name, with DoRA (which peft's
        # ParamWrapper of fused weights cannot carry), on OLMoE (peft renames Mixtral's w1/w2/w3 to the fused weights)
        config = LoraConfig(r=4, target_modules=["w1", "w2", "w3"], use_dora=True)
        pm = get_peft_model(build_moe("olmoe", module_list=True), config)
        drop = MacDrop(pm, LAYER, [CHANNEL], expert=EXPERT)
        with pytest.raises(ValueError, match="DoRA"):
            drop.apply(torch.zeros(drop.shape))
    pm.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        MacDrop(pm, LAYER, [CHANNEL], expert=EXPERT)
    if "list" not in variant:
        merged = capture_experts(pm, PROMPTS)
        assert torch.equal(merged.expert, adapted.expert)
        torch.testing.assert_close(merged.pos0, adapted.pos0, rtol=1e-4, atol=1e-4)
