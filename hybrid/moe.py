"""Mixture-of-experts MLP (Mixtral / Jamba / DeepSeek style): a router sends each token to top_k of n_experts
SwiGLU experts and sums their outputs with its weights; n_shared_experts more SwiGLU experts see every token.

Routing (`route`), in fp32 (or fp64) whatever the autocast:
  softmax router: scores = softmax(logits), the top_k scores are the weights (Mixtral, Jamba);
  sigmoid router: scores = sigmoid(logits), the top_k scores are the weights (DeepSeek-V3, without its expert
                  bias, group limit and scaling factor);
  norm_topk_prob: the chosen weights are divided by their sum (Mixtral, DeepSeek-V3 normalize; Jamba does not).
  Ties are broken by expert index (a stable sort), so routing is deterministic. Each token is routed on its own:
  without a capacity limit its output does not depend on the other tokens of the batch, which is what makes
  prefill + decode through the cache equal the full forward.
Capacity (training only; capacity_factor 0 = dropless): expert e takes at most C = ceil(capacity_factor * tokens *
  top_k / n_experts) of the forward's (tokens = batch * seqlen) assignments, the first C in token order (row by row,
  position by position); a later token routed to a full expert gets nothing from it (the weights of its other
  experts are not renormalized), only its other experts', the shared experts' and the residual. In eval mode
  (held-out loss, generation) routing is always dropless.
Losses, per MoE layer, in training (HybridLM adds aux_loss_weight * aux + z_loss_weight * z of every MoE layer to
  the training loss):
  aux = n_experts * sum_e f_e * P_e, f_e the fraction of tokens that chose expert e among their top_k (the choice,
        before any capacity drop; sums to top_k), P_e the mean over tokens of the router probability of e
        (softmax; for the sigmoid router the scores divided by their sum over experts). It is top_k when the
        load is uniform: the load-balancing loss of Switch Transformer, as transformers' Mixtral / Jamba compute
        it over one layer.
  z   = mean over tokens of logsumexp(logits) ** 2 (ST-MoE's router z-loss).
The routed experts run as `kernels.ops.moe_experts`: a per-expert loop on the CPU (kernels/moe/reference.py), the
tokens sorted by expert and grouped matmuls on the GPU (kernels/moe/grouped.py). MoE layers hold no cache state.
With expert parallelism (`ep` set by hybrid/expert_parallel.py's shard_experts) a layer holds n_experts / E_p of
the experts and exchanges rows with the other ranks of its group instead; routing and losses stay this rank's.
"""
from __future__ import annotations

import copy

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels import ops

from .expert_parallel import ExpertGroup, moe_experts_across_ranks
from .mlp import SwiGLU
from .spec import MlpSpec, MoeSpec

# the statistics HybridLM.moe_stats holds, in order (then the weighted loss it added)
MOE_METRICS = ("moe_aux", "moe_z", "moe_dropped")


class MoeStats(NamedTuple):
    """One MoE layer's losses and routing statistics of its last training forward."""
    aux: Tensor        # 0-dim, the load-balancing loss (with its graph)
    z: Tensor          # 0-dim, the router z-loss (with its graph)
    load: Tensor       # (n_experts,) share of the forward's top_k assignments each expert was chosen for (sums to 1)
    dropped: Tensor    # 0-dim, share of the assignments the capacity limit dropped


class Routing(NamedTuple):
    expert: Tensor             # (tokens, top_k) int64, best first
    weight: Tensor             # (tokens, top_k) fp32
    keep: Optional[Tensor]     # (tokens, top_k) bool, False = dropped by the capacity limit; None = dropless
    stats: Optional[MoeStats]  # None unless asked for


def capacity(spec: MoeSpec, tokens: int) -> int:
    """Assignments an expert takes per forward of `tokens` tokens (capacity_factor > 0)."""
    return math.ceil(spec.capacity_factor * tokens * spec.top_k / spec.n_experts)


def _within_capacity(expert: Tensor, n_experts: int, cap: int) -> Tensor:
    """(tokens, top_k) bool: the first `cap` assignments of each expert in token order."""
    flat = expert.reshape(-1)                                  # token-major: (token, j) at token * top_k + j
    order = torch.sort(flat, stable=True).indices
    counts = torch.zeros(n_experts, dtype=torch.int64, device=flat.device).index_add_(0, flat, torch.ones_like(flat))
    starts = counts.cumsum(0) - counts
    rank_sorted = torch.arange(flat.numel(), device=flat.device) - starts.index_select(0, flat.index_select(0, order))
    rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)
    return (rank < cap).view_as(expert)


