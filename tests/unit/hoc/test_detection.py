"""common.hoc.detection's notebook-01 records on the planted tiny Llama.

``common.hoc.detection``: the planted massive weight of tiny-llama is found; without it nothing is found;
threshold logic, ranking and decompositions checked on hand-made tensors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from common.core import arch, capture, data, intervals, models
from common.core.capture import Stats
from common.core.models import PLANT
from common.core.profiles import DETECTION_PROMPTS
from common.hoc import detection


@pytest.fixture(scope="module")
def planted():
    model, tok = models.load_model("tiny-llama")
    windows = data.token_windows(tok, "tiny-llama", "synthetic", 2, 32)
    return detection.measure(model, tok, "tiny-llama", ("Summer is warm.", "I am here."), windows, k=3)


def test_record_write_share(planted, records) -> None:
    share = detection.record_write_share(planted)
    assert share == detection.write_share(planted)["value"] and 0 < share <= 1
    rec = records()["tiny-llama/massive_channels_write_share"]
    assert rec["value"] == share and "top-k" in rec["note"] and "2 prompts" in rec["note"]
    assert rec["ci95"][0] <= share <= rec["ci95"][1]


def test_write_share_is_the_share_of_the_mean_contributions(planted) -> None:
    """The value is computed from the mean over prompts of the contributions (as plotted); the interval is over
    prompts: two prompts that disagree give a wide one, identical prompts a point."""
    contrib = planted.contributions.numpy()
    want = abs(contrib[planted.report.channels]).sum() / abs(contrib).sum()
    assert detection.write_share(planted)["value"] == pytest.approx(want, rel=1e-5)
    half = torch.zeros_like(planted.prompt_contributions)
    half[:, :2] = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(len(half) // 2 + 1, 1)[: len(half)]
    split = dataclasses.replace(planted, prompt_contributions=half,
                                report=dataclasses.replace(planted.report, channels=[0]))
    assert detection.write_share(split)["ci95"][0] < 0.5 < detection.write_share(split)["ci95"][1]
    same = dataclasses.replace(split, prompt_contributions=half[:1].repeat(len(half), 1))
    assert detection.write_share(same)["value"] == 1.0 and detection.write_share(same)["ci95"] == [1.0, 1.0]


def test_write_share_none_without_contributions(planted, records) -> None:
    empty = dataclasses.replace(planted, prompt_contributions=None)
    assert detection.record_write_share(empty) is None
    assert "tiny-llama/massive_channels_write_share" not in records()


def test_record_measurement_new_keys(planted, records) -> None:
    detection.record_measurement(planted)
    recs = records()
    assert recs["tiny-llama/n_layers"]["value"] == planted.n_layers
    dim = detection.largest_hidden_dim(planted.prompts)
    assert recs["tiny-llama/hidden_max_any_layer_dim"]["value"] == dim
    at = recs["tiny-llama/hidden_max_any_layer_at"]["value"]
    assert 0 <= at < planted.n_layers
    assert float(planted.prompts.pos0["hidden"][:, at, dim].abs().mean(0)) == recs["tiny-llama/hidden_max_any_layer"]["value"]


def _prompt_stats(model, tok, key: str, points=capture.POINTS) -> Stats:
    return capture.capture(model, [models.encode(tok, key, p) for p in DETECTION_PROMPTS], points=points)


def _window_stats(model, tok, key: str) -> Stats:
    return capture.capture(model, [data.token_windows(tok, key, "synthetic", 4, 64)], whole=True)


def _pos0(vectors: list[list[float]], n_prompts: int = 2) -> torch.Tensor:
    """[N, L, D] with the same per-layer vector for every prompt (so means are exact)."""
    return torch.tensor(vectors).unsqueeze(0).repeat(n_prompts, 1, 1)


# ------------------------------------------------------------------------------- planted: found


def test_find_massive_finds_planted_weight(tiny_llama) -> None:
    """Layer, top channel and massive hidden dim equal the planted ones; the hidden ratio is >= 1000."""
    model, tok = tiny_llama
    report = detection.find_massive(_prompt_stats(model, tok, "tiny-llama"), _window_stats(model, tok, "tiny-llama"))
    assert report.found
    assert report.layer == PLANT["layer"] and report.ref_layer == PLANT["layer"]
    assert report.channels[0] == PLANT["channel"]
    assert len(report.channels) == len(report.channel_values) == len(report.channel_stability) == 5
    assert report.channel_values[0] >= detection.MIN_ABS
    assert report.channel_stability[0] == 1.0  # every prompt starts with BOS, so every prompt sees it
    assert PLANT["hidden_dim"] in report.hidden_dims
    assert report.hidden_ratio >= 1000
    assert report.hidden_max >= 100


def test_massive_hidden_state_persists_in_later_layers(tiny_llama) -> None:
    """The position-0 hidden top-1 stays >= 100 in every layer from the planted one on (residual carry),
    at the planted hidden dim, and is below 100 before it."""
    model, tok = tiny_llama
    hidden = _prompt_stats(model, tok, "tiny-llama", points=("hidden",)).pos0["hidden"]
    top, _ = detection.layer_profile(hidden)
    n = hidden.shape[1]
    assert all(top[i] >= 100 for i in range(PLANT["layer"], n))
    assert all(top[i] < 100 for i in range(PLANT["layer"]))
    argmax = hidden.abs().mean(0).argmax(-1)
    assert argmax[PLANT["layer"]:].tolist() == [PLANT["hidden_dim"]] * (n - PLANT["layer"])


# ----------------------------------------------------------------------------- removed: not found


def _assert_nothing_found(report: detection.MassiveReport) -> None:
    assert report.layer is None and report.channels == [] and report.found is False
    assert report.channel_values == [] and report.channel_stability == []


def test_nothing_found_in_tiny_gpt2(tiny_gpt2) -> None:
    """Random GPT-2 has no massive layer: no layer, no channels, ``found`` is False."""
    model, tok = tiny_gpt2
    report = detection.find_massive(_prompt_stats(model, tok, "tiny-gpt2"), _window_stats(model, tok, "tiny-gpt2"))
    _assert_nothing_found(report)
    assert report.hidden_dims == []


def test_nothing_found_after_removing_plant(tiny_llama) -> None:
    """Zeroing the planted up/gate rows of a fresh tiny-llama removes the massive layer."""
    model, tok = tiny_llama
    with torch.no_grad():
        for block in arch.ffn_input_blocks(model, PLANT["layer"]):
            block.weight[block.index(torch.tensor([PLANT["channel"]]))] = 0.0
    report = detection.find_massive(_prompt_stats(model, tok, "tiny-llama"), _window_stats(model, tok, "tiny-llama"))
    _assert_nothing_found(report)
    assert PLANT["hidden_dim"] not in report.hidden_dims


# ------------------------------------------------------------------------------- threshold logic


def test_layer_profile_top_and_ratio() -> None:
    """``layer_profile``: per layer the max of the prompt-mean |x| and its ratio to the median."""
    pos0 = torch.tensor([[[1.0, -2.0, 8.0]], [[3.0, 2.0, -4.0]]])  # N=2, L=1, D=3 -> mean|x| = [2, 2, 6]
    top, ratio = detection.layer_profile(pos0)
    assert top.tolist() == [6.0] and ratio.tolist() == [3.0]


def test_detect_exactly_at_thresholds() -> None:
    """|x| == 100 with ratio >= 1000, and ratio == 1000 with |x| >= 100, both qualify (>=)."""
    at_abs = [0.0625, -0.0625, 100.0]  # top 100, ratio 1600 (power-of-two median: exact arithmetic)
    at_ratio = [0.125, 0.125, -125.0]  # top 125, ratio exactly 1000
    quiet = [1.0, 1.0, 1.0]
    assert detection.detect_massive_layer(_pos0([quiet, at_abs])) == 1
    assert detection.detect_massive_layer(_pos0([quiet, at_ratio])) == 1


def test_detect_just_below_thresholds() -> None:
    """Just under 100 (ratio huge) or just under 1000x the median (value huge) does not qualify."""
    below_abs = [0.0625, 0.0625, 99.99]
    below_ratio = [0.126, 0.126, 125.0]  # ratio 992
    quiet = [1.0, 1.0, 1.0]
    assert detection.detect_massive_layer(_pos0([quiet, below_abs])) is None
    assert detection.detect_massive_layer(_pos0([quiet, below_ratio])) is None
    assert detection.detect_massive_layer(_pos0([quiet, below_abs]), min_abs=99.0) == 1
    assert detection.detect_massive_layer(_pos0([quiet, below_ratio]), min_ratio=990.0) == 1


def test_detect_returns_first_qualifying_layer() -> None:
    """With several qualifying layers the first one is returned, even if a later one is larger."""
    quiet, big, bigger = [1.0, 1.0, 1.0], [0.1, 0.1, 500.0], [0.1, 0.1, 5000.0]
    assert detection.detect_massive_layer(_pos0([quiet, quiet, big, bigger])) == 2
    assert detection.detect_massive_layer(_pos0([big, quiet, bigger])) == 0


def test_detect_averages_over_prompts() -> None:
    """|x| is averaged over prompts first: a value massive in one prompt out of four may fall below 100."""
    pos0 = torch.zeros(4, 1, 5) + 0.01
    pos0[0, 0, 2] = 300.0  # mean over prompts = 75 + ... < 100
    assert detection.detect_massive_layer(pos0) is None
    pos0[1, 0, 2] = -300.0  # mean |x| now ~150
    assert detection.detect_massive_layer(pos0) == 0


def test_top_channels_rejects_bad_k() -> None:
    """k must be in 1..width."""
    pos0 = torch.randn(2, 1, 4)
    for k in (0, -1, 5):
        with pytest.raises(ValueError, match="k="):
            detection.top_channels(pos0, 0, k)
    assert len(detection.top_channels(pos0, 0, 4)[0]) == 4


def test_top_channels_rank_by_mean_abs() -> None:
    """Ranking uses the prompt-mean of |x| (signs ignored), not one prompt's maximum."""
    pos0 = torch.zeros(2, 2, 4)
    # channel 0: one big spike (mean |x| 5); channel 1: steady -6 (mean 6); channel 3: 4 and -4 (mean 4)
    pos0[:, 1] = torch.tensor([[10.0, -6.0, 0.0, 4.0], [0.0, -6.0, 0.5, -4.0]])
    pos0[:, 0] = torch.tensor([[0.0, 0.0, 100.0, 0.0], [0.0, 0.0, 100.0, 0.0]])  # other layer ignored
    channels, values = detection.top_channels(pos0, 1, 3)
    assert channels == [1, 0, 3]
    assert values == [6.0, 5.0, 4.0]


