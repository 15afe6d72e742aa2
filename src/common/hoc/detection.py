"""Massive activations and massive weights: detection (House of Cards §2.2–2.3, SunMA §2).

Criterion (SunMA §2.2, applied by HoC to the FFN intermediate state): a value is *massive* when
|x| >= 100 and |x| >= 1000 x the median |x|. The massive layer is the first layer whose position-0
intermediate state has such a value (house_of_cards.md §6.1). There is no fallback: when no layer
qualifies the answer is ``None`` and attacks must refuse (DESIGN §6).

Inputs are ``capture.Stats`` from two runs: the fixed detection prompts fed one by one (position-0
vectors) and corpus windows with ``whole=True`` (per-window medians over all tokens and dims).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.core import arch, intervals, models
from common.core.capture import POINTS, Stats, capture
from common.core.manifest import record, record_model
from common.hoc import paper

MIN_ABS = paper.SUN_MIN_ABS


MIN_RATIO = paper.SUN_MIN_RATIO


def layer_profile(pos0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer, the top |x| at position 0 and its ratio to the median |x| of that position-0 vector.

    ``pos0`` is [N, L, D] (N prompts); |x| is averaged over prompts first. Returns ([L], [L]).
    """
    if pos0.ndim != 3 or pos0.numel() == 0:
        raise ValueError(f"position-0 statistics must be a non-empty [N, L, D] tensor (capture(...).pos0[point]), "
                         f"got shape {tuple(pos0.shape)}")
    if not pos0.is_floating_point():
        raise TypeError(f"position-0 statistics must be floating point activations, got {pos0.dtype}")
    if not torch.isfinite(pos0).all():
        raise ValueError("position-0 statistics hold NaN/inf (fp16 overflow?): capture in float32, or a NaN would "
                         "read as 'no massive layer'")
    a = pos0.abs().mean(0)
    top = a.max(-1).values
    return top, top / a.median(-1).values.clamp_min(1e-12)


def detect_massive_layer(inter_pos0: torch.Tensor, min_abs: float = MIN_ABS,
                         min_ratio: float = MIN_RATIO) -> int | None:
    """First layer whose position-0 intermediate state has a massive value, or ``None`` (no fallback)."""
    top, ratio = layer_profile(inter_pos0)
    hits = ((top >= min_abs) & (ratio >= min_ratio)).nonzero().flatten()
    return int(hits[0]) if len(hits) else None


def top_channels(inter_pos0: torch.Tensor, layer: int, k: int) -> tuple[list[int], list[float]]:
    """The top-k intermediate channels of ``layer`` ranked by mean |x| at position 0 (HoC Alg. 1, l.1–4)."""
    width, n_layers = inter_pos0.shape[-1], inter_pos0.shape[1]
    if not 0 < k <= width:
        raise ValueError(f"k={k} must be between 1 and the intermediate size {width}")
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} is outside the {n_layers} captured layers; pick 0 <= layer < {n_layers}")
    vals, idx = inter_pos0[:, layer].abs().mean(0).topk(k)
    return idx.tolist(), vals.tolist()


def topk_stability(inter_pos0: torch.Tensor, layer: int, channels: list[int]) -> list[float]:
    """For each consensus channel, the share of prompts whose own top-k (k = len(channels)) contains it."""
    k = len(channels)
    per_prompt = inter_pos0[:, layer].abs().topk(k, dim=-1).indices
    return [(per_prompt == c).any(-1).float().mean().item() for c in channels]


def massive_hidden_dims(hidden_pos0: torch.Tensor, layer: int, median_all: float,
                        min_abs: float = MIN_ABS, min_ratio: float = MIN_RATIO) -> list[int]:
    """Hidden dims whose mean |h| at position 0 after ``layer`` meets the criterion against ``median_all``
    (the median over all tokens and dims of that layer's output; DESIGN §9). Largest first."""
    a = hidden_pos0[:, layer].abs().mean(0)
    ok = (a >= min_abs) & (a >= min_ratio * median_all)
    dims = ok.nonzero().flatten()
    return dims[a[dims].argsort(descending=True)].tolist()


def channel_contributions(down: torch.Tensor, inter: torch.Tensor, hidden_dim: int) -> torch.Tensor:
    """What each intermediate channel c writes into ``hidden_dim``: W_down[hidden_dim, c] * inter[c]."""
    return down[hidden_dim].float() * inter.float()


