"""Cached layer inputs: run a model once to record what enters each decoder layer, then re-run only the layers
from a changed one onward (SFSD research D5; used by the decompositions, the searches and notebook 06)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.core import arch
from common.core.hooks import first, hooked


class _Stop(Exception):
    pass


class LayerInputs:
    """Inputs of every decoder layer on fixed token batches, from one dense forward pass, plus the other
    arguments each layer was called with (positions, masks): ``run(start)`` re-runs only layers
    ``start..L-1`` and the head, which is what a candidate evaluation of the surgical search needs.

    ``targets`` [N, T] are the next-token ids scored where ``mask`` [N, T] is 1 (perplexity windows: every
    position but the last; multiple-choice requests: the continuation tokens). ``keep="all"`` caches every
    layer's input, a list of layer indices only those (what a caller will start from: memory is
    N x T x d per layer); ``keep="first"`` only layer 0's (``advance`` then walks the stack one layer at a time).
    The cached inputs are held on the host (a paper task search caches tens of GiB) and each batch goes to
    its layer's device when it runs; the call arguments (positions, masks) stay on the device."""
    def __init__(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None,
                 batch_size: int = 8, keep: str | Sequence[int] = "all"):
        if ids.ndim != 2 or ids.shape[1] < 2 or len(ids) == 0:
            raise ValueError(f"ids must be [N, T] with N >= 1 and T >= 2, got shape {tuple(ids.shape)}")
        arch.check_ids(model, ids)
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        n_layers = len(arch.layers(model))
        if isinstance(keep, str) and keep not in ("all", "first"):
            raise ValueError(f"keep must be 'all', 'first' or a list of layer indices, got {keep!r}")
        kept = set(range(n_layers)) if keep == "all" else {0} if keep == "first" else set(keep)
        if not kept or not kept <= set(range(n_layers)):
            raise ValueError(f"keep={keep!r}: layer indices must lie in [0, {n_layers})")
        self.model, self.stack = model, arch.layers(model)
        dev = next(model.parameters()).device
        self.ids = ids
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != ids shape {tuple(ids.shape)}")
        self.mask = torch.ones_like(ids) if mask is None else mask  # [:, -1] is never read: nothing follows
        self.batches = [slice(s, min(s + batch_size, len(ids))) for s in range(0, len(ids), batch_size)]
        # each batch runs only up to its last scored position (+ the token it predicts): right padding
        # beyond it never reaches a scored position under causal attention, and would cost memory and time
        self.widths = [self._width(self.mask[sl]) for sl in self.batches]
        self.hidden: list[list[torch.Tensor | None]] = [[None] * len(self.batches) for _ in range(n_layers)]
        self.calls: list[list[tuple]] = [[None] * len(self.batches) for _ in range(n_layers)]
        self.layer = 0  # with keep="first": the layer whose inputs ``hidden[layer]`` holds

        at = {"b": 0, "stop": False}
        shapes: dict[tuple, int] = {}  # batch shape -> first batch of that shape (its calls are reused)

        def pre_hook(i):
            def hook(module, args, kwargs):
                h = args[0] if args else kwargs["hidden_states"]
                rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                if i in kept:
                    self.hidden[i][at["b"]] = h.detach().to("cpu")  # no copy on a CPU run
                self.calls[i][at["b"]] = (args[1:], rest)
                if at["stop"]:
                    raise _Stop
            return hook

        with hooked((layer, "input_kwargs", pre_hook(i)) for i, layer in enumerate(self.stack)), torch.no_grad():
            for at["b"], sl in enumerate(self.batches):
                batch = ids[sl, :self.widths[at["b"]]]
                shape = tuple(batch.shape)
                # keep="first": positions and masks depend on the batch shape only, so a batch whose
                # shape was seen stops after layer 0 and borrows the other layers' call arguments
                at["stop"] = keep == "first" and shape in shapes
                shapes.setdefault(shape, at["b"])
                try:
                    arch.backbone(model)(input_ids=batch.to(dev), use_cache=False)
                except _Stop:
                    ref = shapes[shape]
                    for i in range(1, n_layers):
                        self.calls[i][at["b"]] = self.calls[i][ref]

    @staticmethod
    def _width(mask: torch.Tensor) -> int:
        """Columns a batch needs: through its last scored position and the token that position predicts."""
        scored = mask[:, :-1].nonzero()
        return int(scored[:, 1].max()) + 2 if len(scored) else 2

    @property
    def n_layers(self) -> int:
        return len(self.stack)

    def _layer(self, i: int, b: int, h: torch.Tensor) -> torch.Tensor:
        """Layer ``i`` on batch ``b``'s hidden states ``h``, moved to the layer's device (a layer that
        accelerate dispatched moves them itself: its weights may be offloaded placeholders)."""
        args, kwargs = self.calls[i][b]
        layer = self.stack[i]
        if getattr(layer, "_hf_hook", None) is None:
            h = h.to(next(layer.parameters()).device)
        return first(layer(h, *args, **kwargs))

    @torch.no_grad()
    def advance(self) -> None:
        """Replace the cached inputs of ``self.layer`` by its outputs (the next layer's inputs)."""
        i = self.layer
        if i >= self.n_layers - 1:
            raise RuntimeError("already at the last layer")
        self.hidden[i + 1] = [self._layer(i, b, h).to("cpu") for b, h in enumerate(self.hidden[i])]
        self.hidden[i] = [None] * len(self.batches)
        self.layer = i + 1

    @torch.no_grad()
    def logprobs(self, start: int = 0) -> torch.Tensor:
        """Per sequence, the summed log-probability of its masked target tokens, running layers
        ``start..L-1``, the final norm and the LM head from the cached inputs of layer ``start``, or of the
        nearest cached layer below it (the layers in between must be unchanged: callers change only layers
        >= ``start``, so caching every k-th layer trades k - 1 layers of compute for 1/k of the memory)."""
        if not 0 <= start < self.n_layers:
            raise ValueError(f"start={start} is outside the model's {self.n_layers} layers; pick 0 <= start < "
                             f"{self.n_layers}")
        base = next((i for i in range(start, -1, -1) if self.hidden[i][0] is not None), None)
        if base is None:
            raise ValueError(f"layer {start}'s inputs are not cached, nor a lower layer's (keep='all' caches "
                             "every layer)")
        norm = arch.final_norm(self.model)
        out = []
        for b, sl in enumerate(self.batches):
            h = self.hidden[base][b]
            for i in range(base, self.n_layers):
                h = self._layer(i, b, h)
            w = self.widths[b]
            ids, mask = self.ids[sl, 1:w].to(h.device), self.mask[sl, :w - 1].to(h.device).bool()
            rows = norm(h)[:, :-1][mask]  # the head only where a token is scored (multiple choice: a few)
            logits = arch.logits(self.model, rows)
            lp = -F.cross_entropy(logits, ids[mask], reduction="none").double()
            per_seq = torch.zeros(mask.shape[0], dtype=torch.float64, device=h.device)
            per_seq.index_add_(0, mask.nonzero()[:, 0], lp)
            out.append(per_seq.cpu())
        return torch.cat(out)

    def n_targets(self) -> int:
        return int(self.mask[:, :-1].sum())

    def perplexity(self, start: int = 0) -> float:
        """exp(mean NLL over the masked targets), from layer ``start`` on."""
        return math.exp(-float(self.logprobs(start).sum()) / self.n_targets())

    def perplexity_and_windows(self, start: int = 0) -> tuple[float, np.ndarray]:
        """``perplexity(start)`` and, from the same pass, each window's mean NLL (float64 ``[N]``), what a paired
        interval over windows resamples (``intervals.perplexity_ratio``). Perplexity windows only: every row
        scores the same number of targets, so the perplexity is exp of the mean of the window means."""
        per_row = self.mask[:, :-1].sum(1)
        if not bool((per_row == per_row[0]).all()) or int(per_row[0]) == 0:
            raise ValueError("per-window NLLs need windows that score the same number of targets each (perplexity "
                             f"windows), got {sorted(set(per_row.tolist()))} targets per row")
        lp = self.logprobs(start)
        return math.exp(-float(lp.sum()) / self.n_targets()), (-lp / int(per_row[0])).numpy()
