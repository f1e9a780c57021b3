"""Causal depthwise conv1d over channels-last sequences, with packed-document masking and a carried state.

out[t, c] = act(bias[c] + sum_k weight[c, k] * x[t - (width - 1) + k, c])

Inputs before position 0 come from `initial_state` (the last width - 1 inputs of what came before, oldest
first); inputs of another document than token t's count as zero. The conv state always holds raw inputs
(pre-activation), never outputs.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..common import compute_dtype


def _activate(out: Tensor, activation: Optional[str]) -> Tensor:
    if activation is None:
        return out
    if activation in ("silu", "swish"):
        return F.silu(out)
    raise ValueError(f"activation {activation!r}: expected 'silu' or None")


def causal_conv1d(x, weight, bias=None, *, activation="silu", seq_idx=None, initial_state=None,
                  return_final_state=False):
    """Causal depthwise convolution.

    x: (batch, seqlen, channels); weight: (channels, width); bias: (channels,) or None;
    seq_idx: (batch, seqlen) non-decreasing document ids or None; initial_state: (batch, channels, width - 1)
    inputs before position 0, oldest first, belonging to the row's first document (zeros if None).
    Returns out (batch, seqlen, channels) in x.dtype, and with return_final_state also the last width - 1
    inputs of the row (batch, channels, width - 1) in x.dtype, zeroed where they belong to an earlier document
    than the last token's.
    """
    batch, seqlen, channels = x.shape
    width = weight.shape[1]
    ct = compute_dtype(x)
    if initial_state is None:
        history = x.new_zeros(batch, width - 1, channels, dtype=ct)  # (batch, width - 1, channels)
    else:
        history = initial_state.to(ct).transpose(1, 2)
    xp = torch.cat([history, x.to(ct)], dim=1)  # (batch, width - 1 + seqlen, channels)
    w = weight.to(ct)

    if seq_idx is None and seqlen > 0:  # F.conv1d rejects an input shorter than the kernel
        out = F.conv1d(xp.transpose(1, 2), w[:, None, :], groups=channels).transpose(1, 2)
    else:
        if seq_idx is not None:
            # The history belongs to the row's first document: give it that document's id.
            ids = torch.cat([seq_idx[:, :1].expand(batch, width - 1), seq_idx], dim=1)  # (batch, width - 1 + seqlen)
        out = torch.zeros_like(x, dtype=ct)  # (batch, seqlen, channels)
        for k in range(width):  # a loop over taps, not tokens: each term is one shifted, masked copy
            term = xp[:, k:k + seqlen]
            if seq_idx is not None:
                term = torch.where((ids[:, k:k + seqlen] == seq_idx)[..., None], term, 0.0)
            out = out + w[:, k] * term
    if bias is not None:
        out = out + bias.to(ct)
    out = _activate(out, activation).to(x.dtype)
    if not return_final_state:
        return out

    tail = xp[:, seqlen:]  # (batch, width - 1, channels): the last width - 1 inputs, history included
    if seq_idx is not None:
        tail = torch.where((ids[:, seqlen:] == seq_idx[:, -1:])[..., None], tail, 0.0)
    return out, tail.transpose(1, 2).to(x.dtype)


def causal_conv1d_update(x, conv_state, weight, bias=None, *, activation="silu"):
    """One decode step. x: (batch, channels); conv_state: (batch, channels, width - 1), oldest first, shifted
    left IN PLACE with x appended; weight: (channels, width); bias: (channels,). Returns (batch, channels).

    Only fixed shapes are allocated, so the step can be captured in a CUDA graph.
    """
    ct = compute_dtype(x)
    window = torch.cat([conv_state.to(ct), x.to(ct)[:, :, None]], dim=-1)  # (batch, channels, width)
    out = (window * weight.to(ct)).sum(-1)
    if bias is not None:
        out = out + bias.to(ct)
    conv_state.copy_(window[:, :, 1:])
    return _activate(out, activation).to(x.dtype)
