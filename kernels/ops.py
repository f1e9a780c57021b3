"""Dispatched entry points, one per op: each call runs the backend `kernels.backend(op, device)` names.

Shapes and semantics of each op are those of its reference (`kernels/<op>/reference.py`).
"""
from __future__ import annotations

import torch

from . import _REGISTRY, _requested, _resolve


def _device_of(args, kwargs) -> str:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device.type
    return "cpu"


def _make(op: str):
    def call(*args, **kwargs):
        return _resolve(op, _device_of(args, kwargs), _requested())[1](*args, **kwargs)
    call.__name__ = call.__qualname__ = op
    call.__doc__ = f"Dispatched `{op}`: see the reference implementation for shapes and semantics."
    return call


causal_conv1d = _make("causal_conv1d")
causal_conv1d_update = _make("causal_conv1d_update")
ssd_chunk_scan = _make("ssd_chunk_scan")
selective_scan = _make("selective_scan")
ssd_state_update = _make("ssd_state_update")
selective_state_update = _make("selective_state_update")
rmsnorm = _make("rmsnorm")
rmsnorm_gated = _make("rmsnorm_gated")
attention = _make("attention")
attention_with_cache = _make("attention_with_cache")
attention_decode = _make("attention_decode")

missing = [op for op in _REGISTRY if op not in globals()]
assert not missing, f"registered ops without an entry point: {missing}"
