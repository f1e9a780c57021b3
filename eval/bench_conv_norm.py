"""Causal conv1d and gated RMSNorm (training kernels) on the GPU: correctness at real shapes, a small tile
sweep, then a timing table.

    PYTHONPATH=third_party python -m eval.bench_conv_norm [--out FILE.md] [--sweep] [--budget SECONDS]

Shapes: conv (Mamba2 xBC) batch 8, seqlen 4096, channels 3328 (3072 + 2*128), width 4, bias, SiLU, seq_idx with
two boundaries; x is a channel slice of a wider bf16 projection (as in the model). Norm: rows 8*4096, d 3072,
group_size 3072, z given, norm_before_gate False; bf16 x/z, fp32 weight. Rows: ours (Triton), the PyTorch
reference (autograd), mamba-ssm's Triton rmsnorm_fn when it imports, and a device copy of the same bytes.
Floor: bytes each pass must move at 3.0 TB/s (conv fwd: read x, write out; bwd: read x, dout, write dx (the
dpre round trip of our two-pass backward is not counted); norm fwd: read x, z, write out; bwd: read x, z, dy,
write dx, dz; weights and per-row stats are negligible).
Writes the table to `--out` (default runs/eval/bench_conv_norm/conv_norm.md under the current directory)
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

B, L, C, W, EXTRA = 8, 4096, 3328, 4, 3072 + 48  # EXTRA: other channels of the in_proj output around xBC
ROWS, D, GROUP = 8 * 4096, 3072, 3072
EPS = 1e-5
HBM = 3.0e12


def conv_inputs(batch=B, seed=0, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    proj = torch.randn(batch, L, C + EXTRA, generator=g, device="cuda").to(dtype)  # (batch, seqlen, in_proj out)
    x = proj[..., 1000:1000 + C]  # (batch, seqlen, channels), strided like xBC in the model
    w = torch.randn(C, W, generator=g, device="cuda") * 0.5
    b = torch.randn(C, generator=g, device="cuda") * 0.1
    pos = torch.arange(L, device="cuda")
    seq_idx = ((pos >= 1500).int() + (pos >= 1500 + 777).int()).expand(batch, -1).contiguous()  # (batch, seqlen)
    return x, w, b, seq_idx


def norm_inputs(rows=ROWS, seed=0, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(rows, D, generator=g, device="cuda").to(dtype)
    z = torch.randn(rows, D, generator=g, device="cuda").to(dtype)
    w = 1 + 0.1 * torch.randn(D, generator=g, device="cuda")
    return x, z, w


def correctness():
    """Ours on bf16 inputs vs the reference on the same values in fp32 (real channel count, batch 2)."""
    from kernels.conv1d import reference as cref
    from kernels.conv1d.triton_conv import causal_conv1d
    from kernels.norm import reference as nref
    from kernels.norm.triton_norm import rmsnorm_gated
    ok = True
    x, w, b, seq_idx = conv_inputs(batch=2, seed=1)
    h = torch.randn(2, C, W - 1, device="cuda")
    ours = [t.detach().clone().requires_grad_() for t in (x, w, b, h)]
    theirs = [t.detach().float().requires_grad_() for t in (x, w, b, h)]
    y, f = causal_conv1d(*ours[:3], seq_idx=seq_idx, initial_state=ours[3], return_final_state=True)
    yr, fr = cref.causal_conv1d(*theirs[:3], seq_idx=seq_idx, initial_state=theirs[3], return_final_state=True)
    dy, df = torch.randn_like(yr), torch.randn_like(fr)
    ((y.float() * dy).sum() + (f.float() * df).sum()).backward()
    ((yr * dy).sum() + (fr * df).sum()).backward()
    errs = {"y": _rel(y, yr), "final": _rel(f, fr)}
    errs.update({f"d{n}": _rel(a.grad, r.grad) for n, a, r in zip(("x", "w", "b", "h0"), ours, theirs)})
    worst = max(errs.values())
    ok &= worst <= 1e-2
    print(f"correctness conv B=2 L={L} C={C} W={W} bf16 vs fp32 ref: worst {worst:.2e} "
          + "  ".join(f"{k}={v:.1e}" for k, v in errs.items()), flush=True)
    x, z, w = norm_inputs(rows=4096, seed=1)
    ours = [t.detach().clone().requires_grad_() for t in (x, z, w)]
    theirs = [t.detach().float().requires_grad_() for t in (x, z, w)]
    for nbg, gs in ((False, GROUP), (True, 384)):
        for t in ours + theirs:
            t.grad = None
        out = rmsnorm_gated(*ours, EPS, group_size=gs, norm_before_gate=nbg)
        outr = nref.rmsnorm_gated(*theirs, EPS, group_size=gs, norm_before_gate=nbg)
        dy = torch.randn_like(outr)
        (out.float() * dy).sum().backward()
        (outr * dy).sum().backward()
        errs = {"out": _rel(out, outr)}
        errs.update({f"d{n}": _rel(a.grad, r.grad) for n, a, r in zip(("x", "z", "w"), ours, theirs)})
        worst = max(errs.values())
        ok &= worst <= 1e-2
        print(f"correctness norm rows=4096 d={D} group={gs} nbg={nbg} bf16 vs fp32 ref: worst {worst:.2e} "
              + "  ".join(f"{k}={v:.1e}" for k, v in errs.items()), flush=True)
    torch.cuda.empty_cache()
    return ok


def conv_fns(fn):
    x, w, b, seq_idx = conv_inputs()
    leaves = [t.detach().clone().requires_grad_() for t in (w, b)]
    xl = x.detach()
    xl.requires_grad_()  # a leaf that keeps the slice's strides
    dy = torch.randn(B, L, C, device="cuda", dtype=x.dtype)

    def fwd():
        with torch.no_grad():
            fn(x, w, b, seq_idx=seq_idx)

    def fwd_bwd():
        for t in leaves + [xl]:
            t.grad = None
        fn(xl, *leaves, seq_idx=seq_idx).backward(dy)
    return fwd, fwd_bwd


def norm_fns(fn):
    x, z, w = norm_inputs()
    leaves = [t.detach().clone().requires_grad_() for t in (x, z, w)]
    dy = torch.randn_like(x)

    def fwd():
        with torch.no_grad():
            fn(x, z, w)

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(dy)
    return fwd, fwd_bwd


def copy_ms(nbytes):
    """A device-to-device copy moving nbytes in total (nbytes / 2 read, nbytes / 2 written)."""
    src = torch.empty(int(nbytes // 4), dtype=torch.int16, device="cuda")
    dst = torch.empty_like(src)
    return _ms(lambda: dst.copy_(src))


def sweep(budget_s, t0):
    from kernels.conv1d import triton_conv as tc
    from kernels.norm import triton_norm as tn
    print("sweep conv fwd: BLOCK_L BLOCK_C warps | ms", flush=True)
    best = (float("inf"), None)
    for bl, bc, nw in [(32, 128, 4), (16, 256, 4), (32, 64, 2)]:
        tc.FWD_CONFIG = dict(BLOCK_L=bl, BLOCK_C=bc, num_warps=nw)
        fwd, _ = conv_fns(tc.causal_conv1d)
        ms = _ms(fwd, 50)
        best = min(best, (ms, dict(tc.FWD_CONFIG)), key=lambda t: t[0])
        print(f"  {bl} {bc} {nw} | {ms:.3f}", flush=True)
    tc.FWD_CONFIG = best[1]
    print("sweep conv fwd+bwd: pass1 (BLOCK_L BLOCK_C CHUNK warps) atomic | pass2 (BLOCK_L BLOCK_C warps) "
          "dpre_fp32 | ms", flush=True)
    best = (float("inf"), None)
    p2 = (32, 128, 4)
    for p1, at, f32 in [((32, 128, 512, 4), False, True), ((32, 128, 128, 4), False, True),
                        ((32, 128, 64, 4), False, True), ((32, 128, 32, 4), False, True),
                        ((32, 128, 32, 4), True, True), ((32, 128, 128, 4), True, True),
                        ((16, 128, 64, 4), False, True), ((32, 64, 128, 2), False, True),
                        ((32, 128, 64, 4), False, False), ((32, 128, 32, 4), True, False)]:
        if time.time() - t0 > budget_s:
            break
        tc.BWD_CONFIG = dict(BLOCK_L=p1[0], BLOCK_C=p1[1], CHUNK=p1[2], num_warps=p1[3])
        tc.DX_CONFIG = dict(BLOCK_L=p2[0], BLOCK_C=p2[1], num_warps=p2[2])
        tc.ATOMIC_DW, tc.DPRE_FP32 = at, f32
        _, fwd_bwd = conv_fns(tc.causal_conv1d)
        ms = _ms(fwd_bwd, 50)
        cand = (dict(tc.BWD_CONFIG), dict(tc.DX_CONFIG), at, f32)
        best = min(best, (ms, cand), key=lambda t: t[0])
        print(f"  {p1} {at} | {p2} {f32} | {ms:.3f}", flush=True)
    tc.BWD_CONFIG, tc.DX_CONFIG, tc.ATOMIC_DW, tc.DPRE_FP32 = best[1]
    x, w, b, seq_idx = conv_inputs()
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    out = tc.causal_conv1d(*leaves, seq_idx=seq_idx)
    dy = torch.randn_like(out)
    print(f"conv backward only (best): {_ms(lambda: out.backward(dy, retain_graph=True), 50):.3f} ms", flush=True)
    print(f"conv picked: fwd {tc.FWD_CONFIG} bwd {tc.BWD_CONFIG} dx {tc.DX_CONFIG} atomic {tc.ATOMIC_DW} "
          f"dpre_fp32 {tc.DPRE_FP32}", flush=True)
    print("sweep norm: warps programs/SM | fwd ms | fwd+bwd ms", flush=True)
    best = (float("inf"), None)
    for nw, pps in [(16, 2), (16, 1), (16, 4), (32, 1)]:
        if time.time() - t0 > budget_s:
            break
        tn.NUM_WARPS, tn.BWD_PROGRAMS_PER_SM = nw, pps
        fwd, fwd_bwd = norm_fns(lambda x, z, w: tn.rmsnorm_gated(x, z, w, EPS, group_size=GROUP))
        f, fb = _ms(fwd, 50), _ms(fwd_bwd, 50)
        best = min(best, (fb, (nw, pps)), key=lambda t: t[0])
        print(f"  {nw} {pps} | {f:.3f} | {fb:.3f}", flush=True)
    if best[1]:
        tn.NUM_WARPS, tn.BWD_PROGRAMS_PER_SM = best[1]
    print(f"norm picked: warps {tn.NUM_WARPS} programs/SM {tn.BWD_PROGRAMS_PER_SM}", flush=True)


def table():
    from kernels.conv1d import reference as cref
    from kernels.conv1d import triton_conv as tc
    from kernels.norm import reference as nref
    from kernels.norm import triton_norm as tn
    n_conv, n_norm = B * L * C, ROWS * D
    floors = {"conv": (4 * n_conv, 10 * n_conv), "norm": (6 * n_norm, 16 * n_norm)}  # bytes fwd, fwd+bwd
    rows = []

    def add(op, name, fns, rep=100):
        try:
            fwd, fwd_bwd = fns
            rows.append((op, name, _ms(fwd, rep), _ms(fwd_bwd, rep)))
        except Exception as e:  # e.g. an import or an OOM of a baseline
            rows.append((op, f"{name}: {type(e).__name__}: {str(e)[:80]}", float("nan"), float("nan")))
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()

    add("conv", "triton (ours)", conv_fns(tc.causal_conv1d))
    add("conv", "reference (PyTorch autograd)", conv_fns(cref.causal_conv1d), 30)
    rows.append(("conv", "device copy of the same bytes", copy_ms(floors["conv"][0]), copy_ms(floors["conv"][1])))
    gs = dict(group_size=GROUP)
    add("norm", "triton (ours)", norm_fns(lambda x, z, w: tn.rmsnorm_gated(x, z, w, EPS, **gs)))
    add("norm", "reference (PyTorch autograd)", norm_fns(lambda x, z, w: nref.rmsnorm_gated(x, z, w, EPS, **gs)), 30)
    try:
        from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
        add("norm", "mamba-ssm triton rmsnorm_fn", norm_fns(
            lambda x, z, w: rmsnorm_fn(x, w, None, z=z, eps=EPS, group_size=GROUP, norm_before_gate=False)))
    except Exception as e:
        rows.append(("norm", f"mamba-ssm rmsnorm_fn: import failed ({type(e).__name__}: {str(e)[:80]})",
                     float("nan"), float("nan")))
    rows.append(("norm", "device copy of the same bytes", copy_ms(floors["norm"][0]), copy_ms(floors["norm"][1])))
    lines = [f"# causal_conv1d and rmsnorm_gated on {torch.cuda.get_device_name()} ({datetime.date.today()})", "",
             f"`PYTHONPATH=third_party python -m eval.bench_conv_norm --sweep`; bf16. conv: B={B} L={L} C={C} "
             f"width {W}, bias, SiLU, seq_idx, x a strided channel slice; tiles fwd {tc.FWD_CONFIG}, bwd pass 1 "
             f"{tc.BWD_CONFIG}, pass 2 {tc.DX_CONFIG}, atomic dweight {tc.ATOMIC_DW}, dpre fp32 {tc.DPRE_FP32}. "
             f"norm: rows {ROWS}, d {D}, group_size {GROUP}, z, "
             f"norm_before_gate False, fp32 weight; warps {tn.NUM_WARPS}, bwd programs/SM {tn.BWD_PROGRAMS_PER_SM}. "
             "Floor: bytes at 3.0 TB/s.", "",
             "| op | kernel | fwd ms | fwd+bwd ms | % of floor fwd | % of floor fwd+bwd |", "|---|---|---|---|---|---|"]
    for op, name, f, fb in rows:
        ff, fl = (1e3 * n / HBM for n in floors[op])
        lines.append(f"| {op} | {name} | {f:.3f} | {fb:.3f} | {100 * ff / f:.0f}% | {100 * fl / fb:.0f}% |")
    for op, (nf, nb) in floors.items():
        lines.append(f"\nfloor {op}: fwd {nf / 1e6:.0f} MB = {1e3 * nf / HBM:.3f} ms, fwd+bwd {nb / 1e6:.0f} MB = "
                     f"{1e3 * nb / HBM:.3f} ms")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.bench_conv_norm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out_argument(p, "bench_conv_norm", "conv_norm")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--budget", type=float, default=60.0, help="seconds (from start) after which the sweep stops")
    p.add_argument("--skip-correctness", action="store_true")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    a = p.parse_args(argv)
    check_out(a.out)
    require_cuda("eval.bench_conv_norm")
    t0 = time.time()
    if not a.skip_correctness and not correctness():
        sys.exit(1)
    if a.sweep:
        sweep(a.budget, t0)
    text = table()
    print(text, flush=True)
    write_text(a.out, text + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    sys.exit(cli(main))
