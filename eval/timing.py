"""Helpers shared by the GPU benchmarks (eval/bench_*.py): median time of a call and relative error."""
from __future__ import annotations

import torch


def median_ms(fn, rep: int = 100) -> float:
    """Median milliseconds of fn() by `triton.testing.do_bench`, after one call of its own (compiles, autotunes)."""
    import triton.testing
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())
