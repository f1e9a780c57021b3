"""Where a decode step's GPU time goes, inside its CUDA graph: kernels per step, busy time against the step's time,
and the kernels by total time.

    python -m eval.decode_profile --layouts transformer jamba:64 --context 1024

Each layout (a shipped name or YAML path, `:B` for batch B, default 1) is built at its size with random weights in
bf16, its cache filled to `--context` tokens (eval/speed.py fill_cache), and `--steps` greedy decode steps are
captured in one CUDA graph, as `python -m eval.speed` times them. The step time is the replay's (CUDA events);
the profile is one replay under the PyTorch profiler: `busy` sums the kernels' durations, so step - busy is the
GPU idle between kernels (launch spacing inside the graph). A step whose busy time is near its step time is bound
by its kernels' own latency, not by launching them.
"""
from __future__ import annotations

import argparse
import collections
import sys
from typing import Optional, Sequence

import torch

from hybrid.errors import ConfigError, cli


def profile(spec: str, batch: int, context: int, steps: int, top: int) -> str:
    from eval.harness import graph, median_ms
    from eval.sizing import sized_layout
    from eval.speed import fill_cache
    from hybrid.model import HybridLM
    model = HybridLM(sized_layout(spec, [])).to("cuda", torch.bfloat16).eval()
    cache = model.allocate_cache(batch, context + 4 * steps + 8)
    fill_cache(cache, context)
    tok = torch.zeros(batch, 1, dtype=torch.int64, device="cuda")

    def loop():
        cache.seqlens.fill_(context)  # every replay decodes at the same context
        for _ in range(steps):
            tok.copy_(model(tok, cache=cache)[:, -1].argmax(-1, keepdim=True))
    with torch.no_grad():
        replay = graph(loop)
        ms = median_ms(replay, 20) / steps
        from torch.profiler import ProfilerActivity, profile as torch_profile
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            replay()
            torch.cuda.synchronize()
    kernels = [(e.name, e.time_range.end - e.time_range.start) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start]
    total = collections.defaultdict(lambda: [0.0, 0])
    for name, us in kernels:
        total[name][0] += us
        total[name][1] += 1
    busy = sum(us for _, us in kernels) / steps
    lines = [f"== {spec} batch {batch}, context {context}: {ms:.3f} ms per step ({batch * 1e3 / ms:,.0f} tokens/s), "
             f"{len(kernels) / steps:.0f} kernels per step, busy {busy / 1e3:.3f} ms"]
    for name, (us, n) in sorted(total.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"  {us / steps:8.1f} us  x{n / steps:5.1f}  {us / n:6.2f} us each  {name[:100]}")
    return "\n".join(lines)


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m eval.decode_profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", nargs="+", default=["transformer", "jamba", "samba", "mamba2"],
                    help="shipped layout names or YAML paths, each optionally :BATCH")
    ap.add_argument("--context", type=int, default=1024, help="tokens in the cache before the steps")
    ap.add_argument("--steps", type=int, default=8, help="decode steps per graph")
    ap.add_argument("--top", type=int, default=20, help="kernels listed per layout")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = ap.parse_args(argv)
    for name, value in (("--context", args.context), ("--steps", args.steps), ("--top", args.top)):
        if value < 1:
            raise ConfigError(f"{name} {value}: expected an integer >= 1")
    args.runs = []
    for spec in args.layouts:
        name, _, b = spec.rpartition(":") if spec.rpartition(":")[2].isdigit() else (spec, "", "1")
        if int(b) < 1:
            raise ConfigError(f"--layouts {spec}: the batch after ':' must be >= 1")
        args.runs.append((name, int(b)))
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    from eval.harness import require_cuda
    require_cuda("eval.decode_profile")
    for name, batch in args.runs:
        print(profile(name, batch, args.context, args.steps, args.top), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
