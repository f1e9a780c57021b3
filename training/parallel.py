"""Data and expert parallelism of the torch engine over the launcher's ranks (gloo on the CPU, NCCL on GPUs).

With W ranks and train.expert_parallel = E_p (dividing W and every MoE layer's n_experts), rank r belongs to
the expert-parallel group of ranks E_p * (r // E_p) ... E_p * (r // E_p) + E_p - 1 (neighbouring ranks, so a
group stays on one host when E_p <= GPUs per host) and holds that group's share of the experts: n_experts / E_p
per layer (hybrid/expert_parallel.py). The ranks r % E_p + k * E_p hold the same share: the expert shard's
data-parallel replicas.

The step optimizes the mean of the W ranks' losses, as one process with W micro-batches would (the engine's
gradient accumulation): after backward each rank's dense gradients are summed over all W ranks, its expert
gradients (which the all-to-all's backward already summed over its group's tokens) over the shard's replicas,
and both divided by W. The global gradient norm counts every expert once. AdamW then makes the same update on
every replica of a parameter, so the replicas stay equal without broadcasts.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from hybrid.errors import ConfigError
from hybrid.expert_parallel import ExpertGroup, expert_parameters, gather_shards, local_shard, shard_experts
from hybrid.spec import Layout

from .config import TrainConfig


def check_expert_parallel(cfg: TrainConfig, layout: Layout, world_size: int, deepspeed: bool) -> None:
    """train.expert_parallel against the layout, the number of ranks and the engine; a ConfigError names it."""
    ep = cfg.expert_parallel
    if ep == 1:
        return
    key = f"train.expert_parallel={ep}"
    moe = [(spec.index, spec.mlp.n_experts) for spec in layout.layers if spec.mlp is not None
           and spec.mlp.kind == "moe"]
    if not moe:
        raise ConfigError(f"{key}: layout {layout.name} has no MoE layer to split over ranks (use 1)")
    for index, n in moe:
        if n % ep:
            raise ConfigError(f"{key} must divide the number of experts of every MoE layer: layers.{index}."
                              f"n_experts={n}")
    if world_size % ep:
        raise ConfigError(f"{key} must divide the number of ranks, {world_size} (start as many ranks as "
                          f"train.expert_parallel, or a multiple: deepspeed --num_gpus {ep} train.py ...)")
    if deepspeed:
        raise ConfigError(f"{key} runs on the torch engine only (set train.engine=torch or auto, and no "
                          "--deepspeed_config): DeepSpeed ZeRO would average and partition the different experts "
                          "each rank holds as if they were one replicated parameter")


class Parallel:
    """This rank's place: `world` ranks, `ep` its expert group (None without expert parallelism) and the group of
    its expert shard's replicas. Making one is collective (every rank creates every group, in the same order)."""

    def __init__(self, expert_parallel: int = 1):
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.rank = dist.get_rank() if self.world > 1 else 0
        self.ep: Optional[ExpertGroup] = None
        self.replicas = None  # the process group of this rank's expert-shard replicas (None: no replica)
        if expert_parallel > 1:
            size = expert_parallel
            assert self.world % size == 0, (self.world, size)  # check_expert_parallel said so to the user
            for first in range(0, self.world, size):
                ranks = list(range(first, first + size))
                group = dist.new_group(ranks)
                if self.rank in ranks:
                    self.ep = ExpertGroup(group, self.rank - first, size)
            if self.world > size:
                for index in range(size):
                    ranks = list(range(index, self.world, size))
                    group = dist.new_group(ranks)
                    if self.rank in ranks:
                        self.replicas = group

    def shard(self, model: torch.nn.Module) -> None:
        """Keep this rank's experts only (before the optimizer is made)."""
        if self.ep is not None:
            shard_experts(model, self.ep)

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of `t` over all ranks (t itself on one rank)."""
        if self.world == 1:
            return t
        t = t.clone()
        dist.all_reduce(t)
        return t / self.world

    def average_gradients(self, model: torch.nn.Module) -> None:
        """Gradients of the mean loss over all ranks (see the module docstring); nothing on one rank."""
        if self.world == 1:
            return
        experts = {id(p) for p in expert_parameters(model).values()}
        params = list(model.parameters())
        for p in params:
            if p.grad is None:  # every rank must send the same tensors
                p.grad = torch.zeros_like(p)
        _all_reduce([p.grad for p in params if id(p) not in experts], None, self.world)
        _all_reduce([p.grad for p in params if id(p) in experts], self.replicas, self.world,
                    skip=self.replicas is None)

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_ over the whole model, every expert counted once. Returns the norm
        before clipping (0-dim, the same on every rank)."""
        if self.ep is None:
            return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        experts = {id(p) for p in expert_parameters(model).values()}
        params = [p for p in model.parameters() if p.grad is not None]
        dense = _sum_of_squares([p.grad for p in params if id(p) not in experts])
        own = _sum_of_squares([p.grad for p in params if id(p) in experts])
        dist.all_reduce(own, group=self.ep.group)  # the group's shards together are every expert
        norm = (dense + own).sqrt()
        torch._foreach_mul_([p.grad for p in params], (max_norm / (norm + 1e-6)).clamp(max=1.0))
        return norm

    # ------------------------------------------------------------------------------ checkpoint state
    def full_optimizer_state(self, opt: torch.optim.Optimizer, model: torch.nn.Module) -> dict:
        """The optimizer's state_dict with every expert's moments (collective over the expert group; those on the
        CPU): the state one process would hold. The optimizer's own state is left as it is."""
        state = opt.state_dict()
        state["state"] = dict(state["state"])  # its entries are the optimizer's live dicts: replaced, not changed
        for index, p in self._expert_indices(opt, model).items():
            if index not in state["state"]:  # no step taken yet
                continue
            state["state"][index] = {key: gather_shards(value, self.ep).cpu() if torch.is_tensor(value) and
                                     value.shape == p.shape else value
                                     for key, value in state["state"][index].items()}
        return state

    def local_optimizer_state(self, state: dict, opt: torch.optim.Optimizer, model: torch.nn.Module) -> dict:
        """A full optimizer state_dict (every expert) cut to this rank's experts."""
        for index, p in self._expert_indices(opt, model).items():
            if index not in state["state"]:
                continue
            state["state"][index] = {key: local_shard(value, self.ep) if torch.is_tensor(value) and value.ndim ==
                                     p.ndim and value.shape[0] == p.shape[0] * self.ep.size else value
                                     for key, value in state["state"][index].items()}
        return state

    @staticmethod
    def _expert_indices(opt: torch.optim.Optimizer, model: torch.nn.Module) -> dict:
        """{state_dict index: parameter} of the sharded expert parameters in the optimizer's numbering."""
        experts = {id(p) for p in expert_parameters(model).values()}
        ordered = [p for group in opt.param_groups for p in group["params"]]
        return {i: p for i, p in enumerate(ordered) if id(p) in experts}


def _sum_of_squares(grads: list) -> torch.Tensor:
    """The squared 2-norm of all of `grads` together (in their dtype; grads is never empty here)."""
    return torch.stack(torch._foreach_norm(grads)).square().sum()


BUCKET = 2 ** 26  # elements per all-reduce buffer (256 MB of fp32): the copy made for it stays bounded


def _all_reduce(grads: list, group, world: int, skip: bool = False) -> None:
    """Sum `grads` over `group` (None: all ranks), a few flat buffers per dtype, then divide by `world`; skip: only
    divide (a group of one rank)."""
    by_dtype: dict = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        if skip:
            torch._foreach_div_(same, world)
            continue
        buckets, size = [[]], 0
        for g in same:
            if size and size + g.numel() > BUCKET:
                buckets, size = buckets + [[]], 0
            buckets[-1].append(g)
            size += g.numel()
        for bucket in buckets:
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat, group=group)
            flat /= world
            torch._foreach_copy_(bucket, [part.view_as(g) for part, g in
                                          zip(flat.split([g.numel() for g in bucket]), bucket)])
