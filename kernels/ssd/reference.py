"""Mamba-2 SSD scan (Dao & Gu 2024, "Transformers are SSMs"): one scalar decay per head, chunked form.

Definition, per head and token t (state h is headdim x d_state):
    h_t = exp(dt_t * A) * h_{t-1} + dt_t * outer(x_t, B_t)
    y_t = h_t @ C_t + D * x_t,      then y_t *= silu(z_t) when a gate z is given

`ssd_chunk_scan` evaluates this with the state-space-duality algorithm: inside a chunk the map x -> y is a
masked, decay-weighted (C B^T) matrix (quadratic in the chunk length, matmul-friendly); across chunks only
the states at chunk ends are carried. `ssd_sequential` is the token loop, the ground truth for tests.

Packed rows (`seq_idx`): a document start is a decay of exactly 0 on the previous state. Both functions
realize it differently (log-decay sentinel vs. 0/1 multiply) so that tests compare independent code.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..common import compute_dtype, doc_starts

# Log-decay given to the first token of a document: any sum of log-decays containing it is <= -1e4, and
# exp() of that is exactly 0 in fp32 and fp64, so the previous state is dropped without inf/NaN in backward.
RESET_LOG_DECAY = -1e4

NO_DT_LIMIT = (0.0, float("inf"))


def process_dt(dt: Tensor, dt_bias: Optional[Tensor], dt_softplus: bool, dt_limit, dtype: torch.dtype) -> Tensor:
    """dt (+ dt_bias) -> softplus (optional) -> clamp to dt_limit (skipped for (0, inf)). Same shape as dt."""
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    lo, hi = dt_limit
    if (float(lo), float(hi)) != NO_DT_LIMIT:
        dt = dt.clamp(min=lo, max=hi)
    return dt


def segsum(a: Tensor) -> Tensor:
    """out[..., i, j] = sum_{k=j+1..i} a[..., k] for i >= j, 0 above the diagonal. (..., T) -> (..., T, T).

    Built as a cumsum of a masked copy, so every entry sums only its own terms: no difference of two large
    prefix sums, whose rounding would be amplified by exp().
    """
    T = a.shape[-1]
    below = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)
    terms = torch.where(below, a[..., :, None], 0.0)  # (..., T, T): terms[k, j] = a_k for k > j
    return terms.cumsum(dim=-2)


def _to_chunks(t: Tensor, chunk_size: int) -> Tensor:
    """(batch, seqlen, ...) -> (batch, nchunks, chunk_size, ...), zero-padded at the end."""
    batch, seqlen = t.shape[:2]
    nchunks = max(1, math.ceil(seqlen / chunk_size))  # an empty row still yields its initial state
    pad = nchunks * chunk_size - seqlen
    t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
    return t.reshape(batch, nchunks, chunk_size, *t.shape[2:])


def _finish(y: Tensor, x: Tensor, D: Optional[Tensor], z: Optional[Tensor]) -> Tensor:
    """Skip connection and gate on y (batch, seqlen, nheads, headdim), in y's (compute) dtype."""
    if D is not None:
        Dv = D.to(y.dtype)
        Dv = Dv[:, None] if Dv.dim() == 1 else Dv  # (nheads, 1) or (nheads, headdim)
        y = y + Dv * x.to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def _initial(initial_state: Optional[Tensor], shape, dtype, device) -> Tensor:
    if initial_state is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    return initial_state.to(dtype).reshape(shape)


