"""Causal conv1d and gated RMSNorm (training kernels) on the GPU: correctness at real shapes, a small tile
sweep, then a timing table.

    PYTHONPATH=third_party python -m eval.bench_conv_norm [--out FILE.md] [--sweep] [--budget SECONDS]

Shapes: conv (Mamba2 xBC) batch 8, seqlen 4096, channels 3328 (3072 + 2*128), width 4, bias, SiLU, seq_idx with
two boundaries; x is a channel slice of a wider bf16 projection (as in the model). Norm: rows 8*4096, d 3072,
group_size 3072, z given, norm_before_gate False; bf16 x/z, fp32 weight. Rows: ours (Triton), the PyTorch
reference (autograd), mamba-ssm's Triton rmsnorm_fn when it imports, and a device copy of the same bytes.
Floor: bytes each pass must move at the device's copy bandwidth (conv fwd: read x, write out; bwd: read x, dout,
write dx (the dpre round trip of our two-pass backward is not counted); norm fwd: read x, z, write out; bwd:
read x, z, dy, write dx, dz; weights and per-row stats are negligible).
Writes the table to `--out` (default runs/eval/bench_conv_norm/conv_norm.md under the current directory)
and prints its path.
"""
from __future__ import annotations

import sys

import torch

from eval import harness
from eval.harness import Work, median_ms
from eval.plots import md_table
from hybrid.errors import cli

B, L, C, W, EXTRA = 8, 4096, 3328, 4, 3072 + 48  # EXTRA: other channels of the in_proj output around xBC
ROWS, D, GROUP = 8 * 4096, 3072, 3072
EPS = 1e-5
WORK = {"conv": (Work(bytes=4 * B * L * C), Work(bytes=10 * B * L * C)),  # (fwd, fwd+bwd)
        "norm": (Work(bytes=6 * ROWS * D), Work(bytes=16 * ROWS * D))}
HEADER = ["op", "kernel", "fwd ms", "fwd+bwd ms", "% of floor fwd", "% of floor fwd+bwd"]
# tried by --sweep: conv forward tiles; conv backward pass 1 tiles, atomic dweight, dpre in fp32 (pass 2 as
# DX_TILES); norm warps and backward programs per SM
CONV_FWD = [dict(BLOCK_L=32, BLOCK_C=128, num_warps=4), dict(BLOCK_L=16, BLOCK_C=256, num_warps=4),
            dict(BLOCK_L=32, BLOCK_C=64, num_warps=2)]
CONV_BWD = [((32, 128, 512, 4), False, True), ((32, 128, 128, 4), False, True), ((32, 128, 64, 4), False, True),
            ((32, 128, 32, 4), False, True), ((32, 128, 32, 4), True, True), ((32, 128, 128, 4), True, True),
            ((16, 128, 64, 4), False, True), ((32, 64, 128, 2), False, True), ((32, 128, 64, 4), False, False),
            ((32, 128, 32, 4), True, False)]
DX_TILES = dict(BLOCK_L=32, BLOCK_C=128, num_warps=4)
NORM = [(16, 2), (16, 1), (16, 4), (32, 1)]


