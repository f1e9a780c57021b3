"""Per-forward-pass results derived from a packed batch's document ids: the layers of one forward pass share one
seq_idx tensor, so what the backends build from it (FlexAttention's block masks, flash-attn's cu_seqlens and its
one host sync, the SSD scan's canonical ids) is built once, not once per layer."""
from __future__ import annotations

import weakref
from typing import Callable, TypeVar

from torch import Tensor

T = TypeVar("T")
LIMIT = 32  # entries per table: many shapes (generation, evaluation) must not grow it without bound


def while_unchanged(table: dict, key, seq_idx: Tensor, build: Callable[[], T]) -> T:
    """table[key]'s value while the same seq_idx tensor, unmodified (its version), comes back; else build() anew.
    The table holds a weak reference, so a finished batch's ids are not kept alive."""
    hit = table.get(key)
    if hit is not None and hit[0]() is seq_idx and hit[1] == seq_idx._version:
        return hit[2]
    value = build()
    if len(table) >= LIMIT:
        table.clear()
    table[key] = (weakref.ref(seq_idx), seq_idx._version, value)
    return value
