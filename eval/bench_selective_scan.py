"""Selective scan (Mamba-1) on the GPU: correctness at real shapes, a tile sweep, then a timing table.

    python -m eval.bench_selective_scan [--out FILE.md] [--sweep] [--budget SECONDS] [--shape B,L,D,N] [--docs]
                                        [--baseline REV]

Shape of the target (Mamba-1 at d_model 1536): batch 8, seqlen 4096, d_inner 3072, d_state 16 (`--shape`
changes it; the quality table's jamba is 128,1024,1024,16); bf16 u, delta, z, B, C; fp32 A, D, delta_bias;
delta_softplus; with `--docs` the timed rows are packed documents (seq_idx, a boundary every seqlen / 3
tokens), as in training. Rows: our Triton kernel (kernels/selective_scan/triton_scan.py), with `--baseline
REV` the same file as it was at git revision REV timed beside it (eval/baseline.py; the speed-up of today's
over it is printed under the table), and the PyTorch reference (reference.py, autograd) for fwd and fwd+bwd
(backward of a random dy). mamba-ssm's CUDA `selective_scan_fn` is not installed on the device; its numbers
(1.73 ms fwd, 8.9 ms fwd+bwd, built for sm_90) are quoted, not measured here. The floor is the larger of the
bytes each pass must move at the device's copy bandwidth, its exps on the SFU and its fp32 FLOPs (the rates:
eval/harness.py).
Writes the table to `--out` (default runs/eval/bench_selective_scan/selective_scan.md under the current directory)
and prints its path.
"""
from __future__ import annotations

import argparse
import sys

import torch

from eval import harness
from eval.harness import Work, median_ms
from eval.plots import md_table
from hybrid.errors import cli

BATCH, SEQLEN, D_INNER, D_STATE = 8, 4096, 3072, 16
MAMBA_CUDA_MS = {"fwd": 1.73, "fwd+bwd": 8.9}  # quoted baseline, see module docstring
HEADER = ["kernel", "seqlen", "fwd ms", "fwd (saving states) ms", "fwd+bwd ms", "% of floor fwd",
          "% of floor fwd+bwd"]
# (fwd BLOCK_T, fwd BLOCK_D, fwd warps, bwd BLOCK_D, bwd warps, atomic dB/dC, chunk_size) tried by --sweep;
# a chunk_size equal to BLOCK_T saves the state at every block (more memory, no replay in the backward)
SWEEP = [(8, 16, 1, 8, 1, True, 64), (8, 16, 1, 8, 1, True, 8), (8, 16, 1, 8, 1, False, 64),
         (4, 32, 1, 16, 1, True, 64), (4, 32, 1, 16, 1, True, 4), (4, 32, 1, 16, 1, True, 16),
         (2, 32, 1, 32, 1, True, 2), (4, 32, 1, 32, 1, True, 4), (8, 16, 1, 8, 2, True, 64),
         (8, 16, 1, 8, 4, True, 64), (16, 8, 1, 8, 2, True, 64), (4, 16, 1, 8, 2, True, 64),
         (8, 16, 2, 16, 2, True, 64), (16, 16, 2, 8, 2, True, 64), (8, 32, 1, 8, 2, True, 64),
         (8, 16, 1, 4, 2, True, 64), (4, 32, 2, 8, 4, True, 64)]


