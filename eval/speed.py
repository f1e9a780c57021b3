"""Inference speed and memory against context length and batch: prefill and decode tokens/s, cache bytes.

    python -m eval.speed                                   # GPU: jamba, samba, transformer; 1K .. 128K; batch 1, 64
    python -m eval.speed --layouts jamba transformer --lengths 16384 --batches 64 --hf-baseline
    python -m eval.speed --quick                           # CPU: tiny models, small lengths (checks the code path)
    python -m eval.speed ... --out eval/results/speed.md   # update the recorded results (only when named)

Per layout (a name in layouts/ or a YAML path, random weights, bf16 on GPU / fp32 on CPU):
  prefill   `--prefill-batch` x L tokens into an empty cache, at once or in pieces of `--prefill-chunk` tokens
            appended to the cache (hybrid/generate.py prefill); TFLOP/s of the layout's forward FLOPs against
            the GPU's dense bf16 peak, and the GPU's peak memory during it.
  decode    `--decode-steps` single-token steps at batch B from a cache holding L tokens. The cache is filled
            by writing random keys for positions 0..L-1 through `KVState.write` (and leaving the SSM states as
            they are): a decode step does the same work whatever the state holds, and filling this way costs
            no batch-B prefill. On the GPU the steps are captured in one CUDA graph (the cache is allocated
            once and every step writes fixed shapes); if capture fails the plain loop is timed and the table
            says so. On the CPU the plain loop is timed.
  cache     `cache.nbytes()` of a cache for B sequences of L + steps tokens.
  floor     the bytes a decode step must move (weights once, SSM / conv states read and written, the K and V
            of the keys the token sees) at the GPU's copy bandwidth (eval/harness.py CEILINGS), and the
            step's time as a multiple of it.
`--match-params` resizes d_model of every layout after the first to the first one's parameter count.
`--hf-baseline` adds transformers' LlamaForCausalLM of the same size as our `transformer` layout (random
weights, no download): its prefill is one forward over the prompt filling its cache (logits of the last
position only); its decode is timed the same way as ours: single-token steps of its own forward on its StaticCache
filled to L tokens, compiled with transformers' own CompileConfig (the forward `generate` runs with a static
cache) on the GPU. If that path fails, two greedy `generate` calls are timed instead
((t(n2) - t(n1)) / (n2 - n1), which takes the prefill out); the mode column says which.
Writes `--out` (markdown: device, date, command, tables; default runs/eval/speed/speed.md under the current
directory) and PNGs of time and memory vs length (log-log) beside it, and prints the path. The plots need
matplotlib (`pip install -e ".[plots]"`); without it the markdown says which plots were not drawn.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Callable, Optional

import torch

from hybrid.budget import budget
from hybrid.cache import HybridCache, KVState
from hybrid.errors import ConfigError, cli
from hybrid.model import HybridLM
from hybrid.spec import Layout, LayoutError

from .plots import (add_out_argument, check_out, line_plot, md_table, pick_device, plot_links, png_beside,
                    require_positive, write_result)
from .sizing import build_layouts, n_params, sized_layout

# ------------------------------------------------------------------------------------------------- timing

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable, device: torch.device, repeat: int = 3) -> float:
    """Median seconds of fn() (one warm-up call first; with an even `repeat`, the upper of the two middle times)."""
    fn()
    times = []
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def fill_cache(cache: HybridCache, length: int, chunk: int = 4096) -> None:
    """Make `cache` hold `length` tokens per row: random keys for positions 0..length-1 go through each
    attention layer's own write (ring, sinks, strides as in real decoding); SSM states are left as they are."""
    g = torch.Generator(device=cache.seqlens.device).manual_seed(0)
    for kv in cache.layers:
        if not isinstance(kv, KVState):
            continue
        b, _, h, d = kv.k.shape
        # only the last ring_size positions survive in the ring; sinks / strided slots need the early ones
        start = 0 if kv.ring_start > 0 else max(0, length - kv.ring_size)
        for s in range(start, length, chunk):
            n = min(chunk, length - s)
            k = torch.randn(b, n, h, d, generator=g, device=kv.k.device).to(kv.k.dtype)
            pos = torch.arange(s, s + n, device=kv.k.device).expand(b, n)
            kv.write(k, k, pos, torch.ones_like(pos, dtype=torch.bool))
    cache.seqlens.fill_(length)


