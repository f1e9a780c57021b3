"""Native Hugging Face architectures a layout can map onto exactly, in both directions.

Each target has: `check(layout)` (raises NativeError naming the layer and field a target cannot express),
`config(layout)` (the transformers config as a dict), `to_hf(state)` / `from_hf(state)` (parameter renames)
and `layout(config)` (the braidlm layout dict of a transformers config). Supported:

  llama   LlamaForCausalLM: every layer global attention with RoPE + SwiGLU, no biases.
  mamba2  Mamba2ForCausalLM: every layer Mamba2 without MLP, identical mixers.
  bamba   BambaForCausalLM: Mamba2 and global RoPE attention layers, each followed by a SwiGLU MLP.

Unlike the files copied into exported directories, this module is braidlm code and is not shipped with them.
"""
from __future__ import annotations

import re

from hybrid.errors import UserError

NO_DT_LIMIT = [0.0, float("inf")]


class NativeError(UserError):
    """A layout that the requested transformers architecture cannot express exactly."""


def _fail(target: str, where: str, why: str):
    raise NativeError(f"cannot export to {target}: {where}: {why}; use the self-contained export (--target remote)")


def _same(target: str, layout, fields, what: str) -> dict:
    """The value of every field, required equal on all layers (transformers configs hold one value)."""
    first = {}
    for i, layer in enumerate(layout["layers"]):
        for f in fields:
            if f not in first:
                first[f] = (i, layer.get(f))
            elif layer.get(f) != first[f][1]:
                _fail(target, f"layers.{i}.{f}", f"{layer.get(f)!r} differs from layer {first[f][0]}'s "
                      f"{first[f][1]!r}; {what} has one {f} for all layers")
    return {f: v for f, (_, v) in first.items()}


def _model_extra(layout) -> dict:
    m = layout["model"]
    return {"braidlm": {"name": layout["name"], "max_seq_len": m["max_seq_len"], "init_std": m["init_std"]}}


def _model_back(cfg: dict, default_name: str, max_seq_len: int) -> dict:
    extra = cfg.get("braidlm") or {}
    return {"name": extra.get("name", default_name),
            "model": {"d_model": cfg["hidden_size"], "vocab_size": cfg["vocab_size"],
                      "norm_eps": cfg.get("rms_norm_eps", cfg.get("layer_norm_epsilon")),
                      "tie_embeddings": bool(cfg.get("tie_word_embeddings", True)),
                      "init_std": extra.get("init_std", cfg.get("initializer_range", 0.02)),
                      "max_seq_len": extra.get("max_seq_len", max_seq_len)}}


def _rope_theta(cfg: dict) -> float:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise NativeError("config.json: partial_rotary_factor != 1 is not supported (braidlm rotates all dims)")
    if rope.get("rope_type", "default") != "default":
        raise NativeError(f"config.json: rope type {rope.get('rope_type')!r} is not supported (only 'default')")
    return float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _regex(template: str):
    """'blocks.{i}.mlp.{p}_proj.weight' -> a regex with named groups i (digits) and p (a word)."""
    rx = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>[A-Za-z_]+?)")
    return re.compile(rx.replace(r"\{q\}", r"(?P<q>weight|bias)"))


def _rename(state: dict, rules, reverse: bool, target: str) -> dict:
    """Rename every parameter by the first matching rule (braidlm template, target template)."""
    pairs = [(_regex(b if not reverse else h), h if not reverse else b) for b, h in rules]
    out = {}
    for name, t in state.items():
        for rx, other in pairs:
            mt = rx.fullmatch(name)
            if mt:
                out[other.format(**mt.groupdict())] = t
                break
        else:
            side = "braidlm" if not reverse else target
            raise NativeError(f"parameter {name!r} of the {side} model has no counterpart in "
                              f"{target if not reverse else 'braidlm'}")
    return out


# ---------------------------------------------------------------------------------------------- llama
def _check_attention(target, i, layer, rope_required=True):
    if layer["mixer"] != "attention":
        return
    if layer["kind"] != "global":
        _fail(target, f"layers.{i}.kind", f"{layer['kind']} attention (window {layer['window']}) has no "
              "equivalent; only global attention")
    if rope_required and not layer["rope"]:
        _fail(target, f"layers.{i}.rope", "attention without RoPE is not expressible")
    if layer["qkv_bias"]:
        _fail(target, f"layers.{i}.qkv_bias", "q/k/v biases without an o_proj bias are not expressible")


