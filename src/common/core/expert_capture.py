"""Per-expert capture (DESIGN §6: statistics, not tensors): the position-0 intermediate state act(W_gate x) * W_up x
(HoC eq. 1, the input of the expert's down projection) of every expert each sequence's position-0 token is routed
to, per mixture-of-experts layer (``common.core.experts``).

A forward pre-hook on each layer's experts module reads the call transformers 5 makes, ``experts(hidden_states
[tokens, d], top_k_index [tokens, K], top_k_weights)``, picks each sequence's position-0 row and recomputes the
routed experts' intermediate states from it (``experts.expert_intermediate``: what their forward computes). The
shared expert (Qwen2-MoE), which every token goes through, is recorded for every sequence.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from common.core import arch, experts
from common.core.hooks import hooked


@dataclass
class ExpertStats:
    """``expert[n, l, j]`` is the j-th expert (ascending) that sequence n's position-0 token went through at layer
    l, -1 where padded (a dense layer has none); ``pos0[n, l, j]`` is that expert's ``[I]`` position-0
    intermediate state in float32, zero-padded to the widest expert. ``widths[l][e]`` is expert e's intermediate width
    at layer l (the shared expert, Qwen2-MoE's, is index ``experts.num_experts`` and often wider: a narrower
    expert's statistics must be read over its own ``[:width]`` only); ``widths[l]`` is empty for a dense layer."""
    expert: torch.Tensor  # [N, L, K] long
    pos0: torch.Tensor  # [N, L, K, I] float32
    widths: list[list[int]]

    @property
    def n_experts(self) -> list[int]:
        """How many experts each layer has (the shared one included; 0 for a dense layer)."""
        return [len(w) for w in self.widths]


class _ExpertRecorder:
    def __init__(self, model: torch.nn.Module, n_layers: int):
        self.model = model
        self.rows: list[list[dict[int, torch.Tensor]]] = [[] for _ in range(n_layers)]  # per layer, per sequence
        self.batch = (0, 0)  # (B, T) of the batch in flight

    def observe(self, i: int, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        index = args[1] if len(args) > 1 else kwargs.get("top_k_index")
        b, t = self.batch
        if not isinstance(index, torch.Tensor) or hidden is None or hidden.ndim != 2 or hidden.shape[0] != b * t:
            raise RuntimeError(f"layer {i}'s experts module ({type(module).__name__}) was not called as "
                               "transformers 5 calls it, experts(hidden_states [B*T, d], top_k_index [B*T, K], "
                               "top_k_weights): per-expert capture reads the routing from that call")
        rows = torch.arange(b, device=hidden.device) * t
        x, chosen = hidden[rows].detach(), index[rows]
        routed = experts.num_experts(self.model, i)
        per_seq: list[dict[int, torch.Tensor]] = [{} for _ in range(b)]
        for e in chosen.unique().tolist():
            if not 0 <= e < routed:  # a sentinel (expert parallelism): no expert of this process
                continue
            seqs = (chosen == e).any(-1).nonzero().flatten()
            inter = experts.expert_intermediate(self.model, i, e, x[seqs])
            for s, v in zip(seqs.tolist(), inter, strict=True):
                per_seq[s][e] = v.to(torch.float32, copy=True)
        if experts.has_shared_expert(self.model, i):
            for s, v in enumerate(experts.expert_intermediate(self.model, i, routed, x)):
                per_seq[s][routed] = v.to(torch.float32, copy=True)
        self.rows[i].extend(per_seq)

    def result(self, n_seqs: int, widths: list[list[int]]) -> ExpertStats:
        n_layers = len(self.rows)
        k = max((len(d) for per_layer in self.rows for d in per_layer), default=0)
        width = max((w for per_layer in widths for w in per_layer), default=0)
        expert = torch.full((n_seqs, n_layers, k), -1, dtype=torch.long)
        pos0 = torch.zeros(n_seqs, n_layers, k, width)
        for layer, per_seq in enumerate(self.rows):
            for n, found in enumerate(per_seq):
                for j, e in enumerate(sorted(found)):
                    expert[n, layer, j] = e
                    pos0[n, layer, j, :len(found[e])] = found[e].cpu()  # under device_map the layers differ
        return ExpertStats(expert, pos0, widths)


@torch.no_grad()
def capture_experts(model: torch.nn.Module, batches: Iterable[torch.Tensor]) -> ExpertStats:
    """Run the backbone (no LM head) on each unpadded ``[B, T]`` batch of token ids and return the position-0
    intermediate states of the experts each sequence's first token is routed to (``ExpertStats``)."""
    n = len(arch.layers(model))
    moe = [i for i in range(n) if arch.is_moe_layer(model, i)]
    if not moe:
        raise ValueError(f"model_type {getattr(model.config, 'model_type', None)!r} has no mixture-of-experts layer: "
                         "capture its dense intermediate state with capture.capture(points=('inter',))")
    for i in moe:
        experts.storage(model, i)  # refuse storage it cannot read before running anything
    widths = [[experts.expert_intermediate_size(model, i, e)
               for e in range(experts.num_experts(model, i) + experts.has_shared_expert(model, i))] if i in moe else []
              for i in range(n)]
    body, dev = arch.backbone(model), next(model.parameters()).device
    rec = _ExpertRecorder(model, n)
    seen = 0
    with hooked((experts.experts_module(model, i), "input_kwargs", functools.partial(rec.observe, i)) for i in moe):
        for ids in batches:
            arch.check_ids(model, ids, "each batch")
            rec.batch = tuple(ids.shape)
            body(input_ids=ids.to(dev), use_cache=False)
            seen += ids.shape[0]
            if missed := [i for i in moe if len(rec.rows[i]) != seen]:
                raise RuntimeError(f"the experts modules of layers {missed} were not called in the forward: "
                                   "per-expert capture hooks the experts module's call (transformers 5's MoE blocks "
                                   "make it)")
    if not seen:
        raise ValueError("no batches: pass at least one [B, T] batch of token ids")
    return rec.result(seen, widths)
