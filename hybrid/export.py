"""Export a braidlm checkpoint as a Hugging Face model directory, and import one back.

    python -m hybrid.export CKPT OUT_DIR [--target remote|auto|llama|mamba2|bamba] [--max-shard-size 2GB]
    python -m hybrid.export --import HF_DIR OUT_CKPT

CKPT is a checkpoint directory (`model.safetensors` fp32, `layout.yaml`, `tokenizer.model`). OUT_DIR gets
`config.json`, `model.safetensors` (sharded with an index when larger than --max-shard-size),
`generation_config.json`, the tokenizer (`tokenizer.model` + `tokenization_braid.py`, loaded by
`AutoTokenizer.from_pretrained(OUT_DIR, trust_remote_code=True)`) and, for the self-contained target,
`configuration_braid.py` / `modeling_braid.py`:

  remote  any layout: `AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)` loads and
          generates without braidlm installed (config.json holds the full layout).
  llama / mamba2 / bamba
          a transformers architecture, where the layout maps onto it exactly (hybrid/hf/native.py);
          otherwise the export is refused with the layer and field that cannot be expressed.
  auto    the native target the layout fits, else remote.

Everything is written into a temporary directory beside OUT_DIR and renamed at the end, so a failed export
leaves nothing at OUT_DIR. Import (`import_hf`) reads any of these directories (the braidlm, Llama, Mamba2 and
Bamba formats) into a `HybridLM`; `--import` writes it as a checkpoint directory (model.safetensors,
layout.yaml, tokenizer.model when the export had one).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Optional


from .hf import native
from .layout import layout_to_dict, load_layout
from .model import HybridLM
from .spec import LayoutError

HF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf")
REMOTE_FILES = ("configuration_braid.py", "modeling_braid.py")
TOKENIZER_FILE = "tokenization_braid.py"
TARGETS = ("remote", "auto", *native.TARGETS)


class ExportError(ValueError):
    """A checkpoint, model directory or target that cannot be exported / imported; the message says why."""


# ------------------------------------------------------------------------------------------- reading
def load_checkpoint(ckpt: str) -> tuple[HybridLM, Optional[str]]:
    """(model, tokenizer path or None) of a checkpoint directory; fp32 weights, eval mode."""
    if not os.path.isdir(ckpt):
        raise ExportError(f"{ckpt}: not a checkpoint directory")
    layout_path = os.path.join(ckpt, "layout.yaml")
    if not os.path.isfile(layout_path):
        raise ExportError(f"{layout_path}: missing (a checkpoint holds layout.yaml, model.safetensors, tokenizer.model)")
    try:
        layout = load_layout(layout_path)
    except LayoutError as e:
        raise ExportError(f"{layout_path}: {e}") from None
    model = HybridLM(layout)
    _load_weights(model, os.path.join(ckpt, "model.safetensors"))
    tok = os.path.join(ckpt, "tokenizer.model")
    return model.eval(), tok if os.path.isfile(tok) else None


def _read_safetensors(path: str) -> dict:
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        raise ExportError(f"{path}: missing")
    try:
        return load_file(path)
    except Exception as e:  # truncated or corrupt files raise several exception types
        raise ExportError(f"{path}: cannot be read ({type(e).__name__}: {e}); is it truncated?") from None


def _load_weights(model: HybridLM, path: str, state: Optional[dict] = None) -> None:
    state = _read_safetensors(path) if state is None else state
    if model.layout.model.tie_embeddings:
        state.pop("lm_head.weight", None)
    own = {k: v for k, v in model.state_dict().items() if not (k == "lm_head.weight" and model.layout.model.tie_embeddings)}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ExportError(f"{path}: does not match the layout: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ExportError(f"{path}: {k} has shape {tuple(v.shape)}, the layout needs {tuple(own[k].shape)}")
    model.load_state_dict(state, strict=False)


# ------------------------------------------------------------------------------------------- writing
def _pick_target(layout: dict, target: str) -> str:
    if target not in TARGETS:
        raise ExportError(f"target {target!r}: allowed {', '.join(TARGETS)}")
    if target == "auto":
        for name, t in native.TARGETS.items():
            try:
                t["check"](layout)
                return name
            except native.NativeError:
                continue
        return "remote"
    if target != "remote":
        try:
            native.TARGETS[target]["check"](layout)
        except native.NativeError as e:
            raise ExportError(str(e)) from None
    return target


def _hf_model(layout: dict, target: str, state: dict):
    """The transformers model holding `state`, for save_pretrained."""
    if target == "remote":
        from .hf.configuration_braid import BraidConfig
        from .hf.modeling_braid import BraidForCausalLM
        config = BraidConfig(layout=layout)
        config.architectures = ["BraidForCausalLM"]
        config.auto_map = {"AutoConfig": "configuration_braid.BraidConfig",
                           "AutoModelForCausalLM": "modeling_braid.BraidForCausalLM"}
        model = BraidForCausalLM(config)
    else:
        import transformers
        cfg = native.TARGETS[target]["config"](layout)
        arch = cfg.pop("architectures")[0]
        config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        model = getattr(transformers, arch)(config)
        state = native.to_hf(target, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and layout["model"]["tie_embeddings"])]
    if missing or unexpected:
        raise ExportError(f"internal: {target} model does not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def _write_tokenizer(tokenizer: str, out: str) -> None:
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    shutil.copyfile(tokenizer, os.path.join(out, "tokenizer.model"))
    shutil.copyfile(os.path.join(HF_DIR, TOKENIZER_FILE), os.path.join(out, TOKENIZER_FILE))
    special = {"pad_token": sp.id_to_piece(0), "unk_token": sp.id_to_piece(1), "bos_token": sp.id_to_piece(2),
               "eos_token": sp.id_to_piece(3)}
    config = {"tokenizer_class": "BraidTokenizer", "auto_map": {"AutoTokenizer": [f"{TOKENIZER_FILE[:-3]}.BraidTokenizer", None]},
              "padding_side": "left", "model_max_length": 1 << 30, **special}
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)


def export(source, out_dir: str, *, tokenizer: Optional[str] = None, target: str = "remote",
           max_shard_size: str = "2GB", overwrite: bool = False) -> str:
    """Write a Hugging Face model directory at `out_dir` and return the target used.

    source: a checkpoint directory, or a `HybridLM` (then `tokenizer` may name its sentencepiece model).
    target: remote | auto | llama | mamba2 | bamba (see the module docstring). Raises ExportError, leaving
    nothing at out_dir, when the source is unreadable or the target cannot express the layout.
    """
    if isinstance(source, HybridLM):
        model = source
    else:
        model, ckpt_tok = load_checkpoint(os.fspath(source))
        tokenizer = tokenizer or ckpt_tok
    if tokenizer is not None and not os.path.isfile(tokenizer):
        raise ExportError(f"{tokenizer}: tokenizer model missing")
    layout = layout_to_dict(model.layout)
    target = _pick_target(layout, target)
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ExportError(f"{out_dir}: exists and is not empty (pass overwrite=True / --overwrite)")
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-export-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        hf = _hf_model(layout, target, state)
        hf.generation_config.update(bos_token_id=2, eos_token_id=3, pad_token_id=0)
        hf.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
        if target == "remote":
            for name in REMOTE_FILES:
                shutil.copyfile(os.path.join(HF_DIR, name), os.path.join(tmp, name))
        if tokenizer is not None:
            _write_tokenizer(tokenizer, tmp)
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _publish(tmp: str, out_dir: str) -> None:
    if os.path.exists(out_dir):  # an empty directory, or overwrite=True: move the old one aside first
        old = tmp + "-old"
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


# ------------------------------------------------------------------------------------------- import
def _read_hf_state(path: str) -> dict:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for name in files:
            state.update(_read_safetensors(os.path.join(path, name)))
        return state
    return _read_safetensors(os.path.join(path, "model.safetensors"))


def _json_floats(obj: dict):
    """transformers writes inf / nan in config.json as {"__float__": "Infinity"}."""
    return float(obj["__float__"]) if set(obj) == {"__float__"} else obj


def import_hf(path: str) -> tuple[HybridLM, Optional[str]]:
    """A `HybridLM` (fp32, eval mode) from a Hugging Face directory in the braidlm, Llama, Mamba2 or Bamba
    format, and its sentencepiece tokenizer.model path (None when the directory has none)."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ExportError(f"{config_path}: missing")
    try:
        with open(config_path) as f:
            cfg = json.load(f, object_hook=_json_floats)
    except ValueError as e:
        raise ExportError(f"{config_path}: not valid JSON ({e})") from None
    kind = cfg.get("model_type")
    try:
        if kind == "braidlm":
            layout_dict = cfg.get("layout")
            if not isinstance(layout_dict, dict):
                raise ExportError(f"{config_path}: model_type braidlm without a 'layout' mapping")
        elif kind in native.TARGETS:
            layout_dict = native.TARGETS[kind]["layout"](cfg)
        else:
            raise ExportError(f"{config_path}: model_type {kind!r} cannot be imported (allowed: braidlm, "
                              f"{', '.join(native.TARGETS)})")
        layout = load_layout(layout_dict)
    except (LayoutError, native.NativeError, KeyError) as e:
        raise ExportError(f"{config_path}: {type(e).__name__}: {e}") from None
    state = _read_hf_state(path)
    if kind != "braidlm":
        try:
            state = native.from_hf(kind, state)
        except native.NativeError as e:
            raise ExportError(f"{path}: {e}") from None
    model = HybridLM(layout)
    _load_weights(model, path, state)
    tok = os.path.join(path, "tokenizer.model")
    return model.eval(), tok if os.path.isfile(tok) else None


