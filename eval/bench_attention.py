"""Attention benchmarks on the GPU: correctness first, then side-by-side timings, written to a markdown table.

    python -m eval.bench_attention [--quick]                          # writes runs/eval/bench_attention/attention.md
    python -m eval.bench_attention --out eval/results/attention.md   # update the recorded results

Training (bf16, batch 1, 16 query heads, 4 kv heads, head dim 128): fwd and fwd+bwd of our `attention` op as
dispatched (its backend is printed), of FlexAttention written by hand for the same mask (the strongest public
block-sparse kernel we can run here) and of causal SDPA (PyTorch's flash kernel), at L = 2K..128K.
Decode (batch 64, 32 query heads, 8 kv heads, head dim 128, bf16 cache): our Triton split-KV kernel vs the
SDPA reference on the same cache, both under CUDA graphs, against the floor of reading the visible K and V once.
Writes the tables to `--out` and prints its path.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

from eval.plots import add_out_argument, check_out, command_line, write_text
from eval.timing import median_ms as _ms, rel_err as _rel, require_cuda
from hybrid.errors import cli

H, HKV, D = 16, 4, 128


def _graph_ms(fn, steps=10):
    """Median ms per call of `steps` calls captured in one CUDA graph (decode runs captured)."""
    from eval.bench_kernels import _bench
    return _bench(fn, steps)


def _log(row):
    """Print a finished row, and keep it under $OUT too (a later failure must not lose the rows before it)."""
    print(row, flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "rows.log"), "a") as f:
            f.write(repr(row) + "\n")


def _fwd_bwd(fn, q, k, v, dout):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))

    def step():
        q.grad = k.grad = v.grad = None
        fn(q, k, v).backward(dout)
    return step


def training_rows(lengths, windows, sparse, sdpa_max):
    from torch.nn.attention.flex_attention import create_block_mask
    from kernels import backend, ops
    import torch.nn.functional as F

    from kernels.attention.flex import _compiled_flex
    flex = _compiled_flex()  # the same compiled entry (and raised recompile limit) for both
    rows = []
    cases = [(L, "local", w, 0, 0) for L in lengths for w in windows if w < L]
    cases += [(L, "sparse", 1024, 4, 256) for L in sparse]
    for L, kind, window, sinks, stride in cases:
        g = torch.Generator(device="cuda").manual_seed(L + window)
        q = torch.randn(1, L, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
        k, v = (torch.randn(1, L, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
        dout = torch.randn_like(q)
        ours = lambda q, k, v: ops.attention(q, k, v, kind=kind, window=window, sinks=sinks, stride=stride)

        # hand-written FlexAttention for the same mask, as a user would write it
        if kind == "local":
            def mod(b, h, qi, ki):
                return (ki <= qi) & (qi - ki < window)
        else:
            def mod(b, h, qi, ki):
                return (ki <= qi) & ((qi - ki < window) | (ki < sinks) | ((ki + 1) % stride == 0))
        bm = create_block_mask(mod, None, None, L, L, device="cuda", _compile=True)

        def raw(q, k, v):
            return flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bm,
                        enable_gqa=True).transpose(1, 2)

        def sdpa(q, k, v):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True, enable_gqa=True).transpose(1, 2)
        err = ""
        if L <= 8192:  # check against the explicit-mask reference where it fits
            from kernels.attention.reference import attention as reference
            r = reference(q.float(), k.float(), v.float(), kind=kind, window=window, sinks=sinks, stride=stride)
            err = f"{_rel(ours(q, k, v), r):.1e}"
        rep = 30 if L >= 65536 else 100
        t = {}
        for name, fn in [("ours", ours), ("flex", raw)] + ([("sdpa", sdpa)] if L <= sdpa_max else []):
            t[name] = (_ms(lambda: fn(q, k, v), rep), _ms(_fwd_bwd(fn, q, k, v, dout), rep))
        # FLOPs actually needed: 4 * visible pairs * D per head forward, 2.5x that backward
        pairs = sum(min(i + 1, window) for i in range(0, L, 1)) if kind == "local" else None
        if kind == "local":
            flops = 4 * pairs * D * H
            floor = f"{flops / 735e12 * 1e3 * 3.5:.3f}"
        else:
            floor = "-"
        sd = t.get("sdpa", (float("nan"),) * 2)
        rows.append((f"{L // 1024}K", kind, window, backend("attention", "cuda"), err,
                     *(f"{x:.3f}" for x in (t["ours"][0], t["flex"][0], sd[0], t["ours"][1], t["flex"][1], sd[1])),
                     f"{t['flex'][1] / t['ours'][1]:.2f}", f"{sd[1] / t['ours'][1]:.1f}" if "sdpa" in t else "-",
                     floor))
        _log(rows[-1])
    return rows


def decode_rows():
    from hybrid.cache import KVState
    from kernels.attention import reference as ref
    from kernels.attention.triton_decode import attention_decode
    rows = []
    batch, hq, hkv, d = 64, 32, 8, 128
    for kind, window, max_len, sinks, stride in [("global", 0, 4096, 0, 0), ("local", 1024, 32768, 0, 0),
                                                 ("sparse", 1024, 32768, 4, 256)]:
        far = sinks + (max_len // stride if stride else 0) if kind == "sparse" else 0
        ring = max_len if kind == "global" else window
        slots = far + ring + 1
        kv = KVState(k=torch.randn(batch, slots, hkv, d, device="cuda", dtype=torch.bfloat16),
                     v=torch.randn(batch, slots, hkv, d, device="cuda", dtype=torch.bfloat16),
                     pos=torch.full((batch, slots), -1, device="cuda"), ring_start=far, ring_size=ring,
                     sinks=sinks, stride=stride)
        q_pos = torch.full((batch,), max_len - 1, device="cuda")
        # fill positions as a full cache after max_len tokens: ring holds the last `ring`, far slots their keys
        p = torch.arange(max_len, device="cuda")
        keep_ring = p >= max_len - ring
        kv.pos[:, far + p[keep_ring] % ring] = p[keep_ring]
        if far:
            sink_p = p[p < sinks]
            kv.pos[:, sink_p] = sink_p
            st = p[(p >= sinks) & ((p + 1) % stride == 0)]
            j = sinks + (st + 1) // stride - 1
            kv.pos[:, j[j < far]] = st[j < far]
        q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16)
        kw = dict(ring_start=far, kind=kind, window=window, sinks=sinks, stride=stride)
        want = ref.attention_decode(q.float(), kv.k.float(), kv.v.float(), kv.pos, q_pos, **kw)
        got = attention_decode(q, kv.k, kv.v, kv.pos, q_pos, **kw)
        err = _rel(got, want)
        visible = int(ref.cache_visible(q_pos[:1, None], kv.pos[:1], far, kind, window, sinks, stride).sum())
        read = batch * slots * 8 + batch * visible * hkv * d * 2 * 2  # positions + visible K and V
        floor = read / 3.0e12 * 1e3
        t_ours = _graph_ms(lambda: attention_decode(q, kv.k, kv.v, kv.pos, q_pos, **kw))
        t_ref = _graph_ms(lambda: ref.attention_decode(q, kv.k, kv.v, kv.pos, q_pos, **kw))
        rows.append((kind, window or "-", slots, visible, f"{err:.1e}", f"{t_ours * 1e3:.1f}", f"{t_ref * 1e3:.1f}",
                     f"{t_ref / t_ours:.1f}", f"{floor * 1e3:.1f}", f"{100 * floor / t_ours:.0f}%"))
        _log(rows[-1])
    return rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="python -m eval.bench_attention", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out_argument(ap, "bench_attention", "attention")
    ap.add_argument("--quick", action="store_true", help="two lengths only (a smoke run)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = ap.parse_args(argv)
    check_out(args.out)
    require_cuda("eval.bench_attention")
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.quick:
        lengths, windows, sparse, sdpa_max = [2048, 8192], [512], [8192], 8192
    else:
        lengths, windows, sparse, sdpa_max = [2048, 8192, 32768, 65536, 131072], [1024], [32768], 131072
        windows_extra = [512, 4096]
    train = training_rows(lengths, windows, sparse, sdpa_max)
    if not args.quick:
        train += training_rows([32768], windows_extra, [], 0)
    dec = decode_rows()
    dev = torch.cuda.get_device_name()
    lines = [f"# Attention kernels: {dev}", "",
             f"{datetime.date.today()}, torch {torch.__version__}, command: "
             f"`{command_line('eval.bench_attention', argv)}`", "",
             "## Training / prefill (bf16, batch 1, 16 q heads, 4 kv heads, head dim 128); ms, medians", "",
             "| L | kind | window | ours = | rel err | ours fwd | flex fwd | SDPA causal fwd | ours fwd+bwd | "
             "flex fwd+bwd | SDPA causal fwd+bwd | flex/ours (fwd+bwd) | SDPA/ours (fwd+bwd) | FLOP floor fwd+bwd |",
             "|" + "---|" * 14]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in train]
    lines += ["", "## Decode (batch 64, 32 q heads, 8 kv heads, head dim 128, bf16 cache, CUDA graphs); µs", "",
              "| kind | window | slots | visible keys | rel err | ours | SDPA ref | speedup | floor | % of floor |",
              "|" + "---|" * 10]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in dec]
    text = "\n".join(lines) + "\n"
    write_text(args.out, text)
    print(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
