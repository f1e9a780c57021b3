"""The routed experts of a mixture-of-experts MLP: each token's output is the router-weighted sum of the SwiGLU
experts it was routed to. The reference is a loop over the experts, each running on the tokens routed to it
(index_select / index_add): the definition of correct and the CPU path. `grouped.py` beside it computes the same
with the tokens sorted by expert and one grouped matmul per projection."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.swiglu.reference import swiglu


def check(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, expert: Tensor, weight: Tensor,
          keep: Optional[Tensor]) -> None:
    n_experts, d_ff, d = w_gate.shape
    if x.dim() != 2 or x.shape[1] != d or w_up.shape != w_gate.shape or tuple(w_down.shape) != (n_experts, d, d_ff):
        raise ValueError(f"moe_experts: x {tuple(x.shape)} must be (tokens, {d}); w_gate / w_up (experts, d_ff, "
                         f"d_model) = {tuple(w_gate.shape)} / {tuple(w_up.shape)}, w_down (experts, d_model, d_ff) "
                         f"= {tuple(w_down.shape)}")
    if expert.shape != weight.shape or expert.dim() != 2 or expert.shape[0] != x.shape[0] or \
            (keep is not None and keep.shape != expert.shape):
        raise ValueError(f"moe_experts: expert {tuple(expert.shape)}, weight {tuple(weight.shape)} and keep must be "
                         f"(tokens={x.shape[0]}, top_k)")


def moe_experts(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, expert: Tensor, weight: Tensor,
                keep: Optional[Tensor] = None) -> Tensor:
    """sum_j weight[t, j] * E_{expert[t, j]}(x[t]) for every token t, E_e(h) = down_e(silu(gate_e(h)) * up_e(h)).

    x: (tokens, d_model). w_gate, w_up: (n_experts, d_ff, d_model) and w_down: (n_experts, d_model, d_ff), laid
    out as nn.Linear weights (out, in). expert: (tokens, top_k) int64 expert ids, each token's distinct; weight:
    (tokens, top_k) router weights; keep: (tokens, top_k) bool or None, False for an assignment dropped by the
    capacity limit (it adds nothing). Computes in x's dtype (the weights and router weights are cast to it).
    Returns (tokens, d_model)."""
    check(x, w_gate, w_up, w_down, expert, weight, keep)
    token = torch.arange(x.shape[0], device=x.device).repeat_interleave(expert.shape[1])
    flat_expert, flat_weight = expert.reshape(-1), weight.reshape(-1).to(x.dtype)
    routed = torch.ones_like(flat_expert, dtype=torch.bool) if keep is None else keep.reshape(-1)
    out = torch.zeros_like(x)
    for e in range(w_gate.shape[0]):
        idx = torch.nonzero(routed & (flat_expert == e)).squeeze(1)
        rows = token.index_select(0, idx)
        h = x.index_select(0, rows)
        y = F.linear(swiglu(F.linear(h, w_gate[e].to(x.dtype)), F.linear(h, w_up[e].to(x.dtype))),
                     w_down[e].to(x.dtype))
        out = out.index_add(0, rows, y * flat_weight.index_select(0, idx)[:, None])
    return out
