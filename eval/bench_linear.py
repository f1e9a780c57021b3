"""Few-row projections (kernels/linear) against the matmul library, on the GPU: a decode step's matmuls.

    python -m eval.bench_linear [--rows 1 4 8 16 32 64] [--out FILE.md]   # runs/eval/bench_linear/linear.md

Cases: the projections of the shipped 128M layouts (d_model 768: q / k / v, o, the SwiGLU's gate and up, down,
Mamba1's in / x / dt / out projections), of the ~370M bench models (d_model 1024: GQA q / k / v, SwiGLU 2816,
Mamba2's in-projection) and of a 7B-class width (4096: q / k / v, SwiGLU 11008), and a 32K-vocabulary head, bf16.
Each is timed as `ops.linears` / `ops.swiglu_linear` run on the Triton kernel (one launch for all weights of a
case; its dispatch limit lifted so every row count is timed) and as the library path (F.linear per weight, plus
the SwiGLU op), 20 calls captured in one CUDA graph as decode steps run. Correctness: the kernel against the
library within bf16 rounding. Floor: the weights' bytes read once at the copy bandwidth. The rows where the
kernel wins are the dispatch rule of `kernels/linear/reference.py fused_pays`.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from eval import harness
from eval.plots import md_table
from hybrid.errors import ConfigError, cli

# name, output widths of the weights sharing one input, K, SwiGLU (the widths are gate / up's)
CASES = [("q/k/v 768", [768, 768, 768], 768, False), ("o 768", [768], 768, False),
         ("gate+up 768->2048", [2048], 768, True), ("down 2048->768", [768], 2048, False),
         ("Mamba1 in 768->3072", [3072], 768, False), ("Mamba1 x_proj 1536->80", [80], 1536, False),
         ("Mamba1 dt_proj 48->1536", [1536], 48, False), ("Mamba1 out 1536->768", [768], 1536, False),
         ("q/k/v 1024 GQA", [1024, 256, 256], 1024, False), ("gate+up 1024->2816", [2816], 1024, True),
         ("down 2816->1024", [1024], 2816, False), ("Mamba2 in 1024->4384", [4384], 1024, False),
         ("q/k/v 4096", [4096] * 3, 4096, False), ("gate+up 4096->11008", [11008], 4096, True),
         ("head 768->32000", [32000], 768, False)]
HEADER = ["case", "rows", "weights MB", "floor us", "library us", "kernel us", "library / kernel", "rel err",
          "dispatched to"]


def row(case, m: int, run: harness.Run) -> list:
    from kernels.linear import reference, triton_gemv
    from kernels import ops
    name, widths, k, swiglu = case
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for n in (widths * 2 if swiglu else widths)]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    nbytes = sum(w.numel() for w in ws) * 2
    if swiglu:
        lib = lambda: ops.swiglu(F.linear(x, ws[0]), F.linear(x, ws[1]))  # noqa: E731
        ker = lambda: triton_gemv.swiglu_linear(x, ws[0], ws[1])  # noqa: E731
        want, got = lib(), ker()
    else:
        lib = lambda: [F.linear(x, w) for w in ws]  # noqa: E731
        ker = lambda: triton_gemv.linears(x, ws)  # noqa: E731
        want, got = torch.cat(lib(), -1), torch.cat(ker(), -1)
    t_lib, t_ker = harness.graph_ms(lib, steps=20) * 1e3, harness.graph_ms(ker, steps=20) * 1e3
    floor = run.floor_ms(harness.Work(bytes=nbytes)) * 1e3
    chosen = "kernel" if reference.fused_pays(m, widths) and m <= reference.MAX_ROWS else "library"
    return [name, m, f"{nbytes / 1e6:.2f}", f"{floor:.2f}", f"{t_lib:.2f}", f"{t_ker:.2f}", f"{t_lib / t_ker:.2f}",
            f"{harness.rel_err(got, want):.1e}", chosen]


def bench(args, run: harness.Run) -> int:
    from kernels.linear import triton_gemv
    triton_gemv.MAX_ROWS, limit = max(args.rows), triton_gemv.MAX_ROWS  # time the kernel past its limit
    triton_gemv.fused_pays = lambda rows, widths: True
    rows = []
    with torch.no_grad():
        for case in CASES:
            for m in args.rows:
                rows.append(row(case, m, run))
                print("| " + " | ".join(map(str, rows[-1])) + " |", flush=True)
    body = "\n".join([f"## Few-row projections, bf16 (kernel dispatch limit {limit} rows)", "", md_table(HEADER, rows)])
    run.write("Few-row projections", body)
    return 0


def options(ap) -> None:
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64], help="row counts to time")


def validate(args) -> None:
    if any(r < 1 or r > 64 for r in args.rows):
        raise ConfigError(f"--rows {' '.join(map(str, args.rows))}: each row count must be in 1..64")


def main(argv=None):
    return harness.main("bench_linear", __doc__, argv, bench, options, validate)


if __name__ == "__main__":
    sys.exit(cli(main))
