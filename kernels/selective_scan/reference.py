"""Mamba-1 selective scan (Gu & Dao 2023): a decay per channel and state, in a two-level parallel form.

Definition, per token t (state h is d_inner x d_state, B_t and C_t are shared by all channels):
    h_t = exp(delta_t[:, None] * A) * h_{t-1} + (delta_t * u_t)[:, None] * B_t[None, :]
    y_t = h_t @ C_t + D * u_t,      then y_t *= silu(z_t) when a gate z is given

The decay differs per (channel, state), so the SSD matmul trick does not apply; instead `_scan`
re-associates the recurrence in two levels: a loop over the positions of a chunk advances all chunks at
once from zero states, a loop over chunks carries the true state into each chunk, and a second loop over
positions replays every chunk from its true state to produce the outputs. Only exp(delta * A) <= 1 and
products of such factors are formed, so a large delta * |A| underflows to 0 instead of overflowing (no
exp(-cumsum) division trick). Autograd differentiates it as written.
`selective_scan_sequential` is the token loop, the ground truth for tests; `selective_state_update` is one
step of the recurrence for decoding, advancing a carried state in place.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..common import compute_dtype, doc_starts


def process_delta(delta: Tensor, delta_bias: Optional[Tensor], delta_softplus: bool, dtype: torch.dtype) -> Tensor:
    """delta (+ delta_bias) -> softplus (optional). Same shape as delta."""
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)
    return F.softplus(delta) if delta_softplus else delta


def _finish(y: Tensor, u: Tensor, D: Optional[Tensor], z: Optional[Tensor]) -> Tensor:
    """Skip connection and gate on y (batch, seqlen, d_inner), in y's (compute) dtype."""
    if D is not None:
        y = y + D.to(y.dtype) * u.to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def _chunked(t: Tensor, nchunks: int, chunk_size: int, value: float = 0.0) -> Tensor:
    """(batch, seqlen, ...) -> (batch, nchunks, chunk_size, ...), padded at the end with `value`."""
    pad = nchunks * chunk_size - t.shape[1]
    return F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad), value=value).unflatten(1, (nchunks, chunk_size))


def _scan(delta: Tensor, A: Tensor, B: Tensor, C: Tensor, du: Tensor, keep: Optional[Tensor], h0: Tensor,
          chunk_size: int) -> tuple[Tensor, Tensor]:
    """The recurrence h_t = decay_t * h_{t-1} + input_t, y_t = h_t @ C_t, re-associated in two levels.

    delta, du (= delta * u): (batch, seqlen, d_inner); A: (d_inner, d_state); B, C: (batch, seqlen, d_state);
    keep: (batch, seqlen) 0.0 at document starts, 1.0 elsewhere, or None; h0: (batch, d_inner, d_state).
    Returns y (batch, seqlen, d_inner) and the final state (batch, d_inner, d_state).

    Every step works on one (batch, nchunks, d_inner, d_state) slice, which stays in cache; materializing
    (batch, seqlen, d_inner, d_state) decays and states instead is several times slower on a CPU.
    """
    seqlen = delta.shape[1]
    T = min(chunk_size, max(seqlen, 1))
    nchunks = math.ceil(max(seqlen, 1) / T)
    # Padding has decay 1 and no input, so the state after the padded end is the state after the last token.
    delta, du, B, C = (_chunked(t, nchunks, T) for t in (delta, du, B, C))
    keep = None if keep is None else _chunked(keep, nchunks, T, value=1.0)

    # Level 1: the T positions of all chunks at once, each chunk from a zero state at its start.
    decays, inputs = [], []
    h = None
    for t in range(T):
        decay = torch.exp(delta[:, :, t, :, None] * A)  # (batch, nchunks, d_inner, d_state), <= 1
        if keep is not None:
            decay = decay * keep[:, :, t, None, None]
        inp = du[:, :, t, :, None] * B[:, :, t, None, :]  # (batch, nchunks, d_inner, d_state)
        decays.append(decay)
        inputs.append(inp)
        h = inp if h is None else decay * h + inp
    # A product of factors <= 1 underflows to 0 for large delta * |A|; it never overflows.
    chunk_decay = decays[0]
    for decay in decays[1:]:
        chunk_decay = chunk_decay * decay

    # Level 2: carry the true state from chunk to chunk.
    state = h0
    entering = []
    for c in range(nchunks):
        entering.append(state)
        state = chunk_decay[:, c] * state + h[:, c]
    h = torch.stack(entering, dim=1)  # (batch, nchunks, d_inner, d_state)

    # Outputs: replay every chunk from its true entering state.
    ys = []
    for t in range(T):
        h = decays[t] * h + inputs[t]
        ys.append((h @ C[:, :, t, :, None])[..., 0])  # (batch, nchunks, d_inner)
    y = torch.stack(ys, dim=2).flatten(1, 2)[:, :seqlen]  # (batch, seqlen, d_inner)
    return y, state


