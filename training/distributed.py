"""Where this process stands among the launcher's ranks."""
from __future__ import annotations

import os

import torch


def world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the launcher's environment (1 process when absent)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def launched_by_deepspeed() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
