"""BraidForCausalLM: a braidlm hybrid (Mamba1 / Mamba2 / global, local, sparse attention / SwiGLU MLPs and
mixtures of experts) for Hugging Face transformers, in one self-contained file.

This file is copied into every exported model directory and loaded with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. It must not import braidlm: the math is
re-expressed here in plain PyTorch, after the references in braidlm's `kernels/*/reference.py`. When braidlm's
`kernels.ops` is importable it is used instead (same semantics, faster ops); set BRAIDLM_PURE_TORCH=1 to force
the plain path. Parameter names equal braidlm's `HybridLM` state dict, so export and import are a copy.

Block = pre-norm residual: h += mixer(norm(h)); h += mlp(norm(h)). A mixture-of-experts MLP routes every token
on its own and dropless (as braidlm does outside training: its capacity limit and router losses are training
settings this file does not apply). Left-padded rows are handled as in
braidlm: the pads form document 0 and the real tokens document 1 (states reset, attention masked, positions
restart at 0 on the first real token).

Cache: `BraidCache` is a transformers `Cache` whose layers are transformers' own layer caches:
LinearAttentionLayer (conv + SSM state) for Mamba layers, DynamicLayer for global and sparse attention,
DynamicSlidingWindowLayer (the last window - 1 keys) for local attention, DummyLayer for MLP-only layers.
It also keeps each cached token's position and document, from which every attention mask is computed.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import (Cache, DummyLayer, DynamicLayer, DynamicSlidingWindowLayer,
                                      LinearAttentionLayer)
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_braid import BraidConfig

_ops = None
if os.environ.get("BRAIDLM_PURE_TORCH", "0") != "1":
    try:  # braidlm's dispatched kernels, when braidlm is installed; never required
        from kernels import ops as _ops
        if not hasattr(_ops, "ssd_chunk_scan"):
            _ops = None
    except Exception:
        _ops = None

RESET_LOG_DECAY = -1e4  # log-decay at a document start: exp of any sum containing it is exactly 0


# ------------------------------------------------------------------------------------------------- ops
def rmsnorm(x, weight, eps, group_size=None):
    """x / rms(x) * weight over groups of `group_size` channels (None: the whole last dim), in fp32."""
    d = x.shape[-1]
    g = d if group_size is None else group_size
    xf = x.float().unflatten(-1, (d // g, g))
    xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return (xf.flatten(-2) * weight.float()).to(x.dtype)


def causal_conv_silu(x, weight, bias, history, seq_idx):
    """Depthwise causal conv + SiLU. x: (batch, seqlen, channels); history: (batch, channels, width - 1) inputs
    before x (zeros for none); seq_idx: (batch, seqlen) doc ids or None (inputs of another doc count as 0).
    Returns out (batch, seqlen, channels) and the new history (batch, channels, width - 1), zeroed where it
    belongs to an earlier document than the last token's."""
    b, t, c = x.shape
    width = weight.shape[1]
    xp = torch.cat([history.float().transpose(1, 2), x.float()], dim=1)  # (batch, width - 1 + seqlen, channels)
    ids = None if seq_idx is None else torch.cat([seq_idx[:, :1].expand(b, width - 1), seq_idx], dim=1)
    out = torch.zeros(b, t, c, dtype=torch.float32, device=x.device)
    for k in range(width):
        term = xp[:, k:k + t]
        if ids is not None:
            term = term * (ids[:, k:k + t] == seq_idx)[..., None]
        out = out + term * weight[:, k].float()
    if bias is not None:
        out = out + bias.float()
    tail = xp[:, t:]
    if ids is not None:
        tail = torch.where((ids[:, t:] == seq_idx[:, -1:])[..., None], tail, 0.0)
    return F.silu(out).to(x.dtype), tail.transpose(1, 2).to(x.dtype)


def _doc_starts(seq_idx):
    if seq_idx is None:
        return None
    starts = torch.zeros_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return starts


