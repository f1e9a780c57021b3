"""Rotary position embedding in one pass (semantics of `reference.py` beside this file).

One program per token rotates all its heads: it reads the token's position, forms the angles pos * inv_freq in
fp32 (inv_freq computed once by the reference's formula, so the angles are the reference's) and their cos / sin
in registers, reads x once and writes the result once. The backward is the rotation by the opposite angle.
No (seqlen, head_dim) cos / sin tables are built and nothing but the positions is saved.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .reference import _check, _check_kv, inv_freq
from .reference import rope as _reference
from .reference import rope_kv_write as _rope_kv_reference


@triton.jit
def _rotate_heads(src_ptr, dst_ptr, H, s_src, s_dst, cos, sin, i, mi, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """dst[h] = src[h] rotated (cos, sin: (1, BLOCK_D); cos 1 and sin 0 copy) for the H heads of one token."""
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        m = (h < H)[:, None] & mi[None, :]
        sp = src_ptr + h[:, None].to(tl.int64) * s_src + i[None, :]
        x1 = tl.load(sp, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(sp + HALF, mask=m, other=0.0).to(tl.float32)
        dp = dst_ptr + h[:, None].to(tl.int64) * s_dst + i[None, :]
        tl.store(dp, (x1 * cos - x2 * sin).to(dst_ptr.dtype.element_ty), mask=m)
        tl.store(dp + HALF, (x2 * cos + x1 * sin).to(dst_ptr.dtype.element_ty), mask=m)


@triton.jit
def _rope_kernel(x_ptr, pos_ptr, f_ptr, out_ptr, seqlen, H, s_xb, s_xt, s_xh, s_ob, s_ot, s_oh,
                 SIGN: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    tok = tl.program_id(0)
    b = (tok // seqlen).to(tl.int64)
    t = (tok % seqlen).to(tl.int64)
    p = tl.load(pos_ptr + tok).to(tl.float32)
    i = tl.arange(0, BLOCK_D)
    mi = i < HALF
    ang = p * tl.load(f_ptr + i, mask=mi, other=0.0)
    _rotate_heads(x_ptr + b * s_xb + t * s_xt, out_ptr + b * s_ob + t * s_ot, H, s_xh, s_oh, tl.cos(ang)[None, :],
                  (SIGN * tl.sin(ang))[None, :], i, mi, HALF, BLOCK_H)


@functools.lru_cache(maxsize=32)
def _freqs(head_dim: int, theta: float, device: str) -> torch.Tensor:
    return inv_freq(head_dim, theta, device).contiguous()


def _rotate(x, pos, theta: float, sign: float):
    b, t, h, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(b, t, h, d, dtype=x.dtype, device=x.device)
    if b * t == 0:
        return out
    half = d // 2
    block_d = triton.next_power_of_2(half)
    block_h = max(1, min(triton.next_power_of_2(h), 4096 // block_d))
    _rope_kernel[(b * t,)](x, pos, _freqs(d, float(theta), str(x.device)), out, t, h, x.stride(0), x.stride(1),
                           x.stride(2), out.stride(0), out.stride(1), out.stride(2), SIGN=sign, HALF=half,
                           BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4)
    return out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pos, theta):
        ctx.save_for_backward(pos)
        ctx.theta = theta
        return _rotate(x, pos, theta, 1.0)

    @staticmethod
    def backward(ctx, dy):
        (pos,) = ctx.saved_tensors
        return _rotate(dy, pos, ctx.theta, -1.0), None, None


def rope(x, pos, theta: float):
    """See reference.rope. fp64 runs the reference."""
    _check(x, pos)
    if x.dtype == torch.float64:
        return _reference(x, pos, theta)
    return _Rope.apply(x, pos.contiguous(), float(theta))


@triton.jit
def _rope_kv_write_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, f_ptr, qo_ptr, kc_ptr, vc_ptr, pc_ptr, Hq, Hk, ring,
                          s_qb, s_qh, s_kb, s_kh, s_vb, s_vh, s_ob, s_oh, s_kcb, s_kcs, s_kch, s_vcb, s_vcs, s_vch,
                          s_pcb, ROPE: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    # one program per row: q rotated into qo, k rotated and v copied into their cache slot, the position stored
    b = tl.program_id(0).to(tl.int64)
    p = tl.load(pos_ptr + b).to(tl.int64)
    slot = p % ring
    i = tl.arange(0, BLOCK_D)
    mi = i < HALF
    if ROPE:
        ang = p.to(tl.float32) * tl.load(f_ptr + i, mask=mi, other=0.0)
        cos = tl.cos(ang)[None, :]
        sin = tl.sin(ang)[None, :]
    else:
        cos = tl.full((1, BLOCK_D), 1.0, tl.float32)
        sin = tl.zeros((1, BLOCK_D), tl.float32)
    _rotate_heads(q_ptr + b * s_qb, qo_ptr + b * s_ob, Hq, s_qh, s_oh, cos, sin, i, mi, HALF, BLOCK_H)
    _rotate_heads(k_ptr + b * s_kb, kc_ptr + b * s_kcb + slot * s_kcs, Hk, s_kh, s_kch, cos, sin, i, mi, HALF,
                  BLOCK_H)
    _rotate_heads(v_ptr + b * s_vb, vc_ptr + b * s_vcb + slot * s_vcs, Hk, s_vh, s_vch,
                  tl.full((1, BLOCK_D), 1.0, tl.float32), tl.zeros((1, BLOCK_D), tl.float32), i, mi, HALF, BLOCK_H)
    tl.store(pc_ptr + b * s_pcb + slot, p.to(pc_ptr.dtype.element_ty))


def rope_kv_write(q, k, v, pos, k_cache, v_cache, pos_cache, ring_size: int, theta):
    """See reference.rope_kv_write: one launch instead of two rotations, a slot computation and three scatters.
    Odd head dims, fp64 and caches whose last dim is strided run the reference."""
    d = q.shape[-1]
    _check_kv(q, k, v, pos)
    if (d % 2 or q.dtype == torch.float64 or any(t.stride(-1) != 1 for t in (q, k, v, k_cache, v_cache))
            or pos_cache.stride(-1) != 1):
        return _rope_kv_reference(q, k, v, pos, k_cache, v_cache, pos_cache, ring_size, theta)
    batch, hq, _ = q.shape
    hk = k.shape[1]
    out = torch.empty_like(q)
    half = d // 2
    block_d = triton.next_power_of_2(half)
    freqs = _freqs(d, float(theta), str(q.device)) if theta is not None else pos  # unused without rope
    _rope_kv_write_kernel[(batch,)](
        q, k, v, pos, freqs, out, k_cache, v_cache, pos_cache, hq, hk, ring_size, q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        pos_cache.stride(0), ROPE=theta is not None, HALF=half,
        BLOCK_H=max(1, min(triton.next_power_of_2(hq), 2048 // block_d)), BLOCK_D=block_d, num_warps=4)
    return out
