"""Massive activations and massive weights of mixture-of-experts models: which layer, which expert, which
channels (House of Cards §2.2 per expert; issue 23).

Each (layer, expert) is judged like a dense layer (``detection``): its position-0 intermediate state, |x| averaged
over the detection prompts whose first token is routed to that expert there, meets Sun's criterion
(``detection.MIN_ABS``, ``detection.MIN_RATIO``). The massive layer is the first layer where any expert does; the
massive expert, among that layer's qualifying experts, the one with the largest value; no fallback (DESIGN §6).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.core.expert_capture import ExpertStats, capture_experts
from common.hoc.detection import MIN_ABS, MIN_RATIO, detect_massive_layer, layer_profile, top_channels


def expert_profile(stats: ExpertStats) -> tuple[torch.Tensor, torch.Tensor]:
    """``[L, E, I]`` mean |x| of each expert's position-0 intermediate state over the prompts routed to it at each
    layer (0 where none was) and ``[L, E]`` how many prompts were (E: the most experts of any layer)."""
    n_layers, width = len(stats.n_experts), stats.pos0.shape[-1]
    n_experts = max(stats.n_experts)
    sums = torch.zeros(n_layers, n_experts, width)
    counts = torch.zeros(n_layers, n_experts)
    n, layer, j = (stats.expert >= 0).nonzero(as_tuple=True)
    where = (layer, stats.expert[n, layer, j])
    sums.index_put_(where, stats.pos0[n, layer, j].abs(), accumulate=True)
    counts.index_put_(where, torch.ones(len(n)), accumulate=True)
    return sums / counts.clamp_min(1)[..., None], counts.long()


@dataclass(frozen=True)
class ExpertReport:
    """MoE detection result: the massive ``layer`` and ``expert`` (None when no (layer, expert) qualifies), the
    expert's top-k ``channels`` ranked with their mean |x|, every qualifying expert of that layer (largest first),
    and how many of the ``n_prompts`` prompts were routed to the expert there."""
    layer: int | None
    expert: int | None
    channels: list[int]
    channel_values: list[float]
    experts_at_layer: list[int]
    n_routed: int
    n_prompts: int

    @property
    def found(self) -> bool:
        return self.layer is not None


def find_massive_expert(stats: ExpertStats, k: int = 5, min_abs: float = MIN_ABS,
                        min_ratio: float = MIN_RATIO) -> ExpertReport:
    """Detect the massive layer, expert and its top-k channels (HoC §2.2 and Alg. 1 l.1–4, per expert) from
    ``capture_experts`` statistics of the detection prompts."""
    profile, counts = expert_profile(stats)
    n_prompts = stats.expert.shape[0]

    def own(layer: int, e: int) -> torch.Tensor:
        """[1, 1, I_e]: the expert's profile over its own width (the zero padding would make any median 0)."""
        return profile[layer, e, :stats.widths[layer][e]][None, None]

    for layer, widths in enumerate(stats.widths):
        hits = [e for e in range(len(widths)) if counts[layer, e] > 0
                and detect_massive_layer(own(layer, e), min_abs, min_ratio) is not None]
        if hits:
            hits.sort(key=lambda e: -float(layer_profile(own(layer, e))[0][0]))
            channels, values = top_channels(own(layer, hits[0]), 0, k)
            return ExpertReport(layer, hits[0], channels, values, hits, int(counts[layer, hits[0]]), n_prompts)
    return ExpertReport(None, None, [], [], [], 0, n_prompts)


def massive_expert_weights(model: torch.nn.Module, prompt_ids: list[torch.Tensor],
                           k: int = 5) -> tuple[int, int, list[int]]:
    """HoC Alg. 1 lines 1–4 on a pre-trained mixture-of-experts model: (massive layer, expert, top-k channels)
    for ``edits`` and ``macdrop.MacDrop(..., expert=)``. ``prompt_ids``: [1, T] ids per prompt, the model's BOS
    policy applied. A ValueError when no (layer, expert) qualifies (nothing to attack or drop)."""
    stats = capture_experts(model, prompt_ids)
    report = find_massive_expert(stats, k)
    if not report.found:
        top = float(expert_profile(stats)[0].max())
        raise ValueError(f"no massive expert: the largest position-0 intermediate value of any routed expert is "
                         f"{top:.3g}; Sun's criterion needs >= {MIN_ABS:g} and >= {MIN_RATIO:g}x the median. This "
                         "model has no massive weights for MacDrop or the attacks")
    return report.layer, report.expert, report.channels
