"""Semantic checks of a type-checked layout and its resolution into `hybrid.spec` objects.

`hybrid.layout` reads, expands and type-checks a layout; this module checks what types cannot (sizes,
divisibility, kinds, windows) and builds the frozen spec objects the model is made from. Every failure is a
LayoutError naming the key the bad value came from (a layer's own field or its defaults group).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Union

from .spec import (ATTENTION_KINDS, MLP_KINDS, ROUTERS, AttentionSpec, LayerSpec, Layout, LayoutError, Mamba1Spec,
                   Mamba2Spec, MlpSpec, ModelSpec, MoeSpec)

MOE_FIELDS = ("n_experts", "top_k", "n_shared_experts", "router", "norm_topk_prob", "capacity_factor",
              "aux_loss_weight", "z_loss_weight")


def _fail(key: str, value: Any, why: str, allowed: str) -> LayoutError:
    return LayoutError(f"{key}: {why} (got {value!r}; allowed: {allowed})")


class _View:
    """A mixer group's values as one layer sees them: the layer's own fields over the defaults group.
    Errors name the key the value came from, so that the message points at the line to edit."""

    def __init__(self, group: str, defaults: dict, own: Optional[dict] = None, layer: Optional[int] = None):
        self.group, self.layer = group, layer
        self.own = {k: v for k, v in (own or {}).items() if k in defaults and v is not None}
        self.values = {**defaults, **self.own}

    def __getitem__(self, name: str):
        return self.values[name]

    def fail(self, name: str, why: str, allowed: str) -> LayoutError:
        if name in self.own:
            return _fail(f"layers.{self.layer}.{name}", self.values[name], why, allowed)
        used_by = "" if self.layer is None else f" (used by layer {self.layer})"
        return _fail(f"defaults.{self.group}.{name}", self.values[name], why + used_by, allowed)


def _positive(v, *names: str) -> None:
    for name in names:
        x = v[name]
        if x is not None and not 0 < x < math.inf:  # written so that NaN fails too
            raise v.fail(name, "must be positive", "a finite number > 0" if isinstance(x, float) else "an integer >= 1")


def _check_ssm(v: _View) -> None:
    _positive(v, "d_state", "expand", "dt_min", "dt_max", "dt_init_floor")
    if not 2 <= v["d_conv"] <= 4:
        raise v.fail("d_conv", "outside the widths the causal-conv kernels support", "2, 3 or 4")
    if v["dt_min"] > v["dt_max"]:
        raise v.fail("dt_min", f"greater than dt_max={v['dt_max']}", "0 < dt_min <= dt_max")


def _check_mamba1(v: _View) -> None:
    _check_ssm(v)
    rank = v["dt_rank"]
    if rank != "auto" and not (isinstance(rank, int) and rank >= 1):
        raise v.fail("dt_rank", "invalid dt_rank", "'auto' (= ceil(d_model / 16)) or an integer >= 1")


def _check_mamba2(v: _View) -> None:
    _check_ssm(v)
    _positive(v, "headdim", "ngroups", "chunk_size")
    if v["chunk_size"] & (v["chunk_size"] - 1):
        raise v.fail("chunk_size", "not a power of two", "a power of two, e.g. 64, 128 or 256")
    limit = v["dt_limit"]
    if len(limit) != 2 or not 0 <= limit[0] < limit[1]:
        raise v.fail("dt_limit", "not a clamp range", "[lo, hi] with 0 <= lo < hi, e.g. [0.0, .inf]")


def _check_attention(v: _View) -> None:
    if v["kind"] not in ATTENTION_KINDS:
        raise v.fail("kind", "unknown attention kind", " | ".join(ATTENTION_KINDS))
    _positive(v, "n_heads", "n_kv_heads", "head_dim", "rope_theta")
    for name in ("window", "sinks", "stride"):
        if v[name] is not None and v[name] < 0:
            raise v.fail(name, "must not be negative", "an integer >= 0" if name != "window" else "an integer >= 1")


def _check_moe(v: _View) -> None:
    _positive(v, "n_experts", "top_k")
    if v["top_k"] > v["n_experts"]:
        raise v.fail("top_k", f"greater than n_experts={v['n_experts']}", "an integer in 1..n_experts")
    if v["n_shared_experts"] < 0:
        raise v.fail("n_shared_experts", "must not be negative", "an integer >= 0 (0 = no shared experts)")
    if v["router"] not in ROUTERS:
        raise v.fail("router", "unknown router", " | ".join(ROUTERS))
    for name in ("capacity_factor", "aux_loss_weight", "z_loss_weight"):
        x = v[name]
        if x is not None and not 0 <= x < math.inf:  # written so that NaN fails too
            allowed = "null or 0 (dropless), or a finite number > 0" if name == "capacity_factor" else "a number >= 0"
            raise v.fail(name, "must be a finite number >= 0", allowed)


def _check_mlp(v: _View) -> None:
    if v["kind"] not in MLP_KINDS:
        raise v.fail("kind", "unknown MLP kind", " | ".join(MLP_KINDS))
    _positive(v, "d_ff", "multiple_of")
    every, offset = v["moe_every"], v["moe_offset"]
    if every < 0:
        raise v.fail("moe_every", "must not be negative", "0 (off) or an integer N >= 1: MoE where i % N == moe_offset")
    if not 0 <= offset < max(every, 1):
        raise v.fail("moe_offset", f"outside 0..moe_every - 1 (moe_every={every})",
                     f"an integer in 0..{max(every, 1) - 1}")
    _check_moe(v)


def _model(m: dict) -> ModelSpec:
    for name in ("d_model", "vocab_size", "max_seq_len"):
        if m[name] < 1:
            raise _fail(f"model.{name}", m[name], "must be positive", "an integer >= 1")
    for name in ("norm_eps", "init_std"):
        if not 0 < m[name] < math.inf:
            raise _fail(f"model.{name}", m[name], "must be positive", "a finite number > 0")
    return ModelSpec(**m)


def _mamba1(v: _View, d: int) -> Mamba1Spec:
    _check_mamba1(v)
    rank = math.ceil(d / 16) if v["dt_rank"] == "auto" else v["dt_rank"]
    return Mamba1Spec(d_model=d, d_inner=v["expand"] * d, d_state=v["d_state"], d_conv=v["d_conv"], dt_rank=rank,
                      dt_min=v["dt_min"], dt_max=v["dt_max"], dt_init_floor=v["dt_init_floor"],
                      conv_bias=v["conv_bias"], bias=v["bias"], dt_bc_norm=v["dt_bc_norm"])


def _mamba2(v: _View, d: int) -> Mamba2Spec:
    _check_mamba2(v)
    d_inner = v["expand"] * d
    if d_inner % v["headdim"]:
        raise v.fail("headdim", f"does not divide d_inner = expand * d_model = {d_inner}", "a divisor of d_inner")
    nheads = d_inner // v["headdim"]
    if nheads % v["ngroups"]:
        raise v.fail("ngroups", f"does not divide nheads = d_inner / headdim = {nheads}", "a divisor of nheads")
    return Mamba2Spec(d_model=d, d_inner=d_inner, d_state=v["d_state"], d_conv=v["d_conv"], headdim=v["headdim"],
                      nheads=nheads, ngroups=v["ngroups"], chunk_size=v["chunk_size"], dt_min=v["dt_min"],
                      dt_max=v["dt_max"], dt_init_floor=v["dt_init_floor"], dt_limit=tuple(v["dt_limit"]),
                      conv_bias=v["conv_bias"], bias=v["bias"])


def _attention(v: _View, d: int) -> AttentionSpec:
    _check_attention(v)
    kind, n_heads = v["kind"], v["n_heads"]
    if v["head_dim"] is None and d % n_heads:
        raise v.fail("n_heads", f"does not divide model.d_model={d}", "a divisor of d_model, or set head_dim")
    head_dim = v["head_dim"] or d // n_heads
    n_kv_heads = v["n_kv_heads"] or n_heads
    if n_heads % n_kv_heads:
        raise v.fail("n_kv_heads", f"does not divide n_heads={n_heads}", "a divisor of n_heads")
    if v["rope"] and head_dim % 2:
        raise v.fail("head_dim" if v["head_dim"] else "n_heads", f"gives an odd head_dim={head_dim}, which RoPE "
                     "cannot rotate in pairs", "an even head_dim, or rope: false")
    window = v["window"]
    if kind == "global":
        if "window" in v.own and window:
            raise v.fail("window", "a global attention layer has no window", "null, or kind: local / sparse")
        window = 0
    elif window is None or window < 1:
        raise v.fail("window", f"{kind} attention needs a window", "an integer >= 1")
    extra = {}
    for name in ("sinks", "stride"):  # sparse only; defaults may hold them for the sparse layers
        if kind != "sparse" and v.own.get(name):
            raise v.fail(name, f"{name} only applies to sparse attention, not {kind}", "0 or unset, or kind: sparse")
        extra[name] = v[name] if kind == "sparse" else 0
    return AttentionSpec(d_model=d, kind=kind, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
                         window=window, rope=v["rope"], rope_theta=v["rope_theta"], qkv_bias=v["qkv_bias"], **extra)


MIXER_BUILDERS = {"mamba1": _mamba1, "mamba2": _mamba2, "attention": _attention}
GROUP_CHECKS = {"mamba1": _check_mamba1, "mamba2": _check_mamba2, "attention": _check_attention, "mlp": _check_mlp}


def _mlp_kind(entry: dict, i: int, defaults: dict) -> str:
    """The layer's own `mlp`, else its default: defaults.mlp.kind (swiglu for an MLP-only layer where mixer layers
    default to none), moe in place of swiglu on the layers that defaults.mlp.moe_every picks."""
    mixer, kind = entry["mixer"], entry["mlp"]
    if kind is not None:
        if kind not in MLP_KINDS:
            raise _fail(f"layers.{i}.mlp", kind, "unknown MLP kind", " | ".join(MLP_KINDS))
        return kind
    # an MLP-only layer keeps its MLP even where mixer layers default to none
    kind = defaults["kind"] if mixer != "none" or defaults["kind"] != "none" else MLP_KINDS[0]
    every = defaults["moe_every"]
    if kind == "swiglu" and every and i % every == defaults["moe_offset"]:
        kind = "moe"
    return kind


def _moe(v: _View, d: int, d_ff: int) -> MoeSpec:
    _check_moe(v)
    return MoeSpec(d_model=d, kind="moe", d_ff=d_ff, n_experts=v["n_experts"], top_k=v["top_k"],
                   n_shared_experts=v["n_shared_experts"], router=v["router"], norm_topk_prob=v["norm_topk_prob"],
                   capacity_factor=float(v["capacity_factor"] or 0.0), aux_loss_weight=float(v["aux_loss_weight"]),
                   z_loss_weight=float(v["z_loss_weight"]))


def _mlp(entry: dict, i: int, defaults: dict, d: int) -> Optional[Union[MlpSpec, MoeSpec]]:
    mixer, d_ff = entry["mixer"], entry["d_ff"]
    kind = _mlp_kind(entry, i, defaults)
    if kind != "moe":
        own = next((name for name in MOE_FIELDS if entry.get(name) is not None), None)
        if own is not None:
            raise _fail(f"layers.{i}.{own}", entry[own], f"set on a layer whose MLP is {kind}, not moe",
                        "null, or mlp: moe")
    if kind == "none":
        if mixer == "none":
            raise _fail(f"layers.{i}.mlp", kind, "an MLP-only layer (mixer none) without an MLP is empty",
                        " | ".join(k for k in MLP_KINDS if k != "none"))
        if d_ff is not None:
            raise _fail(f"layers.{i}.d_ff", d_ff, "set on a layer without an MLP", "null, or mlp: swiglu / moe")
        return None
    if d_ff is not None and d_ff < 1:
        raise _fail(f"layers.{i}.d_ff", d_ff, "must be positive", "an integer >= 1")
    if d_ff is None:
        m = defaults["multiple_of"]
        d_ff = defaults["d_ff"] or -(-8 * d // (3 * m)) * m  # 8/3 * d_model rounded up to a multiple of m
    if kind == "moe":
        return _moe(_View("mlp", defaults, {k: entry.get(k) for k in MOE_FIELDS}, i), d, d_ff)
    return MlpSpec(d_model=d, kind=kind, d_ff=d_ff)


def _resolve(name: str, model: dict, groups: dict, entries: list) -> Layout:
    """Type-checked dicts -> the resolved Layout (every semantic check happens here)."""
    spec = _model(model)
    for group, values in groups.items():  # a bad default is an error even where no layer uses it yet
        GROUP_CHECKS[group](_View(group, values))
    layers = []
    for i, entry in enumerate(entries):
        mixer = entry["mixer"]
        mixers = {} if mixer == "none" else {
            mixer: MIXER_BUILDERS[mixer](_View(mixer, groups[mixer], entry, i), spec.d_model)}
        layers.append(LayerSpec(index=i, mixer=mixer, mlp=_mlp(entry, i, groups["mlp"], spec.d_model), **mixers))
    return Layout(name=name, model=spec, layers=tuple(layers))
