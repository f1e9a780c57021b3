"""The LM head and its loss in one op: mean next-token cross entropy of `h @ weight.T` against `targets`.

The reference materializes the whole (tokens, vocab) logits matrix, as `F.cross_entropy(lm_head(h))` does; the
GPU backend (triton_loss.py) computes the same loss and its gradients a chunk of tokens at a time.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, *, ignore_index: int = -100,
                         chunk_tokens: int = 0) -> Tensor:
    """h: (..., d) hidden states; weight: (vocab, d); targets: (...) token ids, `ignore_index` where no loss is
    taken. Returns the fp32 mean loss over the counted tokens (nan when none is counted, as F.cross_entropy).
    Logits are computed in h's dtype (the autocast dtype under autocast) and the softmax in fp32.
    chunk_tokens: tokens per chunk of the chunked backends (ignored here)."""
    _check(h, weight, targets)
    logits = F.linear(h, weight)
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=ignore_index)


def _check(h: Tensor, weight: Tensor, targets: Tensor) -> None:
    if weight.dim() != 2 or h.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: h {tuple(h.shape)} and weight {tuple(weight.shape)}: expected "
                         "h (..., d) and weight (vocab, d)")
    if tuple(targets.shape) != tuple(h.shape[:-1]):
        raise ValueError(f"linear_cross_entropy: targets {tuple(targets.shape)} must be h's leading dims "
                         f"{tuple(h.shape[:-1])}")
    if targets.dtype.is_floating_point:
        raise ValueError(f"linear_cross_entropy: targets must be integer token ids, got {targets.dtype}")
