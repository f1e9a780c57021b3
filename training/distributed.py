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


def multi_rank() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


class HostGroup:
    """Host-side agreement between ranks without touching the GPU: a gloo group over all ranks (the default group
    when it is gloo already). Making one is collective: every rank constructs it at the same point."""

    def __init__(self):
        self.active = multi_rank()
        self.group = None
        if self.active and torch.distributed.get_backend() != "gloo":
            self.group = torch.distributed.new_group(backend="gloo")

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any rank."""
        if not self.active:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    def from_main(self, value):
        """Rank 0's `value` on every rank (any picklable object)."""
        if not self.active:
            return value
        holder = [value]
        torch.distributed.broadcast_object_list(holder, src=0, group=self.group)
        return holder[0]
