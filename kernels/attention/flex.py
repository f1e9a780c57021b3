"""Training / prefill attention on PyTorch FlexAttention: block-sparse, so a local or sparse layer only computes
the tiles its mask touches.

Same contract as `reference.attention`. The mask is `reference.visible` on positions within each document, and
with `seq_idx` keys of another document are masked out too. Block masks without document ids depend only on
(kind, window, sinks, stride, seqlen) and are cached; with `seq_idx` they are built once per seq_idx tensor, so
the attention layers of one forward pass share one. Global and local masks are built per 128 x 128 tile from
the documents' bounds (`document_block_mask`: no compile, no L x L evaluation; on a GPU only with
BRAIDLM_TILE_MASKS=1 until it is checked there); sparse ones, whose far keys cut across tiles, by FlexAttention's
element-wise `create_block_mask`. `torch.compile(flex_attention)` is built once per process;
dynamo caches one kernel per shape.

FlexAttention's fused kernels need a GPU; on CPU (tests) `compiled=False` runs its unfused forward, which checks
the mask logic against the reference.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional

import torch
from torch import Tensor

from ..memo import while_unchanged
from .reference import token_positions


def available(device_type: str) -> bool:
    if device_type != "cuda":
        return False
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention
    # one compile per (shape, packed or not); leave room for the shapes of a run before dynamo gives up
    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    return torch.compile(flex_attention, dynamic=False)


def _on_gpu(device) -> bool:
    """Build block masks with a compiled kernel on the GPU: the eager builder materializes the full L x L mask
    (128 GiB at 128K tokens)."""
    return torch.device(device).type == "cuda"


# A window wider than any sequence: `global` is `local` with this window.
UNBOUNDED = 1 << 30
# Compiled FlexAttention (torch 2.11, H100) has no kernel for rows shorter than its 128-token block: inductor
# raises NoValidChoicesError at 37 or 90 tokens, and runs 128 and 300. Shorter rows are padded to this length;
# the padding sits after every real token, so causal rules never let a real query see it, and it is cut off.
MIN_SEQLEN = 128


def mask_mod(kind: str, window: int, sinks: int, stride: int, pos: Optional[Tensor] = None,
             seq_idx: Optional[Tensor] = None, device=None):
    """The visibility rule as a FlexAttention mask_mod(b, h, q_idx, kv_idx). Without `pos` the token index is the
    position (one document per row); with `pos`/`seq_idx` (batch, seqlen) it reads positions and document ids.

    Window / sinks / stride are held in tensors: compiled FlexAttention then sees the same mask code for every
    layer of a kind and does not recompile per window (dynamo specializes on Python ints in a closure, and past
    its recompile limit it silently falls back to the unfused kernel, 100x slower).
    """
    if kind not in ("global", "local", "sparse"):
        raise ValueError(f"attention kind {kind!r}: expected global, local or sparse")
    if kind == "global":
        window = UNBOUNDED
    if kind != "sparse":
        sinks = stride = 0
    device = pos.device if pos is not None else device
    w, s, st = (torch.tensor(x, dtype=torch.int32, device=device) for x in (window, sinks, stride))
    st_safe = torch.clamp(st, min=1)

    # one rule per kind (a local mask pays nothing for the sparse terms); each is compiled once per shape
    if kind == "global":
        def rule(qp, kp):
            return kp <= qp
    elif kind == "local":
        def rule(qp, kp):
            return (kp <= qp) & (qp - kp < w)
    else:
        def rule(qp, kp):
            far = (kp < s) | ((st > 0) & ((kp + 1) % st_safe == 0))
            return (kp <= qp) & ((qp - kp < w) | far)

    if pos is None:
        def mod(b, h, q_idx, kv_idx):
            return rule(q_idx, kv_idx)
    else:
        def mod(b, h, q_idx, kv_idx):
            same = seq_idx[b, q_idx] == seq_idx[b, kv_idx]
            return same & rule(pos[b, q_idx], pos[b, kv_idx])
    return mod


@functools.lru_cache(maxsize=64)
def _static_block_mask(kind: str, window: int, sinks: int, stride: int, seqlen: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask
    mod = mask_mod(kind, window, sinks, stride, device=device)
    if kind != "sparse" and _tile_masks(device):  # one document: the tile-level builder, batch 1 (broadcast)
        one_doc = torch.zeros(1, seqlen, dtype=torch.int64, device=device)
        return document_block_mask(UNBOUNDED if kind == "global" else window, one_doc, mod)
    return create_block_mask(mod, None, None, seqlen, seqlen, device=device, _compile=_on_gpu(device))


BLOCK = 128  # FlexAttention's default tile, queries and keys
# The tile-level builder below is tested on the CPU only so far: on a GPU it is used when BRAIDLM_TILE_MASKS=1,
# until a GPU run has checked it against the compiled element-wise builder (then it becomes the default there).
TILE_MASKS_ON_GPU = os.environ.get("BRAIDLM_TILE_MASKS", "0") not in ("", "0")


def _tile_masks(device) -> bool:
    return not _on_gpu(device) or TILE_MASKS_ON_GPU


def document_block_mask(window: int, seq_idx: Tensor, mod):
    """The BlockMask of causal attention within a window (global: UNBOUNDED) over packed documents, built at the
    level of 128 x 128 tiles from each tile's first and last document id: no L x L mask is evaluated and nothing
    is compiled, so a new seq_idx (every training step) or a new length costs a few small tensor ops.

    A tile pair is skipped when no query can see a key in it (keys after the queries, no document in common, or
    all pairs further apart than the window); it is full (no mask_mod) when one document spans both tiles, the
    keys come strictly before the queries and every pair is within the window; else `mod` decides per element.
    A tile that is cut by the end of the row is never full."""
    from torch.nn.attention.flex_attention import BlockMask
    b, t = seq_idx.shape
    nb = -(-t // BLOCK)
    starts = torch.arange(nb, device=seq_idx.device) * BLOCK
    lo = seq_idx[:, starts]                                        # (batch, nb) first document of each tile
    hi = seq_idx[:, torch.clamp(starts + BLOCK - 1, max=t - 1)]    # last document (ids never decrease)
    i, j = starts[:, None], starts[None, :]                        # query tile, key tile (first token)
    overlap = hi[:, None, :] >= lo[:, :, None]                     # key tile j <= i reaches query tile i's docs
    near = torch.clamp(i - (j + BLOCK - 1), min=0) < window        # the closest pair is within the window
    seen = (j <= i) & near & overlap
    whole = (starts + BLOCK <= t) & (lo == hi)                     # a complete tile of one document
    full = (j < i) & (i + BLOCK - 1 - j < window) & whole[:, :, None] & whole[:, None, :] & \
        (lo[:, :, None] == lo[:, None, :])
    partial = seen & ~full

    def packed(sel):
        order = torch.argsort(sel.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return sel.sum(-1, dtype=torch.int32)[:, None], order[:, None]
    (num, idx), (full_num, full_idx) = packed(partial), packed(full)
    return BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=BLOCK, mask_mod=mod, seq_lengths=(t, t))


# (kind, window, sinks, stride, batch, seqlen, device) -> the BlockMask of the current packed batch (memo.py)
_PACKED_MASKS: dict = {}


def block_mask(kind: str, window: int, sinks: int, stride: int, batch: int, seqlen: int, device,
               seq_idx: Optional[Tensor] = None):
    """The BlockMask of one call: cached when there are no document ids; with them, reused for as long as the
    same seq_idx tensor (unmodified) comes back, as it does for every attention layer of a forward pass."""
    if seq_idx is None:
        return _static_block_mask(kind, window, sinks, stride, seqlen, str(torch.device(device)))
    key = (kind, window, sinks, stride, batch, seqlen, str(torch.device(device)))
    return while_unchanged(_PACKED_MASKS, key, seq_idx,
                           lambda: _packed_block_mask(kind, window, sinks, stride, batch, seqlen, device, seq_idx))


def _packed_block_mask(kind: str, window: int, sinks: int, stride: int, batch: int, seqlen: int, device,
                       seq_idx: Tensor):
    from torch.nn.attention.flex_attention import create_block_mask
    pos = token_positions(seq_idx, batch, seqlen, device)
    mod = mask_mod(kind, window, sinks, stride, pos, seq_idx)
    if kind == "sparse" or not _tile_masks(device):  # far keys (sinks, strided) cut across tiles: element-wise
        return create_block_mask(mod, batch, None, seqlen, seqlen, device=device, _compile=_on_gpu(device))
    return document_block_mask(UNBOUNDED if kind == "global" else window, seq_idx, mod)


def attention(q: Tensor, k: Tensor, v: Tensor, *, kind: str, window: int = 0, sinks: int = 0, stride: int = 0,
              seq_idx: Optional[Tensor] = None, scale: Optional[float] = None, compiled: bool = True) -> Tensor:
    """q: (batch, seqlen, n_heads, head_dim); k, v: (batch, seqlen, n_kv_heads, head_dim); seq_idx: (batch, seqlen).
    Returns (batch, seqlen, n_heads, head_dim)."""
    from torch.nn.attention.flex_attention import flex_attention
    b, t, hq, _ = q.shape
    hkv = k.shape[2]
    if hq % hkv:
        raise ValueError(f"attention: {hq} query heads is not a multiple of {hkv} kv heads")
    if compiled and t < MIN_SEQLEN:
        if seq_idx is not None:  # the padding is a document of its own
            seq_idx = torch.cat([seq_idx, (seq_idx.amax(1, keepdim=True) + 1).expand(b, MIN_SEQLEN - t)], 1)
        q, k, v = (_pad_to(x, MIN_SEQLEN, 1) for x in (q, k, v))
        return attention(q, k, v, kind=kind, window=window, sinks=sinks, stride=stride,
                         seq_idx=seq_idx, scale=scale, compiled=True)[:, :t]
    fn = _compiled_flex() if compiled else flex_attention
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if kind == "sparse" and seq_idx is None and (sinks > 0 or stride > 0):
        return _sparse_split(fn, qt, kt, vt, window, sinks, stride, scale).transpose(1, 2)
    mask = block_mask(kind, window, sinks, stride, b, t, q.device, seq_idx)
    out = fn(qt, kt, vt, block_mask=mask, scale=scale, enable_gqa=hq != hkv)
    return out.transpose(1, 2)


@functools.lru_cache(maxsize=64)
def far_positions(seqlen: int, sinks: int, stride: int, device: str) -> Tensor:
    """Positions of a sparse layer's sink and strided keys in a row of `seqlen` tokens. (n_far,) int64."""
    p = torch.arange(seqlen, device=device)
    far = p < sinks
    if stride > 0:
        far = far | ((p + 1) % stride == 0)
    return p[far]


