"""Cached LoRA / DoRA fine-tuning with or without MacDrop (House of Cards §4.1, App. A Table 6).

One stock ``transformers.Trainer`` + peft run per (model, arm, seed, data, settings, code version),
stored as a peft adapter (safetensors) under ``<cache>/finetune/<digest>/``. A re-run loads it; an
interrupted run resumes from its last Trainer checkpoint (``<digest>.work/``) instead of starting over.
The same code path runs on one GPU, many (``accelerate launch``), or CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from torch import nn

from common import __version__, arch, massive, models
from common.config import MacDropConfig, TrainSettings, cache_dir, device
from common.data import collate, instruction_pairs, pad_id, tokenize_pairs
from common.macdrop import MacDropCallback, Schedule
from common.manifest import write_json_atomic

SCOPES = ("massive", "all", "non_massive")  # HoC Fig. 6: which up/gate rows of the massive layer are dropped
CACHE_VERSION = 1


@dataclass(frozen=True)
class Arm:
    """One training arm: LoRA or DoRA, with MacDrop (``schedule``) or without (``None``); ``scope`` picks
    the rows MacDrop drops (Fig. 6)."""

    name: str
    dora: bool = False
    schedule: Schedule | None = None
    scope: str = "massive"

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"unknown MacDrop scope {self.scope!r}; known: {', '.join(SCOPES)}")


#: HoC Table 3's arms, MacDrop at the paper's main setting (k = 5, Step, p0 = 0.8).
ARMS = {
    "lora": Arm("lora"),
    "lora_macdrop": Arm("lora_macdrop", schedule=Schedule("step", 0.8)),
    "dora": Arm("dora", dora=True),
    "dora_macdrop": Arm("dora_macdrop", dora=True, schedule=Schedule("step", 0.8)),
}


@dataclass
class FineTune:
    """A finished (or cached) run: the adapter directory, the per-step training log, MacDrop's per-step
    p and measured drop rate, and the wall time of the training itself."""

    path: Path
    log: list[dict] = field(default_factory=list)
    macdrop: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0


# --------------------------------------------------------------------------------------- training


@contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft probes a deprecated transformers property (``is_gradient_checkpointing``) on every step."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def peft_model(model: nn.Module, arm: Arm, settings: TrainSettings) -> nn.Module:
    """Wrap ``model`` with a LoRA (or DoRA) adapter on every linear layer except the LM head (HoC App. A)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                     target_modules="all-linear", use_dora=arm.dora, task_type="CAUSAL_LM")
    with _quiet_peft():
        return get_peft_model(model, cfg)


def scope_channels(arm: Arm, channels: list[int], width: int) -> list[int]:
    """The rows MacDrop drops for ``arm.scope``: the massive channels, every row, or every other row."""
    if arm.scope == "massive":
        return list(channels)
    if arm.scope == "all":
        return list(range(width))
    return massive.all_but(list(channels), width)


def _cache_key(key: str, arm: Arm, seed: int, settings: TrainSettings, train: list[dict],
               layer: int | None, channels: list[int]) -> str:
    data = hashlib.sha256(json.dumps(train, sort_keys=True).encode()).hexdigest()[:16]
    full = {"weights": models.weights_id(key), "arm": asdict(arm), "seed": seed, "settings": asdict(settings),
            "data": data, "layer": layer, "channels": channels, "code": __version__, "version": CACHE_VERSION}
    return hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:16]


