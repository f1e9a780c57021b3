"""Training checkpoints: one directory per saved step, written whole under a temporary name, then renamed.

    <out_dir>/checkpoints/step_00000200/
        model.safetensors      fp32 weights (plain PyTorch runs; DeepSpeed runs: see below); every expert, also
                               when a run splits them over ranks (train.expert_parallel)
        optimizer.safetensors  optimizer state (plain PyTorch runs): tensors, param groups as JSON metadata; as
                               one process holds it (every expert's moments)
        zero/                  DeepSpeed's own checkpoint (ZeRO partitions of weights and optimizer)
        trainer.json           step, tokens seen, data-sampler and RNG state of every rank, config
        rng_rank<r>.safetensors  RNG states of rank r (torch, CUDA; Python's as JSON metadata)
        layout.yaml            the resolved layout
        tokenizer.model        the sentencepiece model
        manifest.json          every other file's size and sha256 (trainer.json holds the manifest's own)

A save that dies midway leaves only a `.tmp-*` directory, which is ignored and removed by the next save: the
last complete checkpoint is never touched until a newer one is complete. `latest()` is the newest complete
one. Loading verifies the files against the manifest: a truncated or altered file is named in the error, and a
resume (`train.resume=auto`) falls back to the newest checkpoint that verifies. DeepSpeed checkpoints
consolidate to one fp32 safetensors file with `consolidate()`, or
`python -m training.checkpoint consolidate <checkpoint dir> [out.safetensors]`. `load_checkpoint()` is the one
reader of a checkpoint directory for everything that uses a trained model (export, evaluation).

What is read back: only safetensors and JSON for the files this module writes. Two exceptions, both files this
program wrote: DeepSpeed's ZeRO partitions under zero/ are written and read by DeepSpeed itself (torch.save /
torch.load of pickles: its optimizer states carry Python objects), and checkpoints from before the safetensors
optimizer and RNG files keep their optimizer.pt / rng_rank<r>.pt, read with torch.load(weights_only=True).

Every file and directory written here gets the mode an ordinary `open()` / `mkdir` would give it under the
user's umask (see `honour_umask`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from typing import Callable, Optional

import torch

from hybrid.errors import CheckpointError, UserError, cli
from hybrid.layout import layout_to_dict, load_layout
from hybrid.model import HybridLM
from hybrid.spec import Layout, LayoutError

from .hashing import file_sha256

PATTERN = re.compile(r"^step_(\d{8})$")
# every file name of a checkpoint directory is spelled here and nowhere else
WEIGHTS, OPTIMIZER, ZERO = "model.safetensors", "optimizer.safetensors", "zero"
LEGACY_OPTIMIZER = "optimizer.pt"
TRAINER, LAYOUT, TOKENIZER, MANIFEST = "trainer.json", "layout.yaml", "tokenizer.model", "manifest.json"
BEST, BEST_INFO = "best", "best.json"  # train.keep_best: out_dir/best/ holds the weights of the lowest held-out loss


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.safetensors"


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:08d}")


def step_of(ckpt_dir: str) -> Optional[int]:
    """The step a `step_XXXXXXXX` checkpoint directory holds (None for another name)."""
    m = PATTERN.match(os.path.basename(os.path.normpath(ckpt_dir)))
    return int(m.group(1)) if m else None


def complete(root: str) -> list[str]:
    """Complete checkpoint directories under root, oldest first."""
    if not os.path.isdir(root):
        return []
    found = [(step_of(name), name) for name in os.listdir(root) if step_of(name) is not None
             and os.path.exists(os.path.join(root, name, TRAINER))]
    return [os.path.join(root, name) for _, name in sorted(found)]


def latest(root: str) -> Optional[str]:
    found = complete(root)
    return found[-1] if found else None


def begin(root: str, step: int, tag: str = "") -> str:
    """A fresh temporary directory for the checkpoint of `step` (leftovers of killed saves are removed)."""
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):
        if name.startswith(".tmp-"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    tmp = os.path.join(root, f".tmp-step_{step:08d}{tag}")
    os.makedirs(tmp)
    return tmp


def commit(root: str, tmp: str, step: int, keep: int) -> str:
    """Atomically publish `tmp` as the checkpoint of `step`, then prune to the newest `keep` (0 keeps all)."""
    final = step_dir(root, step)
    swap_in(tmp, final, os.path.join(root, f".tmp-old-step_{step:08d}"))
    if keep > 0:
        for stale in complete(root)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def swap_in(tmp: str, final: str, old: str) -> None:
    """Rename the finished directory `tmp` to `final`; a `final` already there (the same step saved again, the
    previous best) is moved aside to `old` first and removed after."""
    if os.path.exists(final):
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def read_json(path: str):
    """A checkpoint's JSON file; a missing or damaged one raises CheckpointError naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); is the checkpoint truncated?") from None


