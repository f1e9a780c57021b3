"""Batched generation on the unified cache: left-padded prefill (whole, or in chunks of a fixed number of
tokens appended to the cache), then one token per step.

Shapes stay static from the first decode step on (the cache is allocated once for prompt + new tokens, and
finished rows keep stepping on a pad token whose output is discarded). On a CUDA device the step is captured
in a CUDA graph (hybrid/decode.py: kept per batch bucket and cache length, so later calls reuse it). Whether
every row has stopped is read on the host only every STOP_CHECK_EVERY steps.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

import torch

from .decode import decode_step
from .model import HybridLM


@dataclass
class SamplingConfig:
    """temperature 0 = greedy. top_k 0 and top_p 1.0 disable those filters."""
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_tokens: Sequence[int] = field(default_factory=tuple)
    pad_id: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1] (1 = off)")


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token per row from logits (batch, vocab) -> (batch,) int64."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p; the first token always stays
        drop = (probs.cumsum(dim=-1) - probs) >= cfg.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _check_prompts(prompts: Sequence[Sequence[int]]) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (batch, longest prompt), prompts aligned to the right."""
    _check_prompts(prompts)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(prompts), width), dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.int64)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


STOP_CHECK_EVERY = 16  # decode steps between host reads of "has every row stopped?" (each read is a sync)


@torch.no_grad()
def prefill(model: HybridLM, ids: torch.Tensor, mask: torch.Tensor, cache, chunk: int = 0) -> torch.Tensor:
    """Run left-padded prompts into an empty cache; returns the last position's logits (batch, vocab).

    ids, mask: (batch, width) from `left_pad`. chunk > 0: the prompt goes in as pieces of `chunk` tokens, each
    appended to the cache, so activations (and the reference attention's masks) are those of one piece. A row
    whose piece is all padding is run as if it were tokens, then its cache rows are emptied again: its real
    tokens later start from an empty state, as in a whole prefill."""
    width = ids.shape[1]
    chunk = width if chunk <= 0 else chunk
    for start in range(0, width, chunk):
        piece, piece_mask = ids[:, start:start + chunk], mask[:, start:start + chunk]
        if start + chunk >= width:  # the last piece ends every row's prompt: no row of it is all padding
            return model(piece, cache=cache, attention_mask=piece_mask, last_only=True)[:, -1]
        all_pad = piece_mask[:, -1] == 0  # left padding: a pad in the last place means a pad everywhere
        model(piece, cache=cache, attention_mask=piece_mask.masked_fill(all_pad[:, None], 1), last_only=True)
        cache.reset(all_pad)


@torch.no_grad()
def generate(model: HybridLM, prompts: Sequence[Sequence[int]], cfg: Optional[SamplingConfig] = None,
             generator: Optional[torch.Generator] = None, *, prefill_chunk: int = 0,
             on_token: Optional[Callable[[int, torch.Tensor], None]] = None, stats: Optional[dict] = None,
             graph: Optional[bool] = None, **overrides) -> list[list[int]]:
    """Continue each prompt (a list of token ids). Returns the new tokens of each row, without the prompt,
    ending at (and including) the first stop token if one was produced.

    Keyword overrides set SamplingConfig fields: generate(model, prompts, max_new_tokens=32, top_p=0.9).
    prefill_chunk: tokens per prefill piece (0: the whole prompt at once; see `prefill`). on_token(step,
    tokens): called with each step's (batch,) new tokens as they are made (still on the device; pad_id for rows
    that have stopped). stats: a dict filled with prefill / decode seconds and tokens per second.
    graph: decode through a kept `hybrid.decode.DecodeStep` (batch rounded up to a bucket, filler rows dropped;
    on CUDA one graph replay per step). None: on CUDA yes, on the CPU no; True on the CPU runs the same bucketed
    steps without capture.
    """
    cfg = replace(cfg, **overrides) if cfg is not None else SamplingConfig(**overrides)
    if prefill_chunk < 0:
        raise ValueError(f"prefill_chunk={prefill_chunk}: must be >= 0 (0 = the whole prompt at once)")
    device = model.embed.weight.device
    _check_prompts(prompts)
    n_prompts = len(prompts)
    if graph is None:
        graph = device.type == "cuda"
    runner = None
    if graph:
        runner = decode_step(model, n_prompts, max(len(p) for p in prompts) + cfg.max_new_tokens,
                           capture=device.type == "cuda")
        prompts = list(prompts) + [[cfg.pad_id]] * (runner.batch - n_prompts)  # filler rows, dropped at the end
    ids, mask = left_pad(prompts, cfg.pad_id, device)
    batch, width = ids.shape
    cache = model.allocate_cache(batch, width + cfg.max_new_tokens) if runner is None else runner.cache
    clock = _Clock(device)
    logits = prefill(model, ids, mask, cache, prefill_chunk)
    prefill_s = clock.lap()
    stop = torch.tensor(list(cfg.stop_tokens) or [-1], device=device)
    done = torch.arange(batch, device=device) >= n_prompts  # filler rows count as stopped from the start
    out = []
    for step in range(cfg.max_new_tokens):
        tok = sample_next(logits, cfg, generator)
        tok = torch.where(done, torch.full_like(tok, cfg.pad_id), tok)
        out.append(tok)
        if on_token is not None:
            on_token(step, tok[:n_prompts])
        done = done | torch.isin(tok, stop)
        last = step == cfg.max_new_tokens - 1
        if last or ((step + 1) % STOP_CHECK_EVERY == 0 and bool(done.all())):
            break
        logits = model(tok[:, None], cache=cache)[:, -1] if runner is None else runner(tok)
    decode_s = clock.lap()
    if stats is not None:
        prompt_tokens = int(mask[:n_prompts].sum())
        stats.update(prefill_s=prefill_s, decode_s=decode_s, prompt_tokens=prompt_tokens, decode_steps=len(out),
                     prefill_tokens_per_s=prompt_tokens / max(prefill_s, 1e-9),
                     decode_tokens_per_s=n_prompts * len(out) / max(decode_s, 1e-9),
                     decode="cuda graph" if runner is not None and runner.captured else
                     "bucketed, eager" if runner is not None else "eager", batch_bucket=batch)
    tokens = torch.stack(out, dim=1)[:n_prompts].tolist()
    stops = set(cfg.stop_tokens)
    result = []
    for row in tokens:
        end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        result.append(row[:end])
    return result


class _Clock:
    """Wall seconds between laps, the device's queued work included (one sync per lap)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.t = time.perf_counter()

    def lap(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt
