"""Mamba-2 chunked SSD scan on the GPU: correctness at real shapes, a kernel breakdown, then a timing table.

    PYTHONPATH=third_party python -m eval.bench_ssd [--out FILE.md] [--sweep] [--budget SECONDS] [--no-ref]

Target shape (Mamba-2, d_model 1536 x expand 2): batch 8, seqlen 4096, nheads 48, headdim 64, d_state 128,
ngroups 1, chunk 256; bf16 x/dt/B/C, fp32 A/D/dt_bias; D (nheads,) + dt_bias + softplus, no z. Also batch 2 x
seqlen 16384. Rows: ours (kernels/ssd/triton_scan.py), mamba-ssm's Triton `mamba_chunk_scan_combined`
(third_party/mamba_ssm, same arguments) and the PyTorch reference (autograd), fwd and fwd+bwd (random dy).
Floor: the larger of bytes at 3.0 TB/s and the chunk matmul FLOPs at 735 TFLOP/s (see floor_ms).
Writes the table to `--out` (default runs/eval/bench_ssd/ssd.md under the current directory)
and prints its path.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time

import torch

from eval.plots import add_out_argument, check_out, write_text
from eval.timing import median_ms as _ms, rel_err as _rel, require_cuda
from hybrid.errors import cli

BATCH, SEQLEN, NHEADS, HEADDIM, DSTATE, NGROUPS, CHUNK = 8, 4096, 48, 64, 128, 1, 256


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
        pos = torch.arange(seqlen, device="cuda")
        kw["seq_idx"] = ((pos >= seqlen // 3).long() + (pos >= seqlen // 3 + 777).long()).expand(batch, -1).contiguous()
    return args, kw


def correctness(batch, seqlen):
    """Ours on bf16 inputs vs the reference on the same values in fp32: y, final state, every gradient."""
    from kernels.ssd import reference as ref
    from kernels.ssd.triton_scan import ssd_chunk_scan
    args, kw = make(batch, seqlen, docs=True, init=True)
    leaves = {k: v for k, v in {**args, **kw}.items() if torch.is_tensor(v) and v.is_floating_point()}
    ours = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    theirs = {k: v.detach().float().requires_grad_() for k, v in leaves.items()}
    opts = {k: v for k, v in kw.items() if k not in leaves}
    y, hT = ssd_chunk_scan(**ours, **opts, chunk_size=CHUNK, return_final_state=True)
    y_ref, hT_ref = ref.ssd_chunk_scan(**theirs, **opts, chunk_size=CHUNK, return_final_state=True)
    dy = torch.randn_like(y_ref)
    dh = torch.randn_like(hT_ref)
    ((y.float() * dy).sum() + (hT * dh).sum()).backward()
    ((y_ref * dy).sum() + (hT_ref * dh).sum()).backward()
    errs = {"y": _rel(y, y_ref), "final": _rel(hT, hT_ref)}
    errs.update({f"d{k}": _rel(ours[k].grad, theirs[k].grad) for k in leaves})
    worst = max(errs.values())
    print(f"correctness B={batch} L={seqlen} H={NHEADS} P={HEADDIM} N={DSTATE} G={NGROUPS} chunk {CHUNK}, docs + "
          f"initial state, bf16 vs fp32 reference: worst rel err {worst:.2e} ({'OK' if worst <= 1e-2 else 'FAIL'})",
          flush=True)
    print("  " + "  ".join(f"{k}={v:.1e}" for k, v in errs.items()), flush=True)
    try:  # the same call through mamba-ssm, as a second opinion on y
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        with torch.no_grad():
            ym = mamba_chunk_scan_combined(**{k: v.detach() for k, v in args.items()}, chunk_size=CHUNK,
                                           D=kw["D"], dt_bias=kw["dt_bias"], dt_softplus=True,
                                           initial_states=kw["initial_state"], seq_idx=kw["seq_idx"].int())
        print(f"  mamba-ssm y vs reference: {_rel(ym, y_ref):.1e}", flush=True)
    except Exception as e:
        print(f"  mamba-ssm comparison skipped: {type(e).__name__}: {str(e)[:200]}", flush=True)
    del y_ref, hT_ref, theirs
    torch.cuda.empty_cache()
    return worst <= 1e-2


def _fns(fn, args, kw, mamba=False):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in {**args, **kw}.items()
              if torch.is_tensor(v) and v.is_floating_point()}
    opts = {k: v for k, v in kw.items() if k not in leaves}
    call = (lambda **a: fn(**a, chunk_size=CHUNK)) if not mamba else (lambda **a: fn(**a, chunk_size=CHUNK))
    dy = torch.randn_like(args["x"])

    def fwd():
        with torch.no_grad():
            call(**args, **kw)

    def fwd_bwd():
        for v in leaves.values():
            v.grad = None
        call(**leaves, **opts).backward(dy)
    return fwd, fwd_bwd


def graphed(fn):
    """fn captured in one CUDA graph (after warm-up calls on a side stream, which also run any autotuning), so
    the time is the GPU's alone: without it a call that enqueues work faster than Python launches it measures
    the launch overhead (about 1.5-3 ms of Python per fwd+bwd of ours, near the GPU time at the target)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def floor_ms(batch, seqlen, train):
    """Lower bound (ms): max of bytes at 3.0 TB/s and chunk-matmul FLOPs at 735 TFLOP/s (bf16 tensor cores).
    Bytes: read x, dt, B, C (bf16), write y; bwd adds reading them again and dy, writing dx, ddt, dB, dC.
    FLOPs per chunk (T = chunk): per group C B^T (causal half, T^2 N); per head S x (T^2 P), chunk state and
    entering-state output (2 T P N each). Bwd per head: S^T dy, dS (T^2 P each), dB, dC (T^2 N each), four
    T P N products (2 T P N each) for the state terms; C B^T again per group."""
    T, P, N, H, G = CHUNK, HEADDIM, DSTATE, NHEADS, NGROUPS
    nc = batch * seqlen / T
    tok = batch * seqlen
    io = 2 * tok * (2 * H * P + H + 2 * G * N)
    flops = nc * (G * T * T * N + H * (T * T * P + 4 * T * P * N))
    if train:
        io += 2 * tok * (2 * H * P + H + 2 * G * N) + 2 * tok * (H * P + H + 2 * G * N) + 4 * tok * H
        flops += nc * (G * T * T * N + H * (2 * T * T * P + 2 * T * T * N + 8 * T * P * N))
    parts = {"bytes": io / 3.0e12, "flops": flops / 735e12}
    return 1e3 * max(parts.values()), {k: 1e3 * v for k, v in parts.items()}


