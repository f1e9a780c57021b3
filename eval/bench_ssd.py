"""Mamba-2 chunked SSD scan on the GPU: correctness at real shapes, a kernel breakdown, then a timing table.

    PYTHONPATH=third_party python -m eval.bench_ssd [--out FILE.md] [--sweep] [--budget SECONDS] [--no-ref]

Target shape (Mamba-2, d_model 1536 x expand 2): batch 8, seqlen 4096, nheads 48, headdim 64, d_state 128,
ngroups 1, chunk 256; bf16 x/dt/B/C, fp32 A/D/dt_bias; D (nheads,) + dt_bias + softplus, no z. Also batch 2 x
seqlen 16384. Rows: ours (kernels/ssd/triton_scan.py), mamba-ssm's Triton `mamba_chunk_scan_combined`
(third_party/mamba_ssm, same arguments) and the PyTorch reference (autograd), fwd and fwd+bwd (random dy).
Floor: the larger of the bytes at the device's copy bandwidth and the chunk matmul FLOPs at its bf16 matmul
rate (see work; the rates: eval/harness.py). Writes the table to `--out` (default runs/eval/bench_ssd/ssd.md
under the current directory) and prints its path.
"""
from __future__ import annotations

import sys
import time

import torch

from eval import harness
from eval.harness import Work, graph_ms, median_ms, rel_err
from eval.plots import md_table
from hybrid.errors import cli

BATCH, SEQLEN, NHEADS, HEADDIM, DSTATE, NGROUPS, CHUNK = 8, 4096, 48, 64, 128, 1, 256
SHAPES = [(BATCH, SEQLEN), (2, 4 * SEQLEN)]  # (batch, seqlen) of the table
HEADER = ["kernel", "batch x seqlen", "fwd ms", "fwd+bwd ms", "fwd ms, graph", "fwd+bwd ms, graph",
          "% of floor fwd", "% of floor fwd+bwd"]
SWEEP = [  # ("kernel.setting" of TUNING, values tried), in this order, each against the best so far
    ("bwd_dsl.programs", [4096, 16384]), ("chunk_out.BT", [128, 32]), ("chunk_out.num_stages", [3, 2]),
    ("chunk_out.num_warps", [8]), ("bwd_dx.BT", [32, 128]), ("bwd_dx.num_stages", [3, 2]), ("bwd_dsl.BT", [32, 128]),
    ("bwd_dsl.num_stages", [3, 2]), ("bwd_dsl.num_warps", [8]), ("bwd_dbdc.BT", [32, 128]),
    ("bwd_dbdc.programs", [1024, 64]), ("chunk_state.num_stages", [2, 4]), ("cb.num_stages", [2, 4]),
    ("bwd_dbdc.num_stages", [2, 4]), ("chunk_state.num_warps", [8]), ("chunk_state.BT", [32, 128]),
    ("bwd_dx.num_warps", [4]), ("cb.num_warps", [4]), ("bwd_dbdc.num_warps", [4]), ("carry.BLK", [512, 1024, 4096]),
    ("carry.num_warps", [2, 8]),
]


def tuning() -> dict:
    """TUNING of ours ({kernel: launch settings}, kernels/ssd/triton_scan.py): the sweep edits it in place."""
    from kernels.ssd import triton_scan as ts
    return ts.TUNING


