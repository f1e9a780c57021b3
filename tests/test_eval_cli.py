"""Mistakes a user can make with the eval commands: each one ends in `error: <message naming the file / option>`
on stderr and exit status 2, with no traceback (hybrid.errors.cli), before any long work starts."""
import importlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from eval import bench_kernels, bench_training, lm_eval_adapter, perplexity, recall, speed
from hybrid.errors import cli
from hybrid.spec import LayoutError
from test_eval import ROOT, TINY, ckpt, tok  # noqa: F401  (the tiny checkpoint fixture and its tokenizer)

COMMANDS = ["perplexity", "speed", "recall", "lm_eval_adapter", "bench_kernels", "bench_attention", "bench_training",
            "bench_ssd", "bench_selective_scan", "bench_conv_norm", "bench_grid", "bench_moe", "bench_linear",
            "kernel_stats"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Run in an empty folder (a default run folder must not land in the repository) without BRAIDLM_DEBUG."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BRAIDLM_DEBUG", raising=False)


def user_error(main, argv, capsys, *names) -> str:
    """Run `main` as the command line does; assert status 2, one `error:` message naming each of `names`, and
    no traceback. Returns the message."""
    rc = cli(main, argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for name in names:
        assert name in err, (name, err)
    return err


def nothing_written(folder):
    return not os.path.exists(os.path.join(folder, "runs"))


# ----------------------------------------------------------------------------------------------- wiring

@pytest.mark.parametrize("module", COMMANDS)
def test_every_eval_command_runs_under_cli(module):
    src = open(os.path.join(ROOT, "eval", f"{module}.py")).read()
    assert src.rstrip().endswith('if __name__ == "__main__":\n    sys.exit(cli(main))'), module


def test_a_command_line_error_is_one_line_and_status_2(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("BRAIDLM_DEBUG", None)
    missing = str(tmp_path / "no_such_ckpt")
    proc = subprocess.run([sys.executable, "-m", "eval.perplexity", missing], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert f"error: {missing}: no such directory" in proc.stderr and "Traceback" not in proc.stderr
    assert nothing_written(tmp_path)


def test_debug_shows_the_traceback():
    with pytest.raises(LayoutError, match="nosuch"):
        cli(speed.main, ["--layouts", "nosuch", "--debug"])


# ------------------------------------------------------------------------------------------- perplexity

def test_perplexity_on_a_missing_checkpoint_directory(tmp_path, capsys):
    user_error(perplexity.main, [str(tmp_path / "nope")], capsys, str(tmp_path / "nope"), "no such directory")
    assert nothing_written(tmp_path)


def test_perplexity_on_a_directory_that_is_not_a_checkpoint(tmp_path, capsys):
    user_error(perplexity.main, [str(tmp_path)], capsys, "not a usable checkpoint", "model.safetensors")


def test_perplexity_on_a_truncated_weights_file(ckpt, tmp_path, capsys):
    bad = str(tmp_path / "step_1")
    shutil.copytree(ckpt, bad)
    weights = os.path.join(bad, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    user_error(perplexity.main, [bad, "--quick"], capsys, weights)


def test_perplexity_data_path_missing(ckpt, tmp_path, capsys):
    user_error(perplexity.main, [ckpt, "--data", str(tmp_path / "held.jsonl")], capsys,
               f"--data {tmp_path / 'held.jsonl'}", "no such file or directory")


def test_perplexity_data_shard_without_its_starts_file(ckpt, tmp_path, capsys):
    (tmp_path / "heldout.bin").write_bytes(b"\0" * 64)
    user_error(perplexity.main, [ckpt, "--data", str(tmp_path / "heldout.bin")], capsys,
               "heldout.starts.npy")


def test_perplexity_data_jsonl_with_a_bad_line(ckpt, tmp_path, capsys):
    data = tmp_path / "held.jsonl"
    data.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text field"}) + "\n")
    user_error(perplexity.main, [ckpt, "--data", str(data)], capsys, f"{data}:2", "'text'")


def test_perplexity_run_without_a_heldout_shard(ckpt, tmp_path, capsys):
    lone = str(tmp_path / "run" / "checkpoints" / "step_1")
    shutil.copytree(ckpt, lone)
    user_error(perplexity.main, [lone, "--quick"], capsys, "heldout.bin", "pass --data")


def test_perplexity_data_too_short(ckpt, tmp_path, capsys):
    data = tmp_path / "one.txt"
    data.write_text("a")
    user_error(perplexity.main, [ckpt, "--data", str(data)], capsys, str(data), "too few")


def test_perplexity_non_positive_seq_len(ckpt, capsys):
    user_error(perplexity.main, [ckpt, "--seq-len", "0"], capsys, "--seq-len 0", "positive")


def test_perplexity_unknown_device(ckpt, capsys):
    user_error(perplexity.main, [ckpt, "--device", "nosuch"], capsys, "--device 'nosuch'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_perplexity_cuda_device_without_cuda(ckpt, capsys):
    user_error(perplexity.main, [ckpt, "--device", "cuda"], capsys, "--device cuda", "CUDA is not available")


def test_perplexity_out_is_a_directory(ckpt, tmp_path, capsys):
    user_error(perplexity.main, [ckpt, "--out", str(tmp_path)], capsys, f"--out {tmp_path}", "is a directory")


# ------------------------------------------------------------------------------------------------ speed

def test_speed_unknown_layout_name(capsys, tmp_path):
    user_error(speed.main, ["--layouts", "nosuch"], capsys, "layout 'nosuch'", "allowed:", "jamba")
    assert nothing_written(tmp_path)


def test_speed_bad_set_key(capsys):
    user_error(speed.main, ["--quick", "--set", "model.nosuch=3"], capsys, "model.nosuch", "unknown key")


def test_speed_non_positive_length(capsys):
    user_error(speed.main, ["--quick", "--lengths", "32", "0"], capsys, "--lengths 0")


# ----------------------------------------------------------------------------------------------- recall

def test_recall_bad_set_key(capsys, monkeypatch):
    monkeypatch.setattr(recall, "train_mqar", lambda *a, **k: pytest.fail("trained before the error"))
    user_error(recall.main, ["--quick", "--set", "defaults.mamba2.nosuch=1"], capsys, "defaults.mamba2.nosuch")


def test_recall_only_names_a_label_not_in_layouts(capsys):
    user_error(recall.main, ["--quick", "--only", "transformer:Ag x 9"], capsys, "--only", "transformer:Ag x 9")


def test_recall_layout_lr_without_a_rate(capsys):
    user_error(recall.main, ["--layouts", "mamba2:M2", "--layout-lr", "mamba2:M2=fast"], capsys,
               "--layout-lr 'mamba2:M2=fast'", "LABEL=LR")


def test_recall_train_pairs_that_do_not_fit(capsys):
    user_error(recall.main, ["--train-pairs", "64", "--train-len", "128"], capsys, "--train-pairs 64",
               "--train-len 128")


def test_recall_more_pairs_than_keys(capsys):
    user_error(recall.main, ["--vocab", "16", "--train-pairs", "4", "--pairs", "9"], capsys, "--vocab 16", "9 pairs")


def test_recall_corrupt_cache_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(recall, "train_mqar", lambda *a, **k: pytest.fail("trained before the error"))
    cache = tmp_path / "runs.jsonl"
    cache.write_text('{"key": "k", "result": {}}\n{"key": "cut off\n')
    user_error(recall.main, ["--quick", "--cache", str(cache)], capsys, f"--cache {cache}:2")


def test_recall_missing_passkey_checkpoint_fails_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(recall, "train_mqar", lambda *a, **k: pytest.fail("trained before the error"))
    user_error(recall.main, ["--quick", "--passkey-ckpt", str(tmp_path / "gone")], capsys, str(tmp_path / "gone"))


# ---------------------------------------------------------------------------------------------- lm-eval

def test_lm_eval_include_path_missing(ckpt, tmp_path, capsys):
    user_error(lm_eval_adapter.main, [ckpt, "--tasks", "t", "--include-path", str(tmp_path / "tasks")], capsys,
               f"--include-path {tmp_path / 'tasks'}")


def test_lm_eval_not_installed(ckpt, capsys, monkeypatch):
    monkeypatch.setattr(lm_eval_adapter, "HAVE_LM_EVAL", False)
    user_error(lm_eval_adapter.main, [ckpt, "--tasks", "t"], capsys, "lm-eval is not installed", ".[eval]")


def test_lm_eval_missing_checkpoint(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    user_error(lm_eval_adapter.main, [str(tmp_path / "nope"), "--tasks", "t"], capsys, str(tmp_path / "nope"))


# ------------------------------------------------------------------------------------------- benchmarks

@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("module", [c for c in COMMANDS if c.startswith("bench_")])
def test_gpu_benchmark_without_cuda(module, tmp_path, capsys):
    argv = ["--layout", TINY] if module == "bench_training" else []
    user_error(importlib.import_module(f"eval.{module}").main, argv, capsys, f"eval.{module} needs a CUDA GPU")
    assert nothing_written(tmp_path)


def test_bench_kernels_unknown_training_module(capsys):
    user_error(bench_kernels.main, ["--training", "ssd", "nosuch"], capsys, "--training nosuch", "conv_norm")


def test_bench_grid_negative_split_programs(capsys):
    from eval import bench_grid
    user_error(bench_grid.main, ["--split-programs", "-1"], capsys, "--split-programs -1", ">= 0")


def test_bench_training_bad_stages(capsys):
    user_error(bench_training.main, ["--layout", TINY, "--stages", "2,5"], capsys, "--stages '2,5'")
    user_error(bench_training.main, ["--layout", TINY, "--stages", "torch,"], capsys, "--stages 'torch,'")


def test_bench_training_torch_engine_beside_zero():
    """`torch` runs plain train.py (the torch engine), a ZeRO stage the deepspeed launcher; both get --extra."""
    import argparse
    assert bench_training.parse_stages("torch, 2,3") == ["torch", 2, 3]
    args = argparse.Namespace(layout=TINY, steps=5, seq_len=64, micro_batch=2, extra=["model.d_model=64"])
    torch_cmd = bench_training.train_command(args, "torch", "/tmp/x")
    assert torch_cmd[:2] == [sys.executable, "train.py"] and "model.d_model=64" in torch_cmd
    assert not any(a.startswith("train.zero_stage") for a in torch_cmd)
    zero = bench_training.train_command(args, 2, "/tmp/x")
    assert "--num_gpus" in zero and "train.zero_stage=2" in zero and "model.d_model=64" in zero


def test_bench_training_missing_layout(tmp_path, capsys):
    user_error(bench_training.main, ["--layout", str(tmp_path / "x.yaml")], capsys, f"--layout {tmp_path / 'x.yaml'}")


@pytest.mark.parametrize("module", [c for c in COMMANDS if c.startswith("bench_") and c != "bench_training"])
def test_bench_non_positive_device_ceiling(module, tmp_path, capsys):
    main = importlib.import_module(f"eval.{module}").main
    user_error(main, ["--copy-tbs", "0"], capsys, "--copy-tbs 0", "positive")
    user_error(main, ["--gemm-tflops", "-5"], capsys, "--gemm-tflops -5", "positive")
    assert nothing_written(tmp_path)


def test_decode_launches_are_counted_per_op(capsys):
    """eval.launches counts a decode step's launches on the CPU: a transformer layer reads its cache through one
    RoPE-and-write op and one attention op (no scatter or remainder left over), each op once; the pre-norms fuse
    with the first projections (q / k / v; the SwiGLU's gate and up), o and down are one launch each. The first
    block's norm has no previous delta to add (it reads the embedding) and the final norm feeds the head."""
    from eval import launches
    from eval.sizing import sized_layout
    from hybrid.model import HybridLM
    layout = sized_layout("transformer")
    counts = launches.decode_launches(HybridLM(layout).eval())
    n = layout.n_layers
    assert counts["ops.rope_kv_write"] == n and counts["ops.attention_decode"] == n
    assert not any("scatter" in k or "remainder" in k for k in counts)
    assert counts["ops.add_rmsnorm_linears"] == 2 * n - 1 and counts["ops.linears"] == 2 * n + 1
    assert counts["ops.add_rmsnorm"] == 2 and "ops.swiglu_linear" not in counts
    assert counts["aten.mm.default"] == 1  # the head
    assert cli(launches.main, ["--layouts", "mamba2", "--by-op"]) == 0
    out = capsys.readouterr().out
    assert "| mamba2 |" in out and "ops.ssd_state_update" in out
    assert cli(launches.main, ["--batch", "0"]) == 2 and "--batch 0" in capsys.readouterr().err


def test_decode_profile_refuses_bad_options_and_a_machine_without_a_gpu(capsys):
    from eval import decode_profile
    user_error(decode_profile.main, ["--layouts", "jamba:0"], capsys, "--layouts jamba:0")
    user_error(decode_profile.main, ["--steps", "0"], capsys, "--steps 0")
    args = decode_profile.parse_args(["--layouts", "jamba:64", "transformer:[M2 Ag] x 2", "samba"])
    assert args.runs == [("jamba", 64), ("transformer:[M2 Ag] x 2", 1), ("samba", 1)]
    if not torch.cuda.is_available():
        user_error(decode_profile.main, [], capsys, "eval.decode_profile", "CUDA GPU")


def test_bench_selective_scan_shape_option(capsys):
    from eval import bench_selective_scan as bss
    with pytest.raises(SystemExit) as e:
        bss.main(["--shape", "128,1024,1024"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--shape" in err and "'128,1024,1024': expected four positive integers" in err
    assert bss.shape_arg("128,1024,1024,16") == (128, 1024, 1024, 16)
    ap = bss.harness.parser("bench_selective_scan", "", sweep_budget=1.0)
    bss.options(ap)
    a = ap.parse_args(["--shape", "2,64,32,4", "--docs"])
    assert a.shape == (2, 64, 32, 4) and a.docs and ap.parse_args([]).shape == (8, 4096, 3072, 16)
    # the table names the shape and documents, and quotes mamba-ssm's numbers only at their own shape
    ceil = bss.harness.CEILINGS["H200"]
    rows = [("triton (ours)", 64, 1.0, 1.1, 5.0)]
    text = bss.table(rows, ceil, {}, True, (2, 64, 32, 4), True)
    assert "batch 2, d_inner 32, d_state 4" in text and "packed documents" in text and "quoted" not in text
    assert "mamba-ssm" in bss.table(rows, ceil, {}, True)
