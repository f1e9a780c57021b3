"""Layout files: YAML (or a dict / DictConfig) -> a validated, fully resolved `hybrid.spec.Layout`.

A layout file has five top-level keys (layouts/README.md is the user's guide)::

    name: jamba                       # optional: defaults to the file's stem
    model: {d_model: 768, vocab_size: 32000, norm_eps: 1.0e-5, tie_embeddings: true, init_std: 0.02,
            max_seq_len: 4096}
    defaults: {mamba1: {...}, mamba2: {...}, attention: {...}, mlp: {...}}   # every field optional
    layers: "[M1 M1 M1 M1 Ag M1 M1 M1] x 2"        # a pattern (hybrid/pattern.py), or an explicit list:
    # layers: [{mixer: mamba2}, {mixer: attention, kind: local, window: 512, mlp: none}, {mixer: none}]
    overrides: {3: {window: 2048}}                  # optional per-layer fields by index

Pattern grammar (hybrid/pattern.py has the full definition): whitespace-separated layer codes M1 (mamba1),
M2 (mamba2), A / Ag (global attention), Aw (local, sliding window), As (sparse), F (MLP-only layer); a code
may carry `:swiglu` / `:moe` / `:none` to set that layer's MLP (default: defaults.mlp.kind, or moe on the layers
`defaults.mlp.moe_every` / `moe_offset` pick; `F:none` is an error);
`[ ... ] x N` repeats a group (groups nest, `x N` is optional) and `TOKEN x N` a single layer. Syntax errors
name the offending token and its character position.

A layer entry holds `mixer` (mamba1 | mamba2 | attention | none), optional `mlp` (swiglu | moe | none) and `d_ff`,
the MoE fields of defaults.mlp (n_experts, top_k, ...: only on a moe layer), and any field of its mixer's defaults
group; a field the layer leaves out comes from that group. Derived
values: dt_rank auto = ceil(d_model / 16); n_kv_heads null = n_heads; head_dim null = d_model // n_heads;
d_ff null = 8/3 * d_model rounded up to a multiple of defaults.mlp.multiple_of.

`load_layout` runs, in order: read the source; apply dotlist items that replace `layers` or edit
`overrides`; expand a pattern into the explicit list; merge the `overrides:` section; apply the other dotlist
items (so `layers.3.window=2048` works on a pattern); resolve interpolations; type-check every section with
its omegaconf schema; merge each layer over its defaults group, check it and resolve it into spec objects.
Every user error is one LayoutError naming the dotted key, the value given and what is allowed.

    python -m hybrid.layout layouts/jamba.yaml [key=value ...] [--seq-len N] [--dtype bf16|fp32]

prints the resolved layers and the parameter / FLOP / memory budget (hybrid/budget.py).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import functools
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, List, Optional, Union, get_args, get_origin, get_type_hints

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import pattern
from .budget import budget, format_budget, format_layers
from .resolve import MOE_FIELDS, _fail, _resolve
from .spec import MIXERS, LayerSpec, Layout, LayoutError


# ----------------------------------------------------------------------------------------------- schema
@dataclass
class ModelConfig:
    d_model: int = MISSING
    vocab_size: int = MISSING
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    max_seq_len: int = 2048


@dataclass
class Mamba1Config:
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: Union[int, str] = "auto"
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    bias: bool = False
    dt_bc_norm: bool = False       # Jamba's RMSNorms of dt_low, B and C between x_proj and the scan


@dataclass
class Mamba2Config:
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_limit: List[float] = field(default_factory=lambda: [0.0, math.inf])
    conv_bias: bool = True
    bias: bool = False


@dataclass
class AttentionConfig:
    kind: str = "global"
    n_heads: int = 12
    n_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    window: Optional[int] = None   # required by local / sparse layers; a global layer must leave it unset
    sinks: int = 0
    stride: int = 0
    rope: bool = True
    rope_theta: float = 10000.0
    qkv_bias: bool = False


@dataclass
class MlpConfig:
    kind: str = "swiglu"           # the MLP of mixer layers that do not say otherwise
    d_ff: Optional[int] = None     # of each expert for kind moe
    multiple_of: int = 64
    moe_every: int = 0             # N > 0: layer i gets kind moe in place of its default MLP where i % N == moe_offset
    moe_offset: int = 0
    # kind moe (hybrid/moe.py); a layer may set these itself, like d_ff
    n_experts: int = 8
    top_k: int = 2
    n_shared_experts: int = 0
    router: str = "softmax"        # softmax | sigmoid
    norm_topk_prob: bool = True
    capacity_factor: Optional[float] = None   # null or 0 = dropless
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.001


GROUPS = {"mamba1": Mamba1Config, "mamba2": Mamba2Config, "attention": AttentionConfig, "mlp": MlpConfig}
MIXER_GROUPS = ("mamba1", "mamba2", "attention")
LAYER_COMMON = {"mixer": Optional[str], "mlp": Optional[str], "d_ff": Optional[int],
                **{name: Optional[get_type_hints(MlpConfig)[name]] for name in MOE_FIELDS}}
TOP_KEYS = ("name", "model", "defaults", "layers", "overrides")


def _fields(cls) -> dict:
    """Field name -> type hint (evaluated: this module's annotations are strings until asked)."""
    return get_type_hints(cls)


def _group_fields(group: str) -> dict:
    return _fields(GROUPS[group]) if group in GROUPS else {}


# One schema for every layer entry: the union of the mixer groups' fields, all optional, where None means
# "take it from the defaults group". Generated so that it cannot drift from the groups above.
LayerConfig = dataclasses.make_dataclass("LayerConfig", [
    (name, tp if get_origin(tp) is Union and type(None) in get_args(tp) else Optional[tp], field(default=None))
    for name, tp in {**LAYER_COMMON, **{k: v for g in MIXER_GROUPS for k, v in _fields(GROUPS[g]).items()}}.items()])


def _layer_keys(mixer: str) -> set:
    """Keys a layer entry with this mixer may hold."""
    return set(LAYER_COMMON) | set(_group_fields(mixer))


# ------------------------------------------------------------------------------------------ error helpers
def _join(prefix: str, key) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _check_keys(values: dict, allowed, prefix: str) -> None:
    for key in values:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), list(allowed), 1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise _fail(_join(prefix, key), values[key], "unknown key" + hint, ", ".join(allowed))


