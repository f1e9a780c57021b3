"""Triton decode step of Mamba-1: one token, the (batch, d_inner, d_state) fp32 state advanced in place and the
output computed in one pass (semantics of `reference.selective_state_update`).

A decode step is bound by memory: the fp32 state is read once and written once, everything else is small.
One program owns a (BLOCK_D x d_state) tile of one batch row; the tile stays in registers between the update
and the output reduction. Shapes are fixed per call and nothing is allocated but the output, so the step can be
captured in a CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_common import rows_per_program, softplus

# Launch parameters per kernel. max_tile: fp32 state values per program; max_rows: cap on the d_inner rows of a
# tile (H100 sweep, eval/results/kernels.md: 128 rows best for d_state 16).
TUNING = {"selective_step": dict(max_tile=4096, max_rows=128)}


@triton.jit
def _selective_step_kernel(state_ptr, u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dtb_ptr, y_ptr,
                           dinner, dstate, s_sb, s_sd, s_ub, s_dtb, s_bb, s_cb, s_zb, s_yb,
                           HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DTB: tl.constexpr,
                           SOFTPLUS: tl.constexpr, A_IS_LOG: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_N: tl.constexpr):
    pid_d = tl.program_id(0)
    b = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    md = offs_d < dinner
    mn = offs_n < dstate
    m2 = md[:, None] & mn[None, :]
    dt = tl.load(dt_ptr + b * s_dtb + offs_d, mask=md, other=0.0).to(tl.float32)
    if HAS_DTB:
        dt += tl.load(dtb_ptr + offs_d, mask=md, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = softplus(dt)
    u = tl.load(u_ptr + b * s_ub + offs_d, mask=md, other=0.0).to(tl.float32)
    A = tl.load(A_ptr + offs_d[:, None] * dstate + offs_n[None, :], mask=m2, other=0.0).to(tl.float32)
    if A_IS_LOG:  # A given as A_log: A = -exp(A_log), here instead of two launches before the step
        A = -tl.exp(A)
    Bv = tl.load(B_ptr + b * s_bb + offs_n, mask=mn, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * s_cb + offs_n, mask=mn, other=0.0).to(tl.float32)
    sp = state_ptr + b * s_sb + offs_d[:, None] * s_sd + offs_n[None, :]
    s = tl.load(sp, mask=m2, other=0.0)
    s = s * tl.exp(dt[:, None] * A) + (dt * u)[:, None] * Bv[None, :]
    tl.store(sp, s, mask=m2)
    y = tl.sum(s * Cv[None, :], axis=1)
    if HAS_D:
        y += tl.load(D_ptr + offs_d, mask=md, other=0.0).to(tl.float32) * u
    if HAS_Z:
        z = tl.load(z_ptr + b * s_zb + offs_d, mask=md, other=0.0).to(tl.float32)
        y = y * z * tl.sigmoid(z)
    tl.store(y_ptr + b * s_yb + offs_d, y, mask=md)


def selective_state_update(state, u, delta, A, B, C, *, D=None, z=None, delta_bias=None, delta_softplus=False,
                           A_is_log=False):
    """Same contract as reference.selective_state_update (state fp32, updated in place)."""
    batch, dinner, dstate = state.shape
    assert state.dtype == torch.float32 and state.stride(-1) == 1, "state must be fp32 with contiguous d_state"
    # rows are read through their stride: x, z, dt, B and C are slices of the projections' outputs (a copy each
    # would be a launch per operand in a batched decode step); only the last dim must be contiguous
    u, delta, B, C = (t if t.stride(-1) == 1 else t.contiguous() for t in (u, delta, B, C))
    A = A.contiguous()
    z = z if z is None or z.stride(-1) == 1 else z.contiguous()
    y = torch.empty(batch, dinner, dtype=u.dtype, device=u.device)
    BLOCK_D = rows_per_program(dstate, dinner, **TUNING["selective_step"])
    grid = (triton.cdiv(dinner, BLOCK_D), batch)
    _selective_step_kernel[grid](
        state, u, delta, A, B, C, D if D is not None else u, z if z is not None else u,
        delta_bias if delta_bias is not None else u, y, dinner, dstate,
        state.stride(0), state.stride(1), u.stride(0), delta.stride(0), B.stride(0), C.stride(0),
        z.stride(0) if z is not None else 0, y.stride(0),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DTB=delta_bias is not None, SOFTPLUS=delta_softplus, A_IS_LOG=A_is_log,
        BLOCK_D=BLOCK_D, BLOCK_N=triton.next_power_of_2(dstate))
    return y
