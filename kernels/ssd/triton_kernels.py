"""Triton kernels of the chunked SSD scan (forward and backward); `triton_scan.py` wires them together.

Notation per (batch, chunk c, head h), T = chunk length, positions i, j inside the chunk:
    cum_i = a_0 + .. + a_i with a_t = dt_t * A_h (a plain prefix sum, no reset sentinel)
    L_ij  = exp(cum_i - cum_j) if j <= i and i, j are in the same document, else 0
    y_i   = sum_j (C_i . B_j) L_ij dt_j x_j + exp(cum_i) [i in the document of the entering state] C_i . H_prev
    S_c   = sum_j exp(cum_last - cum_j) [j in the document of the chunk's last token] dt_j x_j B_j^T
Document boundaries are masks on equal (canonical) document ids, never a large negative in the prefix sum, so
the fp32 difference cum_i - cum_j never loses digits to a -1e4 sentinel.

Every program owns whole headdim (P) and d_state (N) rows: P, N <= 256 fit a tile. Chunk tiles of BT x BT
are visited flash-attention style, so a T x T score matrix is never whole in registers. Operands of tl.dot
are cast to the input dtype (bf16/fp16 tensor cores; fp32 inputs use IEEE fp32 dots); accumulation is fp32.
(Under TRITON_INTERPRET half-precision operands are rounded as on the GPU, then multiplied in fp32.)
All tensors are contiguous: x, dy, dx (batch, seqlen, nheads, headdim); B, C (batch, seqlen, ngroups, d_state);
dt, cum (batch, nchunks * T, nheads) fp32, zero-padded past seqlen; seq (batch, seqlen) int32 canonical ids;
chunk states (batch, nchunks, nheads, headdim, d_state), stored in bf16 for bf16 inputs (every consumer
rounds them to bf16 for tl.dot anyway), else fp32; running sums over chunks are fp32 in registers.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:  # fp32 inputs; also bf16/fp16 under the CPU interpreter, whose half-precision dot is wrong
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _chunk_ends(seq_ptr, t0, T, L):
    # seq_ptr points at this batch row
    # document id of the token before the chunk (the entering state's document; token 0's for the first chunk)
    # and of the chunk's last real token
    seq_prev = tl.load(seq_ptr + tl.maximum(t0 - 1, 0))
    seq_last = tl.load(seq_ptr + tl.minimum(t0 + T, L) - 1)
    return seq_prev, seq_last


@triton.jit
def chunk_state_kernel(X, Y, cum_ptr, dt_ptr, seq_ptr, out_ptr, L, H, P, N, G, nc, T,
                       TO_END: tl.constexpr, HAS_SEQ: tl.constexpr, IEEE: tl.constexpr,
                       BT: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    """out[b, c, h] (P, N) = sum_t w_t X_t^T Y_t over the chunk's tokens.
    TO_END (chunk end state): X = x, Y = B, w_t = dt_t exp(cum_last - cum_t) [t in the last token's document].
    else (gradient of the entering state): X = dy, Y = C, w_t = exp(cum_t) [t in the entering state's document]."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    c = pid // H
    h = pid % H
    g = h // (H // G)
    t0 = c * T
    Lp = nc * T
    # per-row base pointers (64-bit scalars); element offsets below stay 32-bit
    X += b * L * H * P
    Y += b * L * G * N
    cum_ptr += b * Lp * H
    dt_ptr += b * Lp * H
    seq_ptr += b * L
    offs_p = tl.arange(0, BP)
    offs_n = tl.arange(0, BN)
    cum_last = tl.load(cum_ptr + (t0 + T - 1) * H + h)
    if HAS_SEQ:
        seq_prev, seq_last = _chunk_ends(seq_ptr, t0, T, L)
    acc = tl.zeros((BP, BN), dtype=tl.float32)
    for k in range(0, T, BT):
        t = t0 + k + tl.arange(0, BT)
        valid = t < L
        cum_t = tl.load(cum_ptr + (t) * H + h)
        if TO_END:
            logw = cum_last - cum_t
        else:
            logw = cum_t
        if HAS_SEQ:
            s = tl.load(seq_ptr + t, mask=valid, other=-1)
            if TO_END:
                logw = tl.where(s == seq_last, logw, float("-inf"))
            else:
                logw = tl.where(s == seq_prev, logw, float("-inf"))
        w = tl.exp(logw)
        if TO_END:
            w = w * tl.load(dt_ptr + (t) * H + h)
        xt = tl.load(X + ((t[None, :]) * H + h) * P + offs_p[:, None],
                     mask=valid[None, :] & (offs_p[:, None] < P), other=0.0)  # (BP, BT)
        yt = tl.load(Y + ((t[:, None]) * G + g) * N + offs_n[None, :],
                     mask=valid[:, None] & (offs_n[None, :] < N), other=0.0)  # (BT, BN)
        xw = (xt.to(tl.float32) * w[None, :]).to(yt.dtype)
        acc += _dot(xw, yt, IEEE)
    out = out_ptr + ((b * nc + c) * H + h) * P * N + offs_p[:, None] * N + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(offs_p[:, None] < P) & (offs_n[None, :] < N))


@triton.jit
def carry_fwd_kernel(st_ptr, decay_ptr, h0_ptr, final_ptr, prev_ptr, H, PN, nc,
                     HAS_H0: tl.constexpr, BLK: tl.constexpr):
    """Chunk end states from own inputs (st) -> states entering each chunk (prev); writes the final state.
    H_c = decay_c H_{c-1} + S_c, decay_c = exp(chunk's log-decay sum), 0 when a document starts in chunk c.
    Each program carries BLK of the PN = headdim * d_state entries of one (batch, head) state through every
    chunk. The running state is fp32 in registers; st/prev may be stored in bf16 (their consumers round to bf16)."""
    bh = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLK + tl.arange(0, BLK)
    m = offs < PN
    b = bh // H
    h = bh % H
    if HAS_H0:
        state = tl.load(h0_ptr + bh * PN + offs, mask=m, other=0.0)
    else:
        state = tl.zeros((BLK,), dtype=tl.float32)
    for c in range(nc):
        sc = ((b * nc + c) * H + h) * PN
        s = tl.load(st_ptr + sc + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(prev_ptr + sc + offs, state.to(prev_ptr.dtype.element_ty), mask=m)
        state = tl.load(decay_ptr + (b * nc + c) * H + h) * state + s
    tl.store(final_ptr + bh * PN + offs, state, mask=m)


@triton.jit
def carry_bwd_kernel(dprev_ptr, prev_ptr, decay_ptr, dfinal_ptr, dh0_ptr, ddec_ptr, dst_ptr, H, PN, nc, nblk,
                     HAS_DFINAL: tl.constexpr, BLK: tl.constexpr):
    """Reverse of carry_fwd_kernel: from dprev (d(loss)/d(entering state) through each chunk's outputs) to
    dst (d(loss)/d(state after chunk c)), dh0, and per-block partials of d(loss)/d(decay_c) = sum(dH_c H_{c-1})
    in ddec (batch, nchunks, nheads, nblk)."""
    bh = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    offs = blk * BLK + tl.arange(0, BLK)
    m = offs < PN
    b = bh // H
    h = bh % H
    if HAS_DFINAL:
        dstate = tl.load(dfinal_ptr + bh * PN + offs, mask=m, other=0.0)
    else:
        dstate = tl.zeros((BLK,), dtype=tl.float32)
    for cc in range(nc):
        c = nc - 1 - cc
        sc = ((b * nc + c) * H + h) * PN
        dp = tl.load(dprev_ptr + sc + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(dst_ptr + sc + offs, dstate.to(dst_ptr.dtype.element_ty), mask=m)
        prev = tl.load(prev_ptr + sc + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(ddec_ptr + ((b * nc + c) * H + h) * nblk + blk, tl.sum(dstate * prev, axis=0))
        dstate = tl.load(decay_ptr + (b * nc + c) * H + h) * dstate + dp
    tl.store(dh0_ptr + bh * PN + offs, dstate, mask=m)


@triton.jit
def _decay(cum_r, cum_c, t_r, t_c, seq_r, seq_c, HAS_SEQ: tl.constexpr):
    # L[r, c] = exp(cum_r - cum_c) for token t_c <= t_r of the same document, else 0
    keep = t_c[None, :] <= t_r[:, None]
    if HAS_SEQ:
        keep = keep & (seq_c[None, :] == seq_r[:, None])
    return tl.exp(tl.where(keep, cum_r[:, None] - cum_c[None, :], float("-inf")))


@triton.jit
def _dt_of(raw, lo, hi, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr):
    """dt from the raw input (+ bias already added): softplus (linear above 20, as torch), then the clamp."""
    dt = raw
    if SOFTPLUS:
        dt = tl.where(raw <= 20.0, tl.log(1.0 + tl.exp(raw)), raw)
    if HAS_LIMIT:
        dt = tl.minimum(tl.maximum(dt, lo), hi)
    return dt


@triton.jit
def _raw_dt(dt_ptr, bias_ptr, b, pos, hs, m, mh, s_db, s_dl, HAS_BIAS: tl.constexpr):
    """The raw dt + bias tile at positions pos, heads hs (m: the tile's mask, mh: the heads'): fp32."""
    raw = tl.load(dt_ptr + b * s_db + pos[:, None] * s_dl + hs[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(bias_ptr + hs, mask=mh, other=0.0).to(tl.float32)[None, :]
    return raw


@triton.jit
def _a_of(A_ptr, hs, mh, A_IS_LOG: tl.constexpr):
    a = tl.load(A_ptr + hs, mask=mh, other=0.0).to(tl.float32)
    if A_IS_LOG:  # the model's parameter A_log as it is: A = -exp(A_log)
        a = -tl.exp(a)
    return a


@triton.jit
def log_decays_kernel(dt_ptr, bias_ptr, A_ptr, seq_ptr, dtp_ptr, cum_ptr, decay_ptr, L, H, nc, T, s_db, s_dl, lo, hi,
                      HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
                      A_IS_LOG: tl.constexpr, HAS_SEQ: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr):
    """Per (chunk, head block, row), from the raw dt (batch, seqlen, nheads; any row strides, unit head stride):
    dt = clamp(softplus(raw + bias)) zero-padded to whole chunks (dtp) and the prefix sums cum of dt * A inside
    the chunk (both (batch, nchunks * T, nheads) fp32), and the chunk's decay exp(cum_last) (batch, nchunks,
    nheads), 0 when a document starts inside the chunk or at its first token."""
    c = tl.program_id(0)
    hb = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    t = tl.arange(0, BT)
    hs = hb * BH + tl.arange(0, BH)
    mh = hs < H
    pos = c * T + t
    mt = (pos < L)[:, None] & mh[None, :]
    raw = _raw_dt(dt_ptr, bias_ptr, b, pos, hs, mt, mh, s_db, s_dl, HAS_BIAS)
    dt = tl.where(mt, _dt_of(raw, lo, hi, SOFTPLUS, HAS_LIMIT), 0.0)
    cum = tl.cumsum(dt * _a_of(A_ptr, hs, mh, A_IS_LOG)[None, :], axis=0)
    offs = (b * nc * T + pos[:, None]) * H + hs[None, :]
    m = (t < T)[:, None] & mh[None, :]
    tl.store(dtp_ptr + offs, dt, mask=m)
    tl.store(cum_ptr + offs, cum, mask=m)
    decay = tl.exp(tl.sum(tl.where((t == T - 1)[:, None], cum, 0.0), axis=0))
    if HAS_SEQ:  # the chunk's last token and the token before the chunk (the first, for chunk 0) share a document
        last = tl.load(seq_ptr + b * L + tl.minimum(c * T + T, L) - 1)
        before = tl.load(seq_ptr + b * L + tl.maximum(c * T - 1, 0))
        decay = tl.where(last == before, decay, 0.0)
    tl.store(decay_ptr + (b * nc + c) * H + hs, decay, mask=mh)


@triton.jit
def dlog_decays_kernel(dcr_ptr, dcc_ptr, dce_ptr, dcp_ptr, uend_ptr, ddec_ptr, decay_ptr, ddt_ptr, dtp_ptr, dt_ptr,
                       bias_ptr, A_ptr, ddt_out_ptr, dA_ptr, dbias_ptr, L, H, nc, T, nbt, nbt_end, nblk, s_db, s_dl,
                       lo, hi, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
                       A_IS_LOG: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr):
    """The log-decay gradient of one (chunk, head block, row), gathered from the backward kernels' pieces and
    taken back to the raw dt, its bias and A: dcum_t = sum over tiles of the row and column terms (dcr, dcc:
    (batch, nchunks, nbt, nheads, T)) + the end-state and entering-state terms (dce, dcp: (batch, nchunks * T,
    nheads)), plus at the chunk's last token the end-state sums (uend (batch, nchunks, nbt_end, nheads)) and the
    chunk decay's (sum of ddec (batch, nchunks, nheads, nblk)) * decay. da = the suffix sum of dcum inside the
    chunk (= d loss / d(dt * A)); the gradient of dt is ddt + da * A (ddt, dtp: (batch, nchunks * T, nheads)),
    taken through the clamp and softplus to the raw dt: ddt_out (batch, seqlen, nheads) in the raw dt's dtype.
    Per chunk partial sums: of dA (sum_t da_t dt_t, times A for A_log) and of the bias gradient, both
    (batch, nchunks, nheads)."""
    c = tl.program_id(0)
    hb = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    t = BT - 1 - tl.arange(0, BT)  # walk the chunk backwards: a prefix sum over reversed positions is the suffix sum
    hs = hb * BH + tl.arange(0, BH)
    mh = hs < H
    m = (t < T)[:, None] & mh[None, :]
    offs = (b * nc * T + c * T + t[:, None]) * H + hs[None, :]
    dcum = tl.load(dce_ptr + offs, mask=m, other=0.0) + tl.load(dcp_ptr + offs, mask=m, other=0.0)
    for i in range(nbt):
        tile = (((b * nc + c) * nbt + i) * H + hs[None, :]) * T + t[:, None]
        dcum += tl.load(dcr_ptr + tile, mask=m, other=0.0) + tl.load(dcc_ptr + tile, mask=m, other=0.0)
    end = tl.zeros((BH,), tl.float32)
    for i in range(nbt_end):
        end += tl.load(uend_ptr + ((b * nc + c) * nbt_end + i) * H + hs, mask=mh, other=0.0)
    dd = tl.zeros((BH,), tl.float32)
    for j in range(nblk):
        dd += tl.load(ddec_ptr + ((b * nc + c) * H + hs) * nblk + j, mask=mh, other=0.0)
    end += dd * tl.load(decay_ptr + (b * nc + c) * H + hs, mask=mh, other=0.0)
    dcum += tl.where((t == T - 1)[:, None], end[None, :], 0.0)
    da = tl.cumsum(dcum, axis=0)
    pos = c * T + t
    mt = (pos < L)[:, None] & mh[None, :]
    A = _a_of(A_ptr, hs, mh, A_IS_LOG)
    g = tl.load(ddt_ptr + offs, mask=mt, other=0.0) + da * A[None, :]  # d loss / d dt
    dA = tl.sum(da * tl.load(dtp_ptr + offs, mask=mt, other=0.0), axis=0)
    if A_IS_LOG:  # d A / d A_log = A
        dA = dA * A
    tl.store(dA_ptr + (b * nc + c) * H + hs, dA, mask=mh)
    raw = _raw_dt(dt_ptr, bias_ptr, b, pos, hs, mt, mh, s_db, s_dl, HAS_BIAS)
    if HAS_LIMIT:  # torch's clamp passes the gradient where lo <= x <= hi
        sp = _dt_of(raw, lo, hi, SOFTPLUS, False)
        g = tl.where((sp >= lo) & (sp <= hi), g, 0.0)
    if SOFTPLUS:  # softplus' = sigmoid, 1 where softplus is linear (above 20)
        g = tl.where(raw <= 20.0, g * tl.sigmoid(raw), g)
    g = tl.where(mt, g, 0.0)
    tl.store(ddt_out_ptr + (b * L + pos[:, None]) * H + hs[None, :], g.to(ddt_out_ptr.dtype.element_ty), mask=mt)
    if HAS_BIAS:
        tl.store(dbias_ptr + (b * nc + c) * H + hs, tl.sum(g, axis=0), mask=mh)
