"""Native Hugging Face architectures a layout can map onto exactly, in both directions.

Each target has: `check(layout)` (raises NativeError naming the layer and field a target cannot express),
`config(layout)` (the transformers config as a dict), `to_hf(state)` / `from_hf(state)` (parameter renames)
and `layout(config)` (the braidlm layout dict of a transformers config). Supported:

  llama   LlamaForCausalLM: every layer global attention with RoPE + SwiGLU, no biases.
  mamba2  Mamba2ForCausalLM: every layer Mamba2 without MLP, identical mixers.
  bamba   BambaForCausalLM: Mamba2 and global RoPE attention layers, each followed by a SwiGLU MLP.
  jamba   JambaForCausalLM: Mamba1 layers with dt/B/C norms (dt_bc_norm) and global attention without RoPE at
          every attn_layer_period-th layer, each followed by a SwiGLU MLP or, at every expert_layer_period-th
          layer, a mixture of experts with Jamba's router (softmax over all experts, top-k, not renormalized, no
          shared experts); one d_ff for experts and dense MLPs. capacity_factor and z_loss_weight, training
          settings JambaForCausalLM lacks (it routes dropless), are kept in config.json for the way back.

Unlike the files copied into exported directories, this module is braidlm code and is not shipped with them.
"""
from __future__ import annotations

import math
import re

import torch

from hybrid.errors import UserError

NO_DT_LIMIT = [0.0, float("inf")]


class NativeError(UserError):
    """A layout that the requested transformers architecture cannot express exactly."""


def _fail(target: str, where: str, why: str):
    raise NativeError(f"cannot export to {target}: {where}: {why}; use the self-contained export (--target remote)")


def _same(target: str, layout, fields, what: str, where: tuple = None) -> dict:
    """The value of every field, required equal on all layers (transformers configs hold one value); where: (key,
    value) to compare only the layers that have it, e.g. ("mixer", "attention"). {} when no layer is compared."""
    first = {}
    for i, layer in enumerate(layout["layers"]):
        if where is not None and layer.get(where[0]) != where[1]:
            continue
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


# the parameters Mamba1 and Mamba2 mixers share, then each one's own
_SSM_COMMON = [("blocks.{i}.mixer.conv_weight", "{L}.conv1d.weight"),
               ("blocks.{i}.mixer.conv_bias", "{L}.conv1d.bias"),
               ("blocks.{i}.mixer.in_proj.{q}", "{L}.in_proj.{q}"),
               ("blocks.{i}.mixer.out_proj.{q}", "{L}.out_proj.{q}"),
               ("blocks.{i}.mixer.A_log", "{L}.A_log"), ("blocks.{i}.mixer.D", "{L}.D")]
_SSM = _SSM_COMMON + [("blocks.{i}.mixer.norm_weight", "{L}.norm.weight"),
                      ("blocks.{i}.mixer.dt_bias", "{L}.dt_bias")]
_SSM1 = _SSM_COMMON + [("blocks.{i}.mixer.x_proj.weight", "{L}.x_proj.weight"),
                       ("blocks.{i}.mixer.dt_proj.weight", "{L}.dt_proj.weight"),
                       ("blocks.{i}.mixer.dt_bias", "{L}.dt_proj.bias"),
                       ("blocks.{i}.mixer.dt_norm_weight", "{L}.dt_layernorm.weight"),
                       ("blocks.{i}.mixer.B_norm_weight", "{L}.b_layernorm.weight"),
                       ("blocks.{i}.mixer.C_norm_weight", "{L}.c_layernorm.weight")]


def _ssm(prefix: str, rules=_SSM) -> list:
    """A Mamba mixer's renames (Mamba2's by default), its modules living under `prefix` (with {i} for the layer)."""
    return [(b, h.replace("{L}", prefix)) for b, h in rules]


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
    for i, layer in enumerate(layout["layers"]):
        if layer["mixer"] not in ("mamba2", "attention"):
            _fail("bamba", f"layers.{i}.mixer", f"{layer['mixer']} layers are not expressible; Bamba has mamba2 "
                  "and attention layers")
        _check_attention("bamba", i, layer)
        if layer["mlp"] != "swiglu":
            _fail("bamba", f"layers.{i}.mlp", "every Bamba layer has a SwiGLU MLP")
    if {x["mixer"] for x in layout["layers"]} != {"mamba2", "attention"}:
        _fail("bamba", "layers", "a Bamba model mixes mamba2 and attention layers; use llama or mamba2")
    _same("bamba", layout, ["d_ff"], "BambaConfig")
    _same("bamba", layout, _BAMBA_ATTN, "BambaConfig", ("mixer", "attention"))
    _same("bamba", layout, _M2_FIELDS, "BambaConfig", ("mixer", "mamba2"))


