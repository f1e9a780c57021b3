"""Hugging Face export / import (interop/export.py, interop/remote/): the self-contained remote-code model against our
model (logits and greedy generation, in this process and in a subprocess where braidlm cannot be imported; MoE
layouts included), native Llama / Mamba2 / Bamba / Jamba exports against the transformers classes, a Jamba made by
transformers imported, round trips, refusals naming the layer and field, and bad inputs."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from omegaconf import OmegaConf

from hybrid import HybridLM, generate
from training.checkpoint import save_model
from hybrid.errors import CheckpointError, cli
from interop.export import MANIFEST, ExportError, export, import_hf, import_to_checkpoint, main
from hybrid.layout import layout_to_dict, load_layout
from training.tokenizer import Tokenizer

from shrink import shrink

transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = ["tiny", "jamba", "jamba-moe", "samba", "griffin", "mamba2", "transformer", "nemotron-h"]
VOCAB = 420
PROMPT_LEN, NEW = 19, 10   # longer than the shrunk windows (5), so ring buffers wrap in prefill and decode


def sparse_layout() -> dict:
    """Every block kind in one stack, including sparse attention (no shipped layout has it)."""
    cfg = shrink(os.path.join(ROOT, "layouts/tiny.yaml"), vocab=VOCAB)
    cfg["layers"] = [dict(mixer="mamba1", d_state=4, expand=2, dt_rank=4, mlp="swiglu", d_ff=96),
                     dict(mixer="attention", kind="sparse", n_heads=4, n_kv_heads=2, head_dim=16, window=4, sinks=2,
                          stride=3, rope=True, mlp="none"),
                     dict(mixer="none", d_ff=96),
                     dict(mixer="mamba2", d_state=8, headdim=16, ngroups=2, chunk_size=8, mlp="none"),
                     dict(mixer="attention", kind="local", n_heads=4, n_kv_heads=1, head_dim=16, window=5, rope=False,
                          mlp="swiglu", d_ff=96)]
    return cfg


def bamba_layout() -> dict:
    """A Bamba-shaped hybrid: Mamba2 and global RoPE attention, a SwiGLU MLP after every mixer."""
    cfg = shrink(os.path.join(ROOT, "layouts/tiny.yaml"), vocab=VOCAB)
    for layer in cfg["layers"]:
        if layer["mixer"] == "attention":
            layer.update(kind="global", window=None)
    return cfg


# layers kept of each shrunk layout: its first period(s), so every layer kind and its order stay, at CPU-test size
KEEP = {"jamba": 8, "jamba-moe": 8, "samba": 4, "griffin": 6, "mamba2": 3, "transformer": 3, "nemotron-h": 11}


def shipped(name: str) -> dict:
    cfg = shrink(os.path.join(ROOT, f"layouts/{name}.yaml"), vocab=VOCAB)
    cfg["layers"] = cfg["layers"][:KEEP.get(name)]
    return cfg


LAYOUTS = {name: (lambda name=name: shipped(name)) for name in SHIPPED}
LAYOUTS["sparse"] = sparse_layout


def make_model(cfg: dict, seed: int = 0) -> HybridLM:
    """A random model whose weights are far from init (so greedy decoding does not collapse onto one token)."""
    torch.manual_seed(seed)
    model = HybridLM(load_layout(cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(("A_log", "dt_bias", ".D")):
                p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    from pydoc_data.topics import topics
    docs = [d.encode("ascii", "ignore").decode() for d in list(topics.values())[:40]]
    tok = Tokenizer.train(docs, 400, str(root / "tok" / "tokenizer.model"))
    return root, tok


def write_checkpoint(model: HybridLM, tok_path: str, path) -> str:
    os.makedirs(path)
    save_model(model, os.path.join(path, "model.safetensors"))
    OmegaConf.save(OmegaConf.create(layout_to_dict(model.layout)), os.path.join(path, "layout.yaml"))
    with open(tok_path, "rb") as src, open(os.path.join(path, "tokenizer.model"), "wb") as dst:
        dst.write(src.read())
    return str(path)


def inputs(seed: int = 1):
    """Two rows, the first left-padded by 6: (input_ids, attention_mask, prompts as lists)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (2, PROMPT_LEN), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    ids[0, :6] = 0
    return ids, mask, [ids[0, 6:].tolist(), ids[1].tolist()]