@dataclass(frozen=True)
class MassiveReport:
    """Detection result for one model. ``ref_layer`` is where the hidden-state numbers are read: the
    massive layer, or (none found) the layer whose position-0 hidden top-1 is largest vs its median."""
    layer: int | None
    channels: list[int]
    channel_values: list[float]
    channel_stability: list[float]
    per_prompt_layers: list[int | None]
    ref_layer: int
    hidden_dims: list[int]
    hidden_max: float
    hidden_ratio: float
    hidden_ratio_pos0: float

    @property
    def found(self) -> bool:
        return self.layer is not None


def find_massive(prompts: Stats, windows: Stats, k: int = 5) -> MassiveReport:
    """Detect the massive layer, its top-k channels and the massive hidden dims (HoC §2.2–2.3).

    ``prompts``: position-0 statistics of the detection prompts; ``windows``: whole-tensor statistics
    of corpus windows (for the all-token median of each layer).
    """
    if "hidden" not in windows.median:
        raise ValueError("window statistics need whole-tensor medians: capture them with whole=True")
    inter, hidden = prompts.pos0["inter"], prompts.pos0["hidden"]
    median_all = windows.median["hidden"].mean(0)  # [L], SunMA: mean over windows of the per-window median
    hidden_top, hidden_ratio_pos0 = layer_profile(hidden)
    layer = detect_massive_layer(inter)
    ref = layer if layer is not None else int((hidden_top / median_all).argmax())
    per_prompt = [detect_massive_layer(inter[i:i + 1]) for i in range(len(inter))]
    channels, values, stability = [], [], []
    if layer is not None:
        channels, values = top_channels(inter, layer, k)
        stability = topk_stability(inter, layer, channels)
    top = float(hidden_top[ref])
    return MassiveReport(
        layer=layer, channels=channels, channel_values=values, channel_stability=stability,
        per_prompt_layers=per_prompt, ref_layer=ref,
        hidden_dims=massive_hidden_dims(hidden, ref, float(median_all[ref])), hidden_max=top,
        hidden_ratio=top / float(median_all[ref]), hidden_ratio_pos0=float(hidden_ratio_pos0[ref]))


def massive_weights(model: torch.nn.Module, prompt_ids: list[torch.Tensor], k: int = 5) -> tuple[int, list[int]]:
    """HoC Alg. 1 lines 1–4 on a *pre-trained* model: the massive layer (first layer whose position-0
    intermediate state meets Sun's criterion, mean |x| over the prompts) and its top-k channels, ranked.

    ``prompt_ids``: [1, T] token ids per prompt, with the model's BOS policy applied. Raises ValueError
    when no layer qualifies (nothing to attack or drop) or when k exceeds the layer."""
    inter = capture(model, prompt_ids, points=("inter",)).pos0["inter"]
    layer = detect_massive_layer(inter)
    if layer is None:
        top, ratio = layer_profile(inter)
        raise ValueError(f"no massive layer: the largest position-0 intermediate value is {float(top.max()):.3g} "
                         f"(max ratio to the median {float(ratio.max()):.3g}); Sun's criterion needs >= {MIN_ABS:g} "
                         f"and >= {MIN_RATIO:g}x. This model has no massive weights for MacDrop or the attacks")
    return layer, top_channels(inter, layer, k)[0]


def massive_layer(model: torch.nn.Module, tok, key: str, prompts: tuple[str, ...]) -> int | None:
    """The massive layer of ``model`` on the detection ``prompts`` (notebook 01's criterion, no fallback), or
    ``None``: one cheap position-0 capture, for notebooks that only need to know where it is."""
    ids = [models.encode(tok, key, p) for p in prompts]
    return detect_massive_layer(capture(model, ids, points=("inter",)).pos0["inter"])


def origin_per_prompt(prompts: Stats, layer: int, dims: list[int]) -> dict[str, np.ndarray]:
    """``origin_split`` for each detection prompt: before / attn / ffn / after as ``[N]`` float64 arrays."""
    def at(point: str, i: int) -> np.ndarray:
        return prompts.pos0[point][:, i, dims].double().sum(-1).numpy()

    ffn = at("post_ffn" if "post_ffn" in prompts.pos0 else "mlp_out", layer)
    after = at("hidden", layer)
    if layer == 0:  # the embedding is not captured: take attention directly, the input as the rest
        attn = at("attn_out", 0)
        return {"before": after - attn - ffn, "attn": attn, "ffn": ffn, "after": after}
    before = at("hidden", layer - 1)
    return {"before": before, "attn": after - before - ffn, "ffn": ffn, "after": after}