def _mapping(value, key: str, what: str = "a mapping") -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(key, value, "wrong type", what)
    return value


def _describe(tp) -> str:
    """A type hint in words, for 'allowed:' in error messages."""
    args = [a for a in get_args(tp) if a is not type(None)]
    if get_origin(tp) is Union:
        text = " or ".join(_describe(a) for a in args)
        return text + " or null" if type(None) in get_args(tp) else text
    if get_origin(tp) in (list, List):
        return f"a list of {_describe(args[0]).split(' ', 1)[1]}s"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


@functools.lru_cache(maxsize=None)
def _structured(schema) -> DictConfig:
    # built once per schema: merge() copies it, and building it is most of the cost of a small merge
    return OmegaConf.structured(schema)


def _type_error(e: Exception, values: dict, schema, prefix: str) -> LayoutError:
    """omegaconf's validation error as a LayoutError naming the key, the value and the expected type."""
    path = re.sub(r"\[(\d+)\]", r".\1", str(getattr(e, "full_key", None) or getattr(e, "key", None) or ""))
    if not path:  # some merge failures (a mapping given for a list) carry no key: find the field that fails
        path = next((k for k in values if not _merges(schema, {k: values[k]})), "")
    name = path.split(".")[0]
    value = values.get(name)
    if path != name and isinstance(value, list):  # an element of a list field
        value = value[int(path.rsplit(".", 1)[1])]
    hint = _fields(schema).get(name, Any)
    allowed = "'auto' or an integer" if name == "dt_rank" else _describe(hint)
    return _fail(_join(prefix, path), value, "wrong type", allowed)