def decode_seconds(model: HybridLM, batch: int, length: int, steps: int, device: torch.device,
                   graph: bool) -> tuple[float, int, str]:
    """Seconds per decode step at `batch` from a cache holding `length` tokens; also cache bytes and the mode
    that was timed ('cuda graph' or 'eager', with the reason when capture failed)."""
    cache = model.allocate_cache(batch, length + 4 * steps + 8)
    nbytes = cache.nbytes()
    fill_cache(cache, length)
    tok = torch.zeros(batch, 1, dtype=torch.int64, device=device)  # static input buffer

    def step_loop():
        for _ in range(steps):
            logits = model(tok, cache=cache)
            tok.copy_(logits[:, -1].argmax(-1, keepdim=True))

    def rewind():
        cache.seqlens.fill_(length)  # positions restart, so every replay decodes at the same context

    mode = "eager"
    if graph and device.type == "cuda":
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step_loop()
                rewind()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                step_loop()
            run, mode = g.replay, "cuda graph"
        except Exception as e:  # a host sync or dynamic shape in some path: time eagerly, and say so
            print(f"CUDA-graph capture failed ({type(e).__name__}: {e}); timing the eager loop", file=sys.stderr)
            mode = f"eager (capture failed: {type(e).__name__})"
            run = step_loop
    else:
        run = step_loop

    def once():
        rewind()
        run()
    return time_call(once, device) / steps, nbytes, mode


def prefill_seconds(model: HybridLM, batch: int, length: int, device: torch.device, vocab: int,
                    chunk: int = 0) -> tuple[float, Optional[float]]:
    """(seconds, peak GiB on the GPU) of a prefill of batch x length tokens into an empty cache, the whole
    prompt at once or (chunk > 0) in pieces of `chunk` tokens appended to the cache (hybrid.generate.prefill)."""
    from hybrid.generate import prefill
    ids = torch.randint(0, vocab, (batch, length), device=device)
    mask = torch.ones_like(ids)
    cache = model.allocate_cache(batch, length)

    def once():
        cache.reset()
        prefill(model, ids, mask, cache, chunk)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time_call(once, device, repeat=3)  # a true median: short prompts are host-bound and vary
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    return t, peak


def hf_prefill_seconds(model, batch: int, length: int, device: torch.device) -> tuple[float, Optional[float]]:
    """transformers' forward over batch x length tokens filling its cache, logits of the last position only."""
    ids = torch.randint(0, model.config.vocab_size, (batch, length), device=device)

    def once():
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time_call(once, device, repeat=3)  # timed as ours
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    return t, peak


def device_rates(device: torch.device) -> dict:
    """The copy bandwidth the decode floors use and the dense bf16 peak prefill FLOPs are compared with (GPU
    only; recorded rates for known GPUs, eval/harness.py CEILINGS and training/metrics.py PEAK_TFLOPS)."""
    if device.type != "cuda":
        return {}
    from eval import harness
    from training.config import TrainConfig
    from training.metrics import peak_flops
    name = torch.cuda.get_device_name(device)
    ceil = harness.resolve_ceilings(name, "auto", measure=harness.measure_ceilings)
    return {"copy_bytes": ceil.copy_bytes, "peak_flops": peak_flops(TrainConfig(), device), "source": ceil.source}


