"""SwiGLU's gate silu(gate) * up in one pass forward and one backward (semantics of `reference.py` beside this
file). Forward reads gate and up and writes the product; nothing else is saved (autograd's silu then mul also
writes and keeps silu(gate)). Backward reads gate, up and dout and writes dgate and dup, recomputing the sigmoid.
Math in fp32, storage in the inputs' dtype. Inputs of any layout are flattened to rows (a copy if needed)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import swiglu as _reference

TUNING = {"BLOCK": 4096, "num_warps": 8}


@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, o_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(o_ptr + offs, (g * tl.sigmoid(g) * u).to(o_ptr.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_bwd_kernel(g_ptr, u_ptr, do_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + offs, mask=m, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(du_ptr + offs, (do * silu).to(du_ptr.dtype.element_ty), mask=m)
    dsilu = sig * (1.0 + g * (1.0 - sig))
    tl.store(dg_ptr + offs, (do * u * dsilu).to(dg_ptr.dtype.element_ty), mask=m)


def _grid(n: int):
    return (triton.cdiv(n, TUNING["BLOCK"]),)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        n = gate.numel()
        _swiglu_fwd_kernel[_grid(n)](gate, up, out, n, BLOCK=TUNING["BLOCK"], num_warps=TUNING["num_warps"])
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        dout = dout.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        _swiglu_bwd_kernel[_grid(n)](gate, up, dout, dgate, dup, n, BLOCK=TUNING["BLOCK"],
                                     num_warps=TUNING["num_warps"])
        return dgate, dup


def swiglu(gate, up):
    """See reference.swiglu."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        return _reference(gate, up)  # raises the reference's error
    return _SwiGLU.apply(gate, up)
