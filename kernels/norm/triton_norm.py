"""Triton RMSNorm and Mamba-2's gated, grouped RMSNorm for training (semantics of `reference.py` beside this file).

Forward: one program owns BLOCK_R rows x one group of channels; it reads x (and z) once, writes out once and
saves one fp32 rstd per (row, group). Backward: one program walks a contiguous range of rows for one group,
recomputes the normalized input from x, z and the saved rstd, writes dx (and dz), and keeps its dweight partial
in registers; the partials (n_programs, d) fp32 are summed in torch.
Rows are all leading dims flattened (a view when the last dim is contiguous, else a copy); d up to 8192 per group
tile in registers (group_size <= 8192).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import tuning
from ..common import as_rows
from . import reference as _ref

MAX_GROUP = 8192
PER_SM_CANDIDATES = (1, 2, 4, 8)  # backward programs per SM timed under BRAIDLM_AUTOTUNE=1 (kernels/tuning.py)  # channels of one group: a group is one tile row in registers

# Launch parameters per kernel. tile: elements per program tile, rows per program = tile // group tile (at least
# 1); num_warps None: 16 warps for tiles >= 4096 elements (H100 sweep: bwd 0.69 vs 0.96 ms at 8), else 4;
# programs_per_sm: backward programs per SM (H100: 1 -> 0.684 ms fwd+bwd, 2 -> 0.688, 4 -> 0.698, d 3072).
TUNING = {
    "fwd": dict(tile=4096, num_warps=None),
    "bwd": dict(tile=4096, num_warps=None, programs_per_sm=1),
}


@triton.jit
def _rmsnorm_fwd_kernel(x_ptr, z_ptr, w_ptr, out_ptr, rstd_ptr, rows, gsize, ngroups, eps, s_x, s_z, s_o,
                HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    pid_r = tl.program_id(0)
    g = tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_g = tl.arange(0, BLOCK_G)
    mr = offs_r < rows
    mg = offs_g < gsize
    m = mr[:, None] & mg[None, :]
    cols = g * gsize + offs_g
    r64 = offs_r.to(tl.int64)
    x = tl.load(x_ptr + r64[:, None] * s_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + r64[:, None] * s_z + cols[None, :], mask=m, other=0.0).to(tl.float32)
        gate = z * tl.sigmoid(z)
        if not NORM_BEFORE_GATE:
            x = x * gate
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / gsize + eps)  # (BLOCK_R,)
    w = tl.load(w_ptr + cols, mask=mg, other=0.0).to(tl.float32)
    out = x * rstd[:, None] * w[None, :]
    if HAS_Z:
        if NORM_BEFORE_GATE:
            out = out * gate
    tl.store(out_ptr + r64[:, None] * s_o + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=m)
    tl.store(rstd_ptr + offs_r * ngroups + g, rstd, mask=mr)


@triton.jit
def _add_rmsnorm_fwd_kernel(x_ptr, r_ptr, w_ptr, out_ptr, s_ptr, rstd_ptr, rows, d, eps, s_x, s_r, s_o, s_s,
                            BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    """s = r + x, stored in s's dtype; out = s / rms(s) * w from the stored s (as the reference normalizes it)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_G)
    mr = offs_r < rows
    m = mr[:, None] & (cols < d)[None, :]
    r64 = offs_r.to(tl.int64)
    x = tl.load(x_ptr + r64[:, None] * s_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + r64[:, None] * s_r + cols[None, :], mask=m, other=0.0).to(tl.float32)
    s = (r + x).to(s_ptr.dtype.element_ty)
    tl.store(s_ptr + r64[:, None] * s_s + cols[None, :], s, mask=m)
    s = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=1) / d + eps)
    w = tl.load(w_ptr + cols, mask=cols < d, other=0.0).to(tl.float32)
    tl.store(out_ptr + r64[:, None] * s_o + cols[None, :], (s * rstd[:, None] * w[None, :]).to(out_ptr.dtype.element_ty),
             mask=m)
    tl.store(rstd_ptr + offs_r, rstd, mask=mr)


