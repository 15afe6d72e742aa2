"""Forward hooks that keep statistics, not tensors (DESIGN §6).

Capture points, per decoder layer (names used everywhere):

- ``hidden``: the layer output h_l (the residual stream; SunMA's object);
- ``inter``: the input of the down projection, i.e. the FFN intermediate state act(W_gate x) * W_up x
  (HoC eq. 1; the origin of massive activations);
- ``attn_out`` / ``mlp_out``: what attention and the FFN write (before any post-norm);
- ``post_ffn``: the output of the post-FFN norm, where a family has one (Gemma 2/3).

Per sequence the hooks keep the position-0 vector (small: d or I floats a layer) and, when
``whole=True``, the top-k |x| over all positions and dims with their flat index plus the median |x|
(SunMA's per-window statistics, averaged over windows afterwards).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from common.core import arch
from common.core.hooks import first, hooked

POINTS = ("hidden", "inter", "attn_out", "mlp_out", "post_ffn")


@dataclass
class Stats:
    """Stacked statistics: ``pos0[p]`` is [N, L, D]; ``top[p]``/``top_index[p]`` [N, L, k]; ``median[p]`` [N, L].

    ``N`` counts sequences, ``L`` layers. ``top_index`` is a flat index ``t * D + d`` into the sequence.
    """
    pos0: dict[str, torch.Tensor] = field(default_factory=dict)
    top: dict[str, torch.Tensor] = field(default_factory=dict)
    top_index: dict[str, torch.Tensor] = field(default_factory=dict)
    median: dict[str, torch.Tensor] = field(default_factory=dict)
    seq_len: int = 0


class _Recorder:
    def __init__(self, n_layers: int, whole: bool, k: int):
        self.n_layers, self.whole, self.k = n_layers, whole, k
        self.data: dict[tuple[str, str], list[list[torch.Tensor]]] = defaultdict(
            lambda: [[] for _ in range(n_layers)])
        self.seq_len = 0
        self.batch = 0  # rows of the batch in flight: OPT's FFN sees its tokens flattened to [B * T, I]

    def observe(self, point: str, layer: int, x: torch.Tensor) -> None:
        x = x.detach()
        if x.ndim == 2:
            if not self.batch:
                raise ValueError(f"the {point} input of layer {layer} is flattened to [tokens, width]; set the "
                                 "recorder's batch (rows of the batch) before the forward, as capture() does")
            x = x.view(self.batch, -1, x.shape[-1])
        # a copy, never a view: a view would keep the whole activation tensor alive
        self.data["pos0", point][layer].append(x[:, 0].to(torch.float32, copy=True))
        if self.whole:
            a = x.abs().flatten(1).float()
            top = a.topk(self.k, dim=1)
            self.data["top", point][layer].append(top.values)
            self.data["top_index", point][layer].append(top.indices)
            self.data["median", point][layer].append(a.median(dim=1).values)
        self.seq_len = x.shape[1]

    def result(self) -> Stats:
        out = Stats(seq_len=self.seq_len)
        for (kind, point), per_layer in self.data.items():
            # to the CPU per layer: under device_map="auto" the layers live on different GPUs
            stacked = torch.stack([torch.cat(chunks).cpu() for chunks in per_layer], dim=1)
            getattr(out, kind)[point] = stacked
        return out


def _modules(model: torch.nn.Module, point: str, i: int) -> torch.nn.Module | None:
    if point == "hidden":
        return arch.layers(model)[i]
    if point == "inter":
        return arch.down_proj(model, i)
    if point == "attn_out":
        return arch.attention_output(model, i)
    if point == "mlp_out":
        return arch.ffn_output(model, i)
    if point == "post_ffn":
        return arch.post_ffn_norm(model, i)
    raise ValueError(f"unknown capture point {point!r}; known: {', '.join(POINTS)}")


@contextmanager
def recording(model: torch.nn.Module, points: Iterable[str] = ("hidden", "inter"), whole: bool = False,
              k: int = 3) -> Iterator[_Recorder]:
    """Register the hooks for ``points`` on every layer; removed on exit, also on exceptions."""
    n = len(arch.layers(model))
    rec = _Recorder(n, whole, k)

    def hooks():
        for point in points:
            for i in range(n):
                module = _modules(model, point, i)
                if module is None:  # e.g. no post-FFN norm in this family
                    continue
                if point == "inter":
                    yield module, "input", lambda _m, args, p=point, i=i: rec.observe(p, i, args[0])
                else:
                    yield module, "output", lambda _m, _a, out, p=point, i=i: rec.observe(p, i, first(out))

    with hooked(hooks()):
        yield rec


@torch.no_grad()
def capture(model: torch.nn.Module, batches: Iterable[torch.Tensor], points: Iterable[str] = ("hidden", "inter"),
            whole: bool = False, k: int = 3) -> Stats:
    """Run the backbone (no LM head) on each ``[B, T]`` batch of token ids and return the statistics.

    Batches must be unpadded (equal lengths within a batch); feed variable-length prompts one by one.
    """
    body = arch.backbone(model)
    dev = next(model.parameters()).device
    if whole and k < 1:
        raise ValueError(f"k={k}: whole=True keeps the top-k |x| of each sequence; pick k >= 1")
    seen = 0
    with recording(model, points, whole, k) as rec:
        for ids in batches:
            arch.check_ids(model, ids, "each batch")
            rec.batch = ids.shape[0]
            body(input_ids=ids.to(dev), use_cache=False)
            seen += 1
    if not seen:
        raise ValueError("no batches: pass at least one [B, T] batch of token ids")
    return rec.result()
