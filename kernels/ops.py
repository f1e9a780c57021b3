"""The dispatched ops the model calls (`from kernels import ops; ops.ssd_chunk_scan(...)`).

Each runs the implementation that `kernels.registry` picks for its first tensor's device (the table is
`registry.IMPLEMENTATIONS`; `python -m kernels` prints the choice on this machine). Keyword options are passed
through unchanged; their meaning and defaults are those of the op's reference, `kernels/<op>/reference.py`, which
every backend matches.
"""
from __future__ import annotations

from torch import Tensor

from . import registry
from .registry import resolve


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, **options):
    """Causal depthwise conv1d (+ SiLU). x: (batch, seqlen, channels); weight: (channels, width); bias:
    (channels,). Options: activation, seq_idx (batch, seqlen), initial_state (batch, channels, width - 1),
    return_final_state. Returns (batch, seqlen, channels) [, final state (batch, channels, width - 1)]."""
    return resolve("causal_conv1d", x.device.type).function(x, weight, bias, **options)


def causal_conv1d_update(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None = None, **options):
    """One decode step of causal_conv1d. x: (batch, channels); conv_state: (batch, channels, width - 1), shifted
    in place. Options: activation. Returns (batch, channels)."""
    return resolve("causal_conv1d_update", x.device.type).function(x, conv_state, weight, bias, **options)


def ssd_chunk_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, **options):
    """Mamba-2 SSD scan. x: (batch, seqlen, nheads, headdim); dt: (batch, seqlen, nheads); A: (nheads,);
    B, C: (batch, seqlen, ngroups, d_state). Options: chunk_size, D, z, dt_bias, dt_softplus, dt_limit,
    initial_state (batch, nheads, headdim, d_state), seq_idx, return_final_state.
    Returns y (batch, seqlen, nheads, headdim) [, final state (batch, nheads, headdim, d_state) fp32]."""
    return resolve("ssd_chunk_scan", x.device.type).function(x, dt, A, B, C, **options)


def ssd_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, **options):
    """One Mamba-2 decode step. state: (batch, nheads, headdim, d_state) fp32, updated in place;
    x: (batch, nheads, headdim); dt: (batch, nheads); B, C: (batch, ngroups, d_state). Options: D, z, dt_bias,
    dt_softplus, dt_limit, A_is_log (A holds A_log). Returns y (batch, nheads, headdim)."""
    return resolve("ssd_state_update", x.device.type).function(state, x, dt, A, B, C, **options)


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, **options):
    """Mamba-1 selective scan. u, delta: (batch, seqlen, d_inner); A: (d_inner, d_state);
    B, C: (batch, seqlen, d_state). Options: D, z, delta_bias, delta_softplus, initial_state
    (batch, d_inner, d_state), seq_idx, return_final_state, chunk_size.
    Returns y (batch, seqlen, d_inner) [, final state (batch, d_inner, d_state) fp32]."""
    return resolve("selective_scan", u.device.type).function(u, delta, A, B, C, **options)


def selective_state_update(state: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, **options):
    """One Mamba-1 decode step. state: (batch, d_inner, d_state) fp32, updated in place; u, delta:
    (batch, d_inner); B, C: (batch, d_state). Options: D, z, delta_bias, delta_softplus, A_is_log (A holds A_log).
    Returns (batch, d_inner)."""
    return resolve("selective_state_update", u.device.type).function(state, u, delta, A, B, C, **options)


def rmsnorm(x: Tensor, weight: Tensor, eps: float, **options):
    """x: (..., d); weight: (d,). Options: out_dtype. Returns x / rms(x) * weight, (..., d) in out_dtype
    (default x.dtype)."""
    return resolve("rmsnorm", x.device.type).function(x, weight, eps, **options)


def add_rmsnorm(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float, **options):
    """A residual block's pre-norm with the add before it: s = residual + x (x alone when residual is None).
    x, residual: (..., d); weight: (d,). Options: out_dtype. Returns (rmsnorm(s) * weight in out_dtype
    (default s.dtype), s)."""
    return resolve("add_rmsnorm", x.device.type).function(x, residual, weight, eps, **options)


def rmsnorm_gated(x: Tensor, z: Tensor | None, weight: Tensor, eps: float, **options):
    """Mamba-2's gated, grouped RMSNorm. x, z: (..., d) (z None: no gate); weight: (d,). Options: group_size,
    norm_before_gate. Returns (..., d) in x.dtype."""
    return resolve("rmsnorm_gated", x.device.type).function(x, z, weight, eps, **options)


def rope_kv_write(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, k_cache: Tensor, v_cache: Tensor, pos_cache: Tensor,
                  ring_size: int, theta):
    """A decode step's RoPE and cache write in one: q (batch, heads, head_dim) and the new key k (batch, kv_heads,
    head_dim) rotated to pos (batch,) (theta None: not rotated); k and v written at slot pos % ring_size of
    k_cache / v_cache (batch, slots, kv_heads, head_dim), pos into pos_cache (batch, slots). Returns q rotated."""
    return resolve("rope_kv_write", q.device.type).function(q, k, v, pos, k_cache, v_cache, pos_cache, ring_size,
                                                            theta)


