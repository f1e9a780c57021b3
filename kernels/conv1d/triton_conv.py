"""Triton causal depthwise conv1d for training: fused bias + SiLU forward, and a backward that recomputes the
pre-activation instead of saving it (semantics of `reference.causal_conv1d`).

Forward: one program owns a (BLOCK_L tokens x BLOCK_C channels) tile of one row; the width (2-4) taps are
`width` shifted, masked loads of the same x rows (they hit L1), so x is read from DRAM once and out written once.
Backward, two passes. Pass 1: one program owns CHUNK tokens x BLOCK_C channels of one row and walks them in
BLOCK_L tiles: it recomputes pre from x (never saved), writes dpre = dout * silu'(pre) to a buffer and sums
dweight/dbias in registers, written as per-program partials (summed in torch) or fp32 atomics (ATOMIC_DW).
Pass 2: dx[p] = sum_k w[k] * dpre[p + width-1-k] (same document only) from width shifted loads of dpre; the first
tile of each row also gives d initial_state. (v1 recomputed dpre at every shift in one kernel: width^2 masked 2D
loads per tile made it instruction-bound: 2.0 ms backward on H100 against 0.9 ms for the two passes.)
x may be a strided view (e.g. a channel slice of a bigger projection): only a unit channel stride is required,
otherwise it is made contiguous. seq_idx is made contiguous (it is small).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference as _ref

# Launch parameters per kernel (tile sizes, num_warps; CHUNK: tokens per pass-1 program), passed to the kernel as
# they are. H100 sweep (eval/bench_conv_norm.py --sweep, B=8 L=4096 C=3328 W=4 bf16): fwd 16x256 / 32x128 tiles
# 0.217 ms; bwd pass 1 with 32x64 tiles, 2 warps, CHUNK 128 best (1.13 ms fwd+bwd vs 1.48-2.2 for 4-warp 32x128).
TUNING = {
    "fwd": dict(BLOCK_L=16, BLOCK_C=256, num_warps=4),
    "bwd_dpre": dict(BLOCK_L=32, BLOCK_C=64, CHUNK=128, num_warps=2),  # pass 1: dpre, dweight, dbias
    "bwd_dx": dict(BLOCK_L=32, BLOCK_C=128, num_warps=4),  # pass 2: dx from dpre
}
DPRE_FP32 = True  # False: dpre kept in dout's dtype (bf16/fp16 halves its traffic; dx then sees its rounding)
ATOMIC_DW = False  # per-program partials + torch sum (deterministic, measured as fast); True: fp32 atomics


@triton.jit
def _x_at(x_ptr, init_ptr, b, pos, offs_c, mc, L, s_xb, s_xl, s_ib, s_ic, s_iw,
          HIST: tl.constexpr, HAS_INIT: tl.constexpr):
    """x at positions pos (BLOCK,) for channels offs_c, fp32 (BLOCK, BLOCK_C): initial_state before 0, 0 past L."""
    inside = (pos >= 0) & (pos < L)
    v = tl.load(x_ptr + b.to(tl.int64) * s_xb + pos[:, None] * s_xl + offs_c[None, :],
                mask=inside[:, None] & mc[None, :], other=0.0).to(tl.float32)
    if HAS_INIT:
        before = (pos < 0) & (pos + HIST >= 0)
        v += tl.load(init_ptr + b * s_ib + offs_c[None, :] * s_ic + (pos + HIST)[:, None] * s_iw,
                     mask=before[:, None] & mc[None, :], other=0.0).to(tl.float32)
    return v


@triton.jit
def _ids_at(seq_ptr, b, pos, L, s_sb):
    # document id at pos; positions before 0 (the initial state) belong to the row's first document
    return tl.load(seq_ptr + b * s_sb + tl.minimum(tl.maximum(pos, 0), L - 1))


@triton.jit
def _pre_at(x_ptr, init_ptr, w_ptr, b_ptr, seq_ptr, b, t, offs_c, mc, L, s_xb, s_xl, s_ib, s_ic, s_iw, s_wc, s_wk,
            s_sb, W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_INIT: tl.constexpr,
            BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    """Pre-activation bias + sum_k w[k] x[t - (W-1) + k] (other documents masked) at positions t: (BLOCK, BLOCK_C)."""
    acc = tl.zeros((BLOCK, BLOCK_C), dtype=tl.float32)
    if HAS_SEQ:
        id_t = _ids_at(seq_ptr, b, t, L, s_sb)
    for k in tl.static_range(W):
        pos = t - (W - 1) + k
        v = _x_at(x_ptr, init_ptr, b, pos, offs_c, mc, L, s_xb, s_xl, s_ib, s_ic, s_iw, W - 1, HAS_INIT)
        if HAS_SEQ:
            v = tl.where((_ids_at(seq_ptr, b, pos, L, s_sb) == id_t)[:, None], v, 0.0)
        wk = tl.load(w_ptr + offs_c * s_wc + k * s_wk, mask=mc, other=0.0).to(tl.float32)
        acc += v * wk[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_c, mask=mc, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _conv1d_fwd_kernel(x_ptr, w_ptr, b_ptr, seq_ptr, init_ptr, out_ptr, L, C,
                s_xb, s_xl, s_wc, s_wk, s_sb, s_ib, s_ic, s_iw, s_ob, s_ol,
                W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_INIT: tl.constexpr,
                SILU: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_l = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2)
    offs_t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = offs_c < C
    acc = _pre_at(x_ptr, init_ptr, w_ptr, b_ptr, seq_ptr, b, offs_t, offs_c, mc, L, s_xb, s_xl, s_ib, s_ic, s_iw,
                  s_wc, s_wk, s_sb, W, HAS_BIAS, HAS_SEQ, HAS_INIT, BLOCK_L, BLOCK_C)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(out_ptr + b.to(tl.int64) * s_ob + offs_t[:, None] * s_ol + offs_c[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=(offs_t < L)[:, None] & mc[None, :])


@triton.jit
def _conv1d_bwd_dpre_kernel(x_ptr, w_ptr, b_ptr, seq_ptr, init_ptr, dout_ptr, dpre_ptr, dw_ptr, L, C, n_chunks,
                     s_xb, s_xl, s_wc, s_wk, s_sb, s_ib, s_ic, s_iw, s_db, s_dl,
                     W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_INIT: tl.constexpr,
                     SILU: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
                     CHUNK: tl.constexpr, BLOCK_W: tl.constexpr):
    """Pass 1: dpre = dout * act'(pre) (pre recomputed) into a (batch, seqlen, channels) buffer; dweight, dbias."""
    chunk = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = offs_c < C
    offs_w = tl.arange(0, BLOCK_W)  # rows 0..W-1: dweight taps, row W: dbias
    acc_dw = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    for t0 in range(chunk * CHUNK, tl.minimum(chunk * CHUNK + CHUNK, L), BLOCK_L):
        t = t0 + tl.arange(0, BLOCK_L)
        m = (t < L)[:, None] & mc[None, :]
        g = tl.load(dout_ptr + b.to(tl.int64) * s_db + t[:, None] * s_dl + offs_c[None, :], mask=m,
                    other=0.0).to(tl.float32)
        if SILU:
            pre = _pre_at(x_ptr, init_ptr, w_ptr, b_ptr, seq_ptr, b, t, offs_c, mc, L, s_xb, s_xl, s_ib, s_ic, s_iw,
                          s_wc, s_wk, s_sb, W, HAS_BIAS, HAS_SEQ, HAS_INIT, BLOCK_L, BLOCK_C)
            sig = tl.sigmoid(pre)
            g = g * sig * (1.0 + pre * (1.0 - sig))
        tl.store(dpre_ptr + b.to(tl.int64) * L * C + t[:, None] * C + offs_c[None, :],
                 g.to(dpre_ptr.dtype.element_ty), mask=m)
        if HAS_SEQ:
            id_t = _ids_at(seq_ptr, b, t, L, s_sb)
        for k in tl.static_range(W):  # the same masked x tiles as in pre: L1 hits
            pos = t - (W - 1) + k
            v = _x_at(x_ptr, init_ptr, b, pos, offs_c, mc, L, s_xb, s_xl, s_ib, s_ic, s_iw, W - 1, HAS_INIT)
            if HAS_SEQ:
                v = tl.where((_ids_at(seq_ptr, b, pos, L, s_sb) == id_t)[:, None], v, 0.0)
            acc_dw += tl.where(offs_w[:, None] == k, tl.sum(g * v, axis=0)[None, :], 0.0)
        acc_dw += tl.where(offs_w[:, None] == W, tl.sum(g, axis=0)[None, :], 0.0)
    dw_rows = offs_w[:, None] * C + offs_c[None, :]
    m_dw = (offs_w[:, None] <= W) & mc[None, :]
    if ATOMIC:
        tl.atomic_add(dw_ptr + dw_rows, acc_dw, mask=m_dw)
    else:
        tl.store(dw_ptr + (b * n_chunks + chunk).to(tl.int64) * (W + 1) * C + dw_rows, acc_dw, mask=m_dw)


