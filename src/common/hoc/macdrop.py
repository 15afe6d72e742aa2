"""MacDrop: curriculum DropConnect on the frozen massive weights during PEFT (House of Cards §3, Alg. 1).

For every micro-batch, one 0/1 keep-mask of shape k x d is drawn with drop probability p_t and multiplied
into *both* the k massive rows of up_proj and gate_proj at the massive layer (the frozen base weights;
under peft, ``base_layer.weight``); no 1/(1-p) rescaling; the rows are restored bit-exactly after the
backward pass (so gradient checkpointing recomputes with the same masked weights). p_t follows a
schedule over the optimizer step t = 1..T (``Schedule``; the paper's main setting is Step with p0 = 0.8).

Add it to any ``transformers.Trainer`` (LoRA or DoRA through peft, fp32 or bf16, one device or
``accelerate launch``) in three lines::

    from common import massive
    from common.hoc.macdrop import MacDropCallback

    ids = [tok(p, return_tensors="pt").input_ids for p in massive_prompts]   # BOS as the model expects
    layer, channels = detection.massive_weights(model, ids, k=5)               # the *pre-trained* model
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=16, target_modules="all-linear"))
    trainer = Trainer(model=model, args=args, train_dataset=train,
                      callbacks=[MacDropCallback(model, layer, channels, p0=0.8, schedule="step")])
    trainer.train()

The callback keeps ``history`` (p_t, the measured drop rate and a digest of each mask of every optimizer
step), so a run can prove MacDrop was active and which masks it drew. If you catch an exception from ``trainer.train()`` and go on using the model,
call ``callback.restore()`` first (the Trainer has no exception hook; the rows may still be masked).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from common.core import arch, experts
from common.core.env import write_json_atomic
from common.hoc import edits, paper

SCHEDULES = ("step", "exp", "epoch_before", "epoch_after", "constant")


HISTORY_FILE = "macdrop_history.json"


def history_file(rank: int = 0) -> str:
    """Where process ``rank`` keeps its history in a checkpoint (``HISTORY_FILE`` for process 0)."""
    return HISTORY_FILE if rank == 0 else f"macdrop_history.rank{rank}.json"


@dataclass(frozen=True)
class Schedule:
    """Drop probability p_t over optimizer steps t = 1..T (HoC §3 and Table 5).

    - ``step``: p0 (1 - t/T), 0 at t = T (the paper's main setting);
    - ``exp``: p0 exp(-alpha t); ``alpha=None`` scales the paper's 0.01 at T = 579 to this T
      (alpha T = 5.79, the same decay shape at fewer steps);
    - ``epoch_before``: p0 (1 - (e - 1)/E) and ``epoch_after``: p0 (1 - e/E), e = 1..E the epoch of step t;
    - ``constant``: p0 (the Fig. 6 scope ablation).
    """
    kind: str = "step"
    p0: float = paper.MACDROP_P0
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown MacDrop schedule {self.kind!r}; known: {', '.join(SCHEDULES)}")
        if not 0.0 <= self.p0 <= 1.0:
            raise ValueError(f"p0={self.p0} is not a probability: choose p0 in [0, 1] (the paper uses 0.8)")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"alpha={self.alpha} must be > 0 (or None to scale the paper's 0.01 to T)")

    def alpha_for(self, total_steps: int) -> float:
        """The Exp decay rate used at ``total_steps`` (the paper's alpha T when ``alpha`` is None)."""
        if total_steps < 1:
            raise ValueError(f"total_steps={total_steps} must be >= 1")
        return self.alpha if self.alpha is not None else paper.EXP_ALPHA * paper.T_STEPS / total_steps

    def p(self, step: int, total_steps: int, n_epochs: int = 1, epoch: int | None = None) -> float:
        """p_t at optimizer step ``step`` (1-based) of ``total_steps``, training for ``n_epochs`` epochs;
        ``epoch`` (1-based) is the epoch the step belongs to, by default spread evenly over the steps (the
        callback passes the Trainer's own, which differs when ``max_steps`` ends inside an epoch)."""
        if not 1 <= step <= total_steps:
            raise ValueError(f"step {step} is outside 1..{total_steps}")
        if n_epochs < 1 or (epoch is not None and epoch < 1):
            raise ValueError(f"n_epochs={n_epochs} and epoch={epoch} are 1-based counts: both must be >= 1")
        if epoch is None:
            epoch = (step - 1) * n_epochs // total_steps + 1
        epoch = min(n_epochs, epoch)
        if self.kind == "step":
            return self.p0 * (1 - step / total_steps)
        if self.kind == "exp":
            return self.p0 * math.exp(-self.alpha_for(total_steps) * step)
        if self.kind == "epoch_before":
            return self.p0 * (1 - (epoch - 1) / n_epochs)
        if self.kind == "epoch_after":
            return self.p0 * (1 - epoch / n_epochs)
        return self.p0


def _frozen_float(weight: torch.Tensor, name: str) -> None:
    """MacDrop masks frozen floating-point base weights; anything else would be a silent no-op or worse."""
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"MacDrop cannot mask the {name} weight of type {type(weight).__name__} / "
                        f"{getattr(weight, 'dtype', None)}: it needs a floating-point base weight (quantised "
                        "layers such as bitsandbytes 4/8-bit store packed integers; load the model in bf16/fp32)")
    if weight.requires_grad:
        raise ValueError(f"the {name} base weight at the massive layer is trainable; MacDrop is DropConnect on "
                         "*frozen* pre-trained weights: wrap the model with a PEFT adapter (LoRA/DoRA) or freeze it")


def _ffn_parts(model: nn.Module, layer: int, expert: int | None) -> list[nn.Module]:
    """The modules holding the masked rows' projections, which peft wraps: the FFN's children, or every module of
    the expert's own MLP or of the fused experts module (peft nests one wrapper per fused weight)."""
    if expert is None:
        return list(arch.mlp(model, layer).children())
    return list(experts.expert_module(model, layer, expert).modules())


def _uses_dora(model: nn.Module, layer: int, expert: int | None = None) -> bool:
    """Whether a peft DoRA adapter wraps any FFN projection of ``layer`` (its weight norm reads the base weight)."""
    return any(any(getattr(m, "use_dora", {}).values()) for m in _ffn_parts(model, layer, expert))


def _check_reachable(model: nn.Module, layer: int, expert: int | None = None) -> None:
    """Refuse peft wrappings that would make masking the base weight a no-op (merged adapters)."""
    for module in _ffn_parts(model, layer, expert):
        if getattr(module, "merged", False):
            raise ValueError(f"the adapters of layer {layer}'s FFN are merged into the base weight; MacDrop "
                             "would mask the merged weight. Call model.unmerge_adapter() before training")


class MacDrop:
    """The masking of HoC Alg. 1 on one model: ``apply(p, ...)`` masks the massive rows in place (one
    mask shared by every up/gate block), ``restore()`` puts the saved rows back bit-exactly.

    ``channels`` are the intermediate channels to drop: the top-k massive channels for MacDrop (scope
    "massive"), or every / every other row of the layer for the Fig. 6 scope ablation. ``model`` may be
    a peft ``PeftModel``: the frozen ``base_layer`` weights are masked, adapters never. ``expert`` (a
    mixture-of-experts layer, ``moe.massive_expert_weights``) masks that expert's rows (a fused weight's
    ``[expert, rows]`` slice); None is the dense FFN.
    """
    def __init__(self, model: nn.Module, layer: int, channels: list[int], seed: int = 0, expert: int | None = None):
        model = arch.unwrap(model)
        n_layers = len(arch.layers(model))
        if not 0 <= layer < n_layers:
            raise ValueError(f"massive layer {layer} is outside the model's {n_layers} layers; detect it with "
                             "detection.massive_weights on the pre-trained model")
        width = experts.width(model, layer, expert)
        if not 0 < len(channels) <= width or len(set(channels)) != len(channels):
            raise ValueError(f"MacDrop needs 1..{width} distinct channels (k larger than the layer's "
                             f"intermediate size {width}?), got {len(channels)}")
        idx = edits.channel_index(model, layer, channels, expert)
        _check_reachable(model, layer, expert)
        self.blocks = experts.row_blocks(model, layer, expert)
        for b in self.blocks:
            _frozen_float(b.weight, b.name)
        self.layer, self.channels, self.seed, self.expert = layer, idx.tolist(), seed, expert
        self.dora = _uses_dora(model, layer, expert)
        self._index = [b.index(idx.to(b.weight.device)) for b in self.blocks]
        self._saved: list[torch.Tensor] | None = None
        self.shape = (len(idx), self.blocks[0].matrix.shape[1 - self.blocks[0].dim])

    def mask(self, p: float, step: int, index: int = 0) -> torch.Tensor:
        """The keep-mask (1 = keep) for one micro-batch: Bernoulli(1 - p), from a generator seeded by
        (seed, optimizer step, ``index``), never by a process's RNG state, so a resumed run draws the same
        masks. ``index`` is the micro-batch's place among all micro-batches of the step, over every process
        (``micro_index``): an N-process run with grad_accum g draws exactly the masks of a one-process run
        with grad_accum N x g."""
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"drop probability {p} is outside [0, 1]")
        w = self.blocks[0].weight
        # the trailing ":0" keeps the one-process masks of earlier versions (which hashed micro and rank)
        digest = hashlib.sha256(f"macdrop:{self.seed}:{step}:{index}:0".encode()).hexdigest()
        gen = torch.Generator(device=w.device).manual_seed(int(digest[:15], 16))
        return (torch.rand(self.shape, generator=gen, device=w.device) >= p).to(w.dtype)

    @torch.no_grad()
    def apply(self, keep: torch.Tensor) -> float:
        """Multiply ``keep`` (k x d) into the rows of every block; returns the dropped fraction."""
        if tuple(keep.shape) != self.shape:
            raise ValueError(f"keep-mask of shape {tuple(keep.shape)}; MacDrop needs {self.shape} (k channels x d), "
                             "e.g. from MacDrop.mask")
        if self.dora and bool((keep.sum(1) == 0).any()):
            raise ValueError("a fully dropped row makes DoRA's weight norm 0 (its output NaN): with DoRA keep the "
                             "drop probability below 1 (e.g. the Step schedule, or Epoch(after) instead of Epoch(before) "
                             "at p0 = 1)")
        self.restore()
        self._saved = [b.weight[i].clone() for b, i in zip(self.blocks, self._index, strict=True)]
        for b, i in zip(self.blocks, self._index, strict=True):
            b.weight[i] *= keep if b.dim == 0 else keep.T
        return 1.0 - float(keep.float().mean())

    @torch.no_grad()
    def restore(self) -> None:
        """Put the saved rows back (idempotent)."""
        if self._saved is None:
            return
        for b, i, old in zip(self.blocks, self._index, self._saved, strict=True):
            b.weight[i] = old
        self._saved = None

    @property
    def active(self) -> bool:
        """True while a mask is applied."""
        return self._saved is not None


