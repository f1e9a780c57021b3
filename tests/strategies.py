"""Hypothesis strategies for layouts: `random_layouts()` draws random VALID tiny layouts as YAML-form dicts.

Sizes stay tiny (d_model 16..64, 1..5 layers, d_state <= 8, headdim 4/8, chunks <= 16, windows 1..16) so
that a model built from a draw runs in milliseconds on CPU. Every layer kind appears: mamba1, mamba2, global /
local / sparse attention (with sinks and strides), MLP-only layers; GQA, biases, RoPE, Mamba1's dt/B/C norms and
MLPs vary.
Layers set some fields themselves and leave the rest to the `defaults` groups, so both paths are exercised.
"""
from __future__ import annotations

from typing import Optional

from hypothesis import strategies as st

D_MODELS = (16, 24, 32, 40, 48, 56, 64)   # multiples of 8: the default mamba2 headdim (8) divides any d_inner


@st.composite
def _mamba1(draw) -> dict:
    layer = {"mixer": "mamba1"}
    if draw(st.booleans()):
        layer.update(d_state=draw(st.integers(1, 8)), d_conv=draw(st.integers(2, 4)), expand=draw(st.integers(1, 2)),
                     dt_rank=draw(st.one_of(st.just("auto"), st.integers(1, 4))),
                     conv_bias=draw(st.booleans()), bias=draw(st.booleans()), dt_bc_norm=draw(st.booleans()))
    return layer


@st.composite
def _mamba2(draw, d_model: int) -> dict:
    layer = {"mixer": "mamba2"}
    if draw(st.booleans()):
        expand, headdim = draw(st.integers(1, 2)), draw(st.sampled_from([4, 8]))
        nheads = expand * d_model // headdim
        layer.update(expand=expand, headdim=headdim,
                     ngroups=draw(st.sampled_from([g for g in (1, 2, 3, 4) if nheads % g == 0])),
                     d_state=draw(st.integers(1, 8)), d_conv=draw(st.integers(2, 4)),
                     chunk_size=draw(st.sampled_from([2, 4, 8, 16])),
                     conv_bias=draw(st.booleans()), bias=draw(st.booleans()))
    return layer


@st.composite
def _attention(draw) -> dict:
    kind = draw(st.sampled_from(["global", "local", "sparse"]))
    layer = {"mixer": "attention", "kind": kind}
    if draw(st.booleans()):  # own head shapes, GQA included; otherwise the defaults' heads
        n_kv = draw(st.integers(1, 2))
        layer.update(n_kv_heads=n_kv, n_heads=n_kv * draw(st.integers(1, 3)), head_dim=draw(st.sampled_from([2, 4, 8])))
    if kind != "global":
        layer["window"] = draw(st.integers(1, 16))
    if kind == "sparse":
        layer.update(sinks=draw(st.integers(0, 3)), stride=draw(st.integers(0, 5)))
    layer.update(rope=draw(st.booleans()), qkv_bias=draw(st.booleans()))
    return layer


@st.composite
def _layer(draw, d_model: int, default_mlp: str) -> dict:
    mixer = draw(st.sampled_from(["mamba1", "mamba2", "attention", "none"]))
    layer = {"mamba1": _mamba1(), "mamba2": _mamba2(d_model), "attention": _attention(),
             "none": st.just({"mixer": "none"})}[mixer]
    layer = draw(layer)
    choices = [None, "swiglu"] if mixer == "none" else [None, "swiglu", "none"]
    mlp = draw(st.sampled_from(choices))
    if mlp is not None:
        layer["mlp"] = mlp
    has_mlp = mixer == "none" or (mlp or default_mlp) != "none"
    if has_mlp and draw(st.booleans()):
        layer["d_ff"] = draw(st.integers(4, 48))
    return layer


@st.composite
def random_layouts(draw, max_layers: int = 5, vocab_size: Optional[int] = None) -> dict:
    """A random valid layout dict for `hybrid.layout.load_layout`, with 1..max_layers layers; vocab_size
    fixes the vocabulary (default: drawn from 8..64)."""
    d_model = draw(st.sampled_from(D_MODELS))
    heads = draw(st.sampled_from([n for n in (1, 2, 4) if (d_model // n) % 2 == 0]))
    default_mlp = draw(st.sampled_from(["swiglu", "none"]))
    defaults = {
        "mamba1": {"d_state": draw(st.integers(1, 8)), "d_conv": draw(st.integers(2, 4)), "expand": 1},
        "mamba2": {"d_state": draw(st.integers(1, 8)), "headdim": 8, "ngroups": 1, "chunk_size": 8},
        "attention": {"n_heads": heads, "window": draw(st.integers(1, 16))},  # a global layer ignores it
        "mlp": {"kind": default_mlp, "multiple_of": 8},
    }
    n_layers = draw(st.integers(1, max_layers))
    return {
        "name": "random",
        "model": {"d_model": d_model, "vocab_size": vocab_size or draw(st.integers(8, 64)),
                  "max_seq_len": draw(st.integers(8, 64)), "tie_embeddings": draw(st.booleans()),
                  "norm_eps": 1e-5, "init_std": 0.02},
        "defaults": defaults,
        "layers": [draw(_layer(d_model, default_mlp)) for _ in range(n_layers)],
    }