def conv_inputs(batch=B, seed=0, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    proj = torch.randn(batch, L, C + EXTRA, generator=g, device="cuda").to(dtype)  # (batch, seqlen, in_proj out)
    x = proj[..., 1000:1000 + C]  # (batch, seqlen, channels), strided like xBC in the model
    w = torch.randn(C, W, generator=g, device="cuda") * 0.5
    b = torch.randn(C, generator=g, device="cuda") * 0.1
    return x, w, b, harness.doc_ids(batch, L, 1500, torch.int)


def norm_inputs(rows=ROWS, seed=0, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(rows, D, generator=g, device="cuda").to(dtype)
    z = torch.randn(rows, D, generator=g, device="cuda").to(dtype)
    w = 1 + 0.1 * torch.randn(D, generator=g, device="cuda")
    return x, z, w


def correctness() -> bool:
    """Ours on bf16 inputs vs the reference on the same values in fp32 (real channel count, batch 2)."""
    from kernels.conv1d import reference as cref
    from kernels.conv1d.triton_conv import causal_conv1d
    from kernels.norm import reference as nref
    from kernels.norm.triton_norm import rmsnorm_gated
    x, w, b, seq_idx = conv_inputs(batch=2, seed=1)
    leaves = dict(x=x, weight=w, bias=b, initial_state=torch.randn(2, C, W - 1, device="cuda"))
    opts = dict(seq_idx=seq_idx, return_final_state=True)
    ok = harness.report(f"conv B=2 L={L} C={C} W={W} bf16 vs fp32 ref", harness.compare_grads(
        lambda **t: causal_conv1d(**t, **opts), lambda **t: cref.causal_conv1d(**t, **opts), leaves, ("y", "final")))
    x, z, w = norm_inputs(rows=4096, seed=1)
    for nbg, gs in ((False, GROUP), (True, 384)):
        opts = dict(eps=EPS, group_size=gs, norm_before_gate=nbg)
        errs = harness.compare_grads(lambda **t: rmsnorm_gated(**t, **opts),
                                     lambda **t: nref.rmsnorm_gated(**t, **opts), dict(x=x, z=z, weight=w), ("out",))
        ok &= harness.report(f"norm rows=4096 d={D} group={gs} nbg={nbg} bf16 vs fp32 ref", errs)
    torch.cuda.empty_cache()
    return ok


def conv_passes(fn) -> harness.Passes:
    x, w, b, seq_idx = conv_inputs()
    return harness.passes(fn, x, w, b, seq_idx=seq_idx)  # x keeps the slice's strides


def norm_passes(fn) -> harness.Passes:
    return harness.passes(fn, *norm_inputs())


def _pick(cands, apply, measure, budget) -> None:
    """Apply each candidate and measure it until the budget is spent; the fastest stays applied."""
    def trial(cand):
        apply(cand)
        return measure()
    _, best = harness.best_of(cands, trial, budget)
    if best is not None:
        apply(best)


def sweep(budget: harness.Budget) -> None:
    """Conv forward tiles, then the conv backward's, then the norm's warps: each the fastest of its list."""
    from kernels.conv1d import triton_conv as tc
    from kernels.norm import triton_norm as tn

    def conv_bwd(cand):
        (bl, bc, chunk, nw), atomic, dpre_fp32 = cand
        tc.TUNING.update(bwd_dpre=dict(BLOCK_L=bl, BLOCK_C=bc, CHUNK=chunk, num_warps=nw), bwd_dx=dict(DX_TILES))
        tc.ATOMIC_DW, tc.DPRE_FP32 = atomic, dpre_fp32

    def norm(cand):
        harness.set_flat(tn.TUNING, {"fwd.num_warps": cand[0], "bwd.num_warps": cand[0],
                                     "bwd.programs_per_sm": cand[1]})
    print("sweep conv fwd: tiles | ms", flush=True)
    _pick(CONV_FWD, lambda c: tc.TUNING.update(fwd=dict(c)), lambda: median_ms(conv_passes(tc.causal_conv1d).fwd, 50),
          budget)
    print("sweep conv fwd+bwd: pass 1 (BLOCK_L, BLOCK_C, CHUNK, warps), atomic dweight, dpre fp32 | ms", flush=True)
    _pick(CONV_BWD, conv_bwd, lambda: median_ms(conv_passes(tc.causal_conv1d).fwd_bwd, 50), budget)
    x, w, b, seq_idx = conv_inputs()
    out = tc.causal_conv1d(*(t.detach().clone().requires_grad_() for t in (x, w, b)), seq_idx=seq_idx)
    dy = torch.randn_like(out)
    print(f"conv backward only (best): {median_ms(lambda: out.backward(dy, retain_graph=True), 50):.3f} ms", flush=True)
    print(f"conv picked: {tc.TUNING}, atomic {tc.ATOMIC_DW}, dpre_fp32 {tc.DPRE_FP32}", flush=True)
    print("sweep norm: (warps, programs/SM) | fwd+bwd ms", flush=True)
    norm_fn = lambda x, z, w: tn.rmsnorm_gated(x, z, w, EPS, group_size=GROUP)
    _pick(NORM, norm, lambda: median_ms(norm_passes(norm_fn).fwd_bwd, 50), budget)
    print(f"norm picked: {tn.TUNING}", flush=True)


def _row(op, name, make_passes, rep=100) -> tuple:
    """(op, name, fwd ms, fwd+bwd ms); a baseline that fails (an import, an OOM) is a row saying so."""
    try:
        p = make_passes()
        row = (op, name, median_ms(p.fwd, rep), median_ms(p.fwd_bwd, rep))
    except Exception as e:
        row = (op, f"{name}: {type(e).__name__}: {str(e)[:80]}", float("nan"), float("nan"))
    print(row, flush=True)
    torch.cuda.empty_cache()
    return row


def measure() -> list[tuple]:
    from kernels.conv1d import reference as cref
    from kernels.conv1d import triton_conv as tc
    from kernels.norm import reference as nref
    from kernels.norm import triton_norm as tn
    copy = {op: ("device copy of the same bytes", *(harness.copy_ms(w.bytes) for w in WORK[op])) for op in WORK}

    def mamba_norm():
        from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
        return norm_passes(lambda x, z, w: rmsnorm_fn(x, w, None, z=z, eps=EPS, group_size=GROUP,
                                                      norm_before_gate=False))
    return [_row("conv", "triton (ours)", lambda: conv_passes(tc.causal_conv1d)),
            _row("conv", "reference (PyTorch autograd)", lambda: conv_passes(cref.causal_conv1d), 30),
            ("conv", *copy["conv"]),
            _row("norm", "triton (ours)", lambda: norm_passes(lambda x, z, w: tn.rmsnorm_gated(
                x, z, w, EPS, group_size=GROUP))),
            _row("norm", "reference (PyTorch autograd)", lambda: norm_passes(lambda x, z, w: nref.rmsnorm_gated(
                x, z, w, EPS, group_size=GROUP)), 30),
            _row("norm", "mamba-ssm triton rmsnorm_fn", mamba_norm),
            ("norm", *copy["norm"])]


def table(rows: list[tuple], ceil: harness.Ceilings, settings: str) -> str:
    """The markdown body: shapes and settings, the rows with % of floor, the floors."""
    out = []
    for op, name, f, fb in rows:
        ff, fl = (ceil.floor_ms(w)[0] for w in WORK[op])
        out.append((op, name, f"{f:.3f}", f"{fb:.3f}", f"{100 * ff / f:.0f}%", f"{100 * fl / fb:.0f}%"))
    lines = [f"bf16. conv: B={B} L={L} C={C} width {W}, bias, SiLU, seq_idx, x a strided channel slice. norm: rows "
             f"{ROWS}, d {D}, group_size {GROUP}, z, norm_before_gate False, fp32 weight. {settings}", "",
             md_table(HEADER, out), ""]
    for op, (fwd, train) in WORK.items():
        lines.append(f"floor {op}: fwd {fwd.bytes / 1e6:.0f} MB = {ceil.floor_ms(fwd)[0]:.3f} ms, fwd+bwd "
                     f"{train.bytes / 1e6:.0f} MB = {ceil.floor_ms(train)[0]:.3f} ms\n")
    return "\n".join(lines)


def bench(a, run: harness.Run) -> int:
    from kernels.conv1d import triton_conv as tc
    from kernels.norm import triton_norm as tn
    if not a.skip_correctness and not correctness():
        return 1
    if a.sweep:
        sweep(run.budget)
    settings = (f"conv TUNING {tc.TUNING}, atomic dweight {tc.ATOMIC_DW}, dpre fp32 {tc.DPRE_FP32}; "
                f"norm TUNING {tn.TUNING}.")
    run.write("causal_conv1d and rmsnorm_gated", table(measure(), run.ceilings, settings))
    return 0


def main(argv=None):
    return harness.main("bench_conv_norm", __doc__, argv, bench, sweep_budget=60.0)


if __name__ == "__main__":
    sys.exit(cli(main))