def test_topk_stability_three_of_four() -> None:
    """A channel in the top-2 of 3 prompts out of 4 has stability 0.75; one in every top-2 has 1.0."""
    pos0 = torch.tensor([
        [9.0, 8.0, 1.0, 0.0],
        [9.0, 8.0, 1.0, 0.0],
        [9.0, -8.0, 1.0, 0.0],
        [9.0, 0.0, 1.0, 0.0],  # channel 1 drops out of this prompt's top-2 (channel 2 takes its place)
    ]).unsqueeze(1)
    assert detection.topk_stability(pos0, 0, [0, 1]) == [1.0, 0.75]
    assert detection.topk_stability(pos0, 0, [2, 3]) == [0.25, 0.0]


def test_massive_hidden_dims_criterion_and_order() -> None:
    """Dims with mean |h| >= 100 and >= 1000 x the all-token median, largest first."""
    pos0 = _pos0([[0.0, 500.0, -2000.0, 150.0, 99.0]])
    assert detection.massive_hidden_dims(pos0, 0, median_all=0.1) == [2, 1, 3]
    assert detection.massive_hidden_dims(pos0, 0, median_all=0.2) == [2, 1]  # 150 < 1000 * 0.2
    assert detection.massive_hidden_dims(pos0, 0, median_all=10.0) == []


