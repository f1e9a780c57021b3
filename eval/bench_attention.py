"""Attention benchmarks on the GPU: correctness first, then side-by-side timings, written to a markdown table.

    python -m eval.bench_attention [--quick]                          # writes runs/eval/bench_attention/attention.md
    python -m eval.bench_attention --out eval/results/attention.md   # update the recorded results

Training (bf16, batch 1, 16 query heads, 4 kv heads, head dim 128): fwd and fwd+bwd of our `attention` op as
dispatched (its backend is printed: flash-attn where it runs), of our FlexAttention backend for the same mask,
and of causal SDPA (PyTorch's flash kernel; one document, L <= 64K) for global, local (windows 512-4096) and
sparse layers at L = 8K..128K, one document per row and packed (documents of 2,048 tokens), against the FLOP
floor at the measured matmul rate.
Decode (batch 64, 32 query heads, 8 kv heads, head dim 128, bf16 cache): our op as dispatched, the Triton
split-KV kernel and the SDPA reference on the same cache, all under CUDA graphs, against the floor of reading
the visible K and V once.
Writes the tables to `--out` and prints its path.
"""
from __future__ import annotations

import os
import sys

import torch

from eval import harness
from eval.harness import Work, median_ms, rel_err
from eval.plots import md_table
from hybrid.errors import cli

H, HKV, D = 16, 4, 128
TRAIN_HEADER = ["L", "kind", "window", "packed", "ours =", "rel err", "ours fwd", "flex fwd", "SDPA causal fwd",
                "ours fwd+bwd", "flex fwd+bwd", "SDPA causal fwd+bwd", "flex/ours (fwd+bwd)", "SDPA/ours (fwd+bwd)",
                "FLOP floor fwd+bwd", "ours % of floor"]
DECODE_HEADER = ["kind", "window", "slots", "visible keys", "ours =", "rel err", "ours", "Triton", "SDPA ref",
                 "SDPA/ours", "floor", "% of floor"]
DECODE = [("global", 0, 4096, 0, 0), ("local", 1024, 32768, 0, 0), ("sparse", 1024, 32768, 4, 256)]


def _log(row):
    """Print a finished row, and keep it under $OUT too (a later failure must not lose the rows before it)."""
    print(row, flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "rows.log"), "a") as f:
            f.write(repr(row) + "\n")


def attention_work(L: int, window: int, docs: int = 1) -> Work:
    """fwd+bwd of causal attention (window 0: global) over `docs` equal documents: 4 FLOPs per visible (query,
    key) pair, head dim and head forward, 2.5x that backward."""
    n = L // docs
    w = window or n
    pairs = docs * sum(min(i + 1, w) for i in range(n))
    return Work(tensor_flops=3.5 * 4 * pairs * D * H)


def decode_work(batch, slots, visible, hkv, d) -> Work:
    """A decode step must read every slot's position (int64) and the visible keys' K and V (bf16) once."""
    return Work(bytes=batch * slots * 8 + batch * visible * hkv * d * 2 * 2)


