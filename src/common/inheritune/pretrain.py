"""Notebook 04's self-trained GPTs (Inheritune arXiv 2404.08634 v4 §4, App. F.2): the data every run reads, and a
command that trains them into the cache the notebook reads, on one process or under a launcher (issue 21):

    torchrun --standalone --nproc_per_node 8 -m common.inheritune.pretrain --profile paper
    accelerate launch --num_processes 8 -m common.inheritune.pretrain --profile paper
    make reproduce PROFILE=paper NB=04   # finds every run in the cache and trains nothing

The runs are ``training.run_experiment``'s, one per training seed, at the notebook's S (``steps.choose_steps`` where
the profile has a schedule), with the same cache keys on any number of processes (docs/MULTI_GPU.md)."""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from common.core import data, timeplan
from common.core.env import cache_dir
from common.core.gpu import device
from common.core.profiles import PROFILE_NAMES, InherituneConfig, PretrainSettings, load_config
from common.inheritune import steps, training
from common.inheritune.training import Experiment

NOTEBOOK = "04_attention_degeneration_inheritune"


def reference_key(cfg: InherituneConfig) -> str:
    """The manifest key of the self-trained reference: ``gpt-byte`` (byte tokenizer), else ``gpt2-medium-ours``."""
    return "gpt-byte" if cfg.tokenizer == "byte" else "gpt2-medium-ours"


def inputs(cfg: InherituneConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train stream, held-out stream, validation windows)`` of notebook 04's runs: ``cfg.train_corpus`` in
    ``cfg.tokenizer``'s tokens, and ``cfg.train.n_val`` fixed windows of the held-out split (D9)."""
    stream = data.token_stream(cfg.train_corpus, "train", cfg.tokenizer)
    heldout = data.token_stream(cfg.train_corpus, "heldout", cfg.tokenizer)
    return stream, heldout, training.val_windows(heldout, cfg.train.n_val, cfg.reference.block_size)


def notebook_seeds(cfg: InherituneConfig) -> list[int]:
    """The notebook's training seeds: SEED ... SEED + n_seeds - 1."""
    return list(range(cfg.seed, cfg.seed + cfg.n_seeds))


def experiments(cfg: InherituneConfig, s: PretrainSettings, stream: torch.Tensor, val: torch.Tensor,
                seeds: list[int] | None = None) -> list[Experiment] | None:
    """Notebook 04's experiments (``training.run_experiment``), one per training seed (default the notebook's: SEED
    ... SEED + n_seeds - 1), trained here or read from the cache. Where the profile leaves the training to this
    module's command (``train_in_notebook`` False: the paper's weeks-long recipe), only cached runs are read: None,
    with the command to run and the planner's estimate printed, while one is missing. No seeds (``n_seeds`` 0: a run of
    your own model, ``common.core.user_model``): None, said."""
    seeds = notebook_seeds(cfg) if seeds is None else seeds
    if not seeds:
        print("no training seeds (n_seeds = 0: your own model's run measures pretrained attention only): the sections "
              "on the self-trained GPTs are skipped")
        return None

    def run() -> list[Experiment]:
        return [training.run_experiment(cfg.reference, s, stream, val, seed, cfg.growth_step, cfg.max_rounds)
                for seed in seeds]

    if cfg.train_in_notebook:
        return run()
    try:
        with training.cache_only():
            return run()
    except training.NotCached as missing:
        job = timeplan.pretraining(cfg)
        print(f"{missing}.\nThe {cfg.profile} profile trains these GPTs outside the notebook (a long run): "
              f"`{job.command('<GPUs>')}` (or `make pretrain-inheritune`), then run this notebook "
              f"again; until then the sections on the self-trained GPTs are skipped.\n{timeplan.estimate(job)}; on 8 "
              f"H100s about {job.hours('h100', 8):,.0f} h.")
        return None


def main(argv: list[str] | None = None) -> None:
    """Train notebook 04's reference, half-depth variants and growth rounds for every training seed of the profile
    (or ``--seeds``) into the cache the notebook reads; under ``torchrun`` / ``accelerate launch`` with DDP."""
    from accelerate import PartialState

    parser = argparse.ArgumentParser(prog="python -m common.inheritune.pretrain", description=main.__doc__)
    parser.add_argument("--profile", required=True, choices=PROFILE_NAMES,
                        help="the notebook's PROFILE (REPRO_PROFILE, if set, wins, as in the notebook)")
    parser.add_argument("--seeds", type=int, nargs="+",
                        help="training seeds (default: the notebook's, SEED ... SEED + n_seeds - 1)")
    parser.add_argument("--notebook-seed", type=int, default=0, help="the notebook's SEED (0 as shipped)")
    args = parser.parse_args(argv)

    # joins the launcher's process group (NCCL on GPUs, gloo on CPU) and picks this process's GPU
    state = PartialState(cpu=device().type == "cpu")
    say = print if state.is_main_process else (lambda *a, **k: None)
    cfg = load_config(NOTEBOOK, args.profile, args.notebook_seed)
    s, world = cfg.train, training.process()[1]
    training.check_world(s, world)  # before hours of tokenising
    say(timeplan.estimate(timeplan.pretraining(cfg), n_gpus=world))
    with state.main_process_first():  # the first process tokenises and caches the corpus; the others read it
        stream, heldout, val = inputs(cfg)
    say(f"{NOTEBOOK} | profile={cfg.profile} | {world} process(es); global batch {s.batch_size * s.grad_accum} x "
        f"{cfg.reference.block_size} tokens | cache {cache_dir()}")
    if cfg.steps_schedule:
        select = training.val_windows(heldout, len(val), cfg.reference.block_size, shift=True)
        choice = steps.choose_steps(cfg.reference, s, stream, val, select, cfg.steps_schedule, cfg.steps_margin,
                                    cfg.seed)
        s = replace(s, steps=choice.steps)
        say(f"S = {choice.steps} (separated: {choice.separated})")
    run = replace(cfg, train_in_notebook=True)  # this command is where the training happens
    seeds = args.seeds or notebook_seeds(cfg)
    for seed, exp in zip(seeds, experiments(run, s, stream, val, seeds), strict=True):
        say(f"seed {seed}: " + ", ".join(f"{n} {r.val_loss:.4f}" for n, r in exp.runs.items())
            + f"; growth {[r.n_layer for r in exp.growth.rounds]} matched={exp.growth.matched}")


if __name__ == "__main__":
    main()