def origin_split(prompts: Stats, layer: int, dims: list[int]) -> dict[str, float]:
    """HoC Fig. 3a at the massive layer, summed over ``dims`` at position 0 (mean over prompts): the
    residual before the layer, what the attention branch adds, what the FFN branch adds, the residual after.

    The FFN branch is read after its post-norm where the family has one (Gemma). The attention branch is
    the rest of the residual update, ``after - before - ffn`` (exact for pre-norm residual blocks; for
    Llama-style layers it equals the captured ``attn_out``, which the unit tests check).
    """
    return {part: float(v.mean()) for part, v in origin_per_prompt(prompts, layer, dims).items()}


def ffn_share(prompts: Stats, layer: int, dims: list[int]) -> dict:
    """|ffn| / (|ffn| + |attn|) of ``origin_split`` (the share of the massive dims' update at ``layer`` written
    by the FFN, from the means over prompts), with its bootstrap over prompts (``intervals.function_of_means``)."""
    split = origin_per_prompt(prompts, layer, dims)
    return intervals.function_of_means(np.stack([split["ffn"], split["attn"]], axis=1),
                                       lambda m: np.abs(m[:, 0]) / (np.abs(m[:, 0]) + np.abs(m[:, 1])))


def largest_hidden_dim(prompts: Stats) -> int:
    """The hidden dim with the largest mean |h| at position 0 in any layer."""
    return int(prompts.pos0["hidden"].abs().mean(0).max(0).values.argmax())


def post_norm_profile(model: torch.nn.Module, prompts: Stats, dim: int) -> dict[str, list[float]]:
    """Per layer, at position 0 and hidden ``dim``: the raw FFN output, the post-FFN-norm output and the
    norm's gain there vs its median gain. Shows where a family with post-norms (Gemma) makes large
    values from a small FFN output (offline_resources.md §3)."""
    n = len(arch.layers(model))
    if arch.post_ffn_norm(model, 0) is None:
        raise ValueError(f"model_type {model.config.model_type!r} has no post-FFN norm; post_norm_profile "
                         "applies to families with one (Gemma 2/3)")
    gains = [arch.norm_gain(model, arch.post_ffn_norm(model, i)) for i in range(n)]
    return {
        "raw_ffn": prompts.pos0["mlp_out"][:, :, dim].abs().mean(0).tolist(),
        "post_norm": prompts.pos0["post_ffn"][:, :, dim].abs().mean(0).tolist(),
        "gain": [float(g[dim]) for g in gains],
        "median_gain": [float(g.abs().median()) for g in gains],
    }


@dataclass
class Measurement:
    """Everything notebook 01 needs from one model, captured in one load (the model is then freed)."""
    key: str
    n_layers: int
    prompts: Stats
    windows: Stats
    report: MassiveReport
    prompt_contributions: torch.Tensor | None  # [N, I] what each channel writes into the top massive dim, per prompt
    post_norm: dict[str, list[float]] | None
    alone_vs_prompt: float  # max |pos0 inter (first token alone) - (whole prompt)| / max |pos0 inter|
    prompt_spread: float  # max over prompts of |pos0 inter - prompt 0's| / max |pos0 inter|

    @property
    def contributions(self) -> torch.Tensor | None:
        """[I] what each channel writes into the top massive hidden dim, mean over prompts."""
        return None if self.prompt_contributions is None else self.prompt_contributions.mean(0)