def import_to_checkpoint(path: str, out: str) -> str:
    """Import `path` and write a weights-only braidlm checkpoint directory (model.safetensors, layout.yaml,
    tokenizer.model) at `out`, atomically."""
    from omegaconf import OmegaConf

    from .checkpoint import save_model
    model, tok = import_hf(path)
    out = os.path.abspath(out)
    if os.path.exists(out) and os.listdir(out):
        raise ExportError(f"{out}: exists and is not empty")
    tmp = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.tmp-import-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        save_model(model, os.path.join(tmp, "model.safetensors"))
        OmegaConf.save(OmegaConf.create(layout_to_dict(model.layout)), os.path.join(tmp, "layout.yaml"))
        if tok is not None:
            shutil.copyfile(tok, os.path.join(tmp, "tokenizer.model"))
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hybrid.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("source", help="checkpoint directory (or, with --import, a Hugging Face model directory)")
    ap.add_argument("out", help="output directory (must not exist or be empty)")
    ap.add_argument("--target", default="remote", choices=TARGETS)
    ap.add_argument("--max-shard-size", default="2GB")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--import", dest="do_import", action="store_true",
                    help="import a Hugging Face directory into a braidlm checkpoint directory")
    args = ap.parse_args(argv)
    try:
        if args.do_import:
            print(import_to_checkpoint(args.source, args.out))
        else:
            target = export(args.source, args.out, target=args.target, max_shard_size=args.max_shard_size,
                            overwrite=args.overwrite)
            print(f"exported {args.source} -> {args.out} ({target})")
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
