"""Mamba-2 chunked SSD scan in Triton, forward and backward; semantics of `reference.ssd_chunk_scan`.

Forward: (torch + a small kernel) processed dt and its per-chunk prefix sum of dt*A (batch x seqlen x nheads fp32);
(1) each chunk's end state from its own inputs, (2) a sequential pass over chunks turning those into the state
entering each chunk, (3) C.B^T once per (chunk, group), (4) the outputs, per (chunk, head, row block), visiting
the row block's column blocks flash-attention style.
Backward recomputes (1)-(3) instead of keeping states, then: the gradient of the entering states from the outputs
((1) again on dy and C), a reverse pass over chunks, dSL = d(loss)/d(C.B^T) summed over a group's heads (one
program per tile pair loops the heads, so dB and dC cost one T x T x N product per group, not per head), dx and
ddt per (chunk, head, column block), then dB and dC per (chunk, group, row block). The log-decay gradient is
gathered from all of these and turned into ddt and dA by a suffix sum inside each chunk.
dt bias/softplus/clamp and the z gate are torch ops around the autograd Function (elementwise on small or gated
tensors, autograd differentiates them); D is fused into the kernels.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
import triton

from ..memo import while_unchanged
from . import reference as ref
from .reference import NO_DT_LIMIT
from .triton_bwd import bwd_dbdc_kernel, bwd_dsl_kernel, bwd_dx_kernel, cb_kernel, chunk_out_kernel
from .triton_kernels import (carry_bwd_kernel, carry_fwd_kernel, chunk_state_kernel, dlog_decays_kernel,
                             log_decays_kernel)

MAX_DIM = 256  # headdim and d_state are whole rows of a tile

# Launch parameters per kernel: BT tile rows inside a chunk, num_warps, num_stages; "carry" (carry_fwd_kernel and
# carry_bwd_kernel): BLK state entries per program of the sequential pass over chunks; "programs" (the backward
# kernels that loop over a group's heads): split the heads into shares until the grid has about this many
# programs (partial sums added afterwards). C.B^T (cb_kernel) is tiled at the coarsest BT of its readers
# (chunk_out, bwd_dsl, bwd_dx). Measured on one H100 by `eval/bench_ssd.py --sweep` (greedy, per setting, at B=8
# L=4096 H=48 P=64 N=128 G=1 chunk 256, bf16); from 8 warps / 2 stages everywhere this went from 4.97 to 3.47 ms
# fwd+bwd (two sweeps). Offline sm_90 compiles showed 4 warps spilling at BT 64 in the heavier kernels; where 4
# warps won anyway, the spills cost less than the occupancy.
TUNING = {
    "chunk_state": dict(BT=64, num_warps=4, num_stages=3),
    "carry": dict(BLK=2048, num_warps=4),
    "cb": dict(num_warps=8, num_stages=3),
    "chunk_out": dict(BT=64, num_warps=4, num_stages=1),
    "bwd_dsl": dict(BT=64, num_warps=4, num_stages=1, programs=1024),
    "bwd_dx": dict(BT=64, num_warps=4, num_stages=1),
    "bwd_dbdc": dict(BT=64, num_warps=4, num_stages=3, programs=64),
}


def _launch(kernel: str) -> dict:
    """num_warps / num_stages of TUNING[kernel], as keyword arguments of a kernel launch."""
    return {k: v for k, v in TUNING[kernel].items() if k in ("num_warps", "num_stages")}


def _head_split(heads_per_group: int, programs: int, kernel: str) -> int:
    """Shares of a group's heads given to separate backward programs (partial sums added afterwards): the
    smallest divisor of heads_per_group that brings the grid to TUNING[kernel]["programs"] programs."""
    want = -(-TUNING[kernel]["programs"] // programs)
    return next((d for d in range(1, heads_per_group + 1) if heads_per_group % d == 0 and d >= want),
                heads_per_group)


def _carry_block(PN: int) -> int:
    """Entries of a (headdim x d_state) state carried by one program of the sequential pass over chunks."""
    return min(triton.next_power_of_2(PN), TUNING["carry"]["BLK"])


def _bt(T: int, kernel: str = "chunk_state") -> int:
    return min(T, TUNING[kernel]["BT"])


def _blocks(T: int, P: int, N: int):
    BP = max(16, triton.next_power_of_2(P))
    BN = max(16, triton.next_power_of_2(N))
    return _bt(T), BP, BN


def _ieee(x) -> bool:
    return x.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"


def _state_dtype(x) -> torch.dtype:
    # stored chunk states: bf16 for bf16 inputs (tl.dot consumers round to bf16 anyway), else fp32 (fp16 range)
    return torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32


_CANONICAL: dict = {}  # kernels.memo table: seq_idx -> its canonical ids


def _canonical_seq(seq_idx):
    """(batch, seqlen) ids -> int32 ids counting document starts, so 'same document' is equality of ids
    (also for ids that are not non-decreasing, matching kernels.common.doc_starts). Computed once per seq_idx
    tensor: every Mamba-2 layer of a forward pass passes the same one."""
    if seq_idx is None:
        return None
    return while_unchanged(_CANONICAL, "ids", seq_idx, lambda: _canonical_ids(seq_idx))


def _canonical_ids(seq_idx):
    starts = torch.zeros_like(seq_idx, dtype=torch.int32)
    starts[:, 1:] = (seq_idx[:, 1:] != seq_idx[:, :-1]).to(torch.int32)
    return starts.cumsum(1, dtype=torch.int32).contiguous()  # (batch, seqlen)


class _DtArgs(NamedTuple):
    """How dt is made from the raw input, and how A is given: dt = clamp(softplus(raw + bias), lo, hi)."""
    bias: Optional[torch.Tensor]
    softplus: bool
    limit: tuple
    a_is_log: bool

    def flags(self) -> dict:
        return dict(HAS_BIAS=self.bias is not None, SOFTPLUS=self.softplus,
                    HAS_LIMIT=(float(self.limit[0]), float(self.limit[1])) != tuple(NO_DT_LIMIT),
                    A_IS_LOG=self.a_is_log)


def _log_decays(dt, A, seq, T, how: _DtArgs):
    """dt (from the raw input, made as `how` says) zero-padded to whole chunks, per-chunk prefix sums of dt*A
    (both (batch, nc*T, nheads) fp32) and the decay of each chunk (batch, nc, nheads), 0 where a document starts
    in it: one kernel (log_decays_kernel)."""
    batch, L, H = dt.shape
    nc = max(1, math.ceil(L / T))
    dtp = torch.empty(batch, nc * T, H, device=dt.device, dtype=torch.float32)
    cum = torch.empty_like(dtp)
    decay = torch.empty(batch, nc, H, device=dt.device, dtype=torch.float32)
    BH = min(16, triton.next_power_of_2(H))
    log_decays_kernel[(nc, triton.cdiv(H, BH), batch)](
        dt, how.bias if how.bias is not None else A, A, seq if seq is not None else dt, dtp, cum, decay, L, H, nc, T,
        dt.stride(0), dt.stride(1), float(how.limit[0]), float(min(how.limit[1], 3e38)), HAS_SEQ=seq is not None,
        BT=T, BH=BH, **how.flags())
    return dtp, cum, decay, nc


def _dlog_decays(dcr, dcc, dce, dcp, uend, ddec, decay, ddt, dtp, dt, A, T, how: _DtArgs):
    """The raw dt's gradient (batch, seqlen, nheads) in its dtype, A's (nheads,) and the bias's (nheads,) or
    None, from the log-decay gradient's pieces (dlog_decays_kernel)."""
    batch, L, H = dt.shape
    nc, nbt = dcr.shape[1], dcr.shape[2]
    ddt_out = torch.empty(batch, L, H, device=dt.device, dtype=dt.dtype)
    dA = torch.empty(batch, nc, H, device=dt.device, dtype=torch.float32)
    dbias = torch.empty_like(dA) if how.bias is not None else dA
    BH = min(16, triton.next_power_of_2(H))
    dlog_decays_kernel[(nc, triton.cdiv(H, BH), batch)](
        dcr, dcc, dce, dcp, uend, ddec, decay, ddt, dtp, dt, how.bias if how.bias is not None else A, A, ddt_out,
        dA, dbias, L, H, nc, T, nbt, uend.shape[2], ddec.shape[-1], dt.stride(0), dt.stride(1),
        float(how.limit[0]), float(min(how.limit[1], 3e38)), BT=T, BH=BH, **how.flags())
    return ddt_out, dA.sum((0, 1)), dbias.sum((0, 1)) if how.bias is not None else None


