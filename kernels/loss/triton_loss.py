"""The LM head and its cross entropy a chunk of tokens at a time (semantics of `reference.py` beside this file).

No (tokens, vocab) fp32 logits matrix ever exists. Per chunk of tokens: logits = h_c @ W^T in the compute dtype
(one matmul), then one Triton program per token reads its row of logits twice (an online max / sum of exps,
then the softmax) and overwrites the row in place with d loss / d logits = (softmax - onehot) / n_counted. Two
more matmuls turn that into the chunk's dh and its share of dW (accumulated in fp32). The gradients are made
in the forward, while the chunk's logits are at hand; the backward only scales them by the incoming gradient.
Under no_grad (evaluation) only the loss is computed.

Memory: one chunk of logits in the compute dtype, plus dh (like h) and dW (fp32) kept for the backward; the
reference keeps the bf16 logits, their fp32 copy and the fp32 log-softmax of every token.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .reference import _check

CHUNK_BYTES = 1 << 30  # automatic chunk: tokens whose logits take about this many bytes
TUNING = {"BLOCK": 4096, "num_warps": 8}


@triton.jit
def _ce_rows_kernel(logits_ptr, stride, targets_ptr, loss_ptr, scale_ptr, V, ignore_index,
                    GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """Row r: loss_r = logsumexp(x_r) - x_r[t_r] (0 where t_r == ignore_index); with GRAD the row becomes
    (softmax(x_r) - onehot(t_r)) * scale (0 for an ignored row), in the logits' dtype."""
    row = tl.program_id(0).to(tl.int64)
    ptr = logits_ptr + row * stride
    t = tl.load(targets_ptr + row)
    offs = tl.arange(0, BLOCK)
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, V, BLOCK):
        x = tl.load(ptr + start + offs, mask=start + offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        # a lane that has seen no value yet stays at -inf with sum 0 (shifting by 0 avoids -inf - -inf)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.exp(x - shift)
        m = m_new
    mx = tl.max(m, axis=0)
    lse = mx + tl.log(tl.sum(s * tl.exp(m - mx), axis=0))
    counted = t != ignore_index
    x_t = tl.load(ptr + tl.where(counted, t, 0)).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(counted, lse - x_t, 0.0))
    if GRAD:
        scale = tl.where(counted, tl.load(scale_ptr), 0.0)
        for start in range(0, V, BLOCK):
            cols = start + offs
            x = tl.load(ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - tl.where(cols == t, 1.0, 0.0)
            tl.store(ptr + cols, (g * scale).to(logits_ptr.dtype.element_ty), mask=cols < V)


def _rows(logits, targets, losses, scale, ignore_index: int, grad: bool) -> None:
    n, V = logits.shape
    block = min(TUNING["BLOCK"], triton.next_power_of_2(V))
    _ce_rows_kernel[(n,)](logits, logits.stride(0), targets, losses, scale, V, ignore_index,
                          GRAD=grad, BLOCK=block, num_warps=TUNING["num_warps"])


@functools.lru_cache(maxsize=None)
def _has_fp32_out_addmm(device_type: str) -> bool:
    """Whether torch.addmm takes out_dtype (bf16 / fp16 operands, fp32 sum) on this device."""
    a = torch.zeros(2, 2, device=device_type, dtype=torch.bfloat16)
    try:
        torch.addmm(torch.zeros(2, 2, device=device_type), a, a, out_dtype=torch.float32)
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b, the product summed in fp32 where the device can, else rounded once to a's dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif _has_fp32_out_addmm(acc.device.type):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc += (a @ b).float()


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index: int, chunk: int, grad_h: bool, grad_w: bool):
        n = h.shape[0]
        counted = (targets != ignore_index).sum()
        scale = (1.0 / counted.clamp(min=1).float()).reshape(1)  # on the device: no host sync
        grad = grad_h or grad_w
        losses = torch.empty(n, device=h.device, dtype=torch.float32)
        dh = torch.empty_like(h) if grad_h else None
        dw = torch.zeros(weight.shape, device=h.device, dtype=torch.float32) if grad_w else None
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            logits = h[a:b] @ weight.t()  # (tokens, vocab), overwritten in place by its gradient when grad
            _rows(logits, targets[a:b], losses[a:b], scale, ignore_index, grad)
            if grad_h:
                torch.mm(logits, weight, out=dh[a:b])
            if grad_w:
                _accumulate(dw, logits.t(), h[a:b])
        ctx.save_for_backward(dh, dw)
        ctx.w_dtype = weight.dtype
        return losses.sum() / counted  # nan when no token is counted, as F.cross_entropy

    @staticmethod
    def backward(ctx, go):
        dh, dw = ctx.saved_tensors
        return (None if dh is None else dh * go.to(dh.dtype), None if dw is None else (dw * go).to(ctx.w_dtype),
                None, None, None, None, None)


def linear_cross_entropy(h, weight, targets, *, ignore_index: int = -100, chunk_tokens: int = 0):
    """See reference.linear_cross_entropy. chunk_tokens: tokens per chunk (0: as many as keep one chunk's
    logits near 1 GiB)."""
    _check(h, weight, targets)
    if chunk_tokens < 0:
        raise ValueError(f"linear_cross_entropy: chunk_tokens {chunk_tokens}: expected >= 0 (0: automatic)")
    dtype = h.dtype
    if torch.is_autocast_enabled(h.device.type):  # the matmuls in the autocast dtype, as F.linear would be
        dtype = torch.get_autocast_dtype(h.device.type)
    vocab = weight.shape[0]
    h2 = h.reshape(-1, h.shape[-1]).to(dtype)
    chunk = chunk_tokens or max(256, CHUNK_BYTES // (vocab * h2.element_size()))
    w2 = weight.to(dtype)
    grad = torch.is_grad_enabled()
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h2.contiguous(), w2.contiguous(), targets.reshape(-1).contiguous(),
                                         ignore_index, chunk, grad and h2.requires_grad, grad and w2.requires_grad)
