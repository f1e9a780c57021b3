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

import os
import sys

import torch

from eval import harness
from eval.harness import Work, median_ms, rel_err
from eval.plots import md_table
from hybrid.errors import cli

H, HKV, D = 16, 4, 128
TRAIN_HEADER = ["L", "kind", "window", "ours =", "rel err", "ours fwd", "flex fwd", "SDPA causal fwd", "ours fwd+bwd",
                "flex fwd+bwd", "SDPA causal fwd+bwd", "flex/ours (fwd+bwd)", "SDPA/ours (fwd+bwd)",
                "FLOP floor fwd+bwd"]
DECODE_HEADER = ["kind", "window", "slots", "visible keys", "rel err", "ours", "SDPA ref", "speedup", "floor",
                 "% of floor"]
DECODE = [("global", 0, 4096, 0, 0), ("local", 1024, 32768, 0, 0), ("sparse", 1024, 32768, 4, 256)]


def _log(row):
    """Print a finished row, and keep it under $OUT too (a later failure must not lose the rows before it)."""
    print(row, flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "rows.log"), "a") as f:
            f.write(repr(row) + "\n")


def local_work(L: int, window: int) -> Work:
    """fwd+bwd of local attention: 4 FLOPs per visible (query, key) pair, head dim and head forward, 2.5x that
    backward."""
    pairs = sum(min(i + 1, window) for i in range(L))
    return Work(tensor_flops=3.5 * 4 * pairs * D * H)


def decode_work(batch, slots, visible, hkv, d) -> Work:
    """A decode step must read every slot's position (int64) and the visible keys' K and V (bf16) once."""
    return Work(bytes=batch * slots * 8 + batch * visible * hkv * d * 2 * 2)


def _mask_mod(kind, window, sinks, stride):
    """The mask as a user would write it for FlexAttention."""
    if kind == "local":
        return lambda b, h, qi, ki: (ki <= qi) & (qi - ki < window)
    return lambda b, h, qi, ki: (ki <= qi) & ((qi - ki < window) | (ki < sinks) | ((ki + 1) % stride == 0))


def _impls(L, kind, window, sinks, stride, flex):
    """{name: fn(q, k, v)}: our op as dispatched, hand-written FlexAttention for the same mask, causal SDPA."""
    from torch.nn.attention.flex_attention import create_block_mask
    import torch.nn.functional as F
    from kernels import ops
    bm = create_block_mask(_mask_mod(kind, window, sinks, stride), None, None, L, L, device="cuda", _compile=True)
    t = lambda x: x.transpose(1, 2)
    return {"ours": lambda q, k, v: ops.attention(q, k, v, kind=kind, window=window, sinks=sinks, stride=stride),
            "flex": lambda q, k, v: t(flex(t(q), t(k), t(v), block_mask=bm, enable_gqa=True)),
            "sdpa": lambda q, k, v: t(F.scaled_dot_product_attention(t(q), t(k), t(v), is_causal=True,
                                                                     enable_gqa=True))}


def training_row(L, kind, window, sinks, stride, flex, sdpa_max, ceil) -> tuple:
    from kernels import backend
    from kernels.attention.reference import attention as reference
    g = torch.Generator(device="cuda").manual_seed(L + window)
    q = torch.randn(1, L, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(1, L, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    impls = _impls(L, kind, window, sinks, stride, flex)
    if L > sdpa_max:
        del impls["sdpa"]
    err = ""
    if L <= 8192:  # check against the explicit-mask reference where it fits
        r = reference(q.float(), k.float(), v.float(), kind=kind, window=window, sinks=sinks, stride=stride)
        err = f"{rel_err(impls['ours'](q, k, v), r):.1e}"
    rep = 30 if L >= 65536 else 100
    t = {}
    for name, fn in impls.items():
        p = harness.passes(fn, q, k, v)
        t[name] = (median_ms(p.fwd, rep), median_ms(p.fwd_bwd, rep))
    floor = f"{ceil.floor_ms(local_work(L, window))[0]:.3f}" if kind == "local" else "-"
    sd = t.get("sdpa", (float("nan"),) * 2)
    return (f"{L // 1024}K", kind, window, backend("attention", "cuda"), err,
            *(f"{x:.3f}" for x in (t["ours"][0], t["flex"][0], sd[0], t["ours"][1], t["flex"][1], sd[1])),
            f"{t['flex'][1] / t['ours'][1]:.2f}", f"{sd[1] / t['ours'][1]:.1f}" if "sdpa" in t else "-", floor)


def training_rows(lengths, windows, sparse, sdpa_max, ceil) -> list[tuple]:
    from kernels.attention.flex import _compiled_flex
    flex = _compiled_flex()  # the same compiled entry (and raised recompile limit) for both
    cases = [(L, "local", w, 0, 0) for L in lengths for w in windows if w < L]
    cases += [(L, "sparse", 1024, 4, 256) for L in sparse]
    rows = []
    for case in cases:
        rows.append(training_row(*case, flex, sdpa_max, ceil))
        _log(rows[-1])
    return rows


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
    from kernels.attention import reference as ref
    from kernels.attention.triton_decode import attention_decode
    kv, far = full_cache(batch, hkv, d, kind, window, max_len, sinks, stride)
    slots = kv.k.shape[1]
    q_pos = torch.full((batch,), max_len - 1, device="cuda")
    q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16)
    kw = dict(ring_start=far, kind=kind, window=window, sinks=sinks, stride=stride)
    want = ref.attention_decode(q.float(), kv.k.float(), kv.v.float(), kv.pos, q_pos, **kw)
    err = rel_err(attention_decode(q, kv.k, kv.v, kv.pos, q_pos, **kw), want)
    visible = int(ref.cache_visible(q_pos[:1, None], kv.pos[:1], far, kind, window, sinks, stride).sum())
    floor = ceil.floor_ms(decode_work(batch, slots, visible, hkv, d))[0]
    t_ours = harness.graph_ms(lambda: attention_decode(q, kv.k, kv.v, kv.pos, q_pos, **kw), 10, 200)
    t_ref = harness.graph_ms(lambda: ref.attention_decode(q, kv.k, kv.v, kv.pos, q_pos, **kw), 10, 200)
    return (kind, window or "-", slots, visible, f"{err:.1e}", f"{t_ours * 1e3:.1f}", f"{t_ref * 1e3:.1f}",
            f"{t_ref / t_ours:.1f}", f"{floor * 1e3:.1f}", f"{100 * floor / t_ours:.0f}%")


def bench(args, run: harness.Run) -> int:
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.quick:
        train = training_rows([2048, 8192], [512], [8192], 8192, run.ceilings)
    else:
        train = training_rows([2048, 8192, 32768, 65536, 131072], [1024], [32768], 131072, run.ceilings)
        train += training_rows([32768], [512, 4096], [], 0, run.ceilings)
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