def _merges(schema, values: dict) -> bool:
    try:
        OmegaConf.merge(_structured(schema), values)
        return True
    except (OmegaConfBaseException, TypeError, ValueError):
        return False


def _typed(values: dict, schema, prefix: str) -> dict:
    """`values` checked against an omegaconf structured schema: unknown keys, types, required fields.
    Returns a plain dict with every schema field (converted, e.g. 1 -> 1.0 for a float field)."""
    hints = _fields(schema)
    _check_keys(values, hints, prefix)
    try:
        cfg = OmegaConf.merge(_structured(schema), values)
    except (OmegaConfBaseException, TypeError, ValueError) as e:
        raise _type_error(e, values, schema, prefix) from None
    for name in hints:
        if OmegaConf.is_missing(cfg, name):
            raise _fail(_join(prefix, name), None, "required", _describe(hints[name]))
    return OmegaConf.to_container(cfg)


# ------------------------------------------------------------------------------------------ loading
def load_layout(source, overrides=()) -> Layout:
    """Load, validate and resolve a layout.

    source: a path to a YAML file, a dict, or an omegaconf DictConfig. overrides: omegaconf dotlist strings,
    e.g. `model.d_model=512`, `layers.3.window=2048`, `defaults.attention.window=1024`, applied after the
    pattern is expanded. Raises LayoutError (prefixed with the file name when loaded from a file).
    """
    label = os.fspath(source) if isinstance(source, (str, os.PathLike)) else None
    overrides = [overrides] if isinstance(overrides, str) else list(overrides)
    try:
        tree = _read(source)
        name = os.path.splitext(os.path.basename(label))[0] if label else "layout"
        return _build(tree, overrides, name)
    except LayoutError as e:
        if label is None:
            raise
        raise LayoutError(f"{label}: {e}") from None


def _read(source) -> dict:
    if isinstance(source, DictConfig):
        tree = OmegaConf.to_container(source, resolve=False)
    elif isinstance(source, dict):
        tree = copy.deepcopy(source)
    elif isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise LayoutError("no such file")
        try:
            tree = OmegaConf.to_container(OmegaConf.load(source), resolve=False)
        except Exception as e:  # YAML syntax errors come in several exception types
            raise LayoutError(f"cannot parse YAML: {e}") from None
    else:
        raise _fail("source", source, "wrong type", "a path to a YAML file, a dict or an omegaconf DictConfig")
    return _mapping(tree, "<top level>", "a mapping with keys " + ", ".join(TOP_KEYS))


def _build(tree: dict, dotlist: list, default_name: str) -> Layout:
    items = [_parse_override(item) for item in dotlist]
    # these edit what the pattern expansion and the overrides section read, so they go first
    early = [i for i, (path, _) in enumerate(items) if path[0] == "overrides" or path == ["layers"]]
    for i in early:
        _set_path(tree, *items[i])
    _check_keys(tree, TOP_KEYS, "")
    layers, origins = _explicit_layers(tree.get("layers", MISSING))
    _apply_overrides(layers, _mapping(tree.pop("overrides", None), "overrides"))
    tree["layers"] = layers
    for i, (path, value) in enumerate(items):
        if i not in early:
            _set_path(tree, path, value)
    _check_keys(tree, TOP_KEYS, "")
    tree = _resolve_interpolations(tree)
    name = tree.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise _fail("name", name, "wrong type", "a non-empty string")
    model = _typed(_mapping(tree.get("model"), "model"), ModelConfig, "model")
    defaults = _mapping(tree.get("defaults"), "defaults")
    _check_keys(defaults, GROUPS, "defaults")
    groups = {g: _typed(_mapping(defaults.get(g), f"defaults.{g}"), cls, f"defaults.{g}") for g, cls in GROUPS.items()}
    entries = [_typed_layer(entry, i, origin) for i, (entry, origin) in enumerate(zip(tree["layers"], origins))]
    return _resolve(name, model, groups, entries)