def ssd_scan(x, dt, A, B, C, chunk_size, h0, seq_idx):
    """Mamba-2 SSD, chunked. x: (batch, seqlen, nheads, headdim); dt: (batch, seqlen, nheads) after softplus;
    A: (nheads,); B, C: (batch, seqlen, ngroups, d_state); h0: (batch, nheads, headdim, d_state).
    Returns y (batch, seqlen, nheads, headdim) fp32 (without D) and the final state."""
    b, t, h, p = x.shape
    g, n = B.shape[-2:]
    rep = h // g
    Bh = B.float().repeat_interleave(rep, dim=2)  # (batch, seqlen, nheads, d_state)
    Ch = C.float().repeat_interleave(rep, dim=2)
    a = dt * A.float()  # (batch, seqlen, nheads) log-decay
    starts = _doc_starts(seq_idx)
    if starts is not None:
        a = a.masked_fill(starts[..., None], RESET_LOG_DECAY)
    T = chunk_size
    nc = max(1, math.ceil(t / T))
    pad = nc * T - t

    def chunks(v):  # (batch, seqlen, nheads, ...) -> (batch, nchunks, nheads, T, ...)
        v = F.pad(v, (0, 0) * (v.dim() - 2) + (0, pad))
        return v.reshape(b, nc, T, *v.shape[2:]).movedim(2, 3)

    xc, dtc, ac, Bc, Cc = chunks(x.float()), chunks(dt), chunks(a), chunks(Bh), chunks(Ch)
    below = torch.ones(T, T, dtype=torch.bool, device=x.device).tril(-1)
    seg = torch.where(below, ac[..., :, None], 0.0).cumsum(dim=-2)  # (b, nc, h, T, T) decay j -> i
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    decay = torch.where(causal, seg.exp(), 0.0)
    weights = (Cc @ Bc.transpose(-1, -2)) * decay * dtc[..., None, :]
    y = weights @ xc  # (b, nc, h, T, p)
    to_end = seg[..., -1, :].exp()  # (b, nc, h, T)
    states = torch.einsum("bchtp,bchtn->bchpn", xc * (to_end * dtc)[..., None], Bc)
    chunk_decay = ac.sum(-1).exp()[..., None, None]  # (b, nc, h, 1, 1)
    state = h0.float()
    entering = []
    for c in range(nc):
        entering.append(state)
        state = chunk_decay[:, c] * state + states[:, c]
    prev = torch.stack(entering, dim=1)  # (b, nc, h, p, n)
    y = y + ac.cumsum(-1).exp()[..., None] * torch.einsum("bchtn,bchpn->bchtp", Cc, prev)
    return y.movedim(3, 2).reshape(b, nc * T, h, p)[:, :t], state


def selective_scan(u, delta, A, B, C, h0, seq_idx):
    """Mamba-1 selective scan, token by token. u, delta: (batch, seqlen, d_inner), delta after softplus;
    A: (d_inner, d_state); B, C: (batch, seqlen, d_state); h0: (batch, d_inner, d_state).
    Returns y (batch, seqlen, d_inner) fp32 (without D) and the final state."""
    starts = _doc_starts(seq_idx)
    h = h0.float()
    ys = []
    for i in range(u.shape[1]):
        decay = torch.exp(delta[:, i, :, None] * A)
        if starts is not None:
            decay = torch.where(starts[:, i, None, None], 0.0, decay)
        h = decay * h + (delta[:, i] * u[:, i].float())[:, :, None] * B[:, i, None, :].float()
        ys.append((h * C[:, i, None, :].float()).sum(-1))
    return torch.stack(ys, dim=1), h


