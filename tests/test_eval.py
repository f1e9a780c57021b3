"""The eval commands on CPU with tiny models: data generators, scoring against direct computation, and each
command's main() with --quick writing its markdown and plots (into a run folder by default, never into the
recorded eval/results/, and without matplotlib a markdown that says the plots were not drawn)."""
import json
import os
import sys

import pytest
import torch

from eval import lm_eval_adapter, perplexity, plots, recall, sizing, speed
from hybrid import HybridLM, load_layout
from training.checkpoint import save_model
from hybrid.errors import ConfigError, cli
from training.data import TokenStream
from hybrid.layout import layout_to_dict
from training.tokenizer import Tokenizer

HAVE_MPL = __import__("importlib").util.find_spec("matplotlib") is not None
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "layouts", "tiny.yaml")
SMALL = ["model.d_model=32", "model.max_seq_len=64", "defaults.attention.n_heads=2", "defaults.attention.n_kv_heads=1",
         "defaults.attention.window=8", "defaults.mamba2.headdim=16", "defaults.mamba2.d_state=8",
         "defaults.mamba2.chunk_size=16", "defaults.mlp.d_ff=64"]
TEXT = ("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. Rivers run to the sea, and the "
        "sea gives rain back to the hills. Numbers such as 12345 and 67890 are written digit by digit. ")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "tok.model")
    docs = [TEXT * 3 + f"Document {i} ends here." for i in range(40)]
    return Tokenizer.train(docs, 320, path)


def tiny_model(vocab, extra=()):
    torch.manual_seed(0)
    return HybridLM(load_layout(TINY, SMALL + [f"model.vocab_size={vocab}"] + list(extra))).eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok):
    """A train.py-shaped run directory: <out>/checkpoints/step_00000001 + <out>/data/<hash>/heldout.bin."""
    out = tmp_path_factory.mktemp("run")
    d = out / "checkpoints" / "step_00000001"
    d.mkdir(parents=True)
    model = tiny_model(tok.vocab_size)
    save_model(model, str(d / "model.safetensors"))
    from omegaconf import OmegaConf
    OmegaConf.save(OmegaConf.create(layout_to_dict(model.layout)), str(d / "layout.yaml"))
    with open(tok.path, "rb") as src, open(d / "tokenizer.model", "wb") as dst:
        dst.write(src.read())
    (d / "trainer.json").write_text(json.dumps({"step": 1, "config": {"out_dir": str(out)}}))
    docs = [tok.encode(TEXT * (1 + i % 3)) for i in range(6)]
    TokenStream.from_docs(docs, tok.eos_id).save(str(out / "data" / "abc123" / "heldout"), tok.vocab_size)
    return str(d)