def _entering_states(x, dtp, cum, decay, B, seq, h0, nc, T, ieee):
    """States entering each chunk (batch, nc, nheads, headdim, d_state) fp32 and the final state."""
    batch, L, H, P = x.shape
    G, N = B.shape[2:]
    BT, BP, BN = _blocks(T, P, N)
    sdt = _state_dtype(x)
    states = torch.empty(batch, nc, H, P, N, device=x.device, dtype=sdt)
    seq_arg = seq if seq is not None else dtp
    chunk_state_kernel[(nc * H, batch)](x, B, cum, dtp, seq_arg, states, L, H, P, N, G, nc, T,
                                        TO_END=True, HAS_SEQ=seq is not None, IEEE=ieee, BT=BT, BP=BP, BN=BN,
                                        **_launch("chunk_state"))
    final = torch.empty(batch, H, P, N, device=x.device, dtype=torch.float32)
    prev = torch.empty_like(states)
    blk = _carry_block(P * N)
    carry_fwd_kernel[(batch * H, triton.cdiv(P * N, blk))](states, decay, h0 if h0 is not None else final, final,
                                                            prev, H, P * N, nc, HAS_H0=h0 is not None, BLK=blk,
                                                            **_launch("carry"))
    return prev, final


def _cb(B, C, nc, T, ieee):
    """C_i . B_j per (batch, chunk, group): (batch, nc, ngroups, T, T), tiles on and below the diagonal."""
    batch, L, G, N = B.shape
    _, _, BN = _blocks(T, 16, N)
    # the coarsest tiling of the kernels that read it: their tiles on or below the diagonal lie inside its own
    BT = max(_bt(T, k) for k in ("chunk_out", "bwd_dsl", "bwd_dx"))
    nbt = triton.cdiv(T, BT)
    # fp32: a bf16 copy would round C.B before the decay and dt multiply, then again for tl.dot (bf16 y error
    # went from 6e-3 to 9e-3 in the CPU test), for half the L2 traffic of these tiles
    cb = torch.empty(batch, nc, G, T, T, device=B.device, dtype=torch.float32)
    cb_kernel[(nc * G, nbt * nbt, batch)](B, C, cb, L, N, G, nc, T, nbt, IEEE=ieee, BT=BT, BN=BN, **_launch("cb"))
    return cb


