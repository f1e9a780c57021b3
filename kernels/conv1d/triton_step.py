"""Triton decode step of the causal depthwise conv: out = act(bias + <weight, [conv_state, x]>), and the conv
state shifted left by one with x appended, in one pass (semantics of `reference.causal_conv1d_update`).

One program owns BLOCK_C channels of one row; the width (2-4) is a masked power-of-two tile. The state is read
before it is written within the same program, so the in-place shift needs no second buffer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Launch parameters per kernel: BLOCK_C channels per program.
TUNING = {"conv_step": dict(BLOCK_C=256)}


@triton.jit
def _conv_step_kernel(x_ptr, state_ptr, w_ptr, b_ptr, out_ptr, channels, width,
                      s_xb, s_sb, s_sc, s_sw, s_ob,
                      HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr):
    pid_c = tl.program_id(0)
    b = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_w = tl.arange(0, BLOCK_W)
    mc = offs_c < channels
    hist = width - 1
    x = tl.load(x_ptr + b * s_xb + offs_c, mask=mc, other=0.0).to(tl.float32)
    srow = state_ptr + b * s_sb + offs_c[:, None] * s_sc
    m_hist = mc[:, None] & (offs_w[None, :] < hist)
    past = tl.load(srow + offs_w[None, :] * s_sw, mask=m_hist, other=0.0).to(tl.float32)   # (BLOCK_C, BLOCK_W)
    window = tl.where(offs_w[None, :] == hist, x[:, None], past)                          # columns 0..width-1
    w = tl.load(w_ptr + offs_c[:, None] * width + offs_w[None, :],
                mask=mc[:, None] & (offs_w[None, :] < width), other=0.0).to(tl.float32)
    out = tl.sum(window * w, axis=1)
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_c, mask=mc, other=0.0).to(tl.float32)
    if SILU:
        out = out * tl.sigmoid(out)
    # new state column j = window column j + 1
    shifted = tl.load(srow + (offs_w[None, :] + 1) * s_sw, mask=mc[:, None] & (offs_w[None, :] + 1 < hist),
                      other=0.0).to(tl.float32)
    shifted = tl.where(offs_w[None, :] == hist - 1, x[:, None], shifted)
    tl.debug_barrier()  # all reads of this tile happen before the in-place write
    tl.store(srow + offs_w[None, :] * s_sw, shifted.to(state_ptr.dtype.element_ty), mask=m_hist)
    tl.store(out_ptr + b * s_ob + offs_c, out.to(out_ptr.dtype.element_ty), mask=mc)


def causal_conv1d_update(x, conv_state, weight, bias=None, *, activation="silu"):
    """Same contract as reference.causal_conv1d_update."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation={activation!r}: expected 'silu', 'swish' or None")
    batch, channels = x.shape
    width = weight.shape[1]
    assert conv_state.shape == (batch, channels, width - 1), "conv_state must be (batch, channels, width - 1)"
    x = x if x.stride(-1) == 1 else x.contiguous()  # rows through their stride: x is a slice of the in-projection
    weight = weight.contiguous()
    out = torch.empty(batch, channels, dtype=x.dtype, device=x.device)
    BLOCK_C = TUNING["conv_step"]["BLOCK_C"]
    grid = (triton.cdiv(channels, BLOCK_C), batch)
    _conv_step_kernel[grid](
        x, conv_state, weight, bias if bias is not None else weight, out, channels, width,
        x.stride(0), conv_state.stride(0), conv_state.stride(1), conv_state.stride(2), out.stride(0),
        HAS_BIAS=bias is not None, SILU=activation is not None, BLOCK_C=BLOCK_C,
        BLOCK_W=triton.next_power_of_2(width))
    return out