def load_torch(path: str, map_location=None):
    """A tensor file this program wrote (optimizer / RNG state), read with weights_only; a missing or damaged
    one raises CheckpointError naming it."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip archives raise RuntimeError, pickle errors UnpicklingError, ...
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''});"
                              " is the checkpoint truncated?") from None


def umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(*paths: str) -> None:
    """Give files 0666 and directories 0777 less the umask, as `open()` / `mkdir` would (recursively for
    directories). safetensors >= 0.8 writes through a temporary file created 0600 and renames it into place, so
    weights would otherwise be readable by their owner only."""
    mask = umask()
    for top in paths:
        entries = [top]
        if os.path.isdir(top):
            entries += [os.path.join(parent, n) for parent, dirs, files in os.walk(top) for n in dirs + files]
        for path in entries:
            if not os.path.islink(path):
                os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~mask)


def save_model(model: torch.nn.Module, path: str, state: Optional[dict] = None) -> None:
    """fp32 safetensors of the model (tied weights stored once), with the umask's mode. state: what to write
    instead of model.state_dict() (the same names; an expert-parallel run's gathered experts)."""
    from safetensors.torch import save_model as st_save
    st_save(_fp32_view(model, state), path)
    honour_umask(path)


def read_safetensors(path: str, with_metadata: bool = False):
    """{name: tensor} of a safetensors file (on the CPU), or with_metadata: (tensors, its metadata, each value
    decoded from JSON as `_save_tensors` writes it); a missing or unreadable one raises CheckpointError naming it."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing")
    try:
        with safe_open(path, "pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            if not with_metadata:
                return tensors
            return tensors, {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    except Exception as e:  # truncated or altered: SafetensorError, OSError, RuntimeError, JSONDecodeError, ...
        raise CheckpointError(f"{path}: cannot be read as safetensors ({type(e).__name__}: {e}); "
                              "is the file truncated?") from None


def load_state(model: torch.nn.Module, state: dict, source: str) -> None:
    """Copy `state` into the model (cast to its dtypes). Every tensor must be there, except that of a set of
    tied tensors (e.g. lm_head.weight tied to embed.weight) one name is enough; a missing or unexpected name or
    a wrong shape raises CheckpointError naming `source`."""
    own = model.state_dict()
    tied: dict = {}  # tied tensors share storage: (data_ptr, shape) -> their names
    for k, v in own.items():
        if v.data_ptr() != 0:
            tied.setdefault((v.data_ptr(), tuple(v.shape)), []).append(k)
    missing = sorted(k for k, v in own.items() if k not in state
                     and not any(a in state for a in tied.get((v.data_ptr(), tuple(v.shape)), ())))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{source}: does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"{source}: {k} has shape {tuple(v.shape)}, the model needs {tuple(own[k].shape)}")
    model.load_state_dict(state, strict=False)


def load_model(model: torch.nn.Module, path: str) -> None:
    """Load weights saved by `save_model` or `consolidate` (cast to the model's dtypes; strict)."""
    load_state(model, read_safetensors(path), path)


def load_checkpoint(ckpt_dir: str, device=None, dtype: torch.dtype = torch.float32) -> tuple[HybridLM, Optional[str]]:
    """(model in eval mode on `device` in `dtype`, path of its tokenizer.model or None) of a checkpoint directory
    (layout.yaml + model.safetensors, as train.py, `consolidate` and `python -m interop.export --import` write).
    Anything missing, unreadable or mismatched raises CheckpointError naming the file."""
    if not os.path.isdir(ckpt_dir):
        what = "is not a directory" if os.path.exists(ckpt_dir) else "no such directory"
        raise CheckpointError(f"{ckpt_dir}: {what} (expected a checkpoint directory holding {LAYOUT} and {WEIGHTS})")
    missing = [n for n in (LAYOUT, WEIGHTS) if not os.path.isfile(os.path.join(ckpt_dir, n))]
    if missing:
        if os.path.isdir(zero_dir(ckpt_dir)):
            hint = (f"it is a DeepSpeed checkpoint: run `python -m training.checkpoint consolidate {ckpt_dir}` first "
                    f"to write its {WEIGHTS}")
        else:
            hint = (f"a checkpoint directory holds {LAYOUT}, {WEIGHTS} and {TOKENIZER}; a DeepSpeed checkpoint "
                    "needs `python -m training.checkpoint consolidate` first")
        raise CheckpointError(f"{ckpt_dir}: not a usable checkpoint, missing {', '.join(missing)} ({hint})")
    try:
        layout = load_layout(os.path.join(ckpt_dir, LAYOUT))
    except LayoutError as e:  # the message already starts with the file name
        raise CheckpointError(str(e)) from None
    verify(ckpt_dir, [LAYOUT, WEIGHTS, TOKENIZER])
    model = HybridLM(layout)
    load_model(model, os.path.join(ckpt_dir, WEIGHTS))
    tok = os.path.join(ckpt_dir, TOKENIZER)
    return model.to(device=device, dtype=dtype).eval(), tok if os.path.isfile(tok) else None


# ------------------------------------------------------------------------------- what a training run saves

def save_weights(ckpt_dir: str, model: torch.nn.Module, state: Optional[dict] = None) -> None:
    save_model(model, os.path.join(ckpt_dir, WEIGHTS), state)


def load_weights(ckpt_dir: str, model: torch.nn.Module, local: Optional[Callable[[dict], dict]] = None) -> None:
    """The checkpoint's weights into the model; local: cuts the full state to what this rank's model holds
    (an expert-parallel rank's experts)."""
    path = os.path.join(ckpt_dir, WEIGHTS)
    state = read_safetensors(path)
    load_state(model, state if local is None else local(state), path)


def _save_tensors(path: str, tensors: dict, metadata: dict) -> None:
    """safetensors with JSON-valued metadata (what a state holds besides tensors), with the umask's mode."""
    from safetensors.torch import save_file
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path,
              metadata={k: json.dumps(v) for k, v in metadata.items()})
    honour_umask(path)


def save_optimizer(ckpt_dir: str, state: dict) -> None:
    """A torch optimizer's state_dict as safetensors: tensors as `state.<param id>.<name>`, param_groups and any
    non-tensor state in the metadata (JSON)."""
    tensors, other = {}, {}
    for pid, entries in state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{name}"] = value
            else:
                other.setdefault(str(pid), {})[name] = value
    _save_tensors(os.path.join(ckpt_dir, OPTIMIZER), tensors, {"param_groups": state["param_groups"], "other": other})


def load_optimizer(ckpt_dir: str, map_location=None) -> dict:
    """The state_dict `save_optimizer` wrote. A checkpoint from before safetensors optimizer files keeps its
    optimizer.pt, read with torch.load(weights_only=True): tensors and plain containers only, no code."""
    legacy = os.path.join(ckpt_dir, LEGACY_OPTIMIZER)
    if not os.path.exists(os.path.join(ckpt_dir, OPTIMIZER)) and os.path.exists(legacy):
        return load_torch(legacy, map_location=map_location)
    tensors, meta = read_safetensors(os.path.join(ckpt_dir, OPTIMIZER), with_metadata=True)
    state: dict = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value if map_location is None else value.to(map_location)
    for pid, entries in meta.get("other", {}).items():
        state.setdefault(int(pid), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def zero_dir(ckpt_dir: str) -> str:
    """Where a DeepSpeed engine keeps its ZeRO partitions inside a checkpoint."""
    return os.path.join(ckpt_dir, ZERO)


def save_rng(ckpt_dir: str, rank: int, state: dict) -> None:
    """Rank `rank`'s RNG states {"torch": ByteTensor, "cuda": ByteTensor or None, "python": random.getstate()}:
    the tensors in safetensors, Python's state in its metadata."""
    tensors = {k: state[k] for k in ("torch", "cuda") if state.get(k) is not None}
    _save_tensors(os.path.join(ckpt_dir, rng_file(rank)), tensors, {"python": state["python"]})


def load_rng(ckpt_dir: str, rank: int) -> dict:
    legacy = os.path.join(ckpt_dir, f"rng_rank{rank}.pt")  # written before safetensors RNG files
    if not os.path.exists(os.path.join(ckpt_dir, rng_file(rank))) and os.path.exists(legacy):
        return load_torch(legacy)
    tensors, meta = read_safetensors(os.path.join(ckpt_dir, rng_file(rank)), with_metadata=True)
    version, internal, gauss = meta["python"]
    return {"torch": tensors["torch"], "cuda": tensors.get("cuda"), "python": (version, tuple(internal), gauss)}


def _write_layout_and_tokenizer(ckpt_dir: str, layout: Layout, tokenizer: Optional[str]) -> None:
    from omegaconf import OmegaConf
    OmegaConf.save(OmegaConf.create(layout_to_dict(layout)), os.path.join(ckpt_dir, LAYOUT))
    if tokenizer is not None:
        shutil.copyfile(tokenizer, os.path.join(ckpt_dir, TOKENIZER))


def write_run_files(ckpt_dir: str, layout: Layout, tokenizer: Optional[str], meta: dict) -> None:
    """The layout, the tokenizer, the manifest of every file, and trainer.json (`meta` plus the manifest's
    sha256) of a checkpoint; trainer.json is written last, so its presence marks the directory complete."""
    _write_layout_and_tokenizer(ckpt_dir, layout, tokenizer)
    write_manifest(ckpt_dir)
    manifest = file_sha256(os.path.join(ckpt_dir, MANIFEST))
    write_json(os.path.join(ckpt_dir, TRAINER), {**meta, "manifest_sha256": manifest})
    honour_umask(ckpt_dir)


def _files(ckpt_dir: str) -> list[str]:
    """Every file under the checkpoint directory except trainer.json and the manifest, relative, sorted."""
    out = []
    for parent, dirs, files in os.walk(ckpt_dir):
        dirs.sort()
        out += [os.path.relpath(os.path.join(parent, n), ckpt_dir) for n in sorted(files)]
    return [f for f in out if f not in (TRAINER, MANIFEST)]


def write_manifest(ckpt_dir: str) -> None:
    """manifest.json: {file: {bytes, sha256}} of every file of the checkpoint (hashed on several threads)."""
    from concurrent.futures import ThreadPoolExecutor
    files = _files(ckpt_dir)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(lambda f: file_sha256(os.path.join(ckpt_dir, f)), files))
    write_json(os.path.join(ckpt_dir, MANIFEST), {"version": 1, "files": {
        f: {"bytes": os.path.getsize(os.path.join(ckpt_dir, f)), "sha256": d} for f, d in zip(files, digests)}})


def verify(ckpt_dir: str, only: Optional[list] = None) -> None:
    """Check the checkpoint's files (or `only` those, by name) against its manifest; a missing, truncated or
    altered file raises CheckpointError naming it. A checkpoint written before manifests existed passes
    unchecked."""
    path = os.path.join(ckpt_dir, MANIFEST)
    if not os.path.exists(path):
        return
    expected = (read_json(os.path.join(ckpt_dir, TRAINER)) if is_complete(ckpt_dir) else {}).get("manifest_sha256")
    if expected is not None and file_sha256(path) != expected:
        raise CheckpointError(f"{path}: altered (its sha256 differs from the one in {TRAINER})")
    files = read_json(path).get("files", {})
    for name in (files if only is None else [n for n in only if n in files]):
        full, want = os.path.join(ckpt_dir, name), files[name]
        if not os.path.isfile(full):
            raise CheckpointError(f"{full}: missing (listed in {MANIFEST})")
        size = os.path.getsize(full)
        if size != want["bytes"]:
            raise CheckpointError(f"{full}: {size:,} bytes, the manifest says {want['bytes']:,}: truncated or "
                                  "overwritten")
        if file_sha256(full) != want["sha256"]:
            raise CheckpointError(f"{full}: its sha256 differs from the manifest's: the file was altered")


def add_to_manifest(ckpt_dir: str, name: str) -> None:
    """Record a file written into a finished checkpoint later (a consolidated model.safetensors)."""
    path = os.path.join(ckpt_dir, MANIFEST)
    if not (os.path.exists(path) and is_complete(ckpt_dir)):
        return
    manifest = read_json(path)
    full = os.path.join(ckpt_dir, name)
    manifest["files"][name] = {"bytes": os.path.getsize(full), "sha256": file_sha256(full)}
    write_json(path + ".tmp", manifest)
    os.replace(path + ".tmp", path)
    meta = read_json(os.path.join(ckpt_dir, TRAINER))
    write_json(os.path.join(ckpt_dir, TRAINER + ".tmp"), {**meta, "manifest_sha256": file_sha256(path)})
    os.replace(os.path.join(ckpt_dir, TRAINER + ".tmp"), os.path.join(ckpt_dir, TRAINER))
    honour_umask(path, os.path.join(ckpt_dir, TRAINER))


def is_complete(ckpt_dir: str) -> bool:
    return os.path.isfile(os.path.join(ckpt_dir, TRAINER))


def read_meta(ckpt_dir: str) -> dict:
    """trainer.json of a checkpoint: step, tokens, world size, engine, data-sampler states, config."""
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir}: no such checkpoint directory")
    if not os.path.exists(os.path.join(ckpt_dir, TRAINER)):
        raise CheckpointError(f"{ckpt_dir}: not a complete checkpoint (no {TRAINER})")
    return read_json(os.path.join(ckpt_dir, TRAINER))