def ssd_chunk_scan(x, dt, A, B, C, *, chunk_size=256, D=None, z=None, dt_bias=None, dt_softplus=False,
                   dt_limit=NO_DT_LIMIT, initial_state=None, seq_idx=None, return_final_state=False, A_is_log=False):
    """Chunked SSD scan.

    x: (batch, seqlen, nheads, headdim); dt: (batch, seqlen, nheads); A: (nheads,) negative (A_is_log: A holds
    A_log and the scan uses -exp(A_log), the model's parameter as it is);
    B, C: (batch, seqlen, ngroups, d_state), head h reads group h // (nheads // ngroups);
    D: (nheads,) or (nheads, headdim); z: like x; dt_bias: (nheads,);
    initial_state: (batch, nheads, headdim, d_state), the state before position 0 (row's first document);
    seq_idx: (batch, seqlen) non-decreasing document ids; the state restarts from 0 at each new document.
    Returns y (batch, seqlen, nheads, headdim) in x.dtype, and with return_final_state also the state after
    the last token, (batch, nheads, headdim, d_state) in fp32 (fp64 for fp64 inputs).
    """
    batch, seqlen, nheads, headdim = x.shape
    ngroups, d_state = B.shape[-2:]
    per_group = nheads // ngroups
    ct = compute_dtype(x)
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit, ct)
    A = -torch.exp(A.to(ct)) if A_is_log else A
    log_decay = dt * A.to(ct)  # (batch, seqlen, nheads)
    starts = doc_starts(seq_idx)
    if starts is not None:
        log_decay = log_decay.masked_fill(starts[..., None], RESET_LOG_DECAY)

    # Heads are split into (group, head-in-group) so B and C broadcast over heads instead of being copied.
    def heads_first(t: Tensor) -> Tensor:
        t = t.unflatten(3, (ngroups, per_group))  # (batch, nchunks, T, g, k, *rest)
        return t.movedim(2, 4)

    xc = heads_first(_to_chunks(x.to(ct), chunk_size))  # (batch, nchunks, g, k, T, headdim)
    dtc = heads_first(_to_chunks(dt, chunk_size))  # (batch, nchunks, g, k, T)
    ac = heads_first(_to_chunks(log_decay, chunk_size))  # (batch, nchunks, g, k, T)
    Bc = _to_chunks(B.to(ct), chunk_size).movedim(2, 3)  # (batch, nchunks, g, T, d_state)
    Cc = _to_chunks(C.to(ct), chunk_size).movedim(2, 3)  # (batch, nchunks, g, T, d_state)
    h0 = _initial(initial_state, (batch, ngroups, per_group, headdim, d_state), ct, x.device)

    seg = segsum(ac)  # (batch, nchunks, g, k, T, T) log-decay from token j to token i of a chunk
    y = _intra_chunk(xc, dtc, seg, Bc, Cc)
    states = _chunk_states(xc, dtc, seg, Bc)
    prev, final = _carry_states(states, ac, h0)
    y = y + _state_to_output(prev, ac, Cc)

    y = y.movedim(4, 2).flatten(1, 2).flatten(2, 3)[:, :seqlen]  # (batch, seqlen, nheads, headdim)
    y = _finish(y, x, D, z).to(x.dtype)
    if return_final_state:
        return y, final.reshape(batch, nheads, headdim, d_state)
    return y


def _intra_chunk(x: Tensor, dt: Tensor, seg: Tensor, B: Tensor, C: Tensor) -> Tensor:
    """Output from inputs of the same chunk: y_i = sum_{j<=i} (C_i.B_j) exp(a_{j+1}+..+a_i) dt_j x_j.
    Returns (batch, nchunks, g, k, T, headdim)."""
    T = seg.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=seg.device).tril()
    decay = torch.where(causal, seg.exp(), 0.0)  # (batch, nchunks, g, k, T, T)
    scores = (C @ B.transpose(-1, -2))[:, :, :, None]  # (batch, nchunks, g, 1, T, T)
    weights = scores * decay * dt[..., None, :]  # (batch, nchunks, g, k, T, T)
    return weights @ x


def _chunk_states(x: Tensor, dt: Tensor, seg: Tensor, B: Tensor) -> Tensor:
    """State at each chunk's end from that chunk's inputs alone (zero state at its start).
    Returns (batch, nchunks, g, k, headdim, d_state)."""
    # The segsum row of the last position is the decay from each token to the chunk end, summed term by term.
    to_end = seg[..., -1, :].exp()  # (batch, nchunks, g, k, T)
    weighted = x * (to_end * dt)[..., None]  # (batch, nchunks, g, k, T, headdim)
    return torch.einsum("bcgktp,bcgtn->bcgkpn", weighted, B)