def selective_scan(u, delta, A, B, C, *, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, seq_idx=None, return_final_state=False, chunk_size=64):
    """Selective scan in parallel (two-level) form.

    u, delta, z: (batch, seqlen, d_inner); A: (d_inner, d_state) negative; B, C: (batch, seqlen, d_state);
    D, delta_bias: (d_inner,); initial_state: (batch, d_inner, d_state), the state before position 0 (it
    reaches only the row's first document); seq_idx: (batch, seqlen) non-decreasing document ids, the
    state restarts from 0 at each new document.
    Returns y (batch, seqlen, d_inner) in u.dtype, and with return_final_state also the state after the
    last token, (batch, d_inner, d_state) in fp32 (fp64 for fp64 inputs).
    """
    batch, seqlen, d_inner = u.shape
    d_state = A.shape[-1]
    ct = compute_dtype(u)
    delta = process_delta(delta, delta_bias, delta_softplus, ct)
    starts = doc_starts(seq_idx)
    # A document start is a decay of exactly 0 on the previous state (a 0/1 multiply keeps gradients finite).
    keep = None if starts is None else (~starts).to(ct)  # (batch, seqlen)
    if initial_state is None:
        h0 = torch.zeros(batch, d_inner, d_state, dtype=ct, device=u.device)  # (batch, d_inner, d_state)
    else:
        h0 = initial_state.to(ct)
    uf = u.to(ct)
    y, final = _scan(delta, A.to(ct), B.to(ct), C.to(ct), delta * uf, keep, h0, chunk_size)
    y = _finish(y, u, D, z).to(u.dtype)
    return (y, final) if return_final_state else y


def selective_scan_sequential(u, delta, A, B, C, *, D=None, z=None, delta_bias=None, delta_softplus=False,
                              initial_state=None, seq_idx=None, return_final_state=False, chunk_size=64):
    """Token-by-token selective scan; same signature and results as `selective_scan` (chunk_size unused).
    A Python loop over seqlen: the ground truth for tests, not for training."""
    batch, seqlen, d_inner = u.shape
    d_state = A.shape[-1]
    ct = compute_dtype(u)
    delta = process_delta(delta, delta_bias, delta_softplus, ct)
    A, B, C, uf = A.to(ct), B.to(ct), C.to(ct), u.to(ct)
    if initial_state is None:
        h = torch.zeros(batch, d_inner, d_state, dtype=ct, device=u.device)  # (batch, d_inner, d_state)
    else:
        h = initial_state.to(ct)
    starts = doc_starts(seq_idx)
    ys = []
    for t in range(seqlen):
        decay = torch.exp(delta[:, t, :, None] * A)  # (batch, d_inner, d_state)
        if starts is not None:
            decay = torch.where(starts[:, t, None, None], 0.0, decay)
        h = decay * h + (delta[:, t] * uf[:, t])[:, :, None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    y = torch.stack(ys, dim=1) if ys else uf.new_zeros(batch, 0, d_inner)
    y = _finish(y, u, D, z).to(u.dtype)
    return (y, h) if return_final_state else y


def selective_state_update(state, u, delta, A, B, C, *, D=None, z=None, delta_bias=None, delta_softplus=False,
                           A_is_log=False):
    """One Mamba-1 decode step: advances `state` IN PLACE and returns the output. Only fixed shapes are
    allocated, so a decode step can be captured in a CUDA graph.

    state: (batch, d_inner, d_state) fp32, updated in place; u, delta, z: (batch, d_inner);
    A: (d_inner, d_state); B, C: (batch, d_state); D, delta_bias: (d_inner,). A_is_log: A holds A_log, the
    step uses -exp(A_log) (the model's parameter as it is, so a decode step launches no kernel to make A).
    Returns y (batch, d_inner) in u.dtype.
    """
    ct = compute_dtype(u, state)
    if A_is_log:
        A = -torch.exp(A.to(ct))
    delta = process_delta(delta, delta_bias, delta_softplus, ct)  # (batch, d_inner)
    uf = u.to(ct)
    decay = torch.exp(delta[..., None] * A.to(ct))  # (batch, d_inner, d_state)
    new = decay * state.to(ct) + (delta * uf)[..., None] * B.to(ct)[:, None, :]  # (batch, d_inner, d_state)
    state.copy_(new)
    y = (new @ C.to(ct)[:, :, None])[..., 0]  # (batch, d_inner)
    if D is not None:
        y = y + D.to(ct) * uf
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(u.dtype)
