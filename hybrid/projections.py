"""A mixer's or MLP's Linear projections, fused for a decode step where that is safe.

`project(x, *linears)` returns [linear(x) for each]; `swiglu_in(x, gate, up)` returns silu(gate(x)) * up(x). When
the step may fuse them (`fusable`: no autograd or autocast, at most DECODE_ROWS rows, plain nn.Linear modules
without hooks whose weights are materialized in x's dtype) they go through `ops.linears` / `ops.swiglu_linear`,
one launch for all (kernels/linear). Otherwise each module is called: training, prefill, and any wrapper a user
or DeepSpeed puts on a Linear (ZeRO-3 gathers a partitioned weight in the module's own forward hook; a quantized
or LoRA Linear is another class) see exactly the calls they expect.
"""
from __future__ import annotations

import torch
from torch import nn

from kernels import ops
from kernels.linear.reference import MAX_ROWS as DECODE_ROWS  # the fused path's row limit

from .norm import ResidualRMSNorm


def fusable(x: torch.Tensor, *linears: nn.Module) -> bool:
    if (torch.is_grad_enabled() or x.numel() > DECODE_ROWS * x.shape[-1]
            or torch.is_autocast_enabled(x.device.type)):  # autocast: the module calls run in its dtype
        return False
    return all(type(m) is nn.Linear and not (m._forward_hooks or m._forward_pre_hooks)
               and not hasattr(m.weight, "ds_id")  # a DeepSpeed ZeRO-3 parameter: gathered by its module's hook
               and m.weight.dtype == x.dtype and m.weight.shape == (m.out_features, x.shape[-1])
               for m in linears) and not (nn.modules.module._global_forward_hooks
                                          or nn.modules.module._global_forward_pre_hooks)


def norm_project(norm: nn.Module, mod: nn.Module, residual: torch.Tensor, delta):
    """A block's pre-norm followed by `mod`: returns (x, residual, projected). Where a decode step may fuse them
    (`mod.input_projections()` exist, `fusable`, a plain ResidualRMSNorm of the stream's dtype) the sum, the norm
    and mod's first projections are one `ops.add_rmsnorm_linears` launch: x is None and projected holds mod's
    first projections. Otherwise x = norm(residual + delta) and projected is None."""
    first = getattr(mod, "input_projections", None)
    if delta is not None and first is not None and type(norm) is ResidualRMSNorm:
        linears, swiglu = first()
        if (fusable(residual, *linears) and residual.dtype == delta.dtype == norm.weight.dtype
                and not (norm._forward_hooks or norm._forward_pre_hooks)
                and not (swiglu and any(m.bias is not None for m in linears))):
            projected, residual = ops.add_rmsnorm_linears(delta, residual, norm.weight, norm.eps,
                                                          [m.weight for m in linears], [m.bias for m in linears],
                                                          swiglu=swiglu)
            return None, residual, projected
    x, residual = norm(residual, delta)
    return x, residual, None


def project(x: torch.Tensor, *linears: nn.Linear) -> list:
    if fusable(x, *linears):
        return ops.linears(x, [m.weight for m in linears], [m.bias for m in linears])
    return [m(x) for m in linears]


def swiglu_in(x: torch.Tensor, gate: nn.Linear, up: nn.Linear) -> torch.Tensor:
    if fusable(x, gate, up) and gate.bias is None and up.bias is None:
        return ops.swiglu_linear(x, gate.weight, up.weight)
    return ops.swiglu(gate(x), up(x))