def test_channel_contributions(tiny_llama) -> None:
    """Contribution of channel c to hidden dim h is W_down[h, c] * inter[c]; they sum to down_proj(inter)[h]."""
    model, _ = tiny_llama
    w = arch.down_matrix(model, PLANT["layer"]).detach()
    torch.manual_seed(0)
    inter = torch.randn(w.shape[1])
    h = PLANT["hidden_dim"]
    contrib = detection.channel_contributions(w, inter, h)
    assert contrib.shape == inter.shape
    for c in (0, PLANT["channel"], w.shape[1] - 1):
        assert float(contrib[c]) == pytest.approx(float(w[h, c]) * float(inter[c]), rel=1e-6)
    with torch.no_grad():
        out = arch.down_proj(model, PLANT["layer"])(inter)
    assert float(contrib.sum()) == pytest.approx(float(out[h]), rel=1e-5, abs=1e-6)


# --------------------------------------------------------------------------------- decompositions


def test_origin_split_at_planted_layer(tiny_llama) -> None:
    """At the massive layer: before + attn + ffn == after, and the FFN branch carries > 99% of it."""
    model, tok = tiny_llama
    stats = _prompt_stats(model, tok, "tiny-llama")
    split = detection.origin_split(stats, PLANT["layer"], [PLANT["hidden_dim"]])
    assert split["before"] + split["attn"] + split["ffn"] == pytest.approx(split["after"], rel=1e-9)
    assert split["after"] > 100
    assert split["ffn"] > 0.99 * split["after"]
    # the residual before the layer is the previous layer's output, read directly
    before = stats.pos0["hidden"][:, PLANT["layer"] - 1, PLANT["hidden_dim"]].mean()
    assert split["before"] == pytest.approx(float(before), rel=1e-6, abs=1e-7)
    # (attn == captured attn_out is checked on ordinary dims below: at a ~6e3 dim, float32 rounding of
    # `after` is of the order of attention's own contribution there)


