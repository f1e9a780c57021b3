"""Mamba1 mixer (Gu & Dao 2023): selective scan with input-dependent dt, B, C per token.

u -> in_proj -> [x | z];  x -> causal depthwise conv -> SiLU;  x_proj(x) -> [dt_low | B | C]
(dt_bc_norm, as Jamba: dt_low, B, C = RMSNorm(dt_low), RMSNorm(B), RMSNorm(C), each with its own weight)
dt = dt_proj(dt_low) + dt_bias;  y = selective_scan(x, dt, A, B, C) + D * x;  y *= silu(z);  out_proj(y)
"""
from __future__ import annotations

import torch
from torch import nn

from kernels import ops

from .cache import HybridCache
from .projections import project
from .spec import Mamba1Spec
from .ssm_common import Fp32SSMParams, conv_params, conv_silu, dt_bias_init, is_decode_step


class Mamba1(Fp32SSMParams):
    def __init__(self, spec: Mamba1Spec, layer_idx: int, norm_eps: float = 1e-5):
        super().__init__()
        self.spec, self.layer_idx, self.norm_eps = spec, layer_idx, norm_eps
        s = spec
        self.in_proj = nn.Linear(s.d_model, 2 * s.d_inner, bias=s.bias)
        self.conv_weight, self.conv_bias = conv_params(s.d_inner, s.d_conv, s.conv_bias)
        self.x_proj = nn.Linear(s.d_inner, s.dt_rank + 2 * s.d_state, bias=False)
        self.dt_proj = nn.Linear(s.dt_rank, s.d_inner, bias=False)
        # as in the Mamba paper: small dt_proj weights keep dt near softplus(dt_bias) at the start
        bound = s.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        self.dt_bias = nn.Parameter(dt_bias_init(s.d_inner, s.dt_min, s.dt_max, s.dt_init_floor))
        # S4D-real init: A[:, n] = -(n + 1)
        A = torch.arange(1, s.d_state + 1, dtype=torch.float32).repeat(s.d_inner, 1)  # (d_inner, d_state)
        self.A_log = nn.Parameter(A.log())
        self.D = nn.Parameter(torch.ones(s.d_inner))
        self.out_proj = nn.Linear(s.d_inner, s.d_model, bias=s.bias)
        if s.dt_bc_norm:  # Jamba's: keeps the scale of dt_low, B and C (so of dt and the state) in hand
            self.dt_norm_weight = nn.Parameter(torch.ones(s.dt_rank))
            self.B_norm_weight = nn.Parameter(torch.ones(s.d_state))
            self.C_norm_weight = nn.Parameter(torch.ones(s.d_state))

    def input_projections(self):
        """The Linear applied first to the normalized input (see Attention.input_projections)."""
        return (self.in_proj,), False

    def forward(self, u, cache: HybridCache | None = None, seq_idx=None, projected=None):
        """u: (batch, seqlen, d_model) -> (batch, seqlen, d_model). projected: [in_proj(u)] already computed."""
        s = self.spec
        state = cache.layers[self.layer_idx] if cache is not None else None
        xz = projected[0] if projected is not None else project(u, self.in_proj)[0]  # fused in a decode step
        step = is_decode_step(state, xz, seq_idx)
        x, z = xz.chunk(2, dim=-1)
        x = conv_silu(x, self.conv_weight, self.conv_bias, state, seq_idx, step)
        dt_low, B, C = torch.split(project(x, self.x_proj)[0], [s.dt_rank, s.d_state, s.d_state], dim=-1)
        if s.dt_bc_norm:  # before every path below: full sequence, prefill into the cache, decode step
            dt_low = ops.rmsnorm(dt_low, self.dt_norm_weight, self.norm_eps)
            B = ops.rmsnorm(B, self.B_norm_weight, self.norm_eps)   # (batch, seqlen, d_state)
            C = ops.rmsnorm(C, self.C_norm_weight, self.norm_eps)
        dt = project(dt_low, self.dt_proj)[0]  # (batch, seqlen, d_inner)
        args = dict(D=self.D, z=z, delta_bias=self.dt_bias, delta_softplus=True)
        if step:  # the step makes A = -exp(A_log) itself
            args["z"] = z[:, 0]
            y = ops.selective_state_update(state.ssm, x[:, 0], dt[:, 0], self.A_log, B[:, 0], C[:, 0], A_is_log=True,
                                           **args)[:, None]
            return project(y, self.out_proj)[0]
        A = -torch.exp(self.A_log)     # (d_inner, d_state) fp32
        if state is None:
            y = ops.selective_scan(x, dt, A, B, C, seq_idx=seq_idx, **args)
        else:
            y, final = ops.selective_scan(x, dt, A, B, C, seq_idx=seq_idx, initial_state=state.ssm,
                                              return_final_state=True, **args)
            state.ssm.copy_(final)
        return self.out_proj(y)