def rope(x: Tensor, pos: Tensor, theta: float):
    """Rotary position embedding (rotate-half). x: (batch, seqlen, heads, head_dim); pos: (batch, seqlen) int.
    Returns x rotated, same shape and dtype."""
    return resolve("rope", x.device.type).function(x, pos, theta)


def swiglu(gate: Tensor, up: Tensor):
    """silu(gate) * up. gate, up: (..., d_ff) of one dtype. Returns (..., d_ff)."""
    return resolve("swiglu", gate.device.type).function(gate, up)


def linears(x: Tensor, weights, biases=None) -> list:
    """Several projections of one input: [x @ w.T + b for each weight]. x (..., K); weights [(N_i, K)]; biases
    None or [(N_i,) or None]. On the GPU a decode step's few rows go through one launch for all weights (the
    matmul library's tiles leave most SMs idle there); with autograd or many rows it is F.linear."""
    return resolve("linears", x.device.type).function(x, weights, biases)


def swiglu_linear(x: Tensor, w_gate: Tensor, w_up: Tensor) -> Tensor:
    """silu(x @ w_gate.T) * (x @ w_up.T): the first half of a SwiGLU MLP. x (..., K); w_gate, w_up (N, K).
    Fused into one launch for a decode step's few rows on the GPU, as `linears`."""
    return resolve("swiglu_linear", x.device.type).function(x, w_gate, w_up)


def add_rmsnorm_linears(x: Tensor, residual: Tensor, norm_weight: Tensor, eps: float, weights, biases=None,
                        swiglu: bool = False):
    """A block's pre-norm with its first projections: s = residual + x, h = rmsnorm(s) * norm_weight, then
    `linears(h, weights, biases)` (or `[swiglu_linear(h, gate, up)]` with swiglu). Returns (projections, s).
    One launch for a decode step's few rows on the GPU; otherwise add_rmsnorm then the projections."""
    return resolve("add_rmsnorm_linears", x.device.type).function(x, residual, norm_weight, eps, weights, biases,
                                                                  swiglu)


def moe_experts(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, expert: Tensor, weight: Tensor,
                keep: Tensor | None = None):
    """The routed experts of an MoE MLP: sum_j weight[t, j] * SwiGLU expert expert[t, j] of x[t]. x (tokens, d);
    w_gate / w_up (experts, d_ff, d), w_down (experts, d, d_ff); expert, weight, keep (tokens, top_k)."""
    return resolve("moe_experts", x.device.type).function(x, w_gate, w_up, w_down, expert, weight, keep)


def linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, **options):
    """The LM head and its loss in one op: mean cross entropy of h @ weight.T against targets, without the
    (tokens, vocab) logits on the GPU. h: (..., d); weight: (vocab, d); targets: (...) int. Options:
    ignore_index, chunk_tokens. Returns the fp32 mean loss (a scalar)."""
    return resolve("linear_cross_entropy", h.device.type).function(h, weight, targets, **options)


def attention(q: Tensor, k: Tensor, v: Tensor, **options):
    """Training / prefill attention. q: (batch, seqlen, n_heads, head_dim); k, v: (batch, seqlen, n_kv_heads,
    head_dim). Options: kind ('global', 'local', 'sparse'), window, sinks, stride, seq_idx, scale.
    Returns (batch, seqlen, n_heads, head_dim)."""
    return resolve("attention", q.device.type).function(q, k, v, **options)


def attention_with_cache(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, pos_cache: Tensor,
                         q_pos: Tensor, **options):
    """New tokens over the cached keys plus their own. q: (batch, t, n_heads, d); k, v: (batch, t, n_kv_heads, d);
    k_cache, v_cache: (batch, slots, n_kv_heads, d); pos_cache: (batch, slots); q_pos: (batch, t). Options:
    ring_start, kind, window, sinks, stride, seq_idx, scale. Returns (batch, t, n_heads, d)."""
    return resolve("attention_with_cache", q.device.type).function(q, k, v, k_cache, v_cache, pos_cache, q_pos,
                                                                    **options)


def attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, pos_cache: Tensor, q_pos: Tensor, **options):
    """One decode step over a cache already holding the new key. q: (batch, n_heads, d); k_cache, v_cache:
    (batch, slots, n_kv_heads, d); pos_cache: (batch, slots); q_pos: (batch,). Options: ring_start, kind, window,
    sinks, stride, scale. Returns (batch, n_heads, d)."""
    return resolve("attention_decode", q.device.type).function(q, k_cache, v_cache, pos_cache, q_pos, **options)


_missing = [op for op in registry.IMPLEMENTATIONS if op not in globals()]
assert not _missing, f"ops in kernels/registry.py without an entry point here: {_missing}"