def test_origin_split_attn_equals_captured_attn_out(tiny_llama) -> None:
    """Llama-style residual: the remainder ``after - before - ffn`` is the captured attn_out summed over dims
    (checked on ordinary dims, where float32 rounding is tiny)."""
    model, tok = tiny_llama
    stats = _prompt_stats(model, tok, "tiny-llama")
    dims = [0, 3, 20, 50]
    for layer in range(1, stats.pos0["hidden"].shape[1]):
        split = detection.origin_split(stats, layer, dims)
        attn = float(stats.pos0["attn_out"][:, layer, dims].mean(0).sum())
        assert split["attn"] == pytest.approx(attn, abs=1e-5)


def test_origin_split_layer0_before_is_embedding(tiny_llama) -> None:
    """At layer 0 the embedding is not captured; ``before`` (the rest) equals the BOS embedding there."""
    model, tok = tiny_llama
    stats = _prompt_stats(model, tok, "tiny-llama")
    dims = [PLANT["bos_dim"], 7, 30]
    split = detection.origin_split(stats, 0, dims)
    emb = model.model.embed_tokens.weight.detach()[tok.bos_token_id, dims].sum()
    assert split["before"] == pytest.approx(float(emb), abs=1e-5)
    assert split["attn"] == pytest.approx(float(stats.pos0["attn_out"][:, 0, dims].mean(0).sum()), abs=1e-7)