def _carry_states(states: Tensor, a: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
    """Carry the state across chunks: H_c = exp(sum of chunk c's log-decays) H_{c-1} + states_c, H_{-1} = h0.
    Returns the state entering each chunk (batch, nchunks, g, k, headdim, d_state) and the final state."""
    chunk_decay = a.sum(-1).exp()[..., None, None]  # (batch, nchunks, g, k, 1, 1)
    h = h0
    entering = []
    for c in range(states.shape[1]):
        entering.append(h)
        h = chunk_decay[:, c] * h + states[:, c]
    return torch.stack(entering, dim=1), h


def _state_to_output(prev: Tensor, a: Tensor, C: Tensor) -> Tensor:
    """Output contribution of the state entering each chunk: exp(a_0+..+a_i) C_i . H_{c-1}.
    Returns (batch, nchunks, g, k, T, headdim)."""
    from_start = a.cumsum(-1).exp()[..., None]  # (batch, nchunks, g, k, T, 1)
    return from_start * torch.einsum("bcgtn,bcgkpn->bcgktp", C, prev)


def ssd_sequential(x, dt, A, B, C, *, chunk_size=256, D=None, z=None, dt_bias=None, dt_softplus=False,
                   dt_limit=NO_DT_LIMIT, initial_state=None, seq_idx=None, return_final_state=False):
    """Token-by-token SSD recurrence; same signature and results as `ssd_chunk_scan` (chunk_size unused).
    A Python loop over seqlen: the ground truth for tests, not for training."""
    batch, seqlen, nheads, headdim = x.shape
    ngroups, d_state = B.shape[-2:]
    ct = compute_dtype(x)
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit, ct)
    A = A.to(ct)
    Bh = B.to(ct).repeat_interleave(nheads // ngroups, dim=2)  # (batch, seqlen, nheads, d_state)
    Ch = C.to(ct).repeat_interleave(nheads // ngroups, dim=2)  # (batch, seqlen, nheads, d_state)
    xf = x.to(ct)
    h = _initial(initial_state, (batch, nheads, headdim, d_state), ct, x.device)
    starts = doc_starts(seq_idx)
    ys = []
    for t in range(seqlen):
        decay = torch.exp(dt[:, t] * A)  # (batch, nheads)
        if starts is not None:
            decay = decay * (~starts[:, t]).to(ct)[:, None]
        # (batch, nheads, headdim, d_state)
        inp = (dt[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]
        h = decay[..., None, None] * h + inp
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ch[:, t]))
    y = torch.stack(ys, dim=1) if ys else xf.new_zeros(batch, 0, nheads, headdim)
    y = _finish(y, x, D, z).to(x.dtype)
    return (y, h) if return_final_state else y


def ssd_state_update(state, x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False,
                     dt_limit=NO_DT_LIMIT, A_is_log=False):
    """One Mamba-2 decode step: advances `state` IN PLACE and returns the output. Only fixed shapes are
    allocated, so a decode step can be captured in a CUDA graph.

    state: (batch, nheads, headdim, d_state) fp32, updated in place; x, z: (batch, nheads, headdim);
    dt: (batch, nheads); A, dt_bias: (nheads,); B, C: (batch, ngroups, d_state); D: (nheads,) or
    (nheads, headdim). A_is_log: A holds A_log, the step uses -exp(A_log) (the model's parameter as it is, so
    a decode step launches no kernel to make A). Returns y (batch, nheads, headdim) in x.dtype.
    """
    nheads = x.shape[1]
    per_group = nheads // B.shape[1]
    ct = compute_dtype(x, state)
    if A_is_log:
        A = -torch.exp(A.to(ct))
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit, ct)  # (batch, nheads)
    decay = torch.exp(dt * A.to(ct))[..., None, None]  # (batch, nheads, 1, 1)
    Bh = B.to(ct).repeat_interleave(per_group, dim=1)  # (batch, nheads, d_state)
    Ch = C.to(ct).repeat_interleave(per_group, dim=1)  # (batch, nheads, d_state)
    xf = x.to(ct)
    inp = (dt[..., None] * xf)[..., None] * Bh[:, :, None, :]  # (batch, nheads, headdim, d_state)
    new = decay * state.to(ct) + inp
    state.copy_(new)
    y = (new @ Ch[..., None])[..., 0]  # (batch, nheads, headdim)
    if D is not None:
        Dv = D.to(ct)
        y = y + (Dv[:, None] if Dv.dim() == 1 else Dv) * xf
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(x.dtype)