@functools.lru_cache(maxsize=64)
def _far_block_mask(window: int, sinks: int, stride: int, seqlen: int, device: str):
    """Queries x far keys: a far key is read here only once it has left the query's window (the window part
    reads it before), so the two parts never count a key twice."""
    from torch.nn.attention.flex_attention import create_block_mask
    fp = far_positions(seqlen, sinks, stride, device).to(torch.int32)
    w = torch.tensor(window, dtype=torch.int32, device=device)

    def mod(b, h, q_idx, kv_idx):
        kp = fp[kv_idx]
        return (kp <= q_idx) & (q_idx - kp >= w)
    return create_block_mask(mod, None, None, seqlen, len(fp), device=device, _compile=_on_gpu(device))


def _with_lse(fn, q, k, v, mask, scale):
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # torch < 2.9
        return fn(q, k, v, block_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1], return_lse=True)
    out, aux = fn(q, k, v, block_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
                  return_aux=AuxRequest(lse=True))
    return out, aux.lse


def _sparse_split(fn, q, k, v, window, sinks, stride, scale):
    """Sparse attention as two exact parts merged by their log-sum-exps: the sliding window (a block-sparse
    band, mostly full blocks) and the few far keys (sinks + strided, gathered: seqlen / stride + sinks of
    them). One mask over all keys would make every block partial (a strided key in each), which FlexAttention
    runs slower than dense causal attention. q: (batch, heads, seqlen, d); k, v: (batch, kv_heads, seqlen, d)."""
    t = q.shape[2]
    dev = str(q.device)
    near, lse_near = _with_lse(fn, q, k, v, _static_block_mask("local", window, 0, 0, t, dev), scale)
    fp = far_positions(t, sinks, stride, dev)
    if len(fp) == 0:
        return near
    far, lse_far = _with_lse(fn, q, k[:, :, fp], v[:, :, fp], _far_block_mask(window, sinks, stride, t, dev), scale)
    lse = torch.logaddexp(lse_near, lse_far)  # (batch, heads, seqlen); lse_far is -inf where no far key is seen
    out = near.float() * torch.exp(lse_near - lse)[..., None] + far.float() * torch.exp(lse_far - lse)[..., None]
    return out.to(q.dtype)


