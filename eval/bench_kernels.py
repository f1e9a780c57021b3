"""Kernel benchmarks on the GPU: correctness against the reference first, then side-by-side timings.

    python -m eval.bench_kernels                                 # writes runs/eval/bench_kernels/kernels.md
    python -m eval.bench_kernels --out eval/results/kernels.md   # update the recorded results

First the decode steps (Mamba2 and Mamba1 state updates, conv update; batch 64), timed against the PyTorch reference, against
mamba-ssm's Triton `selective_state_update` where it is importable (carry its files on PYTHONPATH), and
against a device copy of the same number of bytes (the floor: a step must read and write the fp32 state once).
Medians of triton.testing.do_bench over CUDA-graph replays. Then the training kernels (SSD, selective scan,
conv1d + gated RMSNorm: eval/bench_ssd.py, eval/bench_selective_scan.py, eval/bench_conv_norm.py), each in its
own process, appended to the same file. Writes markdown with device, date and command to `--out` and prints
its path. Timing, floors and the command line come from eval/harness.py.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tempfile
from typing import Callable, Optional

import torch

from eval import harness
from eval.harness import Work, rel_err
from eval.plots import md_table
from hybrid.errors import ConfigError, cli

TRAINING = ["ssd", "selective_scan", "conv_norm"]  # eval/bench_<name>.py
STEPS = 20  # decode steps captured in one CUDA graph per timing
HEADER = ["op", "shape", "implementation", "time (us)", "GB/s", "% of copy BW", "% of floor"]


@dataclasses.dataclass
class Step:
    """One decode step. ours / reference / theirs advance a state in place and return y: fn(state) -> y; exact
    is the reference on float64 inputs. nbytes: what one step must move; copy_bytes: the copy it is held to."""
    op: str
    shape: str
    state: torch.Tensor
    ours: Callable
    reference: Callable
    exact: Callable
    nbytes: int
    copy_bytes: int
    theirs: Optional[Callable] = None  # mamba-ssm's, when importable
    state_tol: float = 1e-5


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _randn(seed: int, dtype):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return g, lambda *s, dt=dtype: torch.randn(*s, device="cuda", generator=g).to(dt)


def _mamba_ssm_update():
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        return selective_state_update
    except Exception as e:  # not installed / not carried
        print(f"mamba-ssm selective_state_update not importable: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def state_step(op: str, shape: str, state, ours: Callable, reference: Callable, args: tuple, kw: dict,
               nbytes: int) -> Step:
    """A Step of functions called fn(state, *args, **kw) that read and write an fp32 state once."""
    return Step(op, shape, state, ours=lambda s: ours(s, *args, **kw), reference=lambda s: reference(s, *args, **kw),
                exact=lambda s: reference(s, *harness.as_double(args), **harness.as_double(kw)), nbytes=nbytes,
                copy_bytes=2 * _nbytes(state))


def ssd_step(batch=64, nheads=48, headdim=64, dstate=128, ngroups=1, dtype=torch.bfloat16) -> Step:
    from kernels.ssd import reference as ref
    from kernels.ssd import triton_step as tri
    g, r = _randn(0, dtype)
    state = r(batch, nheads, headdim, dstate, dt=torch.float32)
    x, z, dt = r(batch, nheads, headdim), r(batch, nheads, headdim), r(batch, nheads)
    A = -torch.rand(nheads, device="cuda", generator=g) * 4 - 0.5
    B, C = r(batch, ngroups, dstate), r(batch, ngroups, dstate)
    D, dt_bias = r(nheads, dt=torch.float32), r(nheads, dt=torch.float32)
    args, kw = (x, dt, A, B, C), dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=True)
    step = state_step("ssd_state_update", f"B{batch} H{nheads} P{headdim} N{dstate} G{ngroups} {str(dtype)[6:]}",
                      state, tri.ssd_state_update, ref.ssd_state_update, args, kw,
                      nbytes=2 * _nbytes(state) + _nbytes(x, z, dt, B, C, x))
    theirs = _mamba_ssm_update()
    if theirs is not None:
        # mamba-ssm's Mamba2 step: dt, A, D, dt_bias broadcast over headdim with stride 0
        A_e = A[:, None, None].expand(nheads, headdim, dstate)
        dt_e = dt[:, :, None].expand(batch, nheads, headdim)
        D_e, b_e = D[:, None].expand(nheads, headdim), dt_bias[:, None].expand(nheads, headdim)
        step.theirs = lambda s: theirs(s, x, dt_e, A_e, B, C, D=D_e, z=z, dt_bias=b_e, dt_softplus=True)
    return step


def selective_step(batch=64, dinner=3072, dstate=16, dtype=torch.bfloat16) -> Step:
    from kernels.selective_scan import reference as ref
    from kernels.selective_scan import triton_step as tri
    g, r = _randn(1, dtype)
    state = r(batch, dinner, dstate, dt=torch.float32)
    u, delta, z = r(batch, dinner), r(batch, dinner), r(batch, dinner)
    A = -torch.rand(dinner, dstate, device="cuda", generator=g) * 4
    B, C = r(batch, dstate), r(batch, dstate)
    D, bias = r(dinner, dt=torch.float32), r(dinner, dt=torch.float32)
    args, kw = (u, delta, A, B, C), dict(D=D, z=z, delta_bias=bias, delta_softplus=True)
    step = state_step("selective_state_update", f"B{batch} D{dinner} N{dstate} {str(dtype)[6:]}", state,
                      tri.selective_state_update, ref.selective_state_update, args, kw,
                      nbytes=2 * _nbytes(state) + _nbytes(A, u, delta, z, B, C, u))
    theirs = _mamba_ssm_update()
    if theirs is not None:
        step.theirs = lambda s: theirs(s, u, delta, A, B, C, D=D, z=z, dt_bias=bias, dt_softplus=True)
    return step


def conv_step(batch=64, channels=3328, width=4, dtype=torch.bfloat16) -> Step:
    """Mamba2's conv at d_model 1536 (conv_dim = d_inner 3072 + 2 * d_state 128)."""
    from kernels.conv1d import reference as ref
    from kernels.conv1d import triton_step as tri
    g, r = _randn(2, dtype)
    state, x = r(batch, channels, width - 1), r(batch, channels)
    w, b = r(channels, width, dt=torch.float32), r(channels, dt=torch.float32)
    nbytes = 2 * _nbytes(state) + 2 * _nbytes(x) + _nbytes(w)
    return Step("causal_conv1d_update", f"B{batch} C{channels} W{width} {str(dtype)[6:]}", state,
                ours=lambda s: tri.causal_conv1d_update(x, s, w, b),
                reference=lambda s: ref.causal_conv1d_update(x, s, w, b),
                exact=lambda s: ref.causal_conv1d_update(*harness.as_double((x, s, w, b))),
                nbytes=nbytes, copy_bytes=nbytes, state_tol=1e-2)