def _pngs(md_path):
    folder = os.path.dirname(md_path)
    text = open(md_path).read()
    names = [line.split("](")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    return text, [os.path.join(folder, n) for n in names]


# ------------------------------------------------------------------------------------------------- recall

def test_mqar_batch_answers_are_the_pairs_values():
    vocab = recall.Vocab(64)
    ids, targets = recall.mqar_batch(16, 5, 40, vocab, torch.Generator().manual_seed(0))
    assert ids.shape == targets.shape == (16, 40)
    for row, tgt in zip(ids.tolist(), targets.tolist()):
        pairs = dict(zip(row[0:10:2], row[1:10:2]))
        assert len(pairs) == 5 and all(1 <= k <= vocab.n_keys < v for k, v in pairs.items())
        asked = [t for t in range(40) if tgt[t] != -100]
        assert len(asked) == 5 and all(t >= 10 for t in asked)
        for t in asked:
            assert tgt[t] == pairs[row[t]] == row[t + 1]   # the answer is the stored value and follows the key
        others = [row[t] for t in range(10, 40) if t not in asked and t - 1 not in asked]
        assert set(others) <= {recall.FILLER}
    with pytest.raises(ValueError, match="do not fit"):
        recall.mqar_batch(2, 8, 30, vocab, torch.Generator())


def test_passkey_batch_places_one_pair_and_asks_it_last():
    vocab = recall.Vocab(64)
    ids, targets = recall.passkey_batch(4, 50, 0.5, vocab, torch.Generator().manual_seed(0))
    assert (targets[:, :-1] == -100).all()
    at = int(0.5 * 47)
    assert torch.equal(ids[:, at], ids[:, -1]) and torch.equal(ids[:, at + 1], targets[:, -1])
    assert int((ids != recall.FILLER).sum()) == 4 * 3


def test_recall_main_quick(tmp_path):
    out = str(tmp_path / "recall.md")
    assert recall.main(["--quick", "--out", out]) == 0
    text, pngs = _pngs(out)
    assert "Command: `python -m eval.recall --quick" in text and "## MQAR accuracy" in text
    for label in ("mamba2:M2", "transformer:Ag", "griffin:M2 Aw"):
        assert f"| {label} |" in text
    if HAVE_MPL:
        assert len(pngs) == 4 and all(os.path.getsize(p) > 1000 for p in pngs)


def test_recall_units_in_processes_keep_each_layouts_best_lr(tmp_path):
    out = str(tmp_path / "recall.md")
    args = recall.parse_args(["--quick", "--layouts", "mamba2:M2", "transformer:Ag", "--lr", "1e-3", "3e-2",
                              "--jobs", "2", "--out", out])
    res = recall.run(args)
    assert [(r["label"], r["lr"]) for r in res["runs"]] == [("mamba2:M2", 1e-3), ("mamba2:M2", 3e-2),
                                                            ("transformer:Ag", 1e-3), ("transformer:Ag", 3e-2)]
    for m in res["models"]:
        mine = [r for r in res["runs"] if r["label"] == m["label"]]
        assert m["acc"] == max(r["acc"] for r in mine) and m in mine
        assert len(m["losses"]) == 10 or len(m["losses"]) == args.steps
        # the grid and passkey rows are those of the kept run: one row per cell, none from the other lr
        cells = [(r["pairs"], r["length"]) for r in res["grid"] if r["label"] == m["label"]]
        assert len(cells) == len(set(cells)) > 0
    text = recall.report(res, args, [])
    assert text.count("| mamba2:M2 | 0.001 |") == 1 and "| transformer:Ag | 0.03 |" in text


def test_recall_cache_skips_finished_units_and_rebuilds_the_same_tables(tmp_path, monkeypatch):
    cache, out = str(tmp_path / "runs.jsonl"), str(tmp_path / "recall.md")
    base = ["--quick", "--layouts", "mamba2:M2", "transformer:Ag", "--cache", cache, "--out", out]
    first = recall.run(recall.parse_args(base + ["--only", "transformer:Ag"]))
    assert [m["label"] for m in first["models"]] == ["transformer:Ag"]    # --only: the other is not trained
    second = recall.run(recall.parse_args(base))                          # trains mamba2 only
    assert second["cached"] == 1 and [m["label"] for m in second["models"]] == ["mamba2:M2", "transformer:Ag"]

    def no_training(*a, **k):
        raise AssertionError("a cached unit was trained again")
    monkeypatch.setattr(recall, "train_mqar", no_training)
    args = recall.parse_args(base)
    third = recall.run(args)
    assert third["cached"] == 2
    for key in ("models", "grid", "passkey"):
        assert third[key] == second[key]
    assert "2 of the 2 (layout, lr) runs were read from" in recall.report(third, args, [])
    # other settings are other units: a changed --seed is not served from the cache
    with pytest.raises(AssertionError, match="trained again"):
        recall.run(recall.parse_args(base + ["--seed", "1"]))


def test_recall_rejects_bad_unit_selections():
    with pytest.raises(ConfigError, match="--layout-lr 'nope=1e-3'"):
        recall.parse_args(["--quick", "--layout-lr", "nope=1e-3"])
    with pytest.raises(ConfigError, match="--layout-lr"):
        recall.parse_args(["--layouts", "mamba2:M2", "--layout-lr", "mamba2:M2=fast"])
    assert recall.parse_args(["--layouts", "mamba2:M2", "--layout-lr", "mamba2:M2=1e-3,1e-2"]).layout_lr == \
        {"mamba2:M2": [1e-3, 1e-2]}
    assert cli(recall.main, ["--quick", "--only", "transformer:Ag x 9"]) == 2


def test_text_passkey_runs_on_a_checkpoint(ckpt, tmp_path):
    model, tok = perplexity.load_checkpoint(ckpt)
    import random
    hit = recall.text_passkey(model, tok, 60, 0.5, random.Random(0))
    assert hit in (True, False)


# -------------------------------------------------------------------------------------------------- speed

def test_match_params_lands_near_the_target():
    over = ["model.vocab_size=256", "defaults.mamba2.headdim=16"]
    target = sizing.n_params(sizing.sized_layout("transformer:Ag x 2", over, 96, 16))
    got = sizing.match_params("mamba2:M2 x 2", target, over, head_dim=16)
    assert abs(sizing.n_params(got) - target) / target < 0.1
    assert got.model.d_model != 96


def test_cache_is_flat_in_length_for_local_attention_and_grows_for_global():
    local = tiny_model(64, ["layers=M2 Aw"])
    glob = tiny_model(64, ["layers=M2 Ag"])
    assert local.allocate_cache(2, 64).nbytes() == local.allocate_cache(2, 4096).nbytes()
    assert glob.allocate_cache(2, 4096).nbytes() > glob.allocate_cache(2, 64).nbytes()


def test_fill_cache_leaves_the_cache_a_real_prefill_would():
    model = tiny_model(64, ["layers=Aw Ag"])
    real = model.allocate_cache(1, 40)
    model(torch.randint(0, 64, (1, 30)), cache=real)
    fake = model.allocate_cache(1, 40)
    speed.fill_cache(fake, 30, chunk=7)
    assert torch.equal(real.seqlens, fake.seqlens)
    for a, b in zip(real.layers, fake.layers):
        assert torch.equal(a.pos, b.pos)   # same slots hold the same positions (ring wrap included)


def test_hf_baseline_is_our_transformer_at_the_same_size():
    lay = sizing.sized_layout("transformer:Ag x 2", ["model.vocab_size=128", "defaults.mlp.d_ff=64"], 32, 16)
    hf = speed.hf_llama(lay, torch.float32, "cpu")
    assert sum(p.numel() for p in hf.parameters()) == sizing.n_params(lay)
    ours = HybridLM(lay).eval()
    # the same weights give the same logits: the competitor is the same architecture, not a look-alike
    sd = {"model.embed_tokens.weight": ours.embed.weight, "model.norm.weight": ours.norm.weight}
    for i, b in enumerate(ours.blocks):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = b.mixer_norm.weight
        sd[p + "post_attention_layernorm.weight"] = b.mlp_norm.weight
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{n}.weight"] = getattr(b.mixer, n).weight
        for n in ("gate_proj", "up_proj", "down_proj"):
            sd[p + f"mlp.{n}.weight"] = getattr(b.mlp, n).weight
    hf.load_state_dict(sd, strict=False)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)


