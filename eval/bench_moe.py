"""The MoE layer (hybrid/moe.py) against a dense SwiGLU of the same active FLOPs, on the GPU: correctness first,
then fwd and fwd+bwd timings.

    python -m eval.bench_moe [--quick] [--out FILE.md]     # writes runs/eval/bench_moe/moe.md by default

Cases: 8 x 4096 tokens of d_model 1024, bf16 autocast, training mode (dropless routing, the losses computed).
A MoE of E experts, top_k k, expert d_ff f is timed beside a dense SwiGLU of d_ff k * f: the same matmul FLOPs
per token (the router's d_model x E aside). Correctness: the layer's grouped path (kernels/moe/grouped.py, as
dispatched on the GPU) against the per-expert loop (kernels/moe/reference.py) on the same weights and routing,
output and input gradient. Rows: the layer as dispatched, the same layer with the loop, the dense SwiGLU; the
ratio dense / MoE is the MoE's share of the dense layer's tokens/s (issue 21's bar: >= 70% at 8 experts top-2).
Floor: the matmul FLOPs (3 projections, 2 FLOPs per multiply-add, x3 for fwd+bwd) at the measured matmul rate.
"""
from __future__ import annotations

import sys

import torch

from eval import harness
from eval.harness import Work, median_ms, rel_err
from eval.plots import md_table
from hybrid.errors import cli

TOKENS, D = 8 * 4096, 1024
# (experts, top_k, expert d_ff, shared experts)
CASES = [(8, 2, 1408, 0), (16, 2, 1408, 0), (16, 2, 1408, 1), (64, 8, 352, 0)]
HEADER = ["experts", "top_k", "expert d_ff", "shared", "rel err (grouped vs loop)", "MoE fwd ms", "MoE fwd+bwd ms",
          "loop fwd+bwd ms", "dense fwd ms", "dense fwd+bwd ms", "MoE / dense tokens/s (fwd+bwd)", "MoE % of floor"]


def _spec(experts: int, top_k: int, d_ff: int, shared: int):
    from hybrid.spec import MoeSpec
    return MoeSpec(d_model=D, kind="moe", d_ff=d_ff, n_experts=experts, top_k=top_k, n_shared_experts=shared,
                   router="softmax", norm_topk_prob=False, capacity_factor=0.0, aux_loss_weight=0.01,
                   z_loss_weight=0.001)


def _autocast(module):
    def fn(x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return module(x)
    return fn


def _with_loop(fn):
    """fn run with the experts dispatched to the reference loop (the CPU's implementation) on the GPU."""
    from kernels import set_backend

    def run(x):
        set_backend("reference")
        try:
            return fn(x)
        finally:
            set_backend(None)
    return run


def profile_top(fn, x, top: int) -> None:
    """Print the `top` CUDA kernels (and the host's own time) of one fwd+bwd of fn(x), by GPU time."""
    from torch.profiler import ProfilerActivity, profile
    xg = x.detach().requires_grad_()
    fn(xg).sum().backward()  # warm
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn(xg).sum().backward()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=top, max_name_column_width=60),
          flush=True)


def row(experts: int, top_k: int, d_ff: int, shared: int, ceil, quick: bool, top: int = 0) -> tuple:
    from hybrid.mlp import SwiGLU
    from hybrid.moe import MoE
    from hybrid.spec import MlpSpec
    torch.manual_seed(experts * 100 + top_k)
    moe = MoE(_spec(experts, top_k, d_ff, shared)).cuda().train()
    dense = SwiGLU(MlpSpec(D, "swiglu", (top_k + shared) * d_ff)).cuda()
    for p in dense.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(TOKENS // (4 if quick else 1), D, device="cuda")
    ours, loop = _autocast(moe), _with_loop(_autocast(moe))
    xa, xb = (x.detach().requires_grad_() for _ in range(2))
    ya, yb = ours(xa), loop(xb)
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    err = max(rel_err(ya, yb), rel_err(xa.grad, xb.grad))
    if top:
        print(f"MoE {experts} experts top-{top_k}: kernels of one fwd+bwd", flush=True)
        profile_top(ours, x, top)
    t = {}
    for name, fn in (("moe", ours), ("loop", loop), ("dense", _autocast(dense))):
        p = harness.passes(fn, x)
        t[name] = (median_ms(p.fwd), median_ms(p.fwd_bwd))
    flops = 3 * 2 * 3 * D * d_ff * (top_k + shared) * x.shape[0]
    floor = ceil.floor_ms(Work(tensor_flops=flops))[0]
    return (experts, top_k, d_ff, shared, f"{err:.1e}", f"{t['moe'][0]:.3f}", f"{t['moe'][1]:.3f}",
            f"{t['loop'][1]:.3f}", f"{t['dense'][0]:.3f}", f"{t['dense'][1]:.3f}",
            f"{t['dense'][1] / t['moe'][1]:.0%}", f"{100 * floor / t['moe'][1]:.0f}%")


def bench(args, run: harness.Run) -> int:
    rows = []
    for case in CASES[:2] if args.quick else CASES:
        rows.append(row(*case, run.ceilings, args.quick, args.top))
        print(rows[-1], flush=True)
    tokens = TOKENS // (4 if args.quick else 1)
    body = "\n".join([f"## MoE layer vs dense SwiGLU of equal active FLOPs ({tokens:,} tokens, d_model {D}, bf16)",
                      "", md_table(HEADER, rows)])
    run.write("Mixture-of-experts layer", body)
    return 0


def options(ap) -> None:
    ap.add_argument("--quick", action="store_true", help="two cases, a quarter of the tokens (a smoke run)")
    ap.add_argument("--top", type=int, default=0, metavar="N",
                    help="also print each case's N costliest kernels of one fwd+bwd (profiler, GPU time)")


def main(argv=None):
    return harness.main("bench_moe", __doc__, argv, bench, options)


if __name__ == "__main__":
    sys.exit(cli(main))