def weights_file(source: str) -> str:
    """The weights of `source`: a .safetensors file itself, or a checkpoint directory's model.safetensors."""
    path = source if source.endswith(".safetensors") else os.path.join(source, WEIGHTS)
    if not os.path.isfile(path):
        raise CheckpointError(f"{source}: no {path}")
    return path


def write_weights_checkpoint(out_dir: str, model: HybridLM, tokenizer: Optional[str]) -> None:
    """A weights-only checkpoint directory (weights, layout, tokenizer), as `python -m interop.export --import`
    writes: `load_checkpoint` reads it and `train.init_from` starts a run from it."""
    os.makedirs(out_dir, exist_ok=True)
    save_weights(out_dir, model)
    _write_layout_and_tokenizer(out_dir, model.layout, tokenizer)
    honour_umask(out_dir)


def write_best(out_dir: str, model: HybridLM, tokenizer: Optional[str], info: dict) -> str:
    """`model` as the weights-only checkpoint out_dir/best, with best.json (`info`), written beside it and then
    swapped in: a kill leaves the previous best whole."""
    final, tmp, old = (os.path.join(out_dir, name) for name in (BEST, f".tmp-{BEST}", f".tmp-old-{BEST}"))
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    write_weights_checkpoint(tmp, model, tokenizer)
    write_json(os.path.join(tmp, BEST_INFO), info)
    swap_in(tmp, final, old)
    return final


