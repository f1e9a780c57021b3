"""Expert parallelism: the routed experts of every MoE layer split over the E_p ranks of an expert-parallel group,
each rank holding n_experts / E_p of them (rank i of the group: experts i * n_local ... (i + 1) * n_local - 1).

Each rank routes its own tokens exactly as one process does (hybrid/moe.py: the same router, top-k, capacity and
losses, over this rank's tokens), then, per MoE layer:

  1. sorts its (token, expert) assignments by expert (kernels/moe/grouped.py): the rows for each rank's experts
     are contiguous, in expert order;
  2. exchanges the per-expert counts with the group (all_to_all_single), one host read of them;
  3. sends each row to the rank owning its expert (all_to_all_single with those split sizes);
  4. regroups the rows it received (they arrive by source rank, then expert) by local expert and runs them
     through the grouped SwiGLU experts (`expert_swiglu`);
  5. sends the results back the same way (the inverse all-to-all) and sums each token's top_k rows with its
     router weights, as on one process.

Backward runs the same all-to-alls in reverse (`_AllToAll`). Every rank of a group must run every forward and
backward of the model together (training, held-out evaluation), in the same order; a single rank cannot decode
alone (train.py samples from the gathered full model). The result is the one-process result: each expert sees
the same rows, only in another order (tests/test_expert_parallel.py, fp64).

Gradient averaging and checkpoints are the trainer's (training/parallel.py); this module shards a model
(`shard_experts`), names the sharded parameters (`expert_parameters`) and gathers or slices their tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kernels.moe import grouped


@dataclass(frozen=True)
class ExpertGroup:
    """The expert-parallel group this rank belongs to."""
    group: Any   # the torch.distributed process group of its E_p ranks
    rank: int    # this rank's index in it
    size: int    # E_p

    def local_range(self, n_experts: int) -> tuple[int, int]:
        """[first, end) of the experts this rank holds."""
        n_local = n_experts // self.size
        return self.rank * n_local, (self.rank + 1) * n_local


class _AllToAll(torch.autograd.Function):
    """all_to_all_single over the group: x's rows split by `send` go out, `recv` rows come in (x: (n, d)). Its
    gradient is the reverse exchange (the splits swapped)."""

    @staticmethod
    def forward(ctx, x, send, recv, group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _exchange(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.recv, ctx.send, ctx.group), None, None, None


def _exchange(x: Tensor, send: list, recv: list, group) -> Tensor:
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


def moe_experts_across_ranks(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, expert: Tensor,
                             weight: Tensor, keep: Optional[Tensor], ep: ExpertGroup) -> Tensor:
    """`kernels.ops.moe_experts` with the experts spread over the group: x (tokens, d_model) this rank's tokens;
    w_gate / w_up (n_local, d_ff, d_model), w_down (n_local, d_model, d_ff) this rank's experts; expert, weight,
    keep (tokens, top_k) as routed here, expert ids global (0 ... n_local * E_p - 1). Returns (tokens, d_model)."""
    n_local = w_gate.shape[0]
    order, inverse, counts = grouped.sort_assignments(expert, n_local * ep.size)
    rows = grouped.dispatch(x, order, inverse, expert.shape[1], keep)
    # (E_p, n_local): row s = how many rows source s sends to each of this rank's experts
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts, group=ep.group)
    recv_counts = recv_counts.view(ep.size, n_local)
    host = torch.cat([counts.view(ep.size, n_local).sum(1), recv_counts.sum(1), recv_counts.sum(0)]).tolist()
    send, recv, per_expert = host[:ep.size], host[ep.size:2 * ep.size], host[2 * ep.size:]
    received = _AllToAll.apply(rows, send, recv, ep.group)
    # received rows come grouped (source, expert); the experts want (expert, source): a stable sort by expert
    local = torch.arange(n_local, device=x.device).repeat(ep.size)
    key = local.repeat_interleave(recv_counts.reshape(-1), output_size=sum(recv))
    by_expert = torch.sort(key, stable=True).indices
    back = torch.empty_like(by_expert).scatter_(0, by_expert, torch.arange(by_expert.numel(), device=x.device))
    offs = torch.tensor(per_expert, device=x.device).cumsum(0).to(torch.int32)
    y = grouped.expert_swiglu(grouped.permute(received, by_expert, back), w_gate, w_up, w_down, offs,
                              force_loop=sum(recv) == 0)
    y = _AllToAll.apply(grouped.permute(y, back, by_expert), recv, send, ep.group)
    return grouped.combine(grouped.permute(y, inverse, order), weight, keep)


# ----------------------------------------------------------------------------- the sharded parameters

EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")  # the MoE layer's stacked (n_experts, ...) parameters


def _moe_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from .moe import MoE
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, MoE)]


def shard_experts(model: nn.Module, ep: ExpertGroup) -> None:
    """Keep only this rank's experts of every MoE layer (slices of the full, identically initialized weights)
    and have the layers run across the group. Every n_experts must be a multiple of ep.size."""
    for name, mod in _moe_layers(model):
        n = mod.spec.n_experts
        assert n % ep.size == 0, f"{name}: {n} experts over {ep.size} ranks"
        lo, hi = ep.local_range(n)
        for w in EXPERT_WEIGHTS:
            setattr(mod, w, nn.Parameter(getattr(mod, w).detach()[lo:hi].clone()))
        mod.ep = ep


def expert_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{state_dict name: parameter} of the sharded expert weights (empty for a model that is not sharded)."""
    return {f"{name}.{w}": getattr(mod, w) for name, mod in _moe_layers(model) if mod.ep is not None
            for w in EXPERT_WEIGHTS}


def expert_group(model: nn.Module) -> Optional[ExpertGroup]:
    """The group the model's experts are spread over (None: not sharded)."""
    return next((mod.ep for _, mod in _moe_layers(model) if mod.ep is not None), None)


def gather_shards(shard: Tensor, ep: ExpertGroup) -> Tensor:
    """The full (n_experts, ...) tensor from every rank's (n_local, ...) shard (collective over the group)."""
    parts = [torch.empty_like(shard) for _ in range(ep.size)]
    dist.all_gather(parts, shard.contiguous(), group=ep.group)
    return torch.cat(parts)


def local_shard(full: Tensor, ep: ExpertGroup) -> Tensor:
    """This rank's (n_local, ...) slice of a full (n_experts, ...) tensor, as its own copy."""
    lo, hi = ep.local_range(full.shape[0])
    return full[lo:hi].clone()


def full_state_dict(model: nn.Module) -> dict:
    """The model's state_dict with every expert (collective over the expert group when sharded): what one
    process holds, for checkpoints and export. The gathered experts are on the CPU (a GPU holds its share only)."""
    state, ep = model.state_dict(), expert_group(model)
    for name in expert_parameters(model):
        state[name] = gather_shards(state[name], ep).cpu()
    return state


def local_state_dict(model: nn.Module, full: dict) -> dict:
    """A full state_dict (every expert) cut to what this rank of a sharded model holds."""
    ep, names = expert_group(model), expert_parameters(model)
    return {k: local_shard(v, ep) if k in names else v for k, v in full.items()}
