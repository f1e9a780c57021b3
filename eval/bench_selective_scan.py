"""Selective scan (Mamba-1) on the GPU: correctness at real shapes, a tile sweep, then a timing table.

    python -m eval.bench_selective_scan [--out FILE.md] [--sweep] [--budget SECONDS]

Shape of the target (Mamba-1 at d_model 1536): batch 8, seqlen 4096, d_inner 3072, d_state 16; bf16 u, delta,
z, B, C; fp32 A, D, delta_bias; delta_softplus. Rows: our Triton kernel (kernels/selective_scan/triton_scan.py)
and the PyTorch reference (reference.py, autograd) for fwd and fwd+bwd (backward of a random dy). mamba-ssm's
CUDA `selective_scan_fn` is not installed on the device; its numbers (1.73 ms fwd, 8.9 ms fwd+bwd, built for
sm_90) are quoted, not measured here. The floor is the larger of the bytes each pass must move at 3.0 TB/s,
its exps on the SFU (16 per clock per SM) and its fp32 FLOPs at 60 TFLOP/s.
Writes the table to `--out` (default runs/eval/bench_selective_scan/selective_scan.md under the current directory)
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

BATCH, SEQLEN, D_INNER, D_STATE = 8, 4096, 3072, 16
MAMBA_CUDA_MS = {"fwd": 1.73, "fwd+bwd": 8.9}  # quoted baseline, see module docstring


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
        pos = torch.arange(seqlen, device="cuda")
        kw["seq_idx"] = ((pos >= seqlen // 3).long() + (pos >= seqlen // 3 + 777).long()).expand(batch, -1).contiguous()
    return args, kw


def correctness(batch, seqlen, d_inner=D_INNER, quiet=False):
    """Ours on bf16 inputs vs the reference on the same values in fp32: y, final state, every gradient."""
    from kernels.selective_scan import reference as ref
    from kernels.selective_scan.triton_scan import selective_scan
    args, kw = make(batch, seqlen, d_inner, D_STATE, docs=True, init=True)
    leaves = {k: v for k, v in {**args, **kw}.items() if torch.is_tensor(v) and v.is_floating_point()}
    ours = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    theirs = {k: v.detach().float().requires_grad_() for k, v in leaves.items()}
    opts = {k: v for k, v in kw.items() if k not in leaves}
    y, hT = selective_scan(**ours, **opts, return_final_state=True)
    y_ref, hT_ref = ref.selective_scan(**theirs, **opts, return_final_state=True)
    dy = torch.randn_like(y_ref)
    dh = torch.randn_like(hT_ref)
    ((y.float() * dy).sum() + (hT * dh).sum()).backward()
    ((y_ref * dy).sum() + (hT_ref * dh).sum()).backward()
    errs = {"y": _rel(y, y_ref), "final": _rel(hT, hT_ref)}
    errs.update({f"d{k}": _rel(ours[k].grad, theirs[k].grad) for k in leaves})
    worst = max(errs.values())
    if quiet:
        return worst
    print(f"correctness B={batch} L={seqlen} D={D_INNER} N={D_STATE} bf16 vs fp32 reference: worst rel err "
          f"{worst:.2e} ({'OK' if worst <= 1e-2 else 'FAIL'})", flush=True)
    print("  " + "  ".join(f"{k}={v:.1e}" for k, v in errs.items()), flush=True)
    del y_ref, hT_ref, theirs
    torch.cuda.empty_cache()
    return worst <= 1e-2


def _fns(fn, args, kw):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in {**args, **kw}.items()
              if torch.is_tensor(v) and v.is_floating_point()}
    opts = {k: v for k, v in kw.items() if k not in leaves}
    dy = torch.randn_like(args["u"])

    def fwd():
        with torch.no_grad():
            fn(**args, **kw)

    def fwd_train():
        fn(**leaves, **opts)

    def fwd_bwd():
        for v in leaves.values():
            v.grad = None
        fn(**leaves, **opts).backward(dy)
    return fwd, fwd_train, fwd_bwd


def floor_ms(batch, seqlen, train):
    """Lower bound (ms) of one pass: the max of bytes at 3.0 TB/s, exps at 16/clk/SM (132 SMs, 1.98 GHz) and
    fp32 FLOPs at 60 TFLOP/s. fwd: read u, delta, z (bf16), write y; 1 exp and ~6 FLOPs per (b, t, d, n).
    fwd+bwd adds: read u, delta, z, dy, write du, ddelta, dz; recompute 1 exp and ~21 FLOPs per element."""
    e = batch * seqlen * D_INNER
    nbytes = 2 * e * (4 + (7 if train else 0)) + 2 * 2 * batch * seqlen * D_STATE * (1 + (2 if train else 0))
    elems = e * D_STATE
    exps = elems * (2 if train else 1)
    flops = elems * (27 if train else 6)
    parts = {"bytes": nbytes / 3.0e12, "exp": exps / (16 * 132 * 1.98e9), "flops": flops / 60e12}
    return 1e3 * max(parts.values()), {k: 1e3 * v for k, v in parts.items()}


def sweep(budget_s, t0):
    """Time fwd and fwd+bwd at a few tile shapes; stops when the time budget is spent."""
    from kernels.selective_scan import triton_scan as ts
    from kernels.selective_scan.triton_scan import selective_scan
    args, kw = make(BATCH, SEQLEN, D_INNER, D_STATE)
    configs = [  # (BLOCK_T, fwd BLOCK_D, fwd warps, bwd BLOCK_D, bwd warps, atomic dB/dC, chunk_size)
        (8, 16, 1, 8, 1, True, 64), (8, 16, 1, 8, 1, True, 8), (8, 16, 1, 8, 2, True, 64),
        (8, 16, 1, 8, 4, True, 64), (16, 8, 1, 8, 2, True, 64), (4, 16, 1, 8, 2, True, 64),
        (8, 16, 2, 16, 2, True, 64), (16, 16, 2, 8, 2, True, 64), (8, 32, 1, 8, 2, True, 64),
        (8, 16, 1, 4, 2, True, 64), (4, 32, 2, 8, 4, True, 64),
    ]
    saved = dict(ts.FWD_CONFIG), dict(ts.BWD_CONFIG), ts.MAX_PER_THREAD, ts.ATOMIC_DBC
    print("sweep: T fwdD fwdW bwdD bwdW atomic chunk | fwd ms | fwd+bwd ms", flush=True)
    for T, fd, fw, bd, bw, at, chunk in configs:
        if time.time() - t0 > budget_s:
            print("sweep: time budget spent", flush=True)
            break
        ts.FWD_CONFIG.update(BLOCK_T=T, BLOCK_D=fd, num_warps=fw)
        ts.BWD_CONFIG.update(BLOCK_D=bd, num_warps=bw)
        ts.MAX_PER_THREAD, ts.ATOMIC_DBC = 1 << 20, at
        try:
            err = correctness(1, 1000, 256, quiet=True)
            fwd, _, fwd_bwd = _fns(selective_scan, args, dict(kw, chunk_size=chunk))
            print(f"sweep: {T} {fd} {fw} {bd} {bw} {at} {chunk} | {_ms(fwd, 50):.3f} | {_ms(fwd_bwd, 50):.3f} | "
                  f"err {err:.1e}",
                  flush=True)
        except Exception as e:  # a tile that does not compile or runs out of resources
            print(f"sweep: {T} {fd} {fw} {bd} {bw} {at} {chunk} | failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
    ts.FWD_CONFIG, ts.BWD_CONFIG = saved[0], saved[1]
    ts.MAX_PER_THREAD, ts.ATOMIC_DBC = saved[2], saved[3]


def dump_compiled():
    """Registers, spills and the layouts Triton chose, for every compiled variant of the two kernels."""
    from kernels.selective_scan import triton_scan as ts
    for kern in (ts._fwd_kernel, ts._bwd_kernel):
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


def table(ref_seqlen):
    from kernels.selective_scan import reference as ref
    from kernels.selective_scan import triton_scan as ts
    rows = []
    args, kw = make(BATCH, SEQLEN, D_INNER, D_STATE)
    fwd, fwd_train, fwd_bwd = _fns(ts.selective_scan, args, kw)
    rows.append(("triton (ours)", SEQLEN, _ms(fwd), _ms(fwd_train), _ms(fwd_bwd)))
    print(f"ours: {rows[-1]}", flush=True)
    del args, kw, fwd, fwd_train, fwd_bwd
    torch.cuda.empty_cache()
    while True:  # the reference keeps every step's (batch, nchunks, d_inner, d_state) tensors for autograd
        try:
            args, kw = make(BATCH, ref_seqlen, D_INNER, D_STATE)
            fwd, _, fwd_bwd = _fns(ref.selective_scan, args, kw)
            rows.append(("reference (PyTorch autograd)", ref_seqlen, _ms(fwd, 30), float("nan"), _ms(fwd_bwd, 30)))
            break
        except torch.OutOfMemoryError:
            print(f"reference: out of memory at seqlen {ref_seqlen}", flush=True)
            args = kw = fwd = fwd_bwd = None
            torch.cuda.empty_cache()
            ref_seqlen //= 2
    print(f"ref: {rows[-1]}", flush=True)
    lines = [f"# selective_scan on {torch.cuda.get_device_name()} ({datetime.date.today()})", "",
             f"`python -m eval.bench_selective_scan`; batch {BATCH}, d_inner {D_INNER}, d_state {D_STATE}, bf16 "
             f"u/delta/z/B/C, fp32 A/D/delta_bias, D + z + delta_bias + softplus; tiles fwd {ts.FWD_CONFIG}, "
             f"bwd {ts.BWD_CONFIG}, atomic dB/dC {ts.ATOMIC_DBC}. mamba-ssm CUDA numbers quoted (not run here).",
             "", "| kernel | seqlen | fwd ms | fwd (saving states) ms | fwd+bwd ms | % of floor fwd | % of floor fwd+bwd |",
             "|---|---|---|---|---|---|---|"]
    for name, L, f, ft, fb in rows + [("mamba-ssm CUDA selective_scan_fn (quoted)", SEQLEN, MAMBA_CUDA_MS["fwd"],
                                        float("nan"), MAMBA_CUDA_MS["fwd+bwd"])]:
        ff, fl = floor_ms(BATCH, L, False)[0], floor_ms(BATCH, L, True)[0]
        lines.append(f"| {name} | {L} | {f:.3f} | {ft:.3f} | {fb:.3f} | {100 * ff / f:.0f}% | {100 * fl / fb:.0f}% |")
    for train in (False, True):
        total, parts = floor_ms(BATCH, SEQLEN, train)
        lines.append(f"\nfloor {'fwd+bwd' if train else 'fwd'} at L={SEQLEN}: {total:.3f} ms ("
                     + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()) + ")")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.bench_selective_scan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out_argument(p, "bench_selective_scan", "selective_scan")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--budget", type=float, default=100.0, help="seconds for the sweep")
    p.add_argument("--ref-seqlen", type=int, default=SEQLEN)
    p.add_argument("--skip-correctness", action="store_true")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    a = p.parse_args(argv)
    check_out(a.out)
    require_cuda("eval.bench_selective_scan")
    t0 = time.time()
    if not a.skip_correctness and not correctness(2, SEQLEN):
        sys.exit(1)
    if a.sweep:
        sweep(a.budget, t0)
        dump_compiled()
    text = table(a.ref_seqlen)
    print(text, flush=True)
    write_text(a.out, text + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    sys.exit(cli(main))
