"""Triton decode step of Mamba-2: one token, the (batch, nheads, headdim, d_state) fp32 state advanced in place and
the output computed in one pass (semantics of `reference.ssd_state_update`).

A decode step is bound by memory: the fp32 state is read once and written once, everything else is small.
One program owns a (BLOCK_P x d_state) tile of one (batch, head) state; the tile stays in registers between the
update and the output reduction. Shapes are fixed per call and nothing is allocated but the output, so the step
can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_common import rows_per_program, softplus
from .reference import NO_DT_LIMIT

# Launch parameters per kernel. max_tile: fp32 state values per program; max_rows: cap on the headdim rows of a
# tile (H100 sweep, eval/results/kernels.md: 128 rows best for Mamba1 d_state 16, kept for Mamba2 too).
TUNING = {"ssd_step": dict(max_tile=4096, max_rows=128)}


@triton.jit
def _ssd_step_kernel(state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dtb_ptr, y_ptr,
                     nheads, headdim, dstate, heads_per_group, dt_lo, dt_hi,
                     s_sb, s_sh, s_sp, s_xb, s_xh, s_dtb, s_bb, s_bg, s_cb, s_cg, s_zb, s_zh, s_yb, s_yh, s_dh,
                     HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr, HAS_DTB: tl.constexpr,
                     SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr, A_IS_LOG: tl.constexpr, BLOCK_P: tl.constexpr,
                     BLOCK_N: tl.constexpr):
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
        dt = softplus(dt)
    if CLAMP:
        dt = tl.minimum(tl.maximum(dt, dt_lo), dt_hi)
    a = tl.load(A_ptr + h).to(tl.float32)
    if A_IS_LOG:  # A given as A_log: A = -exp(A_log), here instead of two launches before the step
        a = -tl.exp(a)
    decay = tl.exp(dt * a)
    x = tl.load(x_ptr + b * s_xb + h * s_xh + offs_p, mask=mp, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + b * s_bb + g * s_bg + offs_n, mask=mn, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * s_cb + g * s_cg + offs_n, mask=mn, other=0.0).to(tl.float32)
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


def ssd_state_update(state, x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False,
                     dt_limit=NO_DT_LIMIT, A_is_log=False):
    """Same contract as reference.ssd_state_update (state fp32, updated in place)."""
    batch, nheads, headdim, dstate = state.shape
    ngroups = B.shape[1]
    assert state.dtype == torch.float32 and state.stride(-1) == 1, "state must be fp32 with contiguous d_state"
    # rows and heads through their strides: x, B, C are slices of the conv output, z and dt of the in-projection
    # (a copy each would be a launch per operand in a batched decode step); only the last dim must be contiguous
    x, B, C = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, B, C))
    dt = dt if dt.stride(-1) == 1 else dt.contiguous()
    z = z if z is None or z.stride(-1) == 1 else z.contiguous()
    y = torch.empty(batch, nheads, headdim, dtype=x.dtype, device=x.device)
    clamp = tuple(dt_limit) != tuple(NO_DT_LIMIT)
    BLOCK_P = rows_per_program(dstate, headdim, **TUNING["ssd_step"])
    grid = (triton.cdiv(headdim, BLOCK_P), batch * nheads)
    Dc = D.contiguous() if D is not None else None
    _ssd_step_kernel[grid](
        state, x, dt, A, B, C, Dc if Dc is not None else A, z if z is not None else x,
        dt_bias if dt_bias is not None else A, y,
        nheads, headdim, dstate, nheads // ngroups, float(dt_limit[0]), float(min(dt_limit[1], 3.0e38)),
        state.stride(0), state.stride(1), state.stride(2), x.stride(0), x.stride(1), dt.stride(0),
        B.stride(0), B.stride(1), C.stride(0), C.stride(1), z.stride(0) if z is not None else 0, z.stride(1) if z is not None else 0,
        y.stride(0), y.stride(1), Dc.stride(0) if Dc is not None and Dc.dim() == 2 else 0,
        HAS_D=D is not None, D_PER_P=D is not None and D.dim() == 2, HAS_Z=z is not None,
        HAS_DTB=dt_bias is not None, SOFTPLUS=dt_softplus, CLAMP=clamp, A_IS_LOG=A_is_log,
        BLOCK_P=BLOCK_P, BLOCK_N=triton.next_power_of_2(dstate))
    return y