def bamba_config(layout) -> dict:
    layers = layout["layers"]
    a = _same("bamba", layout, _BAMBA_ATTN, "BambaConfig", ("mixer", "attention"))
    s = _same("bamba", layout, _M2_FIELDS, "BambaConfig", ("mixer", "mamba2"))
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
                rope_parameters={"rope_type": "default", "rope_theta": a["rope_theta"], "partial_rotary_factor": 1.0},
                pad_token_id=0, bos_token_id=2, eos_token_id=3,
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


# ---------------------------------------------------------------------------------------------- jamba
_M1_FIELDS = ["d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init_floor", "conv_bias", "bias"]
_JAMBA_ATTN = ["n_heads", "n_kv_heads", "head_dim", "rope_theta"]
_JAMBA_MOE = ["n_experts", "top_k", "capacity_factor", "aux_loss_weight", "z_loss_weight"]
# what Jamba's router and experts are: a softmax over all experts, top-k, the k weights not renormalized, no
# shared experts (hybrid/moe.py's names)
_JAMBA_ROUTER = {"router": ("softmax", "Jamba's router is a softmax over all experts"),
                 "norm_topk_prob": (False, "Jamba does not renormalize the top-k weights"),
                 "n_shared_experts": (0, "Jamba has no shared experts")}


def _jamba_layer_check(i: int, layer: dict) -> None:
    if layer["mixer"] not in ("mamba1", "attention"):
        _fail("jamba", f"layers.{i}.mixer", f"{layer['mixer']} layers are not expressible; Jamba has mamba1 and "
              "attention layers")
    if layer["mixer"] == "attention":
        _check_attention("jamba", i, layer, rope_required=False)
        if layer["rope"]:
            _fail("jamba", f"layers.{i}.rope", "Jamba's attention has no positional encoding; set rope: false")
    elif not layer["dt_bc_norm"]:
        _fail("jamba", f"layers.{i}.dt_bc_norm", "Jamba's Mamba layers normalize dt, B and C; set dt_bc_norm: true")
    if layer["mlp"] == "none":
        _fail("jamba", f"layers.{i}.mlp", "every Jamba layer has an MLP (SwiGLU or a mixture of experts)")
    if layer["mlp"] != "moe":
        return
    for f, (want, why) in _JAMBA_ROUTER.items():
        if layer[f] != want:
            _fail("jamba", f"layers.{i}.{f}", f"{layer[f]!r}: {why} ({f}: {want!r})")
    if layer["n_experts"] < 2:
        _fail("jamba", f"layers.{i}.n_experts", "Jamba makes a layer of one expert a dense MLP without a router")


def _period(chosen: list, n: int):
    """(period, offset) such that layer i of n is in `chosen` exactly where i % period == offset, the way Jamba
    places attention and expert layers, or None when no period does. One layer chosen: the period is n (an
    8-layer Jamba block's attention at 4 is (8, 4)); none: (n + 1, n)."""
    if not chosen:
        return n + 1, n
    offset = chosen[0]
    return next(((p, offset) for p in range(n, offset, -1) if list(range(offset, n, p)) == chosen), None)


def _jamba_places(layers: list) -> dict:
    """attn_layer_period / _offset and expert_layer_period / _offset of the layout (refused when not periodic)."""
    n, out = len(layers), {}
    for key, field, what in (("attn", "mixer", "attention"), ("expert", "mlp", "moe")):
        chosen = [i for i, x in enumerate(layers) if x[field] == what]
        found = _period(chosen, n)
        if found is None:  # name the first layer off the period of the closest two (2 or more are chosen here)
            p = min(b - a for a, b in zip(chosen, chosen[1:]))
            i = next(i for i in range(n) if (i in chosen) != (i % p == chosen[0] % p))
            _fail("jamba", f"layers.{i}.{field}", f"{layers[i][field]} here breaks the period of the {what} layers "
                  f"(at {chosen}); Jamba puts them at every {key}_layer_period-th layer from {key}_layer_offset")
        out[f"{key}_layer_period"], out[f"{key}_layer_offset"] = found
    return out


def _jamba_groups(layout) -> tuple:
    """The fields JambaConfig holds once: of the attention, mamba1 and MoE layers (each {} where there are none)."""
    return (_same("jamba", layout, _JAMBA_ATTN, "JambaConfig", ("mixer", "attention")),
            _same("jamba", layout, _M1_FIELDS, "JambaConfig", ("mixer", "mamba1")),
            _same("jamba", layout, _JAMBA_MOE, "JambaConfig", ("mlp", "moe")))


