"""Pieces the ops share: the precision a reference computes in, where packed documents start, and the (rows, d)
view a kernel launch reads."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """fp64 if any of `tensors` is fp64, else fp32: the precision the reference ops compute and keep states in.
    A decode step passes its state as well, so an fp64 state keeps fp64 even for lower-precision inputs."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def doc_starts(seq_idx: Optional[Tensor]) -> Optional[Tensor]:
    """(batch, seqlen) bool, True at the first token of every document except the row's first; None if
    seq_idx is None. Position 0 is never a start: the initial state flows into the row's first document."""
    if seq_idx is None:
        return None
    starts = torch.zeros_like(seq_idx, dtype=torch.bool)  # (batch, seqlen)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return starts


def as_rows(t: Tensor, d: Optional[int] = None) -> Tensor:
    """t as (rows, d) (d: its last dim by default): a view when possible, copied only when the last dim is
    strided (kernels read rows through their stride)."""
    t2 = t.reshape(-1, t.shape[-1] if d is None else d)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()
