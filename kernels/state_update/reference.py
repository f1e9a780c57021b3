"""Single-token decode steps of the two scans: advance the fp32 SSM state IN PLACE and return the output.

They compute exactly one step of the recurrences defined in `kernels/ssd/reference.py` (Mamba-2, scalar
decay per head) and `kernels/selective_scan/reference.py` (Mamba-1, decay per channel and state). Only
fixed shapes are allocated, so a decode step can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..selective_scan.reference import process_delta
from ..ssd.reference import NO_DT_LIMIT, process_dt


def _compute_dtype(x: Tensor, state: Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (x.dtype, state.dtype) else torch.float32


def ssd_state_update(state, x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False,
                     dt_limit=NO_DT_LIMIT):
    """One Mamba-2 step.

    state: (batch, nheads, headdim, d_state) fp32, updated in place; x, z: (batch, nheads, headdim);
    dt: (batch, nheads); A, dt_bias: (nheads,); B, C: (batch, ngroups, d_state); D: (nheads,) or
    (nheads, headdim). Returns y (batch, nheads, headdim) in x.dtype.
    """
    nheads = x.shape[1]
    per_group = nheads // B.shape[1]
    ct = _compute_dtype(x, state)
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit, ct)  # (batch, nheads)
    decay = torch.exp(dt * A.to(ct))[..., None, None]  # (batch, nheads, 1, 1)
    Bh = B.to(ct).repeat_interleave(per_group, dim=1)  # (batch, nheads, d_state)
    Ch = C.to(ct).repeat_interleave(per_group, dim=1)  # (batch, nheads, d_state)
    xf = x.to(ct)
    inp = (dt[..., None] * xf)[..., None] * Bh[:, :, None, :]  # (batch, nheads, headdim, d_state)
    new = decay * state.to(ct) + inp
    state.copy_(new)
    y = (new @ Ch[..., None])[..., 0]  # (batch, nheads, headdim)
    if D is not None:
        Dv = D.to(ct)
        y = y + (Dv[:, None] if Dv.dim() == 1 else Dv) * xf
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(x.dtype)


def selective_state_update(state, u, delta, A, B, C, *, D=None, z=None, delta_bias=None, delta_softplus=False):
    """One Mamba-1 step.

    state: (batch, d_inner, d_state) fp32, updated in place; u, delta, z: (batch, d_inner);
    A: (d_inner, d_state); B, C: (batch, d_state); D, delta_bias: (d_inner,).
    Returns y (batch, d_inner) in u.dtype.
    """
    ct = _compute_dtype(u, state)
    delta = process_delta(delta, delta_bias, delta_softplus, ct)  # (batch, d_inner)
    uf = u.to(ct)
    decay = torch.exp(delta[..., None] * A.to(ct))  # (batch, d_inner, d_state)
    new = decay * state.to(ct) + (delta * uf)[..., None] * B.to(ct)[:, None, :]  # (batch, d_inner, d_state)
    state.copy_(new)
    y = (new @ C.to(ct)[:, :, None])[..., 0]  # (batch, d_inner)
    if D is not None:
        y = y + D.to(ct) * uf
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(u.dtype)
