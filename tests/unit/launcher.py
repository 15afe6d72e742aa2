"""Shared by the launcher tests: a free port and the environment of a child ``torchrun`` / ``accelerate launch``
on CPU (no GPU visible, one thread a process, the cache under the test's directory, no launcher variables of an
enclosing run)."""

from __future__ import annotations

import os
import socket

LAUNCHER_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(cache, profile: str = "smoke") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update(REPRO_CACHE=str(cache), REPRO_PROFILE=profile, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               TQDM_DISABLE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONHASHSEED="0")
    return env
