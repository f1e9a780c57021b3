"""Decode attention in Triton: one new token per row, read straight from the unified KV cache (split-KV).

Same contract as `reference.attention_decode`: the new key is already in the cache; each query head reads the
slots `cache_visible` allows (ring slots within the window, a sparse layer's sink / strided slots once their key
has left the window, never an empty slot). Nothing is gathered or concatenated: every program streams one range
of slots of one (row, kv head) through an online softmax for all the query heads that share that kv head (GQA),
and a few tensor ops merge the per-range partial results. Shapes depend only on the cache's shape, so a decode
step that calls this can be captured in a CUDA graph.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

KINDS = {"global": 0, "local": 1, "sparse": 2}
# Launch parameters per kernel: BLOCK slots per inner step of a program (a split covers whole steps), num_warps.
TUNING = {"decode_partial": dict(BLOCK=64, num_warps=4)}
# Triton's CPU interpreter (3.9) multiplies bf16 tl.dot operands wrongly: there, operands go to fp32 first
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
NEG = tl.constexpr(-1.0e30)  # finite "minus infinity": a range with no visible slot keeps weight exactly 0 and no NaN


@triton.jit
def _decode_partial(q_ptr, k_ptr, v_ptr, pos_ptr, qpos_ptr, m_ptr, l_ptr, acc_ptr,
                    stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                    stride_pb, slots, ring_start, window, sinks, stride_sp, scale, nsplit, slots_per_split,
                    KIND: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                    D_PAD: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr,
                    UPCAST: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    offs_g = tl.arange(0, G_PAD)  # query heads of this kv head
    offs_d = tl.arange(0, D_PAD)
    gmask = offs_g < GROUP
    dmask = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)  # (G_PAD, D_PAD)
    q = q.to(tl.float32 if UPCAST else k_ptr.dtype.element_ty)
    qp = tl.load(qpos_ptr + b).to(tl.int32)

    m = tl.full((G_PAD,), NEG, tl.float32)
    l = tl.zeros((G_PAD,), tl.float32)
    acc = tl.zeros((G_PAD, D_PAD), tl.float32)
    lo = split * slots_per_split
    hi = tl.minimum(lo + slots_per_split, slots)
    for start in range(lo, hi, BLOCK):
        offs_s = start + tl.arange(0, BLOCK)
        smask = offs_s < hi
        kp = tl.load(pos_ptr + b * stride_pb + offs_s, mask=smask, other=-1).to(tl.int32)  # (BLOCK,) position held
        vis = smask & (kp >= 0) & (kp <= qp)
        if KIND == 1:
            vis = vis & (qp - kp < window)
        if KIND == 2:
            near = qp - kp < window
            far = kp < sinks
            if stride_sp > 0:
                far = far | ((kp + 1) % stride_sp == 0)
            vis = vis & tl.where(offs_s >= ring_start, near, far & (near == 0))
        kv_mask = vis[:, None] & dmask[None, :]
        k = tl.load(k_ptr + b * stride_kb + offs_s[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :],
                    mask=kv_mask, other=0.0)  # (BLOCK, D_PAD)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (G_PAD, BLOCK) fp32
        s = tl.where(vis[None, :], s, NEG)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.where(vis[None, :], tl.exp(s - m_new[:, None]), 0.0)
        alpha = tl.exp(m - m_new)
        v = tl.load(v_ptr + b * stride_vb + offs_s[:, None] * stride_vs + kvh * stride_vh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l = l * alpha + tl.sum(p, axis=1)
        m = m_new

    row = (b * nsplit + split) * (GROUP * (tl.num_programs(1))) + heads  # partials laid out (batch, nsplit, n_heads)
    tl.store(m_ptr + row, m, mask=gmask)
    tl.store(l_ptr + row, l, mask=gmask)
    tl.store(acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=gmask[:, None] & dmask[None, :])


@triton.jit
def _decode_merge(m_ptr, l_ptr, acc_ptr, out_ptr, nsplit, n_heads, stride_ob, stride_oh,
                  HEAD_DIM: tl.constexpr, S_PAD: tl.constexpr, SB: tl.constexpr, D_PAD: tl.constexpr):
    """One (row, query head): the ranges' partial softmax results merged with weights exp(m_s - max m) (0 for a
    range that saw no visible slot), one launch instead of a chain of tensor ops; SB ranges at a time."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_d = tl.arange(0, D_PAD)
    dmask = offs_d < HEAD_DIM
    offs_all = tl.arange(0, S_PAD)
    top = tl.max(tl.load(m_ptr + (b * nsplit + offs_all) * n_heads + h, mask=offs_all < nsplit, other=NEG), axis=0)
    num = tl.zeros((D_PAD,), tl.float32)
    den = tl.zeros((SB,), tl.float32)
    for s0 in range(0, nsplit, SB):
        offs_s = s0 + tl.arange(0, SB)
        smask = offs_s < nsplit
        rows = (b * nsplit + offs_s) * n_heads + h  # partials laid out (batch, nsplit, n_heads)
        w = tl.where(smask, tl.exp(tl.load(m_ptr + rows, mask=smask, other=NEG) - top), 0.0)
        acc = tl.load(acc_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=smask[:, None] & dmask[None, :],
                      other=0.0)
        num += tl.sum(acc * w[:, None], axis=0)
        den += tl.load(l_ptr + rows, mask=smask, other=0.0) * w
    out = num / tl.sum(den, axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=dmask)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split(batch: int, n_kv_heads: int, slots: int, device: torch.device) -> tuple[int, int]:
    """(nsplit, slots_per_split): enough programs for about four per SM (fewer leave a ragged last wave),
    each over whole steps of TUNING["decode_partial"]["BLOCK"] slots."""
    sms = _sm_count(device.index or 0) if device.type == "cuda" else 8
    want = max(1, -(-4 * sms // (batch * n_kv_heads)))
    step = TUNING["decode_partial"]["BLOCK"]
    per = max(step, -(-slots // want))
    per = -(-per // step) * step
    return -(-slots // per), per


def attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, pos_cache: Tensor, q_pos: Tensor, *,
                     ring_start: int, kind: str, window: int = 0, sinks: int = 0, stride: int = 0,
                     scale: Optional[float] = None) -> Tensor:
    """q: (batch, n_heads, d); k_cache, v_cache: (batch, slots, n_kv_heads, d), last dim contiguous;
    pos_cache: (batch, slots) int; q_pos: (batch,) int. Returns (batch, n_heads, d) in q.dtype."""
    if kind not in KINDS:
        raise ValueError(f"attention kind {kind!r}: expected global, local or sparse")
    batch, n_heads, head_dim = q.shape
    _, slots, n_kv_heads, _ = k_cache.shape
    if k_cache.shape != v_cache.shape or k_cache.shape[0] != batch or k_cache.shape[3] != head_dim:
        raise ValueError(f"attention_decode: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, "
                         f"v_cache {tuple(v_cache.shape)} disagree")
    if n_heads % n_kv_heads:
        raise ValueError(f"attention_decode: {n_heads} query heads is not a multiple of {n_kv_heads} kv heads")
    if pos_cache.shape != (batch, slots) or q_pos.shape != (batch,):
        raise ValueError(f"attention_decode: pos_cache {tuple(pos_cache.shape)} / q_pos {tuple(q_pos.shape)}, "
                         f"expected ({batch}, {slots}) / ({batch},)")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("attention_decode: the cache's last dim must be contiguous")
    q = q.contiguous()
    pos_cache = pos_cache.contiguous()
    q_pos = q_pos.contiguous()
    group = n_heads // n_kv_heads
    nsplit, per = _split(batch, n_kv_heads, slots, q.device)
    m = torch.empty(batch, nsplit, n_heads, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(batch, nsplit, n_heads, head_dim, dtype=torch.float32, device=q.device)
    scale = head_dim ** -0.5 if scale is None else scale
    _decode_partial[(batch, n_kv_heads, nsplit)](
        q, k_cache, v_cache, pos_cache, q_pos, m, l, acc,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), pos_cache.stride(0),
        slots, ring_start, window, sinks, stride, scale, nsplit, per,
        KIND=KINDS[kind], GROUP=group, G_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        D_PAD=max(16, triton.next_power_of_2(head_dim)),
        PRECISION="ieee" if k_cache.dtype == torch.float32 or INTERPRET else "tf32", UPCAST=INTERPRET,
        **TUNING["decode_partial"])
    out = torch.empty_like(q)
    _decode_merge[(batch, n_heads)](m, l, acc, out, nsplit, n_heads, out.stride(0), out.stride(1),
                                    HEAD_DIM=head_dim, S_PAD=triton.next_power_of_2(nsplit), SB=16,
                                    D_PAD=max(16, triton.next_power_of_2(head_dim)))
    return out