def read_best(out_dir: str) -> Optional[tuple[str, dict]]:
    """(out_dir/best, its best.json) when train.keep_best wrote one, else None."""
    path = os.path.join(out_dir, BEST)
    info = os.path.join(path, BEST_INFO)
    return (path, read_json(info)) if os.path.isfile(info) else None


class _fp32_view(torch.nn.Module):
    """Wraps a model so safetensors sees fp32 copies of its parameters (bf16 runs are saved in fp32), or of
    `state` in their place."""

    def __init__(self, model: torch.nn.Module, state: Optional[dict] = None):
        super().__init__()
        self.model, self.state = model, state

    def state_dict(self, *args, **kwargs):
        state = self.model.state_dict() if self.state is None else self.state
        out, seen = {}, {}
        for k, v in state.items():
            key = (v.data_ptr(), tuple(v.shape), tuple(v.stride()), v.dtype)
            if key not in seen:  # tied weights (one tensor under two names) stay one tensor: stored once
                t = v.detach().float().cpu()
                if t.untyped_storage().nbytes() != t.numel() * t.element_size():
                    t = t.clone()  # a view into a larger buffer (DeepSpeed's flat parameters): its own storage
                seen[key] = t
            out[k] = seen[key]
        return out


def consolidate(ckpt: str, out: Optional[str] = None) -> str:
    """Merge a DeepSpeed ZeRO checkpoint (`<ckpt>/zero`) into one fp32 safetensors file (default
    `<ckpt>/model.safetensors`). Tied weights are stored once, as in plain runs. A directory that is not a
    DeepSpeed checkpoint raises CheckpointError saying what it is."""
    zero = zero_dir(ckpt)
    if not os.path.isdir(ckpt):
        raise CheckpointError(f"{ckpt}: no such checkpoint directory (expected a DeepSpeed checkpoint, "
                              "<train.out_dir>/checkpoints/step_<N>, holding zero/)")
    if not os.path.isdir(zero):
        if os.path.isfile(os.path.join(ckpt, WEIGHTS)):
            raise CheckpointError(f"{ckpt}: not a DeepSpeed checkpoint (no zero/ directory); its {WEIGHTS} is "
                                  "already consolidated, use the directory as it is")
        raise CheckpointError(f"{ckpt}: not a DeepSpeed checkpoint: expected {zero}/ (written by train.py with "
                              "train.engine=deepspeed)")
    out = out or os.path.join(ckpt, WEIGHTS)
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise CheckpointError(f"{out}: its directory does not exist")
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise UserError("consolidating a DeepSpeed checkpoint needs the deepspeed package "
                        "(pip install deepspeed)") from None
    from safetensors.torch import save_file
    try:
        state = get_fp32_state_dict_from_zero_checkpoint(zero, tag="zero")
    except Exception as e:  # missing or truncated partitions raise FileNotFoundError, ValueError, RuntimeError, ...
        msg = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{zero}: cannot be consolidated ({type(e).__name__}: {msg}); is the checkpoint "
                              "complete?") from None
    if "lm_head.weight" in state and "embed.weight" in state and \
            state["lm_head.weight"].data_ptr() == state["embed.weight"].data_ptr():
        del state["lm_head.weight"]
    tmp = out + f".tmp{os.getpid()}"
    try:
        save_file({k: v.contiguous().float() for k, v in state.items()}, tmp)
        honour_umask(tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if os.path.dirname(os.path.abspath(out)) == os.path.abspath(ckpt):
        add_to_manifest(ckpt, os.path.basename(out))
    return out


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m training.checkpoint",
                                 description="Inspect a run's checkpoints and consolidate DeepSpeed ones.")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("consolidate", help="DeepSpeed ZeRO checkpoint -> one fp32 safetensors file",
                       description="Merge the ZeRO partitions of a DeepSpeed checkpoint (<dir>/zero) into one fp32 "
                                   "safetensors file. Plain PyTorch checkpoints already hold model.safetensors.")
    c.add_argument("checkpoint", help="checkpoint directory written by train.py with train.engine=deepspeed")
    c.add_argument("out", nargs="?", help="output file (default: <checkpoint>/model.safetensors)")
    c.add_argument("--debug", action="store_true", help="show the traceback of an error")
    ls = sub.add_parser("list", help="complete checkpoints of a run",
                        description="The complete checkpoints of a run, oldest first, with step and tokens seen.")
    ls.add_argument("root", help="a run's checkpoint directory, <train.out_dir>/checkpoints")
    ls.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = ap.parse_args(argv)
    if args.cmd == "consolidate":
        print(consolidate(args.checkpoint, args.out))
        return 0
    if not os.path.isdir(args.root):
        what = "is not a directory" if os.path.exists(args.root) else "no such directory"
        raise CheckpointError(f"{args.root}: {what} (expected a run's checkpoint directory, "
                              "<train.out_dir>/checkpoints)")
    found = complete(args.root)
    for d in found:
        meta = read_json(os.path.join(d, TRAINER))
        print(f"{d}  step {meta.get('step', '?')}  tokens {meta.get('tokens', 0):,}")
    if not found:
        hint = (f"; did you mean {os.path.join(args.root, 'checkpoints')}?"
                if os.path.isdir(os.path.join(args.root, "checkpoints")) else "")
        print(f"no complete checkpoints (step_<N>/trainer.json) under {args.root}{hint}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
