"""Massive activations and massive weights: detection (House of Cards §2.2–2.3, SunMA §2).

Criterion (SunMA §2.2, applied by HoC to the FFN intermediate state): a value is *massive* when
|x| >= 100 and |x| >= 1000 x the median |x|. The massive layer is the first layer whose position-0
intermediate state has such a value (house_of_cards.md §6.1). There is no fallback: when no layer
qualifies the answer is ``None`` and attacks must refuse (DESIGN §6).

Inputs are ``capture.Stats`` from two runs: the fixed detection prompts fed one by one (position-0
vectors) and corpus windows with ``whole=True`` (per-window medians over all tokens and dims).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from common import arch, models
from common.capture import POINTS, Stats, capture
from common.manifest import record, record_model

MIN_ABS = 100.0
MIN_RATIO = 1000.0


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


def origin_split(prompts: Stats, layer: int, dims: list[int]) -> dict[str, float]:
    """HoC Fig. 3a at the massive layer, summed over ``dims`` at position 0 (mean over prompts): the
    residual before the layer, what the attention branch adds, what the FFN branch adds, the residual after.

    The FFN branch is read after its post-norm where the family has one (Gemma). The attention branch is
    the rest of the residual update, ``after - before - ffn`` (exact for pre-norm residual blocks; for
    Llama-style layers it equals the captured ``attn_out``, which the unit tests check).
    """
    def at(point: str, i: int) -> float:
        return prompts.pos0[point][:, i, dims].mean(0).sum().item()

    ffn = at("post_ffn" if "post_ffn" in prompts.pos0 else "mlp_out", layer)
    after = at("hidden", layer)
    if layer == 0:  # the embedding is not captured: take attention directly, the input as the rest
        attn = at("attn_out", 0)
        return {"before": after - attn - ffn, "attn": attn, "ffn": ffn, "after": after}
    before = at("hidden", layer - 1)
    return {"before": before, "attn": after - before - ffn, "ffn": ffn, "after": after}


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


# Paper reference values (HoC Table 7, SunMA §2), 0-based layer indices (the papers print layer 2 / 4).
PAPER_TABLE7 = {
    "llama-2-7b": {"layer": 1, "hidden_dims": [1415, 2533], "channels": [7890, 10411, 1192, 8731, 5843]},
    "llama-2-13b": {"layer": 3, "hidden_dims": [2100, 4743], "channels": [7678, 8811, 11371, 6619, 12281]},
    "llama-3-8b": {"layer": 1, "hidden_dims": [788, 1384, 4062], "channels": [2427, 198, 6412, 12657, 591]},
    "mistral-7b": {"layer": 1, "hidden_dims": [2070], "channels": [7310, 8572, 2514, 1878, 8693]},
}
PAPER_REF = "HoC Table 7 / SunMA §2 (paper layers are 1-based)"


@dataclass
class Measurement:
    """Everything notebook 01 needs from one model, captured in one load (the model is then freed)."""

    key: str
    n_layers: int
    prompts: Stats
    windows: Stats
    report: MassiveReport
    contributions: torch.Tensor | None  # [I] what each channel writes into the top massive hidden dim
    post_norm: dict[str, list[float]] | None
    alone_vs_prompt: float  # max |pos0 inter (first token alone) - (whole prompt)| / max |pos0 inter|
    prompt_spread: float  # max over prompts of |pos0 inter - prompt 0's| / max |pos0 inter|


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
        contributions = channel_contributions(down, inter[:, report.layer].mean(0), report.hidden_dims[0])
    post = None
    if arch.post_ffn_norm(model, 0) is not None:
        post = post_norm_profile(model, pstats, largest_hidden_dim(pstats))
    return Measurement(key, len(arch.layers(model)), pstats, wstats, report, contributions, post,
                       alone_vs_prompt=float((alone - inter).abs().max() / scale),
                       prompt_spread=float((inter - inter[:1]).abs().max() / scale))


def record_measurement(m: Measurement) -> None:
    """Record notebook 01's manifest keys for one model (DESIGN §9), with paper values where known."""
    r, key = m.report, m.key
    paper = PAPER_TABLE7.get(key, {})
    record_model(key)
    none_note = "no layer meets |x|>=100 and >=1000x median at position 0 of the intermediate state"
    record(f"{key}/massive_layer", r.layer, paper=paper.get("layer"), paper_ref=PAPER_REF,
           note="0-based layer index" if r.found else none_note)
    record(f"{key}/massive_channels", r.channels if r.found else None, paper=paper.get("channels"),
           paper_ref=PAPER_REF, note="top-k intermediate channels at position 0, ranked" if r.found else none_note)
    record(f"{key}/massive_layer_per_prompt", r.per_prompt_layers,
           note="the same criterion applied to each detection prompt alone (first word varies without BOS)")
    record(f"{key}/massive_channel_values", r.channel_values or None)
    record(f"{key}/massive_top2_stability", min(r.channel_stability[:2]) if r.found else None,
           note="lowest share of prompts whose top-k contains each of the top-2 consensus channels")
    record(f"{key}/massive_channel_stability", r.channel_stability or None,
           note="share of detection prompts whose own top-k contains each channel")
    record(f"{key}/massive_hidden_dims", r.hidden_dims, paper=paper.get("hidden_dims"), paper_ref=PAPER_REF,
           note=f"hidden dims at position 0 after layer {r.ref_layer} meeting Sun's criterion")
    record(f"{key}/massive_ref_layer", r.ref_layer, note="layer where the hidden-state numbers are read (0-based)")
    record(f"{key}/massive_hidden_max", r.hidden_max, note=f"top |h| at position 0 after layer {r.ref_layer}")
    record(f"{key}/massive_hidden_ratio", r.hidden_ratio,
           note="vs median |h| over all tokens and dims of that layer (mean over windows)")
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
        split = origin_split(m.prompts, r.layer, r.hidden_dims)
        record(f"{key}/origin/ffn_share", abs(split["ffn"]) / (abs(split["ffn"]) + abs(split["attn"])),
               paper_ref="HoC Fig. 3a", note="share of the massive dims' update at the massive layer written by the FFN")
    else:
        record(f"{key}/origin/ffn_share", None, note=none_note)