def test_speed_decode_floor_counts_weights_states_and_visible_keys():
    """The bytes floor of a decode step: weights once, SSM/conv states twice, the K/V a token can see: all L
    tokens for global attention, only the window for local attention."""
    lay = sizing.sized_layout("transformer:Ag", ["model.vocab_size=128", "defaults.mlp.d_ff=64"], d_model=32,
                              head_dim=16)
    local = sizing.sized_layout("transformer:Aw", ["model.vocab_size=128", "defaults.mlp.d_ff=64",
                                                   "defaults.attention.window=16"], d_model=32, head_dim=16)
    w = sizing.n_params(lay) * 2
    a = lay.layers[0].attention
    kv = lambda seen: 2 * seen * a.n_kv_heads * a.head_dim * 2 * 2  # batch 2, K and V, bf16
    assert speed.decode_floor_bytes(lay, 2, 100, 2) == w + kv(101)
    assert speed.decode_floor_bytes(local, 2, 100, 2) == w + kv(16)
    ssm = sizing.sized_layout("mamba2:M2", ["model.vocab_size=128"], d_model=32, head_dim=16)
    s = ssm.layers[0].mamba2
    assert speed.decode_floor_bytes(ssm, 1, 100, 2) == sizing.n_params(ssm) * 2 + 2 * (
        s.conv_dim * (s.d_conv - 1) * 2 + s.nheads * s.headdim * s.d_state * 4)


