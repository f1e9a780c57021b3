"""Several projections of one input, the decode step's matmuls (semantics; the Triton path is `triton_gemv.py`).

`linears(x, weights, biases)` is [F.linear(x, w, b) for each weight]: q / k / v of an attention layer, or one
projection alone. `swiglu_linear(x, w_gate, w_up)` is silu(x @ w_gate.T) * (x @ w_up.T), the first half of a
SwiGLU MLP. A decode step multiplies a handful of rows by each weight, where a matmul library's tiles leave
most of the GPU idle; the Triton path reads each weight once over every SM in one launch for all of them.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch.nn.functional as F
from torch import Tensor

# rows up to which the GPU path may run the fused few-row kernel (`fused_pays` says where it does)
MAX_ROWS = 8


def fused_pays(rows: int, widths) -> bool:
    """Whether the few-row kernel beats the matmul library for `rows` rows times weights of these output widths
    (H200, bf16, inside CUDA graphs; eval/results/kernels.md "Few-row projections"): one row always but for the
    widest weights (an 11008-wide SwiGLU: 0.85x), up to 4 rows while every weight is at most 2048 wide (a 3072 or
    4384-wide in-projection at 4 rows: 0.5-0.76x), up to 8 rows while at most 1024 wide. Past that a library
    tile of 64 columns has enough columns to fill the GPU and its tensor-core tiles win."""
    widest = max(widths)
    if rows <= 1:
        return widest <= 8192
    return (rows <= 4 and widest <= 2048) or (rows <= MAX_ROWS and widest <= 1024)


def check(x: Tensor, weights: Sequence[Tensor], biases: Optional[Sequence[Optional[Tensor]]] = None) -> None:
    if not weights:
        raise ValueError("linears: no weight given")
    k = x.shape[-1]
    for i, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != k:
            raise ValueError(f"linears: weight {i} has shape {tuple(w.shape)}; x has {k} features, so it must be "
                             f"(out_features, {k})")
        if w.dtype != x.dtype or w.device != x.device:
            raise ValueError(f"linears: weight {i} is {w.dtype} on {w.device}, x is {x.dtype} on {x.device}")
    if biases is not None:
        if len(biases) != len(weights):
            raise ValueError(f"linears: {len(biases)} biases for {len(weights)} weights")
        for i, (w, b) in enumerate(zip(weights, biases)):
            if b is not None and b.shape != (w.shape[0],):
                raise ValueError(f"linears: bias {i} has shape {tuple(b.shape)}, weight {i} has {w.shape[0]} "
                                 "outputs")


def linears(x: Tensor, weights: Sequence[Tensor], biases: Optional[Sequence[Optional[Tensor]]] = None) -> list:
    """x (..., K); weights [(N_i, K)]; biases None or [(N_i,) or None]. Returns [(..., N_i)]."""
    check(x, weights, biases)
    biases = biases if biases is not None else [None] * len(weights)
    return [F.linear(x, w, b) for w, b in zip(weights, biases)]


def swiglu_linear(x: Tensor, w_gate: Tensor, w_up: Tensor) -> Tensor:
    """x (..., K); w_gate, w_up (N, K). Returns silu(x @ w_gate.T) * (x @ w_up.T), (..., N)."""
    check(x, [w_gate, w_up])
    if w_gate.shape != w_up.shape:
        raise ValueError(f"swiglu_linear: w_gate {tuple(w_gate.shape)} and w_up {tuple(w_up.shape)} differ")
    return F.silu(F.linear(x, w_gate)) * F.linear(x, w_up)


def check_norm(x: Tensor, residual: Tensor, norm_weight: Tensor, weights: Sequence[Tensor], swiglu: bool) -> None:
    if residual.shape != x.shape:
        raise ValueError(f"add_rmsnorm_linears: residual {tuple(residual.shape)} must have x's shape "
                         f"{tuple(x.shape)}")
    if norm_weight.shape != (x.shape[-1],):
        raise ValueError(f"add_rmsnorm_linears: norm weight {tuple(norm_weight.shape)} must be ({x.shape[-1]},)")
    if swiglu and (len(weights) != 2 or weights[0].shape != weights[1].shape):
        raise ValueError("add_rmsnorm_linears: swiglu takes two weights of one shape (gate, up), got "
                         f"{[tuple(w.shape) for w in weights]}")


def add_rmsnorm_linears(x: Tensor, residual: Tensor, norm_weight: Tensor, eps: float, weights: Sequence[Tensor],
                        biases: Optional[Sequence[Optional[Tensor]]] = None, swiglu: bool = False):
    """A block's pre-norm and its first projections: s = residual + x, h = rmsnorm(s) * norm_weight (in s's dtype,
    kernels.norm's add_rmsnorm), then linears(h, weights, biases), or with swiglu [swiglu_linear(h, gate, up)].
    Returns (the projections, s)."""
    from kernels.norm.reference import add_rmsnorm
    check_norm(x, residual, norm_weight, weights, swiglu)
    check(x, weights, biases)
    h, s = add_rmsnorm(x, residual, norm_weight, eps)
    return ([swiglu_linear(h, *weights)] if swiglu else linears(h, weights, biases)), s