def make(batch, seqlen, d_inner, d_state, docs=False, init=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s, dt=torch.bfloat16: torch.randn(*s, generator=g, device="cuda").to(dt)
    A = -torch.arange(1, d_state + 1, device="cuda", dtype=torch.float32).repeat(d_inner, 1)
    A = A * (0.5 + torch.rand(d_inner, d_state, generator=g, device="cuda"))  # (d_inner, d_state)
    args = dict(u=r(batch, seqlen, d_inner), delta=(r(batch, seqlen, d_inner) * 0.5 - 2).bfloat16(), A=A,
                B=r(batch, seqlen, d_state), C=r(batch, seqlen, d_state))
    kw = dict(D=r(d_inner, dt=torch.float32), z=r(batch, seqlen, d_inner),
              delta_bias=r(d_inner, dt=torch.float32) * 0.5, delta_softplus=True)
    if init:
        kw["initial_state"] = r(batch, d_inner, d_state, dt=torch.float32)
    if docs:
        kw["seq_idx"] = harness.doc_ids(batch, seqlen, seqlen // 3)
    return args, kw


def errors(batch, seqlen, d_inner=D_INNER) -> dict[str, float]:
    """Ours on bf16 inputs vs the reference on the same values in fp32: y, final state, every gradient."""
    from kernels.selective_scan import reference as ref
    from kernels.selective_scan.triton_scan import selective_scan
    args, kw = make(batch, seqlen, d_inner, D_STATE, docs=True, init=True)
    leaves, opts = harness.split_leaves({**args, **kw})
    opts["return_final_state"] = True
    return harness.compare_grads(lambda **t: selective_scan(**t, **opts),
                                 lambda **t: ref.selective_scan(**t, **opts), leaves, ("y", "final"))


def correctness(batch, seqlen) -> bool:
    ok = harness.report(f"B={batch} L={seqlen} D={D_INNER} N={D_STATE} bf16 vs fp32 reference",
                        errors(batch, seqlen))
    torch.cuda.empty_cache()
    return ok


def work(batch, seqlen, train, d_inner=D_INNER, d_state=D_STATE) -> Work:
    """What one pass must do at least. fwd: read u, delta, z (bf16), write y; 1 exp and ~6 FLOPs per
    (b, t, d, n). fwd+bwd adds: read u, delta, z, dy, write du, ddelta, dz; recompute 1 exp and ~21 FLOPs per
    element. B and C: read once (fwd), read again and dB, dC written (bwd)."""
    e = batch * seqlen * d_inner
    nbytes = 2 * e * (4 + (7 if train else 0)) + 2 * 2 * batch * seqlen * d_state * (1 + (2 if train else 0))
    elems = e * d_state
    return Work(bytes=nbytes, exps=elems * (2 if train else 1), fp32_flops=elems * (27 if train else 6))


def _set(ts, cand) -> None:
    """One SWEEP entry into the kernel module (TUNING, no per-thread cap, the dB/dC mode)."""
    T, fd, fw, bd, bw, atomic, _ = cand
    harness.set_flat(ts.TUNING, {"fwd.BLOCK_T": T, "fwd.BLOCK_D": fd, "fwd.num_warps": fw, "bwd.BLOCK_D": bd,
                                 "bwd.num_warps": bw})
    ts.MAX_PER_THREAD, ts.ATOMIC_DBC = 1 << 20, atomic


def sweep(budget: harness.Budget, shape: tuple = (BATCH, SEQLEN, D_INNER, D_STATE), docs: bool = False) -> None:
    """Time fwd and fwd+bwd (and the error at a small shape) at each SWEEP entry until the budget is spent;
    the committed settings are restored afterwards (the sweep informs, it does not pick)."""
    from kernels.selective_scan import triton_scan as ts
    args, kw = make(*shape, docs=docs)
    saved = harness.flat(ts.TUNING), ts.MAX_PER_THREAD, ts.ATOMIC_DBC

    def trial(cand):
        _set(ts, cand)
        err = max(errors(1, 1000, 256).values())
        p = harness.passes(ts.selective_scan, **args, **kw, chunk_size=cand[-1])
        print(f"  fwd {median_ms(p.fwd, 50):.3f} ms, err {err:.1e}", flush=True)
        return median_ms(p.fwd_bwd, 50)
    print("sweep: (fwd BLOCK_T, fwd BLOCK_D, fwd warps, bwd BLOCK_D, bwd warps, atomic, chunk): fwd+bwd", flush=True)
    harness.best_of(SWEEP, trial, budget)
    harness.set_flat(ts.TUNING, saved[0])
    ts.MAX_PER_THREAD, ts.ATOMIC_DBC = saved[1], saved[2]


def dump_compiled():
    """Registers, spills and the layouts Triton chose, for every compiled variant of the two kernels."""
    from kernels.selective_scan import triton_scan as ts
    for kern in (ts._selective_scan_fwd_kernel, ts._selective_scan_bwd_kernel):
        try:
            for cache in kern.device_caches.values():
                for key, k in cache[0].items():
                    lay = [l.split("=", 1)[1].strip()[:150] for l in k.asm["ttgir"].splitlines()
                           if l.startswith("#blocked")]
                    print(f"compiled {kern.fn.__name__} warps={k.metadata.num_warps} regs={k.n_regs} "
                          f"spills={k.n_spills} shared={k.metadata.shared}", flush=True)
                    for l in lay[:4]:
                        print("   ", l, flush=True)
        except Exception as e:
            print(f"dump_compiled: {type(e).__name__}: {e}", flush=True)


def measure(ref_seqlen: int, shape: tuple = (BATCH, SEQLEN, D_INNER, D_STATE), docs: bool = False,
            baseline: str = "") -> list[tuple]:
    """(name, seqlen, fwd, fwd saving states, fwd+bwd) in ms: ours at the shape's seqlen (and ours at git
    revision `baseline`), the reference at the longest seqlen up to ref_seqlen that fits (it keeps every step's
    states for autograd)."""
    from eval.baseline import module_at
    from kernels.selective_scan import reference as ref
    from kernels.selective_scan import triton_scan as ts
    kernels = [("triton (ours)", ts)]
    if baseline:
        kernels.append((f"triton (ours at {baseline})", module_at(baseline, ts.__name__)))
    rows = []
    for name, mod in kernels:
        p = _passes(mod.selective_scan, shape, docs)
        rows.append((name, shape[1], median_ms(p.fwd), median_ms(p.train_fwd), median_ms(p.fwd_bwd)))
        print(f"{name}: {rows[-1]}", flush=True)
        del p
        torch.cuda.empty_cache()
    while ref_seqlen >= 64:  # below that the reference row says nothing (a large batch may not fit at all)
        try:
            p = _passes(ref.selective_scan, (shape[0], ref_seqlen, *shape[2:]), docs)
            rows.append(("reference (PyTorch autograd)", ref_seqlen, median_ms(p.fwd, 30), float("nan"),
                         median_ms(p.fwd_bwd, 30)))
            break
        except torch.OutOfMemoryError:
            print(f"reference: out of memory at seqlen {ref_seqlen}", flush=True)
            p = None
            torch.cuda.empty_cache()
            ref_seqlen //= 2
    print(f"ref: {rows[-1] if len(rows) > 1 else 'does not fit at seqlen 64'}", flush=True)
    return rows


def _passes(fn, shape: tuple, docs: bool) -> harness.Passes:
    args, kw = make(*shape, docs=docs)
    return harness.passes(fn, **args, **kw)


def table(rows: list[tuple], ceil: harness.Ceilings, tuning: dict, atomic: bool,
          shape: tuple = (BATCH, SEQLEN, D_INNER, D_STATE), docs: bool = False) -> str:
    """The markdown body: settings, the rows (and mamba-ssm's quoted ones, at their shape only) with % of floor,
    the floors."""
    batch, seqlen, d_inner, d_state = shape
    quoted = [("mamba-ssm CUDA selective_scan_fn (quoted)", SEQLEN, MAMBA_CUDA_MS["fwd"], float("nan"),
               MAMBA_CUDA_MS["fwd+bwd"])] if shape == (BATCH, SEQLEN, D_INNER, D_STATE) and not docs else []
    out = []
    for name, L, f, ft, fb in rows + quoted:
        ff, fl = (ceil.floor_ms(work(batch, L, train, d_inner, d_state))[0] for train in (False, True))
        out.append((name, L, f"{f:.3f}", f"{ft:.3f}", f"{fb:.3f}", f"{100 * ff / f:.0f}%", f"{100 * fl / fb:.0f}%"))
    lines = [f"batch {batch}, d_inner {d_inner}, d_state {d_state}, bf16 u/delta/z/B/C, fp32 A/D/delta_bias, "
             f"D + z + delta_bias + softplus{', packed documents (seq_idx)' if docs else ''}; TUNING {tuning}, "
             f"atomic dB/dC {atomic}." + (" mamba-ssm CUDA numbers quoted (not run here)." if quoted else ""),
             "", md_table(HEADER, out), ""]
    lines += [ceil.floor_line(f"{'fwd+bwd' if t else 'fwd'} at L={seqlen}", work(batch, seqlen, t, d_inner, d_state))
              + "\n" for t in (False, True)]
    return "\n".join(lines)


def bench(a, run: harness.Run) -> int:
    from kernels.selective_scan import triton_scan as ts
    if not a.skip_correctness and not correctness(2, SEQLEN):
        return 1
    if a.sweep:
        sweep(run.budget, a.shape, a.docs)
        dump_compiled()
    rows = measure(min(a.ref_seqlen, a.shape[1]), a.shape, a.docs, a.baseline)
    body = table(rows, run.ceilings, ts.TUNING, ts.ATOMIC_DBC, a.shape, a.docs)
    if a.baseline:
        body += "\n" + speedup_line(rows[0], rows[1], a.baseline) + "\n"
    run.write("selective_scan (Mamba-1)", body)
    return 0


def speedup_line(ours: tuple, base: tuple, rev: str) -> str:
    """How much faster today's kernel is than the one at `rev` (its time / ours), per pass."""
    ratio = [f"{label} {b / o:.2f}x" for label, o, b in zip(("fwd", "fwd saving states", "fwd+bwd"), ours[2:],
                                                             base[2:])]
    bwd = (base[4] - base[3]) / (ours[4] - ours[3])
    return f"Ours over ours at {rev} (their time / ours): {', '.join(ratio)}, backward alone {bwd:.2f}x."


def shape_arg(text: str) -> tuple:
    """--shape B,L,D,N: four positive integers."""
    parts = text.split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected four positive integers batch,seqlen,d_inner,d_state "
                                         "(e.g. 128,1024,1024,16)")
    return tuple(int(p) for p in parts)


def options(ap) -> None:
    ap.add_argument("--ref-seqlen", type=int, default=SEQLEN, help="longest seqlen tried for the reference rows")
    ap.add_argument("--shape", type=shape_arg, default=(BATCH, SEQLEN, D_INNER, D_STATE), metavar="B,L,D,N",
                    help="batch, seqlen, d_inner, d_state of the timed inputs (default: %(default)s)")
    ap.add_argument("--baseline", default="", metavar="REV",
                    help="also time the kernel file as it was at this git revision, beside today's")
    ap.add_argument("--docs", action="store_true",
                    help="packed documents in the timed rows (seq_idx, a boundary every seqlen / 3 tokens)")


def validate(a) -> None:
    if a.baseline:  # the revision and the file there exist (ConfigError naming them), before any GPU work
        from eval.baseline import module_at
        module_at(a.baseline, "kernels.selective_scan.triton_scan")


def main(argv=None):
    return harness.main("bench_selective_scan", __doc__, argv, bench, options, validate, sweep_budget=100.0)


if __name__ == "__main__":
    sys.exit(cli(main))