def breakdown(batch=BATCH, seqlen=SEQLEN):
    """Per-kernel CUDA time of one fwd+bwd of ours (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile
    from kernels.ssd.triton_scan import ssd_chunk_scan
    args, kw = make(batch, seqlen)
    _, fwd_bwd = _fns(ssd_chunk_scan, args, kw)
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


SWEEP = [  # (CONFIG key, values tried), in this order, each against the best so far
    ("dsl_programs", [4096, 16384]), ("BT_out", [128, 32]), ("s_out", [3, 2]), ("w_out", [8]),
    ("BT_dx", [32, 128]), ("s_dx", [3, 2]), ("BT_dsl", [32, 128]), ("s_dsl", [3, 2]), ("w_dsl", [8]),
    ("BT_dbdc", [32, 128]), ("programs", [1024, 64]), ("stages", [2, 4]), ("w_state", [8]), ("BT", [32, 128]),
    ("w_dx", [4]), ("w_cb", [4]), ("w_dbdc", [4]), ("carry", [512, 1024, 4096]), ("w_carry", [2, 8]),
]


def sweep(budget_s, t0):
    """Greedy search over the SSD tile settings at the target shape: each key of SWEEP in turn, each value
    against the best fwd+bwd so far (kept when >1% faster); the best ends in CONFIG for the table."""
    from kernels.ssd import triton_scan as ts
    from kernels.ssd.triton_scan import ssd_chunk_scan
    args, kw = make(BATCH, SEQLEN)
    fwd, fwd_bwd = _fns(ssd_chunk_scan, args, kw)
    best_cfg = dict(ts.CONFIG)
    best = _ms(fwd_bwd, 40)
    print(f"sweep start {best_cfg}: fwd {_ms(fwd, 40):.3f} fwd+bwd {best:.3f}", flush=True)
    for key, v in ((key, v) for key, values in SWEEP for v in values):
        if time.time() - t0 > budget_s:
            print("sweep: time budget spent", flush=True)
            break
        ts.CONFIG.clear()
        ts.CONFIG.update({**best_cfg, key: v})
        try:
            f, fb = _ms(fwd, 40), _ms(fwd_bwd, 40)
            print(f"sweep {key}={v}: fwd {f:.3f} fwd+bwd {fb:.3f}", flush=True)
            if fb < 0.99 * best:
                best, best_cfg = fb, dict(ts.CONFIG)
        except Exception as e:
            print(f"sweep {key}={v}: failed {type(e).__name__}: {str(e)[:150]}", flush=True)
    ts.CONFIG.clear()
    ts.CONFIG.update(best_cfg)
    print(f"sweep: using {ts.CONFIG}", flush=True)


def table(shapes, with_ref):
    from kernels.ssd import reference as ref
    from kernels.ssd.triton_scan import CONFIG, ssd_chunk_scan
    rows = []
    for batch, seqlen in shapes:
        args, kw = make(batch, seqlen)
        cands = [("triton (ours)", ssd_chunk_scan, False)]
        try:
            from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
            cands.append(("mamba-ssm mamba_chunk_scan_combined", mamba_chunk_scan_combined, True))
        except Exception as e:
            print(f"mamba-ssm not importable: {e}", flush=True)
        if with_ref and (batch, seqlen) == shapes[0]:
            cands.append(("reference (PyTorch, autograd)", ref.ssd_chunk_scan, False))
        for name, fn, mamba in cands:
            try:
                fwd, fwd_bwd = _fns(fn, args, kw, mamba)
                f, fb = _ms(fwd, 50), _ms(fwd_bwd, 50)
                gf = gfb = float("nan")
                if "reference" not in name:
                    try:
                        gf, gfb = _ms(graphed(fwd), 50), _ms(graphed(fwd_bwd), 50)
                    except Exception as e:
                        print(f"{name}: CUDA graph capture failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                rows.append((name, batch, seqlen, f, fb, gf, gfb))
            except torch.OutOfMemoryError:
                rows.append((name + ": OOM", batch, seqlen) + (float("nan"),) * 4)
            print(f"{rows[-1]}", flush=True)
            torch.cuda.empty_cache()
    lines = [f"# ssd_chunk_scan on {torch.cuda.get_device_name()} ({datetime.date.today()})", "",
             f"`PYTHONPATH=third_party python -m eval.bench_ssd`; nheads {NHEADS}, headdim {HEADDIM}, d_state {DSTATE}, "
             f"ngroups {NGROUPS}, chunk {CHUNK}; bf16 x/dt/B/C, fp32 A/D/dt_bias; D + dt_bias + softplus, no z; "
             f"tiles {CONFIG}.", "",
             "Times are medians of `triton.testing.do_bench`: called from Python (launch overhead included), and "
             "replayed from one CUDA graph (the GPU's time alone); % of floor uses the graph times.", "",
             "| kernel | batch x seqlen | fwd ms | fwd+bwd ms | fwd ms, graph | fwd+bwd ms, graph | % of floor fwd "
             "| % of floor fwd+bwd |",
             "|---|---|---|---|---|---|---|---|"]
    for name, b, L, f, fb, gf, gfb in rows:
        ff, fl = floor_ms(b, L, False)[0], floor_ms(b, L, True)[0]
        pf, pfb = (gf, gfb) if gf == gf else (f, fb)  # graph times when captured
        lines.append(f"| {name} | {b} x {L} | {f:.3f} | {fb:.3f} | {gf:.3f} | {gfb:.3f} | {100 * ff / pf:.0f}% "
                     f"| {100 * fl / pfb:.0f}% |")
    for b, L in shapes:
        for train in (False, True):
            total, parts = floor_ms(b, L, train)
            lines.append(f"\nfloor {'fwd+bwd' if train else 'fwd'} at {b} x {L}: {total:.3f} ms ("
                         + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()) + ")")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.bench_ssd", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out_argument(p, "bench_ssd", "ssd")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--budget", type=float, default=80.0, help="seconds (from start) after which the sweep stops")
    p.add_argument("--no-ref", action="store_true", help="skip the PyTorch reference rows")
    p.add_argument("--skip-correctness", action="store_true")
    p.add_argument("--breakdown", action="store_true")
    p.add_argument("--ref-after", type=float, default=1e9, help="skip the reference rows if started later (s)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    a = p.parse_args(argv)
    check_out(a.out)
    require_cuda("eval.bench_ssd")
    t0 = time.time()
    if not a.skip_correctness and not correctness(2, SEQLEN):
        raise SystemExit(1)
    if a.sweep:
        sweep(a.budget, t0)
        if not a.skip_correctness and not correctness(2, SEQLEN):  # the settings the sweep picked
            raise SystemExit(1)
    if a.breakdown:
        breakdown()
        breakdown(2, 4 * SEQLEN)
    text = table([(BATCH, SEQLEN), (2, 4 * SEQLEN)], not a.no_ref and time.time() - t0 < a.ref_after)
    print(text, flush=True)
    write_text(a.out, text + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    sys.exit(cli(main))
