"""Weight edits of House of Cards (Table 1, Fig. 4, Table 7 attacks; SunMA's interventions) as context
managers that restore the exact original values, also on exceptions, and copy only the rows they touch
(DESIGN §6): zero / keep-only / random intermediate channels, silencing channels, the super weight,
setting hidden dims, the post-FFN norm gain. Attacks on a model without a massive layer refuse. The channel edits
take an optional ``expert``: the rows of that expert of a mixture-of-experts layer (``common.core.experts``)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from common.core import arch, experts
from common.core.hooks import first, hooked
from common.hoc.detection import MassiveReport


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


def _channel_slices(model: torch.nn.Module, layer: int, channels: torch.Tensor,
                    expert: int | None = None) -> list[tuple[torch.Tensor, tuple]]:
    slices = []
    for block in experts.row_blocks(model, layer, expert):
        slices.append((block.weight, block.index(channels)))
        if block.bias is not None:  # a biased projection (GPT-2 c_fc): zero the channel's bias as well
            slices.append((block.bias, (channels + block.offset,)))
    return slices


def channel_index(model: torch.nn.Module, layer: int, channels: list[int], expert: int | None = None) -> torch.Tensor:
    """``channels`` as a long tensor, or a ValueError when one lies outside the intermediate size of the layer
    (or of its expert ``expert``)."""
    width = experts.width(model, layer, expert)
    idx = torch.as_tensor(list(channels), dtype=torch.long)
    if len(idx) and (idx.min() < 0 or idx.max() >= width):
        raise ValueError(f"channel index out of range for layer {layer}: must be in [0, {width})")
    return idx


@contextmanager
def zero_channels(model: torch.nn.Module, channels_by_layer: dict[int, list[int]],
                  expert: int | None = None) -> Iterator[None]:
    """Zero the up/gate rows (fused gate_up halves; GPT-2 c_fc columns and bias) of the given intermediate
    channels in each layer, so those channels are exactly 0 (HoC §2.3: SiLU(0) = GELU(0) = 0; equivalent to
    zeroing the matching down_proj columns); with ``expert``, that expert's rows in each layer."""
    slices = []
    for layer, channels in channels_by_layer.items():
        slices += _channel_slices(model, layer, channel_index(model, layer, channels, expert), expert)
    with _patched(slices):
        yield


@contextmanager
def silence_channels(model: torch.nn.Module, channels_by_layer: dict[int, list[int]]) -> Iterator[None]:
    """Force the given intermediate channels to 0 at the input of down_proj (a forward pre-hook, no weight
    edit). On a model with adapters this equals merging them and then zeroing the merged up/gate rows (the
    "merged" reading of HoC Table 4, research §6.9); on a plain model it equals ``zero_channels``."""
    def hook(_module, args, idx):
        x = args[0].clone()
        x[..., idx.to(x.device)] = 0
        return (x, *args[1:])

    indices = {layer: channel_index(model, layer, channels) for layer, channels in channels_by_layer.items()}
    with hooked((arch.down_proj(model, layer), "input", functools.partial(hook, idx=idx))
                for layer, idx in indices.items()):
        yield


def require_layer(report: MassiveReport) -> int:
    """The massive layer, or a ValueError: attacks never fall back to an arbitrary layer."""
    if not report.found:
        raise ValueError("this model has no detectable massive layer (no layer meets Sun's criterion), so "
                         "there are no massive weights to attack")
    return report.layer


def zero_massive(model: torch.nn.Module, layer: int, ranked: list[int], k: int, expert: int | None = None):
    """HoC top-k *zeroing*: zero the k massive rows of up/gate at ``layer`` (``ranked``: channels by rank), of
    expert ``expert`` on a mixture-of-experts layer."""
    check_k(k, experts.width(model, layer, expert))
    if k > len(ranked):
        raise ValueError(f"k={k} exceeds the {len(ranked)} ranked channels; detect with a larger k")
    return zero_channels(model, {layer: ranked[:k]}, expert)


def keep_only_massive(model: torch.nn.Module, layer: int, ranked: list[int], k: int, expert: int | None = None):
    """HoC top-k *retaining*: zero every other row of up/gate at ``layer`` ((I - k) rows; of expert ``expert``)."""
    width = experts.width(model, layer, expert)
    check_k(k, width)
    return zero_channels(model, {layer: all_but(ranked[:k], width)}, expert)


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


def zero_random(model: torch.nn.Module, layer: int, k: int, seed: int, exclude: list[int] = (),
                expert: int | None = None):
    """Random control: zero k random (non-massive) rows of the same layer (of the same expert ``expert``)."""
    width = experts.width(model, layer, expert)
    return zero_channels(model, {layer: random_channels(width, k, seed, exclude)}, expert)


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
        h = first(out)
        h[:, position, idx.to(h.device)] = values.to(h.device, h.dtype)
        return out

    with hooked([(arch.layer(model, layer), "output", hook)]):
        yield


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