def no_tmp_left(parent) -> bool:
    return not [n for n in os.listdir(parent) if ".tmp-" in n]


# ----------------------------------------------------------------------------------------- remote code
@pytest.fixture(scope="module")
def remote_exports(work):
    """Every layout exported (self-contained) from a checkpoint directory, with its reference outputs."""
    root, tok = work
    out = {}
    ids, mask, prompts = inputs()
    for i, (name, cfg) in enumerate(LAYOUTS.items()):
        model = make_model(cfg(), seed=i)
        ckpt = write_checkpoint(model, tok.path, root / f"ckpt-{name}")
        hf_dir = str(root / f"hf-{name}")
        if name == "tiny":  # the command line, once
            assert main([ckpt, hf_dir]) == 0
        else:
            assert export(ckpt, hf_dir, max_shard_size="40KB" if name == "jamba" else "2GB") == "remote"
        with torch.no_grad():
            ref = {"logits": model(ids).tolist(), "padded": model(ids, attention_mask=mask).tolist(),
                   "tokens": generate(model, prompts, max_new_tokens=NEW)}
        out[name] = (model, hf_dir, ref)
    return out


def test_export_directory_contents(remote_exports):
    _, hf_dir, _ = remote_exports["jamba"]
    names = set(os.listdir(hf_dir))
    assert {"config.json", "generation_config.json", "configuration_braid.py", "modeling_braid.py",
            "tokenizer.model", "tokenizer_config.json", "tokenization_braid.py"} <= names
    assert "model.safetensors.index.json" in names  # sharded: 40KB shards
    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "braidlm" and cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_braid.BraidForCausalLM"
    assert [layer["mixer"] for layer in cfg["layout"]["layers"]][:5] == ["mamba1"] * 4 + ["attention"]
    for name in ("modeling_braid.py", "configuration_braid.py", "tokenization_braid.py"):
        src = open(os.path.join(hf_dir, name)).read()
        assert "import hybrid" not in src and "from hybrid" not in src


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_remote_code_matches_our_model(remote_exports, name):
    model, hf_dir, ref = remote_exports[name]
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).eval()
    ids, mask, _ = inputs()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, torch.tensor(ref["logits"]), atol=1e-4, rtol=0)
        torch.testing.assert_close(hf(ids, attention_mask=mask).logits, torch.tensor(ref["padded"]), atol=1e-4, rtol=0)
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                          pad_token_id=0, use_cache=True)
    assert out[:, PROMPT_LEN:].tolist() == ref["tokens"]
    assert len(set(ref["tokens"][1])) > 2  # the test is not passing on a constant sequence


def test_remote_cache_is_a_transformers_cache(remote_exports):
    _, hf_dir, _ = remote_exports["sparse"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).eval()
    ids, mask, _ = inputs()
    with torch.no_grad():
        out = hf(ids, attention_mask=mask, use_cache=True)
    cache = out.cache
    from transformers.cache_utils import Cache, DummyLayer, DynamicSlidingWindowLayer, LinearAttentionLayer
    assert isinstance(cache, Cache) and cache.get_seq_length() == PROMPT_LEN
    kinds = [type(layer) for layer in cache.layers]
    assert kinds[0] is LinearAttentionLayer and kinds[2] is DummyLayer and kinds[4] is DynamicSlidingWindowLayer
    assert cache.layers[4].keys.shape[2] == 4  # local window 5: only window - 1 keys are kept
    lengths = []  # generate() feeds the prompt once, then one token per step on the cache
    hook = hf.embed.register_forward_pre_hook(lambda mod, args: lengths.append(args[0].shape[1]))
    with torch.no_grad():
        hf.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    hook.remove()
    assert lengths == [PROMPT_LEN, 1, 1, 1]


