"""Export a braidlm checkpoint as a Hugging Face model directory, and import one back.

    python -m interop.export CKPT OUT_DIR [--target remote|auto|llama|mamba2|bamba|jamba] [--max-shard-size 2GB]
    python -m interop.export --import HF_DIR OUT_CKPT

CKPT is a checkpoint directory (`model.safetensors` fp32, `layout.yaml`, `tokenizer.model`). OUT_DIR gets
`config.json`, `model.safetensors` (sharded with an index when larger than --max-shard-size),
`generation_config.json`, the tokenizer (`tokenizer.model` + `tokenization_braid.py`, loaded by
`AutoTokenizer.from_pretrained(OUT_DIR, trust_remote_code=True)`) and, for the self-contained target,
`configuration_braid.py` / `modeling_braid.py`:

  remote  any layout: `AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)` loads and
          generates without braidlm installed (config.json holds the full layout).
  llama / mamba2 / bamba / jamba
          a transformers architecture, where the layout maps onto it exactly (interop/native.py);
          otherwise the export is refused with the layer and field that cannot be expressed.
  auto    the native target the layout fits, else remote.

Mixture-of-experts layers (mlp: moe) export with the remote code (every router and option; routed dropless, as
braidlm routes outside training) and to jamba where they are Jamba's (softmax router, top-k, not renormalized, no
shared experts); llama, mamba2 and bamba have no MoE layers and refuse them, naming the layer.

Everything is written into a temporary directory beside OUT_DIR and renamed at the end, so a failed export
leaves nothing at OUT_DIR. Import (`import_hf`) reads any of these directories (the braidlm, Llama, Mamba2,
Bamba and Jamba formats) into a `HybridLM`; `--import` writes it as a checkpoint directory (model.safetensors,
layout.yaml, tokenizer.model when the export had one).

Both write `braidlm_export.json`, the list of files they wrote. OUT_DIR must be new or empty; `--overwrite`
also accepts a previous export (or import) and replaces only the files its list names: anything else there is
kept, and a non-empty directory without that list is refused.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from typing import Optional

from hybrid.errors import UserError, cli
from hybrid.layout import layout_to_dict, load_layout
from hybrid.model import HybridLM
from hybrid.spec import LayoutError
from training.checkpoint import (TOKENIZER, honour_umask, load_checkpoint, load_state,
                                 read_safetensors, write_weights_checkpoint)

from . import native

REMOTE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "remote")  # copied into every export
REMOTE_FILES = ("configuration_braid.py", "modeling_braid.py")
TOKENIZER_FILE = "tokenization_braid.py"
TARGETS = ("remote", "auto", *native.TARGETS)
MANIFEST = "braidlm_export.json"   # the files an export / import wrote: all that --overwrite may replace


class ExportError(UserError):
    """A checkpoint, model directory or target that cannot be exported / imported; the message says why."""


# --------------------------------------------------------------------------------------- output directory
def _names(names, limit: int = 8) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _own_files(out_dir: str) -> tuple[Optional[set], Optional[str]]:
    """(names in out_dir that a previous export / import wrote: its manifest and the files listed there, and the
    kind it wrote), or (None, None) when out_dir has no readable manifest."""
    try:
        with open(os.path.join(out_dir, MANIFEST)) as f:
            manifest = json.load(f)
        files, kind = manifest["files"], manifest.get("kind")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, None
    if not isinstance(files, list):
        return None, None
    # plain file names only: a hand-edited list must not reach outside out_dir or into subdirectories
    listed = {n for n in files if isinstance(n, str) and n not in ("", ".", "..") and os.path.basename(n) == n}
    return {n for n in listed | {MANIFEST}
            if os.path.islink(os.path.join(out_dir, n)) or os.path.isfile(os.path.join(out_dir, n))}, kind


def _check_out_dir(out_dir: str, overwrite: bool, kind: str) -> set:
    """The names in out_dir that may be replaced (empty when out_dir is new or empty). Raises ExportError for a
    non-empty directory without overwrite, and, with overwrite, for one that holds no previous export of this
    kind ("huggingface" or "checkpoint"): files this program did not write are never deleted."""
    if not os.path.lexists(out_dir):
        return set()
    if not os.path.isdir(out_dir):
        raise ExportError(f"{out_dir}: exists and is not a directory")
    present = set(os.listdir(out_dir))
    if not present:
        return set()
    if not overwrite:
        raise ExportError(f"{out_dir}: exists and is not empty (holds {_names(present)}); choose a new or empty "
                          "directory, or pass --overwrite to replace a previous braidlm export there")
    own, previous = _own_files(out_dir)
    if own is None:
        raise ExportError(f"{out_dir}: not a previous braidlm export (no readable {MANIFEST}), so --overwrite "
                          f"will not replace it: it holds {_names(present)}; choose a new or empty directory")
    if previous != kind:  # e.g. exporting an imported checkpoint onto itself
        raise ExportError(f"{out_dir}: holds a braidlm {previous} directory (see its {MANIFEST}), not a {kind} "
                          "export, so --overwrite will not replace it; choose another directory")
    return own


def _write_manifest(tmp: str, kind: str) -> None:
    files = sorted(n for n in os.listdir(tmp) if n != MANIFEST)
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump({"written_by": "braidlm (python -m interop.export)", "kind": kind, "files": files}, f, indent=1)


def _publish(tmp: str, out_dir: str, overwrite: bool, kind: str) -> None:
    """Move the finished `tmp` to out_dir. A previous export there is replaced; files beside it that it did not
    write stay where they are (a new file of the same name is refused)."""
    own = _check_out_dir(out_dir, overwrite, kind)  # again: the directory may have changed while we wrote
    present = set(os.listdir(out_dir)) if os.path.isdir(out_dir) else set()
    foreign = present - own
    if not foreign:  # new, empty, or a previous export alone: swap the whole directory at once
        if present:
            old = tmp + "-old"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
        return
    new = set(os.listdir(tmp))
    if foreign & new:
        raise ExportError(f"{out_dir}: {_names(foreign & new)} would be overwritten but were not written by the "
                          f"previous export (not in its {MANIFEST}); move them away or choose another directory")
    old = tmp + "-old"
    os.makedirs(old)
    for name in sorted(own, key=lambda n: n != MANIFEST):    # the old manifest first, ...
        os.replace(os.path.join(out_dir, name), os.path.join(old, name))
    for name in sorted(new, key=lambda n: n == MANIFEST):    # ... the new one last
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    os.rmdir(tmp)
    shutil.rmtree(old, ignore_errors=True)


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
        from .remote.configuration_braid import BraidConfig
        from .remote.modeling_braid import BraidForCausalLM
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
    shutil.copyfile(os.path.join(REMOTE_DIR, TOKENIZER_FILE), os.path.join(out, TOKENIZER_FILE))
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
    target: remote | auto | llama | mamba2 | bamba | jamba (see the module docstring). overwrite: replace a previous
    export at out_dir (only the files it wrote). Raises ExportError (CheckpointError for an unreadable
    checkpoint), leaving out_dir as it was, when the source is unreadable, the target cannot express the layout
    or out_dir holds files that are not a previous export's.
    """
    out_dir = os.path.abspath(out_dir)
    _check_out_dir(out_dir, overwrite, "huggingface")
    max_shard_size = _shard_size(max_shard_size)
    if isinstance(source, HybridLM):
        model = source
    else:
        model, ckpt_tok = load_checkpoint(os.fspath(source))
        tokenizer = tokenizer or ckpt_tok
    if tokenizer is not None and not os.path.isfile(tokenizer):
        raise ExportError(f"{tokenizer}: tokenizer model missing")
    layout = layout_to_dict(model.layout)
    target = _pick_target(layout, target)
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    def write(tmp: str) -> None:
        hf = _hf_model(layout, target, state)
        hf.generation_config.update(bos_token_id=2, eos_token_id=3, pad_token_id=0)
        hf.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
        if target == "remote":
            for name in REMOTE_FILES:
                shutil.copyfile(os.path.join(REMOTE_DIR, name), os.path.join(tmp, name))
        if tokenizer is not None:
            _write_tokenizer(tokenizer, tmp)
    _write_beside(out_dir, "huggingface", overwrite, write)
    return target