def check(step: Step) -> list[tuple[str, str, str]]:
    """Ours (and mamba-ssm's) from a copy of the state against the float64 reference: (op, what, errors)."""
    s64 = step.state.double()
    want = step.exact(s64)
    rows = []
    for what, fn in [("correctness", step.ours), ("mamba-ssm check", step.theirs)]:
        if fn is None:
            continue
        s = step.state.clone()
        y = fn(s)
        rows.append((step.op, what, f"state rel err {rel_err(s, s64):.1e}, y rel err {rel_err(y, want):.1e}"))
        if what == "correctness":
            assert rel_err(s, s64) < step.state_tol and rel_err(y, want) < 1e-2, rows[-1]
    return rows


def time_rows(op: str, shape: str, times: dict[str, float], nbytes: int, copy: float, floor: float) -> list[tuple]:
    """Table rows: each implementation's time (ms in) as us, GB/s and % of the copy and of the floor (ms)."""
    out = [(op, shape, name, f"{ms * 1e3:.1f}", f"{nbytes / (ms * 1e-3) / 1e9:,.0f}", f"{100 * copy / ms:.0f}%",
            f"{100 * floor / ms:.0f}%") for name, ms in times.items()]
    return out + [(op, shape, "device copy, same bytes", f"{copy * 1e3:.1f}", "", "100%", "")]


def time_step(step: Step, run: harness.Run) -> list[tuple]:
    impls = {"triton (ours)": step.ours, "reference (PyTorch)": step.reference, "mamba-ssm 2.x Triton": step.theirs}
    times = {name: harness.graph_ms(lambda fn=fn: fn(step.state), STEPS, 200) for name, fn in impls.items() if fn}
    copy = harness.copy_ms(step.copy_bytes, STEPS)
    return time_rows(step.op, step.shape, times, step.nbytes, copy, run.floor_ms(Work(bytes=step.nbytes)))


def as_section(text: str, out: str) -> str:
    """A training-kernel benchmark's file as a section of this one: headings one level down, and its command
    without the temporary --out it was given."""
    return "\n" + re.sub(r"^# ", "## ", text.replace(f" --out {shlex.quote(out)}", ""), flags=re.M)


def training_section(module: str, run: harness.Run) -> str:
    """Run eval/bench_<module>.py in its own process; its table as a section, or a line saying it failed."""
    with tempfile.NamedTemporaryFile(suffix=".md", delete=False) as tmp:
        part = tmp.name
    cmd = [sys.executable, "-m", f"eval.bench_{module}", "--out", part, *run.ceiling_args()]
    print(" ".join(cmd), flush=True)
    child_env = {k: v for k, v in os.environ.items() if k != "OUT"}  # its part is appended here, not returned
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env)
    try:
        if proc.returncode != 0 or not os.path.getsize(part):
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            return f"\n## {module}\n\nFAILED (exit {proc.returncode}); see the run's log.\n"
        with open(part) as f:
            return as_section(f.read(), part)
    finally:
        os.unlink(part)


def options(ap) -> None:
    ap.add_argument("--training", nargs="*", default=TRAINING,
                    help="training-kernel benchmark modules (eval/bench_<name>.py) to run and append")


def validate(args) -> None:
    unknown = [m for m in args.training if importlib.util.find_spec(f"eval.bench_{m}") is None]
    if unknown:
        raise ConfigError(f"--training {' '.join(unknown)}: no eval/bench_<name>.py for it "
                          f"(allowed: {', '.join(TRAINING)})")


def bench(args, run: harness.Run) -> int:
    checks, table = [], []
    for make in (ssd_step, selective_step, conv_step):
        step = make()
        checks += check(step)
        table += time_step(step, run)
    body = ("Bytes counted: fp32 state read + written once, plus the step's inputs and output (and A for Mamba1). "
            "'% of copy BW' compares with a device-to-device copy that reads and writes the state's bytes. "
            f"Every time is the median per step of {STEPS} steps captured in one CUDA graph (how decode runs).\n\n"
            "## Correctness (bf16 inputs, fp32 state, against the float64 reference)\n\n"
            + "\n".join(f"- {op} ({what}): {msg}" for op, what, msg in checks)
            + "\n\n## Decode steps\n\n" + md_table(HEADER, table) + "\n"
            + "".join(training_section(m, run) for m in args.training))
    run.write("Kernel benchmarks", body)
    return 0


def main(argv=None):
    return harness.main("bench_kernels", __doc__, argv, bench, options, validate)


if __name__ == "__main__":
    sys.exit(cli(main))
