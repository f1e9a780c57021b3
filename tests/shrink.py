"""Shrink a shipped layout to CPU-test size while keeping its structure (layer kinds, order, MLPs, MoE routing,
GQA ratio, RoPE, attention kinds); windows become small so that ring buffers wrap within short test sequences."""
from __future__ import annotations

import copy

from hybrid.layout import layout_to_dict, load_layout

D_MODEL = 64


def shrink(path: str, window: int = 5, vocab: int = 101) -> dict:
    cfg = copy.deepcopy(layout_to_dict(load_layout(path)))
    cfg["model"].update(d_model=D_MODEL, vocab_size=vocab)
    for layer in cfg["layers"]:
        if layer.get("d_ff") is not None:
            layer["d_ff"] = 96
        if layer.get("mlp") == "moe":  # a few experts: routing stays top-k of several, the per-expert loop short
            layer.update(n_experts=min(layer["n_experts"], 4), top_k=min(layer["top_k"], 2))
        mixer = layer["mixer"]
        if mixer == "mamba1":
            layer.update(d_state=4, expand=2, dt_rank=4)
        elif mixer == "mamba2":
            layer.update(d_state=8, headdim=16, expand=2, chunk_size=8, ngroups=min(layer.get("ngroups", 1), 2))
        elif mixer == "attention":
            ratio = max(1, layer["n_heads"] // layer["n_kv_heads"])
            heads = 4
            layer.update(n_heads=heads, n_kv_heads=max(1, heads // min(ratio, heads)), head_dim=16)
            if layer["kind"] != "global":
                layer["window"] = window
            if layer["kind"] == "sparse":
                layer.update(sinks=min(layer.get("sinks", 0), 2), stride=min(layer.get("stride", 0), 4) if layer.get("stride") else 0)
    return cfg
