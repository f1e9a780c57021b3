"""The ops behind the model, each dispatched to a backend by device, availability and user choice.

Every op has a `reference` backend (plain PyTorch, `kernels/<op>/reference.py`), which is the definition of
correct and the CPU path. GPU backends register here beside it as they are written; each is tested against
the reference. Choose explicitly with the environment variable HYBRID_KERNELS (`reference`, or a backend name;
`auto` is the default) or with `set_backend(name)`. `python -m kernels` prints what each op uses here.

Call ops through `kernels.ops` (`from kernels import ops; ops.ssd_chunk_scan(...)`): the op folders
(`kernels/ssd/`, `kernels/selective_scan/`, ...) hold the implementations, `ops` the dispatched entry points.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from typing import Callable, Optional

import torch

BACKEND_ENV = "HYBRID_KERNELS"

# op -> [(backend, module, function, available(device_type) -> bool)] in order of preference
_REGISTRY: dict[str, list[tuple[str, str, str, Callable[[str], bool]]]] = {}
_forced: Optional[str] = None


class KernelBackendError(RuntimeError):
    """A backend was requested that cannot run this op here."""


def register(op: str, backend: str, module: str, function: str, available: Callable[[str], bool],
             preferred: bool = False) -> None:
    """Add an implementation of `op`. Under `auto` the first available one in the list wins: registrations
    are appended, or put first with preferred=True (a GPU kernel ahead of the reference)."""
    entries = _REGISTRY.setdefault(op, [])
    entries.insert(0 if preferred else len(entries), (backend, module, function, available))
    _resolve.cache_clear()


def _always(device_type: str) -> bool:
    return True


def set_backend(name: Optional[str]) -> None:
    """Force one backend for every op (None or 'auto' restores automatic choice)."""
    global _forced
    _forced = None if name in (None, "auto") else name
    _resolve.cache_clear()


def _requested() -> str:
    return _forced or os.environ.get(BACKEND_ENV, "auto") or "auto"


@functools.lru_cache(maxsize=None)
def _resolve(op: str, device_type: str, requested: str) -> tuple[str, Callable]:
    candidates = _REGISTRY[op]
    known = {c[0] for entries in _REGISTRY.values() for c in entries}
    if requested != "auto" and requested not in known:
        raise KernelBackendError(f"{BACKEND_ENV}={requested}: no such backend; known: auto, {', '.join(sorted(known))}")
    # a forced backend applies to the ops that have one of that name; the others keep their automatic choice
    if requested in (c[0] for c in candidates):
        candidates = [c for c in candidates if c[0] == requested]
    for backend, module, function, available in candidates:
        if available(device_type):
            return backend, getattr(importlib.import_module(module), function)
    raise KernelBackendError(f"{BACKEND_ENV}={requested}: backend cannot run op {op} on {device_type}")


for _op, _module in [
    ("causal_conv1d", "kernels.conv1d.reference"),
    ("causal_conv1d_update", "kernels.conv1d.reference"),
    ("ssd_chunk_scan", "kernels.ssd.reference"),
    ("selective_scan", "kernels.selective_scan.reference"),
    ("ssd_state_update", "kernels.state_update.reference"),
    ("selective_state_update", "kernels.state_update.reference"),
    ("rmsnorm", "kernels.norm.reference"),
    ("rmsnorm_gated", "kernels.norm.reference"),
    ("attention", "kernels.attention.reference"),
    ("attention_with_cache", "kernels.attention.reference"),
    ("attention_decode", "kernels.attention.reference"),
]:
    register(_op, "reference", _module, _op, _always)


def backend(op: str, device: "str | torch.device" = "cpu") -> str:
    """Name of the backend that `op` uses for tensors on `device`."""
    return _resolve(op, torch.device(device).type, _requested())[0]


def backends(device: "str | torch.device" = "cpu") -> dict[str, str]:
    """Backend per op for tensors on `device`."""
    return {op: backend(op, device) for op in _REGISTRY}


def _cuda_triton(device_type: str) -> bool:
    return device_type == "cuda" and importlib.util.find_spec("triton") is not None


for _op, _module in [("ssd_chunk_scan", "kernels.ssd.triton_scan"),
                    ("selective_scan", "kernels.selective_scan.triton_scan"),
                    ("causal_conv1d", "kernels.conv1d.triton_conv"),
                    ("rmsnorm", "kernels.norm.triton_norm"),
                    ("rmsnorm_gated", "kernels.norm.triton_norm"),
                    ("ssd_state_update", "kernels.state_update.triton_step"),
                    ("selective_state_update", "kernels.state_update.triton_step"),
                    ("causal_conv1d_update", "kernels.conv1d.triton_step")]:
    register(_op, "triton", _module, _op, _cuda_triton, preferred=True)
register("attention_decode", "triton", "kernels.attention.triton_decode", "attention_decode", _cuda_triton,
         preferred=True)


def _module_available(module: str) -> Callable[[str], bool]:
    """The backend module's own `available(device_type)`, imported on first ask."""
    return lambda device_type: importlib.import_module(module).available(device_type)


_flex = _module_available("kernels.attention.flex")
_flash = _module_available("kernels.attention.flash")


# flash-attn first where installed (it hands sparse masks to FlexAttention), then FlexAttention, then SDPA
register("attention", "flex", "kernels.attention.flex", "attention", _flex, preferred=True)
register("attention", "flash", "kernels.attention.flash", "attention", _flash, preferred=True)
register("attention_decode", "flash", "kernels.attention.flash", "attention_decode", _flash, preferred=True)


from . import ops  # noqa: E402  (the dispatched callables; after the registry they read)

__all__ = ["BACKEND_ENV", "KernelBackendError", "backend", "backends", "ops", "register", "set_backend"]
