"""Triton selective scan (Mamba-1), forward and backward; semantics of `reference.py` beside this file.

One program owns one batch row and a block of BLOCK_D channels with all d_state states, and walks time in
blocks of BLOCK_T steps. Per block it forms the decays exp(delta * A) and the inputs delta * u * B as
(BLOCK_T, d_state, BLOCK_D) tiles in registers, combines them along time with `tl.associative_scan`
((a1, b1), (a2, b2)) -> (a1 a2, a2 b1 + b2), applies the state carried in from the previous block and reduces
against C for y. Only products of decays are formed (no exp(-cumsum) division), so nothing overflows.
Tiles keep channels as the fastest dimension: Triton's default layout then puts channels (and, for
BLOCK_D < 32, some states) on lanes and time inside each thread, so the scan is a serial loop in registers
and the sums over states need at most two shuffle rounds. One warp per program: more warps land on states
and every sum over states then crosses warps (measured 1.4-3x slower, scratch/notes_selective_scan.md).

The forward writes the fp32 state at every chunk start (chunk_size steps, (batch, nchunks, d_inner, d_state)).
The backward walks the chunks in reverse: it replays a chunk forward from its saved state to get the state at
each of its block starts (a small per-program scratch), then walks those blocks in reverse, recomputing the
states inside each (nothing per step is stored) and running the adjoint recurrence
g_t = C_t dy_t + a_{t+1} g_{t+1} as a reverse scan. Its coefficient is the next step's decay; rather than a second
exp of delta loaded one step later, the scan runs over triples (a_t, p, q) (`_combine_adjoint`): a run of steps
maps the carry m = a_{end+1} g_{end+1} entering from its right to g at its first step, q + p m, and keeps its first
decay so the run to its left can continue the map. The carry between blocks is m = a_first g_first. With g
(dL/dh_t) and h_t at the same index every gradient is local:
    dB_t = sum_d g_t delta_t u_t,  dC_t = sum_d h_t dy_t,  d(delta u)_t = sum_n g_t B_t,
    a_t h_{t-1} = h_t - x_t  gives  dL/da_t * a_t = g_t (h_t - x_t)  for ddelta and dA,
    d initial_state = a_0 g_0 (the carry past token 0).
Document boundaries (seq_idx) enter as a per-token 0/1 float mask on the decay, built once per call.
dB and dC sum over channel blocks with fp32 atomics; dA, dD and d delta_bias over batch rows the same way.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import tuning
from ..triton_common import softplus
from . import reference as ref

# Launch parameters per kernel (tile sizes, num_warps), picked on an H100 by `python -m eval.bench_selective_scan
# --sweep`. "fwd" is _selective_scan_fwd_kernel, "bwd" _selective_scan_bwd_kernel; the forward's BLOCK_T is the
# backward's too, because the backward replays the forward's blocks. _tiles may shrink them to fit
# MAX_PER_THREAD.
TUNING = {
    "fwd": dict(BLOCK_T=8, BLOCK_D=16, num_warps=1),
    "bwd": dict(BLOCK_D=8, num_warps=1),
}
# Long rows at small batch: when fewer than this many (channel block x row) programs would run, the sequence is
# cut into segments of whole chunks scanned in parallel (a summary pass gives each segment's end state and decay
# product, a short carry over segments gives every segment its entering state, then the segments run as usual;
# the backward does the same with the adjoint). 0 turns it off. Not yet timed on a GPU: off until it is. With
# BRAIDLM_AUTOTUNE=1 (kernels/tuning.py) each shape class times SPLIT_CANDIDATES and keeps the fastest.
SPLIT_PROGRAMS = 0
SPLIT_CANDIDATES = (0, 1536, 4096)
MAX_PER_THREAD = 64  # fp32 values of one (BLOCK_T, d_state, BLOCK_D) tile per thread: more spills in the backward
ATOMIC_DBC = True  # dB, dC: fp32 atomics (True) or per-channel-block partials summed in torch (False)


@triton.jit
def _combine(a1, b1, a2, b2):
    # (a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _load_dt(delta_ptr, dtb, offs, mask, HAS_DTB: tl.constexpr, SOFTPLUS: tl.constexpr):
    """delta (+ bias) (softplus) at `offs`, 0 where masked (a decay of 1, no input). Returns (dt, pre-softplus)."""
    pre = tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DTB:
        pre += dtb[None, :]
    dt = pre
    if SOFTPLUS:
        dt = softplus(pre)
    return tl.where(mask, dt, 0.0), pre


@triton.jit
def _combine_adjoint(a2, p2, q2, a1, p1, q1):
    # The backward's reverse scan: (a2, p2, q2) aggregates later steps, (a1, p1, q1) earlier ones. A run of steps
    # (a, p, q) maps m, the adjoint a_{s+1} g_{s+1} entering from its right, to g at its first step, q + p m; a is
    # the decay of that first step, which the run to its left needs to continue the map.
    t = p1 * a2
    return a1, t * p2, q1 + t * q2


@triton.jit
def _keep(keep_ptr, offs_t, L, HAS_SEQ: tl.constexpr):
    """(BLOCK_T,) 1.0 where token t continues the document of t-1, 0.0 at a document start (the per-token mask
    `_keep_mask` builds once per call); 1 outside [0, L)."""
    if HAS_SEQ:
        return tl.load(keep_ptr + offs_t, mask=(offs_t < L) & (offs_t >= 0), other=1.0)
    else:
        return tl.full(offs_t.shape, 1.0, tl.float32)


@triton.jit
def _decays(dt, A2, keep_ptr, b, L, offs_t, HAS_SEQ: tl.constexpr):
    """(BLOCK_T, BLOCK_N, BLOCK_D) decays exp(dt A) of one time block, 0 where a token starts a document."""
    a = tl.exp2(dt[:, None, :] * A2[None, :, :])
    if HAS_SEQ:
        a = a * _keep(keep_ptr + b * L, offs_t, L, HAS_SEQ)[:, None, None]
    return a


@triton.jit
def _block_inputs(u_ptr, delta_ptr, B_ptr, keep_ptr, A2, dtb, b, L, DI, N, offs_t, offs_d, offs_n,
                  HAS_DTB: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr):
    """One time block: u, dt (BLOCK_T, BLOCK_D), B (BLOCK_T, BLOCK_N), decays a and inputs x
    (BLOCK_T, BLOCK_N, BLOCK_D), and the pre-softplus delta."""
    mt = offs_t < L
    m2 = mt[:, None] & (offs_d < DI)[None, :]
    offs2 = b * L * DI + offs_t[:, None] * DI + offs_d[None, :]  # (BLOCK_T, BLOCK_D)
    u = tl.load(u_ptr + offs2, mask=m2, other=0.0).to(tl.float32)
    dt, pre = _load_dt(delta_ptr, dtb, offs2, m2, HAS_DTB, SOFTPLUS)
    mtn = mt[:, None] & (offs_n < N)[None, :]
    Bt = tl.load(B_ptr + b * L * N + offs_t[:, None] * N + offs_n[None, :], mask=mtn, other=0.0).to(tl.float32)
    a = _decays(dt, A2, keep_ptr, b, L, offs_t, HAS_SEQ)
    x = Bt[:, :, None] * (dt * u)[:, None, :]
    return u, dt, pre, Bt, a, x


@triton.jit
def _adjoint_scan(a, Ct, dy):
    """The block's reverse scan of g_t = C_t dy_t + a_{t+1} g_{t+1}, from the block's own decays a (no decay of
    the step past the block needed): (pc, gc) with g_t = gc_t + pc_t m, where m = a_{end+1} g_{end+1} is the
    adjoint entering from the right (the carry between blocks)."""
    ones = tl.full(a.shape, 1.0, tl.float32)
    _, pc, gc = tl.associative_scan((a, ones, Ct[:, :, None] * dy[:, None, :]), 0, _combine_adjoint, reverse=True)
    return pc, gc


@triton.jit
def _selective_scan_fwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dtb_ptr, keep_ptr, h0_ptr,
                y_ptr, hT_ptr, hs_ptr, p_ptr, L, DI, N, nblocks, blocks_per_chunk, nchunks, blocks_per_seg,
                HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DTB: tl.constexpr, SOFTPLUS: tl.constexpr,
                HAS_SEQ: tl.constexpr, HAS_H0: tl.constexpr, SAVE: tl.constexpr, SUMMARY: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    # tiles are (time, state, channel) with channels fastest: Triton's default layout then spreads channels
    # over lanes and keeps time and states in each thread, so the scan and the sums over states need no
    # shuffles.
    # Program (channel block, row, segment) walks the blocks [seg * blocks_per_seg, ...) of its segment. h0 is
    # (n_seg, batch, DI, N): the state entering each segment (one segment: the caller's initial state).
    # SUMMARY: from a zero state, store only the segment's end state (hT_ptr) and the product of its decays
    # (p_ptr), both (n_seg, batch, DI, N); no output.
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    seg = tl.program_id(2)
    nbatch = tl.num_programs(1)
    sb = seg * nbatch + b  # (segment, row) index into per-segment states
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_T)
    md = offs_d < DI
    mnd = (offs_n < N)[:, None] & md[None, :]
    state_off = offs_d[None, :] * N + offs_n[:, None]  # (BLOCK_N, BLOCK_D) in a (.., DI, N) state
    A2 = tl.load(A_ptr + state_off, mask=mnd, other=0.0).to(tl.float32) * 1.4426950408889634  # exp(x) = exp2(x log2 e)
    dtb = tl.load(dtb_ptr + offs_d, mask=md, other=0.0).to(tl.float32) if HAS_DTB else None
    Dv = tl.load(D_ptr + offs_d, mask=md, other=0.0).to(tl.float32) if HAS_D else None
    if HAS_H0:
        h = tl.load(h0_ptr + sb * DI * N + state_off, mask=mnd, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    prod = tl.full((BLOCK_N, BLOCK_D), 1.0, tl.float32)
    blk0 = seg * blocks_per_seg
    for blk in range(blk0, tl.minimum(blk0 + blocks_per_seg, nblocks)):
        if SAVE:
            if blk % blocks_per_chunk == 0:
                tl.store(hs_ptr + (b * nchunks + blk // blocks_per_chunk) * DI * N + state_off, h, mask=mnd)
        offs_t = blk * BLOCK_T + rows
        u, dt, pre, Bt, a, x = _block_inputs(u_ptr, delta_ptr, B_ptr, keep_ptr, A2, dtb, b, L, DI, N, offs_t,
                                             offs_d, offs_n, HAS_DTB, SOFTPLUS, HAS_SEQ)
        if SUMMARY:
            ac, xc = tl.associative_scan((a, x), 0, _combine)
            last = rows[:, None, None] == BLOCK_T - 1
            h = tl.sum(tl.where(last, ac * h[None, :, :] + xc, 0.0), axis=0)
            prod = prod * tl.sum(tl.where(last, ac, 0.0), axis=0)
        else:
            mt = offs_t < L
            Ct = tl.load(C_ptr + b * L * N + offs_t[:, None] * N + offs_n[None, :],
                         mask=mt[:, None] & (offs_n < N)[None, :], other=0.0).to(tl.float32)
            ac, xc = tl.associative_scan((a, x), 0, _combine)
            hb = ac * h[None, :, :] + xc  # (BLOCK_T, BLOCK_N, BLOCK_D) states after each step
            y = tl.sum(hb * Ct[:, :, None], axis=1)  # (BLOCK_T, BLOCK_D)
            # padded steps past L have decay 1 and no input, so the last row is the state after the last token
            h = tl.sum(tl.where(rows[:, None, None] == BLOCK_T - 1, hb, 0.0), axis=0)
            if HAS_D:
                y += Dv[None, :] * u
            offs2 = b * L * DI + offs_t[:, None] * DI + offs_d[None, :]
            m2 = mt[:, None] & md[None, :]
            if HAS_Z:
                z = tl.load(z_ptr + offs2, mask=m2, other=0.0).to(tl.float32)
                y = y * z * tl.sigmoid(z)
            tl.store(y_ptr + offs2, y.to(y_ptr.dtype.element_ty), mask=m2)
    if SUMMARY:
        tl.store(hT_ptr + sb * DI * N + state_off, h, mask=mnd)
        tl.store(p_ptr + sb * DI * N + state_off, prod, mask=mnd)
    elif seg == tl.num_programs(2) - 1:
        tl.store(hT_ptr + b * DI * N + state_off, h, mask=mnd)


@triton.jit
def _selective_scan_bwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dtb_ptr, keep_ptr, hs_ptr, dy_ptr, dhT_ptr,
                du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, ddtb_ptr, dh0_ptr, scratch_ptr,
                L, DI, N, nblocks, blocks_per_chunk, nchunks, n_dblocks, chunks_per_seg,
                HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DTB: tl.constexpr, SOFTPLUS: tl.constexpr,
                HAS_SEQ: tl.constexpr, HAS_DHT: tl.constexpr, ATOMIC: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    # Program (channel block, row, segment) walks the chunks of its segment in reverse. dhT is (n_seg, batch,
    # DI, N): the adjoint arriving from the right of each segment (one segment: the final state's gradient).
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    seg = tl.program_id(2)
    sb = seg * tl.num_programs(1) + b
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_T)
    md = offs_d < DI
    mn = offs_n < N
    mnd = mn[:, None] & md[None, :]
    state_off = offs_d[None, :] * N + offs_n[:, None]  # (BLOCK_N, BLOCK_D)
    A = tl.load(A_ptr + state_off, mask=mnd, other=0.0).to(tl.float32)
    A2 = A * 1.4426950408889634
    dtb = tl.load(dtb_ptr + offs_d, mask=md, other=0.0).to(tl.float32) if HAS_DTB else None
    Dv = tl.load(D_ptr + offs_d, mask=md, other=0.0).to(tl.float32) if HAS_D else None
    # m: the adjoint entering a block from its right, a_{end+1} g_{end+1} (dL/dh at the block's last step through
    # the later ones); at the segment's end, the final state's gradient (or the later segments')
    if HAS_DHT:
        m = tl.load(dhT_ptr + sb * DI * N + state_off, mask=mnd, other=0.0).to(tl.float32)
    else:
        m = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dA_acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), tl.float32)
    ddtb_acc = tl.zeros((BLOCK_D,), tl.float32)
    # this program's block-start states inside one chunk: (blocks_per_chunk, BLOCK_N, BLOCK_D)
    scratch = scratch_ptr + (sb * n_dblocks + pid_d) * blocks_per_chunk * BLOCK_N * BLOCK_D
    scratch_off = offs_n[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    base = b * L * DI
    c_hi = tl.minimum((seg + 1) * chunks_per_seg, nchunks)
    for ci in range(c_hi - seg * chunks_per_seg):
        c = c_hi - 1 - ci
        blk0 = c * blocks_per_chunk
        nb = tl.minimum(blocks_per_chunk, nblocks - blk0)
        # pass 1: replay the chunk forward from its saved start, keeping each block's start state
        h = tl.load(hs_ptr + (b * nchunks + c) * DI * N + state_off, mask=mnd, other=0.0)
        tl.store(scratch + scratch_off, h)
        for k in range(nb - 1):
            offs_t = (blk0 + k) * BLOCK_T + rows
            _, _, _, _, a, x = _block_inputs(u_ptr, delta_ptr, B_ptr, keep_ptr, A2, dtb, b, L, DI, N, offs_t,
                                             offs_d, offs_n, HAS_DTB, SOFTPLUS, HAS_SEQ)
            ac, xc = tl.associative_scan((a, x), 0, _combine)
            h = tl.sum(tl.where(rows[:, None, None] == BLOCK_T - 1, ac * h[None, :, :] + xc, 0.0), axis=0)
            tl.store(scratch + (k + 1) * BLOCK_N * BLOCK_D + scratch_off, h)
        tl.debug_barrier()
        # pass 2: blocks of the chunk in reverse
        for kk in range(nb):
            k = nb - 1 - kk
            offs_t = (blk0 + k) * BLOCK_T + rows
            mt = offs_t < L
            m2 = mt[:, None] & md[None, :]
            offs2 = base + offs_t[:, None] * DI + offs_d[None, :]  # (BLOCK_T, BLOCK_D)
            u, dt, pre, Bt, a, x = _block_inputs(u_ptr, delta_ptr, B_ptr, keep_ptr, A2, dtb, b, L, DI, N,
                                                 offs_t, offs_d, offs_n, HAS_DTB, SOFTPLUS, HAS_SEQ)
            h0 = tl.load(scratch + k * BLOCK_N * BLOCK_D + scratch_off)
            ac, xc = tl.associative_scan((a, x), 0, _combine)
            hb = ac * h0[None, :, :] + xc  # (BLOCK_T, BLOCK_N, BLOCK_D)
            w = hb - x  # a_t h_{t-1}; ordered so that few (BLOCK_T, BLOCK_N, BLOCK_D) tiles live at once
            mtn = mt[:, None] & mn[None, :]
            offs_bc = b * L * N + offs_t[:, None] * N + offs_n[None, :]  # (BLOCK_T, BLOCK_N)
            Ct = tl.load(C_ptr + offs_bc, mask=mtn, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs2, mask=m2, other=0.0).to(tl.float32)

            # output side: gate, skip
            if HAS_Z:
                z = tl.load(z_ptr + offs2, mask=m2, other=0.0).to(tl.float32)
                sz = tl.sigmoid(z)
                ypre = tl.sum(hb * Ct[:, :, None], axis=1)
                if HAS_D:
                    ypre += Dv[None, :] * u
                dz = dy * ypre * sz * (1.0 + z * (1.0 - sz))
                tl.store(dz_ptr + offs2, dz.to(dz_ptr.dtype.element_ty), mask=m2)
                dy = dy * z * sz  # gradient of the ungated output
            if HAS_D:
                dD_acc += tl.sum(dy * u, axis=0)
                du = dy * Dv[None, :]
            else:
                du = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
            dC = tl.sum(hb * dy[:, None, :], axis=2)  # (BLOCK_T, BLOCK_N)
            if ATOMIC:
                tl.atomic_add(dC_ptr + offs_bc, dC, mask=mtn, sem="relaxed")
            else:
                offs_p = (b * n_dblocks + pid_d) * L * N + offs_t[:, None] * N + offs_n[None, :]
                tl.store(dC_ptr + offs_p, dC, mask=mtn)

            # adjoint: g_t = C_t dy_t + a_{t+1} g_{t+1}, the adjoint past the block carried in as m
            pc, gc = _adjoint_scan(a, Ct, dy)
            gb = gc + pc * m[None, :, :]
            m = tl.sum(tl.where(rows[:, None, None] == 0, a * gb, 0.0), axis=0)

            dtu = dt * u
            dB = tl.sum(gb * dtu[:, None, :], axis=2)
            if ATOMIC:
                tl.atomic_add(dB_ptr + offs_bc, dB, mask=mtn, sem="relaxed")
            else:
                tl.store(dB_ptr + offs_p, dB, mask=mtn)
            ddtu = tl.sum(gb * Bt[:, :, None], axis=1)  # (BLOCK_T, BLOCK_D)
            q = gb * w  # dL/da_t * a_t
            ddt = ddtu * u + tl.sum(q * A[None, :, :], axis=1)
            dA_acc += tl.sum(q * dt[:, None, :], axis=0)
            du += ddtu * dt
            if SOFTPLUS:
                ddt = ddt * tl.sigmoid(pre)
            ddt = tl.where(m2, ddt, 0.0)
            ddtb_acc += tl.sum(ddt, axis=0)
            tl.store(du_ptr + offs2, du.to(du_ptr.dtype.element_ty), mask=m2)
            tl.store(ddelta_ptr + offs2, ddt.to(ddelta_ptr.dtype.element_ty), mask=m2)
        tl.debug_barrier()  # the next chunk's pass 1 overwrites the scratch

    # initial state: h_0 = a_0 h_init + x_0, so its gradient is the carry past token 0, a_0 g_0
    if seg == 0:
        tl.store(dh0_ptr + b * DI * N + state_off, m, mask=mnd)
    tl.atomic_add(dA_ptr + state_off, dA_acc, mask=mnd, sem="relaxed")
    if HAS_D:
        tl.atomic_add(dD_ptr + offs_d, dD_acc, mask=md, sem="relaxed")
    if HAS_DTB:
        tl.atomic_add(ddtb_ptr + offs_d, ddtb_acc, mask=md, sem="relaxed")


@triton.jit
def _selective_scan_adjoint_kernel(delta_ptr, A_ptr, C_ptr, z_ptr, dtb_ptr, keep_ptr, dy_ptr, r_ptr, q_ptr,
                                   L, DI, N, nblocks, blocks_per_seg,
                                   HAS_Z: tl.constexpr, HAS_DTB: tl.constexpr, SOFTPLUS: tl.constexpr,
                                   HAS_SEQ: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                                   BLOCK_N: tl.constexpr):
    """Per segment s >= 1 (program (channel block, row, s - 1)), from a zero adjoint at its right end: the carry
    the backward passes leftwards at its first token s0, r = a_{s0} g_{s0}, and the factor it applies to a carry m
    arriving from the right, q = a_{s0} ... a_{s1} (so the carry leaving is r + q m); both (n_seg, batch, DI, N)
    at index s."""
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    seg = tl.program_id(2) + 1
    sb = seg * tl.num_programs(1) + b
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_T)
    md = offs_d < DI
    mn = offs_n < N
    mnd = mn[:, None] & md[None, :]
    state_off = offs_d[None, :] * N + offs_n[:, None]
    A2 = tl.load(A_ptr + state_off, mask=mnd, other=0.0).to(tl.float32) * 1.4426950408889634
    dtb = tl.load(dtb_ptr + offs_d, mask=md, other=0.0).to(tl.float32) if HAS_DTB else None
    m = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    prod = tl.full((BLOCK_N, BLOCK_D), 1.0, tl.float32)
    blk_lo = seg * blocks_per_seg
    blk_hi = tl.minimum(blk_lo + blocks_per_seg, nblocks)
    for kk in range(blk_hi - blk_lo):
        offs_t = (blk_hi - 1 - kk) * BLOCK_T + rows
        mt = offs_t < L
        m2 = mt[:, None] & md[None, :]
        offs2 = b * L * DI + offs_t[:, None] * DI + offs_d[None, :]
        Ct = tl.load(C_ptr + b * L * N + offs_t[:, None] * N + offs_n[None, :], mask=mt[:, None] & mn[None, :],
                     other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs2, mask=m2, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + offs2, mask=m2, other=0.0).to(tl.float32)
            dy = dy * z * tl.sigmoid(z)
        dt, _ = _load_dt(delta_ptr, dtb, offs2, m2, HAS_DTB, SOFTPLUS)
        a = _decays(dt, A2, keep_ptr, b, L, offs_t, HAS_SEQ)
        pc, gc = _adjoint_scan(a, Ct, dy)
        first = rows[:, None, None] == 0
        m = tl.sum(tl.where(first, a * (gc + pc * m[None, :, :]), 0.0), axis=0)
        prod = prod * tl.sum(tl.where(first, a * pc, 0.0), axis=0)
    tl.store(r_ptr + sb * DI * N + state_off, m, mask=mnd)
    tl.store(q_ptr + sb * DI * N + state_off, prod, mask=mnd)


def _tiles(d_inner: int, d_state: int, cfg: dict, block_t: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_D, BLOCK_N, num_warps) with at most MAX_PER_THREAD values of a tile per thread
    (halving BLOCK_D, then BLOCK_T), so that the tiles of the backward stay in registers. Triton's default
    layout gives lanes to channels first, then to states, then warps to channels and states: warps are capped
    so that time stays inside each thread."""
    bn = triton.next_power_of_2(d_state)
    bd = min(cfg["BLOCK_D"], triton.next_power_of_2(d_inner))
    lanes_d = min(32, bd)
    lanes_n = min(32 // lanes_d, bn)
    warps = max(1, min(cfg["num_warps"], (bd // lanes_d) * (bn // lanes_n)))
    limit = MAX_PER_THREAD * 32 * warps
    while bd > 1 and block_t * bd * bn > limit:
        bd //= 2
    while block_t > 1 and block_t * bd * bn > limit:
        block_t //= 2
    return block_t, bd, bn, warps


def _segments(programs: int, nchunks: int, per_chunk: int, split_programs: int) -> tuple[int, int]:
    """(number of segments, blocks per segment): whole chunks per segment, enough segments that about
    split_programs programs run (one segment when `programs` already reach it or split_programs is 0)."""
    nseg = 1
    if 0 < programs < split_programs and nchunks > 1:
        nseg = min(nchunks, triton.cdiv(split_programs, programs))
    chunks_per_seg = triton.cdiv(nchunks, nseg)
    return triton.cdiv(nchunks, chunks_per_seg), chunks_per_seg * per_chunk


def _keep_mask(seq_idx):
    """(batch, seqlen) fp32: 1.0 where token t continues the document of token t - 1 (and at t = 0), 0.0 where a
    new document starts; what the kernels multiply the decay by. None without seq_idx."""
    if seq_idx is None:
        return None
    keep = torch.ones(seq_idx.shape, device=seq_idx.device, dtype=torch.float32)
    keep[:, 1:] = (seq_idx[:, 1:] == seq_idx[:, :-1]).float()
    return keep


def _fwd_args(u, delta, A, B, C, D, z, delta_bias, keep):
    return (u, delta, A, B, C, D if D is not None else A, z if z is not None else u,
            delta_bias if delta_bias is not None else A, keep if keep is not None else A)


def _flags(D, z, delta_bias, keep, delta_softplus) -> dict:
    return dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_DTB=delta_bias is not None, SOFTPLUS=delta_softplus,
                HAS_SEQ=keep is not None)


def forward_tiles(d_inner: int, d_state: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_D, BLOCK_N, num_warps) the forward launches with at this width."""
    return _tiles(d_inner, d_state, TUNING["fwd"], TUNING["fwd"]["BLOCK_T"])


def backward_tiles(d_inner: int, d_state: int, block_t: int) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_N, num_warps) the backward launches with; its time blocks are the forward's block_t."""
    _, block_d, block_n, warps = _tiles(d_inner, d_state, TUNING["bwd"], block_t)
    while block_d > 1 and block_t * block_d * block_n > MAX_PER_THREAD * 32 * warps:
        block_d //= 2
    return block_d, block_n, warps


def _forward(u, delta, A, B, C, D, z, delta_bias, keep, h0, delta_softplus, save, chunk_size, split_programs):
    batch, seqlen, d_inner = u.shape
    d_state = A.shape[-1]
    block_t, block_d, block_n, warps = forward_tiles(d_inner, d_state)
    nblocks = triton.cdiv(seqlen, block_t)
    per_chunk = max(1, int(chunk_size) // block_t)  # blocks between saved states
    nchunks = triton.cdiv(nblocks, per_chunk)
    n_dblocks = triton.cdiv(d_inner, block_d)
    nseg, per_seg = _segments(n_dblocks * batch, nchunks, per_chunk, split_programs)
    f32 = dict(device=u.device, dtype=torch.float32)
    y = torch.empty_like(u)  # (batch, seqlen, d_inner)
    hT = torch.empty(batch, d_inner, d_state, **f32)
    hs = (torch.empty(batch, nchunks, d_inner, d_state, **f32) if save
          else hT)  # (batch, nchunks, d_inner, d_state): the state entering each chunk
    args = _fwd_args(u, delta, A, B, C, D, z, delta_bias, keep)
    flags = _flags(D, z, delta_bias, keep, delta_softplus)
    tiles = dict(BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_N=block_n, num_warps=warps)
    h_in = h0  # (n_seg, batch, d_inner, d_state) states entering the segments; one segment: the initial state
    if nseg > 1:
        ends, decays = (torch.empty(nseg, batch, d_inner, d_state, **f32) for _ in range(2))
        _selective_scan_fwd_kernel[(n_dblocks, batch, nseg - 1)](
            *args, hT, y, ends, hT, decays, seqlen, d_inner, d_state, nblocks, per_chunk, nchunks, per_seg,
            **flags, HAS_H0=False, SAVE=False, SUMMARY=True, **tiles)
        h_in = torch.empty_like(ends)
        if h0 is None:
            h_in[0].zero_()
        else:
            h_in[0].copy_(h0)
        for k in range(1, nseg):
            torch.addcmul(ends[k - 1], decays[k - 1], h_in[k - 1], out=h_in[k])
    _selective_scan_fwd_kernel[(n_dblocks, batch, nseg)](
        *args, h_in if h_in is not None else hT, y, hT, hs, hT, seqlen, d_inner, d_state, nblocks, per_chunk,
        nchunks, per_seg, **flags, HAS_H0=h_in is not None, SAVE=save, SUMMARY=False, **tiles)
    return y, hT, hs, (block_t, per_chunk)


def _adjoints_in(args, dy, dhT, nseg, per_seg, shape, flags, tiles, nblocks):
    """(n_seg, batch, d_inner, d_state): the carry m entering each segment from its right (the last one's is
    dhT, or 0), from each later segment's own adjoint summary carried leftwards."""
    u, delta, A, B, C, D, z, delta_bias, keep = args
    batch, seqlen, d_inner, d_state = shape
    f32 = dict(device=u.device, dtype=torch.float32)
    r, q = (torch.empty(nseg, batch, d_inner, d_state, **f32) for _ in range(2))
    _selective_scan_adjoint_kernel[(triton.cdiv(d_inner, tiles["BLOCK_D"]), batch, nseg - 1)](
        delta, A, C, z if z is not None else u, delta_bias if delta_bias is not None else A,
        keep if keep is not None else u, dy, r, q, seqlen, d_inner, d_state, nblocks, per_seg,
        HAS_Z=flags["HAS_Z"], HAS_DTB=flags["HAS_DTB"], SOFTPLUS=flags["SOFTPLUS"], HAS_SEQ=flags["HAS_SEQ"],
        **tiles)
    k_in = torch.empty_like(r)
    if dhT is None:
        k_in[-1].zero_()
    else:
        k_in[-1].copy_(dhT)
    for k in range(nseg - 1, 0, -1):
        torch.addcmul(r[k], q[k], k_in[k], out=k_in[k - 1])
    return k_in


def _backward(u, delta, A, B, C, D, z, delta_bias, keep, hs, blocking, dy, dhT, delta_softplus,
              split_programs):
    batch, seqlen, d_inner = u.shape
    d_state = A.shape[-1]
    block_t, per_chunk = blocking
    block_d, block_n, warps = backward_tiles(d_inner, d_state, block_t)
    nblocks = triton.cdiv(seqlen, block_t)
    nchunks = hs.shape[1]
    n_dblocks = triton.cdiv(d_inner, block_d)
    nseg, per_seg = _segments(n_dblocks * batch, nchunks, per_chunk, split_programs)
    f32 = dict(device=u.device, dtype=torch.float32)
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)  # (batch, seqlen, d_inner)
    dz = torch.empty_like(z) if z is not None else None
    if ATOMIC_DBC:
        dB, dC = torch.zeros(batch, seqlen, d_state, **f32), torch.zeros(batch, seqlen, d_state, **f32)
    else:  # (batch, n_dblocks, seqlen, d_state) partial sums over each block of channels
        dB, dC = (torch.empty(batch, n_dblocks, seqlen, d_state, **f32) for _ in range(2))
    dA = torch.zeros(d_inner, d_state, **f32)
    dD = torch.zeros(d_inner, **f32)
    ddtb = torch.zeros(d_inner, **f32)
    dh0 = torch.empty(batch, d_inner, d_state, **f32)
    args = _fwd_args(u, delta, A, B, C, D, z, delta_bias, keep)
    flags = _flags(D, z, delta_bias, keep, delta_softplus)
    tiles = dict(BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_N=block_n, num_warps=warps)
    k_in = dhT
    if nseg > 1:
        k_in = _adjoints_in((u, delta, A, B, C, D, z, delta_bias, keep), dy, dhT, nseg, per_seg,
                            (batch, seqlen, d_inner, d_state), flags, tiles, nblocks)
    scratch = torch.empty(nseg, batch, n_dblocks, per_chunk, block_n, block_d, **f32)  # block starts of a chunk
    _selective_scan_bwd_kernel[(n_dblocks, batch, nseg)](
        *args, hs, dy, k_in if k_in is not None else dh0, du, ddelta, dz if dz is not None else du, dB, dC, dA,
        dD, ddtb, dh0, scratch, seqlen, d_inner, d_state, nblocks, per_chunk, nchunks, n_dblocks,
        per_seg // per_chunk, **flags, HAS_DHT=k_in is not None, ATOMIC=ATOMIC_DBC, **tiles)
    if not ATOMIC_DBC:
        dB, dC = dB.sum(1), dC.sum(1)
    return du, ddelta, dz, dB, dC, dA, dD, ddtb, dh0


def _shape_class(u, A, keep, flag: bool) -> tuple:
    """What decides the fastest setting: batch, channels, states, the seqlen's power of two, dtype, documents."""
    batch, seqlen, d_inner = u.shape
    return (batch, d_inner, A.shape[-1], seqlen.bit_length(), str(u.dtype), keep is not None, flag)


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, delta_softplus, save, chunk_size):
        keep = _keep_mask(seq_idx)
        key = _shape_class(u, A, keep, save)
        y, hT, hs, blocking = tuning.pick(
            "selective_scan_fwd", key, SPLIT_CANDIDATES,
            lambda split: _forward(u, delta, A, B, C, D, z, delta_bias, keep, initial_state, delta_softplus, save,
                                   chunk_size, split), SPLIT_PROGRAMS, u.device)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, keep, hs)
        ctx.blocking, ctx.softplus = blocking, delta_softplus
        ctx.dtypes = (A.dtype, B.dtype, C.dtype, None if D is None else D.dtype,
                      None if delta_bias is None else delta_bias.dtype,
                      None if initial_state is None else initial_state.dtype)
        ctx.set_materialize_grads(False)
        return y, hT

    @staticmethod
    def backward(ctx, dy, dhT):
        u, delta, A, B, C, D, z, delta_bias, keep, hs = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(u)
        dhT = dhT.float().contiguous() if dhT is not None else None
        dy = dy.contiguous()
        du, ddelta, dz, dB, dC, dA, dD, ddtb, dh0 = tuning.pick(
            "selective_scan_bwd", _shape_class(u, A, keep, dhT is not None), SPLIT_CANDIDATES,
            lambda split: _backward(u, delta, A, B, C, D, z, delta_bias, keep, hs, ctx.blocking, dy, dhT,
                                    ctx.softplus, split), SPLIT_PROGRAMS, u.device)
        tA, tB, tC, tD, tdtb, th0 = ctx.dtypes
        return (du, ddelta, dA.to(tA), dB.to(tB), dC.to(tC), None if D is None else dD.to(tD), dz,
                None if delta_bias is None else ddtb.to(tdtb), None if th0 is None else dh0.to(th0), None, None, None, None)


def _check(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx):
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, seqlen, d_inner), got shape {tuple(u.shape)}")
    batch, seqlen, d_inner = u.shape
    if A.dim() != 2 or A.shape[0] != d_inner:
        raise ValueError(f"selective_scan: A must be (d_inner={d_inner}, d_state), got {tuple(A.shape)}")
    d_state = A.shape[1]
    want = {"delta": (delta, (batch, seqlen, d_inner)), "B": (B, (batch, seqlen, d_state)),
            "C": (C, (batch, seqlen, d_state)), "D": (D, (d_inner,)), "z": (z, (batch, seqlen, d_inner)),
            "delta_bias": (delta_bias, (d_inner,)), "initial_state": (initial_state, (batch, d_inner, d_state)),
            "seq_idx": (seq_idx, (batch, seqlen))}
    for name, (t, shape) in want.items():
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"selective_scan: {name} must have shape {shape}, got {tuple(t.shape)}")
        if t.device != u.device:
            raise ValueError(f"selective_scan: {name} is on {t.device}, u on {u.device}")
        if name == "seq_idx":
            if t.dtype.is_floating_point or t.dtype == torch.bool:
                raise ValueError(f"selective_scan: seq_idx must be an integer tensor, got {t.dtype}")
        elif not t.dtype.is_floating_point:
            raise ValueError(f"selective_scan: {name} must be floating point, got {t.dtype}")
    for name, t in (("u", u), ("A", A)):
        if not t.dtype.is_floating_point:
            raise ValueError(f"selective_scan: {name} must be floating point, got {t.dtype}")