def decode_floor_bytes(layout: Layout, batch: int, length: int, dtype_bytes: int) -> int:
    """The least a decode step must move: every weight read once, every SSM / conv state read and written
    (fp32 SSM states), and the K and V of the keys the new token can see read once (global: all `length`;
    local: the window; sparse: the window plus its sinks and strided keys)."""
    total = n_params(layout) * dtype_bytes
    for layer in layout.layers:
        if layer.mixer in ("mamba1", "mamba2"):
            s = getattr(layer, layer.mixer)
            conv = (s.d_inner if layer.mixer == "mamba1" else s.conv_dim) * (s.d_conv - 1) * dtype_bytes
            ssm = (s.d_inner * s.d_state if layer.mixer == "mamba1" else s.nheads * s.headdim * s.d_state) * 4
            total += 2 * batch * (conv + ssm)
        elif layer.mixer == "attention":
            a = layer.attention
            seen = length + 1
            if a.kind != "global":
                far = (a.sinks + (length + 1) // a.stride if a.stride else a.sinks) if a.kind == "sparse" else 0
                seen = min(seen, a.window + far)
            total += batch * seen * a.n_kv_heads * a.head_dim * 2 * dtype_bytes
    return total


def _oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


# ----------------------------------------------------------------------------------------- HF competitor

def hf_llama(layout: Layout, dtype, device):
    """transformers' LlamaForCausalLM with our all-global-attention layout's sizes (random weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    attn = [l.attention for l in layout.layers if l.mixer == "attention"]
    mlps = [l.mlp for l in layout.layers if l.mlp is not None]
    if len(attn) != layout.n_layers or any(a.kind != "global" for a in attn) or len(mlps) != layout.n_layers:
        raise LayoutError(f"--hf-baseline needs a layout of global attention + SwiGLU layers only "
                          f"(got {layout.name!r})")
    a, m = attn[0], layout.model
    cfg = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=mlps[0].d_ff,
                      num_hidden_layers=layout.n_layers, num_attention_heads=a.n_heads,
                      num_key_value_heads=a.n_kv_heads, head_dim=a.head_dim, rms_norm_eps=m.norm_eps,
                      rope_theta=a.rope_theta, tie_word_embeddings=m.tie_embeddings,
                      max_position_embeddings=1 << 20, attention_bias=a.qkv_bias)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    return model


def hf_step_seconds(model, batch: int, length: int, steps: int, device: torch.device) -> tuple[float, str]:
    """Seconds per decode step of transformers' own forward on its StaticCache holding `length` tokens, the way
    our decode is timed: the cache is initialized by a one-token forward and then filled with random keys and
    values (a step does the same work whatever the cache holds; no batch x length prefill, which alone does
    not fit at batch 64 x 16K). The forward is the one `generate` uses with a static cache: compiled with
    transformers' own CompileConfig (CUDA graphs, mode reduce-overhead) on the GPU, eager elsewhere."""
    from transformers import StaticCache
    cache = StaticCache(config=model.config, max_cache_len=length + steps + 1)
    tok = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
    model(input_ids=tok, past_key_values=cache, cache_position=torch.tensor([0], device=device), use_cache=True)
    for layer in cache.layers:
        layer.keys.normal_()
        layer.values.normal_()
    step, mode = model, "forward on a filled StaticCache, eager"
    if device.type == "cuda" and hasattr(model, "get_compiled_call"):
        step = model.get_compiled_call(model.generation_config.compile_config)
        mode = "forward on a filled StaticCache, compiled (transformers' CompileConfig)"
    positions = [torch.tensor([length + i], device=device) for i in range(steps)]

    def run_steps():
        for pos in positions:
            step(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True)
    return time_call(run_steps, device, repeat=3) / steps, mode  # its warm-up call compiles


def hf_decode_seconds(model, batch: int, length: int, steps: int, device: torch.device) -> tuple[float, str]:
    """Seconds per decode step of transformers' own generate, prefill subtracted (two runs of different
    lengths). Uses the static cache when this transformers version accepts it."""
    ids = torch.randint(0, model.config.vocab_size, (batch, length), device=device)
    mask = torch.ones_like(ids)

    def gen(n, impl):
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        if impl:
            kw["cache_implementation"] = impl
        return lambda: model.generate(ids, attention_mask=mask, **kw)
    for impl in ("static", None):
        try:
            n1, n2 = max(1, steps // 4), steps
            t1 = time_call(gen(n1, impl), device, repeat=1)
            t2 = time_call(gen(n2, impl), device, repeat=1)
            return max(t2 - t1, 1e-9) / (n2 - n1), f"generate ({impl or 'dynamic'} cache)"
        except Exception as e:
            if _oom(e) or impl is None:
                raise
            print(f"static cache generate failed ({type(e).__name__}: {e}); retrying with the dynamic cache",
                  file=sys.stderr)
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------------------- main

def _fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _fmt(x: Optional[float], spec: str = ",.0f") -> str:
    return "-" if x is None else format(x, spec)


def run(args) -> dict:
    device = pick_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    layouts = build_layouts(args.layouts, args.set, args.d_model, args.head_dim, args.match_params)
    names = [lay.name for lay in layouts]
    labels = [n if names.count(n) == 1 else spec for n, spec in zip(names, args.layouts)]
    results = {"decode": [], "prefill": [], "device": device, "layouts": list(zip(labels, layouts)),
               "rates": device_rates(device)}
    hf_source = None
    for label, lay in zip(labels, layouts):
        model = HybridLM(lay).to(device=device, dtype=dtype).eval()
        params = n_params(lay)
        print(f"{label}: {params / 1e6:.1f}M parameters", flush=True)
        if all(l.mixer == "attention" and l.attention.kind == "global" for l in lay.layers):
            hf_source = hf_source or lay
        with torch.no_grad():
            for length in args.lengths:
                try:
                    t, peak = prefill_seconds(model, args.prefill_batch, length, device, lay.model.vocab_size,
                                              args.prefill_chunk)
                except Exception as e:
                    if not _oom(e):
                        raise
                    t = peak = None
                flops = budget(lay, length).flops_per_token * length * args.prefill_batch
                results["prefill"].append(dict(layout=label, params=params, length=length, seconds=t,
                                               flops=flops, peak_gib=peak))
                for batch in args.batches:
                    try:
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        s, nbytes, mode = decode_seconds(model, batch, length, args.decode_steps, device,
                                                         graph=not args.no_graph)
                        tps = batch / s
                    except Exception as e:
                        if not _oom(e):
                            raise
                        s, tps, mode = None, None, "OOM"
                        nbytes = None
                    floor = decode_floor_bytes(lay, batch, length, torch.finfo(dtype).bits // 8)
                    results["decode"].append(dict(layout=label, params=params, length=length, batch=batch,
                                                  seconds=s, tokens_per_s=tps, cache_bytes=nbytes, mode=mode,
                                                  floor_bytes=floor))
                    print(f"  L={length:>7} B={batch:>3}  decode {_fmt(tps)} tok/s  cache {_fmt_bytes(nbytes)}"
                          f"  ({mode})", flush=True)
        del model
    if args.hf_baseline:
        _hf_rows(args, results, hf_source, device, dtype)
    return results


def _hf_rows(args, results: dict, hf_source: Optional[Layout], device: torch.device, dtype) -> None:
    """transformers' Llama of the transformer layout's size: prefill and decode rows, timed like ours."""
    lay = hf_source or sized_layout("transformer", args.set, args.d_model, args.head_dim if args.d_model else None)
    hf = hf_llama(lay, dtype, device)
    params = sum(p.numel() for p in hf.parameters())
    name = f"hf-llama ({lay.name} size)"
    with torch.no_grad():
        for length in args.lengths:
            try:
                t, peak = hf_prefill_seconds(hf, args.prefill_batch, length, device)
            except Exception as e:
                if not _oom(e):
                    raise
                t = peak = None
            results["prefill"].append(dict(layout=name, params=params, length=length, seconds=t,
                                           flops=budget(lay, length).flops_per_token * length * args.prefill_batch,
                                           peak_gib=peak))
            for batch in args.batches:
                try:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    try:
                        s, mode = hf_step_seconds(hf, batch, length, args.decode_steps, device)
                    except Exception as e:
                        if _oom(e):
                            raise
                        print(f"transformers static-cache steps failed ({type(e).__name__}: {str(e)[:300]}); "
                              "timing generate instead", file=sys.stderr)
                        s, mode = hf_decode_seconds(hf, batch, length, args.decode_steps, device)
                    tps = batch / s
                except Exception as e:
                    if not _oom(e):
                        raise
                    s, tps, mode = None, None, "OOM"
                results["decode"].append(dict(layout=name, params=params, length=length, batch=batch,
                                              seconds=s, tokens_per_s=tps, cache_bytes=None, mode=mode,
                                              floor_bytes=decode_floor_bytes(lay, batch, length,
                                                                             torch.finfo(dtype).bits // 8)))
                print(f"  {name} L={length} B={batch} decode {_fmt(tps)} tok/s ({mode})", flush=True)
    results["hf"] = (name, lay.model.d_model, params)
    del hf


def _ratios(results: dict) -> list[str]:
    """Decode speedups of every other layout over the all-global-attention ones (ours and transformers')
    at every (length, batch)."""
    rows = {(r["layout"], r["length"], r["batch"]): r["tokens_per_s"] for r in results["decode"]}
    names = list(dict.fromkeys(r["layout"] for r in results["decode"]))
    all_attention = {label for label, lay in results["layouts"]
                     if all(l.mixer == "attention" and l.attention.kind == "global" for l in lay.layers)}
    attn = [n for n in names if n in all_attention or n.startswith("hf-llama")]
    lines = []
    for (name, length, batch), tps in rows.items():
        if name in attn or tps is None:
            continue
        for other in attn:
            base = rows.get((other, length, batch))
            if base:
                lines.append(f"- L={length}, batch {batch}: {name} decodes {tps / base:.2f}x the tokens/s of {other}")
    return lines


def _scaling(results: dict) -> list[str]:
    """Per layout: prefill time's log-log slope in length (1 = linear, 2 = quadratic) and how much the cache
    grows from the shortest to the longest context, at the largest batch."""
    lines = []
    for label, _ in results["layouts"]:
        pts = [(r["length"], r["seconds"]) for r in results["prefill"] if r["layout"] == label and r["seconds"]]
        slope = "-"
        if len(pts) >= 2:
            xs, ys = [math.log(p[0]) for p in pts], [math.log(p[1]) for p in pts]
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            slope = f"{sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs):.2f}"
        batch = max(r["batch"] for r in results["decode"])
        mem = sorted((r["length"], r["cache_bytes"]) for r in results["decode"]
                     if r["layout"] == label and r["batch"] == batch and r["cache_bytes"])
        growth = f"{mem[-1][1] / mem[0][1]:.2f}x ({mem[0][0]} -> {mem[-1][0]} tokens)" if len(mem) >= 2 else "-"
        lines.append((label, slope, growth))
    return lines


def report(results: dict, args, argv) -> str:
    dec, pre = results["decode"], results["prefill"]
    layout_rows = [(label, f"{l.model.d_model}", " ".join(x.code for x in l.layers), f"{n_params(l) / 1e6:.2f}M")
                   for label, l in results["layouts"]]
    if results.get("hf"):
        name, d, p = results["hf"]
        layout_rows.append((name, d, "transformers LlamaForCausalLM", f"{p / 1e6:.2f}M"))
    rates = results.get("rates", {})
    copy, peak = rates.get("copy_bytes"), rates.get("peak_flops")
    floor_ms = lambda r: r["floor_bytes"] / copy * 1e3 if copy and r.get("floor_bytes") else None
    dec_rows = [(r["layout"], r["length"], r["batch"], _fmt(r["tokens_per_s"]),
                 _fmt(None if r["seconds"] is None else r["seconds"] * 1e3, ".3f"), _fmt_bytes(r["cache_bytes"]),
                 _fmt_bytes(r.get("floor_bytes")), _fmt(floor_ms(r), ".3f"),
                 _fmt(None if r["seconds"] is None or floor_ms(r) is None else r["seconds"] * 1e3 / floor_ms(r),
                      ".1f"), r["mode"]) for r in dec]
    tflops = lambda r: None if r["seconds"] is None else r["flops"] / r["seconds"] / 1e12
    pre_rows = [(r["layout"], r["length"], args.prefill_batch,
                 _fmt(None if r["seconds"] is None else r["seconds"] * 1e3, ".1f"),
                 _fmt(None if r["seconds"] is None else args.prefill_batch * r["length"] / r["seconds"]),
                 _fmt(None if r["seconds"] is None else r["seconds"] * 1e6 / r["length"], ".2f"),
                 _fmt(tflops(r), ".1f"), _fmt(None if tflops(r) is None or not peak else 100 * tflops(r) * 1e12 / peak,
                                              ".1f"),
                 _fmt(r.get("peak_gib"), ".2f")) for r in pre]
    plots = []
    names = list(dict.fromkeys(r["layout"] for r in dec))
    for batch in args.batches:
        sel = [r for r in dec if r["batch"] == batch]
        plots += [png_beside(args.out, f"decode_b{batch}"), png_beside(args.out, f"cache_b{batch}")]
        line_plot(plots[-2], {n: ([r["length"] for r in sel if r["layout"] == n],
                                  [r["tokens_per_s"] for r in sel if r["layout"] == n]) for n in names},
                  xlabel="context length (tokens)", ylabel="decode tokens/s", logx=True, logy=True,
                  title=f"decode throughput, batch {batch}")
        line_plot(plots[-1], {n: ([r["length"] for r in sel if r["layout"] == n],
                                  [r["cache_bytes"] for r in sel if r["layout"] == n])
                              for n in names if not n.startswith("hf-")},
                  xlabel="context length (tokens)", ylabel="cache bytes", logx=True, logy=True,
                  title=f"inference cache memory, batch {batch}")
    plots.append(png_beside(args.out, "prefill"))
    line_plot(plots[-1], {n: ([r["length"] for r in pre if r["layout"] == n],
                              [r["seconds"] for r in pre if r["layout"] == n])
                          for n in dict.fromkeys(r["layout"] for r in pre)},
              xlabel="prompt length (tokens)", ylabel="prefill seconds", logx=True, logy=True,
              title=f"prefill time, batch {args.prefill_batch}")
    body = ("Random weights; " + ("bf16" if results["device"].type == "cuda" else "fp32") + " weights and "
            "activations, fp32 SSM states. Decode: the time of one single-token step at the given batch from "
            f"a cache already holding L tokens (median over {args.decode_steps}-step runs; mode says whether "
            "the steps were captured in a CUDA graph). Cache: `HybridCache.nbytes()` for batch x "
            "(L + steps). Floor: the bytes a step must move (every weight, every SSM/conv state read and "
            "written, the K/V of the keys the token sees; eval/speed.py decode_floor_bytes) at the device's copy "
            "bandwidth" + (f" ({copy / 1e12:.1f} TB/s, {rates.get('source')})" if copy else " (GPU only)")
            + ". Prefill: the prompt into an empty cache, "
            + (f"in pieces of {args.prefill_chunk} tokens" if args.prefill_chunk else "all at once")
            + "; TFLOP/s counts the layout's forward FLOPs (hybrid/budget.py, attention included) against the "
            "dense bf16 peak; peak GiB is the GPU's allocation high-water mark during it. A dash is a run that "
            "did not fit in memory.\n\n## Layouts\n\n"
            + md_table(["layout", "d_model", "layers", "params"], layout_rows)
            + "\n\n## Decode\n\n" + md_table(["layout", "context", "batch", "tokens/s", "ms / step", "cache",
                                              "bytes / step (floor)", "floor ms", "x floor", "mode"], dec_rows)
            + "\n\n## Prefill\n\n" + md_table(["layout", "length", "batch", "ms", "tokens/s", "us / token",
                                               "TFLOP/s", "% of dense peak", "peak GiB"], pre_rows))
    body += ("\n\n## Scaling\n\nPrefill slope: least-squares slope of log time vs log length (1 = linear, "
             "2 = quadratic; short prompts are dominated by fixed costs, so read it from long lengths). Cache growth: "
             "cache bytes at the longest context over the shortest, at the largest batch (1.00x = flat).\n\n"
             + md_table(["layout", "prefill slope", "cache growth"], _scaling(results)))
    ratios = _ratios(results)
    if ratios:
        body += "\n\n## Decode speedups\n\n" + "\n".join(ratios)
    body += "\n\n## Plots\n\n" + plot_links(plots)
    return write_result(args.out, "Inference speed and memory", results["device"], body, argv, "eval.speed")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eval.speed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", nargs="+", default=["jamba", "samba", "transformer"],
                    help="shipped layout names or YAML paths, each optionally NAME:PATTERN")
    ap.add_argument("--set", nargs="*", default=[], help="dotlist overrides applied to every layout")
    ap.add_argument("--d-model", type=int, default=None, help="d_model of every layout (heads = d_model // head-dim)")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--match-params", action="store_true", help="resize layouts 2.. to the first one's parameters")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--prefill-batch", type=int, default=1)
    ap.add_argument("--prefill-chunk", type=int, default=0,
                    help="prefill in pieces of this many tokens appended to the cache (0: the whole prompt)")
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--no-graph", action="store_true", help="time the eager decode loop on the GPU too")
    ap.add_argument("--hf-baseline", action="store_true",
                    help="add transformers' LlamaForCausalLM of the transformer layout's size")
    ap.add_argument("--device", default=None)
    add_out_argument(ap, "speed", "speed")
    ap.add_argument("--quick", action="store_true", help="tiny CPU-sized run that checks every code path")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = ap.parse_args(argv)
    require_positive(d_model=args.d_model, head_dim=args.head_dim, lengths=args.lengths, batches=args.batches,
                     prefill_batch=args.prefill_batch, decode_steps=args.decode_steps)
    if args.prefill_chunk < 0:
        raise ConfigError(f"--prefill-chunk {args.prefill_chunk}: expected an integer >= 0 (0: the whole prompt)")
    if args.quick:
        args.layouts = args.layouts if args.layouts != ap.get_default("layouts") else \
            ["tiny:M2 Aw", "transformer:Ag Ag", "mamba2:M2 M2"]
        args.d_model, args.head_dim = args.d_model or 32, 16
        args.set = args.set + ["model.vocab_size=128", "defaults.attention.window=16", "defaults.mlp.d_ff=64"]
        args.lengths = [32, 64] if args.lengths == ap.get_default("lengths") else args.lengths
        args.batches = [1, 2] if args.batches == ap.get_default("batches") else args.batches
        args.decode_steps = 4
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    check_out(args.out)
    results = run(args)
    print(report(results, args, argv))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