@triton.jit
def _dx_at(dpre_ptr, w_ptr, seq_ptr, b, p, offs_c, mc, L, C, s_wc, s_wk, s_sb,
           W: tl.constexpr, HAS_SEQ: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx at input positions p (BLOCK,) (negative: the initial state): sum_j w[W-1-j] dpre[p + j], same document."""
    dx = tl.zeros((BLOCK, BLOCK_C), dtype=tl.float32)
    if HAS_SEQ:
        id_p = _ids_at(seq_ptr, b, p, L, s_sb)
    for j in tl.static_range(W):
        t = p + j
        inside = (t >= 0) & (t < L)
        if HAS_SEQ:
            inside = inside & (_ids_at(seq_ptr, b, t, L, s_sb) == id_p)
        g = tl.load(dpre_ptr + b.to(tl.int64) * L * C + t[:, None] * C + offs_c[None, :],
                    mask=inside[:, None] & mc[None, :], other=0.0).to(tl.float32)
        wk = tl.load(w_ptr + offs_c * s_wc + (W - 1 - j) * s_wk, mask=mc, other=0.0).to(tl.float32)
        dx += g * wk[None, :]
    return dx


@triton.jit
def _conv1d_bwd_dx_kernel(dpre_ptr, w_ptr, seq_ptr, dx_ptr, dinit_ptr, L, C, s_wc, s_wk, s_sb, s_dxb, s_dxl,
                   W: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_INIT: tl.constexpr, BLOCK_L: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
    """Pass 2: dx from W shifted loads of dpre; the first tile of a row also writes d initial_state."""
    pid_l = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = offs_c < C
    p = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    dx = _dx_at(dpre_ptr, w_ptr, seq_ptr, b, p, offs_c, mc, L, C, s_wc, s_wk, s_sb, W, HAS_SEQ, BLOCK_L, BLOCK_C)
    tl.store(dx_ptr + b.to(tl.int64) * s_dxb + p[:, None] * s_dxl + offs_c[None, :],
             dx.to(dx_ptr.dtype.element_ty), mask=(p < L)[:, None] & mc[None, :])
    if HAS_INIT:
        if pid_l == 0:  # input positions -(W-1) .. -1 are the initial state
            ph = tl.arange(0, BLOCK_H) - (W - 1)
            dh = _dx_at(dpre_ptr, w_ptr, seq_ptr, b, ph, offs_c, mc, L, C, s_wc, s_wk, s_sb, W, HAS_SEQ, BLOCK_H,
                        BLOCK_C)
            # dinit is a contiguous (batch, channels, W - 1) fp32 buffer
            tl.store(dinit_ptr + b * C * (W - 1) + offs_c[None, :] * (W - 1) + (ph + W - 1)[:, None], dh,
                     mask=(ph < 0)[:, None] & mc[None, :])


def _check(x, weight, bias, activation, seq_idx, initial_state):
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"causal_conv1d: activation={activation!r}: expected 'silu', 'swish' or None")
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be (batch, seqlen, channels), got shape {tuple(x.shape)}")
    batch, seqlen, channels = x.shape
    if weight.dim() != 2 or weight.shape[0] != channels or not 2 <= weight.shape[1] <= 4:
        raise ValueError(f"causal_conv1d: weight must be (channels={channels}, width in 2..4), "
                         f"got shape {tuple(weight.shape)}")
    width = weight.shape[1]
    if bias is not None and tuple(bias.shape) != (channels,):
        raise ValueError(f"causal_conv1d: bias must be ({channels},), got shape {tuple(bias.shape)}")
    if seq_idx is not None and tuple(seq_idx.shape) != (batch, seqlen):
        raise ValueError(f"causal_conv1d: seq_idx must be ({batch}, {seqlen}), got shape {tuple(seq_idx.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (batch, channels, width - 1):
        raise ValueError(f"causal_conv1d: initial_state must be ({batch}, {channels}, {width - 1}), "
                         f"got shape {tuple(initial_state.shape)}")


def _tail_masks(seq_idx, seqlen, width):
    """For j in 0..width-2, the input position L-(width-1)+j of the final state and its (batch, 1) keep mask."""
    out = []
    for j in range(width - 1):
        p = seqlen - (width - 1) + j
        keep = None
        if seq_idx is not None and seqlen > 0:
            keep = (seq_idx[:, max(p, 0)] == seq_idx[:, -1])[:, None]  # (batch, 1)
        out.append((p, keep))
    return out


def _final_state(x, initial_state, seq_idx, width):
    """The last width - 1 inputs (batch, channels, width - 1) in x.dtype, other documents zeroed."""
    batch, seqlen, channels = x.shape
    final = x.new_zeros(batch, channels, width - 1)  # (batch, channels, width - 1)
    for j, (p, keep) in enumerate(_tail_masks(seq_idx, seqlen, width)):
        if p >= 0:
            col = x[:, p]
        elif initial_state is not None:
            col = initial_state[:, :, p + width - 1]
        else:
            continue
        final[:, :, j] = col if keep is None else torch.where(keep, col, 0)
    return final


class _CausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, seq_idx, initial_state, silu, want_final):
        batch, seqlen, channels = x.shape
        width = weight.shape[1]
        out = torch.empty(batch, seqlen, channels, dtype=x.dtype, device=x.device)  # (batch, seqlen, channels)
        if seqlen > 0:
            cfg = TUNING["fwd"]
            grid = (triton.cdiv(seqlen, cfg["BLOCK_L"]), triton.cdiv(channels, cfg["BLOCK_C"]), batch)
            _conv1d_fwd_kernel[grid](*_kernel_args(x, weight, bias, seq_idx, initial_state), out, seqlen, channels,
                              *_strides(x, weight, seq_idx, initial_state), out.stride(0), out.stride(1),
                              **_flags(width, bias, seq_idx, initial_state, silu), **cfg)
        ctx.save_for_backward(x, weight, bias, seq_idx, initial_state)
        ctx.silu = silu
        if not want_final:
            return out
        return out, _final_state(x, initial_state, seq_idx, width)

    @staticmethod
    def backward(ctx, dout, dfinal=None):
        x, weight, bias, seq_idx, initial_state = ctx.saved_tensors
        batch, seqlen, channels = x.shape
        width = weight.shape[1]
        dx = torch.empty(batch, seqlen, channels, dtype=x.dtype, device=x.device)  # (batch, seqlen, channels)
        dinit = None
        if initial_state is not None:
            dinit = torch.zeros(batch, channels, width - 1, dtype=torch.float32, device=x.device)
        cfg = TUNING["bwd_dpre"]
        chunk = cfg["CHUNK"]
        n_chunks = max(1, triton.cdiv(seqlen, chunk))
        if ATOMIC_DW:
            dw = torch.zeros(width + 1, channels, dtype=torch.float32, device=x.device)  # (width + 1, channels)
        else:
            dw = torch.zeros(batch * n_chunks, width + 1, channels, dtype=torch.float32, device=x.device)
        if dout is None:
            dout = torch.zeros_like(x)
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        # dpre in fp32, or in dout's dtype for 16-bit inputs when DPRE_FP32 is off (dweight/dbias use fp32 either way)
        dpre = torch.empty(batch, seqlen, channels, device=x.device,
                           dtype=torch.float32 if DPRE_FP32 else dout.dtype)  # (batch, seqlen, channels)
        flags = _flags(width, bias, seq_idx, initial_state, ctx.silu)
        args = _kernel_args(x, weight, bias, seq_idx, initial_state)
        st = _strides(x, weight, seq_idx, initial_state)
        if seqlen > 0:
            grid = (n_chunks, triton.cdiv(channels, cfg["BLOCK_C"]), batch)
            _conv1d_bwd_dpre_kernel[grid](*args, dout, dpre, dw, seqlen, channels, n_chunks, *st,
                                   dout.stride(0), dout.stride(1), **flags, ATOMIC=ATOMIC_DW,
                                   BLOCK_W=triton.next_power_of_2(width + 1), **cfg)
        dx_cfg = TUNING["bwd_dx"]
        if seqlen > 0:  # with seqlen 0 only the final state's gradient (below) reaches initial_state
            grid = (triton.cdiv(seqlen, dx_cfg["BLOCK_L"]), triton.cdiv(channels, dx_cfg["BLOCK_C"]), batch)
            _conv1d_bwd_dx_kernel[grid](dpre, weight, args[3], dx, dinit if dinit is not None else dx, seqlen, channels,
                                 weight.stride(0), weight.stride(1), st[4], dx.stride(0), dx.stride(1),
                                 W=width, HAS_SEQ=seq_idx is not None, HAS_INIT=initial_state is not None,
                                 BLOCK_H=triton.next_power_of_2(width - 1), **dx_cfg)
        if not ATOMIC_DW:
            dw = dw.sum(0)
        if dfinal is not None:  # the final state is raw inputs: its gradient goes straight to x / initial_state
            for j, (p, keep) in enumerate(_tail_masks(seq_idx, seqlen, width)):
                g = dfinal[:, :, j] if keep is None else torch.where(keep, dfinal[:, :, j], 0)
                if p >= 0:
                    dx[:, p] += g.to(dx.dtype)
                elif dinit is not None:
                    dinit[:, :, p + width - 1] += g.float()
        dweight = dw[:width].t().to(weight.dtype)
        dbias = dw[width].to(bias.dtype) if bias is not None else None
        dinit = dinit.to(initial_state.dtype) if dinit is not None else None
        return dx, dweight, dbias, None, dinit, None, None


def _kernel_args(x, weight, bias, seq_idx, initial_state):
    return (x, weight, bias if bias is not None else weight, seq_idx if seq_idx is not None else weight,
            initial_state if initial_state is not None else weight)


def _strides(x, weight, seq_idx, initial_state):
    ist = initial_state.stride() if initial_state is not None else (0, 0, 0)
    return (x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
            seq_idx.stride(0) if seq_idx is not None else 0, *ist)


def _flags(width, bias, seq_idx, initial_state, silu):
    return dict(W=width, HAS_BIAS=bias is not None, HAS_SEQ=seq_idx is not None,
                HAS_INIT=initial_state is not None, SILU=silu)


def causal_conv1d(x, weight, bias=None, *, activation="silu", seq_idx=None, initial_state=None,
                  return_final_state=False):
    """Causal depthwise convolution (Triton), same contract as reference.causal_conv1d.

    x: (batch, seqlen, channels), any strides with a unit channel stride (else copied); weight: (channels, width),
    width 2..4; bias: (channels,) or None; activation: 'silu'/'swish' (fused) or None;
    seq_idx: (batch, seqlen) non-decreasing document ids or None; initial_state: (batch, channels, width - 1),
    oldest first. Returns out (batch, seqlen, channels) in x.dtype, and with return_final_state also the final
    state (batch, channels, width - 1) in x.dtype. Gradients flow to x, weight, bias and initial_state.
    fp64 inputs run the reference.
    """
    _check(x, weight, bias, activation, seq_idx, initial_state)
    if x.dtype == torch.float64:
        return _ref.causal_conv1d(x, weight, bias, activation=activation, seq_idx=seq_idx,
                                  initial_state=initial_state, return_final_state=return_final_state)
    if x.stride(-1) != 1:
        x = x.contiguous()
    seq_idx = seq_idx.contiguous() if seq_idx is not None else None
    return _CausalConv1d.apply(x, weight, bias, seq_idx, initial_state, activation is not None,
                               return_final_state)
