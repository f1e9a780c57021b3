"""flash-attn backend: FlashAttention-4 (`flash_attn.cute`) on Hopper / Blackwell, flash-attn 2 on Ampere / Ada.

Which library runs is chosen once per process from what imports and the GPU's compute capability (`library()`;
`python -m kernels` prints it): FlashAttention-4 (`pip install "flash-attn-4[cu13]"`, pure Python, JIT-compiled
through NVIDIA's CuTe DSL) needs sm_90 or newer, flash-attn 2 sm_80 or newer.

Global and local layers run here: causal attention with `window_size` (local: the query plus window - 1
earlier keys), GQA, head dims up to 256 in multiples of 8, fp16/bf16; packed rows through the varlen kernel
with one sequence per document (`cu_seqlens`, built once per forward pass and shared by its layers). What the
library cannot do goes to FlexAttention (or the SDPA reference where FlexAttention is unavailable), and is
reported once per reason with a warning and in `FALLBACKS`; never silently wrong:
- sparse layers (sinks and strided keys are no window): always, by design (`handles`);
- fp32 inputs (a model run without autocast) or a head dim the kernels do not have.

Decode reads the unified cache with `cache_seqlens` / `seqused_k` (flash-attn 2's `flash_attn_with_kvcache`,
FlashAttention-4's varlen entry): a local ring holds exactly the keys in the window and a global cache its
prefix, and both fill slots from 0 in order, so min(position + 1, ring size) names the valid slots and
attention (order-free) needs no causal mask. Sparse layers decode in the Triton kernel, and so do small
batches under FlashAttention-4 on Hopper (it has no split-KV there: `FA4_DECODE_MIN_BLOCKS`).
"""
from __future__ import annotations

import functools
import importlib
import warnings
from typing import Optional

import torch
from torch import Tensor

from . import reference
from ..memo import while_unchanged

HALF = (torch.float16, torch.bfloat16)
# reason -> calls that fell back for it (reported once each with a warning)
FALLBACKS: dict[str, int] = {}


def _imports(module: str, attr: str) -> bool:
    try:
        return hasattr(importlib.import_module(module), attr)
    except Exception:  # a broken or partial install (e.g. the CuTe DSL libraries missing) is "not installed"
        return False


@functools.lru_cache(maxsize=None)
def library() -> Optional[str]:
    """'fa4' (FlashAttention-4), 'fa2' (flash-attn 2) or None: the library this process runs, for its GPU."""
    if not torch.cuda.is_available():
        return None
    major = _major()
    if major >= 9 and _imports("flash_attn.cute", "flash_attn_varlen_func"):
        return "fa4"
    if major >= 8 and _imports("flash_attn", "flash_attn_varlen_func"):
        return "fa2"
    return None


def describe() -> str:
    """One line for `python -m kernels`: the library, its version, and what it runs."""
    lib = library()
    if lib is None:
        return "flash-attn: not installed (or no GPU it supports); attention runs FlexAttention / SDPA"
    from importlib.metadata import PackageNotFoundError, version
    dist = "flash-attn-4" if lib == "fa4" else "flash-attn"
    try:
        ver = version(dist)
    except PackageNotFoundError:
        ver = "version unknown"
    name = "FlashAttention-4 (flash_attn.cute)" if lib == "fa4" else "flash-attn 2"
    return f"flash-attn: {name} {ver}: global and local layers; sparse layers run FlexAttention"


def available(device_type: str) -> bool:
    return device_type == "cuda" and library() is not None


def handles(kind: str) -> bool:
    return kind in ("global", "local")


def unsupported(q: Tensor, kind: str) -> Optional[str]:
    """Why this call cannot run in flash-attn (None when it can)."""
    if not handles(kind):
        return f"{kind} masks (sinks and strided keys)"
    if q.dtype not in HALF:
        return f"{q.dtype} inputs (flash-attn runs fp16/bf16; train under autocast)"
    d = q.shape[-1]
    if d % 8 or d > 256:
        return f"head dim {d} (flash-attn has multiples of 8 up to 256)"
    return None


def _report(reason: str, to: str) -> None:
    if reason not in FALLBACKS and not reason.startswith("sparse"):  # sparse is by design, documented above
        warnings.warn(f"flash-attn cannot run {reason}; these layers use {to} instead", stacklevel=3)
    FALLBACKS[reason] = FALLBACKS.get(reason, 0) + 1


def _window(kind: str, window: int, lib: str) -> tuple:
    if kind == "local":
        return (window - 1, 0)
    return (None, None) if lib == "fa4" else (-1, -1)


def _fallback(device_type: str):
    from . import flex
    if flex.available(device_type):
        return "FlexAttention", flex.attention
    return "the SDPA reference", reference.attention