class _SSDScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, h0, seq, T, y_dtype, dt_bias, how):
        batch, L, H, P = x.shape
        G, N = B.shape[2:]
        ieee = _ieee(x)
        how = how._replace(bias=dt_bias)
        dtp, cum, decay, nc = _log_decays(dt, A, seq, T, how)
        prev, final = _entering_states(x, dtp, cum, decay, B, seq, h0, nc, T, ieee)
        cb = _cb(B, C, nc, T, ieee)
        _, BP, BN = _blocks(T, P, N)
        BT = _bt(T, "chunk_out")
        y = torch.empty(batch, L, H, P, device=x.device, dtype=y_dtype)
        chunk_out_kernel[(nc * H, triton.cdiv(T, BT), batch)](
            x, dtp, cum, cb, C, prev, D if D is not None else cum, seq if seq is not None else cum, y,
            L, H, P, N, G, nc, T, HAS_D=D is not None, HAS_SEQ=seq is not None, IEEE=ieee,
            BT=BT, BP=BP, BN=BN, **_launch("chunk_out"))
        ctx.save_for_backward(x, dt, A, B, C, D, h0, seq, dt_bias)
        ctx.T, ctx.how = T, how._replace(bias=None)
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, D, h0, seq, dt_bias = ctx.saved_tensors
        T, how = ctx.T, ctx.how._replace(bias=dt_bias)
        batch, L, H, P = x.shape
        G, N = B.shape[2:]
        ieee = _ieee(x)
        BT, BP, BN = _blocks(T, P, N)
        dy = dy.contiguous()
        dtp, cum, decay, nc = _log_decays(dt, A, seq, T, how)
        prev, _ = _entering_states(x, dtp, cum, decay, B, seq, h0, nc, T, ieee)
        seq_arg = seq if seq is not None else cum
        has_seq = seq is not None
        # d(loss)/d(entering state) from each chunk's outputs, then the reverse pass over chunks
        dprev = torch.empty_like(prev)
        chunk_state_kernel[(nc * H, batch)](dy, C, cum, dtp, seq_arg, dprev, L, H, P, N, G, nc, T,
                                            TO_END=False, HAS_SEQ=has_seq, IEEE=ieee,
                                            BT=BT, BP=BP, BN=BN, **_launch("chunk_state"))
        blk = _carry_block(P * N)
        nblk = triton.cdiv(P * N, blk)
        dh0 = torch.empty(batch, H, P, N, device=x.device, dtype=torch.float32)
        ddec = torch.empty(batch, nc, H, nblk, device=x.device, dtype=torch.float32)
        dst = torch.empty_like(prev)
        carry_bwd_kernel[(batch * H, nblk)](dprev, prev, decay, dfinal.contiguous() if dfinal is not None else dh0,
                                           dh0, ddec, dst, H, P * N, nc, nblk, HAS_DFINAL=dfinal is not None,
                                           BLK=blk, **_launch("carry"))
        del dprev
        # in-chunk part: dSL = d(loss)/d(C_i . B_j) summed over heads (nsl partial sums over shares of the
        # group's heads), and the log-decay gradient from it
        cb = _cb(B, C, nc, T, ieee)
        bt = _bt(T, "bwd_dsl")
        nbt = triton.cdiv(T, bt)
        nsl = _head_split(H // G, nc * G * nbt * (nbt + 1) // 2 * batch, "bwd_dsl")
        dsl = torch.zeros(nsl, *cb.shape, device=x.device, dtype=torch.float32)  # tiles above the diagonal stay 0
        dcr = torch.zeros(batch, nc, nbt, H, T, device=x.device, dtype=torch.float32)  # unvisited tiles add 0
        dcc = torch.zeros_like(dcr)
        bwd_dsl_kernel[(nc * G * nsl, nbt * nbt, batch)](
            x, dtp, cum, dy, seq_arg, cb, dsl, dcr, dcc, L, H, P, G, nc, T, nbt, nsl, HAS_SEQ=has_seq, IEEE=ieee,
            BT=bt, BP=BP, **_launch("bwd_dsl"))
        bt = _bt(T, "bwd_dx")
        nbt = triton.cdiv(T, bt)
        dx = torch.empty_like(x)
        ddt = torch.empty_like(dtp)  # (batch, nc*T, nheads) fp32
        dce = torch.empty_like(dtp)
        uend = torch.empty(batch, nc, nbt, H, device=x.device, dtype=torch.float32)
        dD = torch.empty(batch, nc, nbt, H, P, device=x.device, dtype=torch.float32) if D is not None else None
        bwd_dx_kernel[(nc * H, nbt, batch)](
            x, dtp, cum, B, cb, dy, dst, D if D is not None else cum, seq_arg,
            dx, ddt, dce, uend, dD if D is not None else uend,
            L, H, P, N, G, nc, T, nbt, HAS_D=D is not None, HAS_SEQ=has_seq, IEEE=ieee,
            BT=bt, BP=BP, BN=BN, **_launch("bwd_dx"))
        del cb
        bt2 = _bt(T, "bwd_dbdc")
        nsplit = _head_split(H // G, nc * G * triton.cdiv(T, bt2) * batch, "bwd_dbdc")
        dB = torch.empty(nsplit, *B.shape, device=x.device, dtype=torch.float32)
        dC = torch.empty(nsplit, *C.shape, device=x.device, dtype=torch.float32)
        dcp = torch.empty_like(dtp)
        for is_db, out in ((True, dB), (False, dC)):
            bwd_dbdc_kernel[(nc * G * nsplit, triton.cdiv(T, bt2), batch)](
                x, dtp, cum, B, C, dy, dst, prev, dsl, seq_arg, out, dcp, L, H, P, N, G, nc, T, nsplit, nsl,
                IS_DB=is_db, HAS_SEQ=has_seq, IEEE=ieee, BT=bt2, BP=BP, BN=BN, **_launch("bwd_dbdc"))
        # log-decay gradient: rows and columns of the in-chunk tiles, end-state and entering-state terms; the
        # chunk-end prefix sum also feeds the end states and the chunk decay
        ddt, dA, dbias = _dlog_decays(dcr, dcc, dce, dcp, uend, ddec, decay, ddt, dtp, dt, A, T, how)
        dDo = dD.sum((0, 1, 2)) if D is not None else None
        return (dx, ddt, dA, dB.sum(0).to(B.dtype), dC.sum(0).to(C.dtype), dDo, dh0 if h0 is not None else None,
                None, None, None, dbias, None)


def _check(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_state, seq_idx):
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, seqlen, nheads, headdim), got shape {tuple(x.shape)}")
    batch, seqlen, nheads, headdim = x.shape
    if B.dim() != 4 or B.shape[:2] != (batch, seqlen) or C.shape != B.shape:
        raise ValueError(f"B and C must be (batch, seqlen, ngroups, d_state) matching x; got {tuple(B.shape)}, "
                         f"{tuple(C.shape)}")
    ngroups, d_state = B.shape[2:]
    if ngroups < 1 or nheads % ngroups:
        raise ValueError(f"nheads ({nheads}) must be a multiple of ngroups ({ngroups})")
    if dt.shape != (batch, seqlen, nheads):
        raise ValueError(f"dt must be (batch, seqlen, nheads) = {(batch, seqlen, nheads)}, got {tuple(dt.shape)}")
    if A.shape != (nheads,):
        raise ValueError(f"A must be (nheads,) = ({nheads},), got {tuple(A.shape)}")
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if D is not None and D.shape not in ((nheads,), (nheads, headdim)):
        raise ValueError(f"D must be (nheads,) or (nheads, headdim), got {tuple(D.shape)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
    if dt_bias is not None and dt_bias.shape != (nheads,):
        raise ValueError(f"dt_bias must be (nheads,), got {tuple(dt_bias.shape)}")
    if initial_state is not None and initial_state.shape != (batch, nheads, headdim, d_state):
        raise ValueError(f"initial_state must be {(batch, nheads, headdim, d_state)}, got "
                         f"{tuple(initial_state.shape)}")
    if seq_idx is not None and seq_idx.shape != (batch, seqlen):
        raise ValueError(f"seq_idx must be (batch, seqlen) = {(batch, seqlen)}, got {tuple(seq_idx.shape)}")
    if headdim > MAX_DIM or d_state > MAX_DIM:
        raise ValueError(f"headdim ({headdim}) and d_state ({d_state}) must be <= {MAX_DIM}")


def ssd_chunk_scan(x, dt, A, B, C, *, chunk_size=256, D=None, z=None, dt_bias=None, dt_softplus=False,
                   dt_limit=NO_DT_LIMIT, initial_state=None, seq_idx=None, return_final_state=False, A_is_log=False):
    """Chunked SSD scan in Triton; same contract as `reference.ssd_chunk_scan`.

    x: (batch, seqlen, nheads, headdim); dt: (batch, seqlen, nheads); A: (nheads,);
    B, C: (batch, seqlen, ngroups, d_state); D: (nheads,) or (nheads, headdim); z: like x; dt_bias: (nheads,);
    initial_state: (batch, nheads, headdim, d_state); seq_idx: (batch, seqlen) document ids.
    Returns y (batch, seqlen, nheads, headdim) in x.dtype and, with return_final_state, the final state
    (batch, nheads, headdim, d_state) fp32. Differentiable in every floating input (and the final state).
    fp64 inputs and empty rows run the reference (Triton has no fp64 tensor-core path worth having).
    """
    _check(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_state, seq_idx)
    # The chunk length is an evaluation choice, not part of the function (every chunking gives the same y up to
    # rounding): the kernels run a power of two in 16..256 (tensor-core tiles need >= 16 rows).
    chunk_size = min(256, max(16, 1 << (chunk_size - 1).bit_length()))
    if x.dtype == torch.float64 or x.shape[1] == 0:
        return ref.ssd_chunk_scan(x, dt, A, B, C, chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias,
                                  dt_softplus=dt_softplus, dt_limit=dt_limit, initial_state=initial_state,
                                  seq_idx=seq_idx, return_final_state=return_final_state, A_is_log=A_is_log)
    nheads, headdim = x.shape[2:]
    # dt's bias, softplus and clamp (and A from A_log) happen inside the kernels: dt is read as it is (a strided
    # slice of the in-projection is fine), and its gradient comes back in its dtype
    dt = dt if dt.stride(-1) == 1 else dt.contiguous()
    how = _DtArgs(None, bool(dt_softplus), tuple(dt_limit), bool(A_is_log))
    D2 = None
    if D is not None:
        D2 = (D.float()[:, None].expand(nheads, headdim) if D.dim() == 1 else D.float()).contiguous()
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    y_dtype = torch.float32 if z is not None else x.dtype
    y, final = _SSDScan.apply(x.contiguous(), dt, A.float(), B.to(x.dtype).contiguous(),
                              C.to(x.dtype).contiguous(), D2, h0, _canonical_seq(seq_idx), chunk_size, y_dtype,
                              dt_bias.float() if dt_bias is not None else None, how)
    if z is not None:
        y = (y * F.silu(z.float())).to(x.dtype)
    return (y, final) if return_final_state else y