def _write_beside(out: str, kind: str, overwrite: bool, write) -> None:
    """`write(tmp)` fills a temporary directory beside `out`, which then gets the manifest and replaces `out`
    (see _publish); if anything fails the temporary directory is removed and `out` is untouched."""
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp-{kind}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        write(tmp)
        _write_manifest(tmp, kind)
        honour_umask(tmp)
        _publish(tmp, out, overwrite, kind)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _shard_size(size) -> str:
    """`--max-shard-size` as transformers reads it: an integer with a unit (KB, MB, GB, KiB, MiB, GiB)."""
    if isinstance(size, int) or re.fullmatch(r"\d+(KB|MB|GB|KIB|MIB|GIB)", str(size).strip().upper()):
        return size
    raise ExportError(f"max shard size {size!r}: expected an integer with a unit, e.g. 500MB or 2GB")


# ------------------------------------------------------------------------------------------- import
def _read_hf_state(path: str) -> dict:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ExportError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        state = {}
        for name in files:
            state.update(read_safetensors(os.path.join(path, name)))
        return state
    return read_safetensors(os.path.join(path, "model.safetensors"))


def _json_floats(obj: dict):
    """transformers writes inf / nan in config.json as {"__float__": "Infinity"}."""
    return float(obj["__float__"]) if set(obj) == {"__float__"} else obj