def test_remote_code_loads_without_braidlm(remote_exports, work, tmp_path):
    """In a fresh interpreter where neither `hybrid` nor `kernels` can be imported (pure PyTorch path)."""
    root, tok = work
    ids, mask, _ = inputs()
    dirs = {name: hf_dir for name, (_, hf_dir, _) in remote_exports.items()}
    text = "Hello world, 12345 naive ünïcode\n  two  spaces"
    script = textwrap.dedent(f"""
        import importlib.util, json, os, sys
        # drop the checkout itself (and the working directory), not paths inside it: a virtualenv made in the
        # clone (`python3 -m venv .venv`) has its site-packages under the repository
        drop = {{os.path.realpath({ROOT!r}), os.path.realpath(os.getcwd())}}
        sys.path = [p for p in sys.path if p and os.path.realpath(p) not in drop]
        # an editable install (pip install -e .) maps our packages through a finder on sys.meta_path: drop it
        sys.meta_path = [f for f in sys.meta_path if "__editable__" not in (getattr(f, "__module__", "") or "")
                         and "__editable__" not in type(f).__module__]
        sys.path_hooks = [h for h in sys.path_hooks if "__editable__" not in (getattr(h, "__module__", "") or "")]
        sys.path_importer_cache.clear()
        assert importlib.util.find_spec("hybrid") is None and importlib.util.find_spec("kernels") is None
        try:
            import hybrid
            raise SystemExit("hybrid is importable")
        except ImportError:
            pass
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        ids, mask = torch.tensor({ids.tolist()}), torch.tensor({mask.tolist()})
        out = {{}}
        for name, path in {dirs!r}.items():
            hf = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
            assert sys.modules[type(hf).__module__]._ops is None, "expected the pure PyTorch path"
            with torch.no_grad():
                gen = hf.generate(ids, attention_mask=mask, max_new_tokens={NEW}, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)
                out[name] = {{"logits": hf(ids).logits.tolist(), "padded": hf(ids, attention_mask=mask).logits.tolist(),
                             "tokens": gen[:, {PROMPT_LEN}:].tolist()}}
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        out["tokenizer"] = tok({text!r})["input_ids"]
        out["decoded"] = tok.decode(out["tokenizer"])
        print("RESULT" + json.dumps(out))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    proc = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.split("RESULT", 1)[1])
    for name, (_, _, ref) in remote_exports.items():
        torch.testing.assert_close(torch.tensor(got[name]["logits"]), torch.tensor(ref["logits"]), atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(got[name]["padded"]), torch.tensor(ref["padded"]), atol=1e-4, rtol=0)
        assert got[name]["tokens"] == ref["tokens"], name
    assert got["tokenizer"] == tok.encode(text) and got["decoded"] == text


def test_remote_round_trip_is_lossless(remote_exports, tmp_path):
    model, hf_dir, _ = remote_exports["jamba"]  # the sharded one
    back, tok = import_hf(hf_dir)
    assert layout_to_dict(back.layout) == layout_to_dict(model.layout) and tok is not None
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    ckpt = import_to_checkpoint(hf_dir, str(tmp_path / "ckpt"))
    assert sorted(os.listdir(ckpt)) == [MANIFEST, "layout.yaml", "model.safetensors", "tokenizer.model"]
    assert main(["--import", hf_dir, str(tmp_path / "ckpt2")]) == 0


# ---------------------------------------------------------------------------------------------- native
NATIVE = {"llama": ("transformer", "LlamaForCausalLM"), "mamba2": ("mamba2", "Mamba2ForCausalLM"),
          "bamba": ("bamba", "BambaForCausalLM")}


@pytest.mark.parametrize("target", list(NATIVE))
def test_native_export_matches_transformers_class(work, tmp_path, target):
    name, arch = NATIVE[target]
    cfg = bamba_layout() if name == "bamba" else LAYOUTS[name]()
    model = make_model(cfg)
    out = str(tmp_path / "hf")
    assert export(model, out, tokenizer=work[1].path, target="auto") == target
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == arch
    ids, _, _ = inputs()
    ones = torch.ones_like(ids)
    with torch.no_grad():
        ours = model(ids)
        torch.testing.assert_close(hf(ids).logits, ours, atol=1e-4, rtol=0)
        gen = hf.generate(ids, attention_mask=ones, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert gen[:, PROMPT_LEN:].tolist() == generate(model, ids.tolist(), max_new_tokens=NEW)
    back, tok = import_hf(out)  # ours -> HF -> ours is lossless
    assert layout_to_dict(back.layout) == layout_to_dict(model.layout) and tok is not None
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(back(ids), ours)


def test_native_checkpoint_from_transformers_imports(tmp_path):
    """A checkpoint made by transformers itself (not by our export) imports with equal logits."""
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "llama")
    model, tok = import_hf(str(tmp_path / "llama"))
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=0)
    assert tok is None


@pytest.mark.parametrize("layout,target,words", [
    ("griffin", "bamba", ["layers.2.kind", "local attention", "window 5"]),
    ("tiny", "llama", ["layers.0.mixer", "mamba2"]),
    ("jamba", "mamba2", ["layers.0.mixer", "mamba1"]),
    ("samba", "bamba", ["layers.0.mixer", "mamba1"]),
    ("nemotron-h", "bamba", ["layers.0.mlp", "SwiGLU"]),
    ("sparse", "llama", ["layers.0.mixer"]),
])
def test_native_export_refuses_what_target_cannot_express(work, tmp_path, layout, target, words):
    ckpt = write_checkpoint(make_model(LAYOUTS[layout]()), work[1].path, tmp_path / "ckpt")
    out = tmp_path / "hf"
    with pytest.raises(ExportError, match=f"cannot export to {target}") as e:
        export(ckpt, str(out), target=target)
    for w in words:
        assert w in str(e.value)
    assert not out.exists() and no_tmp_left(tmp_path)


def test_native_refuses_rope_less_attention(tmp_path):
    cfg = bamba_layout()
    cfg["layers"][5]["rope"] = False
    with pytest.raises(ExportError, match="layers.5.rope"):
        export(make_model(cfg), str(tmp_path / "hf"), target="bamba")
    assert export(make_model(cfg), str(tmp_path / "hf"), target="auto") == "remote"


# ----------------------------------------------------------------------------------------------- jamba
def hf_jamba_config(**kw):
    """A small JambaConfig: 8 layers, attention at 1 and 5, experts at the odd layers (so both attention layers
    are MoE too), GQA, untied embeddings; an eps large enough that a norm run with another one shows."""
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=8, num_attention_heads=4,
                num_key_value_heads=2, attn_layer_period=4, attn_layer_offset=1, expert_layer_period=2,
                expert_layer_offset=1, num_experts=4, num_experts_per_tok=2, mamba_d_state=4, mamba_dt_rank=3,
                rms_norm_eps=1e-2, tie_word_embeddings=False, use_mamba_kernels=False)
    return transformers.JambaConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def hf_jamba(tmp_path_factory):
    """A randomly initialized transformers JambaForCausalLM, its weights moved far from init (norm weights and the
    router included, so every norm and the routing matter), saved by transformers itself."""
    torch.manual_seed(0)
    hf = transformers.JambaForCausalLM(hf_jamba_config()).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if not name.endswith(("A_log", ".D", "dt_proj.bias")):
                p.add_(torch.randn_like(p) * 0.2)
    path = str(tmp_path_factory.mktemp("jamba") / "hf")
    hf.save_pretrained(path)
    return hf, path


def fp64_jamba(hf):
    """A float64 copy of a transformers Jamba, its experts on the eager loop (its grouped_mm default has no fp64)."""
    hf = copy.deepcopy(hf).double()
    hf.set_experts_implementation("eager")
    return hf


def jamba_codes(layout) -> list:
    return [layer.code + (":moe" if layer.mlp.kind == "moe" else "") for layer in layout.layers]


# logits of std ~1: fp32 rounding gives ~3e-5; in fp64 transformers' Jamba still takes its RMSNorms and router
# softmax in fp32 (~7e-6), so fp64 is tighter but not exact
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.float64, 2e-5)], ids=["fp32", "fp64"])
def test_jamba_from_transformers_imports_with_equal_logits(hf_jamba, dtype, atol):
    """A checkpoint transformers wrote (experts saved one tensor each) imports into the same function."""
    hf, path = hf_jamba
    model, tok = import_hf(path)
    assert tok is None and jamba_codes(model.layout) == ["M1", "Ag:moe", "M1", "M1:moe"] * 2
    assert not model.layout.model.tie_embeddings and all(
        l.mamba1.dt_bc_norm for l in model.layout.layers if l.mixer == "mamba1")
    ids, _, _ = inputs()
    ref, ours = (fp64_jamba(hf) if dtype == torch.float64 else hf), model.to(dtype)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=atol, rtol=0)


def test_jamba_import_keeps_training(hf_jamba):
    """The imported model trains on: one AdamW step on the language-model loss plus the router losses moves every
    weight (the dt/B/C norms and the routers included) and lowers the loss on that batch."""
    model, _ = import_hf(hf_jamba[1])
    model.train()
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)  # a weight moves only by its gradient
    loss = model(ids[:, :-1], targets=ids[:, 1:])
    assert torch.isfinite(loss) and model.moe_stats is not None and model.moe_stats[0] > 0  # aux loss of 4 layers
    loss.backward()
    opt.step()
    unchanged = [k for k, v in model.state_dict().items() if torch.equal(v, before[k])]
    assert not unchanged, unchanged
    with torch.no_grad():
        assert model(ids[:, :-1], targets=ids[:, 1:]) < loss


def test_jamba_export_loads_in_transformers_and_round_trips(work, tmp_path):
    """The shipped jamba-moe layout (shrunk: 8 layers, tied embeddings) exported with --target jamba: transformers'
    own class loads it with equal logits (fp32 and fp64) and greedy tokens, and importing it back keeps every
    weight; auto picks jamba for it."""
    model = make_model(shipped("jamba-moe"))
    ckpt = write_checkpoint(model, work[1].path, tmp_path / "ckpt")
    out = str(tmp_path / "hf")
    assert main([ckpt, out, "--target", "jamba"]) == 0
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert (cfg["attn_layer_period"], cfg["attn_layer_offset"], cfg["expert_layer_period"],
            cfg["expert_layer_offset"], cfg["num_experts"], cfg["tie_word_embeddings"]) == (8, 4, 2, 1, 4, True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "JambaForCausalLM"
    ids, _, _ = inputs()
    with torch.no_grad():
        ours = model(ids)
        torch.testing.assert_close(hf(ids).logits, ours, atol=1e-4, rtol=0)
        torch.testing.assert_close(fp64_jamba(hf)(ids).logits, copy.deepcopy(model).double()(ids),
                                   atol=2e-5, rtol=0)
        gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    assert gen[:, PROMPT_LEN:].tolist() == generate(model, ids.tolist(), max_new_tokens=NEW)
    back, tok = import_hf(out)
    assert layout_to_dict(back.layout) == layout_to_dict(model.layout) and tok is not None
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(back(ids), ours)
    assert export(model, str(tmp_path / "auto"), target="auto") == "jamba"


def _moe_fields_off(layer: dict) -> dict:
    return {k: None for k in ("n_experts", "top_k", "n_shared_experts", "router", "norm_topk_prob",
                              "capacity_factor", "aux_loss_weight", "z_loss_weight") if k in layer}


M2_LAYER = dict(mixer="mamba2", d_state=8, d_conv=4, expand=2, headdim=16, ngroups=1, chunk_size=8, mlp="swiglu",
                d_ff=96)
JAMBA_REFUSED = [  # (what is changed in the shrunk jamba-moe layout, the key named, words of the reason)
    ({4: dict(rope=True)}, "layers.4.rope", "no positional encoding"),
    ({4: dict(kind="local", window=5)}, "layers.4.kind", "local attention"),
    ({0: dict(dt_bc_norm=False)}, "layers.0.dt_bc_norm", "normalize dt, B and C"),
    ({1: dict(router="sigmoid")}, "layers.1.router", "softmax over all experts"),
    ({3: dict(norm_topk_prob=True)}, "layers.3.norm_topk_prob", "renormalize"),
    ({1: dict(n_shared_experts=1)}, "layers.1.n_shared_experts", "no shared experts"),
    ({3: dict(n_experts=3)}, "layers.3.n_experts", "differs from layer 1"),
    ({6: dict(mlp="none", d_ff=None)}, "layers.6.mlp", "every Jamba layer has an MLP"),
    ({6: dict(d_ff=64)}, "layers.6.d_ff", "differs from layer 0"),
    ({2: dict(dt_rank=5)}, "layers.2.dt_rank", "differs from layer 0"),
    ({2: M2_LAYER}, "layers.2.mixer", "mamba2 layers are not expressible"),
    ({"moe": 3}, "layers.3.mlp", "breaks the period of the moe layers"),
]


@pytest.mark.parametrize("change,key,words", JAMBA_REFUSED, ids=[r[1] for r in JAMBA_REFUSED])
def test_jamba_export_refuses_what_jamba_cannot_express(tmp_path, change, key, words):
    cfg = shipped("jamba-moe")
    for i, fields in change.items():
        if i == "moe":  # a dense MLP where Jamba's period puts experts
            cfg["layers"][fields].update(mlp="swiglu", **_moe_fields_off(cfg["layers"][fields]))
        elif fields is M2_LAYER:
            cfg["layers"][i] = dict(M2_LAYER)
        else:
            cfg["layers"][i].update(fields)
    model = make_model(cfg)
    with pytest.raises(ExportError, match=f"cannot export to jamba: {key}: ") as e:
        export(model, str(tmp_path / "hf"), target="jamba")
    assert words in str(e.value)
    assert not (tmp_path / "hf").exists() and no_tmp_left(tmp_path)
    assert export(model, str(tmp_path / "auto"), target="auto") == "remote"


def test_native_names_the_stack_index_of_a_differing_field(tmp_path):
    """A field compared over one kind of layer (Bamba's attention layers, at 2 and 5 here) is reported at the
    layer's index in the stack, not its place among the layers of its kind."""
    cfg = bamba_layout()
    cfg["layers"][5]["n_kv_heads"] = cfg["layers"][2]["n_kv_heads"] * 2
    with pytest.raises(ExportError, match="cannot export to bamba: layers.5.n_kv_heads: .* differs from layer 2's"):
        export(make_model(cfg), str(tmp_path / "hf"), target="bamba")


# ------------------------------------------------------------------------------------------ bad inputs
def run_cli(*args, cwd=ROOT):
    """`python -m <args>` as a user runs it: (exit status, stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "BRAIDLM_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    return proc.returncode, proc.stderr


def test_bad_checkpoints_fail_cleanly(work, tmp_path, capsys):
    model = make_model(LAYOUTS["tiny"]())
    ckpt = write_checkpoint(model, work[1].path, tmp_path / "ckpt")
    out = tmp_path / "hf"
    weights = os.path.join(ckpt, "model.safetensors")
    data = open(weights, "rb").read()

    with open(weights, "wb") as f:  # truncated
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: .*truncated"):
        export(ckpt, str(out))
    rc, err = run_cli("interop.export", ckpt, out)
    assert rc == 2 and f"error: {weights}: " in err and "truncated" in err and "Traceback" not in err, err
    os.remove(weights)  # missing
    with pytest.raises(CheckpointError, match="missing model.safetensors .*consolidate"):
        export(ckpt, str(out))
    assert cli(main, [ckpt, str(out)]) == 2 and "missing model.safetensors" in capsys.readouterr().err
    with open(weights, "wb") as f:
        f.write(data)

    layout_yaml = os.path.join(ckpt, "layout.yaml")  # unknown block kind
    cfg = OmegaConf.to_container(OmegaConf.load(layout_yaml))
    cfg["layers"][1]["mixer"] = "mamba3"
    OmegaConf.save(OmegaConf.create(cfg), layout_yaml)
    with pytest.raises(CheckpointError, match="layout.yaml: .*layers.1.mixer"):
        export(ckpt, str(out))
    assert not out.exists() and no_tmp_left(tmp_path)
    assert cli(main, [str(tmp_path / "nope"), str(out)]) == 2
    assert "nope: no such directory" in capsys.readouterr().err


def test_bad_hf_directories_fail_cleanly(remote_exports, tmp_path):
    import shutil
    _, src, _ = remote_exports["tiny"]
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    with open(bad / "config.json") as f:
        cfg = json.load(f)
    cfg["layout"]["layers"][0]["mixer"] = "rwkv"
    with open(bad / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ExportError, match="layers.0.mixer"):
        import_hf(str(bad))
    with pytest.raises(ValueError, match="unknown block kind 'rwkv'"):  # the remote config says it too
        transformers.AutoModelForCausalLM.from_pretrained(str(bad), trust_remote_code=True)
    with pytest.raises(ExportError, match="layers.0.mixer"):
        import_to_checkpoint(str(bad), str(tmp_path / "ckpt"))
    assert not (tmp_path / "ckpt").exists() and no_tmp_left(tmp_path)

    shutil.copyfile(os.path.join(src, "config.json"), bad / "config.json")
    data = open(bad / "model.safetensors", "rb").read()
    with open(bad / "model.safetensors", "wb") as f:
        f.write(data[:100])
    with pytest.raises(CheckpointError, match="model.safetensors: .*truncated"):
        import_to_checkpoint(str(bad), str(tmp_path / "ckpt"))
    assert not (tmp_path / "ckpt").exists() and no_tmp_left(tmp_path)


def test_existing_output_is_left_alone(work, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export(make_model(LAYOUTS["tiny"]()), str(out))
    assert cli(main, ["--max-shard-size", "2 gigabytes", str(tmp_path), str(tmp_path / "new")]) == 2
    assert "max shard size '2 gigabytes'" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]


# ------------------------------------------------------------------------------------- --overwrite
@pytest.fixture
def tiny_ckpt(work, tmp_path):
    return write_checkpoint(make_model(LAYOUTS["tiny"]()), work[1].path, tmp_path / "ckpt")


@pytest.mark.parametrize("importing", [False, True], ids=["export", "import"])
def test_overwrite_refuses_a_directory_that_is_not_an_export(remote_exports, tiny_ckpt, tmp_path, importing):
    """The reported data loss: --overwrite on a directory holding the user's own files must not delete them."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("not ours")
    (out / "config.json").write_text("{}")  # a name an export also writes
    source = remote_exports["tiny"][1] if importing else tiny_ckpt
    rc, err = run_cli("interop.export", *(["--import"] if importing else []), source, out, "--overwrite")
    assert rc == 2 and "Traceback" not in err, err
    assert f"{out}: not a previous braidlm export" in err and "config.json, notes.txt" in err
    assert sorted(os.listdir(out)) == ["config.json", "notes.txt"] and (out / "notes.txt").read_text() == "not ours"
    assert no_tmp_left(tmp_path)


def test_overwrite_replaces_a_previous_export(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main([tiny_ckpt, str(out), "--max-shard-size", "40KB"]) == 0
    first = set(os.listdir(out))
    assert "model.safetensors.index.json" in first
    manifest = json.loads((out / MANIFEST).read_text())
    assert set(manifest["files"]) == first - {MANIFEST}

    assert main([tiny_ckpt, str(out), "--overwrite"]) == 0  # our files only: the directory is swapped whole
    second = set(os.listdir(out))
    assert "model.safetensors" in second and not [n for n in second if n.startswith("model-")]  # old shards gone

    (out / "README.md").write_text("model card")  # a file the user added beside the export is kept
    assert main([tiny_ckpt, str(out), "--max-shard-size", "40KB", "--overwrite"]) == 0
    assert set(os.listdir(out)) == first | {"README.md"} and (out / "README.md").read_text() == "model card"
    assert "README.md" not in json.loads((out / MANIFEST).read_text())["files"]

    (out / "README.md").rename(out / "model.safetensors")  # ... but never replaced by one of ours
    assert cli(main, [tiny_ckpt, str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors would be overwritten but were not written by the previous export" in err
    assert (out / "model.safetensors").read_text() == "model card" and no_tmp_left(tmp_path)


def test_overwrite_replaces_a_previous_import(remote_exports, tmp_path, capsys):
    hf_dir = remote_exports["tiny"][1]
    out = tmp_path / "ckpt"
    assert main(["--import", hf_dir, str(out)]) == 0
    assert cli(main, ["--import", hf_dir, str(out)]) == 2 and "--overwrite" in capsys.readouterr().err
    (out / "notes.txt").write_text("mine")
    before = (out / "model.safetensors").stat().st_ino
    assert main(["--import", hf_dir, str(out), "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == [MANIFEST, "layout.yaml", "model.safetensors", "notes.txt", "tokenizer.model"]
    assert (out / "model.safetensors").stat().st_ino != before and (out / "notes.txt").read_text() == "mine"
    assert cli(main, [str(out), str(out), "--overwrite"]) == 2  # exporting the imported checkpoint onto itself
    assert "holds a braidlm checkpoint directory" in capsys.readouterr().err
    assert (out / "layout.yaml").exists() and no_tmp_left(tmp_path)


@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_written_files_honour_the_umask(work, remote_exports, tmp_path, mask):
    """safetensors writes its files 0600 (through a temporary file); everything we write gets the umask's mode."""
    from training import checkpoint
    old = os.umask(mask)
    try:
        model = make_model(LAYOUTS["tiny"]())
        export(model, str(tmp_path / "hf"), tokenizer=work[1].path, max_shard_size="40KB")
        import_to_checkpoint(remote_exports["tiny"][1], str(tmp_path / "imported"))
        tmp = checkpoint.begin(str(tmp_path / "checkpoints"), 1)
        save_model(model, os.path.join(tmp, "model.safetensors"))
        checkpoint.commit(str(tmp_path / "checkpoints"), tmp, 1, keep=0)
    finally:
        os.umask(old)
    seen = 0
    for parent, dirs, files in os.walk(tmp_path):
        for name in dirs:
            assert os.stat(os.path.join(parent, name)).st_mode & 0o777 == 0o777 & ~mask, os.path.join(parent, name)
        for name in files:
            assert os.stat(os.path.join(parent, name)).st_mode & 0o777 == 0o666 & ~mask, os.path.join(parent, name)
            seen += name.endswith(".safetensors")
    assert seen >= 4  # shards of the export, the import and the checkpoint