def _cache_mod(kind: str, window: int, sinks: int, stride: int, ring_start: int, q_pos: Tensor, pos_cache: Tensor,
               first_doc: Optional[Tensor]):
    """mask_mod over (new token, cache slot): `reference.cache_visible`, and only for tokens of the row's first
    document (the one the cache holds). The visibility of positions is `mask_mod`'s rule."""
    rule = mask_mod(kind, window, sinks, stride, device=q_pos.device)  # called with positions, not indices
    w, rs = (torch.tensor(x, dtype=torch.int64, device=q_pos.device) for x in (window, ring_start))

    def mod(b, h, q_idx, kv_idx):
        qp, kp = q_pos[b, q_idx], pos_cache[b, kv_idx]
        ok = rule(b, h, qp, kp) & (kp >= 0)
        if kind == "sparse":  # a sink / strided key is read from its own slot only once it has left the window
            near = (qp - kp) < w
            ok = ok & torch.where(kv_idx >= rs, near, ~near)
        if first_doc is not None:
            ok = ok & first_doc[b, q_idx]
        return ok
    return mod


def _pad_to(x: Tensor, n: int, dim: int, value=0) -> Tensor:
    if x.shape[dim] >= n:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, n - x.shape[dim]]
    return torch.nn.functional.pad(x, pad, value=value)


