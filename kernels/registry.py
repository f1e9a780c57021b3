"""Which backend computes each op: the table of implementations, and the choice among them.

Every op has a `reference` implementation (plain PyTorch, `kernels/<op>/reference.py`): the definition of correct
and the CPU path. Faster backends sit beside it in the op's folder and are tested against it. Under
HYBRID_KERNELS=auto (the default) an op runs the first implementation in IMPLEMENTATIONS whose
`available(device_type)` is true. Naming a backend (HYBRID_KERNELS=triton, or `set_backend("triton")`) forces
it for the ops that have one of that name; the other ops keep their automatic choice. An implementation's module
is imported on first use, so importing `kernels` imports neither Triton nor FlexAttention.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from typing import Callable, NamedTuple, Optional

import torch

BACKEND_ENV = "HYBRID_KERNELS"


class KernelBackendError(RuntimeError):
    """A backend was requested that cannot run this op here."""


class Implementation(NamedTuple):
    backend: str  # "reference", "triton", "flex", "flash", "grouped"
    module: str  # imported on first use
    function: str  # the name of the function in `module`
    available: Callable[[str], bool]  # device_type ("cpu", "cuda") -> can it run there


class Resolved(NamedTuple):
    backend: str
    function: Callable


def always(device_type: str) -> bool:
    return True


def cuda_triton(device_type: str) -> bool:
    return device_type == "cuda" and importlib.util.find_spec("triton") is not None


def module_check(module: str) -> Callable[[str], bool]:
    """The backend module's own `available(device_type)`, imported on first ask (the optional dependency
    check lives beside the code that needs it)."""
    def available(device_type: str) -> bool:
        return importlib.import_module(module).available(device_type)
    available.__qualname__ = f"{module}.available"
    return available


_flash = module_check("kernels.attention.flash")
_flex = module_check("kernels.attention.flex")

# op -> (backend, module, available) in order of preference under `auto`; the function has the op's name.
# Attention: flash-attn where installed (it hands sparse masks to FlexAttention), then FlexAttention, then SDPA.
_BUILTIN = {
    "causal_conv1d": [("triton", "kernels.conv1d.triton_conv", cuda_triton),
                      ("reference", "kernels.conv1d.reference", always)],
    "causal_conv1d_update": [("triton", "kernels.conv1d.triton_step", cuda_triton),
                             ("reference", "kernels.conv1d.reference", always)],
    "ssd_chunk_scan": [("triton", "kernels.ssd.triton_scan", cuda_triton),
                       ("reference", "kernels.ssd.reference", always)],
    "selective_scan": [("triton", "kernels.selective_scan.triton_scan", cuda_triton),
                       ("reference", "kernels.selective_scan.reference", always)],
    "ssd_state_update": [("triton", "kernels.ssd.triton_step", cuda_triton),
                         ("reference", "kernels.ssd.reference", always)],
    "selective_state_update": [("triton", "kernels.selective_scan.triton_step", cuda_triton),
                               ("reference", "kernels.selective_scan.reference", always)],
    "rmsnorm": [("triton", "kernels.norm.triton_norm", cuda_triton),
                ("reference", "kernels.norm.reference", always)],
    "add_rmsnorm": [("triton", "kernels.norm.triton_norm", cuda_triton),
                    ("reference", "kernels.norm.reference", always)],
    "rmsnorm_gated": [("triton", "kernels.norm.triton_norm", cuda_triton),
                      ("reference", "kernels.norm.reference", always)],
    "rope": [("triton", "kernels.rope.triton_rope", cuda_triton),
             ("reference", "kernels.rope.reference", always)],
    "rope_kv_write": [("triton", "kernels.rope.triton_rope", cuda_triton),
                      ("reference", "kernels.rope.reference", always)],
    "swiglu": [("triton", "kernels.swiglu.triton_swiglu", cuda_triton),
               ("reference", "kernels.swiglu.reference", always)],
    "linears": [("triton", "kernels.linear.triton_gemv", cuda_triton),
                ("reference", "kernels.linear.reference", always)],
    "swiglu_linear": [("triton", "kernels.linear.triton_gemv", cuda_triton),
                      ("reference", "kernels.linear.reference", always)],
    "add_rmsnorm_linears": [("triton", "kernels.linear.triton_gemv", cuda_triton),
                            ("reference", "kernels.linear.reference", always)],
    "moe_experts": [("grouped", "kernels.moe.grouped", module_check("kernels.moe.grouped")),
                    ("reference", "kernels.moe.reference", always)],
    "linear_cross_entropy": [("triton", "kernels.loss.triton_loss", cuda_triton),
                             ("reference", "kernels.loss.reference", always)],
    "attention": [("flash", "kernels.attention.flash", _flash),
                  ("flex", "kernels.attention.flex", _flex),
                  ("reference", "kernels.attention.reference", always)],
    # FlexAttention over the cache without a dense mask: after the reference until it is timed on a GPU
    # (HYBRID_KERNELS=flex selects it)
    "attention_with_cache": [("reference", "kernels.attention.reference", always),
                             ("flex", "kernels.attention.flex", _flex)],
    "attention_decode": [("flash", "kernels.attention.flash", _flash),
                         ("triton", "kernels.attention.triton_decode", cuda_triton),
                         ("reference", "kernels.attention.reference", always)],
}

# op -> its implementations, most preferred first: the table above plus whatever `register` adds
IMPLEMENTATIONS: dict[str, list[Implementation]] = {
    op: [Implementation(backend, module, op, available) for backend, module, available in rows]
    for op, rows in _BUILTIN.items()}

_forced: Optional[str] = None


def register(op: str, backend: str, module: str, function: str, available: Callable[[str], bool],
             preferred: bool = False) -> None:
    """Add an implementation of `op` (a new op, or another backend of a known one). Under `auto` the first
    available one wins: it is appended, or put first with preferred=True (a GPU kernel ahead of the reference)."""
    entries = IMPLEMENTATIONS.setdefault(op, [])
    entries.insert(0 if preferred else len(entries), Implementation(backend, module, function, available))
    _choose.cache_clear()


def implementations(op: str) -> tuple[Implementation, ...]:
    """The implementations of `op`, most preferred first."""
    return tuple(IMPLEMENTATIONS[op])


def set_backend(name: Optional[str]) -> None:
    """Force one backend for every op that has it (None or 'auto' restores the automatic choice); it takes
    precedence over HYBRID_KERNELS."""
    global _forced
    _forced = None if name in (None, "auto") else name
    _choose.cache_clear()


def requested() -> str:
    """The backend asked for: set_backend's, else HYBRID_KERNELS, else 'auto'."""
    return _forced or os.environ.get(BACKEND_ENV, "auto") or "auto"


