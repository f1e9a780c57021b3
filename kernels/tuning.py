"""Launch settings picked by timing them on the GPU at hand, once per shape class, remembered on disk.

A kernel wrapper with several good settings (tile shapes, programs per SM, whether to cut long rows into
segments) calls `pick(op, key, candidates, run, default)`. With autotuning on, the first call of a shape class
(`key`: the sizes that decide which setting wins, bucketed by the caller) runs every candidate, times it with CUDA
events and keeps the fastest; later calls, in this process or a later one on the same kind of GPU with the same
Triton, reuse it. Candidates that fail (e.g. too many registers) are skipped; the default is always one of them,
so a tuned choice is never slower than the untuned one at the moment it was timed.

    BRAIDLM_AUTOTUNE=1            time the candidates (default: 0, every wrapper uses its committed default)
    BRAIDLM_TUNING_CACHE=FILE     where choices are kept (default: ~/.cache/braidlm/tuning.json)

Nothing is timed on the CPU, while a CUDA graph is being captured, or with autotuning off: `run(default)`.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
from typing import Any, Callable, Hashable, Optional, Sequence

import torch

ENV = "BRAIDLM_AUTOTUNE"
CACHE_ENV = "BRAIDLM_TUNING_CACHE"
REPS = 3  # timed runs per candidate, after one untimed run (compiles, warms caches)

_lock = threading.Lock()
_memory: dict[str, Any] = {}
_loaded_from: Optional[str] = None


def enabled() -> bool:
    return os.environ.get(ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def cache_path() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "braidlm", "tuning.json")


def _device_tag(device: torch.device) -> str:
    import triton
    return f"{torch.cuda.get_device_name(device)}|triton {triton.__version__}"


def _load() -> None:
    """The choices on disk, merged into memory once per cache file."""
    global _loaded_from
    path = cache_path()
    if _loaded_from == path:
        return
    _loaded_from = path
    try:
        with open(path) as f:
            saved = json.load(f)
        if isinstance(saved, dict):
            for k, v in saved.items():
                _memory.setdefault(k, v)
    except (OSError, ValueError):
        pass  # no cache yet, or an unreadable one: it is rewritten on the next choice


def _save() -> None:
    """All choices, written atomically (several ranks of one machine may share the file)."""
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tuning.")
        with os.fdopen(fd, "w") as f:
            json.dump(_memory, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: the choices still hold for this process


def _time_ms(fn: Callable[[], Any]) -> float:
    """Median of REPS CUDA-event timings of fn(), after one untimed call."""
    fn()
    times = []
    for _ in range(REPS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _can_time(device: torch.device) -> bool:
    return device.type == "cuda" and not torch.cuda.is_current_stream_capturing()


def pick(op: str, key: Sequence[Hashable], candidates: Sequence[Any], run: Callable[[Any], Any], default: Any,
         device: torch.device) -> Any:
    """run(setting) for the setting chosen for (op, key): the cached choice, else (autotuning on, a CUDA device,
    no graph capture) the fastest candidate by timing, else `default`. Settings are JSON values (ints, strings,
    lists) so that the cache file can hold them. Returns run's result for the chosen setting."""
    if not enabled() or not _can_time(device):
        return run(default)
    name = f"{_device_tag(device)}|{op}|{json.dumps(list(key))}"
    with _lock:
        _load()
        chosen = _memory.get(name)
    if chosen is not None and chosen in list(candidates) + [default]:
        return run(chosen)
    options = list(dict.fromkeys(json.dumps(c) for c in [default, *candidates]))
    timed = {}
    for text in options:
        setting = json.loads(text)
        try:
            timed[text] = _time_ms(lambda: run(setting))
        except Exception:  # a setting that cannot run here (resources, a shape it does not support)
            continue
    best = json.loads(min(timed, key=timed.get)) if timed else default
    with _lock:
        _memory[name] = best
        _save()
    return run(best)


def choices() -> dict[str, Any]:
    """The choices made or loaded in this process: {"<gpu>|<triton>|<op>|<key>": setting}."""
    with _lock:
        _load()
        return dict(_memory)


def clear() -> None:
    """Forget the choices in memory (the file stays); the next pick reads the file again."""
    global _loaded_from
    with _lock:
        _memory.clear()
        _loaded_from = None