def attention_with_cache(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, pos_cache: Tensor,
                         q_pos: Tensor, *, ring_start: int, kind: str, window: int = 0, sinks: int = 0,
                         stride: int = 0, seq_idx: Optional[Tensor] = None, scale: Optional[float] = None,
                         compiled: Optional[bool] = None) -> Tensor:
    """Same contract as `reference.attention_with_cache`, with no (tokens x slots) mask materialized: two
    FlexAttention calls, the new tokens over the cache slots and over themselves, merged by their log-sum-exps
    (the cache is read in place, never concatenated with the new keys). compiled: fused kernels (default: on a
    GPU); False runs FlexAttention's unfused path (CPU tests)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    compiled = q.is_cuda if compiled is None else compiled
    fn = _compiled_flex() if compiled else flex_attention
    b, t, hq, _ = q.shape
    if hq % k.shape[2]:
        raise ValueError(f"attention_with_cache: {hq} query heads is not a multiple of {k.shape[2]} kv heads")
    n = max(t, MIN_SEQLEN) if compiled else t  # compiled FlexAttention needs rows of at least one block
    if seq_idx is None:
        seq_idx = torch.zeros(b, t, dtype=torch.int64, device=q.device)
    first = seq_idx == seq_idx[:, :1]
    # padding: queries and new keys at the end, in a document of their own at position -1 (never visible)
    qp = _pad_to(q_pos, n, 1, value=-1)
    sq = _pad_to(seq_idx, n, 1, value=-1) if n > t else seq_idx
    first = _pad_to(first, n, 1, value=False)
    slots = max(k_cache.shape[1], MIN_SEQLEN) if compiled else k_cache.shape[1]
    pc = _pad_to(pos_cache, slots, 1, value=-1)
    qt, kt, vt = (_pad_to(x, n, 1).transpose(1, 2) for x in (q, k, v))
    kc, vc = (_pad_to(x.to(q.dtype), slots, 1).transpose(1, 2) for x in (k_cache, v_cache))
    on_gpu = _on_gpu(q.device)
    cache_mask = create_block_mask(_cache_mod(kind, window, sinks, stride, ring_start, qp, pc, first), b, None, n,
                                   slots, device=q.device, _compile=on_gpu)
    new_rule = mask_mod(kind, window, sinks, stride, device=q.device)

    def new_mod(bb, h, q_idx, kv_idx):
        kp = qp[bb, kv_idx]
        return (sq[bb, q_idx] == sq[bb, kv_idx]) & (kp >= 0) & new_rule(bb, h, qp[bb, q_idx], kp)
    new_mask = create_block_mask(new_mod, b, None, n, n, device=q.device, _compile=on_gpu)
    out_c, lse_c = _with_lse(fn, qt, kc, vc, cache_mask, scale)
    out_n, lse_n = _with_lse(fn, qt, kt, vt, new_mask, scale)
    lse = torch.logaddexp(lse_c, lse_n)  # every real token sees itself: lse_n is finite there
    out = out_c.float() * torch.exp(lse_c - lse)[..., None] + out_n.float() * torch.exp(lse_n - lse)[..., None]
    return out.to(q.dtype).transpose(1, 2)[:, :t]
