"""Few-row projections in one launch (semantics of `reference.py` beside this file).

A decode step multiplies 1-16 rows by each weight. A matmul library tiles the output in blocks of 64 or more
columns, so a 768 x 768 weight is read by a dozen CTAs and the step waits on latency, not bandwidth (on an H200 a
768 x 768 bf16 matmul of one row took 4.5 us, 1.2 MB at 4.3 TB/s is 0.3 us). Here every program owns BLOCK_N
output columns of one weight for all rows: it streams those weight rows (contiguous along K) once, multiplies
them by the rows of x held in registers and keeps fp32 partial products, so the grid spans every SM even for a
small weight. Several weights of one input (q, k and v; gate and up) share the launch: program ids are split
among them. The SwiGLU variant computes the gate and up columns of one block together and writes silu(g) * u.

Used where it pays: no autograd (decode and evaluation), few rows and weights that are not too wide
(`reference.fused_pays`, measured), bf16 / fp16 / fp32 weights of the input's dtype with contiguous rows.
Everything else is the reference (F.linear, which is cuBLAS on the GPU).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .. import tuning
from ..common import as_rows
from .reference import MAX_ROWS, check, check_norm, fused_pays
from .reference import linears as _linears_reference
from .reference import swiglu_linear as _swiglu_reference

MAX_WEIGHTS = 4  # weights per launch; longer lists are launched in groups
# launch settings [warps, log2 of the (BLOCK_M, BLOCK_N, BLOCK_K) fp32 product tile, programs per SM]; the SwiGLU
# pair holds two tiles. CANDIDATES are timed per shape with BRAIDLM_AUTOTUNE=1.
TUNING = {"linears": [4, 13, 2], "swiglu": [4, 12, 2]}
CANDIDATES = [[w, t, p] for w in (2, 4, 8) for t in (11, 12, 13, 14) for p in (1, 2, 4)]


@triton.jit
def _x_tile(x_ptr, r_ptr, nw_ptr, rstd, m, k, mm, mk, s_xm, s_rm, NORM: tl.constexpr):
    """(BLOCK_M, BLOCK_K) fp32 tile of the projections' input: x itself, or with NORM rmsnorm(r + x) * nw rounded
    to x's dtype, as the unfused add_rmsnorm hands it to the matmul (the sum rounded to its dtype first)."""
    msk = mm[:, None] & mk[None, :]
    x = tl.load(x_ptr + m[:, None] * s_xm + k[None, :], mask=msk, other=0.0).to(tl.float32)
    if NORM:
        r = tl.load(r_ptr + m[:, None] * s_rm + k[None, :], mask=msk, other=0.0).to(tl.float32)
        sm = (r + x).to(x_ptr.dtype.element_ty).to(tl.float32)
        nw = tl.load(nw_ptr + k, mask=mk, other=0.0).to(tl.float32)
        x = (sm * rstd[:, None] * nw[None, :]).to(x_ptr.dtype.element_ty).to(tl.float32)
    return x