def _checkpointing(on: bool) -> dict:
    """Activation checkpointing under the name this transformers version uses (renamed in 5.x)."""
    from transformers import TrainingArguments

    names = {f.name for f in fields(TrainingArguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": on}


def _last_checkpoint(work: Path) -> Path | None:
    done = [p for p in work.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


def finetune(key: str, arm: Arm, seed: int, settings: TrainSettings, train: list[dict], layer: int | None,
             channels: list[int]) -> FineTune:
    """Fine-tune ``key`` with ``arm`` on the tokenised ``train`` examples, or load the cached result.

    ``layer``/``channels``: the massive layer and its top-k channels, detected on the pre-trained model
    (``massive.massive_weights``); required when the arm uses MacDrop."""
    if arm.schedule is not None and layer is None:
        raise ValueError(f"arm {arm.name!r} uses MacDrop but no massive layer was given: this model has no "
                         "massive weights to drop (run massive.massive_weights on it first)")
    digest = _cache_key(key, arm, seed, settings, train, layer, channels)
    final, work = cache_dir() / "finetune" / digest, cache_dir() / "finetune" / f"{digest}.work"
    if (final / "COMPLETE").exists():
        meta = json.loads((final / "result.json").read_text())
        return FineTune(final, meta["log"], meta["macdrop"], meta["seconds"], meta["steps"])
    result = _train(key, arm, seed, settings, train, layer, channels, work)
    tmp = final.with_name(f"{digest}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(work / "adapter", tmp)
    write_json_atomic(tmp / "result.json", {"key": key, "arm": asdict(arm), "seed": seed,
                                            "settings": asdict(settings), "log": result.log,
                                            "macdrop": result.macdrop, "seconds": result.seconds,
                                            "steps": result.steps})
    (tmp / "COMPLETE").touch()
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    shutil.rmtree(work, ignore_errors=True)
    result.path = final
    return result


def _train(key: str, arm: Arm, seed: int, settings: TrainSettings, train: list[dict], layer: int | None,
           channels: list[int], work: Path) -> FineTune:
    from transformers import PrinterCallback, Trainer, TrainingArguments, set_seed

    set_seed(seed)
    model, tok = models.load_model(key)
    model = peft_model(model, arm, settings)
    macdrop = None
    if arm.schedule is not None:
        chans = scope_channels(arm, channels, arch.intermediate_size(model, layer))
        macdrop = MacDropCallback(model, layer, chans, schedule=arm.schedule, seed=seed)
    pad = pad_id(tok)
    args = TrainingArguments(
        output_dir=str(work), seed=seed, data_seed=seed, learning_rate=settings.lr,
        num_train_epochs=settings.epochs, per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum, warmup_steps=settings.warmup_ratio,
        lr_scheduler_type=settings.scheduler, weight_decay=settings.weight_decay, adam_beta1=0.9,
        adam_beta2=0.999, max_grad_norm=1.0, logging_steps=1, save_strategy="steps",
        save_steps=settings.save_steps, save_total_limit=1, report_to=[], disable_tqdm=True,
        bf16=settings.bf16, **_checkpointing(settings.gradient_checkpointing),
        use_cpu=device().type == "cpu", dataloader_num_workers=0, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[macdrop] if macdrop else [],
                      data_collator=lambda b: collate(b, pad))
    trainer.remove_callback(PrinterCallback)  # the per-step log goes to FineTune.log, not to stdout
    resume = _last_checkpoint(work)
    if resume is not None and macdrop:
        macdrop.resume(resume)
    start = time.perf_counter()
    try:
        with _quiet_peft():
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        if macdrop:
            macdrop.restore()
    seconds = time.perf_counter() - start
    model.save_pretrained(work / "adapter")
    log = [{k: v for k, v in e.items() if k in ("step", "loss", "learning_rate", "grad_norm")}
           for e in trainer.state.log_history if "loss" in e]
    return FineTune(work / "adapter", log, macdrop.history if macdrop else [], seconds,
                    trainer.state.global_step)


def datasets(cfg: MacDropConfig, key: str, tok) -> tuple[list[dict], list[dict]]:
    """Notebook 03's tokenised (train, validation) instruction examples for ``key`` under ``cfg`` (the
    fine-tuning data is part of an adapter's cache key, so every notebook that reuses the adapters builds
    it here)."""
    n = {"train": cfg.n_train, "val": cfg.n_val}
    return tuple(tokenize_pairs(tok, key, instruction_pairs(cfg.corpus, split, n[split], cfg.seed), cfg.settings.max_len)
                 for split in ("train", "val"))


def load_tuned(key: str, tuned: FineTune) -> tuple[nn.Module, object]:
    """The pre-trained model with the fine-tuned adapter attached (active, unmerged), in eval mode."""
    from peft import PeftModel

    model, tok = models.load_model(key)
    with _quiet_peft():
        return PeftModel.from_pretrained(model, str(tuned.path)).eval(), tok


def grid_arms(kinds: tuple[str, ...], p0s: tuple[float, ...], scope_ps: tuple[float, ...]) -> dict[str, Arm]:
    """HoC Table 5 (LoRA + MacDrop on the massive rows for every curriculum ``kind`` x ``p0``) and Fig. 6
    (LoRA + constant-p dropout for every scope x p)."""
    arms = {f"lora_{kind}_p{p:g}": Arm(f"lora_{kind}_p{p:g}", schedule=Schedule(kind, p))
            for kind in kinds for p in p0s}
    for scope in SCOPES:
        for p in scope_ps:
            name = f"lora_constant_{scope}_p{p:g}"
            arms[name] = Arm(name, schedule=Schedule("constant", p), scope=scope)
    return arms
