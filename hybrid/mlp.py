"""SwiGLU feed-forward (LLaMA): down(silu(gate(x)) * up(x))."""
from torch import nn

from .projections import project, swiglu_in
from .spec import MlpSpec


class SwiGLU(nn.Module):
    def __init__(self, spec: MlpSpec):
        super().__init__()
        self.gate_proj = nn.Linear(spec.d_model, spec.d_ff, bias=False)
        self.up_proj = nn.Linear(spec.d_model, spec.d_ff, bias=False)
        self.down_proj = nn.Linear(spec.d_ff, spec.d_model, bias=False)

    def input_projections(self):
        """gate and up, a SwiGLU pair (see Attention.input_projections)."""
        return (self.gate_proj, self.up_proj), True

    def forward(self, x, projected=None):
        """x: (..., d_model). projected: [silu(gate(x)) * up(x)] already computed."""
        h = projected[0] if projected is not None else swiglu_in(x, self.gate_proj, self.up_proj)
        return project(h, self.down_proj)[0]