def jamba_check(layout):
    for i, layer in enumerate(layout["layers"]):
        _jamba_layer_check(i, layer)
    _same("jamba", layout, ["d_ff"], "JambaConfig (experts and dense MLPs alike)")
    _jamba_groups(layout)
    _jamba_places(layout["layers"])


def jamba_config(layout) -> dict:
    attn, s, moe = _jamba_groups(layout)
    layers, m = layout["layers"], layout["model"]
    heads = attn.get("n_heads", 1)  # no attention layer: any value, never built
    mamba = dict(mamba_d_state=s["d_state"], mamba_d_conv=s["d_conv"], mamba_expand=s["expand"],
                 mamba_dt_rank=s["dt_rank"], mamba_conv_bias=s["conv_bias"], mamba_proj_bias=s["bias"]) if s else {}
    # what JambaConfig has no field for, kept for the way back: the dt init range, an unused rope_theta, and the
    # training-only MoE settings (braidlm's capacity applies in training only; Jamba routes dropless)
    kept = (s, ("dt_min", "dt_max", "dt_init_floor")), (attn, ("rope_theta",)), (moe, ("capacity_factor",
                                                                                         "z_loss_weight"))
    extra = {k: group[k] for group, keys in kept for k in keys if k in group}
    return dict(architectures=["JambaForCausalLM"], model_type="jamba", vocab_size=m["vocab_size"],
                hidden_size=m["d_model"], intermediate_size=layers[0]["d_ff"], num_hidden_layers=len(layers),
                num_attention_heads=heads, num_key_value_heads=attn.get("n_kv_heads", heads),
                head_dim=attn.get("head_dim", m["d_model"] // heads), hidden_act="silu",
                initializer_range=m["init_std"], rms_norm_eps=m["norm_eps"], tie_word_embeddings=m["tie_embeddings"],
                max_position_embeddings=m["max_seq_len"], use_mamba_kernels=False, **mamba,
                num_experts=moe.get("n_experts", 1), num_experts_per_tok=moe.get("top_k", 1),
                router_aux_loss_coef=moe.get("aux_loss_weight", 0.001), **_jamba_places(layers),
                pad_token_id=0, bos_token_id=2, eos_token_id=3, **_model_extra(layout), braidlm_jamba=extra)


_JAMBA = _ssm("model.layers.{i}.mamba", _SSM1) + _COMMON + [
    ("norm.weight", "model.final_layernorm.weight"),
    ("blocks.{i}.mlp_norm.weight", "model.layers.{i}.pre_ff_layernorm.weight"),
    ("blocks.{i}.mlp.router.weight", "model.layers.{i}.feed_forward.router.weight"),
    ("blocks.{i}.mlp.{p}_proj", "model.layers.{i}.feed_forward.experts.{p}_proj"),   # stacked: (experts, ...)
    ("blocks.{i}.mlp.{p}_proj.weight", "model.layers.{i}.feed_forward.{p}_proj.weight")]
_EXPERT = re.compile(r"(?P<head>.*\.experts)\.(?P<j>\d+)\.(?P<p>gate|up|down)_proj\.weight")


def _jamba_experts_to_hf(state: dict) -> dict:
    """Per projection stacked experts -> JambaExperts' gate_up_proj (experts, 2 * d_ff, d_model), gate rows first."""
    out = {k: v for k, v in state.items() if not k.endswith(("experts.gate_proj", "experts.up_proj"))}
    for k in state:
        if k.endswith("experts.gate_proj"):
            head = k[: -len("gate_proj")]
            out[head + "gate_up_proj"] = torch.cat([state[k], state[head + "up_proj"]], dim=1)
    return out


def _jamba_experts_from_hf(state: dict) -> dict:
    """Either format of Jamba's experts -> stacked per projection: gate_up_proj as JambaExperts holds it, or one
    tensor per expert (`experts.{j}.gate_proj.weight`, what save_pretrained writes and released checkpoints hold)."""
    out, per_expert = {}, {}
    for k, v in state.items():
        mt = _EXPERT.fullmatch(k)
        if mt:
            per_expert.setdefault(f"{mt['head']}.{mt['p']}_proj", {})[int(mt["j"])] = v
        elif k.endswith("experts.gate_up_proj"):
            head = k[: -len("gate_up_proj")]
            out[head + "gate_proj"], out[head + "up_proj"] = v.chunk(2, dim=1)
        else:
            out[k] = v
    for name, experts in per_expert.items():
        if sorted(experts) != list(range(len(experts))):
            raise NativeError(f"{name}: experts {sorted(experts)} are not numbered 0..{len(experts) - 1}")
        out[name] = torch.stack([experts[j] for j in range(len(experts))])
    return out


def jamba_layout(cfg: dict) -> dict:
    if cfg.get("hidden_act", "silu") != "silu":
        raise NativeError(f"config.json: hidden_act {cfg['hidden_act']!r}: braidlm's MLP is SwiGLU (silu)")
    d, heads, extra = cfg["hidden_size"], cfg["num_attention_heads"], cfg.get("braidlm_jamba") or {}
    rank = cfg.get("mamba_dt_rank", "auto")
    mamba = {"mixer": "mamba1", "d_state": cfg.get("mamba_d_state", 16), "d_conv": cfg.get("mamba_d_conv", 4),
             "expand": cfg.get("mamba_expand", 2), "dt_rank": math.ceil(d / 16) if rank == "auto" else rank,
             "dt_min": extra.get("dt_min", 0.001), "dt_max": extra.get("dt_max", 0.1),
             "dt_init_floor": extra.get("dt_init_floor", 1e-4), "conv_bias": cfg.get("mamba_conv_bias", True),
             "bias": cfg.get("mamba_proj_bias", False), "dt_bc_norm": True}
    attention = {"mixer": "attention", "kind": "global", "n_heads": heads,
                 "n_kv_heads": cfg.get("num_key_value_heads") or heads, "head_dim": cfg.get("head_dim") or d // heads,
                 "window": None, "sinks": 0, "stride": 0, "rope": False,
                 "rope_theta": extra.get("rope_theta", 10000.0), "qkv_bias": False}
    moe = {"mlp": "moe", "n_experts": cfg.get("num_experts", 16), "top_k": cfg.get("num_experts_per_tok", 2),
           "n_shared_experts": 0, "router": "softmax", "norm_topk_prob": False,
           "capacity_factor": extra.get("capacity_factor"), "aux_loss_weight": cfg.get("router_aux_loss_coef", 0.001),
           "z_loss_weight": extra.get("z_loss_weight", 0.0)}  # Jamba trains without a z-loss
    ap, ao = cfg.get("attn_layer_period", 8), cfg.get("attn_layer_offset", 4)
    ep, eo = cfg.get("expert_layer_period", 2), cfg.get("expert_layer_offset", 1)
    out = _model_back(cfg, "jamba", cfg.get("max_position_embeddings", 2048))
    out["layers"] = []
    for i in range(cfg["num_hidden_layers"]):
        layer = dict(attention if i % ap == ao else mamba, mlp="swiglu", d_ff=cfg["intermediate_size"])
        if moe["n_experts"] > 1 and i % ep == eo:  # as JambaConfig.layers_num_experts
            layer.update(moe)
        out["layers"].append(layer)
    return out


# ------------------------------------------------------------------------------------------ the table
def _conv_to_hf(state: dict) -> dict:
    return {k: (v[:, None, :] if k.endswith("conv_weight") else v) for k, v in state.items()}


def _conv_from_hf(state: dict) -> dict:
    return {k: (v[:, 0, :] if k.endswith("conv1d.weight") else v) for k, v in state.items()}


# per target: check, config, rename rules, layout (the way back); optionally to_hf / from_hf, reshapes of the
# target's tensors after the renames on the way out and before them on the way in
TARGETS = {
    "llama": dict(check=llama_check, config=llama_config, rules=_LLAMA, layout=llama_layout),
    "mamba2": dict(check=mamba2_check, config=mamba2_config, rules=_MAMBA2, layout=mamba2_layout),
    "bamba": dict(check=bamba_check, config=bamba_config, rules=_BAMBA, layout=bamba_layout),
    "jamba": dict(check=jamba_check, config=jamba_config, rules=_JAMBA, layout=jamba_layout,
                  to_hf=_jamba_experts_to_hf, from_hf=_jamba_experts_from_hf),
}


def _unchanged(state: dict) -> dict:
    return state


def to_hf(target: str, state: dict) -> dict:
    """braidlm state dict -> the target's names and shapes (as its transformers model holds them)."""
    t = TARGETS[target]
    return t.get("to_hf", _unchanged)(_rename(_conv_to_hf(state), t["rules"], False, target))


def from_hf(target: str, state: dict) -> dict:
    """The target's state dict (as saved, or as its model holds it) -> braidlm names and shapes (rotary inv_freq
    buffers dropped)."""
    t = TARGETS[target]
    state = t.get("from_hf", _unchanged)({k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")})
    return _rename(_conv_from_hf(state), t["rules"], True, target)
