"""SwiGLU feed-forward (LLaMA): down(silu(gate(x)) * up(x))."""
from torch import nn

from kernels import ops

from .spec import MlpSpec


class SwiGLU(nn.Module):
    def __init__(self, spec: MlpSpec):
        super().__init__()
        self.gate_proj = nn.Linear(spec.d_model, spec.d_ff, bias=False)
        self.up_proj = nn.Linear(spec.d_model, spec.d_ff, bias=False)
        self.down_proj = nn.Linear(spec.d_ff, spec.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))