def test_speed_main_quick(tmp_path):
    out = str(tmp_path / "speed.md")
    assert speed.main(["--quick", "--lengths", "32", "64", "--batches", "2", "--hf-baseline", "--prefill-chunk", "24",
                       "--out", out]) == 0
    text, pngs = _pngs(out)
    assert "## Decode" in text and "## Prefill" in text and "hf-llama" in text and "x the tokens/s of" in text
    hf_rows = [line for line in text.splitlines() if line.startswith("| hf-llama") and "LlamaForCausalLM" not in line
               and "StaticCache" in line]
    assert len(hf_rows) == 2
    assert "x floor" in text and "TFLOP/s" in text
    assert len([line for line in text.split("## Prefill")[1].splitlines() if line.startswith("| hf-llama")]) == 2
    rows = [line for line in text.splitlines() if line.startswith("| tiny |") and "eager" in line]
    assert len(rows) == 2 and rows[0].split("|")[6] == rows[1].split("|")[6]   # tiny:M2 Aw: same cache bytes
    scaling = text.split("## Scaling")[1].split("\n## ")[0].splitlines()
    growth = {line.split("|")[1].strip(): line.split("|")[3].strip() for line in scaling
              if line.startswith("| ") and not line.startswith("| layout")}
    assert growth["tiny"].startswith("1.00x") and not growth["transformer"].startswith("1.00x")
    if HAVE_MPL:
        assert len(pngs) == 3 and all(os.path.getsize(p) > 1000 for p in pngs)


# --------------------------------------------------------------------------------------------- perplexity

def test_perplexity_buckets_add_up_to_the_training_loss(ckpt):
    from training.data import packed_batch
    from hybrid.model import lm_loss
    import numpy as np
    model, tok = perplexity.load_checkpoint(ckpt)
    stream, source = perplexity.heldout_stream(ckpt, tok, None)
    assert source.endswith("heldout.bin")
    res = perplexity.evaluate(model, stream, 48, 2, 96, torch.device("cpu"))
    ids, targets, seq_idx = packed_batch(stream, np.array([0, 48]), 48)
    with torch.no_grad():
        want = lm_loss(model(ids, seq_idx=seq_idx), targets).item()
    assert res["tokens"] == int((targets != -100).sum())
    assert res["loss_sum"].sum() / res["count"].sum() == pytest.approx(want, rel=1e-5)
    assert res["count"][0] == int((targets[:, :1] != -100).sum()) + int((seq_idx[:, 1:] != seq_idx[:, :-1]).sum())


def test_perplexity_main_quick(ckpt, tmp_path):
    out = str(tmp_path / "ppl.md")
    assert perplexity.main([ckpt, "--quick", "--out", out]) == 0
    text, pngs = _pngs(out)
    assert "perplexity" in text and "## By position" in text
    if HAVE_MPL:
        assert len(pngs) == 1 and os.path.getsize(pngs[0]) > 1000
    assert cli(perplexity.main, [str(tmp_path), "--out", out]) == 2   # not a checkpoint: an error naming the files


# ---------------------------------------------------------------------------------------------- lm-eval

def test_scorer_matches_a_direct_forward_and_padding_changes_nothing(ckpt):
    model, tok = perplexity.load_checkpoint(ckpt)
    s = lm_eval_adapter.Scorer(model, tok, batch_size=4)
    pairs = [("The quick brown fox", " jumps over"), ("A stitch", " in time saves nine."), ("", "Rivers run")]
    batched = s.loglikelihood(pairs)
    for (ctx, cont), (lp, greedy) in zip(pairs, batched):
        c, k = s._encode_pair(ctx, cont)
        ids = torch.tensor([c + k])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids)[0, :-1].float(), -1)
        tgt = ids[0, 1:]
        want = logp.gather(-1, tgt[:, None])[-len(k):].sum().item()
        assert lp == pytest.approx(want, abs=1e-4)
        assert greedy == bool((logp.argmax(-1) == tgt)[-len(k):].all())
    # rolling with a window that holds the whole text is the loglikelihood of the text from EOS
    assert s.rolling(["Rivers run"])[0] == pytest.approx(batched[2][0], abs=1e-4)
    short = lm_eval_adapter.Scorer(model, tok, batch_size=4, max_length=8)
    long_text = TEXT
    n = len(tok.encode(long_text))
    assert n > 16 and short.rolling([long_text])[0] < 0


