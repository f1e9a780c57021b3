"""SwiGLU's gate: silu(gate) * up, elementwise (the MLP's projections stay matmuls around it)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """gate, up: (..., d_ff) of one dtype. Returns silu(gate) * up, (..., d_ff) in that dtype."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} must "
                         "have one shape and dtype")
    return F.silu(gate) * up