def route(logits: Tensor, spec: MoeSpec, training: bool, with_stats: bool = True) -> Routing:
    """Top-k routing of (tokens, n_experts) router logits (see the module docstring); the capacity limit applies
    when `training`. with_stats: also compute the losses and statistics (training needs them, decode does not)."""
    n, k, n_experts = logits.shape[0], spec.top_k, spec.n_experts
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    scores = logits.softmax(dim=-1) if spec.router == "softmax" else logits.sigmoid()
    ranked = torch.sort(scores, dim=-1, descending=True, stable=True)  # ties: the lower expert index first
    weight, expert = ranked.values[:, :k], ranked.indices[:, :k]
    if spec.norm_topk_prob:
        weight = weight / weight.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    keep = None
    if training and spec.capacity_factor > 0:
        keep = _within_capacity(expert, n_experts, capacity(spec, n))
    if not with_stats:
        return Routing(expert, weight, keep, None)
    flat = expert.reshape(-1)
    counts = torch.zeros(n_experts, dtype=scores.dtype, device=scores.device).index_add_(
        0, flat, torch.ones_like(flat, dtype=scores.dtype))
    probs = scores if spec.router == "softmax" else scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    aux = n_experts * (counts / max(n, 1) * probs.mean(dim=0)).sum()
    z = torch.logsumexp(logits, dim=-1).square().mean()
    dropped = 1 - keep.float().mean() if keep is not None else torch.zeros((), device=logits.device)
    stats = MoeStats(aux=aux, z=z, load=(counts / max(n * k, 1)).detach(), dropped=dropped.detach())
    return Routing(expert, weight, keep, stats)


class Router(nn.Linear):
    """The router's logits in fp32 or wider (autocast off): the top-k choice should not flip with the compute
    dtype. A module call, so that DeepSpeed ZeRO-3 gathers its weight."""

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(dtype), self.weight.to(dtype))


class MoE(nn.Module):
    """x (..., d_model) -> (..., d_model). Expert weights are stacked per projection as nn.Linear weights:
    gate_proj / up_proj (n_experts, d_ff, d_model), down_proj (n_experts, d_model, d_ff). After a forward in
    training mode `stats` holds that forward's MoeStats (None in eval mode). With `ep` set (expert parallelism) the
    stacked weights hold only this rank's n_experts / ep.size experts."""

    def __init__(self, spec: MoeSpec):
        super().__init__()
        self.spec = spec
        e, d, f = spec.n_experts, spec.d_model, spec.d_ff
        self.router = Router(d, e, bias=False)
        self.gate_proj = nn.Parameter(torch.empty(e, f, d))
        self.up_proj = nn.Parameter(torch.empty(e, f, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, f))
        # n shared experts of d_ff each are one SwiGLU of n * d_ff (the sum of their outputs), as DeepSeek builds them
        self.shared = SwiGLU(MlpSpec(d, "swiglu", f * spec.n_shared_experts)) if spec.n_shared_experts else None
        self.stats: Optional[MoeStats] = None
        self.ep: Optional[ExpertGroup] = None
        self.reset_parameters(0.02, 0.02)

    @torch.no_grad()
    def reset_parameters(self, std: float, residual_std: float) -> None:
        """The experts' projections as HybridLM initializes linear layers: down_proj writes the residual stream."""
        nn.init.normal_(self.gate_proj, std=std)
        nn.init.normal_(self.up_proj, std=std)
        nn.init.normal_(self.down_proj, std=residual_std)

    def __deepcopy__(self, memo):
        """A copy without the last forward's statistics: they hold the router losses' autograd graph, which a
        deep copy refuses (and a copy has not run that forward). The expert group (a process group) is shared."""
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = None if key == "stats" else value if key == "ep" else copy.deepcopy(value, memo)
        return new

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        r = route(self.router(flat), self.spec, self.training, with_stats=self.training)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        args = (flat.to(dtype), self.gate_proj, self.up_proj, self.down_proj, r.expert, r.weight, r.keep)
        out = ops.moe_experts(*args) if self.ep is None else moe_experts_across_ranks(*args, self.ep)
        if self.shared is not None:
            out = out + self.shared(flat).to(out.dtype)
        self.stats = r.stats
        return out.view(*shape[:-1], out.shape[-1])
