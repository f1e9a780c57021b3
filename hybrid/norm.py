"""RMSNorm over the model width: the pre-norm of every block (with the residual add before it folded in) and
the final norm."""
from typing import Optional

import torch
from torch import nn

from kernels import ops


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return ops.rmsnorm(x, self.weight, self.eps)


class ResidualRMSNorm(RMSNorm):
    """A block's pre-norm that first adds the previous block's output to the residual stream:
    forward(residual, delta) -> (rmsnorm(residual + delta), residual + delta), one fused op on the GPU
    (`ops.add_rmsnorm`); delta None: the stream is residual alone (the embedding). Under autocast the normalized
    output is made in the autocast dtype the next matmul reads (the stream keeps its own dtype)."""

    def forward(self, residual, delta: Optional[torch.Tensor] = None):
        dev = residual.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        if delta is None:
            return ops.add_rmsnorm(residual, None, self.weight, self.eps, out_dtype=out_dtype)
        return ops.add_rmsnorm(delta, residual, self.weight, self.eps, out_dtype=out_dtype)
