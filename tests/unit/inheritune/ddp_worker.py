"""One Inheritune training run under a launcher, for ``test_pretrain``: ``torchrun --nproc_per_node N
ddp_worker.py [KILL_AT]`` joins the process group as ``pretrain.main`` does and trains ``RUN`` (a tiny GPT on a
planted stream) into ``REPRO_CACHE``; with ``KILL_AT``, process 0 kills itself (SIGKILL, nothing flushed) when it
logs that step, as a preempted job dies. Printed by process 0: one ``step <done>`` line per evaluation."""

from __future__ import annotations

import os
import signal
import sys

import torch
from accelerate import PartialState

from common.core import progress
from common.core.profiles import GPTConfig, PretrainSettings
from common.inheritune import training

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)
SETTINGS = PretrainSettings(steps=12, batch_size=4, grad_accum=2, lr=3e-3, warmup=2, eval_interval=2,
                            ckpt_interval=4, n_val=6)
STREAM = (torch.arange(30_000) * 7 % 253).to(torch.uint8)


def run() -> training.Run:
    """The run: the same in the launched processes and in the test's one process."""
    val = training.val_windows(STREAM, SETTINGS.n_val, CFG.block_size)
    model, init = training.random_init(CFG, 3)

    def report(task: str, done: int, total: int | None = None, note: str = "") -> None:
        print(f"tiny: step {done}/{total} {note}", flush=True)  # every evaluation, unthrottled
        if kill_at is not None and done == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    kill_at = int(sys.argv[1]) if len(sys.argv) > 1 and __name__ == "__main__" else None
    if __name__ == "__main__":  # a launched process; the test's own process keeps the real channel
        progress.report = report  # the library's one progress channel (process 0 reports)
    return training.train("tiny", model, init, STREAM, val, SETTINGS, seed=1)


if __name__ == "__main__":
    PartialState(cpu=True)
    run()
