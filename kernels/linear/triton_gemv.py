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

from .reference import MAX_ROWS, check, fused_pays
from .reference import linears as _linears_reference
from .reference import swiglu_linear as _swiglu_reference

MAX_WEIGHTS = 4  # weights per launch; longer lists are launched in groups


@triton.jit
def _block(x_ptr, w_ptr, b_ptr, y_ptr, n0, N, M, K, s_xm, s_ym, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[:, n0:n0+BLOCK_N] = x @ w[n0:n0+BLOCK_N].T (+ b) for the M rows of x."""
    n = n0 + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    mn = n < N
    mm = m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mk = k < K
        w = tl.load(w_ptr + n[:, None].to(tl.int64) * K + k[None, :], mask=mn[:, None] & mk[None, :], other=0.0)
        x = tl.load(x_ptr + m[:, None] * s_xm + k[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
        acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    y = tl.sum(acc, axis=2)
    if HAS_BIAS:
        y += tl.load(b_ptr + n, mask=mn, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + m[:, None] * s_ym + n[None, :], y.to(y_ptr.dtype.element_ty), mask=mm[:, None] & mn[None, :])


@triton.jit
def _linears_kernel(x_ptr, w0, w1, w2, w3, b0, b1, b2, b3, y0, y1, y2, y3, N0, N1, N2, N3, M, K, s_xm,
                    NUM_W: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    # program ids 0.. cover weight 0's column blocks, then weight 1's, ...; outputs are (M, N_i) contiguous
    pid = tl.program_id(0)
    c0 = tl.cdiv(N0, BLOCK_N)
    c1 = c0 + tl.cdiv(N1, BLOCK_N)
    c2 = c1 + tl.cdiv(N2, BLOCK_N)
    if pid < c0:
        _block(x_ptr, w0, b0, y0, pid * BLOCK_N, N0, M, K, s_xm, N0, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K)
    elif NUM_W > 1 and pid < c1:
        _block(x_ptr, w1, b1, y1, (pid - c0) * BLOCK_N, N1, M, K, s_xm, N1, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K)
    elif NUM_W > 2 and pid < c2:
        _block(x_ptr, w2, b2, y2, (pid - c1) * BLOCK_N, N2, M, K, s_xm, N2, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K)
    elif NUM_W > 3:
        _block(x_ptr, w3, b3, y3, (pid - c2) * BLOCK_N, N3, M, K, s_xm, N3, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _swiglu_kernel(x_ptr, wg_ptr, wu_ptr, y_ptr, N, M, K, s_xm, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    mn = n < N
    mm = m < M
    g = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), tl.float32)
    u = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mk = k < K
        wm = mn[:, None] & mk[None, :]
        off = n[:, None].to(tl.int64) * K + k[None, :]
        x = tl.load(x_ptr + m[:, None] * s_xm + k[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
        x = x.to(tl.float32)[:, None, :]
        g += x * tl.load(wg_ptr + off, mask=wm, other=0.0).to(tl.float32)[None, :, :]
        u += x * tl.load(wu_ptr + off, mask=wm, other=0.0).to(tl.float32)[None, :, :]
    gs = tl.sum(g, axis=2)
    y = gs * tl.sigmoid(gs) * tl.sum(u, axis=2)
    tl.store(y_ptr + m[:, None] * N + n[None, :], y.to(y_ptr.dtype.element_ty), mask=mm[:, None] & mn[None, :])


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":  # Triton's interpreter on the CPU (tests): an H100 / H200's count
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def blocks(m: int, n_total: int, k: int, n_sm: int, tile: int = 8192) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): the widest column block that still gives every SM two programs (at least 2
    columns), and a K step that keeps the (BLOCK_M, BLOCK_N, BLOCK_K) fp32 products at `tile` elements."""
    block_m = triton.next_power_of_2(max(m, 1))
    block_n = 32
    while block_n > 2 and triton.cdiv(n_total, block_n) < 2 * n_sm:
        block_n //= 2
    block_k = max(16, min(triton.next_power_of_2(k), tile // (block_m * block_n)))
    return block_m, block_n, block_k


def _fast(x: torch.Tensor, weights) -> bool:
    rows = x.numel() // max(x.shape[-1], 1)
    return ((x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") and 0 < rows <= MAX_ROWS
            and fused_pays(rows, [w.shape[0] for w in weights]) and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and not (torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)))
            and all(w.is_contiguous() for w in weights))


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def linears(x, weights, biases=None):
    """See reference.linears."""
    check(x, weights, biases)
    if not _fast(x, weights) or (biases is not None and any(b is not None and b.requires_grad and
                                                          torch.is_grad_enabled() for b in biases)):
        return _linears_reference(x, weights, biases)
    has_bias = biases is not None and any(b is not None for b in biases)
    x2 = _rows(x)
    m, k = x2.shape
    out = []
    for g0 in range(0, len(weights), MAX_WEIGHTS):
        ws = list(weights[g0:g0 + MAX_WEIGHTS])
        bs = [None] * len(ws) if not has_bias else [
            b if b is not None else torch.zeros(w.shape[0], dtype=x.dtype, device=x.device)
            for w, b in zip(ws, biases[g0:g0 + MAX_WEIGHTS])]
        ys = [torch.empty(m, w.shape[0], dtype=x.dtype, device=x.device) for w in ws]
        ns = [w.shape[0] for w in ws]
        bm, bn, bk = blocks(m, sum(ns), k, _sm_count(x.device))
        grid = (sum(triton.cdiv(n, bn) for n in ns),)
        pad = MAX_WEIGHTS - len(ws)
        wp, bp, yp, np_ = ws + [ws[0]] * pad, (bs if has_bias else ws) + [ws[0]] * pad, ys + [ys[0]] * pad, ns + [0] * pad
        _linears_kernel[grid](x2, *wp, *bp, *yp, *np_, m, k, x2.stride(0), NUM_W=len(ws), HAS_BIAS=has_bias,
                              BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4)
        out += ys
    return [y.view(*x.shape[:-1], y.shape[-1]) for y in out]


def swiglu_linear(x, w_gate, w_up):
    """See reference.swiglu_linear."""
    check(x, [w_gate, w_up])
    if not _fast(x, [w_gate, w_up]) or w_gate.shape != w_up.shape:
        return _swiglu_reference(x, w_gate, w_up)
    x2 = _rows(x)
    m, k = x2.shape
    n = w_gate.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bm, bn, bk = blocks(m, n, k, _sm_count(x.device), tile=4096)
    _swiglu_kernel[(triton.cdiv(n, bn),)](x2, w_gate, w_up, y, n, m, k, x2.stride(0), BLOCK_M=bm, BLOCK_N=bn,
                                          BLOCK_K=bk, num_warps=4)
    return y.view(*x.shape[:-1], n)
