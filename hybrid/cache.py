"""HybridCache: every layer's inference state, allocated once for (batch, max_len).

Per layer, by mixer:
  mamba1 / mamba2  -> SSMState: conv_state (batch, conv_channels, d_conv - 1) in the model dtype and the
                      ssm_state in fp32 (the recurrence is compounded over every step).
  local attention  -> KVState with a ring of `window` slots: memory independent of max_len.
  sparse attention -> KVState with `sinks` slots, max_len // stride strided slots, and a ring of `window`.
  global attention -> KVState with max_len slots.
  MLP-only layer   -> None.
Every KVState has one extra "trash" slot at the end: tokens that must not be stored (left padding, keys that
fell out of the ring within one prefill) are scattered there, so writes have static shapes and no branches,
which is what capturing decode in a CUDA graph needs. Its position stays -1, so it is never attended.

`seqlens` (batch,) counts the tokens of each row's current document held in the cache; it is the position
of the next token. The cache is data: mixers read and write only their own slot.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from .spec import AttentionSpec, Layout


@dataclass
class SSMState:
    conv: Tensor   # (batch, conv_channels, d_conv - 1)
    ssm: Tensor    # mamba1: (batch, d_inner, d_state); mamba2: (batch, nheads, headdim, d_state); fp32


@dataclass
class KVState:
    k: Tensor      # (batch, slots + 1, n_kv_heads, head_dim)
    v: Tensor      # (batch, slots + 1, n_kv_heads, head_dim)
    pos: Tensor    # (batch, slots + 1) int64 position held by each slot, -1 = empty
    ring_start: int   # slots [0, ring_start): sinks then strided keys; [ring_start, slots): the ring
    ring_size: int
    sinks: int
    stride: int

    @property
    def trash(self) -> int:
        return self.pos.shape[1] - 1

    def write(self, k: Tensor, v: Tensor, pos: Tensor, keep: Tensor, memo: Optional[dict] = None) -> None:
        """Store new keys. k, v: (batch, t, n_kv_heads, head_dim); pos: (batch, t) their positions;
        keep: (batch, t) bool, False for tokens that must not enter the cache (padding, earlier documents).
        memo: the model call's scratch dict (HybridCache.call): layers of one geometry share the slot indices."""
        key = ("slots", self.ring_start, self.ring_size, self.sinks, self.stride, self.trash)
        if memo is not None and key in memo:
            ring_slot, far_slot = memo[key]
        else:
            ring_slot, far_slot = self._slots(pos, keep)
            if memo is not None:
                memo[key] = ring_slot, far_slot
        self._scatter(ring_slot, k, v, pos)
        if far_slot is not None:
            self._scatter(far_slot, k, v, pos)
        self.pos[:, self.trash] = -1

    def _slots(self, pos: Tensor, keep: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """(ring slot, sink / strided slot or None) of every new token; the trash slot for tokens not kept."""
        trash = torch.full_like(pos, self.trash)
        last = torch.where(keep, pos, torch.full_like(pos, -1)).amax(dim=1, keepdim=True)  # (batch, 1)
        # a token enters the ring only if it is among the ring_size most recent: no two writes share a slot
        in_ring = keep & (pos > last - self.ring_size)
        ring_slot = torch.where(in_ring, self.ring_start + pos % self.ring_size, trash)
        if self.ring_start == 0:
            return ring_slot, None
        far_slot = trash
        if self.sinks > 0:
            far_slot = torch.where(keep & (pos < self.sinks), pos, far_slot)
        if self.stride > 0:
            j = self.sinks + (pos + 1) // self.stride - 1
            strided = keep & (pos >= self.sinks) & ((pos + 1) % self.stride == 0) & (j < self.ring_start)
            far_slot = torch.where(strided, j, far_slot)
        return ring_slot, far_slot

    def write_fresh(self, k: Tensor, v: Tensor, pos: Tensor) -> None:
        """`write` into an empty cache of rows that each hold one document starting at position 0 (pos[:, i] = i,
        every token kept): the ring's slots are two contiguous runs, so this is slice copies instead of
        scatters and index arithmetic. A sparse layer's sink / strided slots take `write`."""
        if self.ring_start > 0:
            self.write(k, v, pos, torch.ones_like(pos, dtype=torch.bool))
            return
        t, ring = k.shape[1], self.ring_size
        first = max(0, t - ring)                 # the ring keeps the last `ring` tokens; token p in slot p % ring
        start = first % ring
        head = min(t - first, ring - start)      # tokens up to the ring's end, then the rest from slot 0
        for dst, src in ((self.k, k), (self.v, v), (self.pos, pos)):
            dst[:, start:start + head].copy_(src[:, first:first + head])
            if first + head < t:
                dst[:, :t - first - head].copy_(src[:, first + head:])

    def write_step(self, k: Tensor, v: Tensor, pos: Tensor) -> None:
        """`write` for one new token per row that is always kept (a decode step): its ring slot straight from its
        position, three scatters and no trash-slot traffic; a sparse layer's sink / strided slots take `write`."""
        if self.ring_start > 0:
            self.write(k, v, pos, torch.ones_like(pos, dtype=torch.bool))
            return
        self._scatter(pos % self.ring_size, k, v, pos)

    def _scatter(self, slot: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> None:
        idx = slot[:, :, None, None].expand_as(k)
        self.k.scatter_(1, idx, k.to(self.k.dtype))
        self.v.scatter_(1, idx, v.to(self.v.dtype))
        self.pos.scatter_(1, slot, pos)


def _kv_slots(spec: AttentionSpec, max_len: int) -> tuple[int, int]:
    """(ring_start, ring_size) for an attention layer."""
    if spec.kind == "global":
        return 0, max_len
    far = 0
    if spec.kind == "sparse":
        far = spec.sinks + (max_len // spec.stride if spec.stride else 0)
    return far, min(spec.window, max_len)


@dataclass
class HybridCache:
    layers: list                       # per layer: SSMState | KVState | None
    seqlens: Tensor                    # (batch,) int64
    max_len: int
    nbytes_by_layer: list = field(default_factory=list)
    # set by the model for the call in progress: a prefill into a cache that holds nothing yet (attention then
    # runs over the new tokens alone, through the training path's kernels, and only writes the cache)
    fresh: bool = False
    # the model call in progress's scratch (None outside HybridLM.forward): what every attention layer of the call
    # would compute alike (token positions, which tokens are kept, cache slots) is computed once
    call: Optional[dict] = None

    def memo(self, key, make):
        """make() once per model call (every call outside one)."""
        if self.call is None:
            return make()
        if key not in self.call:
            self.call[key] = make()
        return self.call[key]

    @classmethod
    def allocate(cls, layout: Layout, batch: int, max_len: int, dtype=torch.float32, device="cpu") -> "HybridCache":
        """Allocate every layer's state for `batch` sequences of up to `max_len` tokens."""
        if batch < 1 or max_len < 1:
            raise ValueError(f"HybridCache.allocate: batch={batch}, max_len={max_len}; both must be >= 1")
        layers = []
        for layer in layout.layers:
            if layer.mixer == "mamba1":
                s = layer.mamba1
                layers.append(SSMState(
                    conv=torch.zeros(batch, s.d_inner, s.d_conv - 1, dtype=dtype, device=device),
                    ssm=torch.zeros(batch, s.d_inner, s.d_state, dtype=torch.float32, device=device)))
            elif layer.mixer == "mamba2":
                s = layer.mamba2
                layers.append(SSMState(
                    conv=torch.zeros(batch, s.conv_dim, s.d_conv - 1, dtype=dtype, device=device),
                    ssm=torch.zeros(batch, s.nheads, s.headdim, s.d_state, dtype=torch.float32, device=device)))
            elif layer.mixer == "attention":
                s = layer.attention
                ring_start, ring_size = _kv_slots(s, max_len)
                slots = ring_start + ring_size + 1
                layers.append(KVState(
                    k=torch.zeros(batch, slots, s.n_kv_heads, s.head_dim, dtype=dtype, device=device),
                    v=torch.zeros(batch, slots, s.n_kv_heads, s.head_dim, dtype=dtype, device=device),
                    pos=torch.full((batch, slots), -1, dtype=torch.int64, device=device),
                    ring_start=ring_start, ring_size=ring_size,
                    sinks=s.sinks if s.kind == "sparse" else 0,
                    stride=s.stride if s.kind == "sparse" else 0))
            else:
                layers.append(None)
        seqlens = torch.zeros(batch, dtype=torch.int64, device=device)
        return cls(layers=layers, seqlens=seqlens, max_len=max_len)

    @property
    def batch(self) -> int:
        return self.seqlens.shape[0]

    def tensors(self, index: Optional[int] = None) -> list[Tensor]:
        """Every tensor held (for one layer, or all layers and seqlens)."""
        layers = self.layers if index is None else [self.layers[index]]
        out = [] if index is not None else [self.seqlens]
        for s in layers:
            if isinstance(s, SSMState):
                out += [s.conv, s.ssm]
            elif isinstance(s, KVState):
                out += [s.k, s.v, s.pos]
        return out

    def nbytes(self, layer: Optional[int] = None) -> int:
        """Bytes held by the cache (one layer's, or the whole cache's)."""
        return sum(t.numel() * t.element_size() for t in self.tensors(layer))

    def reset(self, rows: Optional[Tensor] = None) -> None:
        """Empty the cache in place (same tensors, so a captured graph stays valid); rows: (batch,) bool, only
        those rows (the others keep their state)."""
        if rows is None:
            rows = torch.ones_like(self.seqlens, dtype=torch.bool)
        if tuple(rows.shape) != (self.batch,) or rows.dtype != torch.bool:
            raise ValueError(f"HybridCache.reset: rows must be a ({self.batch},) bool tensor, got "
                             f"{tuple(rows.shape)} {rows.dtype}")
        self.seqlens.masked_fill_(rows, 0)
        for s in self.layers:
            if isinstance(s, SSMState):
                s.conv.masked_fill_(rows.view(-1, *[1] * (s.conv.dim() - 1)), 0)
                s.ssm.masked_fill_(rows.view(-1, *[1] * (s.ssm.dim() - 1)), 0)
            elif isinstance(s, KVState):
                s.pos.masked_fill_(rows[:, None], -1)