def llama_check(layout):
    for i, layer in enumerate(layout["layers"]):
        if layer["mixer"] != "attention":
            _fail("llama", f"layers.{i}.mixer", f"{layer['mixer']} layers are not expressible; every layer must "
                  "be attention")
        _check_attention("llama", i, layer)
        if layer["mlp"] != "swiglu":
            _fail("llama", f"layers.{i}.mlp", "every layer needs a SwiGLU MLP")
    _same("llama", layout, ["n_heads", "n_kv_heads", "head_dim", "rope_theta", "d_ff"], "LlamaConfig")


def llama_config(layout) -> dict:
    s = _same("llama", layout, ["n_heads", "n_kv_heads", "head_dim", "rope_theta", "d_ff"], "LlamaConfig")
    m = layout["model"]
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=m["vocab_size"],
                hidden_size=m["d_model"], intermediate_size=s["d_ff"], num_hidden_layers=len(layout["layers"]),
                num_attention_heads=s["n_heads"], num_key_value_heads=s["n_kv_heads"], head_dim=s["head_dim"],
                hidden_act="silu", max_position_embeddings=m["max_seq_len"], initializer_range=m["init_std"],
                rms_norm_eps=m["norm_eps"], tie_word_embeddings=m["tie_embeddings"], attention_bias=False,
                mlp_bias=False, rope_parameters={"rope_type": "default", "rope_theta": s["rope_theta"]},
                pad_token_id=0, bos_token_id=2, eos_token_id=3, **_model_extra(layout))


_COMMON = [("embed.weight", "model.embed_tokens.weight"), ("lm_head.weight", "lm_head.weight"),
           ("blocks.{i}.mixer_norm.weight", "model.layers.{i}.input_layernorm.weight"),
           ("blocks.{i}.mixer.{p}_proj.weight", "model.layers.{i}.self_attn.{p}_proj.weight")]