def make(batch, seqlen, docs=False, init=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s, dt=torch.bfloat16: torch.randn(*s, generator=g, device="cuda").to(dt)
    args = dict(x=r(batch, seqlen, NHEADS, HEADDIM), dt=r(batch, seqlen, NHEADS),
                A=-torch.exp(torch.rand(NHEADS, generator=g, device="cuda") * 2.7),  # A in [-16, -1], as Mamba2 init
                B=r(batch, seqlen, NGROUPS, DSTATE), C=r(batch, seqlen, NGROUPS, DSTATE))
    kw = dict(D=r(NHEADS, dt=torch.float32), dt_bias=(r(NHEADS, dt=torch.float32) * 0.5 - 3.0), dt_softplus=True)
    if init:
        kw["initial_state"] = r(batch, NHEADS, HEADDIM, DSTATE, dt=torch.float32)
    if docs:
        kw["seq_idx"] = harness.doc_ids(batch, seqlen, seqlen // 3)
    return args, kw


def _passes(fn, batch, seqlen) -> harness.Passes:
    args, kw = make(batch, seqlen)
    return harness.passes(fn, **args, **kw, chunk_size=CHUNK)


def correctness(batch, seqlen) -> bool:
    """Ours on bf16 inputs vs the reference on the same values in fp32: y, final state, every gradient; and
    mamba-ssm's y, where it imports, as a second opinion."""
    from kernels.ssd import reference as ref
    from kernels.ssd.triton_scan import ssd_chunk_scan
    args, kw = make(batch, seqlen, docs=True, init=True)
    leaves, opts = harness.split_leaves({**args, **kw})
    opts.update(chunk_size=CHUNK, return_final_state=True)
    errs = harness.compare_grads(lambda **t: ssd_chunk_scan(**t, **opts), lambda **t: ref.ssd_chunk_scan(**t, **opts),
                                 leaves, ("y", "final"))
    ok = harness.report(f"B={batch} L={seqlen} H={NHEADS} P={HEADDIM} N={DSTATE} G={NGROUPS} chunk {CHUNK}, docs + "
                        "initial state, bf16 vs fp32 reference", errs)
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        with torch.no_grad():
            y_ref = ref.ssd_chunk_scan(**{k: v.float() for k, v in leaves.items()}, **opts)[0]
            ym = mamba_chunk_scan_combined(**args, chunk_size=CHUNK, D=kw["D"], dt_bias=kw["dt_bias"],
                                           dt_softplus=True, initial_states=kw["initial_state"],
                                           seq_idx=kw["seq_idx"].int())
        print(f"  mamba-ssm y vs reference: {rel_err(ym, y_ref):.1e}", flush=True)
    except Exception as e:
        print(f"  mamba-ssm comparison skipped: {type(e).__name__}: {str(e)[:200]}", flush=True)
    torch.cuda.empty_cache()
    return ok


def work(batch, seqlen, train, nheads=NHEADS, headdim=HEADDIM, d_state=DSTATE, ngroups=NGROUPS,
         chunk=CHUNK) -> Work:
    """What one pass must do at least. Bytes: read x, dt, B, C (bf16), write y; bwd adds reading them again and
    dy, writing dx, ddt, dB, dC. FLOPs per chunk (T = chunk): per group C B^T (causal half, T^2 N); per head S x
    (T^2 P), chunk state and entering-state output (2 T P N each). Bwd per head: S^T dy, dS (T^2 P each), dB, dC
    (T^2 N each), four T P N products (2 T P N each) for the state terms; C B^T again per group."""
    T, P, N, H, G = chunk, headdim, d_state, nheads, ngroups
    nc = batch * seqlen / T
    tok = batch * seqlen
    io = 2 * tok * (2 * H * P + H + 2 * G * N)
    flops = nc * (G * T * T * N + H * (T * T * P + 4 * T * P * N))
    if train:
        io += 2 * tok * (2 * H * P + H + 2 * G * N) + 2 * tok * (H * P + H + 2 * G * N) + 4 * tok * H
        flops += nc * (G * T * T * N + H * (2 * T * T * P + 2 * T * T * N + 8 * T * P * N))
    return Work(bytes=io, tensor_flops=flops)


def breakdown(batch=BATCH, seqlen=SEQLEN):
    """Per-kernel CUDA time of one fwd+bwd of ours (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile
    from kernels.ssd.triton_scan import ssd_chunk_scan
    fwd_bwd = _passes(ssd_chunk_scan, batch, seqlen).fwd_bwd
    fwd_bwd()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fwd_bwd()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / 1e3, e.count) for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    print(f"breakdown at {batch} x {seqlen} (ms, one fwd+bwd):", flush=True)
    for k, t, n in rows[:14]:
        print(f"  {t:7.3f}  x{n}  {k[:90]}", flush=True)


def sweep(budget: harness.Budget) -> None:
    """Greedy search over TUNING at the target shape (harness.greedy over SWEEP, fwd+bwd timed from Python,
    kept when >1% faster); the best stays set for the table."""
    from kernels.ssd.triton_scan import ssd_chunk_scan
    p = _passes(ssd_chunk_scan, BATCH, SEQLEN)

    def trial(settings):
        harness.set_flat(tuning(), settings)
        print(f"  fwd {median_ms(p.fwd, 40):.3f} ms", flush=True)
        return median_ms(p.fwd_bwd, 40)
    best, _ = harness.greedy(harness.flat(tuning()), SWEEP, trial, budget)
    harness.set_flat(tuning(), best)
    print(f"sweep: using {tuning()}", flush=True)


def candidates(with_ref: bool) -> list:
    from kernels.ssd import reference as ref
    from kernels.ssd.triton_scan import ssd_chunk_scan
    out = [("triton (ours)", ssd_chunk_scan)]
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        out.append(("mamba-ssm mamba_chunk_scan_combined", mamba_chunk_scan_combined))
    except Exception as e:
        print(f"mamba-ssm not importable: {e}", flush=True)
    return out + ([("reference (PyTorch, autograd)", ref.ssd_chunk_scan)] if with_ref else [])


def time_row(name, fn, batch, seqlen) -> tuple:
    """(name, batch, seqlen, fwd, fwd+bwd, the same replayed from a CUDA graph): ms; the reference is not graphed."""
    p = _passes(fn, batch, seqlen)
    f, fb = median_ms(p.fwd, 50), median_ms(p.fwd_bwd, 50)
    gf = gfb = float("nan")
    if "reference" not in name:
        try:
            gf, gfb = graph_ms(p.fwd, rep=50), graph_ms(p.fwd_bwd, rep=50)
        except Exception as e:
            print(f"{name}: CUDA graph capture failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
    return name, batch, seqlen, f, fb, gf, gfb


def measure(with_ref: bool) -> list[tuple]:
    rows = []
    for batch, seqlen in SHAPES:
        for name, fn in candidates(with_ref and (batch, seqlen) == SHAPES[0]):
            try:
                rows.append(time_row(name, fn, batch, seqlen))
            except torch.OutOfMemoryError:
                rows.append((name + ": OOM", batch, seqlen) + (float("nan"),) * 4)
            print(f"{rows[-1]}", flush=True)
            torch.cuda.empty_cache()
    return rows


def table(rows: list[tuple], ceil: harness.Ceilings, cfg: dict) -> str:
    """The markdown body: settings, the rows with % of floor (graph times where captured), the floors."""
    out = []
    for name, b, L, f, fb, gf, gfb in rows:
        pf, pfb = (gf, gfb) if gf == gf else (f, fb)
        floors = [ceil.floor_ms(work(b, L, train))[0] for train in (False, True)]
        out.append((name, f"{b} x {L}", *(f"{t:.3f}" for t in (f, fb, gf, gfb)),
                    f"{100 * floors[0] / pf:.0f}%", f"{100 * floors[1] / pfb:.0f}%"))
    lines = [f"nheads {NHEADS}, headdim {HEADDIM}, d_state {DSTATE}, ngroups {NGROUPS}, chunk {CHUNK}; bf16 "
             f"x/dt/B/C, fp32 A/D/dt_bias; D + dt_bias + softplus, no z; TUNING {cfg}.", "",
             "Times are medians of `triton.testing.do_bench`: called from Python (launch overhead included), and "
             "replayed from one CUDA graph (the GPU's time alone); % of floor uses the graph times.", "",
             md_table(HEADER, out), ""]
    lines += [ceil.floor_line(f"{'fwd+bwd' if t else 'fwd'} at {b} x {L}", work(b, L, t)) + "\n"
              for b, L in SHAPES for t in (False, True)]
    return "\n".join(lines)


def options(ap) -> None:
    ap.add_argument("--no-ref", action="store_true", help="skip the PyTorch reference rows")
    ap.add_argument("--breakdown", action="store_true", help="per-kernel GPU time of one fwd+bwd (profiler)")
    ap.add_argument("--ref-after", type=float, default=1e9, help="skip the reference rows if started later (s)")


def bench(a, run: harness.Run) -> int:
    if not a.skip_correctness and not correctness(2, SEQLEN):
        return 1
    if a.sweep:
        sweep(run.budget)
        if not a.skip_correctness and not correctness(2, SEQLEN):  # the settings the sweep picked
            return 1
    if a.breakdown:
        breakdown()
        breakdown(2, 4 * SEQLEN)
    rows = measure(not a.no_ref and time.time() - run.budget.start < a.ref_after)
    run.write("ssd_chunk_scan (Mamba-2 chunked scan)", table(rows, run.ceilings, tuning()))
    return 0


def main(argv=None):
    return harness.main("bench_ssd", __doc__, argv, bench, options, sweep_budget=80.0)


if __name__ == "__main__":
    sys.exit(cli(main))