@triton.jit
def _block(x_ptr, r_ptr, nw_ptr, rstd, w_ptr, w2_ptr, b_ptr, y_ptr, n0, N, M, K, s_xm, s_rm,
           NORM: tl.constexpr, SWIGLU: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[:, n0:n0+BLOCK_N] = x @ w[n0:n0+BLOCK_N].T (+ b) for the M rows of x; SWIGLU: silu(x @ w.T) * (x @ w2.T).
    Products stay in a (BLOCK_M, BLOCK_N, BLOCK_K) fp32 tile and are summed over K once at the end."""
    n = n0 + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    mn = n < N
    mm = m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K) if SWIGLU else (1, 1, 1), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mk = k < K
        x = _x_tile(x_ptr, r_ptr, nw_ptr, rstd, m, k, mm, mk, s_xm, s_rm, NORM)[:, None, :]
        off = n[:, None].to(tl.int64) * K + k[None, :]
        wm = mn[:, None] & mk[None, :]
        acc += x * tl.load(w_ptr + off, mask=wm, other=0.0).to(tl.float32)[None, :, :]
        if SWIGLU:
            acc2 += x * tl.load(w2_ptr + off, mask=wm, other=0.0).to(tl.float32)[None, :, :]
    y = tl.sum(acc, axis=2)
    if SWIGLU:
        y = y * tl.sigmoid(y) * tl.sum(acc2, axis=2)
    if HAS_BIAS:
        y += tl.load(b_ptr + n, mask=mn, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + m[:, None] * N + n[None, :], y.to(y_ptr.dtype.element_ty), mask=mm[:, None] & mn[None, :])


@triton.jit
def _proj_kernel(x_ptr, r_ptr, nw_ptr, s_ptr, eps, w0, w1, w2, w3, b0, b1, b2, b3, y0, y1, y2, y3, N0, N1, N2, N3,
                 M, K, s_xm, s_rm, NUM_W: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # program ids 0.. cover weight 0's column blocks, then weight 1's, ...; outputs are (M, N_i) contiguous.
    # SWIGLU: one weight pair (w0 gate, w1 up) and one output. NORM: every program normalizes r + x itself (the
    # rows are a few KB, read from L2), program 0 also stores the sum r + x into s.
    pid = tl.program_id(0)
    m = tl.arange(0, BLOCK_M)
    mm = m < M
    rstd = tl.zeros((BLOCK_M,), tl.float32)
    if NORM:
        ss = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            msk = mm[:, None] & (k < K)[None, :]
            x = tl.load(x_ptr + m[:, None] * s_xm + k[None, :], mask=msk, other=0.0).to(tl.float32)
            r = tl.load(r_ptr + m[:, None] * s_rm + k[None, :], mask=msk, other=0.0).to(tl.float32)
            sm = (r + x).to(x_ptr.dtype.element_ty)
            if pid == 0:
                tl.store(s_ptr + m[:, None] * K + k[None, :], sm, mask=msk)
            sm = sm.to(tl.float32)
            ss += sm * sm
        rstd = 1.0 / tl.sqrt(tl.sum(ss, axis=1) / K + eps)
    c0 = tl.cdiv(N0, BLOCK_N)
    c1 = c0 + tl.cdiv(N1, BLOCK_N)
    c2 = c1 + tl.cdiv(N2, BLOCK_N)
    if SWIGLU:
        _block(x_ptr, r_ptr, nw_ptr, rstd, w0, w1, b0, y0, pid * BLOCK_N, N0, M, K, s_xm, s_rm, NORM, True, False,
               BLOCK_M, BLOCK_N, BLOCK_K)
    elif pid < c0:
        _block(x_ptr, r_ptr, nw_ptr, rstd, w0, w0, b0, y0, pid * BLOCK_N, N0, M, K, s_xm, s_rm, NORM, False,
               HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K)
    elif NUM_W > 1 and pid < c1:
        _block(x_ptr, r_ptr, nw_ptr, rstd, w1, w1, b1, y1, (pid - c0) * BLOCK_N, N1, M, K, s_xm, s_rm, NORM, False,
               HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K)
    elif NUM_W > 2 and pid < c2:
        _block(x_ptr, r_ptr, nw_ptr, rstd, w2, w2, b2, y2, (pid - c1) * BLOCK_N, N2, M, K, s_xm, s_rm, NORM, False,
               HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K)
    elif NUM_W > 3:
        _block(x_ptr, r_ptr, nw_ptr, rstd, w3, w3, b3, y3, (pid - c2) * BLOCK_N, N3, M, K, s_xm, s_rm, NORM, False,
               HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K)


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":  # Triton's interpreter on the CPU (tests): few programs, it runs them one by one
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def blocks(m: int, n_total: int, k: int, n_sm: int, tile: int = 8192, per_sm: int = 2) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): the widest column block that still gives every SM `per_sm` programs (at least
    2 columns), and a K step that keeps the (BLOCK_M, BLOCK_N, BLOCK_K) fp32 products at `tile` elements."""
    block_m = triton.next_power_of_2(max(m, 1))
    block_n = 32
    while block_n > 2 and triton.cdiv(n_total, block_n) < per_sm * n_sm:
        block_n //= 2
    block_k = max(16, min(triton.next_power_of_2(k), tile // (block_m * block_n)))
    return block_m, block_n, block_k


def _fast(x: torch.Tensor, weights) -> bool:
    rows = x.numel() // max(x.shape[-1], 1)
    return ((x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") and 0 < rows <= MAX_ROWS
            and fused_pays(rows, [w.shape[0] for w in weights])
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and not (torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)))
            and all(w.is_contiguous() for w in weights))


def _launch(x2, weights, biases, swiglu: bool, norm=None) -> list:
    """One launch over at most MAX_WEIGHTS weights (a gate / up pair with swiglu). norm: (residual rows, norm
    weight, eps, sum output) to normalize residual + x2 first. Returns the outputs (rows, N_i). Settings
    (warps, log2 of the product tile, programs per SM): TUNING, or with BRAIDLM_AUTOTUNE=1 the fastest of
    CANDIDATES per shape (kernels/tuning.py)."""
    m, k = x2.shape
    key = (m, [w.shape[0] for w in weights], k, swiglu, norm is not None, str(x2.dtype))
    default = TUNING["swiglu" if swiglu else "linears"]
    return tuning.pick("linears", key, CANDIDATES, lambda setting: _launch_with(x2, weights, biases, swiglu, norm,
                                                                                *setting), default, x2.device)


def _launch_with(x2, weights, biases, swiglu: bool, norm, num_warps: int, log_tile: int, per_sm: int) -> list:
    m, k = x2.shape
    ns = [w.shape[0] for w in weights]
    ys = [torch.empty(m, n, dtype=x2.dtype, device=x2.device) for n in (ns[:1] if swiglu else ns)]
    has_bias = biases is not None and any(b is not None for b in biases)
    bs = [b if b is not None else torch.zeros(n, dtype=x2.dtype, device=x2.device)
          for b, n in zip(biases, ns)] if has_bias else list(weights)
    bm, bn, bk = blocks(m, ns[0] if swiglu else sum(ns), k, _sm_count(x2.device), tile=1 << log_tile, per_sm=per_sm)
    if norm is not None:
        r2, nw, eps, s2 = norm
        bk = min(bk, max(16, 8192 // bm))  # the norm's (BLOCK_M, BLOCK_K) pre-pass tile
    else:
        r2, nw, eps, s2 = x2, x2, 0.0, x2
    grid = (triton.cdiv(ns[0], bn) if swiglu else sum(triton.cdiv(n, bn) for n in ns),)
    pad = MAX_WEIGHTS - len(weights)
    _proj_kernel[grid](x2, r2, nw, s2, float(eps), *(list(weights) + [weights[0]] * pad), *(bs + [bs[0]] * pad),
                       *(ys + [ys[0]] * (MAX_WEIGHTS - len(ys))), *(ns + [0] * pad), m, k, x2.stride(0),
                       r2.stride(0), NUM_W=len(weights), NORM=norm is not None, SWIGLU=swiglu, HAS_BIAS=has_bias,
                       BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=num_warps)
    return ys


def linears(x, weights, biases=None):
    """See reference.linears."""
    check(x, weights, biases)
    if not _fast(x, weights) or (biases is not None and torch.is_grad_enabled()
                                 and any(b is not None and b.requires_grad for b in biases)):
        return _linears_reference(x, weights, biases)
    x2 = as_rows(x)
    out = []
    for g0 in range(0, len(weights), MAX_WEIGHTS):
        out += _launch(x2, weights[g0:g0 + MAX_WEIGHTS], None if biases is None else biases[g0:g0 + MAX_WEIGHTS],
                       False)
    return [y.view(*x.shape[:-1], y.shape[-1]) for y in out]


def swiglu_linear(x, w_gate, w_up):
    """See reference.swiglu_linear."""
    check(x, [w_gate, w_up])
    if not _fast(x, [w_gate, w_up]) or w_gate.shape != w_up.shape:
        return _swiglu_reference(x, w_gate, w_up)
    (y,) = _launch(as_rows(x), [w_gate, w_up], None, True)
    return y.view(*x.shape[:-1], y.shape[-1])


def add_rmsnorm_linears(x, residual, norm_weight, eps, weights, biases=None, swiglu=False):
    """See reference.add_rmsnorm_linears: the sum, the norm and the projections in one launch where `linears`
    would run fused; otherwise the add_rmsnorm op and then `linears` / `swiglu_linear`."""
    check_norm(x, residual, norm_weight, weights, swiglu)
    check(x, weights, biases)
    fused = (_fast(x, weights) and len(weights) <= MAX_WEIGHTS and x.dtype == residual.dtype == norm_weight.dtype
             and not (torch.is_grad_enabled() and (residual.requires_grad or norm_weight.requires_grad
                                                   or any(b is not None and b.requires_grad for b in biases or ()))))
    if not fused:
        from kernels import ops
        h, s = ops.add_rmsnorm(x, residual, norm_weight, eps)
        outs = [ops.swiglu_linear(h, *weights)] if swiglu else ops.linears(h, weights, biases)
        return outs, s
    x2, r2 = as_rows(x), as_rows(residual)
    s = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    ys = _launch(x2, weights, biases, swiglu, norm=(r2, norm_weight, eps, s))
    return [y.view(*x.shape[:-1], y.shape[-1]) for y in ys], s.view(x.shape)