def test_scorer_generate_cuts_at_until(ckpt):
    model, tok = perplexity.load_checkpoint(ckpt)
    s = lm_eval_adapter.Scorer(model, tok)
    full = s.generate(["The quick brown"], max_gen_toks=6)[0]
    assert isinstance(full, str)
    if full.strip():
        ch = full.strip()[0]
        assert s.generate(["The quick brown"], until=[ch], max_gen_toks=6)[0] == full[:full.find(ch)]


def test_lm_eval_runs_a_local_task(ckpt, tmp_path):
    pytest.importorskip("lm_eval")
    data = tmp_path / "qa.jsonl"
    rows = [{"question": "The quick brown fox", "choices": [" jumps over", " sea gives"], "answer": 0},
            {"question": "A stitch in", "choices": [" time", " dog"], "answer": 0}]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "tiny_local.yaml").write_text(
        "task: tiny_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(data) + "\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    out = str(tmp_path / "lm_eval.md")
    assert lm_eval_adapter.main([ckpt, "--tasks", "tiny_local", "--include-path", str(tmp_path), "--out", out]) == 0
    text = open(out).read()
    assert "| tiny_local | acc |" in text and "Command: `python -m eval.lm_eval_adapter" in text
    # the LM API on request objects (lm-eval's Instance carries its arguments in .args)
    from types import SimpleNamespace as Req
    model, tok = perplexity.load_checkpoint(ckpt)
    lm = lm_eval_adapter.BraidLM.from_model(model, tok)
    (lp, _), = lm.loglikelihood([Req(args=("A stitch in", " time"))])
    assert lp == pytest.approx(lm_eval_adapter.Scorer(model, tok).loglikelihood([("A stitch in", " time")])[0][0])
    assert lm.loglikelihood_rolling([Req(args=("Rivers run",))])[0] < 0
    assert isinstance(lm.generate_until([Req(args=("The quick", {"until": ["."], "max_gen_toks": 4}))])[0], str)


# ------------------------------------------------------------------------------------- where results go

def _snapshot(folder):
    return {name: (os.stat(os.path.join(folder, name)).st_mtime_ns, os.path.getsize(os.path.join(folder, name)))
            for name in sorted(os.listdir(folder))}


def _git_status(path):
    import subprocess
    try:
        return subprocess.run(["git", "status", "--porcelain", path], cwd=ROOT, capture_output=True, text=True,
                              timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def test_quick_commands_write_a_run_folder_and_leave_the_recorded_results_alone(ckpt, tmp_path, monkeypatch,
                                                                                 capsys):
    results = plots.RESULTS_DIR
    before, status = _snapshot(results), _git_status(results)
    monkeypatch.chdir(tmp_path)
    assert speed.main(["--quick", "--lengths", "32", "--batches", "1"]) == 0
    assert perplexity.main([ckpt, "--quick"]) == 0
    assert recall.main(["--quick", "--layouts", "mamba2:M2"]) == 0
    out = capsys.readouterr().out
    for command in ("speed", "perplexity", "recall"):
        md = os.path.join("runs", "eval", command, f"{command}.md")
        assert f"wrote {md}" in out
        text, pngs = _pngs(str(tmp_path / md))
        assert f"Command: `python -m eval.{command} " in text
        if HAVE_MPL:
            assert pngs and all(os.path.isfile(p) for p in pngs)
    assert _snapshot(results) == before and _git_status(results) == status


@pytest.mark.parametrize("module", ["perplexity", "speed", "recall", "lm_eval_adapter", "bench_kernels",
                                    "bench_attention", "bench_training", "bench_ssd", "bench_selective_scan",
                                    "bench_conv_norm", "bench_moe", "bench_linear", "kernel_stats"])
def test_every_command_defaults_to_a_run_folder(module, capsys):
    import importlib
    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"eval.{module}").main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())   # argparse wraps the help
    assert f"runs/eval/{module.replace('_adapter', '')}/" in text and "--out eval/results/" in text
    assert "--debug" in text


