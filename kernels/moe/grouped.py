"""The routed experts (semantics of `reference.py` beside this file) as grouped matmuls: the (token, expert)
assignments sorted by expert (stable, so each expert's tokens stay in token order), every projection one
`torch._grouped_mm` over the experts' contiguous row groups, then the rows put back in assignment order and each
token's top_k outputs summed with its router weights (a fixed order: deterministic, no atomics).

No host sync and static shapes throughout (expert counts by index_add, offsets by cumsum), so a decode step that
uses it can be captured in a CUDA graph. Assignments dropped by the capacity limit still take their row, zeroed,
so that shapes stay static: they add exactly nothing, but cost their matmul rows.

The steps are public functions (sort_assignments, dispatch, expert_swiglu, permute, combine): expert parallelism
(hybrid/expert_parallel.py) runs the same ones with the all-to-all exchanges between them.

`torch._grouped_mm` is used where this torch has it and it runs on the device and dtype at hand (fp32 / bf16 /
fp16 with 16-byte aligned rows; it is probed once per device and dtype, forward and backward). Elsewhere (fp64,
odd widths, an older torch) each expert's row group is multiplied on its own: the same arithmetic, one host read
of the group sizes.

Few tokens (a decode step: at most DENSE_MAX_TOKENS) and any call inside a CUDA graph capture run every expert
on every token instead (`dense`): batched matmuls over the experts, combined by the router weights, zero for the
experts a token did not pick. That reads each expert's weights once, as a decode step must anyway, needs no sort
and no host-side sizes, and is capturable whatever torch._grouped_mm does with the dtype at hand (some builds
fall back to a host loop for fp32, which a capture refuses).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from kernels import ops

from .reference import check


DENSE_MAX_TOKENS = 64  # tokens up to which every expert runs on every token (decode batches)


def available(device_type: str) -> bool:
    """The grouped path is the GPU's (the reference loop is the CPU's; tests call this module directly there)."""
    return device_type == "cuda"


@functools.lru_cache(maxsize=None)
def _probe(device: str, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs forward and backward here (some builds lack it for a device or dtype)."""
    try:
        with torch.enable_grad():
            a = torch.ones(8, 16, device=device, dtype=dtype, requires_grad=True)
            b = torch.ones(2, 16, 16, device=device, dtype=dtype, requires_grad=True)
            offs = torch.tensor([4, 8], device=device, dtype=torch.int32)
            out = torch._grouped_mm(a, b.transpose(-2, -1), offs=offs)
            out.backward(torch.ones_like(out))
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def native(x: Tensor, w: Tensor) -> bool:
    """Whether `grouped_mm(x, w, ...)` goes through torch._grouped_mm."""
    if not hasattr(torch, "_grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if any(n * x.element_size() % 16 for n in w.shape[1:]):  # rows and columns must start 16-byte aligned
        return False
    return _probe(str(x.device), x.dtype)


def grouped_mm(x: Tensor, w: Tensor, offs: Tensor, force_loop: bool = False) -> Tensor:
    """x (rows, in), w (groups, out, in) as nn.Linear weights, offs (groups,) int32 cumulative row ends: row group g
    (rows offs[g-1]:offs[g]) times w[g].T. Returns (rows, out)."""
    if not force_loop and native(x, w):
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
    sizes = torch.diff(offs, prepend=offs.new_zeros(1)).tolist()
    return torch.cat([part @ w[g].T for g, part in enumerate(torch.split(x, sizes))])


def moe_experts(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, expert: Tensor, weight: Tensor,
                keep: Optional[Tensor] = None, force_loop: bool = False) -> Tensor:
    """`reference.moe_experts`, grouped. force_loop: multiply each row group on its own even where
    torch._grouped_mm runs (tests compare the two)."""
    check(x, w_gate, w_up, w_down, expert, weight, keep)
    if not force_loop and (x.shape[0] <= DENSE_MAX_TOKENS or _capturing(x)):
        return dense(x, w_gate, w_up, w_down, expert, weight, keep)
    order, inverse, counts = sort_assignments(expert, w_gate.shape[0])
    rows = dispatch(x, order, inverse, expert.shape[1], keep)
    y = expert_swiglu(rows, w_gate, w_up, w_down, counts.cumsum(0).to(torch.int32), force_loop)
    return combine(permute(y, inverse, order), weight, keep)


def sort_assignments(expert: Tensor, n_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """The (token, expert) assignments of expert (tokens, top_k), flattened token-major, sorted by expert (stable:
    each expert's tokens stay in token order). Returns (order, its inverse permutation, (n_experts,) int64 counts
    of assignments per expert); no host sync."""
    flat = expert.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.zeros(n_experts, dtype=torch.int64, device=flat.device).index_add_(0, flat, torch.ones_like(flat))
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return order, inverse, counts


def dispatch(x: Tensor, order: Tensor, inverse: Tensor, top_k: int, keep: Optional[Tensor] = None) -> Tensor:
    """(tokens * top_k, d) rows: each assignment's token row in `order` (sort_assignments'), zero where the
    capacity limit dropped it (the row keeps its place, so shapes stay static)."""
    rows = _Dispatch.apply(x, order, inverse, top_k)
    if keep is not None:
        rows = rows * keep.reshape(-1).index_select(0, order)[:, None].to(x.dtype)
    return rows


def expert_swiglu(rows: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, offs: Tensor,
                  force_loop: bool = False) -> Tensor:
    """rows (n, d_model) grouped by expert, group g ending at offs[g] (int32, cumulative): each group through its
    SwiGLU expert, down(silu(gate(h)) * up(h)), in rows' dtype. Returns (n, d_model)."""
    ws = [w.to(rows.dtype) for w in (w_gate, w_up, w_down)]
    h = ops.swiglu(grouped_mm(rows, ws[0], offs, force_loop), grouped_mm(rows, ws[1], offs, force_loop))
    return grouped_mm(h, ws[2], offs, force_loop)


def combine(y: Tensor, weight: Tensor, keep: Optional[Tensor] = None) -> Tensor:
    """y (tokens * top_k, d) in assignment order ((token, j) at token * top_k + j) -> (tokens, d): each token's
    top_k rows summed with its router weights (dropped assignments weigh 0), in a fixed order."""
    w = weight.to(y.dtype) if keep is None else weight.to(y.dtype) * keep.to(y.dtype)
    return (y.view(weight.shape[0], weight.shape[1], -1) * w[..., None]).sum(dim=1)


def permute(y: Tensor, perm: Tensor, inverse: Tensor) -> Tensor:
    """y[perm], its gradient gathered back by the inverse permutation (no atomics)."""
    return _Permute.apply(y, perm, inverse)


class _Dispatch(torch.autograd.Function):
    """rows = x[order // k]: each token's k copies, sorted by expert. index_select's own backward is an atomic
    index_add (bf16 atomics: 19% of a MoE layer's fwd+bwd on an H200); here the row gradients are put back in
    assignment order by the inverse permutation (a gather) and each token's k rows summed."""

    @staticmethod
    def forward(ctx, x, order, inverse, k):
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, order // k)

    @staticmethod
    def backward(ctx, drows):
        (inverse,) = ctx.saved_tensors
        g = drows.index_select(0, inverse)
        return g.view(-1, ctx.k, g.shape[-1]).sum(1), None, None, None


class _Permute(torch.autograd.Function):
    """y[perm] whose gradient is gathered back by the inverse permutation (not index_select's atomic index_add)."""

    @staticmethod
    def forward(ctx, y, perm, inverse):
        ctx.save_for_backward(inverse)
        return y.index_select(0, perm)

    @staticmethod
    def backward(ctx, g):
        (inverse,) = ctx.saved_tensors
        return g.index_select(0, inverse), None, None


def _capturing(x: Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def dense(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, expert: Tensor, weight: Tensor,
          keep: Optional[Tensor] = None) -> Tensor:
    """`reference.moe_experts` with every expert run on every token (batched matmuls over the experts), then
    combined by the router weights (zero for the experts a token did not pick): static shapes, no sort, no host
    read. For few tokens; it does n_experts / top_k times the routed FLOPs."""
    n_experts = w_gate.shape[0]
    ws = [w.to(x.dtype) for w in (w_gate, w_up, w_down)]
    xe = x.unsqueeze(0).expand(n_experts, -1, -1)                       # (experts, tokens, d_model)
    h = ops.swiglu(torch.bmm(xe, ws[0].transpose(1, 2)), torch.bmm(xe, ws[1].transpose(1, 2)))
    y = torch.bmm(h, ws[2].transpose(1, 2))                             # (experts, tokens, d_model)
    w = weight.to(x.dtype) if keep is None else weight.to(x.dtype) * keep.to(x.dtype)
    comb = torch.zeros(x.shape[0], n_experts, dtype=x.dtype, device=x.device).scatter_add(1, expert, w)
    return torch.einsum("te,etd->td", comb, y)