def record_paper_references(run_keys: tuple[str, ...]) -> None:
    """Paper models this run did not measure get ``value: null`` records carrying the paper's values."""
    for key, paper in PAPER_TABLE7.items():
        if key in run_keys:
            continue
        for quantity in ("layer", "hidden_dims", "channels"):
            name = "massive_layer" if quantity == "layer" else f"massive_{quantity}"
            record(f"{key}/{name}", None, paper=paper[quantity], paper_ref=PAPER_REF,
                   note="paper model, not run in this profile")


# ------------------------------------------------------------------------------------------ attacks
# Weight edits are context managers that save only the slices they touch and restore them bit-exactly
# on exit, also on an exception (DESIGN §6).


@contextmanager
def _patched(slices: list[tuple[torch.Tensor, tuple]], value: float = 0.0) -> Iterator[None]:
    """Set ``tensor[index] = value`` for every (tensor, index); restore the saved slices on exit."""
    saved = [(t, idx, t[idx].detach().clone()) for t, idx in slices]
    try:
        with torch.no_grad():
            for t, idx, _ in saved:
                t[idx] = value
        yield
    finally:
        with torch.no_grad():
            for t, idx, old in reversed(saved):
                t[idx] = old


def check_k(k: int, width: int) -> None:
    """ValueError naming the limit unless 0 < k <= width."""
    if not 0 < k <= width:
        raise ValueError(f"k={k} is out of range: it must be between 1 and the intermediate size {width}")


def _channel_slices(model: torch.nn.Module, layer: int, channels: torch.Tensor) -> list[tuple[torch.Tensor, tuple]]:
    slices = []
    for block in arch.ffn_input_blocks(model, layer):
        slices.append((block.weight, block.index(channels)))
        if block.bias is not None:  # a biased projection (GPT-2 c_fc): zero the channel's bias as well
            slices.append((block.bias, (channels + block.offset,)))
    return slices


def channel_index(model: torch.nn.Module, layer: int, channels: list[int]) -> torch.Tensor:
    """``channels`` as a long tensor, or a ValueError when one lies outside the layer's intermediate size."""
    width = arch.intermediate_size(model, layer)
    idx = torch.as_tensor(list(channels), dtype=torch.long)
    if len(idx) and (idx.min() < 0 or idx.max() >= width):
        raise ValueError(f"channel index out of range for layer {layer}: must be in [0, {width})")
    return idx


@contextmanager
def zero_channels(model: torch.nn.Module, channels_by_layer: dict[int, list[int]]) -> Iterator[None]:
    """Zero the up/gate rows (fused gate_up halves; GPT-2 c_fc columns and bias) of the given intermediate
    channels in each layer, so those channels are exactly 0 (HoC §2.3: SiLU(0) = GELU(0) = 0; equivalent to
    zeroing the matching down_proj columns)."""
    slices = []
    for layer, channels in channels_by_layer.items():
        slices += _channel_slices(model, layer, channel_index(model, layer, channels))
    with _patched(slices):
        yield