def micro_index(micro: int, rank: int = 0, world_size: int = 1) -> int:
    """The place of process ``rank``'s ``micro``-th micro-batch among the ``world_size`` x grad_accum
    micro-batches of one optimizer step: ``micro * world_size + rank``, the order in which accelerate deals
    the batches of one sampler to the processes (process r gets batches r, r + N, r + 2N, ...)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"process rank {rank} is outside 0..{world_size - 1}")
    return micro * world_size + rank


def mask_digest(keep: torch.Tensor) -> str:
    """A short fingerprint of a keep-mask (what ``history`` records per micro-batch)."""
    return hashlib.sha256(keep.detach().bool().cpu().numpy().tobytes()).hexdigest()[:12]


def merge_histories(per_rank: list[list[dict]]) -> list[dict]:
    """One history from every process's ``MacDropCallback.history`` (listed by rank): per step the masks in
    ``micro_index`` order and the drop rate over all of them, i.e. what a one-process run with grad_accum
    N x g records. The processes must agree on the steps and on p."""
    if len(per_rank) == 1:
        return per_rank[0]
    n = len(per_rank)
    if len({len(h) for h in per_rank}) != 1:
        raise RuntimeError(f"the processes recorded different numbers of MacDrop steps: {[len(h) for h in per_rank]}")
    merged = []
    for entries in zip(*per_rank, strict=True):
        first = entries[0]
        if any(e["step"] != first["step"] or e["p"] != first["p"] for e in entries):
            raise RuntimeError(f"the processes disagree on MacDrop's step or p at step {first['step']}: {entries}")
        counts = [len(e["masks"]) for e in entries]
        masks = [entries[r]["masks"][j] for j in range(max(counts)) for r in range(n) if j < counts[r]]
        rates = [e["drop_rate"] for e in entries]
        drop = (None if any(r is None for r in rates)
                else sum(r * c for r, c in zip(rates, counts, strict=True)) / sum(counts))
        merged.append({"step": first["step"], "p": first["p"], "drop_rate": drop, "masks": masks})
    return merged


@dataclass
class _StepLog:
    p: float = 0.0
    drops: list[float] = field(default_factory=list)
    masks: list[str] = field(default_factory=list)


class MacDropCallback(TrainerCallback):
    """HoC Alg. 1 as a ``TrainerCallback``: a fresh mask before every micro-batch (``on_step_begin`` /
    ``on_substep_end``), the rows restored after each backward (``on_substep_end`` /
    ``on_pre_optimizer_step``, before the optimizer and before any evaluation), p_t from the optimizer
    step ``state.global_step + 1`` with T = ``state.max_steps``. Each process of a distributed run draws
    its own masks, decided by (seed, step, ``micro_index``) alone: the N x g masks of a step are those of a
    one-process run with grad_accum N x g, and a rerun or resume on any number of processes draws them again
    (the base weights are frozen and restored after each backward, so nothing needs syncing; research §6.7).
    ``history`` holds this process's steps; ``merge_histories`` joins the processes' histories. ``expert``: one
    expert's rows of a mixture-of-experts layer, as for ``MacDrop``."""
    def __init__(self, model: nn.Module, layer: int, channels: list[int], p0: float = 0.8,
                 schedule: str | Schedule = "step", alpha: float | None = None, seed: int = 0,
                 expert: int | None = None):
        self.schedule = schedule if isinstance(schedule, Schedule) else Schedule(schedule, p0, alpha)
        self.macdrop = MacDrop(model, layer, channels, seed, expert)
        self.history: list[dict] = []  # per optimizer step: {"step", "p", "drop_rate", "masks"}
        self._log = _StepLog()
        self._rank, self._world = 0, 1

    def _mask(self, state) -> None:
        step = state.global_step + 1
        # state.epoch is the epoch progress before this step (exactly k at the start of epoch k + 1)
        p = self.schedule.p(step, state.max_steps, max(1, math.ceil(state.num_train_epochs)),
                            epoch=math.floor(state.epoch or 0) + 1)
        keep = self.macdrop.mask(p, step, micro_index(len(self._log.drops), self._rank, self._world))
        self._log.p = p
        self._log.drops.append(self.macdrop.apply(keep))
        self._log.masks.append(mask_digest(keep))

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.max_steps or state.max_steps < 1:
            raise ValueError("MacDrop needs the number of optimizer steps T (state.max_steps) to be known")
        self._rank, self._world = args.process_index, args.world_size

    def on_step_begin(self, args, state, control, **kwargs):
        self._log = _StepLog()
        self._mask(state)

    def on_substep_end(self, args, state, control, **kwargs):
        self.macdrop.restore()
        self._mask(state)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.macdrop.restore()
        drops = self._log.drops
        self.history.append({"step": state.global_step + 1, "p": self._log.p,
                             "drop_rate": sum(drops) / len(drops) if drops else None,
                             "masks": list(self._log.masks)})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.history:
            logs["macdrop_p"] = self.history[-1]["p"]
            logs["macdrop_drop_rate"] = self.history[-1]["drop_rate"]

    def on_step_end(self, args, state, control, **kwargs):
        self._save_history_early(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._save_history_early(args, state, control)

    def _save_history_early(self, args, state, control) -> None:
        """Write the history into the checkpoint the Trainer saves next *before* it writes that checkpoint's
        trainer_state.json (what makes it resumable) and rotates the older one away, so a run killed before
        ``on_save`` still resumes with every step's history (``on_save`` writes it again)."""
        if control.should_save:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            write_json_atomic(folder / history_file(args.process_index), self.history)

    def on_save(self, args, state, control, **kwargs):
        """Keep each process's history with each checkpoint, so a resumed run can report every step."""
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            write_json_atomic(folder / history_file(args.process_index), self.history)

    def resume(self, checkpoint: str | Path, rank: int = 0) -> None:
        """Load process ``rank``'s history saved with ``checkpoint`` (call before
        ``trainer.train(resume_from_checkpoint=...)``)."""
        path = Path(checkpoint) / history_file(rank)
        self.history = json.loads(path.read_text()) if path.exists() else []

    def on_train_end(self, args, state, control, **kwargs):
        self.macdrop.restore()

    def restore(self) -> None:
        """Put the massive rows back now (after an exception escaped ``trainer.train()``)."""
        self.macdrop.restore()