def test_origin_split_reads_ffn_after_post_norm(make_tiny) -> None:
    """Gemma-3: the FFN branch is read after the post-FFN norm (what is added to the residual), so with a
    large post-norm gain it is the captured ``post_ffn``, not the raw ``mlp_out``; the split still closes
    and the attention remainder equals the post-attention-norm of the attention output."""
    model = make_tiny("gemma3_text")
    layer, dims = 1, [2, 5]
    with torch.no_grad():
        arch.post_ffn_norm(model, layer).weight[dims] = 20.0
    ids = [torch.randint(3, 64, (1, 6), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    stats = capture.capture(model, ids, points=capture.POINTS)
    split = detection.origin_split(stats, layer, dims)
    post = float(stats.pos0["post_ffn"][:, layer, dims].mean(0).sum())
    raw = float(stats.pos0["mlp_out"][:, layer, dims].mean(0).sum())
    assert split["ffn"] == pytest.approx(post, rel=1e-6)
    assert abs(post - raw) > 1e-3 * abs(post)
    assert split["before"] + split["attn"] + split["ffn"] == pytest.approx(split["after"], rel=1e-9)
    with torch.no_grad():
        normed = arch.layers(model)[layer].post_attention_layernorm(stats.pos0["attn_out"][:, layer])
    assert split["attn"] == pytest.approx(float(normed[:, dims].mean(0).sum()), abs=1e-4)


def test_post_norm_profile_tracks_gemma_gain(make_tiny) -> None:
    """Raising post_feedforward_layernorm.weight[dim] of one Gemma-3 layer to v makes the profile's gain there
    1 + v and multiplies the post-norm magnitude by 1 + v (raw FFN output unchanged); other dims stay put."""
    model = make_tiny("gemma3_text")
    ids = [torch.randint(3, 64, (1, 6), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    layer, dim, other, v = 1, 5, 9, 49.0

    def profile(d):
        return detection.post_norm_profile(model, capture.capture(model, ids, points=capture.POINTS), d)

    before, before_other = profile(dim), profile(other)
    assert before["gain"] == [1.0, 1.0] and before["median_gain"] == [1.0, 1.0]  # Gemma init w = 0
    with torch.no_grad():
        arch.post_ffn_norm(model, layer).weight[dim] = v
    after, after_other = profile(dim), profile(other)
    assert after["gain"][layer] == 1.0 + v and after["gain"][0] == 1.0
    assert after["median_gain"] == [1.0, 1.0]
    assert after["raw_ffn"][layer] == pytest.approx(before["raw_ffn"][layer], rel=1e-6)
    assert after["post_norm"][layer] == pytest.approx((1.0 + v) * before["post_norm"][layer], rel=1e-4)
    assert after_other["gain"][layer] == 1.0
    assert after_other["post_norm"][layer] == pytest.approx(before_other["post_norm"][layer], rel=1e-6)
    assert len(after["raw_ffn"]) == len(after["post_norm"]) == 2


def test_post_norm_profile_refuses_families_without_post_norm(tiny_llama) -> None:
    model, tok = tiny_llama
    stats = capture.capture(model, [models.encode(tok, "tiny-llama", "Hi")], points=capture.POINTS)
    with pytest.raises(ValueError, match="no post-FFN norm"):
        detection.post_norm_profile(model, stats, 0)


def test_find_massive_needs_whole_tensor_window_stats(tiny_llama) -> None:
    model, tok = tiny_llama
    ids = models.encode(tok, "tiny-llama", "Summer is warm.")
    stats = capture.capture(model, [ids], points=capture.POINTS)
    with pytest.raises(ValueError, match="whole=True"):
        detection.find_massive(stats, stats)


# ------------------------------------------------------------------------- intervals over prompts


def _origin_stats(ffn: list[float], attn: list[float]) -> Stats:
    """Position-0 statistics of one hidden dim at layer 1 (layer 0's output 0) with the given per-prompt branches."""
    ffn_t, attn_t = torch.tensor(ffn), torch.tensor(attn)
    zeros = torch.zeros_like(ffn_t)
    hidden = torch.stack([zeros, ffn_t + attn_t], dim=1)[..., None]  # [N, 2 layers, 1 dim]
    return Stats(pos0={"hidden": hidden, "mlp_out": torch.stack([zeros, ffn_t], dim=1)[..., None]})


def test_ffn_share_over_prompts() -> None:
    """The share of the means (as origin_split gives it); the FFN writing nearly everything on every prompt gives
    an interval above 0.9; branches that trade places across prompts give one holding 0.5."""
    rng = torch.Generator().manual_seed(0)
    ffn = (100 + torch.randn(20, generator=rng)).tolist()
    attn = torch.randn(20, generator=rng).tolist()
    stats = _origin_stats(ffn, attn)
    split = detection.origin_split(stats, 1, [0])
    share = detection.ffn_share(stats, 1, [0])
    assert share["value"] == pytest.approx(abs(split["ffn"]) / (abs(split["ffn"]) + abs(split["attn"])))
    assert share["ci95"][0] > 0.9 and share["n"] == 20
    swapped = detection.ffn_share(_origin_stats([10.0, 0.0] * 10, [0.0, 10.0] * 10), 1, [0])
    assert swapped["value"] == pytest.approx(0.5) and swapped["ci95"][0] < 0.5 < swapped["ci95"][1]


def test_layer_agreement_is_a_wilson_share_of_prompts() -> None:
    report = detection.MassiveReport(layer=1, channels=[0], channel_values=[1.0], channel_stability=[1.0],
                                     per_prompt_layers=[1, 1, 1, None, 2], ref_layer=1, hidden_dims=[],
                                     hidden_max=0.0, hidden_ratio=0.0, hidden_ratio_pos0=0.0)
    assert detection.layer_agreement(report) == intervals.proportion(3, 5)
    unanimous = dataclasses.replace(report, per_prompt_layers=[1] * 30)
    assert detection.layer_agreement(unanimous)["ci95"][0] > 0.85  # Wilson's lower bound at 30 of 30


def test_hidden_ratio_interval_over_prompts(planted) -> None:
    """With BOS every prompt's position 0 is the same token: the value is the report's and the interval a point;
    prompts whose top |h| differs by 10x give an interval spanning the spread."""
    r = planted.report
    same = detection.hidden_ratio(planted)
    assert same["value"] == pytest.approx(r.hidden_ratio, rel=1e-5)
    assert same["ci95"] == pytest.approx([r.hidden_ratio] * 2, rel=1e-5)
    hidden = planted.prompts.pos0["hidden"].clone()
    hidden[1, r.ref_layer] *= 10
    spread = detection.hidden_ratio(dataclasses.replace(
        planted, prompts=dataclasses.replace(planted.prompts, pos0={**planted.prompts.pos0, "hidden": hidden})))
    assert spread["ci95"][0] < 2 * r.hidden_ratio and spread["ci95"][1] > 9 * r.hidden_ratio


def test_record_measurement_records_intervals_over_prompts(planted, records) -> None:
    detection.record_measurement(planted)
    recs = records()
    agreement = recs["tiny-llama/massive_layer_agreement"]
    assert agreement["value"] == 1.0 and agreement["ci95"] == intervals.proportion(2, 2)["ci95"]
    stable = recs["tiny-llama/massive_top2_stability"]
    assert stable["ci95"] == intervals.proportion(round(stable["value"] * 2), 2)["ci95"]
    for key in ("massive_hidden_ratio", "origin/ffn_share"):
        rec = recs[f"tiny-llama/{key}"]
        assert rec["ci95"][0] <= rec["value"] * (1 + 1e-6) and rec["value"] <= rec["ci95"][1] * (1 + 1e-6), key
        assert "2 prompts" in rec["note"], key
    assert recs["tiny-llama/massive_hidden_ratio"]["value"] == planted.report.hidden_ratio


def test_record_measurement_without_a_massive_layer_records_no_agreement(planted, records) -> None:
    none = dataclasses.replace(planted, report=dataclasses.replace(planted.report, layer=None, channels=[],
                                                                   channel_values=[], channel_stability=[]))
    detection.record_measurement(none)
    recs = records()
    assert recs["tiny-llama/massive_layer_agreement"]["value"] is None
    assert recs["tiny-llama/massive_top2_stability"]["ci95"] is None
