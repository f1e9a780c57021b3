"""Causal self-attention with global / local (sliding-window) / sparse masks, on SDPA with explicit masks.

This is the definition of which keys a query sees; faster backends (flash-attn, FlexAttention) are checked
against it. Positions are positions *within a document*: a packed row restarts at 0 for each document, and a
key of another document is never visible.

Visibility of key position j from query position i (both in the same document):
    global: j <= i
    local:  0 <= i - j < window                  (the query itself plus window - 1 previous tokens)
    sparse: j <= i and (i - j < window  or  j < sinks  or  (stride > 0 and (j + 1) % stride == 0))
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def visible(q_pos: Tensor, k_pos: Tensor, kind: str, window: int = 0, sinks: int = 0, stride: int = 0) -> Tensor:
    """Boolean visibility of keys at `k_pos` from queries at `q_pos` (broadcastable integer tensors).

    Negative key positions mark empty cache slots and are never visible.
    """
    ok = (k_pos <= q_pos) & (k_pos >= 0)
    if kind == "global":
        return ok
    near = (q_pos - k_pos) < window
    if kind == "local":
        return ok & near
    if kind != "sparse":
        raise ValueError(f"attention kind {kind!r}: expected global, local or sparse")
    far = k_pos < sinks
    if stride > 0:
        far = far | ((k_pos + 1) % stride == 0)
    return ok & (near | far)


def token_positions(seq_idx: Optional[Tensor], batch: int, seqlen: int, device, offset: Optional[Tensor] = None) -> Tensor:
    """Position of every token within its document. (batch, seqlen) int64.

    seq_idx: (batch, seqlen) non-decreasing document ids, or None for one document per row.
    offset: (batch,) tokens of the row's first document that came before this call (cached); added to the
    positions of that first document only, since later documents start fresh.
    """
    idx = torch.arange(seqlen, device=device).expand(batch, seqlen)  # (batch, seqlen)
    if seq_idx is None:
        pos = idx
        first_doc = torch.ones_like(idx, dtype=torch.bool)
    else:
        starts = torch.ones_like(seq_idx, dtype=torch.bool)
        starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
        # index of the most recent document start at or before each token
        start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
        pos = idx - start_idx
        first_doc = seq_idx == seq_idx[:, :1]
    if offset is not None:
        pos = pos + offset[:, None] * first_doc
    return pos


def _same_doc(seq_idx: Optional[Tensor]) -> Optional[Tensor]:
    if seq_idx is None:
        return None
    return seq_idx[:, :, None] == seq_idx[:, None, :]  # (batch, q, k)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: Optional[float]) -> Tensor:
    # q (batch, lq, hq, d); k, v (batch, lk, hkv, d); mask (batch, lq, lk) True = attend
    hq, hkv = q.shape[2], k.shape[2]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask[:, None], scale=scale, enable_gqa=hq != hkv,
    )
    return out.transpose(1, 2)  # (batch, lq, hq, d)


def attention(q: Tensor, k: Tensor, v: Tensor, *, kind: str, window: int = 0, sinks: int = 0, stride: int = 0,
              seq_idx: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    """Training / prefill attention over one packed row of tokens.

    q: (batch, seqlen, n_heads, head_dim); k, v: (batch, seqlen, n_kv_heads, head_dim), n_heads % n_kv_heads == 0.
    seq_idx: (batch, seqlen) document ids (None: one document per row). Returns (batch, seqlen, n_heads, head_dim).
    """
    b, t = q.shape[:2]
    pos = token_positions(seq_idx, b, t, q.device)
    mask = visible(pos[:, :, None], pos[:, None, :], kind, window, sinks, stride)  # (batch, q, k)
    same = _same_doc(seq_idx)
    if same is not None:
        mask = mask & same
    return _sdpa(q, k, v, mask, scale)


def cache_visible(q_pos: Tensor, pos_cache: Tensor, ring_start: int, kind: str, window: int = 0, sinks: int = 0,
                  stride: int = 0) -> Tensor:
    """Which cache slots the queries at q_pos (batch, t) read: (batch, t, slots) bool.

    Slots [0, ring_start) hold a sparse layer's sink / strided keys, slots [ring_start, slots) the ring of recent
    keys; a far key is read from its own slot only once it has left the window, so no key is counted twice.
    """
    qp = q_pos[:, :, None]                                    # (batch, t, 1)
    kp = pos_cache[:, None, :]                                # (batch, 1, slots)
    ok = visible(qp, kp, kind, window, sinks, stride)
    if kind == "global":
        return ok
    in_ring = torch.arange(pos_cache.shape[1], device=pos_cache.device) >= ring_start
    near = (qp - kp) < window
    return ok & torch.where(in_ring, near, ~near)


def attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, pos_cache: Tensor, q_pos: Tensor, *,
                     ring_start: int, kind: str, window: int = 0, sinks: int = 0, stride: int = 0,
                     scale: Optional[float] = None) -> Tensor:
    """One decode step over a cache that already holds the new token's key (write first, then read).

    q: (batch, n_heads, d); k_cache, v_cache: (batch, slots, n_kv_heads, d); pos_cache: (batch, slots), -1 when
    empty; q_pos: (batch,) the new token's position. Slot layout as in `attention_with_cache`. For a single new
    token writing first is safe: the ring slot it takes held the key at q_pos - ring_size, which has left the
    window (a sink / strided key also keeps its own slot). Returns (batch, n_heads, d).
    """
    mask = cache_visible(q_pos[:, None], pos_cache, ring_start, kind, window, sinks, stride)  # (batch, 1, slots)
    out = _sdpa(q[:, None], k_cache.to(q.dtype), v_cache.to(q.dtype), mask, scale)
    return out[:, 0]


def attention_with_cache(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, pos_cache: Tensor,
                         q_pos: Tensor, *, ring_start: int, kind: str, window: int = 0, sinks: int = 0,
                         stride: int = 0, seq_idx: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    """Attention of new tokens over the cached keys of their sequence plus the new keys themselves.

    q: (batch, t, n_heads, d); k, v: (batch, t, n_kv_heads, d) new keys (RoPE already applied);
    k_cache, v_cache: (batch, slots, n_kv_heads, d); pos_cache: (batch, slots) position held by each slot,
    -1 when empty. Slots [0, ring_start) hold the sparse layer's sink / strided keys; slots [ring_start, slots)
    are the ring of recent keys. A sink or strided key is read from its own slot only once it has left the
    window, so no key is counted twice. q_pos: (batch, t) positions of the new tokens; seq_idx: (batch, t) as
    in `attention` (cached keys belong to the row's first document). The cache is not modified here.
    """
    cached = cache_visible(q_pos, pos_cache, ring_start, kind, window, sinks, stride)  # (batch, t, slots)
    new = visible(q_pos[:, :, None], q_pos[:, None, :], kind, window, sinks, stride)
    same = _same_doc(seq_idx)
    if same is not None:
        new = new & same
        cached = cached & (seq_idx == seq_idx[:, :1])[:, :, None]
    mask = torch.cat([cached, new], dim=2)                    # (batch, t, slots + t)
    keys = torch.cat([k_cache, k.to(k_cache.dtype)], dim=1)
    values = torch.cat([v_cache, v.to(v_cache.dtype)], dim=1)
    return _sdpa(q, keys.to(q.dtype), values.to(q.dtype), mask, scale)
