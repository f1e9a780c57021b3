"""Layouts: YAML -> spec objects (pattern grammar, overrides, validation messages), the round trip back to
YAML, the budget report and the CLI."""
import glob
import os
from types import SimpleNamespace
import subprocess
import sys

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from omegaconf import OmegaConf

from hybrid.budget import budget, format_budget, format_layers
from hybrid.layout import layout_summary, layout_to_dict, load_layout
from hybrid.model import HybridLM
from hybrid.pattern import compress, expand
from hybrid.spec import LayoutError
from tests.strategies import random_layouts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = sorted(glob.glob(os.path.join(ROOT, "layouts", "*.yaml")))
NAMES = [os.path.basename(p)[:-5] for p in LAYOUTS]


def small(layers="M2 Aw M1 Ag F As", **model) -> dict:
    """A small valid layout with one layer of each kind (indices: 0 M2, 1 Aw, 2 M1, 3 Ag, 4 F, 5 As)."""
    return {"name": "small", "model": {"d_model": 64, "vocab_size": 100, **model},
            "defaults": {"mamba2": {"d_state": 8, "headdim": 16, "chunk_size": 8},
                         "attention": {"n_heads": 4, "window": 8}},
            "layers": layers}


def codes(layout):
    return [layer.code for layer in layout.layers]


def pattern_codes(text):
    out = []
    for e in expand(text):
        code = {"mamba1": "M1", "mamba2": "M2", "none": "F"}.get(e["mixer"]) or {"global": "Ag", "local": "Aw",
                                                                                 "sparse": "As"}[e["kind"]]
        out.append(code + (f":{e['mlp']}" if "mlp" in e else ""))
    return out


# ------------------------------------------------------------------------------------------ shipped layouts
def test_the_expected_layouts_ship():
    assert {"tiny", "jamba", "jamba-moe", "samba", "griffin", "mamba2", "transformer", "nemotron-h"} <= set(NAMES)


@pytest.mark.parametrize("path", LAYOUTS, ids=NAMES)
def test_shipped_layout_loads_and_round_trips(path, tmp_path):
    layout = load_layout(path)
    assert layout.name == os.path.basename(path)[:-5] and layout.n_layers > 0
    explicit = layout_to_dict(layout)
    assert isinstance(explicit["layers"], list) and all("mixer" in e and "mlp" in e for e in explicit["layers"])
    assert load_layout(explicit) == layout
    dumped = tmp_path / "explicit.yaml"
    dumped.write_text(yaml.safe_dump(explicit, sort_keys=False))
    assert load_layout(str(dumped)) == layout
    summary = layout_summary(layout)
    assert [c.split(":")[0] for c in pattern_codes(summary)] == codes(layout)
    b = budget(layout)
    assert b.params > 0 and b.flops_per_token > 0 and "total" in format_budget(b)


def test_shipped_layouts_have_their_documented_shapes():
    jamba = load_layout(os.path.join(ROOT, "layouts", "jamba.yaml"))
    assert codes(jamba) == (["M1"] * 4 + ["Ag"] + ["M1"] * 3) * 2
    assert all(not l.attention.rope for l in jamba.layers if l.mixer == "attention")
    assert all(l.mlp is not None for l in jamba.layers)
    nemo = load_layout(os.path.join(ROOT, "layouts", "nemotron-h.yaml"))
    assert all((l.mlp is None) == (l.mixer != "none") for l in nemo.layers)
    mamba2 = load_layout(os.path.join(ROOT, "layouts", "mamba2.yaml"))
    assert codes(mamba2) == ["M2"] * 24 and all(l.mlp is None for l in mamba2.layers)
    for name in ("jamba", "samba", "griffin", "transformer", "nemotron-h", "mamba2"):
        params = budget(load_layout(os.path.join(ROOT, "layouts", f"{name}.yaml"))).params
        assert 115e6 < params < 135e6, name
    assert 3e6 < budget(load_layout(os.path.join(ROOT, "layouts", "tiny.yaml"))).params < 6e6
    moe = load_layout(os.path.join(ROOT, "layouts", "jamba-moe.yaml"))
    assert codes(moe) == codes(jamba) and all(not l.attention.rope for l in moe.layers if l.mixer == "attention")
    assert [l.mlp.kind for l in moe.layers] == ["swiglu", "moe"] * 8   # Jamba: MoE on the odd layers
    assert {(l.mlp.n_experts, l.mlp.top_k, l.mlp.router, l.mlp.norm_topk_prob, l.mlp.capacity_factor)
            for l in moe.layers if l.mlp.kind == "moe"} == {(16, 2, "softmax", False, 0.0)}
    b = budget(moe)
    assert 140e6 < b.params < 155e6 and 55e6 < b.active_params < 65e6
    # Jamba's dt/B/C norms in the Jamba-recipe layout only; Mamba1 as published elsewhere
    assert all(l.mamba1.dt_bc_norm for l in moe.layers if l.mixer == "mamba1")
    assert not any(l.mamba1.dt_bc_norm for l in jamba.layers if l.mixer == "mamba1")