_LLAMA = _COMMON + [("norm.weight", "model.norm.weight"),
                    ("blocks.{i}.mlp_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
                    ("blocks.{i}.mlp.{p}_proj.weight", "model.layers.{i}.mlp.{p}_proj.weight")]


def llama_layout(cfg: dict) -> dict:
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise NativeError("config.json: attention_bias / mlp_bias are not supported by braidlm's layers")
    if cfg.get("hidden_act", "silu") != "silu":
        raise NativeError(f"config.json: hidden_act {cfg['hidden_act']!r}: braidlm's MLP is SwiGLU (silu)")
    heads = cfg["num_attention_heads"]
    layer = {"mixer": "attention", "kind": "global", "n_heads": heads,
             "n_kv_heads": cfg.get("num_key_value_heads") or heads,
             "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // heads, "window": None, "sinks": 0, "stride": 0,
             "rope": True, "rope_theta": _rope_theta(cfg), "qkv_bias": False, "mlp": "swiglu",
             "d_ff": cfg["intermediate_size"]}
    out = _model_back(cfg, "llama", cfg.get("max_position_embeddings", 2048))
    out["layers"] = [dict(layer) for _ in range(cfg["num_hidden_layers"])]
    return out


# --------------------------------------------------------------------------------------------- mamba2
_M2_FIELDS = ["d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size", "dt_min", "dt_max",
              "dt_init_floor", "dt_limit", "conv_bias", "bias"]


def _mamba2_config(s: dict, d_model: int) -> dict:
    return dict(state_size=s["d_state"], conv_kernel=s["d_conv"], expand=s["expand"], head_dim=s["headdim"],
                num_heads=s["expand"] * d_model // s["headdim"], n_groups=s["ngroups"], chunk_size=s["chunk_size"],
                time_step_min=s["dt_min"], time_step_max=s["dt_max"], time_step_floor=s["dt_init_floor"],
                time_step_limit=list(s["dt_limit"]), use_conv_bias=s["conv_bias"], use_bias=s["bias"])


def mamba2_check(layout):
    for i, layer in enumerate(layout["layers"]):
        if layer["mixer"] != "mamba2":
            _fail("mamba2", f"layers.{i}.mixer", f"{layer['mixer']} layers are not expressible; every layer must "
                  "be mamba2")
        if layer["mlp"] != "none":
            _fail("mamba2", f"layers.{i}.mlp", "Mamba2ForCausalLM has no MLPs")
    _same("mamba2", layout, _M2_FIELDS, "Mamba2Config")


def mamba2_config(layout) -> dict:
    s = _same("mamba2", layout, _M2_FIELDS, "Mamba2Config")
    m = layout["model"]
    return dict(architectures=["Mamba2ForCausalLM"], model_type="mamba2", vocab_size=m["vocab_size"],
                hidden_size=m["d_model"], num_hidden_layers=len(layout["layers"]), layer_norm_epsilon=m["norm_eps"],
                initializer_range=m["init_std"], tie_word_embeddings=m["tie_embeddings"], residual_in_fp32=True,
                rms_norm=True, norm_before_gate=False, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                **_mamba2_config(s, m["d_model"]), **_model_extra(layout))


_SSM = [("blocks.{i}.mixer.conv_weight", "{L}.conv1d.weight"),
        ("blocks.{i}.mixer.conv_bias", "{L}.conv1d.bias"),
        ("blocks.{i}.mixer.norm_weight", "{L}.norm.weight"),
        ("blocks.{i}.mixer.in_proj.{q}", "{L}.in_proj.{q}"),
        ("blocks.{i}.mixer.out_proj.{q}", "{L}.out_proj.{q}"),
        ("blocks.{i}.mixer.A_log", "{L}.A_log"), ("blocks.{i}.mixer.D", "{L}.D"),
        ("blocks.{i}.mixer.dt_bias", "{L}.dt_bias")]


def _ssm(prefix: str) -> list:
    """The Mamba2 mixer's renames, its modules living under `prefix` (with {i} for the layer)."""
    return [(b, h.replace("{L}", prefix)) for b, h in _SSM]


_MAMBA2 = [("embed.weight", "backbone.embeddings.weight"), ("norm.weight", "backbone.norm_f.weight"),
           ("lm_head.weight", "lm_head.weight"),
           ("blocks.{i}.mixer_norm.weight", "backbone.layers.{i}.norm.weight")] + _ssm("backbone.layers.{i}.mixer")


def _mamba2_layer(cfg: dict) -> dict:
    d = cfg["hidden_size"]
    expand = cfg.get("expand", 2)
    if cfg.get("num_heads") and cfg["num_heads"] * cfg["head_dim"] != expand * d:
        raise NativeError(f"config.json: num_heads * head_dim = {cfg['num_heads'] * cfg['head_dim']} != "
                          f"expand * hidden_size = {expand * d}")
    if cfg.get("norm_before_gate", False):
        raise NativeError("config.json: norm_before_gate=true is not supported (braidlm gates before the norm)")
    return {"mixer": "mamba2", "d_state": cfg["state_size"], "d_conv": cfg["conv_kernel"], "expand": expand,
            "headdim": cfg["head_dim"], "ngroups": cfg.get("n_groups", 1), "chunk_size": cfg.get("chunk_size", 256),
            "dt_min": cfg.get("time_step_min", 0.001), "dt_max": cfg.get("time_step_max", 0.1),
            "dt_init_floor": cfg.get("time_step_floor", 1e-4),
            "dt_limit": list(cfg.get("time_step_limit") or NO_DT_LIMIT),
            "conv_bias": cfg.get("use_conv_bias", True), "bias": cfg.get("use_bias", False), "mlp": "none",
            "d_ff": None}


def mamba2_layout(cfg: dict) -> dict:
    out = _model_back(cfg, "mamba2", 2048)
    out["layers"] = [_mamba2_layer(cfg) for _ in range(cfg["num_hidden_layers"])]
    return out


# ---------------------------------------------------------------------------------------------- bamba
_BAMBA_ATTN = ["n_heads", "n_kv_heads", "head_dim", "rope_theta"]


def bamba_check(layout):
    attn = {"layers": [x for x in layout["layers"] if x["mixer"] == "attention"]}
    mamba = {"layers": [x for x in layout["layers"] if x["mixer"] == "mamba2"]}
    for i, layer in enumerate(layout["layers"]):
        if layer["mixer"] not in ("mamba2", "attention"):
            _fail("bamba", f"layers.{i}.mixer", f"{layer['mixer']} layers are not expressible; Bamba has mamba2 "
                  "and attention layers")
        _check_attention("bamba", i, layer)
        if layer["mlp"] != "swiglu":
            _fail("bamba", f"layers.{i}.mlp", "every Bamba layer has a SwiGLU MLP")
    if not attn["layers"] or not mamba["layers"]:
        _fail("bamba", "layers", "a Bamba model mixes mamba2 and attention layers; use llama or mamba2")
    _same("bamba", layout, ["d_ff"], "BambaConfig")
    _same("bamba", attn, _BAMBA_ATTN, "BambaConfig")
    _same("bamba", mamba, _M2_FIELDS, "BambaConfig")


def bamba_config(layout) -> dict:
    layers = layout["layers"]
    a = _same("bamba", {"layers": [x for x in layers if x["mixer"] == "attention"]}, _BAMBA_ATTN, "BambaConfig")
    s = _same("bamba", {"layers": [x for x in layers if x["mixer"] == "mamba2"]}, _M2_FIELDS, "BambaConfig")
    m = layout["model"]
    d = m["d_model"]
    return dict(architectures=["BambaForCausalLM"], model_type="bamba", vocab_size=m["vocab_size"], hidden_size=d,
                intermediate_size=layers[0]["d_ff"], num_hidden_layers=len(layers),
                num_attention_heads=a["n_heads"], num_key_value_heads=a["n_kv_heads"], head_dim=a["head_dim"],
                hidden_act="silu", attention_bias=False, mlp_bias=False, time_step_limit=list(s["dt_limit"]),
                initializer_range=m["init_std"], rms_norm_eps=m["norm_eps"], tie_word_embeddings=m["tie_embeddings"],
                max_position_embeddings=m["max_seq_len"], attn_layer_indices=[i for i, x in enumerate(layers)
                                                                              if x["mixer"] == "attention"],
                mamba_n_heads=s["expand"] * d // s["headdim"], mamba_d_head=s["headdim"], mamba_n_groups=s["ngroups"],
                mamba_d_state=s["d_state"], mamba_d_conv=s["d_conv"], mamba_expand=s["expand"],
                mamba_chunk_size=s["chunk_size"], mamba_conv_bias=s["conv_bias"], mamba_proj_bias=s["bias"],
                rope_parameters={"rope_type": "default", "rope_theta": a["rope_theta"], "partial_rotary_factor": 1.0}, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                **_model_extra(layout), braidlm_mamba2=_mamba2_config(s, d))


_BAMBA = _ssm("model.layers.{i}.mamba") + _COMMON + [
    ("norm.weight", "model.final_layernorm.weight"),
    ("blocks.{i}.mlp_norm.weight", "model.layers.{i}.pre_ff_layernorm.weight"),
    ("blocks.{i}.mlp.{p}_proj.weight", "model.layers.{i}.feed_forward.{p}_proj.weight")]


def bamba_layout(cfg: dict) -> dict:
    attn = set(cfg.get("attn_layer_indices") or [])
    d = cfg["hidden_size"]
    m2 = cfg.get("braidlm_mamba2") or {}
    mamba = _mamba2_layer({"hidden_size": d, "state_size": cfg["mamba_d_state"], "conv_kernel": cfg["mamba_d_conv"],
                           "expand": cfg["mamba_expand"], "head_dim": cfg["mamba_d_head"],
                           "num_heads": cfg["mamba_n_heads"], "n_groups": cfg["mamba_n_groups"],
                           "chunk_size": cfg["mamba_chunk_size"], "use_conv_bias": cfg["mamba_conv_bias"],
                           "use_bias": cfg["mamba_proj_bias"], "time_step_limit": cfg.get("time_step_limit"), **m2})
    heads = cfg["num_attention_heads"]
    attention = {"mixer": "attention", "kind": "global", "n_heads": heads,
                 "n_kv_heads": cfg.get("num_key_value_heads") or heads, "head_dim": cfg.get("head_dim") or d // heads,
                 "window": None,
                 "sinks": 0, "stride": 0, "rope": True, "rope_theta": _rope_theta(cfg), "qkv_bias": False}
    out = _model_back(cfg, "bamba", cfg.get("max_position_embeddings", 2048))
    out["layers"] = [dict(attention if i in attn else mamba, mlp="swiglu", d_ff=cfg["intermediate_size"])
                     for i in range(cfg["num_hidden_layers"])]
    return out


# ------------------------------------------------------------------------------------------ the table
def _conv_to_hf(state: dict) -> dict:
    return {k: (v[:, None, :] if k.endswith("conv_weight") else v) for k, v in state.items()}


def _conv_from_hf(state: dict) -> dict:
    return {k: (v[:, 0, :] if k.endswith("conv1d.weight") else v) for k, v in state.items()}


TARGETS = {
    "llama": dict(check=llama_check, config=llama_config, rules=_LLAMA, layout=llama_layout),
    "mamba2": dict(check=mamba2_check, config=mamba2_config, rules=_MAMBA2, layout=mamba2_layout),
    "bamba": dict(check=bamba_check, config=bamba_config, rules=_BAMBA, layout=bamba_layout),
}


def to_hf(target: str, state: dict) -> dict:
    """braidlm state dict -> the target's names and shapes."""
    return _rename(_conv_to_hf(state), TARGETS[target]["rules"], False, target)


def from_hf(target: str, state: dict) -> dict:
    """The target's state dict -> braidlm names and shapes (rotary inv_freq buffers dropped)."""
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    return _rename(_conv_from_hf(state), TARGETS[target]["rules"], True, target)