def selective_scan(u, delta, A, B, C, *, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, seq_idx=None, return_final_state=False, chunk_size=64):
    """Selective scan with Triton kernels; same contract as `reference.selective_scan`.

    u, delta, z: (batch, seqlen, d_inner); A: (d_inner, d_state) negative; B, C: (batch, seqlen, d_state);
    D, delta_bias: (d_inner,); initial_state: (batch, d_inner, d_state); seq_idx: (batch, seqlen) document ids.
    Returns y (batch, seqlen, d_inner) in u.dtype, and with return_final_state also the final state
    (batch, d_inner, d_state) fp32, both differentiable. chunk_size: steps between the states saved for the
    backward (rounded down to a multiple of the time block, TUNING["fwd"]["BLOCK_T"]); it trades that memory,
    batch * seqlen / chunk_size * d_inner * d_state * 4 bytes, against a replay of each chunk in the backward.
    fp64 inputs run the reference (Triton computes in fp32).
    """
    _check(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"selective_scan: chunk_size must be a positive int, got {chunk_size!r}")
    if u.dtype == torch.float64:
        return ref.selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                  delta_softplus=delta_softplus, initial_state=initial_state, seq_idx=seq_idx,
                                  return_final_state=return_final_state, chunk_size=chunk_size)
    if delta.dtype == torch.float64 or z is not None and z.dtype == torch.float64:
        raise ValueError("selective_scan: delta and z must not be fp64 unless u is")
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    c = lambda t: None if t is None else t.contiguous()
    y, hT = _SelectiveScan.apply(c(u), c(delta), c(A), c(B), c(C), c(D), c(z), c(delta_bias), c(initial_state),
                                 c(seq_idx), bool(delta_softplus), save, chunk_size)
    return (y, hT) if return_final_state else y