def test_cli_prints_layers_and_budget():
    out = subprocess.run([sys.executable, "-m", "hybrid.layout", "layouts/tiny.yaml", "layers.2.window=32",
                          "--seq-len", "128", "--dtype", "fp32"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "window=32" in out.stdout and "total" in out.stdout and "at seq_len 128" in out.stdout


def test_cli_bad_layout_exits_2_without_traceback():
    out = subprocess.run([sys.executable, "-m", "hybrid.layout", "layouts/tiny.yaml", "layers.99.window=3"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2
    assert "layers.99" in out.stderr and "Traceback" not in out.stderr


# ------------------------------------------------------------------------------------------ pattern grammar
@pytest.mark.parametrize("text, want", [
    ("M2 M2 Aw M2 M2 Ag", ["M2", "M2", "Aw", "M2", "M2", "Ag"]),
    ("[M1 M1 Ag] x 2", ["M1", "M1", "Ag"] * 2),
    ("[M1 Ag]", ["M1", "Ag"]),
    ("A As Aw F", ["Ag", "As", "Aw", "F"]),
    ("M2 x 3 F", ["M2", "M2", "M2", "F"]),
    ("[[M1 x 2 Aw] x 2 Ag] x 2", (["M1", "M1", "Aw"] * 2 + ["Ag"]) * 2),
    ("[M2:none F]x2 Ag:swiglu", ["M2:none", "F", "M2:none", "F", "Ag:swiglu"]),
    ("[M2\n  Aw]  x  1", ["M2", "Aw"]),
    ("F:swiglu", ["F:swiglu"]),
])
def test_pattern_expansion(text, want):
    assert pattern_codes(text) == want


@pytest.mark.parametrize("tokens, want", [
    (["M2", "F"] * 3, "[M2 F] x 3"),
    ((["M1"] * 4 + ["Ag"] + ["M1"] * 3) * 2, "[M1 x 4 Ag M1 x 3] x 2"),
    (["M2", "M2", "Aw", "M2", "M2", "Ag"], "M2 M2 Aw M2 M2 Ag"),
    (["Ag"] * 14, "Ag x 14"),
])
def test_compress(tokens, want):
    assert compress(tokens) == want
    assert pattern_codes(want) == tokens


def test_pattern_errors_point_at_the_token():
    with pytest.raises(LayoutError) as err:
        expand("M2 M2 [Aw M3] x 2")
    msg = str(err.value)
    assert "'M3'" in msg and "position 10" in msg and "\n" + " " * 14 + "^" in msg


def test_explicit_list_form():
    layout = load_layout(small([{"mixer": "mamba2", "d_state": 4},
                                {"mixer": "attention", "kind": "local", "window": 512, "mlp": "none"},
                                {"mixer": "none", "d_ff": 96}]))
    assert codes(layout) == ["M2", "Aw", "F"]
    assert layout.layers[0].mamba2.d_state == 4 and layout.layers[0].mlp.d_ff == 192  # 8/3*64 -> multiple of 64
    assert layout.layers[1].attention.window == 512 and layout.layers[1].mlp is None
    assert layout.layers[2].mlp.d_ff == 96 and layout.layers[2].mixer_spec is None


def test_defaults_and_derived_values():
    layout = load_layout(small("M1 M2 Ag", d_model=80),
                         ["defaults.attention.n_kv_heads=2", "defaults.mlp.multiple_of=32"])
    m1, m2, attn = (l.mixer_spec for l in layout.layers)
    assert (m1.d_inner, m1.dt_rank, m1.d_state) == (160, 5, 16)     # dt_rank auto = ceil(80 / 16)
    assert (m2.d_inner, m2.nheads, m2.dt_limit) == (160, 10, (0.0, float("inf")))
    assert (attn.n_heads, attn.n_kv_heads, attn.head_dim, attn.window, attn.sinks) == (4, 2, 20, 0, 0)
    assert layout.layers[0].mlp.d_ff == 224                          # 8/3 * 80 = 213.3 -> 224


def test_overrides_section_and_dotlist():
    cfg = small("[M2 Aw] x 3")
    cfg["overrides"] = {3: {"window": 2048}, "5": {"mlp": "none"}}
    layout = load_layout(cfg, ["layers.1.window=16", "model.d_model=512", "defaults.attention.window=1024"])
    assert [l.attention.window for l in layout.layers if l.mixer == "attention"] == [16, 2048, 1024]
    assert layout.layers[5].mlp is None and layout.layers[1].mlp is not None
    assert layout.model.d_model == 512 and layout.layers[0].mamba2.d_inner == 1024
    assert layout.layers[1].attention.head_dim == 128


def test_dotlist_can_change_a_pattern_layer_and_replace_the_pattern():
    layout = load_layout(small(), ["layers.1.mixer=mamba2", "layers.3.kind=sparse", "layers.3.window=4"])
    assert codes(layout) == ["M2", "M2", "M1", "As", "F", "As"]
    assert codes(load_layout(small(), ["layers=[M1 F] x 2", "layers.2.mlp=none"])) == ["M1", "F", "M1", "F"]


def test_sources_path_dict_and_dictconfig_agree(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(small()))
    from_path = load_layout(str(path))
    assert from_path == load_layout(small()) == load_layout(OmegaConf.create(small()))
    cfg = small()
    del cfg["name"]
    assert load_layout(cfg).name == "layout"


def test_errors_from_a_file_name_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(small(d_model="big")))
    with pytest.raises(LayoutError, match=r"broken\.yaml: model\.d_model"):
        load_layout(str(path))
    with pytest.raises(LayoutError, match="no such file"):
        load_layout(str(tmp_path / "missing.yaml"))


# ------------------------------------------------------------------------------------------ bad layouts
def with_(**top):
    cfg = small()
    cfg.update(top)
    return cfg


BAD = [
    # (description, layout dict, dotlist, key named in the message, value shown in it)
    ("unknown top-level key", with_(modle={}), [], "modle", "did you mean 'model'"),
    ("unknown model key", small(), ["model.d_modl=5"], "model.d_modl", "did you mean 'd_model'"),
    ("unknown defaults group", small(), ["defaults.mamba3.d_state=4"], "defaults.mamba3", "mamba3"),
    ("unknown defaults key", small(), ["defaults.attention.windw=5"], "defaults.attention.windw", "'window'"),
    ("unknown layer key", with_(overrides={1: {"windw": 3}}), [], "layers.1.windw", "'window'"),
    ("d_model not an int", small(d_model="big"), [], "model.d_model", "'big'"),
    ("vocab_size float", small(vocab_size=3.5), [], "model.vocab_size", "3.5"),
    ("bool not a bool", small(), ["defaults.attention.rope=maybe"], "defaults.attention.rope", "maybe"),
    ("dt_limit element", small(), ["defaults.mamba2.dt_limit=[0, abc]"], "defaults.mamba2.dt_limit.1", "abc"),
    ("missing d_model", {"model": {"vocab_size": 10}, "layers": "M2"}, [], "model.d_model", "required"),
    ("d_model zero", small(d_model=0), [], "model.d_model", "0"),
    ("vocab_size negative", small(vocab_size=-1), [], "model.vocab_size", "-1"),
    ("norm_eps zero", small(norm_eps=0.0), [], "model.norm_eps", "0.0"),
    ("d_state zero", small(), ["defaults.mamba2.d_state=0"], "defaults.mamba2.d_state", "0"),
    ("expand zero on a layer", small(), ["layers.2.expand=0"], "layers.2.expand", "0"),
    ("headdim negative", small(), ["defaults.mamba2.headdim=-8"], "defaults.mamba2.headdim", "-8"),
    ("n_heads zero", small(), ["defaults.attention.n_heads=0"], "defaults.attention.n_heads", "0"),
    ("d_ff zero", small(), ["layers.4.d_ff=0"], "layers.4.d_ff", "0"),
    ("chunk_size zero", small(), ["defaults.mamba2.chunk_size=0"], "defaults.mamba2.chunk_size", "0"),
    ("empty list", with_(layers=[]), [], "layers", "empty"),
    ("empty pattern", with_(layers="  "), [], "layers", "empty"),
    ("no layers at all", {"model": {"d_model": 8, "vocab_size": 8}}, [], "layers", "required"),
    ("unknown mixer", with_(layers=[{"mixer": "rnn"}]), [], "layers.0.mixer", "'rnn'"),
    ("missing mixer", with_(layers=[{"d_ff": 3}]), [], "layers.0.mixer", "required"),
    ("unknown attention kind", small(), ["layers.3.kind=sliding"], "layers.3.kind", "sliding"),
    ("unknown mlp kind", small(), ["layers.0.mlp=relu"], "layers.0.mlp", "relu"),
    ("unknown default mlp kind", small(), ["defaults.mlp.kind=geglu"], "defaults.mlp.kind", "geglu"),
    ("heads do not divide d_model", small(), ["defaults.attention.n_heads=5"], "defaults.attention.n_heads", "5"),
    ("kv heads do not divide heads", small(), ["layers.3.n_kv_heads=3"], "layers.3.n_kv_heads", "3"),
    ("odd head_dim with rope", small(), ["layers.1.head_dim=7"], "layers.1.head_dim", "7"),
    ("odd derived head_dim with rope", small(d_model=36), ["defaults.attention.n_heads=4",
                                                           "defaults.mamba2.headdim=8"], "n_heads", "head_dim=9"),
    ("local window zero", small(), ["layers.1.window=0"], "layers.1.window", "0"),
    ("local window missing", small(), ["defaults.attention.window=null"], "defaults.attention.window", "None"),
    ("sparse window missing", with_(layers="As", defaults={"attention": {"n_heads": 4}}), [],
     "defaults.attention.window", "None"),
    ("window on a global layer", small(), ["layers.3.window=2048"], "layers.3.window", "2048"),
    ("negative sinks", small(), ["layers.5.sinks=-1"], "layers.5.sinks", "-1"),
    ("negative stride", small(), ["defaults.attention.stride=-2"], "defaults.attention.stride", "-2"),
    ("sinks on a local layer", small(), ["layers.1.sinks=2"], "layers.1.sinks", "2"),
    ("stride on a global layer", small(), ["layers.3.stride=4"], "layers.3.stride", "4"),
    ("headdim does not divide d_inner", small(), ["defaults.mamba2.headdim=24"], "defaults.mamba2.headdim", "24"),
    ("ngroups does not divide nheads", small(), ["layers.0.ngroups=3"], "layers.0.ngroups", "3"),
    ("d_conv too wide", small(), ["defaults.mamba2.d_conv=5"], "defaults.mamba2.d_conv", "5"),
    ("d_conv too narrow", small(), ["layers.2.d_conv=1"], "layers.2.d_conv", "1"),
    ("dt_min zero", small(), ["defaults.mamba1.dt_min=0"], "defaults.mamba1.dt_min", "0"),
    ("dt_min above dt_max", small(), ["layers.2.dt_min=0.5"], "layers.2.dt_min", "0.5"),
    ("dt_limit decreasing", small(), ["defaults.mamba2.dt_limit=[0.1, 0.01]"], "defaults.mamba2.dt_limit", "0.01"),
    ("dt_limit one number", small(), ["defaults.mamba2.dt_limit=[0.1]"], "defaults.mamba2.dt_limit", "[0.1]"),
    ("chunk_size not a power of two", small(), ["defaults.mamba2.chunk_size=12"], "defaults.mamba2.chunk_size", "12"),
    ("dt_rank not auto", small(), ["defaults.mamba1.dt_rank=big"], "defaults.mamba1.dt_rank", "big"),
    ("dt_bc_norm not a bool", small(), ["layers.2.dt_bc_norm=maybe"], "layers.2.dt_bc_norm", "maybe"),
    ("dt_bc_norm on a mamba2 layer", small(), ["layers.0.dt_bc_norm=true"], "layers.0.dt_bc_norm", "mamba1"),
    ("dotlist index out of range", small(), ["layers.99.window=2048"], "layers.99", "0..5"),
    ("overrides index out of range", with_(overrides={9: {"window": 3}}), [], "overrides.9", "0..5"),
    ("field of another mixer", with_(layers=[{"mixer": "mamba2", "window": 3}]), [], "layers.0.window", "attention"),
    ("attention field on an F layer", small(), ["layers.4.n_heads=2"], "layers.4.n_heads", "none"),
    ("F:none in a pattern", with_(layers="M2 F:none"), [], "layers", "F:none"),
    ("mlp none on an F layer", small(), ["layers.4.mlp=none"], "layers.4.mlp", "none"),
    ("d_ff on a layer without MLP", small(), ["layers.0.mlp=none", "layers.0.d_ff=64"], "layers.0.d_ff", "64"),
    ("unbalanced bracket", with_(layers="[M2 Aw"), [], "position 0", "'['"),
    ("stray closing bracket", with_(layers="M2 ] Aw"), [], "position 3", "']'"),
    ("unknown code", with_(layers="M2 M3"), [], "position 3", "'M3'"),
    ("repeat x0", with_(layers="[M2 Aw] x 0"), [], "position 10", "'0'"),
    ("garbage pattern", with_(layers="M2, Aw"), [], "position 0", "'M2,'"),
    ("repeat with nothing before", with_(layers="x 2 M2"), [], "position 0", "'x'"),
    ("malformed dotlist", small(), ["window"], "overrides", "key=value"),
    ("layer not a mapping", with_(layers=["M2"]), [], "layers.0", "'M2'"),
    ("unresolvable interpolation", small(), ["model.d_model=${nope}"], "model.d_model", "nope"),
    ("unknown MLP suffix", with_(layers="M2 M2:mo"), [], "position 3", "did you mean 'moe'"),
    ("F:none lists the MLP kinds", with_(layers="F:none"), [], "layers", "F:moe"),
    ("top_k above n_experts", small(), ["layers.0.mlp=moe", "layers.0.top_k=9"], "layers.0.top_k", "n_experts=8"),
    ("top_k zero", small(), ["defaults.mlp.top_k=0"], "defaults.mlp.top_k", "0"),
    ("n_experts zero", small(), ["defaults.mlp.n_experts=0"], "defaults.mlp.n_experts", "0"),
    ("negative shared experts", small(), ["defaults.mlp.n_shared_experts=-1"], "defaults.mlp.n_shared_experts", "-1"),
    ("unknown router", small(), ["defaults.mlp.router=relu"], "defaults.mlp.router", "softmax | sigmoid"),
    ("router on a layer", small(), ["layers.4.mlp=moe", "layers.4.router=tanh"], "layers.4.router", "tanh"),
    ("norm_topk_prob not a bool", small(), ["defaults.mlp.norm_topk_prob=maybe"], "defaults.mlp.norm_topk_prob",
     "maybe"),
    ("negative capacity", small(), ["layers.4.mlp=moe", "layers.4.capacity_factor=-1"], "layers.4.capacity_factor",
     "dropless"),
    ("negative aux weight", small(), ["defaults.mlp.aux_loss_weight=-0.1"], "defaults.mlp.aux_loss_weight", "-0.1"),
    ("NaN z-loss weight", small(), ["defaults.mlp.z_loss_weight=.nan"], "defaults.mlp.z_loss_weight", "nan"),
    ("MoE field on a swiglu layer", small(), ["layers.0.top_k=1"], "layers.0.top_k", "mlp: moe"),
    ("MoE field on a layer without MLP", small(), ["layers.1.mlp=none", "layers.1.n_experts=4"],
     "layers.1.n_experts", "none"),
    ("moe_offset past moe_every", small(), ["defaults.mlp.moe_every=2", "defaults.mlp.moe_offset=2"],
     "defaults.mlp.moe_offset", "0..1"),
    ("negative moe_every", small(), ["defaults.mlp.moe_every=-1"], "defaults.mlp.moe_every", "-1"),
]


@pytest.mark.parametrize("desc, cfg, dotlist, key, value", BAD, ids=[b[0] for b in BAD])
def test_bad_layout_raises_one_clear_error(desc, cfg, dotlist, key, value):
    with pytest.raises(LayoutError) as err:
        load_layout(cfg, dotlist)
    msg = str(err.value)
    assert key in msg and value in msg, msg
    assert "allowed" in msg, msg


# ------------------------------------------------------------------------------------------ budget
def test_budget_matches_hand_count():
    cfg = {"model": {"d_model": 16, "vocab_size": 10, "tie_embeddings": False, "max_seq_len": 32},
           "layers": [
               {"mixer": "mamba1", "expand": 2, "d_state": 2, "d_conv": 3, "dt_rank": 2, "mlp": "none"},
               {"mixer": "mamba2", "expand": 2, "headdim": 8, "ngroups": 2, "d_state": 4, "chunk_size": 8,
                "bias": True, "conv_bias": False, "d_ff": 24},
               {"mixer": "attention", "kind": "global", "n_heads": 4, "n_kv_heads": 2, "qkv_bias": True, "mlp": "none"},
               {"mixer": "attention", "kind": "local", "n_heads": 4, "n_kv_heads": 2, "window": 4, "mlp": "none"},
               {"mixer": "attention", "kind": "sparse", "n_heads": 4, "n_kv_heads": 2, "window": 4, "sinks": 2,
                "stride": 8, "mlp": "none"},
               {"mixer": "none", "d_ff": 24}]}
    b = budget(load_layout(cfg))
    # M1 (d_inner 32): in 16*64 + conv 32*3+32 + x_proj 32*6 + dt_proj 2*32 + dt_bias 32 + A_log 64 + D 32
    #   + out 32*16 + norm 16.  M2 (d_inner 32, nheads 4, conv_dim 48): in 16*84 + bias 84 + conv 48*4
    #   + 3*4 + gated norm 32 + out 512 + bias 16 + norm 16, MLP 3*16*24 + norm 16.
    #   Attention: q 256 + k, v 2*128 + o 256 (+ qkv bias 32) + norm 16.  F: MLP 1152 + norm 16.
    assert [r.params for r in b.layers] == [2064, 2208 + 1168, 816, 784, 784, 1168]
    assert b.params == 8992 + 160 + 16 + 160
    # M1: 2*(1024+192+64+512) + conv 2*32*3 + scan 6*32*2.  M2: 2*(1344+512) + conv 2*48*4
    #   + SSD 2*8*2*4 + 2*8*4*8 + 4*4*8*4, MLP 2*1152.  Attention: 2*768 + 4*16*ctx, ctx the mean number of keys
    #   a query sees under the causal mask: global 33/2, local (window 4) 122/32, sparse (4, sinks 2, stride 8)
    #   (122 + 94)/32.
    assert [r.flops_per_token for r in b.layers] == [4160, 5248 + 2304, 1536 + 1056, 1536 + 244, 1536 + 432, 2304]
    assert b.flops_per_token == 20356 + 2 * 160
    # bf16 caches: M1 conv 32*2*2 + ssm 32*2*4; M2 conv 48*3*2 + 4*8*4*4; local 2*8*4*2; sparse 2*8*6*2
    assert [r.state_bytes for r in b.layers] == [384, 800, 0, 128, 192, 0]
    assert [r.kv_bytes_per_token for r in b.layers] == [0, 0, 32, 0, 4, 0]
    assert b.cache_bytes() == 1504 + 36 * 32


def test_dt_bc_norm_adds_its_three_norm_weights():
    layer = {"mixer": "mamba1", "expand": 2, "d_state": 2, "d_conv": 3, "dt_rank": 2, "mlp": "none"}
    cfg = {"model": {"d_model": 16, "vocab_size": 10}, "layers": [layer, dict(layer, dt_bc_norm=True)]}
    layout = load_layout(cfg)
    b = budget(layout)
    # the layer of test_budget_matches_hand_count (2064), + weights of dt_low (dt_rank 2), B and C (d_state 2 each)
    assert [r.params for r in b.layers] == [2064, 2064 + 2 + 2 * 2]
    assert b.layers[0].flops_per_token == b.layers[1].flops_per_token and "dt_bc_norm" in format_layers(layout)
    model = HybridLM(layout)
    names = {n: tuple(p.shape) for n, p in model.named_parameters() if "norm_weight" in n}
    assert names == {"blocks.1.mixer.dt_norm_weight": (2,), "blocks.1.mixer.B_norm_weight": (2,),
                     "blocks.1.mixer.C_norm_weight": (2,)}
    assert sum(p.numel() for p in model.parameters()) == b.params


def test_moe_budget_matches_hand_count():
    cfg = {"model": {"d_model": 16, "vocab_size": 10, "tie_embeddings": False, "max_seq_len": 32},
           "layers": [{"mixer": "none", "mlp": "moe", "d_ff": 8, "n_experts": 4, "top_k": 2, "n_shared_experts": 1},
                      {"mixer": "attention", "kind": "global", "n_heads": 4, "n_kv_heads": 2, "mlp": "moe", "d_ff": 8,
                       "n_experts": 3, "top_k": 1, "router": "sigmoid"}]}
    layout = load_layout(cfg)
    b = budget(layout)
    # F:moe: norm 16 + router 16*4 + experts 4 * 3*16*8 + shared 3*16*8; active: 2 of the 4 experts.
    # Ag:moe: attention 256 + 2*128 + 256 + norm 16, then norm 16 + router 16*3 + experts 3 * 384; active: 1 expert.
    assert [r.params for r in b.layers] == [2000, 784 + 1216]
    assert [r.active_params for r in b.layers] == [16 + 64 + 2 * 384 + 384, 784 + 16 + 48 + 384]
    assert (b.params, b.active_params) == (4000 + 160 + 16 + 160, 2464 + 336)
    # FLOPs: 2 x (router + top_k experts + shared) active, every expert in the dense count; attention 2*768 + 4*16*33/2
    assert [r.flops_per_token for r in b.layers] == [2 * (64 + 768 + 384), 2592 + 2 * (48 + 384)]
    assert [r.dense_flops_per_token for r in b.layers] == [2 * (64 + 1536 + 384), 2592 + 2 * (48 + 1152)]
    assert (b.flops_per_token, b.dense_flops_per_token) == (2432 + 3456 + 320, 3968 + 4992 + 320)
    assert b.moe and not budget(load_layout(small())).moe
    text = format_budget(b)
    assert "active (M)" in text and "(0.00 M active)" in text and "with every expert" in text
    assert "active" not in format_budget(budget(load_layout(small())))
    with torch.device("meta"):
        assert sum(p.numel() for p in HybridLM(layout).parameters()) == b.params


def test_moe_every_and_the_moe_suffix():
    """defaults.mlp.moe_every / moe_offset turn the default MLP of every N-th layer into an MoE; a layer that names
    its MLP (suffix, list entry, override) keeps it. The summary and the explicit form say the same layers."""
    layout = load_layout(small("M2 M2 M2:swiglu F M2:none M2"), ["defaults.mlp.moe_every=2",
                                                                 "defaults.mlp.moe_offset=1", "layers.5.n_experts=4"])
    assert [l.mlp.kind if l.mlp else "none" for l in layout.layers] == ["swiglu", "moe", "swiglu", "moe", "none",
                                                                         "moe"]
    assert [l.mlp.n_experts for l in layout.layers if l.mlp and l.mlp.kind == "moe"] == [8, 8, 4]
    assert layout_summary(layout) == "M2 M2:moe M2 F:moe M2:none M2:moe"
    assert load_layout(layout_to_dict(layout)) == layout
    same = load_layout(small("M2 M2:moe M2 F:moe M2:none M2:moe"), ["layers.5.n_experts=4"])
    assert same.layers == layout.layers
    assert pattern_codes("[M1 M1:moe] x 2") == ["M1", "M1:moe"] * 2


@pytest.mark.parametrize("kind,window,sinks,stride", [("global", 0, 0, 0), ("local", 1, 0, 0), ("local", 7, 0, 0),
                                                      ("local", 300, 0, 0), ("sparse", 5, 3, 0), ("sparse", 4, 0, 9),
                                                      ("sparse", 6, 2, 11), ("sparse", 6, 13, 4)])
@pytest.mark.parametrize("seq_len", [1, 5, 64, 257])
def test_attention_flops_count_the_keys_the_causal_mask_shows(kind, window, sinks, stride, seq_len):
    """budget's attention context is the mean number of visible keys per query under the reference's rule."""
    from hybrid.budget import attention_context
    from kernels.attention.reference import visible
    spec = SimpleNamespace(kind=kind, window=window, sinks=sinks, stride=stride)
    p = torch.arange(seq_len)
    mean = float(visible(p[:, None], p[None, :], kind, window, sinks, stride).sum()) / seq_len
    assert attention_context(spec, seq_len) == pytest.approx(mean, rel=1e-12)


def test_cache_state_is_flat_in_seq_len_and_local_layers_hold_no_kv_per_token():
    layout = load_layout(small())
    short, long_ = budget(layout, seq_len=64), budget(layout, seq_len=65536)
    assert [r.state_bytes for r in short.layers] == [r.state_bytes for r in long_.layers]
    assert [r.kv_bytes_per_token for r in short.layers] == [r.kv_bytes_per_token for r in long_.layers]
    for layer, row in zip(layout.layers, short.layers):
        if layer.code == "Aw":
            assert row.kv_bytes_per_token == 0 and row.state_bytes > 0
    assert long_.flops_per_token > short.flops_per_token   # global attention reads more keys
    assert budget(layout, dtype_bytes=4).state_bytes > short.state_bytes


# ------------------------------------------------------------------------------------------ properties
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_layouts())
def test_random_layouts_load_round_trip_and_count_like_the_model(cfg):
    layout = load_layout(cfg)
    assert load_layout(layout_to_dict(layout)) == layout
    assert [c.split(":")[0] for c in pattern_codes(layout_summary(layout))] == codes(layout)
    with torch.device("meta"):
        model = HybridLM(layout)
    assert sum(p.numel() for p in model.parameters()) == budget(layout).params