def _doc_ids(L: int, docs: int) -> "torch.Tensor | None":
    return None if docs == 1 else (torch.arange(L, device="cuda") // (L // docs))[None].contiguous()


def _impls(kind, window, sinks, stride, seq_idx):
    """{name: fn(q, k, v)}: our op as dispatched, our FlexAttention backend, causal SDPA (one document only)."""
    import torch.nn.functional as F
    from kernels import ops
    from kernels.attention import flex
    kw = dict(kind=kind, window=window, sinks=sinks, stride=stride, seq_idx=seq_idx)
    t = lambda x: x.transpose(1, 2)
    impls = {"ours": lambda q, k, v: ops.attention(q, k, v, **kw),
             "flex": lambda q, k, v: flex.attention(q, k, v, **kw)}
    if seq_idx is None:
        impls["sdpa"] = lambda q, k, v: t(F.scaled_dot_product_attention(t(q), t(k), t(v), is_causal=True,
                                                                         enable_gqa=True))
    return impls


def training_row(L, kind, window, sinks, stride, docs, sdpa_max, ceil) -> tuple:
    from kernels import backend
    from kernels.attention.reference import attention as reference
    g = torch.Generator(device="cuda").manual_seed(L + window)
    q = torch.randn(1, L, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(1, L, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    seq_idx = _doc_ids(L, docs)
    impls = _impls(kind, window, sinks, stride, seq_idx)
    if L > sdpa_max:
        impls.pop("sdpa", None)
    err = ""
    if L <= 8192:  # check against the explicit-mask reference where it fits
        r = reference(q.float(), k.float(), v.float(), kind=kind, window=window, sinks=sinks, stride=stride,
                      seq_idx=seq_idx)
        err = f"{rel_err(impls['ours'](q, k, v), r):.1e}"
    rep = 30 if L >= 65536 else 100
    t = {}
    for name, fn in impls.items():
        p = harness.passes(fn, q, k, v)
        t[name] = (median_ms(p.fwd, rep), median_ms(p.fwd_bwd, rep))
    floor = ceil.floor_ms(attention_work(L, window if kind == "local" else 0, docs))[0] if kind != "sparse" else 0
    sd = t.get("sdpa", (float("nan"),) * 2)
    return (f"{L // 1024}K", kind, window or "-", f"{docs} docs" if docs > 1 else "no",
            backend("attention", "cuda"), err,
            *(f"{x:.3f}" for x in (t["ours"][0], t["flex"][0], sd[0], t["ours"][1], t["flex"][1], sd[1])),
            f"{t['flex'][1] / t['ours'][1]:.2f}", f"{sd[1] / t['ours'][1]:.2f}" if "sdpa" in t else "-",
            f"{floor:.3f}" if floor else "-", f"{100 * floor / t['ours'][1]:.0f}%" if floor else "-")


def training_rows(cases, sdpa_max, ceil) -> list[tuple]:
    """cases: (L, kind, window, sinks, stride, docs)."""
    rows = []
    for case in cases:
        rows.append(training_row(*case, sdpa_max, ceil))
        _log(rows[-1])
    return rows


def training_cases(quick: bool) -> list[tuple]:
    if quick:
        return [(L, kind, w, 0, 0, docs) for L in (2048, 8192) for kind, w in (("global", 0), ("local", 512))
                for docs in (1, 4)] + [(8192, "sparse", 1024, 4, 256, 1)]
    lengths = (8192, 16384, 32768, 65536, 131072)
    cases = [(L, "global", 0, 0, 0, 1) for L in lengths]
    cases += [(L, "local", 1024, 0, 0, 1) for L in lengths]
    cases += [(32768, "local", w, 0, 0, 1) for w in (512, 2048, 4096)]
    cases += [(L, kind, w, 0, 0, L // 2048) for L in (8192, 65536) for kind, w in (("global", 0), ("local", 1024))]
    return cases + [(32768, "sparse", 1024, 4, 256, 1)]


def full_cache(batch, hkv, d, kind, window, max_len, sinks, stride):
    """A cache as after max_len tokens: the ring holds the last `ring` positions, the far slots (sinks, then
    every stride-th key) theirs. Returns (KVState, far slots)."""
    from hybrid.cache import KVState
    far = sinks + (max_len // stride if stride else 0) if kind == "sparse" else 0
    ring = max_len if kind == "global" else window
    slots = far + ring + 1
    kv = KVState(k=torch.randn(batch, slots, hkv, d, device="cuda", dtype=torch.bfloat16),
                 v=torch.randn(batch, slots, hkv, d, device="cuda", dtype=torch.bfloat16),
                 pos=torch.full((batch, slots), -1, device="cuda"), ring_start=far, ring_size=ring,
                 sinks=sinks, stride=stride)
    p = torch.arange(max_len, device="cuda")
    keep_ring = p >= max_len - ring
    kv.pos[:, far + p[keep_ring] % ring] = p[keep_ring]
    if far:
        sink_p = p[p < sinks]
        kv.pos[:, sink_p] = sink_p
        st = p[(p >= sinks) & ((p + 1) % stride == 0)]
        j = sinks + (st + 1) // stride - 1
        kv.pos[:, j[j < far]] = st[j < far]
    return kv, far


def decode_row(kind, window, max_len, sinks, stride, ceil, batch=64, hq=32, hkv=8, d=128) -> tuple:
    from kernels import backend, ops
    from kernels.attention import reference as ref
    from kernels.attention.triton_decode import attention_decode as triton_decode
    kv, far = full_cache(batch, hkv, d, kind, window, max_len, sinks, stride)
    slots = kv.k.shape[1]
    q_pos = torch.full((batch,), max_len - 1, device="cuda")
    q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16)
    kw = dict(ring_start=far, kind=kind, window=window, sinks=sinks, stride=stride)
    want = ref.attention_decode(q.float(), kv.k.float(), kv.v.float(), kv.pos, q_pos, **kw)
    err = rel_err(ops.attention_decode(q, kv.k, kv.v, kv.pos, q_pos, **kw), want)
    visible = int(ref.cache_visible(q_pos[:1, None], kv.pos[:1], far, kind, window, sinks, stride).sum())
    floor = ceil.floor_ms(decode_work(batch, slots, visible, hkv, d))[0]
    t_ours = harness.graph_ms(lambda: ops.attention_decode(q, kv.k, kv.v, kv.pos, q_pos, **kw), 10, 200)
    t_tri = harness.graph_ms(lambda: triton_decode(q, kv.k, kv.v, kv.pos, q_pos, **kw), 10, 200)
    t_ref = harness.graph_ms(lambda: ref.attention_decode(q, kv.k, kv.v, kv.pos, q_pos, **kw), 10, 200)
    return (kind, window or "-", slots, visible, backend("attention_decode", "cuda"), f"{err:.1e}",
            f"{t_ours * 1e3:.1f}", f"{t_tri * 1e3:.1f}", f"{t_ref * 1e3:.1f}", f"{t_ref / t_ours:.1f}",
            f"{floor * 1e3:.1f}", f"{100 * floor / t_ours:.0f}%")


def bench(args, run: harness.Run) -> int:
    torch.backends.cuda.matmul.allow_tf32 = False
    train = training_rows(training_cases(args.quick), 65536, run.ceilings)
    dec = []
    for case in DECODE:
        dec.append(decode_row(*case, run.ceilings))
        _log(dec[-1])
    body = "\n".join(["## Training / prefill (bf16, batch 1, 16 q heads, 4 kv heads, head dim 128); ms, medians", "",
                      md_table(TRAIN_HEADER, train), "",
                      "## Decode (batch 64, 32 q heads, 8 kv heads, head dim 128, bf16 cache, CUDA graphs); µs", "",
                      md_table(DECODE_HEADER, dec)])
    run.write("Attention kernels", body)
    return 0


def main(argv=None):
    return harness.main("bench_attention", __doc__, argv, bench, lambda ap: ap.add_argument(
        "--quick", action="store_true", help="two lengths only (a smoke run)"))


if __name__ == "__main__":
    sys.exit(cli(main))