@triton.jit
def _rmsnorm_bwd_kernel(x_ptr, z_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, dz_ptr, dw_ptr, ds_ptr, dx2_ptr, rows,
                rows_per_prog, gsize, ngroups, d, s_x, s_z, s_dy, s_dx, s_dz, s_ds, s_dx2,
                HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, HAS_DS: tl.constexpr, HAS_DX2: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    # HAS_DS: add the gradient ds arriving at the normalized input itself (add_rmsnorm's sum output);
    # HAS_DX2: store dx a second time, in dx2's dtype (the add's other input)
    pid = tl.program_id(0)
    g = tl.program_id(1)
    offs_g = tl.arange(0, BLOCK_G)
    mg = offs_g < gsize
    cols = g * gsize + offs_g
    w = tl.load(w_ptr + cols, mask=mg, other=0.0).to(tl.float32)
    acc_dw = tl.zeros((BLOCK_R, BLOCK_G), dtype=tl.float32)
    start = pid * rows_per_prog
    end = tl.minimum(start + rows_per_prog, rows)
    for r0 in range(start, end, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mr = offs_r < end
        m = mr[:, None] & mg[None, :]
        r64 = offs_r.to(tl.int64)
        x = tl.load(x_ptr + r64[:, None] * s_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + r64[:, None] * s_dy + cols[None, :], mask=m, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + offs_r * ngroups + g, mask=mr, other=0.0)
        if HAS_Z:
            z = tl.load(z_ptr + r64[:, None] * s_z + cols[None, :], mask=m, other=0.0).to(tl.float32)
            sig = tl.sigmoid(z)
            gate = z * sig
            dgate = sig * (1.0 + z * (1.0 - sig))  # d silu(z) / dz
            if not NORM_BEFORE_GATE:
                xin = x * gate  # the normalized input
            else:
                xin = x
        else:
            xin = x
        xhat = xin * rstd[:, None]
        dxhat = dy * w[None, :]
        if HAS_Z:
            if NORM_BEFORE_GATE:
                acc_dw += dy * xhat * gate
                dz = dy * xhat * w[None, :] * dgate
                dxhat = dxhat * gate
            else:
                acc_dw += dy * xhat
        else:
            acc_dw += dy * xhat
        c = tl.sum(dxhat * xhat, axis=1) / gsize  # (BLOCK_R,)
        dxin = (dxhat - xhat * c[:, None]) * rstd[:, None]
        if HAS_Z:
            if not NORM_BEFORE_GATE:
                dz = dxin * x * dgate
                dxin = dxin * gate
            tl.store(dz_ptr + r64[:, None] * s_dz + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=m)
        if HAS_DS:
            dxin += tl.load(ds_ptr + r64[:, None] * s_ds + cols[None, :], mask=m, other=0.0).to(tl.float32)
        tl.store(dx_ptr + r64[:, None] * s_dx + cols[None, :], dxin.to(dx_ptr.dtype.element_ty), mask=m)
        if HAS_DX2:
            tl.store(dx2_ptr + r64[:, None] * s_dx2 + cols[None, :], dxin.to(dx2_ptr.dtype.element_ty), mask=m)
    tl.store(dw_ptr + pid.to(tl.int64) * d + cols, tl.sum(acc_dw, axis=0), mask=mg)


def _config(gsize, kernel):
    """(BLOCK_R, BLOCK_G, num_warps) of TUNING[kernel] for groups of gsize channels."""
    cfg = TUNING[kernel]
    BLOCK_G = triton.next_power_of_2(gsize)
    BLOCK_R = max(1, cfg["tile"] // BLOCK_G)
    num_warps = cfg["num_warps"] or (16 if BLOCK_G * BLOCK_R >= 4096 else 4)
    return BLOCK_R, BLOCK_G, num_warps


def _backward(x2, z2, weight, rstd, dy2, gsize: int, norm_before_gate: bool, ds=None, dx2_dtype=None):
    """The norm's backward over (rows, d) tensors: (dx, dz, dweight, dx2). ds: a gradient that arrives at the
    normalized input itself, added to dx; dx2_dtype: also return dx in that dtype (else dx2 is None).
    Programs per SM: TUNING["bwd"], or with BRAIDLM_AUTOTUNE=1 the fastest of PER_SM_CANDIDATES per shape class."""
    key = (x2.shape[1], gsize, str(x2.dtype), str(dy2.dtype), z2 is not None, ds is not None,
           x2.shape[0].bit_length())
    return tuning.pick("rmsnorm_bwd", key, PER_SM_CANDIDATES,
                       lambda per_sm: _backward_launch(x2, z2, weight, rstd, dy2, gsize, norm_before_gate, ds,
                                                       dx2_dtype, per_sm),
                       TUNING["bwd"]["programs_per_sm"], x2.device)


def _backward_launch(x2, z2, weight, rstd, dy2, gsize: int, norm_before_gate: bool, ds, dx2_dtype, per_sm: int):
    rows, d = x2.shape
    ngroups = d // gsize
    dx = torch.empty(rows, d, dtype=x2.dtype, device=x2.device)  # (rows, d)
    dz = torch.empty(rows, d, dtype=z2.dtype, device=x2.device) if z2 is not None else None  # (rows, d)
    dx2 = torch.empty(rows, d, dtype=dx2_dtype, device=x2.device) if dx2_dtype is not None else None
    BLOCK_R, BLOCK_G, num_warps = _config(gsize, "bwd")
    sms = torch.cuda.get_device_properties(x2.device).multi_processor_count if x2.is_cuda else 2
    n_prog = max(1, min(triton.cdiv(rows, BLOCK_R), triton.cdiv(per_sm * sms, ngroups)))
    rows_per_prog = triton.cdiv(triton.cdiv(rows, n_prog), BLOCK_R) * BLOCK_R
    n_prog = max(1, triton.cdiv(rows, rows_per_prog))
    dw = torch.empty(n_prog, d, dtype=torch.float32, device=x2.device)  # (n_prog, d) partials
    if rows > 0:
        _rmsnorm_bwd_kernel[(n_prog, ngroups)](
            x2, z2 if z2 is not None else x2, weight, dy2, rstd, dx, dz if dz is not None else dx, dw,
            ds if ds is not None else dx, dx2 if dx2 is not None else dx,
            rows, rows_per_prog, gsize, ngroups, d, x2.stride(0), z2.stride(0) if z2 is not None else 0,
            dy2.stride(0), dx.stride(0), dz.stride(0) if dz is not None else 0,
            ds.stride(0) if ds is not None else 0, dx2.stride(0) if dx2 is not None else 0,
            HAS_Z=z2 is not None, NORM_BEFORE_GATE=norm_before_gate, HAS_DS=ds is not None, HAS_DX2=dx2 is not None,
            BLOCK_R=BLOCK_R, BLOCK_G=BLOCK_G, num_warps=num_warps)
    else:
        dw.zero_()
    return dx, dz, dw.sum(0).to(weight.dtype), dx2


class _RMSNormGated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, z, weight, eps, gsize, norm_before_gate, out_dtype):
        shape, d = x.shape, x.shape[-1]
        x2 = as_rows(x, d)
        z2 = as_rows(z, d) if z is not None else None
        rows, ngroups = x2.shape[0], d // gsize
        out = torch.empty(rows, d, dtype=out_dtype, device=x.device)  # (rows, d)
        rstd = torch.empty(rows, ngroups, dtype=torch.float32, device=x.device)  # (rows, ngroups)
        BLOCK_R, BLOCK_G, num_warps = _config(gsize, "fwd")
        if rows > 0:
            _rmsnorm_fwd_kernel[(triton.cdiv(rows, BLOCK_R), ngroups)](
                x2, z2 if z2 is not None else x2, weight, out, rstd, rows, gsize, ngroups, eps,
                x2.stride(0), z2.stride(0) if z2 is not None else 0, out.stride(0),
                HAS_Z=z is not None, NORM_BEFORE_GATE=norm_before_gate, BLOCK_R=BLOCK_R, BLOCK_G=BLOCK_G,
                num_warps=num_warps)
        ctx.save_for_backward(x2, z2, weight, rstd)
        ctx.gsize, ctx.norm_before_gate, ctx.shape = gsize, norm_before_gate, shape
        return out.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, z2, weight, rstd = ctx.saved_tensors
        dx, dz, dweight, _ = _backward(x2, z2, weight, rstd, as_rows(dy, x2.shape[1]), ctx.gsize, ctx.norm_before_gate)
        return (dx.view(ctx.shape), dz.view(ctx.shape) if dz is not None else None, dweight, None, None, None, None)


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps, out_dtype):
        shape, d = x.shape, x.shape[-1]
        x2, r2 = as_rows(x, d), as_rows(residual, d)
        rows = x2.shape[0]
        s = torch.empty(rows, d, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
        out = torch.empty(rows, d, dtype=out_dtype, device=x.device)  # (rows, d)
        rstd = torch.empty(rows, 1, dtype=torch.float32, device=x.device)  # (rows, 1 group)
        BLOCK_R, BLOCK_G, num_warps = _config(d, "fwd")
        if rows > 0:
            _add_rmsnorm_fwd_kernel[(triton.cdiv(rows, BLOCK_R),)](
                x2, r2, weight, out, s, rstd, rows, d, eps, x2.stride(0), r2.stride(0), out.stride(0), s.stride(0),
                BLOCK_R=BLOCK_R, BLOCK_G=BLOCK_G, num_warps=num_warps)
        ctx.save_for_backward(s, weight, rstd)
        ctx.shape, ctx.x_dtype, ctx.r_dtype = shape, x.dtype, residual.dtype
        return out.view(shape), s.view(shape)

    @staticmethod
    def backward(ctx, dout, ds):
        s, weight, rstd = ctx.saved_tensors
        d = s.shape[1]
        dout = torch.zeros_like(s) if dout is None else as_rows(dout, d)
        other = ctx.x_dtype if ctx.x_dtype != ctx.r_dtype else None  # dx in x's dtype, dresidual in the sum's
        dsum, _, dweight, dx = _backward(s, None, weight, rstd, dout, d, False,
                                         ds=None if ds is None else as_rows(ds, d), dx2_dtype=other)
        dsum = dsum.view(ctx.shape)
        dx = dsum if dx is None else dx.view(ctx.shape)
        return dx, dsum if ctx.r_dtype == dsum.dtype else dsum.to(ctx.r_dtype), dweight, None, None


def rmsnorm_gated(x, z, weight, eps, *, group_size=None, norm_before_gate=False):
    """Gated, grouped RMSNorm of Mamba-2 (Triton), same contract as reference.rmsnorm_gated.

    x, z: (..., d) (z may be None: no gate); weight: (d,). norm_before_gate=False: rmsnorm(x * silu(z)) * weight;
    True: rmsnorm(x) * weight * silu(z). The RMS is over groups of group_size consecutive channels (None: all d;
    group_size <= 8192). Returns (..., d) in x.dtype; gradients flow to x, z and weight. fp64 runs the reference.
    """
    gsize = _check("rmsnorm_gated", x, weight, group_size)
    if z is not None and z.shape != x.shape:
        raise ValueError(f"rmsnorm_gated: z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
    if x.dtype == torch.float64:
        return _ref.rmsnorm_gated(x, z, weight, eps, group_size=group_size, norm_before_gate=norm_before_gate)
    return _RMSNormGated.apply(x, z, weight, float(eps), gsize, bool(norm_before_gate), x.dtype)


def _check(name: str, x, weight, group_size=None) -> int:
    """Shapes every norm checks (x (..., d), weight (d,), groups of group_size channels, None: all d, that
    divide d and fit one tile). Returns the group size."""
    if x.dim() < 1:
        raise ValueError(f"{name}: x must have at least one dim (..., d)")
    d = x.shape[-1]
    gsize = d if group_size is None else int(group_size)
    if gsize <= 0 or d % gsize:
        raise ValueError(f"{name}: last dim {d} is not a multiple of group_size {group_size}")
    if gsize > MAX_GROUP:
        what = f"last dim {d}" if group_size is None else f"group_size {gsize}"
        raise ValueError(f"{name}: {what} > {MAX_GROUP} (one group must fit one tile)")
    if tuple(weight.shape) != (d,):
        raise ValueError(f"{name}: weight must be ({d},), got shape {tuple(weight.shape)}")
    return gsize


def rmsnorm(x, weight, eps, *, out_dtype=None):
    """RMSNorm (Triton): x: (..., d); weight: (d,), d <= 8192. Returns x / rms(x) * weight, (..., d) in out_dtype
    (default x.dtype). fp64 runs the reference."""
    _check("rmsnorm", x, weight)
    if x.dtype == torch.float64:
        return _ref.rmsnorm(x, weight, eps, out_dtype=out_dtype)
    return _RMSNormGated.apply(x, None, weight, float(eps), x.shape[-1], False, out_dtype or x.dtype)


def add_rmsnorm(x, residual, weight, eps, *, out_dtype=None):
    """Pre-norm with the residual add folded in (Triton), same contract as reference.add_rmsnorm: returns
    (rmsnorm(residual + x) * weight in out_dtype, residual + x). One pass reads x and residual and writes both
    outputs; the backward adds the gradient arriving at the sum to the norm's own and writes each input's
    gradient once. fp64 runs the reference."""
    if residual is None:
        return rmsnorm(x, weight, eps, out_dtype=out_dtype), x
    if residual.shape != x.shape:
        raise ValueError(f"add_rmsnorm: residual {tuple(residual.shape)} must have x's shape {tuple(x.shape)}")
    _check("add_rmsnorm", x, weight)
    if torch.float64 in (x.dtype, residual.dtype):
        return _ref.add_rmsnorm(x, residual, weight, eps, out_dtype=out_dtype)
    s_dtype = torch.promote_types(x.dtype, residual.dtype)
    return _AddRMSNorm.apply(x, residual, weight, float(eps), out_dtype or s_dtype)
