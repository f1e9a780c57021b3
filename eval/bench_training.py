"""Single-GPU DeepSpeed ZeRO-2 and ZeRO-3 pretraining of a layout through the `deepspeed` launcher (and, with
`--stages torch,2,3`, plain `python train.py` beside them: the torch engine ZeRO's speed is judged against), then
a check that the consolidated fp32 checkpoint reloads to the same held-out loss. Writes a markdown table to
`--out` (default runs/eval/bench_training/training.md under the current directory) and prints its path.

    python -m eval.bench_training [--layout layouts/jamba.yaml] [--steps 200] [--seq-len 4096] [--micro-batch 4]
    python -m eval.bench_training --out eval/results/training.md     # update the recorded results

Each run is `deepspeed --num_gpus 1 train.py <layout> train.zero_stage=S ...` (or `python train.py <layout> ...`
for `torch`); `--extra` adds overrides of the layout or the train section to every run; tokens/s, MFU and peak memory
come from the run's summary.json (MFU counts 3x the layout's forward FLOPs per token, attention included,
against the GPU's dense bf16 peak: training/metrics.py PEAK_TFLOPS, or train.peak_tflops).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import torch

from eval import harness
from eval.plots import md_table, require_positive
from hybrid.errors import ConfigError, cli

HEADER = ["engine (ZeRO stage)", "params", "train loss (first → mean of last 10)", "held-out loss at end",
          "held-out loss, consolidated fp32 checkpoint reloaded", "tokens/s", "MFU", "peak memory GiB",
          "steps x micro-batch x seq_len"]
KEEP = ("step", "sample", "consolidated", "jamba", "resumed", "error", "Traceback")  # log lines worth printing


def launcher() -> list[str]:
    exe = shutil.which("deepspeed")
    if exe:
        return [exe]
    for root in sys.path:  # installed with pip --target: the script sits in <target>/bin
        cand = os.path.join(root, "bin", "deepspeed")
        if os.path.exists(cand):
            return [sys.executable, cand]
    return [sys.executable, "-m", "deepspeed.launcher.runner"]


def reload_loss(summary: dict, out_dir: str) -> float:
    """Held-out loss of the consolidated fp32 checkpoint, loaded into a fresh bf16 model."""
    from omegaconf import OmegaConf
    from training import checkpoint as ckpt
    from training.config import RunConfig
    from training.data import TokenStream
    from training.loop import evaluate
    ck = summary["checkpoint"]
    model, _ = ckpt.load_checkpoint(ck, device="cuda", dtype=torch.bfloat16)
    layout = model.layout
    meta = ckpt.read_meta(ck)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig()), {"train": meta["config"]}))
    data_dir = os.path.join(out_dir, "data")
    shard = os.path.join(data_dir, sorted(os.listdir(data_dir))[0], "heldout")
    held = TokenStream.load(shard, layout.model.vocab_size)
    return evaluate(model, held, cfg.train, torch.device("cuda"), lambda: torch.autocast("cuda", enabled=False))


TORCH = "torch"  # a --stages entry: plain `python train.py` (the torch engine), the reference for ZeRO's speed


def parse_stages(text: str) -> list:
    """`--stages torch,2,3` -> ["torch", 2, 3]; anything but `torch` and ZeRO stages 0..3 raises ConfigError."""
    stages = []
    for part in text.split(","):
        part = part.strip()
        if part == TORCH:
            stages.append(TORCH)
        elif part in ("0", "1", "2", "3"):
            stages.append(int(part))
        else:
            stages = []
            break
    if not stages:
        raise ConfigError(f"--stages {text!r}: expected comma-separated ZeRO stages 0..3 and/or torch, e.g. "
                          "torch,2,3")
    return stages


def train_command(args, stage, out_dir: str) -> list[str]:
    """The run of one stage: `python train.py ...` for the torch engine, else the deepspeed launcher."""
    common = [args.layout, f"train.steps={args.steps}", f"train.seq_len={args.seq_len}",
              f"train.micro_batch={args.micro_batch}", f"train.out_dir={out_dir}", "train.eval_every=100",
              "train.log_every=20", "train.sample_tokens=48", "train.warmup=20", "train.lr=1e-3", *args.extra]
    if stage == TORCH:
        return [sys.executable, "train.py", *common]
    return launcher() + ["--num_gpus", "1", "train.py", f"train.zero_stage={stage}", *common]


def summary_row(stage: int, s: dict, reloaded: float, args) -> tuple:
    """A table row from a run's summary.json and the reloaded checkpoint's held-out loss."""
    losses = s["losses"]
    return (stage, f"{s['params'] / 1e6:.1f}M", f"{losses[0]:.2f} → {sum(losses[-10:]) / 10:.2f}",
            f"{s['heldout_loss']:.4f}", f"{reloaded:.4f}", f"{s['tokens_per_s']:,.0f}",
            f"{100 * s['mfu']:.1f}%" if s.get("mfu") else "-", f"{s['peak_mem_gib']:.1f}",
            f"{s['steps']} x {args.micro_batch} x {args.seq_len}")


def run_stage(args, stage: int) -> tuple:
    """One training run at ZeRO `stage`: its row, or a FAILED row (its log printed, and kept under $OUT)."""
    name = TORCH if stage == TORCH else f"zero{stage}"
    out_dir = os.path.join(args.runs, name)
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = train_command(args, stage, out_dir)
    print(" ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], f"{name}.log"), "w") as f:
            f.write(log)
    print("\n".join([line for line in log.splitlines() if line.startswith(KEEP)][-16:]), flush=True)
    if proc.returncode != 0:
        print(log[-4000:])
        return (stage, "FAILED") + ("",) * (len(HEADER) - 2)
    with open(os.path.join(out_dir, "summary.json")) as f:
        s = json.load(f)
    row = summary_row(stage, s, reload_loss(s, out_dir), args)
    print(row, flush=True)
    return row


def options(ap) -> None:
    ap.add_argument("--layout", default="layouts/jamba.yaml")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--stages", default="2,3", help="comma-separated ZeRO stages and/or `torch` (plain python "
                    "train.py, the torch engine), one run each; e.g. torch,2,3")
    ap.add_argument("--runs", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "bench_training"),
                    help="folder of the training runs (out_dir of each)")
    ap.add_argument("--extra", nargs="*", default=[], help="more train.* overrides for every run")


def validate(args) -> None:
    require_positive(steps=args.steps, seq_len=args.seq_len, micro_batch=args.micro_batch)
    parse_stages(args.stages)
    if not os.path.isfile(args.layout):
        raise ConfigError(f"--layout {args.layout}: no such file (expected a layout YAML, e.g. layouts/jamba.yaml)")


def bench(args, run: harness.Run) -> int:
    rows = [run_stage(args, stage) for stage in parse_stages(args.stages)]
    run.write("Pretraining with DeepSpeed ZeRO",
              f"One GPU, bf16 with fp32 master weights, layout `{args.layout}`, embedded corpus; each run: "
              "`deepspeed --num_gpus 1 train.py ...`.\n\n" + md_table(HEADER, rows))
    return 0 if all(r[1] != "FAILED" for r in rows) else 1


def main(argv=None) -> int:
    return harness.main("bench_training", __doc__, argv, bench, options, validate, floors=False)


if __name__ == "__main__":
    sys.exit(cli(main))
