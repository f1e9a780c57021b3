"""Mamba2 mixer (Dao & Gu 2024, "Transformers are SSMs"): SSD with heads, B/C groups and a gated RMSNorm.

u -> in_proj -> [z | xBC | dt];  xBC -> causal depthwise conv -> SiLU -> [x | B | C]
y = SSD(x, dt, A, B, C) + D * x;  y = RMSNorm(y * silu(z));  out = out_proj(y)
"""
from __future__ import annotations

import torch
from torch import nn

from kernels import ops

from .cache import HybridCache
from .projections import project
from .spec import Mamba2Spec
from .ssm_common import Fp32SSMParams, conv_params, conv_silu, dt_bias_init, is_decode_step


class Mamba2(Fp32SSMParams):
    def __init__(self, spec: Mamba2Spec, layer_idx: int, norm_eps: float = 1e-5):
        super().__init__()
        self.spec, self.layer_idx, self.norm_eps = spec, layer_idx, norm_eps
        s = spec
        self.in_proj = nn.Linear(s.d_model, 2 * s.d_inner + 2 * s.ngroups * s.d_state + s.nheads, bias=s.bias)
        self.conv_weight, self.conv_bias = conv_params(s.conv_dim, s.d_conv, s.conv_bias)
        self.dt_bias = nn.Parameter(dt_bias_init(s.nheads, s.dt_min, s.dt_max, s.dt_init_floor))
        # A = -exp(A_log), initialized uniform in [1, 16] as in the Mamba2 reference models
        self.A_log = nn.Parameter(torch.empty(s.nheads).uniform_(1, 16).log())
        self.D = nn.Parameter(torch.ones(s.nheads))
        self.norm_weight = nn.Parameter(torch.ones(s.d_inner))
        self.out_proj = nn.Linear(s.d_inner, s.d_model, bias=s.bias)

    def input_projections(self):
        """The Linear applied first to the normalized input (see Attention.input_projections)."""
        return (self.in_proj,), False

    def forward(self, u, cache: HybridCache | None = None, seq_idx=None, projected=None):
        """u: (batch, seqlen, d_model) -> (batch, seqlen, d_model). projected: [in_proj(u)] already computed."""
        s = self.spec
        state = cache.layers[self.layer_idx] if cache is not None else None
        zxbcdt = projected[0] if projected is not None else project(u, self.in_proj)[0]  # fused in a decode step
        step = is_decode_step(state, zxbcdt, seq_idx)
        z, xbc, dt = torch.split(zxbcdt, [s.d_inner, s.conv_dim, s.nheads], dim=-1)
        xbc = conv_silu(xbc, self.conv_weight, self.conv_bias, state, seq_idx, step)
        gn = s.ngroups * s.d_state
        x, B, C = torch.split(xbc, [s.d_inner, gn, gn], dim=-1)
        x = x.unflatten(-1, (s.nheads, s.headdim))   # (batch, seqlen, nheads, headdim)
        B = B.unflatten(-1, (s.ngroups, s.d_state))  # (batch, seqlen, ngroups, d_state)
        C = C.unflatten(-1, (s.ngroups, s.d_state))
        # A = -exp(A_log) is made inside the kernels from the parameter as it is (A_is_log)
        args = dict(D=self.D, dt_bias=self.dt_bias, dt_softplus=True, dt_limit=s.dt_limit, A_is_log=True)
        if step:
            y = ops.ssd_state_update(state.ssm, x[:, 0], dt[:, 0], self.A_log, B[:, 0], C[:, 0], **args)[:, None]
        elif state is None:
            y = ops.ssd_chunk_scan(x, dt, self.A_log, B, C, chunk_size=s.chunk_size, seq_idx=seq_idx, **args)
        else:
            y, final = ops.ssd_chunk_scan(x, dt, self.A_log, B, C, chunk_size=s.chunk_size, seq_idx=seq_idx,
                                              initial_state=state.ssm, return_final_state=True, **args)
            state.ssm.copy_(final)
        y = ops.rmsnorm_gated(y.flatten(-2), z, self.norm_weight, self.norm_eps, group_size=s.d_inner // s.ngroups)
        return project(y, self.out_proj)[0]
