"""RMSNorm and Mamba-2's gated, grouped RMSNorm, computed in fp32 (fp64 for fp64 inputs)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..common import compute_dtype


def _normalize(x: Tensor, eps: float, group_size: Optional[int]) -> Tensor:
    """x / rms(x) over groups of `group_size` consecutive channels of the last dim (None: all of it)."""
    d = x.shape[-1]
    group_size = d if group_size is None else group_size
    if d % group_size:
        raise ValueError(f"rmsnorm: last dim {d} is not a multiple of group_size {group_size}")
    xg = x.unflatten(-1, (d // group_size, group_size))  # (..., ngroups, group_size)
    xg = xg * torch.rsqrt(xg.square().mean(-1, keepdim=True) + eps)
    return xg.flatten(-2)


def rmsnorm(x, weight, eps, *, out_dtype=None):
    """x: (..., d); weight: (d,). Returns x / rms(x) * weight, (..., d) in out_dtype (default x.dtype)."""
    ct = compute_dtype(x)
    return (_normalize(x.to(ct), eps, None) * weight.to(ct)).to(out_dtype or x.dtype)


def add_rmsnorm(x, residual, weight, eps, *, out_dtype=None):
    """The pre-norm of a residual block with the previous block's add folded in: s = residual + x (x alone when
    residual is None), in their promoted dtype. x, residual: (..., d); weight: (d,).
    Returns (rmsnorm(s) * weight in out_dtype (default s.dtype), s)."""
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"add_rmsnorm: residual {tuple(residual.shape)} must have x's shape {tuple(x.shape)}")
    s = x if residual is None else residual + x
    return rmsnorm(s, weight, eps, out_dtype=out_dtype), s


def rmsnorm_gated(x, z, weight, eps, *, group_size=None, norm_before_gate=False):
    """Gated RMSNorm of Mamba-2. x, z: (..., d); weight: (d,); z may be None (no gate).

    norm_before_gate=False: rmsnorm(x * silu(z)) * weight;  True: rmsnorm(x) * weight * silu(z).
    The RMS is taken over groups of `group_size` consecutive channels (None: the whole last dim), so that
    the result does not depend on how channels are split across tensor-parallel ranks.
    Returns (..., d) in x.dtype.
    """
    ct = compute_dtype(x)
    xf = x.to(ct)
    gate = None if z is None else F.silu(z.to(ct))
    if gate is not None and not norm_before_gate:
        xf = xf * gate
    out = _normalize(xf, eps, group_size) * weight.to(ct)
    if gate is not None and norm_before_gate:
        out = out * gate
    return out.to(x.dtype)