def rope_rotate(x, pos, theta):
    """Rotary embedding, rotate-half convention. x: (batch, seqlen, heads, head_dim); pos: (batch, seqlen)."""
    d = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = pos.clamp(min=0).to(torch.float32)[..., None] * inv_freq
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1)[:, :, None]
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1)[:, :, None]
    x1, x2 = x.float().chunk(2, dim=-1)
    return (x.float() * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


def visible(q_pos, k_pos, kind, window, sinks, stride):
    """Which keys a query sees (positions within one document; negative key positions are empty)."""
    ok = (k_pos <= q_pos) & (k_pos >= 0)
    if kind == "global":
        return ok
    near = (q_pos - k_pos) < window
    if kind == "local":
        return ok & near
    far = k_pos < sinks
    if stride > 0:
        far = far | ((k_pos + 1) % stride == 0)
    return ok & (near | far)


# --------------------------------------------------------------------------------------------- cache
class BraidCache(Cache):
    """Per layer a transformers cache layer (see the module docstring), plus, for the attention masks, the
    position within its document and the document (0 = left pad, 1 = text) of every token seen so far."""

    def __init__(self, config: BraidConfig):
        layers = []
        for spec in config.layout["layers"]:
            if spec["mixer"] in ("mamba1", "mamba2"):
                layers.append(LinearAttentionLayer())
            elif spec["mixer"] == "attention" and spec["kind"] == "local":
                layers.append(DynamicSlidingWindowLayer(sliding_window=spec["window"]))
            elif spec["mixer"] == "attention":
                layers.append(DynamicLayer())
            else:
                layers.append(DummyLayer())
        super().__init__(layers=layers)
        self.key_pos: Optional[torch.Tensor] = None  # (batch, tokens seen) position within its document
        self.key_doc: Optional[torch.Tensor] = None  # (batch, tokens seen) 0 = left pad, 1 = text
        self.next_pos: Optional[torch.Tensor] = None  # (batch,) position of the next token

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.key_pos is None else self.key_pos.shape[1]

    def append_tokens(self, pos, doc):
        self.key_pos = pos if self.key_pos is None else torch.cat([self.key_pos, pos], dim=1)
        self.key_doc = doc if self.key_doc is None else torch.cat([self.key_doc, doc], dim=1)
        self.next_pos = pos[:, -1] + 1

    def reset(self):
        super().reset()
        self.key_pos = self.key_doc = self.next_pos = None

    def reorder_cache(self, beam_idx):
        super().reorder_cache(beam_idx)
        if self.key_pos is not None:
            self.key_pos, self.key_doc = self.key_pos[beam_idx], self.key_doc[beam_idx]
            self.next_pos = self.next_pos[beam_idx]

    def batch_repeat_interleave(self, repeats: int):
        for layer in self.layers:
            if isinstance(layer, LinearAttentionLayer):
                for i in range(layer.number_of_states):
                    for states in (layer.conv_states, layer.recurrent_states):
                        if states[i] is not None:
                            states[i] = states[i].repeat_interleave(repeats, dim=0)
            else:
                layer.batch_repeat_interleave(repeats)
        if self.key_pos is not None:
            self.key_pos = self.key_pos.repeat_interleave(repeats, dim=0)
            self.key_doc = self.key_doc.repeat_interleave(repeats, dim=0)
            self.next_pos = self.next_pos.repeat_interleave(repeats, dim=0)


class _Step:
    """What every layer needs to know about the tokens of one forward call."""

    def __init__(self, cache, seq_idx, pos, doc):
        self.cache, self.seq_idx, self.pos, self.doc = cache, seq_idx, pos, doc


# -------------------------------------------------------------------------------------------- mixers
def _conv_params(channels, width, bias):
    return nn.Parameter(torch.zeros(channels, width)), nn.Parameter(torch.zeros(channels)) if bias else None


def _has_state(mixer, st: _Step) -> bool:
    return st.cache is not None and st.cache.has_previous_state(mixer.layer_idx)


def _conv(mixer, x, st: _Step, prev: bool):
    """Causal conv + SiLU over x (batch, seqlen, channels), reading and writing the layer's cached conv state."""
    cache, idx = st.cache, mixer.layer_idx
    width = mixer.conv_weight.shape[1]
    if not prev:
        history = x.new_zeros(x.shape[0], x.shape[2], width - 1)
        out, tail = causal_conv_silu(x, mixer.conv_weight, mixer.conv_bias, history, st.seq_idx)
        if cache is not None:
            cache.update_conv_state(tail, idx)  # first call: stores the last width - 1 inputs as given
        return out
    # the layer cache returns its last width - 1 inputs followed by x, and keeps the last width - 1 of them
    full = cache.update_conv_state(x.transpose(1, 2), idx)  # (batch, channels, width - 1 + seqlen)
    out, _ = causal_conv_silu(x, mixer.conv_weight, mixer.conv_bias, full[..., :width - 1], None)
    return out


def _state(mixer, st: _Step, prev: bool, shape, device):
    if prev:
        return st.cache.get_recurrent_state(mixer.layer_idx)
    return torch.zeros(shape, dtype=torch.float32, device=device)


class Mamba1(nn.Module):
    def __init__(self, s: dict, d_model: int, layer_idx: int, eps: float):
        super().__init__()
        self.layer_idx = layer_idx
        self.d_inner, self.d_state, self.dt_rank = s["expand"] * d_model, s["d_state"], s["dt_rank"]
        di = self.d_inner
        self.in_proj = nn.Linear(d_model, 2 * di, bias=s["bias"])
        self.conv_weight, self.conv_bias = _conv_params(di, s["d_conv"], s["conv_bias"])
        self.x_proj = nn.Linear(di, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, di, bias=False)
        self.dt_bias = nn.Parameter(torch.zeros(di))
        self.A_log = nn.Parameter(torch.zeros(di, self.d_state))
        self.D = nn.Parameter(torch.ones(di))
        self.out_proj = nn.Linear(di, d_model, bias=s["bias"])
        self.dt_bc_norm, self.eps = bool(s.get("dt_bc_norm", False)), eps
        if self.dt_bc_norm:  # Jamba's RMSNorms of dt_low, B and C
            self.dt_norm_weight = nn.Parameter(torch.ones(self.dt_rank))
            self.B_norm_weight = nn.Parameter(torch.ones(self.d_state))
            self.C_norm_weight = nn.Parameter(torch.ones(self.d_state))

    def forward(self, u, st: _Step):
        prev = _has_state(self, st)
        x, z = self.in_proj(u).chunk(2, dim=-1)
        x = _conv(self, x, st, prev)
        dt_low, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.dt_bc_norm:
            dt_low = rmsnorm(dt_low, self.dt_norm_weight, self.eps)
            B, C = rmsnorm(B, self.B_norm_weight, self.eps), rmsnorm(C, self.C_norm_weight, self.eps)
        dt = F.softplus(self.dt_proj(dt_low).float() + self.dt_bias.float())
        A = -torch.exp(self.A_log.float())
        h0 = _state(self, st, prev, (u.shape[0], self.d_inner, self.d_state), u.device)
        if _ops is not None:
            y, final = _ops.selective_scan(x, dt, A, B, C, D=self.D, z=z, seq_idx=st.seq_idx, initial_state=h0,
                                           return_final_state=True)
        else:
            y, final = selective_scan(x, dt, A, B, C, h0, st.seq_idx)
            y = ((y + self.D.float() * x.float()) * F.silu(z.float())).to(u.dtype)
        if st.cache is not None:
            st.cache.update_recurrent_state(final, self.layer_idx)
        return self.out_proj(y)


class Mamba2(nn.Module):
    def __init__(self, s: dict, d_model: int, layer_idx: int, eps: float):
        super().__init__()
        self.layer_idx, self.eps = layer_idx, eps
        self.d_inner = s["expand"] * d_model
        self.headdim, self.ngroups, self.d_state = s["headdim"], s["ngroups"], s["d_state"]
        self.nheads = self.d_inner // self.headdim
        self.chunk_size = s["chunk_size"]
        self.dt_limit = tuple(float(v) for v in s.get("dt_limit", (0.0, float("inf"))))
        self.conv_dim = self.d_inner + 2 * self.ngroups * self.d_state
        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.nheads, bias=s["bias"])
        self.conv_weight, self.conv_bias = _conv_params(self.conv_dim, s["d_conv"], s["conv_bias"])
        self.dt_bias = nn.Parameter(torch.zeros(self.nheads))
        self.A_log = nn.Parameter(torch.zeros(self.nheads))
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm_weight = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=s["bias"])

    def forward(self, u, st: _Step):
        b, t, _ = u.shape
        prev = _has_state(self, st)
        z, xbc, dt = torch.split(self.in_proj(u), [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xbc = _conv(self, xbc, st, prev)
        gn = self.ngroups * self.d_state
        x, B, C = torch.split(xbc, [self.d_inner, gn, gn], dim=-1)
        x = x.unflatten(-1, (self.nheads, self.headdim))  # (batch, seqlen, nheads, headdim)
        B = B.unflatten(-1, (self.ngroups, self.d_state))  # (batch, seqlen, ngroups, d_state)
        C = C.unflatten(-1, (self.ngroups, self.d_state))
        dt = F.softplus(dt.float() + self.dt_bias.float())
        if self.dt_limit != (0.0, float("inf")):
            dt = dt.clamp(min=self.dt_limit[0], max=self.dt_limit[1])
        A = -torch.exp(self.A_log.float())
        h0 = _state(self, st, prev, (b, self.nheads, self.headdim, self.d_state), u.device)
        if _ops is not None:
            y, final = _ops.ssd_chunk_scan(x, dt, A, B, C, chunk_size=self.chunk_size, D=self.D,
                                           seq_idx=st.seq_idx, initial_state=h0, return_final_state=True)
        else:
            y, final = ssd_scan(x, dt, A, B, C, self.chunk_size, h0, st.seq_idx)
            y = (y + self.D.float()[:, None] * x.float()).to(u.dtype)
        if st.cache is not None:
            st.cache.update_recurrent_state(final, self.layer_idx)
        y = y.flatten(-2)
        y = rmsnorm(y.float() * F.silu(z.float()), self.norm_weight, self.eps, self.d_inner // self.ngroups)
        return self.out_proj(y.to(u.dtype))


class Attention(nn.Module):
    def __init__(self, s: dict, d_model: int, layer_idx: int, eps: float):
        super().__init__()
        self.layer_idx = layer_idx
        self.kind, self.rope, self.theta = s["kind"], s["rope"], float(s["rope_theta"])
        self.window = s.get("window") or 0
        self.sinks = s.get("sinks", 0) if self.kind == "sparse" else 0
        self.stride = s.get("stride", 0) if self.kind == "sparse" else 0
        self.n_heads, self.n_kv_heads, self.head_dim = s["n_heads"], s["n_kv_heads"], s["head_dim"]
        self.q_proj = nn.Linear(d_model, self.n_heads * self.head_dim, bias=s["qkv_bias"])
        self.k_proj = nn.Linear(d_model, self.n_kv_heads * self.head_dim, bias=s["qkv_bias"])
        self.v_proj = nn.Linear(d_model, self.n_kv_heads * self.head_dim, bias=s["qkv_bias"])
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d_model, bias=False)

    def forward(self, u, st: _Step):
        q = self.q_proj(u).unflatten(-1, (self.n_heads, self.head_dim))  # (batch, seqlen, n_heads, head_dim)
        k = self.k_proj(u).unflatten(-1, (self.n_kv_heads, self.head_dim))
        v = self.v_proj(u).unflatten(-1, (self.n_kv_heads, self.head_dim))
        if self.rope:  # keys are cached after RoPE, at their position within the document
            q, k = rope_rotate(q, st.pos, self.theta), rope_rotate(k, st.pos, self.theta)
        k_pos, k_doc = st.pos, st.doc
        if st.cache is not None:
            k, v = st.cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # (batch, keys, n_kv_heads, head_dim)
            k_pos, k_doc = st.cache.key_pos[:, -k.shape[1]:], st.cache.key_doc[:, -k.shape[1]:]
        mask = visible(st.pos[:, :, None], k_pos[:, None, :], self.kind, self.window, self.sinks, self.stride)
        mask = mask & (st.doc[:, :, None] == k_doc[:, None, :])  # (batch, q, k)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2).to(q.dtype),
                                             v.transpose(1, 2).to(q.dtype), attn_mask=mask[:, None],
                                             enable_gqa=self.n_heads != self.n_kv_heads)
        return self.o_proj(out.transpose(1, 2).flatten(-2))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """A mixture of SwiGLU experts, as braidlm's hybrid/moe.py at inference. The router's logits (fp32) give scores
    (softmax, or sigmoid); each token takes its top_k scores (ties: the lower expert) as the weights of its experts,
    divided by their sum with norm_topk_prob; n_shared_experts more experts (one SwiGLU of n * d_ff) see every
    token. Expert weights are stacked as nn.Linear weights: gate_proj / up_proj (experts, d_ff, d_model), down_proj
    (experts, d_model, d_ff)."""

    def __init__(self, s: dict, d_model: int):
        super().__init__()
        e, f = s["n_experts"], s["d_ff"]
        self.top_k, self.kind, self.norm_topk_prob = s["top_k"], s.get("router", "softmax"), s["norm_topk_prob"]
        self.router = nn.Linear(d_model, e, bias=False)
        self.gate_proj = nn.Parameter(torch.zeros(e, f, d_model))
        self.up_proj = nn.Parameter(torch.zeros(e, f, d_model))
        self.down_proj = nn.Parameter(torch.zeros(e, d_model, f))
        shared = s.get("n_shared_experts", 0)
        self.shared = SwiGLU(d_model, f * shared) if shared else None

    def route(self, x):
        """x (tokens, d_model) -> expert ids (tokens, top_k), best first, and their weights (tokens, top_k) fp32."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        logits = F.linear(x.to(dtype), self.router.weight.to(dtype))  # (tokens, n_experts)
        scores = logits.softmax(dim=-1) if self.kind == "softmax" else logits.sigmoid()
        ranked = torch.sort(scores, dim=-1, descending=True, stable=True)
        weight, expert = ranked.values[:, :self.top_k], ranked.indices[:, :self.top_k]
        if self.norm_topk_prob:
            weight = weight / weight.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return expert, weight

    def experts(self, x, expert, weight):
        """sum_j weight[t, j] * expert[t, j]'s SwiGLU of x[t], one expert at a time over the tokens routed to it."""
        out = torch.zeros_like(x)
        for e in expert.unique().tolist():
            token, slot = torch.nonzero(expert == e, as_tuple=True)
            h = x[token]
            y = F.linear(F.silu(F.linear(h, self.gate_proj[e])) * F.linear(h, self.up_proj[e]), self.down_proj[e])
            out = out.index_add(0, token, y * weight[token, slot, None].to(x.dtype))
        return out

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        expert, weight = self.route(flat)
        if _ops is not None and hasattr(_ops, "moe_experts"):
            out = _ops.moe_experts(flat, self.gate_proj, self.up_proj, self.down_proj, expert, weight)
        else:
            out = self.experts(flat, expert, weight)
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.view(x.shape)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return rmsnorm(x, self.weight, self.eps)


MIXERS = {"mamba1": Mamba1, "mamba2": Mamba2, "attention": Attention}


class Block(nn.Module):
    def __init__(self, spec: dict, d_model: int, layer_idx: int, eps: float):
        super().__init__()
        self.has_mixer = spec["mixer"] != "none"
        self.has_mlp = spec.get("mlp", "swiglu") != "none"
        if self.has_mixer:
            self.mixer_norm = RMSNorm(d_model, eps)
            self.mixer = MIXERS[spec["mixer"]](spec, d_model, layer_idx, eps)
        if self.has_mlp:
            self.mlp_norm = RMSNorm(d_model, eps)
            self.mlp = MoE(spec, d_model) if spec.get("mlp") == "moe" else SwiGLU(d_model, spec["d_ff"])

    def forward(self, h, st: _Step):
        if self.has_mixer:
            h = h + self.mixer(self.mixer_norm(h), st)
        if self.has_mlp:
            h = h + self.mlp(self.mlp_norm(h))
        return h


# --------------------------------------------------------------------------------------------- model
def _positions(seq_idx, batch, seqlen, device):
    """Position of every token within its document (pads and text restart at 0)."""
    idx = torch.arange(seqlen, device=device).expand(batch, seqlen)
    if seq_idx is None:
        return idx
    starts = torch.ones_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return idx - torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values


class BraidPreTrainedModel(PreTrainedModel):
    config_class = BraidConfig
    base_model_prefix = "braid"
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def _init_weights(self, module):
        pass  # every weight comes from the checkpoint


class BraidForCausalLM(BraidPreTrainedModel, GenerationMixin):
    def __init__(self, config: BraidConfig):
        super().__init__(config)
        m = config.layout["model"]
        d, eps = m["d_model"], m["norm_eps"]
        self.embed = nn.Embedding(m["vocab_size"], d)
        self.blocks = nn.ModuleList(Block(spec, d, i, eps) for i, spec in enumerate(config.layout["layers"]))
        self.norm = RMSNorm(d, eps)
        self.lm_head = nn.Linear(d, m["vocab_size"], bias=False)
        if m.get("tie_embeddings", True):
            self._tied_weights_keys = {"lm_head.weight": "embed.weight"}
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the first forward of generate() creates a BraidCache (Mamba + ring attention states)

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, cache: Optional[BraidCache] = None, use_cache=None,
                labels=None, logits_to_keep: int = 0, return_dict=None, **kwargs):
        """input_ids: (batch, seqlen); attention_mask: (batch, cached + seqlen) 1/0, left padding only (read on
        the first call of a sequence; later calls continue every row's last document)."""
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if not use_cache or self.training:
            cache = None
        elif cache is None:
            cache = BraidCache(self.config)
        b, t = input_ids.shape
        dev = input_ids.device
        fresh = cache is None or cache.get_seq_length() == 0
        if fresh:
            seq_idx = None
            if attention_mask is not None:
                mask = attention_mask[:, -t:].to(torch.bool)
                if not bool(mask.all()):
                    if bool((mask[:, 1:] < mask[:, :-1]).any()) or not bool(mask[:, -1].all()):
                        raise ValueError("attention_mask: only left padding is supported (zeros, then ones)")
                    seq_idx = mask.to(torch.int32)
            pos = _positions(seq_idx, b, t, dev)
            doc = torch.ones(b, t, dtype=torch.int32, device=dev) if seq_idx is None else seq_idx
        else:  # continue the last document of every row
            seq_idx = None
            pos = cache.next_pos[:, None] + torch.arange(t, device=dev)
            doc = torch.ones(b, t, dtype=torch.int32, device=dev)
        if cache is not None:
            cache.append_tokens(pos, doc)
        st = _Step(cache, seq_idx, pos, doc)
        h = self.embed(input_ids)
        for block in self.blocks:
            h = block(h, st)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(self.norm(h))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)
