"""Multi-GPU launch: `phi2 train --gpus N` re-runs itself under `accelerate launch` (PyTorch DDP)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Sequence

from phi2cli.errors import ConfigError, DeviceError

# NVLink multicast can take a shared host's GPUs down; keep it off in every process we start.
SAFE_NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def strip_gpus_flag(argv: Sequence[str]) -> list[str]:
    """The command line without --gpus N / --gpus=N (the launcher takes that part)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--gpus":
            skip = True
            continue
        if arg.startswith("--gpus="):
            continue
        out.append(arg)
    return out


def launch_command(gpus: int, train_args: Sequence[str], main_port: int | None = None) -> list[str]:
    """`accelerate launch` with one process per GPU running `python -m phi2cli train ...`."""
    if gpus < 2:
        raise ConfigError(f"--gpus must be 2 or more to launch several processes (got {gpus})")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(gpus),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    if main_port is not None:
        command += ["--main_process_port", str(main_port)]
    return command + ["-m", "phi2cli", *train_args]


def launched() -> bool:
    """True inside a process started by a distributed launcher."""
    return "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def run_distributed(gpus: int, argv: Sequence[str]) -> int:
    """Start N training processes and wait for them; returns their exit code."""
    import torch

    available = torch.cuda.device_count()
    if available < gpus:
        raise DeviceError(f"--gpus {gpus} asks for more GPUs than this machine has ({available})")
    env = {**os.environ, **SAFE_NCCL_ENV}
    return subprocess.call(launch_command(gpus, strip_gpus_flag(argv)), env=env)
