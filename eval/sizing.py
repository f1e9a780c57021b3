"""Layouts by name or path, resized by d_model, and matched in parameter count (shared by eval.speed and
eval.recall: comparisons are between layouts of equal size)."""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

from hybrid.budget import budget
from hybrid.layout import load_layout
from hybrid.spec import Layout, LayoutError

LAYOUT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "layouts")


def layout_path(name: str) -> str:
    """A shipped layout's name (`jamba`) or a YAML path."""
    if os.path.isfile(name):
        return name
    path = os.path.join(LAYOUT_DIR, f"{name}.yaml")
    if not os.path.isfile(path):
        shipped = sorted(f[:-5] for f in os.listdir(LAYOUT_DIR) if f.endswith(".yaml"))
        raise LayoutError(f"layout {name!r}: not a file and not a shipped layout (allowed: {', '.join(shipped)})")
    return path


def split_spec(spec: str) -> tuple[str, Optional[str]]:
    """`name` or `name:PATTERN` (a layers pattern replacing the file's, e.g. `jamba:M1 M1 Ag M1`)."""
    name, _, pattern = spec.partition(":")
    return name, (pattern.strip() or None)


def sized_layout(spec: str, overrides: Sequence[str] = (), d_model: Optional[int] = None,
                 head_dim: Optional[int] = None) -> Layout:
    """Load `name[:PATTERN]` with dotlist overrides. With `d_model` and `head_dim`, attention gets
    d_model // head_dim heads, as many KV heads (GQA ratios of the file are dropped: they need not divide),
    so that any d_model that is a multiple of head_dim resolves."""
    name, pattern = split_spec(spec)
    dotlist = ([f"layers={pattern}"] if pattern else []) + list(overrides)
    if d_model is not None:
        dotlist.append(f"model.d_model={d_model}")
        if head_dim:
            heads = max(1, d_model // head_dim)
            dotlist += [f"defaults.attention.n_heads={heads}", f"defaults.attention.n_kv_heads={heads}"]
    layout = load_layout(layout_path(name), dotlist)
    return layout


def n_params(layout: Layout) -> int:
    return budget(layout).params


def match_params(spec: str, target: int, overrides: Sequence[str], head_dim: int, step: int = 16,
                 hi: int = 4096, key: Callable[[Layout], int] = n_params) -> Layout:
    """The layout `spec` at the d_model (a multiple of `step`) whose `key(layout)` (parameter count by
    default) is closest to `target`."""
    best = None
    for d in range(step, hi + 1, step):
        try:
            lay = sized_layout(spec, overrides, d, head_dim)
        except LayoutError:
            continue  # this d_model does not divide into heads / headdim
        p = key(lay)
        if best is None or abs(p - target) < abs(best[0] - target):
            best = (p, lay)
        if p > target and best[0] != p:
            break  # parameters grow with d_model: past the target and not closer
    if best is None:
        raise LayoutError(f"{spec}: no d_model in [{step}, {hi}] (multiples of {step}) resolves; "
                          "set model.d_model by hand")
    return best[1]


def build_layouts(specs: Sequence[str], overrides: Sequence[str], d_model: Optional[int], head_dim: int,
                  match: bool) -> list[Layout]:
    """The layouts to compare; with `match`, every one after the first resized to the first's parameters."""
    first = sized_layout(specs[0], overrides, d_model, head_dim if d_model else None)
    out = [first]
    for spec in specs[1:]:
        if match:
            out.append(match_params(spec, n_params(first), overrides, head_dim))
        else:
            out.append(sized_layout(spec, overrides, d_model, head_dim if d_model else None))
    return out
