"""The hybrid-vs-transformer quality table (issue 19): one model trained and evaluated per `run`, then `report`.

    python -m eval.quality run transformer --data runs/corpus/prepared --tokens 500000000 --lr 3e-3 --out runs/q/tf
    python -m eval.quality run "transformer:[M2 M2 M2 Ag M2 M2 M2 M2] x 2" --data ... --out runs/q/m2h
    python -m eval.quality report runs/q/tf runs/q/m2h --out eval/results/quality.md

`run` trains the layout (a shipped name or YAML path, optionally NAME:PATTERN; `--set` dotlist overrides such as
`model.d_model=512`) with `train.py` on a corpus prepared by `training/prepare.py` (`--data`: its
directory with manifest.json, so every model reads the same tokens with the same tokenizer), for `--tokens`
tokens at `--lr`, sequence length `--seq-len`, one schedule for all (warm-up 2% of the steps, cosine to 10%).
Then, from the final checkpoint, on the prepared held-out split: perplexity in windows of 1x, 2x and 4x the
training length, by position in the document (length extrapolation), and the text passkey (a five-digit key
inside filler, asked for at the end; greedy) at 1x-4x the training length and three depths. Everything lands in
`--out`: the run directory of train.py (checkpoints, metrics.jsonl) and `quality.json`, the only file `report`
needs: the layout and its parameter counts, the schedule, wall time and tokens/s, the loss curve, the held-out
losses and the passkey scores. On the GPU machine, whose calls are limited to 10 minutes and bring back only small
files, one `run` per call fits a model of ~50M non-embedding parameters at a few hundred million tokens; bring
back `quality.json` alone.

`report` writes the table (non-embedding and total parameters, tokens, tokens per parameter, lr, held-out
perplexity at 1x / 2x / 4x, passkey accuracy per length) and the loss curves and loss-by-position plots beside it.
What the table supports is for its reader to say: the markdown ends with the runs' facts, not a verdict.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from typing import Optional, Sequence

import torch

from eval.plots import add_out_argument, check_out, line_plot, md_table, pick_device, plot_links, png_beside, \
    write_result
from hybrid.errors import ConfigError, cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MULTIPLES = (1, 2, 4)        # evaluation lengths, in training lengths
DEPTHS = (0.1, 0.5, 0.9)     # where the passkey sits in the filler


def train_command(args) -> list[str]:
    """train.py's command line for `run` (the layout spec resolved to a file plus a `layers=` override)."""
    from eval.sizing import layout_path, split_spec
    name, pattern = split_spec(args.layout)
    steps = max(1, args.tokens // (args.seq_len * args.micro_batch))
    over = [f"layers={pattern}"] if pattern else []
    return ([sys.executable, os.path.join(ROOT, "train.py"), layout_path(name)] + over + list(args.set) + [
        f"model.max_seq_len={args.seq_len * max(MULTIPLES)}", f"train.data={args.data}", f"train.steps={steps}",
        f"train.seq_len={args.seq_len}", f"train.micro_batch={args.micro_batch}", f"train.lr={args.lr}",
        f"train.warmup={max(1, steps // 50)}", f"train.seed={args.seed}", f"train.out_dir={args.out}",
        f"train.eval_every={max(1, steps // 20)}", f"train.log_every={max(1, steps // 100)}", "train.save_every=0",
        "train.sample_tokens=0", "train.sampler=epoch"])


def last_checkpoint(run_dir: str) -> str:
    from training import checkpoint
    found = checkpoint.latest(os.path.join(run_dir, "checkpoints"))
    if not found:
        raise ConfigError(f"{run_dir}: train.py wrote no complete checkpoint (see its output above)")
    return found


def curve(run_dir: str) -> dict:
    """Train and held-out loss by step from train.py's metrics.jsonl."""
    train, held = [], []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "loss" in rec:
                train.append((rec["step"], rec["loss"]))
            if "heldout_loss" in rec:
                held.append((rec["step"], rec["heldout_loss"]))
    return {"train": train, "heldout": held}


def heldout_losses(model, data: str, seq_len: int, device, max_tokens: int) -> dict:
    """{multiple: {'loss', 'tokens', 'by_position': [(bucket start, loss, tokens)]}} on the prepared held-out split."""
    from eval.perplexity import evaluate
    from training.data import read_prepared
    stream = read_prepared(data, "--data")[2]
    out = {}
    for m in MULTIPLES:
        res = evaluate(model, stream, m * seq_len, 8, max_tokens, device)
        by = [(int(res["edges"][i]), float(s / c), int(c))
              for i, (s, c) in enumerate(zip(res["loss_sum"], res["count"])) if c]
        out[str(m)] = {"loss": float(res["loss_sum"].sum() / max(1, res["count"].sum())), "tokens": res["tokens"],
                       "window": res["seq_len"], "by_position": by}
    return out


def passkeys(model, tok, seq_len: int, trials: int, seed: int) -> dict:
    from eval.recall import text_passkey
    rng = random.Random(seed)
    return {str(m): sum(text_passkey(model, tok, m * seq_len, d, rng) for d in DEPTHS for _ in range(trials))
            / (len(DEPTHS) * trials) for m in MULTIPLES}


def run(args) -> dict:
    from eval.perplexity import load_checkpoint
    from eval.recall import non_embedding_params
    from hybrid.budget import budget
    t0 = time.time()
    cmd = train_command(args)
    print("+ " + " ".join(cmd), flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        raise ConfigError(f"train.py failed for {args.layout} (its message is above)")
    train_s = time.time() - t0
    ckpt = last_checkpoint(args.out)
    device = pick_device(args.device)
    model, tok = load_checkpoint(ckpt, device)
    model.eval()
    layout = model.layout
    from training.checkpoint import read_meta
    trained = read_meta(ckpt).get("tokens", args.tokens)
    result = {
        "layout": args.layout, "set": list(args.set),
        "params": budget(layout).params, "non_embedding_params": non_embedding_params(layout),
        "tokens": int(trained), "lr": args.lr, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
        "train_seconds": round(train_s, 1), "tokens_per_s": round(int(trained) / max(train_s, 1e-9)),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "checkpoint": ckpt,
        "curve": curve(args.out),
        "heldout": heldout_losses(model, args.data, args.seq_len, device, args.max_eval_tokens),
        "passkey": passkeys(model, tok, args.seq_len, args.passkey_trials, args.seed),
    }
    with open(os.path.join(args.out, "quality.json"), "w") as f:
        json.dump(result, f, indent=1)
    if os.environ.get("OUT"):  # the device machine's return folder: the summary alone comes back
        name = os.path.basename(os.path.normpath(args.out))
        with open(os.path.join(os.environ["OUT"], f"quality_{name}.json"), "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k not in ("curve",)}, indent=1))
    return result


def report(args, argv) -> str:
    runs = []
    for path in args.runs:
        f = path if path.endswith(".json") else os.path.join(path, "quality.json")
        if not os.path.isfile(f):
            raise ConfigError(f"{path}: no quality.json (run `python -m eval.quality run ... --out {path}` first)")
        with open(f) as fh:
            runs.append(json.load(fh))
    rows = []
    for r in runs:
        ppl = [f"{math.exp(r['heldout'][str(m)]['loss']):.2f}" for m in MULTIPLES]
        pk = [f"{r['passkey'][str(m)]:.0%}" for m in MULTIPLES]
        rows.append([r["layout"], f"{r['non_embedding_params'] / 1e6:.1f}M", f"{r['params'] / 1e6:.1f}M",
                     f"{r['tokens'] / 1e6:,.0f}M", f"{r['tokens'] / r['non_embedding_params']:.1f}", r["lr"], *ppl, *pk,
                     f"{r['tokens_per_s']:,}"])
    header = ["layout", "non-emb params", "params", "tokens", "tokens / non-emb param", "lr",
              *[f"held-out ppl {m}x" for m in MULTIPLES], *[f"passkey {m}x" for m in MULTIPLES], "train tokens/s"]
    curves = png_beside(args.out, "loss")
    line_plot(curves, {r["layout"]: ([s for s, _ in r["curve"]["train"]], [v for _, v in r["curve"]["train"]])
                       for r in runs}, xlabel="step", ylabel="train loss (nats/token)", title="training loss")
    by_pos = png_beside(args.out, "by_position")
    line_plot(by_pos, {r["layout"]: ([max(1, b) for b, _, _ in r["heldout"][str(max(MULTIPLES))]["by_position"]],
                                     [v for _, v, _ in r["heldout"][str(max(MULTIPLES))]["by_position"]])
                       for r in runs}, xlabel="position in document (bucket start)", ylabel="held-out loss",
              logx=True, title=f"held-out loss by position, windows of {max(MULTIPLES)}x the training length")
    facts = "\n".join(f"- {r['layout']}: {r['device']}, {r['train_seconds']:.0f} s of training, seq_len "
                      f"{r['seq_len']} x micro-batch {r['micro_batch']}, checkpoint `{r['checkpoint']}`"
                      for r in runs)
    body = (md_table(header, rows) + "\n\n" + plot_links([curves, by_pos], ["training loss", "loss by position"])
            + "\n\n" + facts)
    return write_result(args.out, "Quality at equal parameters and tokens", pick_device("cpu"), body, argv,
                        "eval.quality")


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m eval.quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train one layout and evaluate it")
    r.add_argument("layout", help="shipped layout name or YAML path, optionally NAME:PATTERN")
    r.add_argument("--data", required=True, help="a corpus directory prepared by python -m training.prepare")
    r.add_argument("--tokens", type=int, required=True, help="training tokens")
    r.add_argument("--lr", type=float, default=3e-3)
    r.add_argument("--seq-len", type=int, default=1024)
    r.add_argument("--micro-batch", type=int, default=16)
    r.add_argument("--set", nargs="*", default=[], help="dotlist overrides of the layout (model.d_model=512 ...)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--max-eval-tokens", type=int, default=2_000_000, help="held-out tokens per evaluation length")
    r.add_argument("--passkey-trials", type=int, default=10, help="trials per length and depth")
    r.add_argument("--device", default=None)
    r.add_argument("--out", required=True, help="run directory (train.py's out_dir; quality.json lands there)")
    p = sub.add_parser("report", help="the table and plots of finished runs")
    p.add_argument("runs", nargs="+", help="run directories (or their quality.json files)")
    add_out_argument(p, "quality", "quality")
    for a in (ap, r, p):
        a.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = ap.parse_args(argv)
    if args.command == "run":
        for name in ("tokens", "seq_len", "micro_batch", "passkey_trials", "max_eval_tokens"):
            if getattr(args, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected an integer >= 1")
        if args.lr <= 0:
            raise ConfigError(f"--lr {args.lr}: expected a positive learning rate")
        if not os.path.isfile(os.path.join(args.data, "manifest.json")):
            raise ConfigError(f"--data {args.data}: not a prepared corpus (no manifest.json; prepare it with "
                              "python -m training.prepare)")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.command == "run":
        run(args)
    else:
        check_out(args.out)
        print(report(args, argv))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
