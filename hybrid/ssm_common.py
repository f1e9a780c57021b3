"""What Mamba1 and Mamba2 share: fp32 SSM parameters, dt initialization, the depthwise conv parameters."""
from __future__ import annotations

import math

import torch
from torch import nn

from kernels import ops

FP32_PARAMS = ("A_log", "D", "dt_bias")


class Fp32SSMParams(nn.Module):
    """Keeps A_log, D and dt_bias in fp32 when the module is cast (`.half()`, `.to(torch.bfloat16)`).

    These set the decay exp(dt * A) that is compounded over thousands of steps; in 16-bit they lose the
    precision that long contexts need (the convention of mamba-ssm).
    """

    keep_fp32 = True  # HybridLM.keep_fp32_ssm_params(False) turns it off (DeepSpeed ZeRO-3)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if not self.keep_fp32:
            return self
        for name in FP32_PARAMS:
            p = getattr(self, name, None)
            if p is not None and p.dtype != torch.float32:
                p.data = p.data.float()
        return self


def dt_bias_init(n: int, dt_min: float, dt_max: float, floor: float, generator=None) -> torch.Tensor:
    """dt_bias such that softplus(dt_bias) is log-uniform in [dt_min, dt_max] (at least `floor`). (n,) fp32."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    # inverse of softplus: x = dt + log(1 - exp(-dt))
    return (dt + torch.log(-torch.expm1(-dt))).float()


def conv_params(channels: int, width: int, bias: bool) -> tuple[nn.Parameter, "nn.Parameter | None"]:
    """Depthwise causal conv weights (channels, width) and bias, initialized like nn.Conv1d (fan_in = width)."""
    bound = 1.0 / math.sqrt(width)
    weight = nn.Parameter(torch.empty(channels, width).uniform_(-bound, bound))  # (channels, width)
    b = nn.Parameter(torch.empty(channels).uniform_(-bound, bound)) if bias else None
    return weight, b


def is_decode_step(state, u: torch.Tensor, seq_idx) -> bool:
    """One new token per row continuing a cached sequence: use the O(1) state-update ops."""
    return state is not None and u.shape[1] == 1 and seq_idx is None


def conv_silu(x: torch.Tensor, weight, bias, state, seq_idx, step: bool) -> torch.Tensor:
    """Causal depthwise conv + SiLU over x (batch, seqlen, channels), reading and updating the cached conv
    state when there is one (a decode step shifts it by one token; a prefill replaces it)."""
    if step:
        return ops.causal_conv1d_update(x[:, 0], state.conv, weight, bias, activation="silu")[:, None]
    if state is None:
        return ops.causal_conv1d(x, weight, bias, activation="silu", seq_idx=seq_idx)
    y, final = ops.causal_conv1d(x, weight, bias, activation="silu", seq_idx=seq_idx,
                                     initial_state=state.conv, return_final_state=True)
    state.conv.copy_(final)
    return y
