"""Kernel benchmarks on the GPU: correctness against the reference first, then side-by-side timings.

    python -m eval.bench_kernels                                 # writes runs/eval/bench_kernels/kernels.md
    python -m eval.bench_kernels --out eval/results/kernels.md   # update the recorded results

First the decode steps (Mamba2 and Mamba1 state updates, conv update; batch 64), timed against the PyTorch reference, against
mamba-ssm's Triton `selective_state_update` where it is importable (carry its files on PYTHONPATH), and
against a device copy of the same number of bytes (the floor: a step must read and write the fp32 state once).
Medians of triton.testing.do_bench over CUDA-graph replays. Then the training kernels (SSD, selective scan,
conv1d + gated RMSNorm: eval/bench_ssd.py, eval/bench_selective_scan.py, eval/bench_conv_norm.py), each in its
own process, appended to the same file. Writes markdown with device, date and command to `--out` and prints
its path.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import sys

import torch

from eval.plots import add_out_argument, check_out, command_line, write_text
from eval.timing import rel_err as _rel, require_cuda
from hybrid.errors import ConfigError, cli

TRAINING = ["ssd", "selective_scan", "conv_norm"]  # eval/bench_<name>.py


def _bench(fn, steps: int = 20):
    """Median ms per call, with `steps` calls captured in one CUDA graph: decode runs captured, and a lone
    launch of a microsecond kernel would time the launch instead of the kernel."""
    import triton.testing

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(steps):
            fn()
    return triton.testing.do_bench(graph.replay, warmup=20, rep=200, return_mode="median") / steps


def _copy_ms(nbytes: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    return _bench(lambda: dst.copy_(src))


def _mamba_ssm_update():
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        return selective_state_update
    except Exception as e:  # not installed / not carried
        print(f"mamba-ssm selective_state_update not importable: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def _add_theirs(op, step, state0, state, s64, want, rows, times):
    """Check mamba-ssm's step (called as step(state)) on a pristine state against float64, then time it."""
    s_theirs = state0.clone()
    y_theirs = step(s_theirs)
    rows.append((op, "mamba-ssm check", f"state rel err {_rel(s_theirs, s64):.1e}, y rel err {_rel(y_theirs, want):.1e}"))
    times["mamba-ssm 2.x Triton"] = _bench(lambda: step(state))


