"""Triton kernels of the SSD scan that work per (chunk, group) on C B^T-shaped tiles, for the output and the
backward. Notation and layouts as in `triton_kernels.py`; in addition, per (batch, chunk, group) T x T
fp32 matrices are stored as (batch, nchunks, ngroups, T, T):
    CB[i, j]  = C_i . B_j                                (computed once per group, read by every head)
    dSL[i, j] = sum over the group's heads of (dy_i . dt_j x_j) L_ij    (the gradient of C_i . B_j)
so dB and dC need one T x T x N product per group instead of one per head.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_kernels import _chunk_ends, _decay, _dot


@triton.jit
def _decay_t(cum_r, cum_c, t_r, t_c, seq_r, seq_c, HAS_SEQ: tl.constexpr):
    # transposed decay: out[c, r] = L[r, c] = exp(cum_r - cum_c) for t_c <= t_r in the same document
    keep = t_c[:, None] <= t_r[None, :]
    if HAS_SEQ:
        keep = keep & (seq_c[:, None] == seq_r[None, :])
    return tl.exp(tl.where(keep, cum_r[None, :] - cum_c[:, None], float("-inf")))


@triton.jit
def cb_kernel(B_ptr, C_ptr, cb_ptr, L, N, G, nc, T, nbt,
              IEEE: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr):
    """CB[b, c, g] tiles (i block, j block) with j block <= i block; tiles above are never read."""
    cg = tl.program_id(0)
    ib = tl.program_id(1) // nbt
    jb = tl.program_id(1) % nbt
    b = tl.program_id(2).to(tl.int64)
    if jb <= ib:
        c = cg // G
        g = cg % G
        t0 = c * T
        B_ptr += b * L * G * N
        C_ptr += b * L * G * N
        r = tl.arange(0, BT)
        offs_n = tl.arange(0, BN)
        mn = offs_n < N
        ti = t0 + ib * BT + r
        tj = t0 + jb * BT + r
        Ci = tl.load(C_ptr + ((ti[:, None]) * G + g) * N + offs_n[None, :],
                     mask=(ti[:, None] < L) & mn[None, :], other=0.0)  # (BT, BN)
        BjT = tl.load(B_ptr + ((tj[None, :]) * G + g) * N + offs_n[:, None],
                      mask=(tj[None, :] < L) & mn[:, None], other=0.0)  # (BN, BT)
        cb = _dot(Ci, BjT, IEEE)
        base = ((b * nc + c) * G + g) * T * T
        tl.store(cb_ptr + base + (ib * BT + r)[:, None] * T + (jb * BT + r)[None, :], cb.to(cb_ptr.dtype.element_ty))


@triton.jit
def chunk_out_kernel(x_ptr, dt_ptr, cum_ptr, cb_ptr, C_ptr, prev_ptr, D_ptr, seq_ptr, y_ptr,
                     L, H, P, N, G, nc, T,
                     HAS_D: tl.constexpr, HAS_SEQ: tl.constexpr, IEEE: tl.constexpr,
                     BT: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    """y for BT rows i of one (batch, chunk, head): entering-state term + causal in-chunk term + D x."""
    pid = tl.program_id(0)
    ib = tl.num_programs(1) - 1 - tl.program_id(1)  # the longest rows launch first
    b = tl.program_id(2).to(tl.int64)
    c = pid // H
    h = pid % H
    g = h // (H // G)
    t0 = c * T
    Lp = nc * T
    # per-row base pointers (64-bit scalars); element offsets below stay 32-bit
    x_ptr += b * L * H * P
    y_ptr += b * L * H * P
    C_ptr += b * L * G * N
    cum_ptr += b * Lp * H
    dt_ptr += b * Lp * H
    seq_ptr += b * L
    r = tl.arange(0, BT)
    offs_p = tl.arange(0, BP)
    offs_n = tl.arange(0, BN)
    mp = offs_p < P
    mn = offs_n < N
    ti = t0 + ib * BT + r
    vi = ti < L
    cum_i = tl.load(cum_ptr + (ti) * H + h)
    Ci = tl.load(C_ptr + ((ti[:, None]) * G + g) * N + offs_n[None, :], mask=vi[:, None] & mn[None, :],
                 other=0.0)  # (BT, BN)
    DT = Ci.dtype
    seq_i = ti
    logp = cum_i
    if HAS_SEQ:
        seq_prev, seq_last = _chunk_ends(seq_ptr, t0, T, L)
        seq_i = tl.load(seq_ptr + ti, mask=vi, other=-1)
        logp = tl.where(seq_i == seq_prev, cum_i, float("-inf"))
    prevT = tl.load(prev_ptr + ((b * nc + c) * H + h) * P * N + offs_p[None, :] * N + offs_n[:, None],
                    mask=mn[:, None] & mp[None, :], other=0.0)  # (BN, BP)
    acc = _dot(Ci, prevT.to(DT), IEEE) * tl.exp(logp)[:, None]  # (BT, BP)
    cb_base = cb_ptr + ((b * nc + c) * G + g) * T * T + (ib * BT + r)[:, None] * T
    for k in range(0, (ib + 1) * BT, BT):
        tj = t0 + k + r
        vj = tj < L
        cum_j = tl.load(cum_ptr + (tj) * H + h)
        dt_j = tl.load(dt_ptr + (tj) * H + h)
        seq_j = tj
        if HAS_SEQ:
            seq_j = tl.load(seq_ptr + tj, mask=vj, other=-2)
        cb = tl.load(cb_base + (k + r)[None, :]).to(tl.float32)  # (BT, BT)
        xj = tl.load(x_ptr + ((tj[:, None]) * H + h) * P + offs_p[None, :],
                     mask=vj[:, None] & mp[None, :], other=0.0)  # (BT, BP)
        s = cb * _decay(cum_i, cum_j, ti, tj, seq_i, seq_j, HAS_SEQ) * dt_j[None, :]
        acc += _dot(s.to(DT), xj.to(DT), IEEE)
    if HAS_D:
        xi = tl.load(x_ptr + ((ti[:, None]) * H + h) * P + offs_p[None, :],
                     mask=vi[:, None] & mp[None, :], other=0.0)
        acc += tl.load(D_ptr + h * P + offs_p, mask=mp, other=0.0)[None, :] * xi.to(tl.float32)
    tl.store(y_ptr + ((ti[:, None]) * H + h) * P + offs_p[None, :], acc, mask=vi[:, None] & mp[None, :])


@triton.jit
def bwd_dsl_kernel(x_ptr, dt_ptr, cum_ptr, dy_ptr, seq_ptr, cb_ptr, dsl_ptr, dcr_ptr, dcc_ptr,
                   L, H, P, G, nc, T, nbt, nsl,
                   HAS_SEQ: tl.constexpr, IEEE: tl.constexpr, BT: tl.constexpr, BP: tl.constexpr):
    """For one (i block, j block <= i block) tile of a (batch, chunk, group), looping over one of nsl equal
    shares of the group's heads: that share's part of dSL (dsl: (nsl, batch, nchunks, ngroups, T, T), summed by
    its reader) and each head's log-decay gradient from the tile, rows -> dcr[.., slot j block, head],
    columns -> dcc[.., slot i block, head], both (batch, nchunks, nbt, nheads, T) so each head's stores are
    contiguous."""
    pid = tl.program_id(0)
    ib = tl.program_id(1) // nbt
    jb = tl.program_id(1) % nbt
    b = tl.program_id(2).to(tl.int64)
    if jb <= ib:
        cg = pid // nsl
        share = pid % nsl
        c = cg // G
        g = cg % G
        hps = H // G // nsl
        t0 = c * T
        Lp = nc * T
        # per-row base pointers (64-bit scalars); element offsets below stay 32-bit
        x_ptr += b * L * H * P
        dy_ptr += b * L * H * P
        cum_ptr += b * Lp * H
        dt_ptr += b * Lp * H
        seq_ptr += b * L
        r = tl.arange(0, BT)
        offs_p = tl.arange(0, BP)
        mp = offs_p < P
        ti = t0 + ib * BT + r
        tj = t0 + jb * BT + r
        vi = ti < L
        vj = tj < L
        seq_i = ti
        seq_j = tj
        if HAS_SEQ:
            seq_i = tl.load(seq_ptr + ti, mask=vi, other=-1)
            seq_j = tl.load(seq_ptr + tj, mask=vj, other=-2)
        base = ((b * nc + c) * G + g) * T * T
        tile = (ib * BT + r)[:, None] * T + (jb * BT + r)[None, :]
        cb = tl.load(cb_ptr + base + tile).to(tl.float32)  # (BT, BT)
        acc = tl.zeros((BT, BT), dtype=tl.float32)
        dcr_base = dcr_ptr + ((b * nc + c) * nbt + jb) * H * T + ib * BT + r
        dcc_base = dcc_ptr + ((b * nc + c) * nbt + ib) * H * T + jb * BT + r
        for hh in range(hps):
            h = (g * nsl + share) * hps + hh
            cum_i = tl.load(cum_ptr + (ti) * H + h)
            cum_j = tl.load(cum_ptr + (tj) * H + h)
            dt_j = tl.load(dt_ptr + (tj) * H + h)
            dyi = tl.load(dy_ptr + ((ti[:, None]) * H + h) * P + offs_p[None, :],
                          mask=vi[:, None] & mp[None, :], other=0.0)  # (BT, BP)
            xjT = tl.load(x_ptr + ((tj[None, :]) * H + h) * P + offs_p[:, None],
                          mask=vj[None, :] & mp[:, None], other=0.0)  # (BP, BT)
            DT = xjT.dtype
            xdtT = (xjT.to(tl.float32) * dt_j[None, :]).to(DT)
            dsl = _dot(dyi.to(DT), xdtT, IEEE) * _decay(cum_i, cum_j, ti, tj, seq_i, seq_j, HAS_SEQ)
            acc += dsl
            w = dsl * cb
            tl.store(dcr_base + h * T, tl.sum(w, axis=1))
            tl.store(dcc_base + h * T, -tl.sum(w, axis=0))
        tl.store(dsl_ptr + share.to(tl.int64) * tl.num_programs(2) * nc * G * T * T + base + tile, acc)


@triton.jit
def bwd_dx_kernel(x_ptr, dt_ptr, cum_ptr, B_ptr, cb_ptr, dy_ptr, dst_ptr, D_ptr, seq_ptr,
                  dx_ptr, ddt_ptr, dce_ptr, uend_ptr, dD_ptr,
                  L, H, P, N, G, nc, T, nbt,
                  HAS_D: tl.constexpr, HAS_SEQ: tl.constexpr, IEEE: tl.constexpr,
                  BT: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    """For BT columns j of one (batch, chunk, head): dx_j, the direct part of ddt_j, the end-state part of the
    log-decay gradient (-u_j into dce, sum of u_j into uend for the chunk-end prefix sum) and partial dD."""
    pid = tl.program_id(0)
    jb = tl.program_id(1)  # the longest columns (first blocks) launch first
    b = tl.program_id(2).to(tl.int64)
    c = pid // H
    h = pid % H
    g = h // (H // G)
    t0 = c * T
    Lp = nc * T
    # per-row base pointers (64-bit scalars); element offsets below stay 32-bit
    x_ptr += b * L * H * P
    dy_ptr += b * L * H * P
    dx_ptr += b * L * H * P
    B_ptr += b * L * G * N
    cum_ptr += b * Lp * H
    dt_ptr += b * Lp * H
    ddt_ptr += b * Lp * H
    dce_ptr += b * Lp * H
    seq_ptr += b * L
    r = tl.arange(0, BT)
    offs_p = tl.arange(0, BP)
    offs_n = tl.arange(0, BN)
    mp = offs_p < P
    mn = offs_n < N
    tj = t0 + jb * BT + r
    vj = tj < L
    Bj = tl.load(B_ptr + ((tj[:, None]) * G + g) * N + offs_n[None, :], mask=vj[:, None] & mn[None, :],
                 other=0.0)  # (BT, BN)
    DT = Bj.dtype
    cum_j = tl.load(cum_ptr + (tj) * H + h)
    dt_j = tl.load(dt_ptr + (tj) * H + h)
    cum_last = tl.load(cum_ptr + (t0 + T - 1) * H + h)
    loge = cum_last - cum_j
    seq_j = tj
    if HAS_SEQ:
        seq_prev, seq_last = _chunk_ends(seq_ptr, t0, T, L)
        seq_j = tl.load(seq_ptr + tj, mask=vj, other=-2)
        loge = tl.where(seq_j == seq_last, loge, float("-inf"))
    xj = tl.load(x_ptr + ((tj[:, None]) * H + h) * P + offs_p[None, :],
                 mask=vj[:, None] & mp[None, :], other=0.0).to(tl.float32)  # (BT, BP)
    dHT = tl.load(dst_ptr + ((b * nc + c) * H + h) * P * N + offs_p[None, :] * N + offs_n[:, None],
                  mask=mn[:, None] & mp[None, :], other=0.0).to(DT)  # (BN, BP)
    dxdt = _dot(Bj, dHT, IEEE) * tl.exp(loge)[:, None]  # (BT, BP)
    u = tl.sum(dxdt * xj, axis=1) * dt_j
    cb_base = cb_ptr + ((b * nc + c) * G + g) * T * T + (jb * BT + r)[:, None]
    for k in range(jb * BT, T, BT):
        ti = t0 + k + r
        vi = ti < L
        cum_i = tl.load(cum_ptr + (ti) * H + h)
        seq_i = ti
        if HAS_SEQ:
            seq_i = tl.load(seq_ptr + ti, mask=vi, other=-1)
        cbt = tl.load(cb_base + (k + r)[None, :] * T).to(tl.float32)  # (BT j, BT i) = CB[i, j]^T
        dyi = tl.load(dy_ptr + ((ti[:, None]) * H + h) * P + offs_p[None, :],
                      mask=vi[:, None] & mp[None, :], other=0.0)  # (BT, BP)
        st = cbt * _decay_t(cum_i, cum_j, ti, tj, seq_i, seq_j, HAS_SEQ)
        dxdt += _dot(st.to(DT), dyi.to(DT), IEEE)
    dyj = tl.load(dy_ptr + ((tj[:, None]) * H + h) * P + offs_p[None, :],
                  mask=vj[:, None] & mp[None, :], other=0.0).to(tl.float32)
    dx = dxdt * dt_j[:, None]
    if HAS_D:
        dx += tl.load(D_ptr + h * P + offs_p, mask=mp, other=0.0)[None, :] * dyj
        tl.store(dD_ptr + (((b * nc + c) * nbt + jb) * H + h) * P + offs_p, tl.sum(dyj * xj, axis=0), mask=mp)
    tl.store(dx_ptr + ((tj[:, None]) * H + h) * P + offs_p[None, :], dx, mask=vj[:, None] & mp[None, :])
    tl.store(ddt_ptr + (tj) * H + h, tl.sum(dxdt * xj, axis=1))
    tl.store(dce_ptr + (tj) * H + h, -u)
    tl.store(uend_ptr + ((b * nc + c) * nbt + jb) * H + h, tl.sum(u, axis=0))


@triton.jit
def bwd_dbdc_kernel(x_ptr, dt_ptr, cum_ptr, B_ptr, C_ptr, dy_ptr, dst_ptr, prev_ptr, dsl_ptr, seq_ptr,
                    out_ptr, dcp_ptr, L, H, P, N, G, nc, T, nsplit, nsl,
                    IS_DB: tl.constexpr, HAS_SEQ: tl.constexpr, IEEE: tl.constexpr,
                    BT: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    """dB (IS_DB) or dC for BT rows t of one (batch, chunk, group), one partial per share of the group's heads
    (out: (nsplit, batch, seqlen, ngroups, d_state) fp32, summed by the caller).
    dB_t = sum_i dSL[i, t] C_i + sum_h exp(cum_last - cum_t) dt_t x_t^h dH^h     (share 0 adds the dSL part)
    dC_t = sum_j dSL[t, j] B_j + sum_h exp(cum_t) dy_t^h H_prev^h; for dC also the entering-state part of the
    log-decay gradient per head into dcp (batch, nchunks * T, nheads). dsl holds nsl partial sums (see
    bwd_dsl_kernel), added here."""
    pid = tl.program_id(0)
    tb = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    c = pid // (G * nsplit)
    g = (pid // nsplit) % G
    split = pid % nsplit
    hps = H // G // nsplit
    t0 = c * T
    Lp = nc * T
    # per-row base pointers (64-bit scalars); element offsets below stay 32-bit
    x_ptr += b * L * H * P
    dy_ptr += b * L * H * P
    B_ptr += b * L * G * N
    C_ptr += b * L * G * N
    out_ptr += b * L * G * N
    cum_ptr += b * Lp * H
    dt_ptr += b * Lp * H
    dcp_ptr += b * Lp * H
    seq_ptr += b * L
    r = tl.arange(0, BT)
    offs_p = tl.arange(0, BP)
    offs_n = tl.arange(0, BN)
    mp = offs_p < P
    mn = offs_n < N
    tt = t0 + tb * BT + r
    vt = tt < L
    if IS_DB:
        own_ptr = B_ptr
    else:
        own_ptr = C_ptr
    Y_own = tl.load(own_ptr + ((tt[:, None]) * G + g) * N + offs_n[None, :],
                    mask=vt[:, None] & mn[None, :], other=0.0)  # (BT, BN): B_t for dB, C_t for dC
    DT = Y_own.dtype
    seq_t = tt
    if HAS_SEQ:
        seq_prev, seq_last = _chunk_ends(seq_ptr, t0, T, L)
        seq_t = tl.load(seq_ptr + tt, mask=vt, other=-1)
    acc = tl.zeros((BT, BN), dtype=tl.float32)
    sl_base = dsl_ptr + ((b * nc + c) * G + g) * T * T
    sl_stride = tl.num_programs(2).to(tl.int64) * nc * G * T * T  # between partial sums, in elements
    if split == 0:
        if IS_DB:
            for k in range(tb * BT, T, BT):
                ti = t0 + k + r
                dslT = tl.zeros((BT, BT), dtype=tl.float32)
                for s in range(nsl):
                    dslT += tl.load(sl_base + s * sl_stride + (k + r)[None, :] * T + (tb * BT + r)[:, None])
                Ci = tl.load(C_ptr + ((ti[:, None]) * G + g) * N + offs_n[None, :],
                             mask=(ti[:, None] < L) & mn[None, :], other=0.0)
                acc += _dot(dslT.to(DT), Ci, IEEE)
        else:
            for k in range(0, (tb + 1) * BT, BT):
                tj = t0 + k + r
                dsl = tl.zeros((BT, BT), dtype=tl.float32)  # (BT t, BT j)
                for s in range(nsl):
                    dsl += tl.load(sl_base + s * sl_stride + (tb * BT + r)[:, None] * T + (k + r)[None, :])
                Bj = tl.load(B_ptr + ((tj[:, None]) * G + g) * N + offs_n[None, :],
                             mask=(tj[:, None] < L) & mn[None, :], other=0.0)
                acc += _dot(dsl.to(DT), Bj, IEEE)
    for hh in range(hps):
        h = (g * nsplit + split) * hps + hh
        cum_t = tl.load(cum_ptr + (tt) * H + h)
        sbase = ((b * nc + c) * H + h) * P * N
        if IS_DB:
            cum_last = tl.load(cum_ptr + (t0 + T - 1) * H + h)
            logw = cum_last - cum_t
            if HAS_SEQ:
                logw = tl.where(seq_t == seq_last, logw, float("-inf"))
            w = tl.exp(logw) * tl.load(dt_ptr + (tt) * H + h)
            xt = tl.load(x_ptr + ((tt[:, None]) * H + h) * P + offs_p[None, :],
                         mask=vt[:, None] & mp[None, :], other=0.0)
            dH = tl.load(dst_ptr + sbase + offs_p[:, None] * N + offs_n[None, :], mask=mp[:, None] & mn[None, :],
                         other=0.0)  # (BP, BN)
            acc += _dot((xt.to(tl.float32) * w[:, None]).to(DT), dH.to(DT), IEEE)
        else:
            logw = cum_t
            if HAS_SEQ:
                logw = tl.where(seq_t == seq_prev, logw, float("-inf"))
            w = tl.exp(logw)
            dyt = tl.load(dy_ptr + ((tt[:, None]) * H + h) * P + offs_p[None, :],
                          mask=vt[:, None] & mp[None, :], other=0.0).to(tl.float32)
            prev = tl.load(prev_ptr + sbase + offs_p[:, None] * N + offs_n[None, :],
                           mask=mp[:, None] & mn[None, :], other=0.0).to(DT)  # (BP, BN)
            acc += _dot((dyt * w[:, None]).to(DT), prev, IEEE)
            yprev = _dot(Y_own, tl.trans(prev), IEEE)  # (BT, BP): C_t . H_prev
            tl.store(dcp_ptr + (tt) * H + h, tl.sum(yprev * dyt, axis=1) * w)
    out_ptr += split.to(tl.int64) * tl.num_programs(2) * L * G * N
    tl.store(out_ptr + ((tt[:, None]) * G + g) * N + offs_n[None, :], acc, mask=vt[:, None] & mn[None, :])
