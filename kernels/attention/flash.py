"""flash-attn backend (optional: `pip install braidlm[gpu]`), used when the package imports.

flash-attn has no mask for sinks or strided keys, so sparse layers go to FlexAttention (or the reference when
FlexAttention is unavailable); `handles(kind)` says which kinds run here. Global and local layers use
`window_size` (local: the query plus window - 1 earlier keys); packed rows use the varlen kernel with one
sequence per document. Decode reads the unified cache with `flash_attn_with_kvcache`: a local ring holds
exactly the keys in the window and a global cache its prefix, and both fill slots from 0 in order, so
`cache_seqlens` = min(position + 1, ring size) names the valid slots and attention (order-free) needs no
causal mask.

flash-attn cannot be built on the machines this project is tested on; this path is covered by
tests/test_attention_backends.py wherever flash-attn is installed.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch
from torch import Tensor

from . import reference


def available(device_type: str) -> bool:
    return device_type == "cuda" and importlib.util.find_spec("flash_attn") is not None


def handles(kind: str) -> bool:
    return kind in ("global", "local")


def _window(kind: str, window: int) -> tuple[int, int]:
    return (window - 1, 0) if kind == "local" else (-1, -1)


def _fallback(device_type: str):
    from . import flex
    return flex.attention if flex.available(device_type) else reference.attention


def cu_seqlens(seq_idx: Tensor) -> tuple[Tensor, int]:
    """Document boundaries of packed rows, flattened over the batch: (ndocs + 1,) int32 offsets and the longest
    document's length."""
    batch, seqlen = seq_idx.shape
    starts = torch.ones_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]            # every row starts a document
    begin = starts.flatten().nonzero().flatten()                 # (ndocs,)
    bounds = torch.cat([begin, begin.new_tensor([batch * seqlen])])
    return bounds.to(torch.int32), int((bounds[1:] - bounds[:-1]).max())


def attention(q: Tensor, k: Tensor, v: Tensor, *, kind: str, window: int = 0, sinks: int = 0, stride: int = 0,
              seq_idx: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    """Same contract as `reference.attention`."""
    if not handles(kind):
        return _fallback(q.device.type)(q, k, v, kind=kind, window=window, sinks=sinks, stride=stride,
                                        seq_idx=seq_idx, scale=scale)
    from flash_attn import flash_attn_func, flash_attn_varlen_func
    if seq_idx is None:
        return flash_attn_func(q, k, v, softmax_scale=scale, causal=True, window_size=_window(kind, window))
    b, t = q.shape[:2]
    cu, longest = cu_seqlens(seq_idx)
    out = flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, longest, longest,
                                 softmax_scale=scale, causal=True, window_size=_window(kind, window))
    return out.unflatten(0, (b, t))


def attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, pos_cache: Tensor, q_pos: Tensor, *,
                     ring_start: int, kind: str, window: int = 0, sinks: int = 0, stride: int = 0,
                     scale: Optional[float] = None) -> Tensor:
    """Same contract as `reference.attention_decode`; sparse layers go to the Triton decode kernel."""
    if not handles(kind):
        from .triton_decode import attention_decode as triton_decode
        return triton_decode(q, k_cache, v_cache, pos_cache, q_pos, ring_start=ring_start, kind=kind,
                             window=window, sinks=sinks, stride=stride, scale=scale)
    from flash_attn import flash_attn_with_kvcache
    ring = k_cache.shape[1] - 1  # the last slot is the never-read trash slot
    lens = torch.clamp(q_pos + 1, max=ring).to(torch.int32)
    out = flash_attn_with_kvcache(q[:, None], k_cache, v_cache, cache_seqlens=lens, softmax_scale=scale,
                                  causal=False)
    return out[:, 0]