def measure(model: torch.nn.Module, tok, key: str, prompts: tuple[str, ...], windows: torch.Tensor, k: int = 5,
            batch_size: int = 4) -> Measurement:
    """Capture position-0 statistics on the detection prompts (one by one) and whole-tensor statistics on
    the ``[N, T]`` corpus ``windows``, detect (``find_massive``) and gather the origin evidence (HoC §2.2)."""
    ids = [models.encode(tok, key, p) for p in prompts]
    pstats = capture(model, ids, points=POINTS)
    wstats = capture(model, windows.split(batch_size), points=("hidden", "inter"), whole=True)
    report = find_massive(pstats, wstats, k)
    # Causality (HoC §2.3): position 0 sees only itself, so feeding the first token alone changes nothing.
    alone = capture(model, [i[:, :1] for i in ids], points=("inter",)).pos0["inter"]
    inter = pstats.pos0["inter"]
    scale = inter.abs().max().clamp_min(1e-12)
    contributions = None
    if report.found and report.hidden_dims:
        down = arch.down_matrix(model, report.layer).detach().cpu()
        contributions = channel_contributions(down, inter[:, report.layer], report.hidden_dims[0])
    post = None
    if arch.post_ffn_norm(model, 0) is not None:
        post = post_norm_profile(model, pstats, largest_hidden_dim(pstats))
    return Measurement(key, len(arch.layers(model)), pstats, wstats, report, contributions, post,
                       alone_vs_prompt=float((alone - inter).abs().max() / scale),
                       prompt_spread=float((inter - inter[:1]).abs().max() / scale))


def hidden_ratio(m: Measurement) -> dict:
    """``MassiveReport.hidden_ratio`` with its bootstrap over prompts: the largest over hidden dims of the mean |h|
    over prompts at position 0 after the reference layer, over that layer's all-token median (from the corpus
    windows, held fixed); the dim maximum is recomputed on each resample of prompts."""
    ref = m.report.ref_layer
    median = float(m.windows.median["hidden"].mean(0)[ref])
    per_prompt = m.prompts.pos0["hidden"][:, ref].abs().double().numpy() / median
    return intervals.function_of_means(per_prompt, lambda means: means.max(-1))


def layer_agreement(r: MassiveReport) -> dict:
    """Share of detection prompts whose own massive layer (the criterion on that prompt alone) is the detected
    one, with Wilson's interval over prompts (``intervals.proportion``)."""
    return intervals.proportion(sum(layer == r.layer for layer in r.per_prompt_layers), len(r.per_prompt_layers))