def _parse_override(item: str) -> tuple:
    """'a.b.3=value' -> (['a', 'b', '3'], value), the value parsed as omegaconf parses dotlists."""
    key, eq, text = item.partition("=") if isinstance(item, str) else ("", "", "")
    if not eq or not key or any(not part for part in key.split(".")):
        raise _fail("overrides", item, "malformed dotlist item", "key=value, e.g. layers.3.window=2048")
    try:
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]))["v"]
    except Exception:  # not YAML, e.g. the pattern `[M1 F] x 2`: take the text as it is
        value = text
    if key == "layers" and not (isinstance(value, list) and all(isinstance(e, dict) for e in value)):
        value = text  # `layers=[M1 F]` is a pattern, not a YAML list of one string
    return key.split("."), value


def _set_path(tree: dict, path: list, value) -> None:
    node = tree
    for depth, part in enumerate(path):
        key = ".".join(path[: depth + 1])
        last = depth == len(path) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise _fail(key, value, f"layer index out of range ({len(node)} layers)", f"0..{len(node) - 1}")
            part = int(part)
        elif not isinstance(node, dict):
            raise _fail(".".join(path[:depth]), node, f"is a value, so {'.'.join(path)} cannot be set", "a mapping")
        if last:
            node[part] = value
        else:
            if isinstance(node, dict) and node.get(part) is None:
                node[part] = {}
            node = node[part]


def _explicit_layers(layers) -> tuple[list, list]:
    """The `layers:` value as an explicit list of layer dicts (a pattern string is expanded), and the mixer
    each pattern layer was written as (None for list entries)."""
    if layers is MISSING:
        raise _fail("layers", None, "required", "a pattern string or a list of layers")
    if isinstance(layers, str):
        layers = pattern.expand(layers)
        origins = [entry["mixer"] for entry in layers]
    elif isinstance(layers, list):
        origins = [None] * len(layers)
    else:
        raise _fail("layers", layers, "wrong type", "a pattern string or a list of layers")
    if not layers:
        raise _fail("layers", layers, "empty layer stack", "at least one layer")
    for i, entry in enumerate(layers):
        if not isinstance(entry, dict):
            raise _fail(f"layers.{i}", entry, "wrong type", "a mapping such as {mixer: mamba2}")
    return layers, origins


def _apply_overrides(layers: list, overrides: dict) -> None:
    for key, fields in overrides.items():
        if not str(key).isdigit() or int(key) >= len(layers):
            raise _fail(f"overrides.{key}", fields, f"layer index out of range ({len(layers)} layers)",
                        f"0..{len(layers) - 1}")
        layers[int(key)].update(_mapping(fields, f"overrides.{key}"))


def _resolve_interpolations(tree: dict) -> dict:
    try:
        return OmegaConf.to_container(OmegaConf.create(tree), resolve=True)
    except OmegaConfBaseException as e:
        key = re.sub(r"\[(\d+)\]", r".\1", str(e.full_key or ""))
        why = f"cannot resolve: {str(e.msg).splitlines()[0]}"
        raise _fail(key or "<top level>", None, why, "a valid ${...} interpolation") from None


def _typed_layer(entry, i: int, origin: Optional[str]) -> dict:
    """Check one layer entry's mixer, keys and types; fields it does not set come back as None.
    origin: the mixer the pattern wrote this layer as (None for an explicit list entry)."""
    prefix = f"layers.{i}"
    if not isinstance(entry, dict):  # a dotlist item can replace a whole entry
        raise _fail(prefix, entry, "wrong type", "a mapping such as {mixer: mamba2}")
    if origin == "attention" and entry.get("mixer") != "attention":
        entry.pop("kind", None)  # the pattern's kind of an "Aw", left behind by an override of its mixer
    mixer = entry.get("mixer")
    if mixer not in MIXERS:
        raise _fail(f"{prefix}.mixer", mixer, "unknown mixer" if mixer is not None else "required", " | ".join(MIXERS))
    allowed = [k for k in _fields(LayerConfig) if k in _layer_keys(mixer)]
    for key in entry:
        owner = next((g for g in MIXER_GROUPS if key in _group_fields(g)), None)
        if key not in allowed and owner is not None:
            raise _fail(f"{prefix}.{key}", entry[key], f"{key} belongs to {owner} layers, but layer {i} is {mixer}",
                        ", ".join(allowed))
    _check_keys(entry, allowed, prefix)
    return _typed(entry, LayerConfig, prefix)