def bench_ssd_step(batch=64, nheads=48, headdim=64, dstate=128, ngroups=1, dtype=torch.bfloat16):
    from kernels.state_update import reference as ref
    from kernels.state_update import triton_step as tri
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    r = lambda *s, dt=dtype: torch.randn(*s, device=dev, generator=g).to(dt)
    state = r(batch, nheads, headdim, dstate, dt=torch.float32)
    x, z, dt = r(batch, nheads, headdim), r(batch, nheads, headdim), r(batch, nheads)
    A = -torch.rand(nheads, device=dev, generator=g) * 4 - 0.5
    B, C = r(batch, ngroups, dstate), r(batch, ngroups, dstate)
    D, dt_bias = r(nheads, dt=torch.float32), r(nheads, dt=torch.float32)
    kw = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=True)
    state0 = state.clone()  # the timing loops below advance `state` in place
    s64 = state.double()
    want = ref.ssd_state_update(s64, x.double(), dt.double(), A.double(), B.double(), C.double(), D=D.double(),
                                z=z.double(), dt_bias=dt_bias.double(), dt_softplus=True)
    s_tri = state.clone()
    got = tri.ssd_state_update(s_tri, x, dt, A, B, C, **kw)
    rows = [("ssd_state_update", "correctness", f"state rel err {_rel(s_tri, s64):.1e}, y rel err {_rel(got, want):.1e}")]
    assert _rel(s_tri, s64) < 1e-5 and _rel(got, want) < 1e-2
    nbytes = 2 * state.numel() * 4 + sum(t.numel() * t.element_size() for t in (x, z, dt, B, C, got))
    times = {"triton (ours)": _bench(lambda: tri.ssd_state_update(state, x, dt, A, B, C, **kw)),
             "reference (PyTorch)": _bench(lambda: ref.ssd_state_update(state, x, dt, A, B, C, **kw))}
    theirs = _mamba_ssm_update()
    if theirs is not None:
        # mamba-ssm's Mamba2 step: dt, A, D, dt_bias broadcast over headdim with stride 0
        A_e = A[:, None, None].expand(nheads, headdim, dstate)
        dt_e = dt[:, :, None].expand(batch, nheads, headdim)
        D_e, b_e = D[:, None].expand(nheads, headdim), dt_bias[:, None].expand(nheads, headdim)
        _add_theirs("ssd_state_update", lambda st: theirs(st, x, dt_e, A_e, B, C, D=D_e, z=z, dt_bias=b_e,
                                                          dt_softplus=True), state0, state, s64, want, rows, times)
    copy = _copy_ms(2 * state.numel() * 4 // 2)  # a copy of state-size bytes reads + writes 2x state bytes
    shape = f"B{batch} H{nheads} P{headdim} N{dstate} G{ngroups} {str(dtype)[6:]}"
    return rows, _time_rows("ssd_state_update", shape, times, nbytes, copy)


def bench_selective_step(batch=64, dinner=3072, dstate=16, dtype=torch.bfloat16):
    from kernels.state_update import reference as ref
    from kernels.state_update import triton_step as tri
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(1)
    r = lambda *s, dt=dtype: torch.randn(*s, device=dev, generator=g).to(dt)
    state = r(batch, dinner, dstate, dt=torch.float32)
    u, delta, z = r(batch, dinner), r(batch, dinner), r(batch, dinner)
    A = -torch.rand(dinner, dstate, device=dev, generator=g) * 4
    B, C = r(batch, dstate), r(batch, dstate)
    D, bias = r(dinner, dt=torch.float32), r(dinner, dt=torch.float32)
    kw = dict(D=D, z=z, delta_bias=bias, delta_softplus=True)
    state0 = state.clone()  # the timing loops below advance `state` in place
    s64 = state.double()
    want = ref.selective_state_update(s64, u.double(), delta.double(), A.double(), B.double(), C.double(),
                                      D=D.double(), z=z.double(), delta_bias=bias.double(), delta_softplus=True)
    s_tri = state.clone()
    got = tri.selective_state_update(s_tri, u, delta, A, B, C, **kw)
    rows = [("selective_state_update", "correctness",
             f"state rel err {_rel(s_tri, s64):.1e}, y rel err {_rel(got, want):.1e}")]
    assert _rel(s_tri, s64) < 1e-5 and _rel(got, want) < 1e-2
    nbytes = 2 * state.numel() * 4 + A.numel() * 4 + sum(t.numel() * t.element_size() for t in (u, delta, z, B, C, got))
    times = {"triton (ours)": _bench(lambda: tri.selective_state_update(state, u, delta, A, B, C, **kw)),
             "reference (PyTorch)": _bench(lambda: ref.selective_state_update(state, u, delta, A, B, C, **kw))}
    theirs = _mamba_ssm_update()
    if theirs is not None:
        _add_theirs("selective_state_update", lambda st: theirs(st, u, delta, A, B, C, D=D, z=z, dt_bias=bias,
                                                                dt_softplus=True), state0, state, s64, want, rows, times)
    copy = _copy_ms(state.numel() * 4)
    shape = f"B{batch} D{dinner} N{dstate} {str(dtype)[6:]}"
    return rows, _time_rows("selective_state_update", shape, times, nbytes, copy)


def bench_conv_step(batch=64, channels=3328, width=4, dtype=torch.bfloat16):
    """Mamba2's conv at d_model 1536 (conv_dim = d_inner 3072 + 2 * d_state 128)."""
    from kernels.conv1d import reference as ref
    from kernels.conv1d import triton_step as tri
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(2)
    state = torch.randn(batch, channels, width - 1, device=dev, generator=g).to(dtype)
    x = torch.randn(batch, channels, device=dev, generator=g).to(dtype)
    w, b = torch.randn(channels, width, device=dev, generator=g), torch.randn(channels, device=dev, generator=g)
    s64, s_tri = state.double(), state.clone()
    want = ref.causal_conv1d_update(x.double(), s64, w.double(), b.double())
    got = tri.causal_conv1d_update(x, s_tri, w, b)
    rows = [("causal_conv1d_update", "correctness",
             f"state rel err {_rel(s_tri, s64):.1e}, y rel err {_rel(got, want):.1e}")]
    assert _rel(s_tri, s64) < 1e-2 and _rel(got, want) < 1e-2
    nbytes = 2 * state.numel() * state.element_size() + 2 * x.numel() * x.element_size() + w.numel() * 4
    times = {"triton (ours)": _bench(lambda: tri.causal_conv1d_update(x, state, w, b)),
             "reference (PyTorch)": _bench(lambda: ref.causal_conv1d_update(x, state, w, b))}
    copy = _copy_ms(nbytes // 2)
    return rows, _time_rows("causal_conv1d_update", f"B{batch} C{channels} W{width} {str(dtype)[6:]}", times,
                            nbytes, copy)


def _time_rows(op, shape, times, nbytes, copy_ms):
    floor_ms = nbytes / 3.0e12 * 1e3
    out = []
    for name, ms in times.items():
        gbs = nbytes / (ms * 1e-3) / 1e9
        out.append((op, shape, name, f"{ms * 1e3:.1f}", f"{gbs:,.0f}", f"{100 * copy_ms / ms:.0f}%",
                    f"{100 * floor_ms / ms:.0f}%"))
    out.append((op, shape, "device copy, same bytes", f"{copy_ms * 1e3:.1f}", "", "100%", ""))
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="python -m eval.bench_kernels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out_argument(ap, "bench_kernels", "kernels")
    ap.add_argument("--training", nargs="*", default=TRAINING,
                    help="training-kernel benchmark modules (eval/bench_<name>.py) to run and append")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = ap.parse_args(argv)
    unknown = [m for m in args.training if importlib.util.find_spec(f"eval.bench_{m}") is None]
    if unknown:
        raise ConfigError(f"--training {' '.join(unknown)}: no eval/bench_<name>.py for it "
                          f"(allowed: {', '.join(TRAINING)})")
    check_out(args.out)
    require_cuda("eval.bench_kernels")
    checks, table = [], []
    for fn in (bench_ssd_step, bench_selective_step, bench_conv_step):
        c, t = fn()
        checks += c
        table += t
    header = ("| op | shape | implementation | time (us) | GB/s | % of copy BW | % of 3.0 TB/s floor |\n"
              "|---|---|---|---|---|---|---|")
    lines = [header] + ["| " + " | ".join(r) + " |" for r in table]
    device = torch.cuda.get_device_name()
    md = (f"# Kernel benchmarks\n\nDevice: {device}; torch {torch.__version__}; "
          f"date {datetime.date.today().isoformat()}\n\nCommand: `{command_line('eval.bench_kernels', argv)}`\n\n"
          "Bytes counted: fp32 state read + written once, plus the step's inputs and output (and A for Mamba1). "
          "'% of copy BW' compares with a device-to-device copy that reads and writes the state's bytes. "
          "Every time is the median per step of 20 steps captured in one CUDA graph (how decode runs).\n\n"
          "## Correctness (bf16 inputs, fp32 state, against the float64 reference)\n\n"
          + "\n".join(f"- {op} ({what}): {msg}" for op, what, msg in checks)
          + "\n\n## Decode steps\n\n" + "\n".join(lines) + "\n")
    # the training kernels: each has its own benchmark module (checks, then timings, then a markdown table);
    # run each in its own process and append its table
    import subprocess
    import tempfile
    for module in args.training:
        with tempfile.NamedTemporaryFile(suffix=".md", delete=False) as tmp:
            part = tmp.name
        cmd = [sys.executable, "-m", f"eval.bench_{module}", "--out", part]
        print(" ".join(cmd), flush=True)
        child_env = {k: v for k, v in os.environ.items() if k != "OUT"}  # its part is appended here, not returned
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env)
        if proc.returncode != 0 or not os.path.getsize(part):
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            md += f"\n## {module}\n\nFAILED (exit {proc.returncode}); see the run's log.\n"
            continue
        with open(part) as f:
            body = f.read()
        md += "\n" + body.replace("\n# ", "\n## ").replace("# ", "## ", 1 if body.startswith("# ") else 0)
        os.unlink(part)
    write_text(args.out, md)
    print(md)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
