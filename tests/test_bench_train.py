"""eval.bench_train on the CPU: the models it steps are the sizes it claims, a step is train.py's step, the
profiler breakdown sorts kernels into parts, and the command refuses bad options and a machine without a GPU."""
import pytest
import torch

from eval import bench_train as bt
from hybrid.budget import budget
from hybrid.errors import cli


@pytest.mark.parametrize("name, millions", [("hybrid", 392), ("mamba2", 350), ("mamba1-hybrid", 393),
                                            ("transformer", 341)])
def test_370m_presets_are_the_models_of_the_issue_table(name, millions):
    assert round(budget(bt.model_layout(name, "370m")).params / 1e6) == millions


def test_the_moe_hybrid_is_the_hybrid_with_every_other_mlp_8_experts_top_2():
    dense, moe = (budget(bt.model_layout(name, "370m")) for name in ("hybrid", "hybrid-moe"))
    assert moe.moe and not dense.moe
    per_expert = 3 * 1024 * 2816
    assert moe.params - dense.params == 12 * (7 * per_expert + 1024 * 8)  # 12 MoE layers: 7 more experts + router
    assert moe.active_params - dense.active_params == 12 * (per_expert + 1024 * 8)  # top-2: one more, + router
    assert moe.flops_per_token > dense.flops_per_token


def test_a_step_trains_and_is_reported():
    layout = bt.model_layout("hybrid", "tiny")
    model, step = bt.ours(layout, torch.device("cpu"), bf16=False)
    micro = bt.batches(layout.model.vocab_size, 2, 32, torch.device("cpu"))
    first, _ = step(micro)
    for _ in range(5):
        loss, _ = step(micro)
    assert loss < first  # the same batch again: the optimizer really steps
    r = bt.measure("hybrid", layout, 2, 32, torch.device("cpu"), steps=1, warmup=1)
    assert r.tokens_per_s > 0 and r.mfu is None and "host (CPU)" in r.parts_ms
    text = bt.table([r], 32, 2)
    assert "| hybrid |" in text and "seq_len 32, micro-batch 2" in text


def test_hf_llama_steps_on_the_cpu():
    r = bt.measure("hf-llama", bt.model_layout("transformer", "tiny"), 2, 16, torch.device("cpu"), steps=1, warmup=1)
    assert r.params == sum(p.numel() for p in bt.hf_llama(bt.model_layout("transformer", "tiny"), torch.device("cpu"),
                                                          False, False)[0].parameters())