# ------------------------------------------------------------------------------------------ the other way
def layout_to_dict(layout: Layout) -> dict:
    """The fully explicit YAML form: every field of every layer written out, no pattern, no defaults, such
    that `load_layout(layout_to_dict(L)) == L`."""
    return {"name": layout.name, "model": dataclasses.asdict(layout.model),
            "layers": [_layer_to_dict(layer) for layer in layout.layers]}


def _layer_to_dict(layer: LayerSpec) -> dict:
    out = {"mixer": layer.mixer}
    spec = layer.mixer_spec
    if spec is not None:
        values = dataclasses.asdict(spec)
        if layer.mixer != "attention":
            values.update(expand=spec.d_inner // spec.d_model)
        if layer.mixer == "mamba2":
            values.update(dt_limit=list(spec.dt_limit))
        if layer.mixer == "attention" and spec.kind == "global":
            values.update(window=None)
        out.update({k: values[k] for k in _group_fields(layer.mixer)})
    out.update(mlp=layer.mlp.kind if layer.mlp else "none", d_ff=layer.mlp.d_ff if layer.mlp else None)
    if layer.mlp is not None and layer.mlp.kind == "moe":
        out.update({k: getattr(layer.mlp, k) for k in MOE_FIELDS})
    return out


def layout_summary(layout: Layout) -> str:
    """A compact pattern for display, e.g. '[M1 x 4 Ag M1 x 3] x 2'. A layer carries a `:none` / `:swiglu` /
    `:moe` suffix where its MLP differs from the kind most mixer layers have (ties: an MLP over none, swiglu over
    moe; an MLP-only layer: where it is not that kind, or swiglu when that is none), so the string is a valid
    pattern for a layout whose defaults.mlp.kind is that majority."""
    kinds = [layer.mlp.kind if layer.mlp else "none" for layer in layout.layers]
    mixer_kinds = [k for k, layer in zip(kinds, layout.layers) if layer.mixer != "none"]
    usual = max(("swiglu", "moe", "none"), key=lambda k: (mixer_kinds.count(k), k != "none", k == "swiglu"))
    tokens = [layer.code if kind == (usual if layer.mixer != "none" or usual != "none" else "swiglu")
              else f"{layer.code}:{kind}" for kind, layer in zip(kinds, layout.layers)]
    return pattern.compress(tokens)


# ------------------------------------------------------------------------------------------ CLI
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def main(argv=None) -> int:
    """`python -m hybrid.layout`: print a layout's resolved layers and its budget; 2 on a bad layout."""
    ap = argparse.ArgumentParser(prog="python -m hybrid.layout",
                                 description="Print a layout's resolved layers and its parameter/FLOP/memory budget.")
    ap.add_argument("layout", help="a layout YAML file, e.g. layouts/jamba.yaml")
    ap.add_argument("overrides", nargs="*", help="omegaconf dotlist overrides, e.g. layers.3.window=2048")
    ap.add_argument("--seq-len", type=int, default=None, help="context of the budget (default: model.max_seq_len)")
    ap.add_argument("--dtype", choices=DTYPE_BYTES, default="bf16", help="dtype of activations and caches")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = ap.parse_args(argv)
    layout = load_layout(args.layout, args.overrides)
    if args.seq_len is not None and args.seq_len < 1:
        raise _fail("--seq-len", args.seq_len, "must be positive", "an integer >= 1")
    print(f"{layout.name}: {layout.n_layers} layers  {layout_summary(layout)}\n")
    print(format_layers(layout) + "\n")
    print(format_budget(budget(layout, seq_len=args.seq_len, dtype_bytes=DTYPE_BYTES[args.dtype])))
    return 0


if __name__ == "__main__":
    from .errors import cli
    sys.exit(cli(main))
