"""Decode steps kept ready per (batch bucket, cache size): the cache, static input/output buffers and, on CUDA,
the step captured in a CUDA graph, so that one decode step is one graph replay instead of hundreds of kernel
launches from Python.

A user's batch is rounded up to a bucket (BATCH_BUCKETS) and the cache's length up to a multiple of SLOT_ROUND,
so prompts of other sizes reuse a captured step instead of capturing again; the filler rows decode a pad token
whose output is dropped. A step is kept per model (weakly: it goes with the model) for at most MAX_KEPT
(bucket, length) pairs, the least recently used dropped first; `release(model)` frees them all (their caches
and graph memory). A kept step is only reused while it is still valid: the same parameter tensors (a model
moved or cast gets new ones), the same autocast setting and dtype, and eval/train mode; otherwise it is built
again.
"""
from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from typing import Optional

import torch

from .cache import HybridCache

BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
SLOT_ROUND = 256  # cache lengths are rounded up to a multiple of this
MAX_KEPT = 4      # (bucket, length) steps kept per model
WARMUP_STEPS = 2  # eager steps on a side stream before capture (Triton compiles and autotunes there)

_KEPT: "weakref.WeakKeyDictionary[torch.nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()


def batch_bucket(batch: int) -> int:
    """The smallest bucket >= batch (past the last bucket: the next multiple of 64)."""
    if batch < 1:
        raise ValueError(f"batch={batch}: must be >= 1")
    for b in BATCH_BUCKETS:
        if b >= batch:
            return b
    return -(-batch // 64) * 64


def cache_length(max_len: int) -> int:
    """max_len rounded up to a multiple of SLOT_ROUND."""
    if max_len < 1:
        raise ValueError(f"max_len={max_len}: must be >= 1")
    return -(-max_len // SLOT_ROUND) * SLOT_ROUND


class DecodeStep:
    """One (batch, cache length): the cache, a static (batch, 1) token buffer and, when captured, the graph of
    `model(tokens, cache=cache)` writing the last position's logits into a static (batch, vocab) buffer.

    `__call__(tokens)` copies the (batch,) tokens in, runs the step (a replay, or the model eagerly when not
    captured) and returns the logits buffer: read it before the next call, which overwrites it."""

    def __init__(self, model: torch.nn.Module, batch: int, max_len: int, capture: bool):
        self.model, self.batch, self.max_len = model, batch, max_len
        self.cache: HybridCache = model.allocate_cache(batch, max_len)
        device = self.cache.seqlens.device
        self.tokens = torch.zeros(batch, 1, dtype=torch.int64, device=device)
        self.logits: Optional[torch.Tensor] = None
        self.graph = None
        if capture:
            try:
                self._capture()
            except Exception as e:  # a host sync or data-dependent shape somewhere in the step: run it eagerly
                torch.cuda.synchronize()
                self.cache.reset()
                warnings.warn(f"decode step not captured in a CUDA graph ({type(e).__name__}: {e}); decoding "
                              "eagerly", stacklevel=3)

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def _run(self) -> torch.Tensor:
        return self.model(self.tokens, cache=self.cache)[:, -1]

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # first calls compile and autotune the kernels, outside the capture
            for _ in range(WARMUP_STEPS):
                self._run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._run()
        self.graph = graph
        self.cache.reset()  # the warm-up steps wrote into it

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens.view(-1, 1))
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        return self._run()


def _signature(model: torch.nn.Module) -> tuple:
    """What a captured step depends on besides its shapes: the parameter storages it reads, autocast, mode."""
    device = next(model.parameters()).device
    cast = torch.is_autocast_enabled(device.type)
    return (tuple(p.data_ptr() for p in model.parameters()), model.training, cast,
            torch.get_autocast_dtype(device.type) if cast else None)


def decode_step(model: torch.nn.Module, batch: int, max_len: int, capture: Optional[bool] = None) -> DecodeStep:
    """A DecodeStep for at least `batch` rows and `max_len` tokens (bucketed), kept and reused per model, its
    cache emptied. capture: CUDA-graph the step (None: when the model is on a CUDA device)."""
    device = next(model.parameters()).device
    if capture is None:
        capture = device.type == "cuda"
    if capture and device.type != "cuda":
        raise ValueError(f"decode_step: capture=True needs the model on a CUDA device, it is on {device}")
    key = (batch_bucket(batch), cache_length(max_len), capture)
    kept = _KEPT.setdefault(model, OrderedDict())
    signature = _signature(model)
    entry = kept.pop(key, None)
    if entry is None or entry[0] != signature:
        entry = None  # drop a stale step before building its replacement (its memory goes first)
        while len(kept) >= MAX_KEPT:
            kept.popitem(last=False)
        entry = (signature, DecodeStep(model, key[0], key[1], capture))
    kept[key] = entry
    step = entry[1]
    step.cache.reset()
    return step


def release(model: torch.nn.Module) -> None:
    """Free every kept decode step of `model` (caches and CUDA-graph memory)."""
    _KEPT.pop(model, None)
