"""What a resolved layout costs: parameters, forward FLOPs per token, and inference-cache memory, per layer.

Parameters match the modules exactly (tests compare them with the instantiated model):
  every layer with a mixer has a pre-norm RMSNorm weight (d), every layer with an MLP another one (d);
  mamba1: in_proj d*2di (+2di bias), conv di*d_conv (+di), x_proj di*(dt_rank + 2*d_state), dt_proj dt_rank*di,
          dt_bias di, A_log di*d_state, D di, out_proj di*d (+d bias) (+ dt_rank + 2*d_state with dt_bc_norm);
  mamba2: in_proj d*(2di + 2*ngroups*d_state + nheads) (+ the same as bias), conv conv_dim*d_conv (+conv_dim),
          dt_bias, A_log, D nheads each, gated-norm weight di, out_proj di*d (+d bias);
  attention: q d*H*hd, k and v d*KV*hd each, o H*hd*d (+ (H + 2*KV)*hd with qkv_bias);
  swiglu: 3*d*d_ff;  moe: router d*n_experts + n_experts*3*d*d_ff + n_shared_experts*3*d*d_ff.
  Model: embedding vocab*d, final norm d, LM head vocab*d unless tie_embeddings.
Active parameters are those a token runs through: the same, except that an MoE layer counts top_k of its routed
experts (router, shared experts and norms all count); embedding and head count in full.

FLOPs are forward FLOPs per token, a multiply-add counting 2 (the convention an MFU estimate expects, with
training = 3x forward):
  2 x every matmul weight a token runs through (projections, MLP, LM head; biases, norms and element-wise ops
  are not counted): an MoE layer's router, top_k routed experts and shared experts, so `flops_per_token` is the
  active count that MFU takes (`dense_flops_per_token` counts every expert, as if each token ran them all);
  causal conv 2*channels*d_conv; mamba1 selective scan 6*di*d_state;
  mamba2 SSD 2*chunk*ngroups*d_state + 2*chunk*nheads*headdim + 4*nheads*headdim*d_state (intra-chunk
  scores, intra-chunk outputs, state pass in and out), chunk = chunk_size;
  attention scores + values 4*H*hd*ctx, ctx = the keys a query sees on average over a row of seq_len tokens
  under its causal mask (the work a causal kernel does, as FlashAttention's benchmarks count it; PaLM's MFU
  formula counts seq_len, twice that for global layers, which puts a long prefill above 100% of the peak):
  global (seq_len + 1) / 2, local about min(window, seq_len), sparse its window plus the sinks and strided
  keys that have left it (`attention_context`, exact).

Memory is per sequence, split into what stays constant in length (`state_bytes`) and what grows with each
token (`kv_bytes_per_token`):
  mamba1 conv di*(d_conv-1)*dtype_bytes + ssm di*d_state*4 (the recurrent state is kept in fp32);
  mamba2 conv conv_dim*(d_conv-1)*dtype_bytes + nheads*headdim*d_state*4;
  local attention 2*KV*hd*window*dtype_bytes (a ring of window keys and values), nothing per token;
  sparse 2*KV*hd*(window + sinks)*dtype_bytes, plus 2*KV*hd*dtype_bytes / stride per token;
  global 2*KV*hd*dtype_bytes per token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .spec import AttentionSpec, LayerSpec, Layout, Mamba1Spec, Mamba2Spec, MoeSpec


@dataclass(frozen=True)
class LayerBudget:
    index: int
    code: str
    params: int
    flops_per_token: int       # forward, active (an MoE layer: top_k routed experts)
    state_bytes: int           # per sequence, constant in length
    kv_bytes_per_token: float  # per sequence, per token of context (fractional for strided sparse layers)
    active_params: int         # the parameters a token runs through (= params but in an MoE layer)
    dense_flops_per_token: int  # forward with every expert of an MoE layer run (= flops_per_token elsewhere)


@dataclass(frozen=True)
class Budget:
    layers: tuple              # tuple[LayerBudget, ...]
    embedding_params: int
    final_norm_params: int
    lm_head_params: int        # 0 when tied to the embedding
    lm_head_flops_per_token: int
    seq_len: int
    dtype_bytes: int

    @property
    def params(self) -> int:
        return sum(r.params for r in self.layers) + self.embedding_params + self.final_norm_params + self.lm_head_params

    @property
    def active_params(self) -> int:
        return self.params - sum(r.params - r.active_params for r in self.layers)

    @property
    def flops_per_token(self) -> int:
        """Active forward FLOPs per token (what MFU counts)."""
        return sum(r.flops_per_token for r in self.layers) + self.lm_head_flops_per_token

    @property
    def dense_flops_per_token(self) -> int:
        """Forward FLOPs per token if every expert of every MoE layer ran on it."""
        return sum(r.dense_flops_per_token for r in self.layers) + self.lm_head_flops_per_token

    @property
    def moe(self) -> bool:
        """Whether some layer has routed experts (active and total counts differ)."""
        return any(r.dense_flops_per_token != r.flops_per_token for r in self.layers)

    @property
    def state_bytes(self) -> int:
        return sum(r.state_bytes for r in self.layers)

    @property
    def kv_bytes_per_token(self) -> float:
        return sum(r.kv_bytes_per_token for r in self.layers)

    def cache_bytes(self, seq_len: Optional[int] = None) -> float:
        """Inference-cache bytes of one sequence of `seq_len` tokens (default: the budget's seq_len)."""
        return self.state_bytes + self.kv_bytes_per_token * (self.seq_len if seq_len is None else seq_len)


# --------------------------------------------------------------------------------------------- per mixer
def _mamba1(s: Mamba1Spec, seq_len: int, dtype_bytes: int) -> tuple:
    di, d, n, r = s.d_inner, s.d_model, s.d_state, s.dt_rank
    matmul = d * 2 * di + di * (r + 2 * n) + r * di + di * d
    params = matmul + di * s.d_conv + di * (2 + n)  # conv weight; dt_bias and D; A_log
    params += (2 * di + d) * s.bias + di * s.conv_bias + (r + 2 * n) * s.dt_bc_norm  # dt / B / C norm weights
    flops = 2 * matmul + 2 * di * s.d_conv + 6 * di * n
    state = di * (s.d_conv - 1) * dtype_bytes + di * n * 4
    return params, flops, state, 0


def _mamba2(s: Mamba2Spec, seq_len: int, dtype_bytes: int) -> tuple:
    di, d, n, g, h, p = s.d_inner, s.d_model, s.d_state, s.ngroups, s.nheads, s.headdim
    in_width = 2 * di + 2 * g * n + h
    matmul = d * in_width + di * d
    params = matmul + s.conv_dim * s.d_conv + 3 * h + di  # conv weight; dt_bias, A_log, D; gated-norm weight
    params += (in_width + d) * s.bias + s.conv_dim * s.conv_bias
    c = s.chunk_size
    flops = 2 * matmul + 2 * s.conv_dim * s.d_conv + 2 * c * g * n + 2 * c * h * p + 4 * h * p * n
    state = s.conv_dim * (s.d_conv - 1) * dtype_bytes + h * p * n * 4
    return params, flops, state, 0


def _window_pairs(seq_len: int, window: int) -> int:
    """(query, key) pairs of a causal window over one row: sum over i < seq_len of min(i + 1, window)."""
    if seq_len <= window:
        return seq_len * (seq_len + 1) // 2
    return window * (window + 1) // 2 + (seq_len - window) * window


def attention_context(s: AttentionSpec, seq_len: int) -> float:
    """Keys a query attends to, averaged over the queries of one row of `seq_len` tokens (the visibility rule of
    kernels/attention/reference.py), as the FLOP count takes it."""
    if s.kind == "global":
        return (seq_len + 1) / 2
    pairs = _window_pairs(seq_len, s.window)
    if s.kind == "sparse":  # far keys j <= i - window: the sinks, then every stride-th key after them
        stride_before = s.sinks // s.stride if s.stride else 0
        for m in range(1, seq_len - s.window + 1):  # m = i - window + 1 keys have left the window
            pairs += min(m, s.sinks) + (max(0, m // s.stride - stride_before) if s.stride else 0)
    return pairs / seq_len


def _attention(s: AttentionSpec, seq_len: int, dtype_bytes: int) -> tuple:
    d, q, kv = s.d_model, s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    matmul = d * q + 2 * d * kv + q * d
    params = matmul + (q + 2 * kv) * s.qkv_bias
    flops = 2 * matmul + 4 * q * attention_context(s, seq_len)
    per_key = 2 * kv * dtype_bytes  # one key and one value
    if s.kind == "global":
        return params, flops, 0, per_key
    if s.kind == "local":
        return params, flops, per_key * s.window, 0
    return params, flops, per_key * (s.window + s.sinks), per_key / s.stride if s.stride else 0


def _mlp(s) -> tuple:
    """(params, active params, active FLOPs, FLOPs with every expert) of a SwiGLU MLP or an MoE."""
    expert = 3 * s.d_model * s.d_ff
    if not isinstance(s, MoeSpec):
        return expert, expert, 2 * expert, 2 * expert
    always = s.d_model * s.n_experts + expert * s.n_shared_experts  # router, shared experts
    params, active = always + expert * s.n_experts, always + expert * s.top_k
    return params, active, 2 * active, 2 * params


MIXERS = {"mamba1": _mamba1, "mamba2": _mamba2, "attention": _attention}


def layer_budget(layer: LayerSpec, seq_len: int, dtype_bytes: int = 2) -> LayerBudget:
    """One layer's parameters, forward FLOPs per token and cache bytes (see the module docstring)."""
    params = flops = state = 0
    kv = 0.0
    if layer.mixer != "none":
        p, f, state, kv = MIXERS[layer.mixer](layer.mixer_spec, seq_len, dtype_bytes)
        params, flops = p + layer.mixer_spec.d_model, f  # + the pre-mixer norm
    active, dense = params, flops
    if layer.mlp is not None:
        p, a, f, fd = _mlp(layer.mlp)
        norm = layer.mlp.d_model
        params, active, flops, dense = params + p + norm, active + a + norm, flops + f, dense + fd
    return LayerBudget(layer.index, layer.code, params, flops, state, kv, active, dense)


def budget(layout: Layout, seq_len: Optional[int] = None, dtype_bytes: int = 2) -> Budget:
    """Per-layer and total parameters, forward FLOPs per token and per-sequence cache bytes of a layout.
    seq_len (default: model.max_seq_len) sets the attention context; dtype_bytes the cache dtype."""
    m = layout.model
    seq_len = m.max_seq_len if seq_len is None else seq_len
    rows = tuple(layer_budget(layer, seq_len, dtype_bytes) for layer in layout.layers)
    head = m.vocab_size * m.d_model
    return Budget(layers=rows, embedding_params=head, final_norm_params=m.d_model,
                  lm_head_params=0 if m.tie_embeddings else head, lm_head_flops_per_token=2 * head,
                  seq_len=seq_len, dtype_bytes=dtype_bytes)


# --------------------------------------------------------------------------------------------- tables
def _table(header: list, rows: list, right: set) -> str:
    """Columns padded to their widest cell; the columns in `right` are right-aligned (numbers)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                              for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *map(fmt, rows)])


def _bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:g} B"


def format_budget(b: Budget) -> str:
    """An aligned text table: one row per layer, then the embedding / head and the totals. A layout with MoE
    layers gets an active-parameter column; its FLOPs are the active ones, the total with every expert after."""
    moe = b.moe
    active = (lambda n: [f"{n / 1e6:.3f}"]) if moe else (lambda n: [])
    rows = [[r.index, r.code, f"{r.params / 1e6:.3f}", *active(r.active_params), f"{r.flops_per_token / 1e6:.2f}",
             f"{r.state_bytes / 1e3:.1f}", f"{r.kv_bytes_per_token:g}"] for r in b.layers]
    head = b.final_norm_params + b.lm_head_params
    rows.append(["", "embed", f"{b.embedding_params / 1e6:.3f}", *active(b.embedding_params), "", "", ""])
    rows.append(["", "norm+head", f"{head / 1e6:.3f}", *active(head), f"{b.lm_head_flops_per_token / 1e6:.2f}", "", ""])
    rows.append(["", "total", f"{b.params / 1e6:.3f}", *active(b.active_params), f"{b.flops_per_token / 1e6:.2f}",
                 f"{b.state_bytes / 1e3:.1f}", f"{b.kv_bytes_per_token:g}"])
    header = ["layer", "code", "params (M)", *(["active (M)"] if moe else []),
              "active MFLOPs/token" if moe else "MFLOPs/token", "state (KB)", "KV (B/token)"]
    table = _table(header, rows, right=set(range(len(header))) - {1})
    params = f"params {b.params / 1e6:.2f} M" + (f" ({b.active_params / 1e6:.2f} M active)" if moe else "")
    flops = f"forward {b.flops_per_token / 1e9:.3f} GFLOPs/token" + (
        f" active ({b.dense_flops_per_token / 1e9:.3f} with every expert)" if moe else "")
    return (f"{table}\n\n"
            f"{params}   {flops} at seq_len "
            f"{b.seq_len}   cache per sequence: state {b.state_bytes / 1e3:.1f} KB + KV "
            f"{b.kv_bytes_per_token:g} B/token = {_bytes(b.cache_bytes())} at {b.seq_len} tokens "
            f"({b.dtype_bytes}-byte dtype)")


def _settings(layer: LayerSpec) -> str:
    s = layer.mixer_spec
    if layer.mixer == "mamba1":
        return (f"d_inner={s.d_inner} d_state={s.d_state} d_conv={s.d_conv} dt_rank={s.dt_rank}"
                + (" dt_bc_norm" if s.dt_bc_norm else ""))
    if layer.mixer == "mamba2":
        return (f"d_inner={s.d_inner} d_state={s.d_state} d_conv={s.d_conv} headdim={s.headdim} nheads={s.nheads} "
                f"ngroups={s.ngroups} chunk={s.chunk_size}")
    if layer.mixer == "attention":
        text = f"heads={s.n_heads} kv_heads={s.n_kv_heads} head_dim={s.head_dim}"
        text += f" window={s.window}" if s.kind != "global" else ""
        text += f" sinks={s.sinks} stride={s.stride}" if s.kind == "sparse" else ""
        return text + (f" rope={s.rope_theta:g}" if s.rope else " no-rope")
    return ""


def _mlp_settings(layer: LayerSpec) -> str:
    s = layer.mlp
    if s is None:
        return "-"
    text = f"{s.kind} d_ff={s.d_ff}"
    if isinstance(s, MoeSpec):
        text += (f" experts={s.n_experts} top_k={s.top_k} {s.router}{' norm' if s.norm_topk_prob else ''}"
                 + (f" shared={s.n_shared_experts}" if s.n_shared_experts else "")
                 + (f" capacity={s.capacity_factor:g}" if s.capacity_factor else " dropless"))
    return text


def format_layers(layout: Layout) -> str:
    """The resolved layers as an aligned table: index, code, mixer settings, MLP."""
    rows = [[layer.index, layer.code, _settings(layer), _mlp_settings(layer)] for layer in layout.layers]
    return _table(["layer", "code", "mixer", "mlp"], rows, right={0})
