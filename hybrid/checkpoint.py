"""Training checkpoints: one directory per saved step, written whole under a temporary name, then renamed.

    <out_dir>/checkpoints/step_00000200/
        model.safetensors      fp32 weights (plain PyTorch runs; DeepSpeed runs: see below)
        optimizer.pt           optimizer state (plain PyTorch runs)
        zero/                  DeepSpeed's own checkpoint (ZeRO partitions of weights and optimizer)
        trainer.json           step, tokens seen, data-sampler and RNG state of every rank, config
        rng_rank<r>.pt         torch RNG states of rank r
        layout.yaml            the resolved layout
        tokenizer.model        the sentencepiece model

A save that dies midway leaves only a `.tmp-*` directory, which is ignored and removed by the next save: the
last complete checkpoint is never touched until a newer one is complete. `latest()` is the newest complete
one. DeepSpeed checkpoints consolidate to one fp32 safetensors file with `consolidate()`, or
`python -m hybrid.checkpoint consolidate <checkpoint dir> [out.safetensors]`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from typing import Optional

import torch

PATTERN = re.compile(r"^step_(\d{8})$")


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:08d}")


def complete(root: str) -> list[str]:
    """Complete checkpoint directories under root, oldest first."""
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(root) if (m := PATTERN.match(name))
             and os.path.exists(os.path.join(root, name, "trainer.json"))]
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
    if os.path.exists(final):  # saving the same step again: move the old one aside first
        old = os.path.join(root, f".tmp-old-step_{step:08d}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    if keep > 0:
        for stale in complete(root)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def save_model(model: torch.nn.Module, path: str) -> None:
    """fp32 safetensors of the model (tied weights stored once)."""
    from safetensors.torch import save_model as st_save
    st_save(_fp32_view(model), path)


def load_model(model: torch.nn.Module, path: str) -> None:
    """Load weights saved by `save_model` or `consolidate` (cast to the model's dtypes; strict)."""
    from safetensors.torch import load_model as st_load
    missing, unexpected = st_load(model, path, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: does not match the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")


class _fp32_view(torch.nn.Module):
    """Wraps a model so safetensors sees fp32 copies of its parameters (bf16 runs are saved in fp32)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def state_dict(self, *args, **kwargs):
        return {k: v.detach().float().cpu() for k, v in self.model.state_dict().items()}


def consolidate(ckpt: str, out: Optional[str] = None) -> str:
    """Merge a DeepSpeed ZeRO checkpoint (`<ckpt>/zero`) into one fp32 safetensors file (default
    `<ckpt>/model.safetensors`). Tied weights are stored once, as in plain runs."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file
    state = get_fp32_state_dict_from_zero_checkpoint(os.path.join(ckpt, "zero"), tag="zero")
    if "lm_head.weight" in state and "embed.weight" in state and \
            state["lm_head.weight"].data_ptr() == state["embed.weight"].data_ptr():
        del state["lm_head.weight"]
    out = out or os.path.join(ckpt, "model.safetensors")
    tmp = out + f".tmp{os.getpid()}"
    save_file({k: v.contiguous().float() for k, v in state.items()}, tmp)
    os.replace(tmp, out)
    return out


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m hybrid.checkpoint")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("consolidate", help="ZeRO checkpoint -> one fp32 safetensors file")
    c.add_argument("checkpoint")
    c.add_argument("out", nargs="?")
    ls = sub.add_parser("list", help="complete checkpoints of a run")
    ls.add_argument("root")
    args = ap.parse_args(argv)
    if args.cmd == "consolidate":
        print(consolidate(args.checkpoint, args.out))
    else:
        for d in complete(args.root):
            meta = read_json(os.path.join(d, "trainer.json"))
            print(f"{d}  step {meta['step']}  tokens {meta['tokens']:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
