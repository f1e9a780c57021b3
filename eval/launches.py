"""Kernel launches of one decode step, counted on any device (the CPU too): what a CUDA graph of the step replays.

    python -m eval.launches                                   # the shipped 128M layouts, batch 1
    python -m eval.launches --layouts transformer jamba --batch 8 --by-op

A decode step at batch 1 is launch-bound: its kernels are a few microseconds each inside a graph while its bytes
take tens (eval/results/speed.md), so the number of launches is the step's cost model. Each dispatched op
(`kernels.ops.*`, one Triton kernel or one library call on the GPU) counts as one launch, whatever its reference
does on the CPU; every other torch op that computes (not views, which launch nothing) counts as one. The counts
are exact for the op structure; a GPU op may itself launch two kernels (a split-KV attention and its merge).
"""
from __future__ import annotations

import argparse
import collections
import functools
import sys
from contextlib import contextmanager
from typing import Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from eval.plots import md_table
from eval.sizing import sized_layout
from hybrid.errors import ConfigError, cli
from hybrid.model import HybridLM

LAYOUTS = ["transformer", "jamba", "samba", "griffin", "mamba2", "nemotron-h"]
# aten ops that only make views or metadata: no kernel
_NO_KERNEL = {"aten.detach.default", "aten.t.default", "aten.transpose.int", "aten.unsqueeze.default",
              "aten.squeeze.dim", "aten.select.int", "aten.slice.Tensor", "aten.split.Tensor",
              "aten.split_with_sizes.default", "aten.expand.default", "aten.unbind.int", "aten.permute.default",
              "aten._unsafe_view.default", "aten.alias.default", "aten.as_strided.default", "aten.view.default",
              "aten.unflatten.int", "aten.reshape.default", "aten.chunk.default", "aten.narrow.default",
              "aten.lift_fresh.default", "aten.empty.memory_format", "aten.empty_like.default"}


class _Count(TorchDispatchMode):
    def __init__(self, counts: collections.Counter, depth: list):
        super().__init__()
        self.counts, self.depth = counts, depth

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if self.depth[0] == 0 and name not in _NO_KERNEL:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def counting():
    """Counter of launches inside the block: `kernels.ops.*` calls as `ops.NAME`, other computing aten ops."""
    import kernels.ops as ops
    counts: collections.Counter = collections.Counter()
    depth = [0]
    saved = {}

    def wrap(name, fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if depth[0] == 0:
                counts[f"ops.{name}"] += 1
            depth[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
        return counted

    for name in [n for n in vars(ops) if not n.startswith("_") and n != "resolve" and callable(getattr(ops, n))
                 and getattr(getattr(ops, n), "__module__", "") == ops.__name__]:
        saved[name] = getattr(ops, name)
        setattr(ops, name, wrap(name, saved[name]))
    try:
        with _Count(counts, depth):
            yield counts
    finally:
        for name, fn in saved.items():
            setattr(ops, name, fn)


def decode_launches(model: HybridLM, batch: int = 1, context: int = 16) -> collections.Counter:
    """Launches of one decode step of `model` after a prompt of `context` tokens (greedy sampling excluded)."""
    device = model.embed.weight.device
    cache = model.allocate_cache(batch, context + 2)
    vocab = model.layout.model.vocab_size
    with torch.no_grad():
        model(torch.randint(1, vocab, (batch, context), device=device), cache=cache)
        ids = torch.randint(1, vocab, (batch, 1), device=device)
        with counting() as counts:
            model(ids, cache=cache, last_only=True)
    return counts


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m eval.launches", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", nargs="+", default=LAYOUTS, help="shipped layout names or YAML paths")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--by-op", action="store_true", help="also list each layout's launches by op")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = ap.parse_args(argv)
    if args.batch < 1:
        raise ConfigError(f"--batch {args.batch}: expected an integer >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    rows, detail = [], []
    for name in args.layouts:
        layout = sized_layout(name)
        counts = decode_launches(HybridLM(layout).eval(), args.batch)
        per_layer = sum(counts.values()) / max(1, layout.n_layers)
        rows.append([name, layout.n_layers, sum(counts.values()), f"{per_layer:.1f}"])
        detail.append(f"{name}: " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
    print(md_table(["layout", "layers", "launches per decode step", "per layer"], rows))
    if args.by_op:
        print("\n" + "\n".join(detail))
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
