"""Triton decode steps: one token of Mamba2 / Mamba1, state advanced in place and output computed in one pass.

A decode step is bound by memory: the fp32 state is read once and written once, everything else is small.
One program owns a (BLOCK_P x d_state) tile of one (batch, head) state for Mamba2, or (BLOCK_D x d_state) of
one batch row for Mamba1; the tile stays in registers between the update and the output reduction.
Shapes are fixed per call and nothing is allocated but the output, so the step can be captured in a CUDA graph.
Semantics are those of `reference.py` beside this file.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ssd.reference import NO_DT_LIMIT


@triton.jit
def _softplus(x):
    # same threshold as torch.nn.functional.softplus: linear above 20
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(x)), x)


@triton.jit
def _ssd_step_kernel(state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dtb_ptr, y_ptr,
                     nheads, headdim, dstate, heads_per_group, dt_lo, dt_hi,
                     s_sb, s_sh, s_sp, s_xb, s_xh, s_dtb, s_bb, s_bg, s_zb, s_zh, s_yb, s_yh, s_dh,
                     HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr, HAS_DTB: tl.constexpr,
                     SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_p = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // nheads
    h = bh % nheads
    g = h // heads_per_group
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mp = offs_p < headdim
    mn = offs_n < dstate
    dt = tl.load(dt_ptr + b * s_dtb + h).to(tl.float32)
    if HAS_DTB:
        dt += tl.load(dtb_ptr + h).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    if CLAMP:
        dt = tl.minimum(tl.maximum(dt, dt_lo), dt_hi)
    decay = tl.exp(dt * tl.load(A_ptr + h).to(tl.float32))
    x = tl.load(x_ptr + b * s_xb + h * s_xh + offs_p, mask=mp, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + b * s_bb + g * s_bg + offs_n, mask=mn, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * s_bb + g * s_bg + offs_n, mask=mn, other=0.0).to(tl.float32)
    sp = state_ptr + b * s_sb + h * s_sh + offs_p[:, None] * s_sp + offs_n[None, :]
    m2 = mp[:, None] & mn[None, :]
    s = tl.load(sp, mask=m2, other=0.0)
    s = s * decay + (dt * x)[:, None] * Bv[None, :]
    tl.store(sp, s, mask=m2)
    y = tl.sum(s * Cv[None, :], axis=1)
    if HAS_D:
        if D_PER_P:
            y += tl.load(D_ptr + h * s_dh + offs_p, mask=mp, other=0.0).to(tl.float32) * x
        else:
            y += tl.load(D_ptr + h).to(tl.float32) * x
    if HAS_Z:
        z = tl.load(z_ptr + b * s_zb + h * s_zh + offs_p, mask=mp, other=0.0).to(tl.float32)
        y = y * z * tl.sigmoid(z)
    tl.store(y_ptr + b * s_yb + h * s_yh + offs_p, y, mask=mp)


MAX_TILE = 4096  # fp32 state values per program
MAX_ROWS = 128  # H100 sweep (eval/results/kernels.md): 128 rows best for Mamba1 d_state 16


def _block_rows(dstate: int, rows: int) -> int:
    # keep a tile near MAX_TILE fp32 values: enough work per program, no register spills at d_state 128-256
    return max(1, min(triton.next_power_of_2(rows), MAX_TILE // triton.next_power_of_2(dstate), MAX_ROWS))


def ssd_state_update(state, x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False,
                     dt_limit=NO_DT_LIMIT):
    """Same contract as reference.ssd_state_update (state fp32, updated in place)."""
    batch, nheads, headdim, dstate = state.shape
    ngroups = B.shape[1]
    assert state.dtype == torch.float32 and state.stride(-1) == 1, "state must be fp32 with contiguous d_state"
    x, B, C = x.contiguous(), B.contiguous(), C.contiguous()
    dt = dt.contiguous()
    z = z.contiguous() if z is not None else None
    y = torch.empty_like(x)  # (batch, nheads, headdim)
    clamp = tuple(dt_limit) != tuple(NO_DT_LIMIT)
    BLOCK_P = _block_rows(dstate, headdim)
    grid = (triton.cdiv(headdim, BLOCK_P), batch * nheads)
    Dc = D.contiguous() if D is not None else None
    _ssd_step_kernel[grid](
        state, x, dt, A, B, C, Dc if Dc is not None else A, z if z is not None else x,
        dt_bias if dt_bias is not None else A, y,
        nheads, headdim, dstate, nheads // ngroups, float(dt_limit[0]), float(min(dt_limit[1], 3.0e38)),
        state.stride(0), state.stride(1), state.stride(2), x.stride(0), x.stride(1), dt.stride(0),
        B.stride(0), B.stride(1), z.stride(0) if z is not None else 0, z.stride(1) if z is not None else 0,
        y.stride(0), y.stride(1), Dc.stride(0) if Dc is not None and Dc.dim() == 2 else 0,
        HAS_D=D is not None, D_PER_P=D is not None and D.dim() == 2, HAS_Z=z is not None,
        HAS_DTB=dt_bias is not None, SOFTPLUS=dt_softplus, CLAMP=clamp,
        BLOCK_P=BLOCK_P, BLOCK_N=triton.next_power_of_2(dstate))
    return y


@triton.jit
def _selective_step_kernel(state_ptr, u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dtb_ptr, y_ptr,
                           dinner, dstate, s_sb, s_sd, s_ub, s_dtb, s_bb, s_zb, s_yb,
                           HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DTB: tl.constexpr,
                           SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
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
        dt = _softplus(dt)
    u = tl.load(u_ptr + b * s_ub + offs_d, mask=md, other=0.0).to(tl.float32)
    A = tl.load(A_ptr + offs_d[:, None] * dstate + offs_n[None, :], mask=m2, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + b * s_bb + offs_n, mask=mn, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * s_bb + offs_n, mask=mn, other=0.0).to(tl.float32)
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


def selective_state_update(state, u, delta, A, B, C, *, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Same contract as reference.selective_state_update (state fp32, updated in place)."""
    batch, dinner, dstate = state.shape
    assert state.dtype == torch.float32 and state.stride(-1) == 1, "state must be fp32 with contiguous d_state"
    u, delta, A, B, C = u.contiguous(), delta.contiguous(), A.contiguous(), B.contiguous(), C.contiguous()
    z = z.contiguous() if z is not None else None
    y = torch.empty_like(u)  # (batch, d_inner)
    BLOCK_D = _block_rows(dstate, dinner)
    grid = (triton.cdiv(dinner, BLOCK_D), batch)
    _selective_step_kernel[grid](
        state, u, delta, A, B, C, D if D is not None else u, z if z is not None else u,
        delta_bias if delta_bias is not None else u, y, dinner, dstate,
        state.stride(0), state.stride(1), u.stride(0), delta.stride(0), B.stride(0),
        z.stride(0) if z is not None else 0, y.stride(0),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DTB=delta_bias is not None, SOFTPLUS=delta_softplus,
        BLOCK_D=BLOCK_D, BLOCK_N=triton.next_power_of_2(dstate))
    return y