def record_measurement(m: Measurement) -> None:
    """Record notebook 01's manifest keys for one model (DESIGN §9), with paper values where known."""
    r, key = m.report, m.key
    paper_values = paper.TABLE7.get(key, {})
    record_model(key)
    none_note = "no layer meets |x|>=100 and >=1000x median at position 0 of the intermediate state"
    record(f"{key}/massive_layer", r.layer, paper=paper_values.get("layer"), paper_ref=paper.TABLE7_REF,
           note="0-based layer index" if r.found else none_note)
    record(f"{key}/massive_channels", r.channels if r.found else None, paper=paper_values.get("channels"),
           paper_ref=paper.TABLE7_REF, note="top-k intermediate channels at position 0, ranked" if r.found else none_note)
    record(f"{key}/massive_layer_per_prompt", r.per_prompt_layers,
           note="the same criterion applied to each detection prompt alone (first word varies without BOS)")
    n = len(r.per_prompt_layers)
    agreement = layer_agreement(r) if r.found else {"value": None, "ci95": None}
    record(f"{key}/massive_layer_agreement", agreement["value"], ci95=agreement["ci95"],
           note=f"share of the {n} detection prompts whose own massive layer is massive_layer; Wilson 95% interval "
                "over prompts" if r.found else none_note)
    record(f"{key}/massive_channel_values", r.channel_values or None)
    stable = min(r.channel_stability[:2]) if r.found else None
    record(f"{key}/massive_top2_stability", stable,
           ci95=intervals.proportion(round(stable * n), n)["ci95"] if r.found else None,
           note="lowest share of prompts whose top-k contains each of the top-2 consensus channels; Wilson 95% "
                f"interval over the {n} prompts")
    record(f"{key}/massive_channel_stability", r.channel_stability or None,
           note="share of detection prompts whose own top-k contains each channel")
    record(f"{key}/massive_hidden_dims", r.hidden_dims, paper=paper_values.get("hidden_dims"),
           paper_ref=paper.TABLE7_REF,
           note=f"hidden dims at position 0 after layer {r.ref_layer} meeting Sun's criterion")
    record(f"{key}/massive_ref_layer", r.ref_layer, note="layer where the hidden-state numbers are read (0-based)")
    record(f"{key}/massive_hidden_max", r.hidden_max, note=f"top |h| at position 0 after layer {r.ref_layer}")
    record(f"{key}/massive_hidden_ratio", r.hidden_ratio, ci95=hidden_ratio(m)["ci95"],
           note=f"vs median |h| over all tokens and dims of that layer (mean over windows); 95% bootstrap over the {n} "
                "prompts (top dim recomputed per resample, the window median held fixed)")
    record(f"{key}/massive_hidden_ratio_pos0", r.hidden_ratio_pos0, note="vs median |h| of position 0")
    dim = largest_hidden_dim(m.prompts)
    record(f"{key}/hidden_max_any_layer", float(m.prompts.pos0["hidden"][:, :, dim].abs().mean(0).max()),
           note=f"largest mean |h| at position 0 over all layers, hidden dim {dim}")
    record(f"{key}/first_token_alone_maxdiff", m.alone_vs_prompt,
           note="max |difference| of the position-0 intermediate state, first token alone vs whole prompt, "
                "relative to its max |value| (causality: 0 up to fp32 rounding)")
    record(f"{key}/first_token_prompt_spread", m.prompt_spread,
           note="max relative change of the position-0 intermediate state across detection prompts")
    if m.post_norm is not None:
        gain = [abs(g) for g in m.post_norm["gain"]]
        record(f"{key}/postnorm/max_gain_at_dim", max(gain),
               note=f"max |1+w| of the post-FFN norm at hidden dim {dim}, over layers")
        record(f"{key}/postnorm/median_gain", float(torch.tensor(m.post_norm["median_gain"]).median()),
               note="median over layers of the norm's median |gain|")
        record(f"{key}/postnorm/max_raw_ffn_at_dim", max(m.post_norm["raw_ffn"]),
               note=f"max |raw FFN output| at hidden dim {dim}, position 0, over layers")
    if r.found:
        share = ffn_share(m.prompts, r.layer, r.hidden_dims)
        record(f"{key}/origin/ffn_share", share["value"], ci95=share["ci95"], paper_ref="HoC Fig. 3a",
               note="share |ffn| / (|ffn| + |attn|) of the massive dims' update at the massive layer written by the FFN "
                    f"(means over prompts); 95% bootstrap over the {n} prompts")
    else:
        record(f"{key}/origin/ffn_share", None, note=none_note)
    record(f"{key}/n_layers", m.n_layers, note="decoder layers of the model")
    record(f"{key}/hidden_max_any_layer_dim", dim, note="hidden dim of hidden_max_any_layer")
    record(f"{key}/hidden_max_any_layer_at", int(m.prompts.pos0["hidden"][:, :, dim].abs().mean(0).argmax()),
           note="layer (0-based) where hidden_max_any_layer is reached")


def record_paper_references(run_keys: tuple[str, ...]) -> None:
    """Paper models this run did not measure get ``value: null`` records carrying the paper's values."""
    for key, values in paper.TABLE7.items():
        if key in run_keys:
            continue
        for quantity in ("layer", "hidden_dims", "channels"):
            name = "massive_layer" if quantity == "layer" else f"massive_{quantity}"
            record(f"{key}/{name}", None, paper=values[quantity], paper_ref=paper.TABLE7_REF,
                   note="paper model, not run in this profile")


def write_share(m: Measurement) -> dict | None:
    """Share of what the massive layer's FFN writes into the top massive hidden dim (sum of |W_down[dim, c] inter[c]|
    over all channels c, inter the mean over prompts) that comes from the top-k massive channels (HoC Table 7,
    Fig. 1a), with its bootstrap over prompts: ``{"value", "ci95", "n"}``; ``None`` without a massive layer or
    massive hidden dim."""
    if m.prompt_contributions is None:
        return None
    top = m.report.channels

    def share(means: np.ndarray) -> np.ndarray:
        size = np.abs(means)
        return size[:, top].sum(-1) / size.sum(-1)

    return intervals.function_of_means(m.prompt_contributions.double().numpy(), share)


def record_write_share(m: Measurement) -> float | None:
    """Record ``M/massive_channels_write_share`` (notebook 01 (d)) for a model with a massive layer; returns it."""
    share = write_share(m)
    if share is None:
        return None
    record(f"{m.key}/massive_channels_write_share", share["value"], ci95=share["ci95"],
           note=f"share of |W_down[dim, c] inter[c]| from the top-k channels; 95% bootstrap over the {share['n']} prompts")
    return share["value"]
