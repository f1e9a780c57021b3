"""Helpers shared by the GPU benchmarks (eval/bench_*.py): the CUDA check, median time of a call and relative
error."""
from __future__ import annotations

import torch

from hybrid.errors import ConfigError


def require_cuda(command: str) -> None:
    """ConfigError when there is no CUDA GPU: the benchmarks time Triton kernels and CUDA graphs."""
    if not torch.cuda.is_available():
        raise ConfigError(f"{command} needs a CUDA GPU (torch {torch.__version__} sees none); the CPU checks of "
                          "the same kernels are the tests: python -m pytest -q")


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
