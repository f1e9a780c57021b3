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

from .reference import _check, inv_freq
from .reference import rope as _reference


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
    cos = tl.cos(ang)[None, :]
    sin = (SIGN * tl.sin(ang))[None, :]
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        m = (h < H)[:, None] & mi[None, :]
        xp = x_ptr + b * s_xb + t * s_xt + h[:, None].to(tl.int64) * s_xh + i[None, :]
        x1 = tl.load(xp, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(xp + HALF, mask=m, other=0.0).to(tl.float32)
        op = out_ptr + b * s_ob + t * s_ot + h[:, None].to(tl.int64) * s_oh + i[None, :]
        tl.store(op, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=m)
        tl.store(op + HALF, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=m)


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