@pytest.fixture
def no_matplotlib(monkeypatch):
    """`import matplotlib` fails, as after `pip install -e .[cpu]`."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)


def _says_not_drawn(text, names):
    note = [line for line in text.splitlines() if line.startswith("Plots not drawn")]
    assert len(note) == 1 and 'pip install -e ".[plots]"' in note[0]
    assert all(f"`{n}`" in note[0] for n in names)
    assert not any(line.startswith("![") for line in text.splitlines())


def test_without_matplotlib_the_commands_succeed_and_say_which_plots_were_not_drawn(ckpt, tmp_path, no_matplotlib):
    out = str(tmp_path / "speed.md")
    assert speed.main(["--quick", "--lengths", "32", "--batches", "1", "--out", out]) == 0
    _says_not_drawn(open(out).read(), ["speed_decode_b1.png", "speed_cache_b1.png", "speed_prefill.png"])
    out = str(tmp_path / "recall.md")
    assert recall.main(["--quick", "--layouts", "mamba2:M2", "--out", out]) == 0
    _says_not_drawn(open(out).read(), ["recall_mqar_loss.png", "recall_mqar.png", "recall_mqar_pairs.png",
                                       "recall_passkey.png"])
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".png")]


def test_without_matplotlib_a_rewritten_file_still_names_the_plots_it_linked(ckpt, tmp_path, monkeypatch):
    out = str(tmp_path / "ppl.md")
    if HAVE_MPL:   # an earlier run with matplotlib linked its plot
        assert perplexity.main([ckpt, "--quick", "--out", out]) == 0
        assert _pngs(out)[1] == [str(tmp_path / "ppl_by_position.png")]
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    assert perplexity.main([ckpt, "--quick", "--out", out]) == 0
    _says_not_drawn(open(out).read(), ["ppl_by_position.png"])


# --------------------------------------------------------------------------- the benchmark harness (CPU parts)

from eval import bench_attention, bench_conv_norm, bench_kernels, bench_selective_scan, bench_ssd, harness  # noqa: E402
from eval.harness import CEILINGS, Budget, Ceilings, Work  # noqa: E402

H100 = CEILINGS["H100"]  # the rates of the recorded results (eval/results/kernels.md, attention.md)


def test_floor_of_a_copy_is_its_bytes_at_the_copy_bandwidth():
    ceil = Ceilings("test", copy_bytes=2e12, gemm_flops=1e15)
    assert ceil.floor_ms(Work(bytes=4e9)) == (2.0, {"bytes": 2.0})
    assert ceil.floor_ms(Work()) == (0.0, {})


def test_floor_is_the_slowest_part_and_names_each():
    ceil = Ceilings("test", copy_bytes=1e12, gemm_flops=1e15, fp32_flops=1e13, exps=1e12)
    total, parts = ceil.floor_ms(Work(bytes=1e9, tensor_flops=3e12, fp32_flops=1e10, exps=5e8))
    assert parts == pytest.approx({"bytes": 1.0, "tensor FLOPs": 3.0, "fp32 FLOPs": 1.0, "exps": 0.5})
    assert total == pytest.approx(3.0)
    assert ceil.floor_line("fwd", Work(bytes=1e9)) == "floor fwd: 1.000 ms (bytes 1.000)"


def test_ceilings_by_device_name_measured_for_an_unknown_gpu_and_overridden():
    def measure(name):
        return Ceilings(name, copy_bytes=1e12, gemm_flops=1e14, source="measured")
    assert harness.resolve_ceilings("NVIDIA H200") == CEILINGS["H200"]
    assert harness.resolve_ceilings("NVIDIA H100 80GB HBM3") == H100
    assert harness.resolve_ceilings("NVIDIA H100 80GB HBM3", "H200") == CEILINGS["H200"]
    assert harness.resolve_ceilings("NVIDIA A10", measure=measure).copy_bytes == 1e12
    assert harness.resolve_ceilings("NVIDIA H200", "measure", measure=measure).source == "measured"
    c = harness.resolve_ceilings("NVIDIA H200", copy_tbs=4.0, gemm_tflops=700)
    assert (c.copy_bytes, c.gemm_flops) == (4.0e12, 700e12) and "--copy-tbs" in c.source and "--gemm-tflops" in c.source
    assert "4.00 TB/s" in c.describe() and "700 TFLOP/s" in c.describe()
    with pytest.raises(ConfigError, match="--copy-tbs and --gemm-tflops"):
        harness.resolve_ceilings("NVIDIA A10")


def test_ssd_floors_reproduce_the_recorded_ones():
    """eval/results/kernels.md (H100 rates): fwd 0.141 ms (bytes 0.141, FLOPs 0.107), fwd+bwd 0.459 (0.358, 0.459)."""
    fwd, train = (H100.floor_ms(bench_ssd.work(8, 4096, t)) for t in (False, True))
    assert (round(fwd[0], 3), round(fwd[1]["bytes"], 3), round(fwd[1]["tensor FLOPs"], 3)) == (0.141, 0.141, 0.107)
    assert (round(train[0], 3), round(train[1]["bytes"], 3), round(train[1]["tensor FLOPs"], 3)) == (0.459, 0.358, 0.459)
    assert H100.floor_ms(bench_ssd.work(2, 16384, True)) == train  # same tokens, same floor


def test_selective_scan_conv_norm_and_attention_floors_reproduce_the_recorded_ones():
    fwd, train = (H100.floor_ms(bench_selective_scan.work(8, 4096, t)) for t in (False, True))
    assert {k: round(v, 3) for k, v in fwd[1].items()} == {"bytes": 0.269, "fp32 FLOPs": 0.161, "exps": 0.385}
    assert {k: round(v, 3) for k, v in train[1].items()} == {"bytes": 0.740, "fp32 FLOPs": 0.725, "exps": 0.770}
    floors = {op: [round(H100.floor_ms(w)[0], 3) for w in works] for op, works in bench_conv_norm.WORK.items()}
    assert floors == {"conv": [0.145, 0.364], "norm": [0.201, 0.537]}
    assert [round(H100.floor_ms(bench_attention.attention_work(L, 1024))[0], 3) for L in (2048, 8192)] == [0.061, 0.307]
    decode = H100.floor_ms(bench_attention.decode_work(64, 4097, 4096, 8, 128))[0]
    assert round(decode * 1e3, 1) == 358.6  # µs: the global row of eval/results/attention.md


def test_decode_time_rows():
    rows = bench_kernels.time_rows("op", "B1", {"ours": 2.0, "ref": 8.0}, nbytes=4e9, copy=1.0, floor=1.5)
    assert rows == [("op", "B1", "ours", "2000.0", "2,000", "50%", "75%"),
                    ("op", "B1", "ref", "8000.0", "500", "12%", "19%"),
                    ("op", "B1", "device copy, same bytes", "1000.0", "", "100%", "")]


def test_ssd_table_rows_and_floors():
    rows = [("triton (ours)", 8, 4096, 0.824, 3.576, 0.808, 3.436),
            ("reference (PyTorch, autograd)", 8, 4096, 15.941, 50.677, float("nan"), float("nan"))]
    text = bench_ssd.table(rows, H100, {"chunk_out": {"BT": 64}})
    assert "| triton (ours) | 8 x 4096 | 0.824 | 3.576 | 0.808 | 3.436 | 17% | 13% |" in text  # graph times
    assert "| reference (PyTorch, autograd) | 8 x 4096 | 15.941 | 50.677 | nan | nan | 1% | 1% |" in text
    assert "floor fwd+bwd at 2 x 16384: 0.459 ms (bytes 0.358, tensor FLOPs 0.459)" in text
    assert "TUNING {'chunk_out': {'BT': 64}}" in text


def test_greedy_sweep_keeps_what_is_faster_skips_failures_and_stops_at_the_budget(capsys):
    cost = {("a", 1): 10.0, ("a", 2): 8.0, ("a", 3): 7.95, ("b", 1): 5.0}

    def trial(cfg):
        if cfg["b"] == 2:
            raise RuntimeError("out of resources")
        return cost[("a", cfg["a"])] - (5.0 if cfg["b"] == 1 and cfg["a"] == 2 else 0.0)
    best, ms = harness.greedy({"a": 1, "b": 0}, [("a", [2, 3]), ("b", [2, 1])], trial, Budget(60))
    assert (best, ms) == ({"a": 2, "b": 1}, 3.0)  # a=3 is < 1% faster than a=2: not kept
    out = capsys.readouterr().out
    assert "sweep b=2: failed RuntimeError: out of resources" in out and "sweep b=1: 3.000 ms (kept)" in out
    clock = iter([0.0, 0.0, 100.0, 100.0])
    best, _ = harness.greedy({"a": 1, "b": 0}, [("a", [2, 3])], trial, Budget(60, clock=lambda: next(clock)))
    assert best == {"a": 2, "b": 0} and "time budget spent" in capsys.readouterr().out


def test_best_of():
    def trial(c):
        if c == "bad":
            raise ValueError("no")
        return {"x": 3.0, "y": 1.0, "z": 2.0}[c]
    assert harness.best_of(["x", "bad", "y", "z"], trial, Budget(60)) == (1.0, "y")
    assert harness.best_of(["x"], trial, Budget(-1)) == (float("inf"), None)


def test_flat_tuning_round_trip():
    tuning = {"fwd": {"BT": 64, "num_warps": 4}, "bwd": {"BT": 32}}
    assert harness.flat(tuning) == {"fwd.BT": 64, "fwd.num_warps": 4, "bwd.BT": 32}
    harness.set_flat(tuning, {"bwd.BT": 128, "fwd.num_warps": 8})
    assert tuning == {"fwd": {"BT": 64, "num_warps": 8}, "bwd": {"BT": 128}}


def test_the_sweeps_name_settings_the_kernels_have():
    """A renamed TUNING entry must not leave a sweep setting a key no kernel reads."""
    pytest.importorskip("triton")
    from kernels.conv1d import triton_conv
    from kernels.norm import triton_norm
    from kernels.selective_scan import triton_scan as selective
    from kernels.ssd import triton_scan as ssd
    assert {key for key, _ in bench_ssd.SWEEP} <= set(harness.flat(ssd.TUNING))
    assert {"fwd.BLOCK_T", "fwd.BLOCK_D", "fwd.num_warps", "bwd.BLOCK_D", "bwd.num_warps"} <= set(
        harness.flat(selective.TUNING))
    assert {"fwd.num_warps", "bwd.num_warps", "bwd.programs_per_sm"} <= set(harness.flat(triton_norm.TUNING))
    assert {"fwd", "bwd_dpre", "bwd_dx"} <= set(triton_conv.TUNING)
    assert set(bench_conv_norm.DX_TILES) == set(triton_conv.TUNING["bwd_dx"])


def test_a_training_kernel_section_of_the_kernels_file():
    text = "# ssd\n\nCommand: `python -m eval.bench_ssd --out /tmp/x.md`\n\n## sub\n"
    assert bench_kernels.as_section(text, "/tmp/x.md") == "\n## ssd\n\nCommand: `python -m eval.bench_ssd`\n\n## sub\n"


def test_run_hands_on_its_ceilings_options_and_writes_device_command_and_ceilings(tmp_path, capsys):
    argv = ["--ceilings", "H100", "--training", "ssd", "--copy-tbs=3.1"]
    out = str(tmp_path / "k.md")
    run = harness.Run("bench_kernels", out, argv, H100, device="cpu")
    assert run.ceiling_args() == ["--ceilings", "H100", "--copy-tbs=3.1"]
    run.write("Kernel benchmarks", "body")
    text = open(out).read()
    assert text.startswith("# Kernel benchmarks\n\nDevice: CPU")
    assert "Command: `python -m eval.bench_kernels --ceilings H100 --training ssd --copy-tbs=3.1`" in text
    assert "Floors at: copy 3.00 TB/s (read + write), bf16 matmul 735 TFLOP/s" in text and text.endswith("body\n")
    assert f"wrote {out}" in capsys.readouterr().out
