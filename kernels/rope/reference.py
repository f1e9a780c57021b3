"""Rotary position embedding (rotate-half convention, as LLaMA and Hugging Face)."""
from __future__ import annotations

import torch
from torch import Tensor


def inv_freq(head_dim: int, theta: float, device) -> Tensor:
    """theta ** (-2i / head_dim) for i < head_dim / 2, fp32: the angle per position of each rotated pair."""
    return theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)


def _check(x: Tensor, pos: Tensor) -> None:
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"rope: x {tuple(x.shape)}: expected (batch, seqlen, heads, head_dim) with even head_dim")
    if tuple(pos.shape) != tuple(x.shape[:2]) or pos.dtype.is_floating_point:
        raise ValueError(f"rope: pos {tuple(pos.shape)} {pos.dtype}: expected integer positions of shape "
                         f"{tuple(x.shape[:2])}")


def rope(x: Tensor, pos: Tensor, theta: float) -> Tensor:
    """x: (batch, seqlen, heads, head_dim); pos: (batch, seqlen) integer positions. Angles pos * inv_freq in fp32,
    the rotation in fp32 (fp64 for fp64 x); returns x's dtype and shape."""
    _check(x, pos)
    d = x.shape[-1]
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    angles = (pos.to(torch.float32)[..., None] * inv_freq(d, theta, x.device)).to(ct)  # (batch, seqlen, d/2)
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1)[:, :, None]                  # (batch, seqlen, 1, d)
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1)[:, :, None]
    x1, x2 = x.to(ct).chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.to(ct) * cos + rotated * sin).to(x.dtype)


def _check_kv(q: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or tuple(pos.shape) != (q.shape[0],):
        raise ValueError(f"rope_kv_write: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, pos "
                         f"{tuple(pos.shape)}: expected (batch, heads, head_dim), two (batch, kv_heads, head_dim) "
                         "and (batch,)")


def rope_kv_write(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, k_cache: Tensor, v_cache: Tensor, pos_cache: Tensor,
                  ring_size: int, theta) -> Tensor:
    """A decode step's attention input: q (batch, heads, head_dim) and the new key k (batch, kv_heads, head_dim)
    rotated to their position pos (batch,) (theta None: no rotation), then k and v written into the cache at
    slot pos % ring_size: k_cache, v_cache (batch, slots, kv_heads, head_dim), pos_cache (batch, slots) takes
    pos. Returns q (rotated), in q's dtype; the caches are written in place."""
    _check_kv(q, k, v, pos)
    p = pos[:, None]
    if theta is not None:
        q, k = rope(q[:, None], p, theta)[:, 0], rope(k[:, None], p, theta)[:, 0]
    slot = (p % ring_size).to(torch.int64)
    idx = slot[:, :, None, None].expand(-1, 1, *k.shape[1:])
    k_cache.scatter_(1, idx, k[:, None].to(k_cache.dtype))
    v_cache.scatter_(1, idx, v[:, None].to(v_cache.dtype))
    pos_cache.scatter_(1, slot, p.to(pos_cache.dtype))
    return q