def import_hf(path: str) -> tuple[HybridLM, Optional[str]]:
    """A `HybridLM` (fp32, eval mode) from a Hugging Face directory in the braidlm, Llama, Mamba2, Bamba or Jamba
    format, and its sentencepiece tokenizer.model path (None when the directory has none)."""
    if not os.path.isdir(path):
        raise ExportError(f"{path}: no such directory (expected a Hugging Face model directory with config.json)")
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
    if layout.model.tie_embeddings and "embed.weight" in state:
        state.pop("lm_head.weight", None)  # the embedding is the one copy of a tied pair
    load_state(model, state, path)
    tok = os.path.join(path, TOKENIZER)
    return model.eval(), tok if os.path.isfile(tok) else None


def import_to_checkpoint(path: str, out: str, overwrite: bool = False) -> str:
    """Import `path` and write a weights-only braidlm checkpoint directory (model.safetensors, layout.yaml,
    tokenizer.model) at `out`, atomically. overwrite: replace a previous import at `out` (only its files)."""
    out = os.path.abspath(out)
    _check_out_dir(out, overwrite, "checkpoint")
    model, tok = import_hf(path)
    _write_beside(out, "checkpoint", overwrite, lambda tmp: write_weights_checkpoint(tmp, model, tok))
    return out


EPILOG = """targets (--target):
  remote   any layout; AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True) loads and
           generates without braidlm installed (config.json holds the full layout; the model code is copied in)
  llama, mamba2, bamba, jamba
           the transformers architecture of that name, loaded without trust_remote_code; only where the
           layout maps onto it exactly, otherwise refused naming the layer and field it cannot express
  auto     the first of llama, mamba2, bamba, jamba that the layout fits, else remote

examples:
  python -m interop.export runs/tiny/checkpoints/step_00001000 hf/tiny
  python -m interop.export CKPT hf/tiny --target auto --overwrite      # replace a previous export
  python -m interop.export --import hf/tiny ckpt/tiny                   # Hugging Face directory -> checkpoint
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m interop.export", description=__doc__.split("\n\n")[0],
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="checkpoint directory (layout.yaml, model.safetensors, tokenizer.model; a "
                                   "DeepSpeed one needs `python -m training.checkpoint consolidate` first), or with "
                                   "--import a Hugging Face model directory")
    ap.add_argument("out", help="output directory: new or empty, or with --overwrite a previous export")
    ap.add_argument("--target", default="remote", choices=TARGETS,
                    help="format of the exported model (default: remote; see targets below)")
    ap.add_argument("--max-shard-size", default="2GB",
                    help="largest weights file, e.g. 500MB (default: 2GB); bigger models are split into shards "
                         "with a model.safetensors.index.json")
    ap.add_argument("--overwrite", action="store_true",
                    help=f"replace a previous braidlm export (or import) at OUT: only the files listed in its "
                         f"{MANIFEST} are replaced, other files are kept; any other non-empty directory is "
                         "refused")
    ap.add_argument("--import", dest="do_import", action="store_true",
                    help="the other way: read the Hugging Face directory SOURCE (braidlm, Llama, Mamba2, Bamba or "
                         "Jamba format) and write a braidlm checkpoint directory at OUT (--target and --max-shard-size "
                         "do not apply)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = ap.parse_args(argv)
    if args.do_import:
        print(import_to_checkpoint(args.source, args.out, overwrite=args.overwrite))
    else:
        target = export(args.source, args.out, target=args.target, max_shard_size=args.max_shard_size,
                        overwrite=args.overwrite)
        print(f"exported {args.source} -> {args.out} ({target})")
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