@pytest.mark.parametrize("kernel, part", [
    ("ampere_bf16_s16816gemm_bf16_128x128", "matmul"), ("sm90_xmma_gemm_bf16bf16", "matmul"),
    ("chunk_state_kernel", "ssd scan"), ("bwd_dx_kernel", "ssd scan"), ("_selective_scan_fwd_kernel", "selective scan"),
    ("_conv1d_fwd_kernel", "conv1d"), ("_conv1d_bwd_dx_kernel", "conv1d"), ("_rmsnorm_fwd_kernel", "norms"),
    ("flash_fwd_kernel", "attention"), ("triton_tem_fused_0", "attention"), ("triton_poi_fused_add_0", "compiled elementwise"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<log_softmax>", "loss"),
    ("multi_tensor_apply_kernel<FusedAdam>", "optimizer"), ("elementwise_kernel<add>", "other")])
def test_kernel_names_go_to_their_part(kernel, part):
    assert bt.part_of(kernel) == part


@pytest.mark.parametrize("argv, named", [(["--micro-batch", "0"], "--micro-batch 0"), (["--seq-len", "0"], "--seq-len"),
                                         ([], "CUDA")])
def test_bad_options_and_no_gpu_are_one_line(capsys, argv, named):
    if not argv and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert cli(bt.main, argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and named in err


def test_every_triton_kernel_we_launch_has_a_part():
    """A kernel named so that the breakdown cannot place it would hide in 'other'."""
    import os
    import re
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    launched = set()
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                launched |= set(re.findall(r"\b(\w+)\[[^\]]*\]\(", open(os.path.join(folder, name)).read()))
    launched = {k for k in launched if "kernel" in k or k == "_decode_partial"}
    assert len(launched) >= 15, launched
    assert not [k for k in launched if bt.part_of(k) == "other"], launched


class _Run:
    """harness.Run's write, recorded (no GPU, no file)."""

    def __init__(self):
        self.writes = []

    def write(self, title, body, quiet=False):
        self.writes.append((body, quiet))

    def floor_ms(self, work):
        return 1.0


def test_a_run_cut_short_keeps_its_finished_rows(monkeypatch):
    """bench_train writes its tables after every model (quietly), then once more at the end: a run killed by a
    time limit leaves the rows it finished."""
    import argparse
    monkeypatch.setattr(bt, "run_all", lambda args, device, partial: (partial("| hybrid | row |"), "tables")[1])
    run = _Run()
    bt.bench(argparse.Namespace(), run)
    assert run.writes[0] == ("| hybrid | row |" + bt.NOTE, True) and run.writes[-1] == ("tables" + bt.NOTE, False)


def test_bench_grid_writes_every_row_as_it_goes(monkeypatch):
    """eval.bench_grid's tables (ours beside theirs, ratio, % floor) built on the CPU with stand-in timings; each
    row is written as soon as it is timed."""
    import argparse

    from eval import bench_grid as bg
    monkeypatch.setattr(bg, "ssd_inputs", lambda *a: ({}, {}))
    monkeypatch.setattr(bg, "m1_inputs", lambda *a: ({}, {"z": torch.zeros(1, 2, 3)}))
    monkeypatch.setattr(bg, "_mamba_ssd", lambda: "theirs")
    monkeypatch.setattr(bg, "_mamba_selective_scan", lambda: None)
    monkeypatch.setattr(bg, "_times", lambda fn, args, kw: (2.0, 8.0) if fn == "theirs" else (1.0, 4.0))
    run = _Run()
    bg.bench(argparse.Namespace(ops=["ssd", "selective_scan"], quick=True, split_programs=0), run)
    n_ssd = len(bg.PAIRS) * 4  # SSD_QUICK: 2 headdims x 2 ngroups
    assert len(run.writes) == n_ssd + len(bg.PAIRS) + 1 and all(q for _, q in run.writes[:-1])
    final = run.writes[-1][0]
    assert "| P64 N128 G1 chunk 256, 8 x 4096 | 1.000 | 2.000 | 2.00 | 4.000 | 8.000 | 2.00 | 25% |" in final
    assert "| D3072 N16, 1 x 32768 | 1.000 | - | - | 4.000 | - | - | 25% |" in final


def test_idle_time_goes_to_the_kernel_that_ended_the_wait():
    kernels = [(0, 10, "a"), (30, 40, "b"), (41, 50, "c"), (45, 60, "d"), (100, 110, "b"), (112, 120, "e")]
    # b waited 20 and 40 us, c 1 us (under min_us: launch spacing), d overlapped c, e waited 2 us
    assert bt.idle_before(kernels, min_us=2.0) == {"b": (60.0, 2), "e": (2.0, 1)}
    assert bt.idle_before([], min_us=2.0) == {}


def test_host_profile_prints_where_the_host_time_goes(capsys):
    bt.host_profile(lambda: torch.ones(4).sum(), torch.device("cpu"), top=3)
    out = capsys.readouterr().out
    assert "by tottime" in out and "by cumulative" in out


def test_part_columns_come_in_a_fixed_order():
    r = bt.StepResult("m", 1, 1.0, None, None, 1.0, {"host gap": 1.0, "other": 2.0, "matmul": 3.0, "optimizer": 4.0})
    head = bt.table([r], 8, 1).splitlines()[2]
    assert head.index("optimizer") < head.index("matmul") < head.index("other ms") < head.index("host gap")