def resolve(op: str, device_type: str) -> Resolved:
    """The backend and function that `op` runs for tensors on `device_type` ("cpu", "cuda") under the
    requested backend. Raises KernelBackendError for an unknown backend name or one that cannot run here."""
    return _choose(op, device_type, requested())


@functools.lru_cache(maxsize=None)
def _choose(op: str, device_type: str, asked: str) -> Resolved:
    candidates = IMPLEMENTATIONS[op]
    known = {impl.backend for entries in IMPLEMENTATIONS.values() for impl in entries}
    if asked != "auto" and asked not in known:
        raise KernelBackendError(f"{BACKEND_ENV}={asked}: no such backend; known: auto, {', '.join(sorted(known))}")
    # a forced backend applies to the ops that have one of that name; the others keep their automatic choice
    if asked in (impl.backend for impl in candidates):
        candidates = [impl for impl in candidates if impl.backend == asked]
    for impl in candidates:
        if impl.available(device_type):
            return Resolved(impl.backend, getattr(importlib.import_module(impl.module), impl.function))
    raise KernelBackendError(f"{BACKEND_ENV}={asked}: backend cannot run op {op} on {device_type}")


def backend(op: str, device: "str | torch.device" = "cpu") -> str:
    """Name of the backend that `op` uses for tensors on `device`."""
    return resolve(op, torch.device(device).type).backend


def backends(device: "str | torch.device" = "cpu") -> dict[str, str]:
    """Backend per op for tensors on `device`."""
    return {op: backend(op, device) for op in IMPLEMENTATIONS}
