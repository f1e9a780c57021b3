"""Attention mixer: causal self-attention, global / local (sliding window) / sparse, with GQA and optional RoPE.

Keys are cached after RoPE, at their absolute position within the document, so a ring buffer that wraps
needs no re-rotation: slot contents and their positions travel together (`KVState.pos`).
"""
from __future__ import annotations

import torch
from torch import nn

from kernels import ops
from kernels.attention import token_positions

from .cache import HybridCache
from .projections import project
from .spec import AttentionSpec


class Attention(nn.Module):
    def __init__(self, spec: AttentionSpec, layer_idx: int, norm_eps: float = 1e-5):
        super().__init__()
        self.spec, self.layer_idx = spec, layer_idx
        s = spec
        self.q_proj = nn.Linear(s.d_model, s.n_heads * s.head_dim, bias=s.qkv_bias)
        self.k_proj = nn.Linear(s.d_model, s.n_kv_heads * s.head_dim, bias=s.qkv_bias)
        self.v_proj = nn.Linear(s.d_model, s.n_kv_heads * s.head_dim, bias=s.qkv_bias)
        self.o_proj = nn.Linear(s.n_heads * s.head_dim, s.d_model, bias=False)

    def input_projections(self):
        """The Linear modules applied first to the normalized input (a decode step may fuse them with the norm:
        hybrid/projections.py norm_project), and whether they form a SwiGLU pair."""
        return (self.q_proj, self.k_proj, self.v_proj), False

    def forward(self, u, cache: HybridCache | None = None, seq_idx=None, projected=None):
        """u: (batch, seqlen, d_model) -> (batch, seqlen, d_model). projected: [q, k, v] already computed from u
        (then u is not read)."""
        s = self.spec
        q, k, v = projected if projected is not None else project(u, self.q_proj, self.k_proj, self.v_proj)
        b, t, _ = q.shape
        q = q.unflatten(-1, (s.n_heads, s.head_dim))     # (batch, seqlen, n_heads, head_dim)
        k = k.unflatten(-1, (s.n_kv_heads, s.head_dim))  # (batch, seqlen, n_kv_heads, head_dim)
        v = v.unflatten(-1, (s.n_kv_heads, s.head_dim))
        mask_args = dict(kind=s.kind, window=s.window, sinks=s.sinks, stride=s.stride)
        if cache is not None and t == 1 and seq_idx is None:  # decode: the next position of every row
            pos = cache.seqlens[:, None]
            kv = cache.layers[self.layer_idx]
            if kv.ring_start == 0:  # global / local: RoPE and the cache write in one op, then read the cache in place
                q = ops.rope_kv_write(q[:, 0], k[:, 0], v[:, 0], pos[:, 0], kv.k, kv.v, kv.pos, kv.ring_size,
                                      s.rope_theta if s.rope else None)
                out = ops.attention_decode(q, kv.k, kv.v, kv.pos, pos[:, 0], ring_start=kv.ring_start, **mask_args)
                return project(out[:, None].flatten(-2), self.o_proj)[0]
        elif cache is None:
            pos = token_positions(seq_idx, b, t, q.device)  # (batch, seqlen)
        else:
            pos = cache.memo("pos", lambda: token_positions(seq_idx, b, t, q.device, cache.seqlens))
        if s.rope:
            q, k = ops.rope(q, pos, s.rope_theta), ops.rope(k, pos, s.rope_theta)
        if cache is None:
            out = ops.attention(q, k, v, seq_idx=seq_idx, **mask_args)
        else:
            kv = cache.layers[self.layer_idx]
            if t == 1:  # decode: write the new key first, then read the cache in place (no concatenated copy)
                kv.write_step(k, v, pos)
                out = ops.attention_decode(q[:, 0], kv.k, kv.v, kv.pos, pos[:, 0], ring_start=kv.ring_start,
                                           **mask_args)[:, None]
                return project(out.flatten(-2), self.o_proj)[0]
            if cache.fresh:  # nothing cached yet: the new tokens attend to each other only
                out = ops.attention(q, k, v, seq_idx=seq_idx, **mask_args)
            else:
                out = ops.attention_with_cache(q, k, v, kv.k, kv.v, kv.pos, pos, ring_start=kv.ring_start,
                                               seq_idx=seq_idx, **mask_args)
            if cache.fresh and seq_idx is None:  # every row: one document from position 0, every token kept
                kv.write_fresh(k, v, pos)
            else:
                keep = cache.memo("keep", lambda: torch.ones_like(pos, dtype=torch.bool) if seq_idx is None
                                  else seq_idx == seq_idx[:, -1:])
                kv.write(k, v, pos, keep, cache.call)
        return self.o_proj(out.flatten(-2))