@contextmanager
def silence_channels(model: torch.nn.Module, channels_by_layer: dict[int, list[int]]) -> Iterator[None]:
    """Force the given intermediate channels to 0 at the input of down_proj (a forward pre-hook, no weight
    edit). On a model with adapters this equals merging them and then zeroing the merged up/gate rows (the
    "merged" reading of HoC Table 4, research §6.9); on a plain model it equals ``zero_channels``."""
    handles = []
    try:
        for layer, channels in channels_by_layer.items():
            idx = channel_index(model, layer, channels)

            def hook(_module, args, idx=idx):
                x = args[0].clone()
                x[..., idx.to(x.device)] = 0
                return (x, *args[1:])

            handles.append(arch.down_proj(model, layer).register_forward_pre_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def require_layer(report: MassiveReport) -> int:
    """The massive layer, or a ValueError: attacks never fall back to an arbitrary layer."""
    if not report.found:
        raise ValueError("this model has no detectable massive layer (no layer meets Sun's criterion), so "
                         "there are no massive weights to attack")
    return report.layer


def zero_massive(model: torch.nn.Module, layer: int, ranked: list[int], k: int):
    """HoC top-k *zeroing*: zero the k massive rows of up/gate at ``layer`` (``ranked``: channels by rank)."""
    check_k(k, arch.intermediate_size(model, layer))
    if k > len(ranked):
        raise ValueError(f"k={k} exceeds the {len(ranked)} ranked channels; detect with a larger k")
    return zero_channels(model, {layer: ranked[:k]})


def keep_only_massive(model: torch.nn.Module, layer: int, ranked: list[int], k: int):
    """HoC top-k *retaining*: zero every other row of up/gate at ``layer`` ((I - k) rows)."""
    width = arch.intermediate_size(model, layer)
    check_k(k, width)
    return zero_channels(model, {layer: all_but(ranked[:k], width)})


def all_but(keep: list[int], width: int) -> list[int]:
    """The channels of ``[0, width)`` not in ``keep`` (the rows a keep-only attack zeroes)."""
    kept = set(keep)
    return [c for c in range(width) if c not in kept]


def random_channels(width: int, k: int, seed: int, exclude: list[int] = ()) -> list[int]:
    """k distinct random channels of ``[0, width)`` outside ``exclude`` (seeded; the control of HoC §2.3)."""
    check_k(k, width - len(set(exclude)))
    pool = torch.tensor([c for c in range(width) if c not in set(exclude)])
    gen = torch.Generator().manual_seed(seed)
    return pool[torch.randperm(len(pool), generator=gen)[:k]].sort().values.tolist()


def zero_random(model: torch.nn.Module, layer: int, k: int, seed: int, exclude: list[int] = ()):
    """Random control: zero k random (non-massive) rows of the same layer."""
    return zero_channels(model, {layer: random_channels(arch.intermediate_size(model, layer), k, seed, exclude)})


def _down_entry(model: torch.nn.Module, layer: int, hidden_dim: int, channel: int) -> torch.Tensor:
    """The [d, I] down matrix of ``layer``, once (hidden_dim, channel) is checked to lie inside it."""
    down = arch.down_matrix(model, layer)
    d, width = down.shape
    if not (0 <= hidden_dim < d and 0 <= channel < width):
        raise ValueError(f"entry ({hidden_dim}, {channel}) is outside layer {layer}'s {d} x {width} down projection; "
                         f"pick 0 <= hidden_dim < {d} and 0 <= channel < {width}")
    return down


def super_weight(model: torch.nn.Module, layer: int, hidden_dim: int, channel: int) -> dict[str, float]:
    """Yu et al.'s super weight W_down[hidden_dim, channel] and its ratio to the median |w| of that matrix."""
    down = _down_entry(model, layer, hidden_dim, channel).detach()
    value = float(down[hidden_dim, channel])
    return {"value": value, "ratio_to_median": abs(value) / float(down.abs().median())}


@contextmanager
def zero_super_weight(model: torch.nn.Module, layer: int, hidden_dim: int, channel: int) -> Iterator[None]:
    """Zero the single down_proj entry W_down[hidden_dim, channel] (Yu et al., arXiv 2411.07191)."""
    _down_entry(model, layer, hidden_dim, channel)
    w = arch.down_proj(model, layer).weight
    idx = (channel, hidden_dim) if arch.arch_of(model).conv1d else (hidden_dim, channel)
    with _patched([(w, idx)]):
        yield


@contextmanager
def set_hidden(model: torch.nn.Module, layer: int, dims: list[int], values: torch.Tensor,
               position: int = 0) -> Iterator[None]:
    """SunMA §3 intervention: overwrite the hidden state after ``layer`` at ``position`` in ``dims`` with
    ``values`` (zeros, or the mean over sequences). A forward hook, removed on exit."""
    idx = torch.as_tensor(dims, dtype=torch.long)
    d = arch.down_matrix(model, layer).shape[0]
    if len(idx) and (idx.min() < 0 or idx.max() >= d):
        raise ValueError(f"hidden dims {dims} must lie in [0, {d}), the model's hidden size")
    if values.ndim > 1 or values.numel() not in (1, len(idx)):
        raise ValueError(f"{values.numel()} values for {len(idx)} hidden dims: give one value per dim")

    def hook(_module, _args, out):
        h = out[0] if isinstance(out, tuple) else out
        h[:, position, idx.to(h.device)] = values.to(h.device, h.dtype)
        return out

    handle = arch.layer(model, layer).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def set_norm_gain(model: torch.nn.Module, layers: list[int], dim: int, gain: float = 0.0) -> Iterator[None]:
    """Set the post-FFN norm's effective gain at ``dim`` in ``layers`` (Gemma: weight = gain - 1), e.g. 0 to
    silence what the norm writes there (offline_resources.md §3, the Gemma mechanism)."""
    offset = arch.arch_of(model).norm_offset
    norms = [arch.post_ffn_norm(model, i) for i in layers]
    if any(n is None for n in norms):
        raise ValueError(f"model_type {model.config.model_type!r} has no post-FFN norm")
    with _patched([(n.weight, (dim,)) for n in norms], value=gain - offset):
        yield
