"""Cached LoRA / DoRA fine-tuning with or without MacDrop (House of Cards §4.1, App. A Table 6).

One stock ``transformers.Trainer`` + peft run per (model, arm, seed, data, settings, code version),
stored as a peft adapter (safetensors) under ``<cache>/finetune/<digest>/``. A re-run loads it; an
interrupted run resumes from its last Trainer checkpoint (``<digest>.work/``) instead of starting over.
The same code path runs on one GPU, many (``accelerate launch``), or CPU.

``python -m common.hoc.finetune --profile P --model KEY --arm ARM --seed S`` trains one of notebook 03's
adapters into the cache the notebook reads; under ``accelerate launch --num_processes N`` it trains on N
processes with the profile's effective batch (docs/MULTI_GPU.md).
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
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from torch import nn
from transformers import TrainerCallback

from common import __version__
from common.core import arch, gpu, models, progress, timeplan
from common.core.data import collate, instruction_pairs, pad_id, tokenize_pairs
from common.core.env import cache_dir, seed_everything, write_json_atomic
from common.core.gpu import device, world_size
from common.core.manifest import record
from common.core.profiles import PROFILE_NAMES, MacDropConfig, TrainSettings, load_config
from common.hoc import detection, edits, paper
from common.hoc.macdrop import MacDropCallback, Schedule, merge_histories

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
    "lora_macdrop": Arm("lora_macdrop", schedule=Schedule("step", paper.MACDROP_P0)),
    "dora": Arm("dora", dora=True),
    "dora_macdrop": Arm("dora_macdrop", dora=True, schedule=Schedule("step", paper.MACDROP_P0)),
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
    return edits.all_but(list(channels), width)


def _cache_key(key: str, arm: Arm, seed: int, settings: TrainSettings, train: list[dict],
               layer: int | None, channels: list[int], world: int = 1) -> str:
    # The effective batch identifies a run, not how it is split over processes: the key holds the one-process
    # equivalent (grad_accum x processes), so 8 processes x grad_accum 4 is what the notebook finds with 32.
    data = hashlib.sha256(json.dumps(train, sort_keys=True).encode()).hexdigest()[:16]
    one = replace(settings, grad_accum=settings.grad_accum * world)
    full = {"weights": models.weights_id(key), "arm": asdict(arm), "seed": seed, "settings": asdict(one),
            "data": data, "layer": layer, "channels": channels, "code": __version__, "version": CACHE_VERSION}
    return hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:16]


def _checkpointing(on: bool) -> dict:
    """Activation checkpointing under the name this transformers version uses (renamed in 5.x)."""
    from transformers import TrainingArguments

    names = {f.name for f in fields(TrainingArguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": on}


def _last_checkpoint(work: Path) -> Path | None:
    """The newest checkpoint the Trainer finished: its trainer_state.json, written last and in place, parses
    (a run killed while writing it resumes from the checkpoint before, which is rotated away only after)."""
    def finished(p: Path) -> bool:
        try:
            json.loads((p / "trainer_state.json").read_text())
        except (OSError, ValueError):
            return False
        return True

    done = [p for p in work.glob("checkpoint-*") if finished(p)]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


def finetune(key: str, arm: Arm, seed: int, settings: TrainSettings, train: list[dict], layer: int | None,
             channels: list[int], cached_only: bool = False) -> FineTune:
    """Fine-tune ``key`` with ``arm`` on the tokenised ``train`` examples, or load the cached result.

    ``layer``/``channels``: the massive layer and its top-k channels, detected on the pre-trained model
    (``detection.massive_weights``); required when the arm uses MacDrop.

    Under ``accelerate launch`` every process calls this; ``settings.grad_accum`` is per process. Only the
    main process writes the cache directory, after every process has finished training; the others return
    once it exists. ``macdrop`` then holds every process's masks (``macdrop.merge_histories``). With
    ``cached_only`` a run that is not in the cache raises FileNotFoundError instead of training."""
    if arm.schedule is not None and layer is None:
        raise ValueError(f"arm {arm.name!r} uses MacDrop but no massive layer was given: this model has no "
                         "massive weights to drop (run detection.massive_weights on it first)")
    world = world_size()
    digest = _cache_key(key, arm, seed, settings, train, layer, channels, world)
    final, work = cache_dir() / "finetune" / digest, cache_dir() / "finetune" / f"{digest}.work"
    if (final / "COMPLETE").exists():
        meta = json.loads((final / "result.json").read_text())
        return FineTune(final, meta["log"], meta["macdrop"], meta["seconds"], meta["steps"])
    if cached_only:
        raise FileNotFoundError(f"{key} {arm.name} seed {seed} is not fine-tuned yet ({final} has no COMPLETE): train "
                                "it first with `python -m common.hoc.finetune` (docs/MULTI_GPU.md)")
    result = _train(key, arm, seed, settings, train, layer, channels, work)
    from accelerate import PartialState  # the Trainer's process state (a single process without a launcher)

    state = PartialState()
    state.wait_for_everyone()  # every process is done with work/ (checkpoints, its RNG states)
    if state.is_main_process:
        tmp = final.with_name(f"{digest}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(work / "adapter", tmp)
        write_json_atomic(tmp / "result.json", {"key": key, "arm": asdict(arm), "seed": seed,
                                                "settings": asdict(settings), "world_size": world,
                                                "log": result.log, "macdrop": result.macdrop,
                                                "seconds": result.seconds, "steps": result.steps})
        (tmp / "COMPLETE").touch()
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        shutil.rmtree(work, ignore_errors=True)
    state.wait_for_everyone()  # the others return only once the final directory exists
    result.path = final
    return result


class StepProgress(TrainerCallback):
    """Each optimizer step of a fine-tune to ``progress.report`` (process 0 only)."""

    def __init__(self, task: str):
        self.task = task

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            progress.report(self.task, state.global_step, state.max_steps)


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
        use_cpu=device().type == "cpu", dataloader_num_workers=0, remove_unused_columns=False,
        ddp_find_unused_parameters=False)  # DDP: every adapter weight gets a gradient each step
    steps = StepProgress(f"fine-tune {key} {arm.name} seed {seed}")
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[steps, *([macdrop] if macdrop else [])],
                      data_collator=lambda b: collate(b, pad))
    trainer.remove_callback(PrinterCallback)  # the per-step log goes to FineTune.log, not to stdout
    resume = _last_checkpoint(work)
    if resume is not None and macdrop:
        macdrop.resume(resume, args.process_index)
    start = time.perf_counter()
    try:
        with _quiet_peft():
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        if macdrop:
            macdrop.restore()
    seconds = time.perf_counter() - start
    if trainer.is_world_process_zero():  # DDP keeps the adapters identical on every process
        model.save_pretrained(work / "adapter")
    log = [{k: v for k, v in e.items() if k in ("step", "loss", "learning_rate", "grad_norm")}
           for e in trainer.state.log_history if "loss" in e]
    history = merge_histories(_gather(macdrop.history)) if macdrop else []
    result = FineTune(work / "adapter", log, history, seconds, trainer.state.global_step)
    # the next run's model must not find this one still on the GPU: with bf16, accelerate's autocast wrapper
    # of model.forward closes over the model (a reference cycle that only the collector frees)
    del trainer, model, macdrop
    gpu.release()
    return result


def _gather(obj: object) -> list:
    """``obj`` from every process, by rank (``[obj]`` in a single process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


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

    if not (tuned.path / "adapter_model.safetensors").exists():
        raise FileNotFoundError(f"{tuned.path} has no adapter_model.safetensors (pickled adapters are never loaded); "
                                "delete the directory and re-run the fine-tune")
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


def record_settings(cfg: MacDropConfig) -> None:
    """``settings/train``: this profile's fine-tuning hyper-parameters and data sizes, beside HoC's Table 6."""
    record("settings/train", vars(cfg.settings) | {"n_train": cfg.n_train, "n_val": cfg.n_val, "corpus": cfg.corpus},
           note=f"fine-tuning hyper-parameters of this profile ({paper.table6_note()})")


def record_massive_rows(key: str, layer: int, channels: list[int], k: int) -> None:
    """``M/macdrop/massive_layer`` and ``M/macdrop/channels``: the rows MacDrop drops (Alg. 1, lines 1-4)."""
    record(f"{key}/macdrop/massive_layer", layer, note="0-based, detected on the pre-trained model")
    record(f"{key}/macdrop/channels", channels, note=f"the top-{k} intermediate channels MacDrop drops, ranked")


def record_training(tuned: dict[tuple[str, str, int], FineTune], k: int) -> tuple[dict, dict]:
    """Record each run's training time (volatile) and, per (model, arm) with MacDrop, the largest gap between the
    measured drop rate and p_t over the first seed's steps (``M/macdrop/<arm>/drop_rate_max_error``). Returns the
    training curves per (model, arm) (one log per seed) and MacDrop's history per (model, arm), for
    ``figures.plot_training``."""
    curves, schedules = {}, {}
    for (key, arm, seed), ft in tuned.items():
        curves.setdefault((key, arm), []).append(ft.log)
        record(f"{key}/macdrop/{arm}/train_seconds_s{seed}", ft.seconds, note=f"{ft.steps} optimizer steps",
               volatile=True)
        if ft.macdrop and (key, arm) not in schedules:
            schedules[key, arm] = ft.macdrop
            error = max(abs(h["drop_rate"] - h["p"]) for h in ft.macdrop)
            record(f"{key}/macdrop/{arm}/drop_rate_max_error", error,
                   note=f"seed {seed}: max over steps of |measured drop rate - p_t| (k x d = {k} x d mask)")
    return curves, schedules


NOTEBOOK = "03_macdrop_finetuning"


def _per_process(settings: TrainSettings, world: int, grad_accum: int | None) -> TrainSettings:
    """The profile's settings with grad_accum per process: by default the profile's (one-process) value split
    over the ``world`` processes, so the effective batch, and with it the cache key, are the notebook's."""
    if grad_accum is None:
        if settings.grad_accum % world:
            raise SystemExit(f"the profile's grad_accum {settings.grad_accum} does not split over {world} processes: "
                             f"pass --grad-accum (the notebook finds the adapter only when grad_accum x processes "
                             f"= {settings.grad_accum}), or launch a divisor of {settings.grad_accum} processes")
        return replace(settings, grad_accum=settings.grad_accum // world)
    if grad_accum < 1:
        raise SystemExit(f"--grad-accum {grad_accum}: must be >= 1")
    if grad_accum * world != settings.grad_accum:
        warnings.warn(f"--grad-accum {grad_accum} x {world} processes = {grad_accum * world} micro-batches a step, not "
                      f"the profile's {settings.grad_accum}: a different effective batch, which the notebook will "
                      "not find in its cache", stacklevel=2)
    return replace(settings, grad_accum=grad_accum)


def _selected(cfg: MacDropConfig, args) -> tuple[list[tuple[str, str, int]], dict[str, Arm], TrainSettings]:
    """The (model, arm, seed) runs the command line picks, the arms by name, and the profile's settings."""
    if args.grid:  # notebook 03's Table 5 / Fig. 6 grids: plain LoRA + every grid arm, the notebook's seed
        arms = {"lora": ARMS["lora"], **grid_arms(cfg.grid_kinds, cfg.grid_p0s, cfg.scope_ps)}
        runs = [(cfg.grid_model, name, cfg.seed) for name in arms]
        settings = cfg.grid_settings
    else:
        arms, settings = ARMS, cfg.settings
        runs = [(key, arm, seed) for key, names, seeds in cfg.runs for arm in names for seed in seeds]
    if args.model and args.arm and args.seed is not None and not args.grid:
        picked = [(args.model, args.arm, args.seed)]
        if picked[0] not in runs:
            warnings.warn(f"{picked[0]} is not one of the profile's notebook-03 runs: the notebook will not use it",
                          stacklevel=2)
    else:
        picked = [r for r in runs if (args.model in (None, r[0]) and args.arm in (None, r[1])
                                      and args.seed in (None, r[2]))]
    if not (args.all or args.model or args.arm or args.seed is not None):
        raise SystemExit("choose runs with --model/--arm/--seed, or --all for every run of the profile; "
                         f"the profile's runs: {', '.join(f'{k}/{a}/{s}' for k, a, s in runs)}")
    if not picked:
        raise SystemExit(f"no run of the profile matches; its runs: {', '.join(f'{k}/{a}/{s}' for k, a, s in runs)}")
    unknown = sorted({a for _, a, _ in picked} - set(arms))
    if unknown:
        raise SystemExit(f"unknown arm(s) {', '.join(unknown)}; known: {', '.join(arms)}")
    for key, _, _ in picked:
        models.get_spec(key)  # unknown model -> the known ones
    return picked, arms, settings


def notebook_inputs(cfg: MacDropConfig, key: str) -> tuple[list[dict], int, list[int]]:
    """What notebook 03 hands ``finetune`` for ``key``: the tokenised training examples, and the massive layer
    and its top-``cfg.k`` channels detected on the pre-trained model with the detection prompts."""
    model, tok = models.load_model(key)
    layer, channels = detection.massive_weights(model, [models.encode(tok, key, p) for p in cfg.prompts], cfg.k)
    del model
    return datasets(cfg, key, tok)[0], layer, channels


def main(argv: list[str] | None = None) -> None:
    """Train notebook 03's adapters into the cache the notebook reads (same data, massive layer and channels,
    settings and cache key), e.g. on several GPUs before running the notebook:
    ``accelerate launch --num_processes 8 -m common.hoc.finetune --profile paper --model llama-3-8b --arm
    lora_macdrop --seed 42`` (docs/MULTI_GPU.md)."""
    import argparse

    from accelerate import PartialState

    parser = argparse.ArgumentParser(prog="python -m common.hoc.finetune", description=main.__doc__)
    parser.add_argument("--profile", required=True, choices=PROFILE_NAMES,
                        help="the notebook's PROFILE (REPRO_PROFILE, if set, wins, as in the notebook)")
    parser.add_argument("--model", help="registry key (default: every model of the profile's runs)")
    parser.add_argument("--arm", help=f"one of {', '.join(ARMS)}, or a grid arm with --grid")
    parser.add_argument("--seed", type=int, help="training seed (the profile's runs list them)")
    parser.add_argument("--all", action="store_true", help="every run of the profile (filtered by the options above)")
    parser.add_argument("--grid", action="store_true",
                        help="the Table 5 / Fig. 6 grid runs (the grid model and settings, the notebook's seed)")
    parser.add_argument("--grad-accum", type=int, default=None,
                        help="micro-batches per process and step (default: the profile's / number of processes)")
    parser.add_argument("--notebook-seed", type=int, default=0,
                        help="the notebook's SEED (picks the instruction data; 0 as shipped)")
    args = parser.parse_args(argv)

    # joins the process group of `accelerate launch` (gloo on CPU, as the Trainer) and picks this process's GPU
    state = PartialState(cpu=device().type == "cpu")
    say = print if state.is_main_process else (lambda *a, **k: None)
    cfg = load_config(NOTEBOOK, args.profile, args.notebook_seed)
    runs, arms, settings = _selected(cfg, args)
    world = world_size()
    if args.grid:
        say(timeplan.estimate(timeplan.grid_jobs(cfg, models.shapes([cfg.grid_model])[cfg.grid_model])[0], n_gpus=world))
    settings = _per_process(settings, world, args.grad_accum)
    say(f"{NOTEBOOK} | profile={cfg.profile} | {world} process(es) x batch {settings.batch_size} x grad_accum "
        f"{settings.grad_accum} = effective batch {world * settings.batch_size * settings.grad_accum} | "
        f"cache {cache_dir()}")
    for key in dict.fromkeys(k for k, _, _ in runs):
        seed_everything(cfg.seed)
        train, layer, channels = notebook_inputs(cfg, key)
        say(f"{key}: massive layer {layer}, channels {channels}; {len(train)} train examples")
        for _, arm, seed in (r for r in runs if r[0] == key):
            ft = finetune(key, arms[arm], seed, settings, train, layer, channels)
            say(f"{key} {arm} seed {seed}: {ft.steps} steps ({ft.seconds:.0f} s) -> {ft.path}")


if __name__ == "__main__":
    main()
