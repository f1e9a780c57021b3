"""The scan kernels over a grid of shapes, ours beside mamba-ssm's in the same run: GPU time of fwd and fwd+bwd.

    PYTHONPATH=third_party python -m eval.bench_grid [--ops ssd selective_scan] [--quick] [--out FILE.md]

SSD (Mamba-2, `ops.ssd_chunk_scan`): d_inner 2048 (nheads = 2048 / headdim) x headdim {64, 128} x d_state
{64, 128, 256} x ngroups {1, 8} x chunk {128, 256} x (batch, seqlen) at 32K tokens: (8, 4K), (4, 8K), (2, 16K),
(1, 32K); bf16 x/dt/B/C, fp32 A/D/dt_bias, D + dt_bias + softplus. Beside it mamba-ssm's Triton
`mamba_chunk_scan_combined` on the same tensors.
Selective scan (Mamba-1, `ops.selective_scan`): d_inner {2048, 3072, 5120}, d_state 16, the same (batch, seqlen)
pairs, with z, D, delta_bias and softplus; beside it mamba-ssm's CUDA `selective_scan_fn` on the same values in
its (batch, channels, seqlen) layout, when `selective_scan_cuda` imports (it is not part of this project: build
it from mamba-ssm's sources yourself).
Times are GPU time (one call replayed from a CUDA graph, median of `triton.testing.do_bench`); `ratio` is
theirs / ours (above 1: ours is faster). `% floor` compares ours with the least bytes/FLOPs/exps the pass needs
(eval/bench_ssd.py and eval/bench_selective_scan.py `work`) at the device's ceilings. `--quick` keeps the
grid's middle (headdim 64 and 128, d_state 128, ngroups 1 and 8, chunk 256 for SSD; d_inner 3072 for Mamba-1).
"""
from __future__ import annotations

import itertools
import sys
from typing import Callable, Optional, Sequence

import torch

from eval import harness
from eval.plots import md_table
from hybrid.errors import ConfigError, cli

PAIRS = [(8, 4096), (4, 8192), (2, 16384), (1, 32768)]
SSD_D_INNER = 2048
SSD_GRID = dict(headdim=(64, 128), d_state=(64, 128, 256), ngroups=(1, 8), chunk=(128, 256))
SSD_QUICK = dict(headdim=(64, 128), d_state=(128,), ngroups=(1, 8), chunk=(256,))
M1_D_INNER, M1_QUICK, M1_D_STATE = (2048, 3072, 5120), (3072,), 16
HEADER = ["shape", "ours fwd ms", "theirs fwd ms", "fwd ratio", "ours fwd+bwd ms", "theirs fwd+bwd ms",
          "fwd+bwd ratio", "ours % floor fwd+bwd"]


def _rand(g, *shape, dtype=torch.bfloat16):
    return torch.randn(*shape, generator=g, device="cuda").to(dtype)


def ssd_inputs(batch, seqlen, headdim, d_state, ngroups):
    g = torch.Generator(device="cuda").manual_seed(0)
    h = SSD_D_INNER // headdim
    args = dict(x=_rand(g, batch, seqlen, h, headdim), dt=_rand(g, batch, seqlen, h),
                A=-torch.exp(torch.rand(h, generator=g, device="cuda") * 2.7),
                B=_rand(g, batch, seqlen, ngroups, d_state), C=_rand(g, batch, seqlen, ngroups, d_state))
    kw = dict(D=_rand(g, h, dtype=torch.float32), dt_bias=_rand(g, h, dtype=torch.float32) * 0.5 - 3.0,
              dt_softplus=True)
    return args, kw


def _times(fn: Callable, args: dict, kw: dict) -> tuple[float, float]:
    p = harness.passes(fn, **args, **kw)
    return harness.graph_ms(p.fwd, rep=40), harness.graph_ms(p.fwd_bwd, rep=40)


def _mamba_ssd():
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        return mamba_chunk_scan_combined
    except Exception as e:
        print(f"mamba-ssm's SSD not importable ({type(e).__name__}: {e}): ours alone", flush=True)
        return None