def cu_seqlens(seq_idx: Tensor) -> tuple[Tensor, int]:
    """Document boundaries of packed rows, flattened over the batch: (ndocs + 1,) int32 offsets and the longest
    document's length."""
    batch, seqlen = seq_idx.shape
    starts = torch.ones_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]            # every row starts a document
    begin = starts.flatten().nonzero().flatten()                 # (ndocs,)
    bounds = torch.cat([begin, begin.new_tensor([batch * seqlen])])
    return bounds.to(torch.int32), int((bounds[1:] - bounds[:-1]).max())


# the cu_seqlens of the current packed batch (memo.py): one host sync per forward pass, not one per layer
_CU_SEQLENS: dict = {}


def _shared_cu_seqlens(seq_idx: Tensor) -> tuple[Tensor, int]:
    return while_unchanged(_CU_SEQLENS, "cu", seq_idx, lambda: cu_seqlens(seq_idx))


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def attention(q: Tensor, k: Tensor, v: Tensor, *, kind: str, window: int = 0, sinks: int = 0, stride: int = 0,
              seq_idx: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    """Same contract as `reference.attention`."""
    reason = unsupported(q, kind)
    if reason is not None:
        name, fn = _fallback(q.device.type)
        _report(reason, name)
        return fn(q, k, v, kind=kind, window=window, sinks=sinks, stride=stride, seq_idx=seq_idx, scale=scale)
    lib = library()
    mod = importlib.import_module("flash_attn.cute" if lib == "fa4" else "flash_attn")
    win = _window(kind, window, lib)
    if seq_idx is None:
        return _first(mod.flash_attn_func(q, k, v, softmax_scale=scale, causal=True, window_size=win))
    b, t = q.shape[:2]
    cu, longest = _shared_cu_seqlens(seq_idx)
    flat = [x.flatten(0, 1) for x in (q, k, v)]
    if lib == "fa4":
        out = mod.flash_attn_varlen_func(*flat, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest,
                                         max_seqlen_k=longest, softmax_scale=scale, causal=True, window_size=win)
    else:
        out = mod.flash_attn_varlen_func(*flat, cu, cu, longest, longest, softmax_scale=scale, causal=True,
                                         window_size=win)
    return _first(out).unflatten(0, (b, t))


def attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, pos_cache: Tensor, q_pos: Tensor, *,
                     ring_start: int, kind: str, window: int = 0, sinks: int = 0, stride: int = 0,
                     scale: Optional[float] = None) -> Tensor:
    """Same contract as `reference.attention_decode`; sparse layers, fp32 caches and (FlashAttention-4 on
    Hopper) batches too small to fill the GPU go to the Triton split-KV decode kernel."""
    reason = unsupported(q, kind) or (None if k_cache.dtype == q.dtype else f"a {k_cache.dtype} cache")
    if reason is not None:
        _report(reason, "the Triton decode kernel")
    if reason is not None or library() == "fa4" and not _fa4_decode_fills_gpu(q.shape[0] * k_cache.shape[2]):
        return _triton_decode(q, k_cache, v_cache, pos_cache, q_pos, ring_start=ring_start, kind=kind,
                              window=window, sinks=sinks, stride=stride, scale=scale)
    ring = k_cache.shape[1] - 1  # the last slot is the never-read trash slot
    lens = torch.clamp(q_pos + 1, max=ring).to(torch.int32)
    if library() == "fa4":
        from flash_attn.cute import flash_attn_varlen_func
        # split-KV (num_splits 0: the library's heuristic) exists on Blackwell only; on Hopper one split
        out = flash_attn_varlen_func(q[:, None], k_cache, v_cache, seqused_k=lens, softmax_scale=scale,
                                     causal=False, num_splits=0 if _major() >= 10 else 1)
    else:
        from flash_attn import flash_attn_with_kvcache
        out = flash_attn_with_kvcache(q[:, None], k_cache, v_cache, cache_seqlens=lens, softmax_scale=scale,
                                      causal=False)
    return _first(out)[:, 0]


def _triton_decode(*args, **kw):
    from .triton_decode import attention_decode
    return attention_decode(*args, **kw)


@functools.lru_cache(maxsize=None)
def _major() -> int:
    return torch.cuda.get_device_capability()[0]


@functools.lru_cache(maxsize=None)
def _sm_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


# FlashAttention-4 decodes with one split per (row, kv head) on Hopper: it wins where those fill the GPU (H200,
# batch 64 x 8 kv heads: 249 vs 277 us at 4K keys, 938 vs 1051 us at 16K) and loses badly where they do not
# (batch 1: 675 vs 75 us at 64K keys; batch 8: 674 vs 500 us), where the Triton split-KV kernel runs instead.
# None: twice the GPU's SM count (rows x kv heads); tests set 0 to force FlashAttention-4.
FA4_DECODE_MIN_BLOCKS: Optional[int] = None


def _fa4_decode_fills_gpu(blocks: int) -> bool:
    if _major() >= 10:
        return True
    need = FA4_DECODE_MIN_BLOCKS
    if need is None:
        need = 2 * _sm_count(torch.cuda.current_device())
    return blocks >= need
