"""Massive-weight attacks (HoC §2.3, SunMA §3, Yu et al. super weight): equivalences, exact restore,
and refusals."""

from __future__ import annotations

import pytest
import torch

from common.core import arch, capture, models
from common.core.models import PLANT
from common.hoc import detection, edits

FAMILIES = ("llama", "phi3", "gpt2", "gemma3_text")


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _bitwise_equal(model, state) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _inter(model, ids, layer) -> torch.Tensor:
    store = {}
    h = arch.down_proj(model, layer).register_forward_pre_hook(lambda _m, a: store.setdefault("x", a[0].clone()))
    with torch.no_grad():
        out = model(input_ids=ids).logits
    h.remove()
    return store["x"], out


@pytest.mark.parametrize("family", FAMILIES)
def test_zeroing_rows_zeroes_the_channel_and_equals_zeroing_down_columns(make_tiny, family):
    """zero rows of up/gate <=> intermediate channel == 0 <=> zero W_down[:, c] (same logits)."""
    model = make_tiny(family)
    ids = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(0))
    chans = [3, 11]
    with edits.zero_channels(model, {1: chans}):
        inter, logits_rows = _inter(model, ids, 1)
    assert torch.all(inter[..., chans] == 0)
    assert inter[..., [0, 5]].abs().sum() > 0  # other channels untouched
    down = arch.down_matrix(model, 1)
    saved = down[:, chans].detach().clone()
    with torch.no_grad():
        down[:, chans] = 0
    logits_cols = model(input_ids=ids).logits.detach()
    with torch.no_grad():
        down[:, chans] = saved
    torch.testing.assert_close(logits_rows, logits_cols, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_only_leaves_exactly_k_rows_and_ffn_equals_the_kept_columns(make_tiny, family):
    model = make_tiny(family)
    ids = torch.randint(3, 60, (1, 6), generator=torch.Generator().manual_seed(1))
    ranked = [7, 2, 30]
    with edits.keep_only_massive(model, 0, ranked, k=2):
        for block in arch.ffn_input_blocks(model, 0):
            w = block.weight if block.dim == 0 else block.weight.T
            rows = w[block.offset:block.offset + arch.intermediate_size(model, 0)]
            assert sorted(rows.abs().sum(1).nonzero().flatten().tolist()) == [2, 7]
        inter, _ = _inter(model, ids, 0)
    nonzero = inter.abs().sum((0, 1)).nonzero().flatten().tolist()
    assert set(nonzero) <= {2, 7}


def test_attacks_restore_bitwise_on_exit_and_on_exception(tiny_llama):
    model, _ = tiny_llama
    before = _state(model)
    with edits.keep_only_massive(model, 1, [PLANT["channel"]], 1):
        assert not _bitwise_equal(model, before)
    assert _bitwise_equal(model, before)
    with pytest.raises(RuntimeError, match="boom"), edits.zero_massive(model, 1, [PLANT["channel"]], 1):
        raise RuntimeError("boom")
    assert _bitwise_equal(model, before)
    with pytest.raises(RuntimeError), edits.zero_super_weight(model, 1, PLANT["hidden_dim"], PLANT["channel"]):
        raise RuntimeError
    assert _bitwise_equal(model, before)


def test_zero_touches_only_the_attacked_rows(tiny_llama):
    model, _ = tiny_llama
    before = _state(model)
    with edits.zero_massive(model, 1, [PLANT["channel"], 5], 2):
        after = model.state_dict()
        changed = {k for k, v in after.items() if not torch.equal(v, before[k])}
        assert changed == {"model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.gate_proj.weight"}
        diff = (after["model.layers.1.mlp.up_proj.weight"] != before["model.layers.1.mlp.up_proj.weight"]).any(1)
        assert set(diff.nonzero().flatten().tolist()) <= {PLANT["channel"], 5}


def test_planted_attack_breaks_where_random_does_not(tiny_llama):
    """Zeroing the planted massive row removes the massive activation; random rows do not."""
    model, tok = tiny_llama
    ids = models.encode(tok, "tiny-llama", "Summer is warm.")

    def top_hidden():
        return capture.capture(model, [ids]).pos0["hidden"][0, -1].abs().max().item()

    base = top_hidden()
    with edits.zero_massive(model, 1, [PLANT["channel"]], 1):
        zeroed = top_hidden()
    with edits.zero_random(model, 1, 1, seed=0, exclude=[PLANT["channel"]]):
        rnd = top_hidden()
    assert base > 1000 and zeroed < 10 and rnd == pytest.approx(base, rel=1e-3)


def test_random_channels_never_pick_excluded_and_are_seeded():
    exclude = list(range(0, 50))
    picks = {tuple(edits.random_channels(60, 5, seed, exclude)) for seed in range(20)}
    assert all(c >= 50 for p in picks for c in p) and len(picks) > 1
    assert edits.random_channels(60, 5, 3, exclude) == edits.random_channels(60, 5, 3, exclude)
    with pytest.raises(ValueError, match="between 1 and"):
        edits.random_channels(60, 11, 0, exclude)


@pytest.mark.parametrize("k", [0, -1, 193])
def test_bad_k_names_the_limit(tiny_llama, k):
    model, _ = tiny_llama
    with pytest.raises(ValueError, match="192"):
        edits.keep_only_massive(model, 1, list(range(192)), k)


def test_channel_out_of_range_is_refused(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(ValueError, match=r"\[0, 192\)"), edits.zero_channels(model, {1: [192]}):
        pass


def test_model_without_massive_layer_is_refused():
    report = detection.MassiveReport(None, [], [], [], [None], 0, [], 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="no detectable massive layer"):
        edits.require_layer(report)


def test_super_weight_is_the_planted_down_entry_and_zeroing_it_removes_the_massive_dim(tiny_llama):
    model, tok = tiny_llama
    sw = edits.super_weight(model, 1, PLANT["hidden_dim"], PLANT["channel"])
    assert sw["value"] == pytest.approx(3.0) and sw["ratio_to_median"] > 50
    ids = models.encode(tok, "tiny-llama", "Hi")
    with edits.zero_super_weight(model, 1, PLANT["hidden_dim"], PLANT["channel"]):
        assert arch.down_matrix(model, 1)[PLANT["hidden_dim"], PLANT["channel"]] == 0
        h = capture.capture(model, [ids]).pos0["hidden"][0, 1, PLANT["hidden_dim"]].abs()
    assert h < 10


def test_set_hidden_overwrites_only_the_target_and_mean_keeps_the_model(tiny_llama):
    """SunMA: setting the massive dim to zero changes the output; to its own value changes nothing."""
    model, tok = tiny_llama
    ids = models.encode(tok, "tiny-llama", "Summer is warm.")
    with torch.no_grad():
        base = model(input_ids=ids).logits
    own = capture.capture(model, [ids]).pos0["hidden"][0, 1, [PLANT["hidden_dim"]]]
    with edits.set_hidden(model, 1, [PLANT["hidden_dim"]], own), torch.no_grad():
        same = model(input_ids=ids).logits
    with edits.set_hidden(model, 1, [PLANT["hidden_dim"]], torch.zeros(1)), torch.no_grad():
        zeroed = model(input_ids=ids).logits
    torch.testing.assert_close(same, base)
    assert (zeroed - base).abs().max() > 1e-2
    assert not arch.layers(model)[1]._forward_hooks


def test_set_norm_gain_on_gemma_and_refusal_elsewhere(make_tiny, tiny_llama):
    model = make_tiny("gemma3_text")
    norm = arch.post_ffn_norm(model, 1)
    before = norm.weight.detach().clone()
    with edits.set_norm_gain(model, [1], dim=4, gain=0.0):
        assert arch.norm_gain(model, norm)[4] == 0
    assert torch.equal(norm.weight, before)
    with pytest.raises(ValueError, match="no post-FFN norm"), edits.set_norm_gain(tiny_llama[0], [1], 0):
        pass