def _mamba_selective_scan():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_cuda, selective_scan_fn
        if selective_scan_cuda is None:
            raise ImportError("selective_scan_cuda is not built")
    except Exception as e:
        print(f"mamba-ssm's CUDA selective scan not importable ({type(e).__name__}: {e}): ours alone", flush=True)
        return None

    def theirs(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return theirs


def _row(label, ours, theirs, floor_ms) -> list[str]:
    f = lambda v: "-" if v is None else f"{v:.3f}"
    r = lambda a, b: "-" if a is None or b is None else f"{b / a:.2f}"
    th = theirs or (None, None)
    return [label, f(ours[0]), f(th[0]), r(ours[0], th[0]), f(ours[1]), f(th[1]), r(ours[1], th[1]),
            f"{100 * floor_ms / ours[1]:.0f}%"]


def ssd_grid(run: harness.Run, quick: bool, rows: list, after_row=lambda: None) -> list[list[str]]:
    from eval.bench_ssd import work
    from kernels.ssd.triton_scan import ssd_chunk_scan
    theirs_fn = _mamba_ssd()
    grid = SSD_QUICK if quick else SSD_GRID
    for p, n, g, chunk in itertools.product(*grid.values()):
        for batch, seqlen in PAIRS:
            label = f"P{p} N{n} G{g} chunk {chunk}, {batch} x {seqlen}"
            args, kw = ssd_inputs(batch, seqlen, p, n, g)
            ours = _times(ssd_chunk_scan, args, {**kw, "chunk_size": chunk})
            theirs = None
            if theirs_fn is not None:
                theirs = _times(theirs_fn, args, {**kw, "chunk_size": chunk})
            floor = run.floor_ms(work(batch, seqlen, True, SSD_D_INNER // p, p, n, g, chunk))
            rows.append(_row(label, ours, theirs, floor))
            print(" | ".join(rows[-1]), flush=True)
            after_row()
            del args, kw
            torch.cuda.empty_cache()
    return rows


def m1_inputs(batch, seqlen, d_inner):
    from eval.bench_selective_scan import make
    return make(batch, seqlen, d_inner, M1_D_STATE)


def m1_grid(run: harness.Run, quick: bool, rows: list, after_row=lambda: None,
            split_programs: int = 0) -> list[list[str]]:
    from eval.bench_selective_scan import work
    from kernels.selective_scan import triton_scan
    from kernels.selective_scan.triton_scan import selective_scan
    theirs_fn = _mamba_selective_scan()
    for d, (batch, seqlen) in itertools.product(M1_QUICK if quick else M1_D_INNER, PAIRS):
        args, kw = m1_inputs(batch, seqlen, d)
        if split_programs:  # ours with long rows cut into segments, a row of its own before the default
            saved, triton_scan.SPLIT_PROGRAMS = triton_scan.SPLIT_PROGRAMS, split_programs
            try:
                split = _times(selective_scan, args, kw)
            finally:
                triton_scan.SPLIT_PROGRAMS = saved
            rows.append(_row(f"D{d} N{M1_D_STATE}, {batch} x {seqlen}, segments ({split_programs} programs)",
                             split, None, run.floor_ms(work(batch, seqlen, True, d, M1_D_STATE))))
        ours = _times(selective_scan, args, kw)
        theirs = None
        if theirs_fn is not None:  # their layout: (batch, channels, seqlen), B/C (batch, d_state, seqlen)
            t = {k: v.transpose(1, 2).contiguous() for k, v in args.items() if k != "A"}
            theirs = _times(theirs_fn, {**t, "A": args["A"]}, {**kw, "z": kw["z"].transpose(1, 2).contiguous()})
        rows.append(_row(f"D{d} N{M1_D_STATE}, {batch} x {seqlen}", ours, theirs,
                         run.floor_ms(work(batch, seqlen, True, d, M1_D_STATE))))
        print(" | ".join(rows[-1]), flush=True)
        after_row()
        torch.cuda.empty_cache()
    return rows


TITLE = "Scan kernels over a grid of shapes"


def bench(args, run: harness.Run) -> int:
    ssd_rows: list = []
    m1_rows: list = []

    def body() -> str:
        parts = []
        if ssd_rows:
            parts.append("## ssd_chunk_scan vs mamba-ssm `mamba_chunk_scan_combined` (Triton)\n\n"
                         + md_table(HEADER, ssd_rows))
        if m1_rows:
            parts.append("## selective_scan vs mamba-ssm `selective_scan_fn` (CUDA)\n\n" + md_table(HEADER, m1_rows))
        return "\n\n".join(parts) + ("\n\nratio = theirs / ours; see the module docstring of eval/bench_grid.py "
                                     "for the grid and what is timed.")

    def after_row():  # the rows so far, so that a run cut short keeps them
        run.write(TITLE, body(), quiet=True)
    if "ssd" in args.ops:
        ssd_grid(run, args.quick, ssd_rows, after_row)
    if "selective_scan" in args.ops:
        m1_grid(run, args.quick, m1_rows, after_row, args.split_programs)
    run.write(TITLE, body())
    return 0


def options(ap) -> None:
    ap.add_argument("--ops", nargs="+", default=["ssd", "selective_scan"], choices=["ssd", "selective_scan"],
                    help="which scans (default: both)")
    ap.add_argument("--split-programs", type=int, default=0, metavar="N",
                    help="also time the Mamba-1 scan with kernels/selective_scan/triton_scan.py SPLIT_PROGRAMS = N "
                         "(rows cut into segments scanned in parallel below N programs)")
    ap.add_argument("--quick", action="store_true",
                    help="fewer settings per op (SSD_QUICK, M1_QUICK), every (batch, seqlen) pair")


def validate(args) -> None:
    if args.split_programs < 0:
        raise ConfigError(f"--split-programs {args.split_programs}: expected an integer >= 0 (0: not timed)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    return harness.main("bench_grid", __doc__, argv, bench, options, validate)


if __name__ == "__main__":
    sys.exit(cli(main))
