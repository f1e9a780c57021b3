"""The hybrid-vs-transformer quality table (issue 19): one model trained and evaluated per `run`, then `report`.

    python -m eval.quality sweep transformer --data runs/corpus/prepared --tokens 24000000 --lrs 1e-3 2e-3 4e-3 \
        --parallel 3 --out runs/q/sweep_tf
    python -m eval.quality run transformer --data runs/corpus/prepared --tokens 500000000 --lr 3e-3 --out runs/q/tf
    python -m eval.quality run "transformer:[M2 M2 M2 Ag M2 M2 M2 M2] x 2" --data ... --out runs/q/m2h
    python -m eval.quality report runs/q/tf runs/q/m2h --out eval/results/quality.md

`run` trains the layout (a shipped name or YAML path, optionally NAME:PATTERN; `--set` dotlist overrides such as
`model.d_model=512`) with `train.py` on a corpus prepared by `training/prepare.py` (`--data`: its
directory with manifest.json, so every model reads the same tokens with the same tokenizer), for `--tokens`
tokens at `--lr`, sequence length `--seq-len`, one schedule for all (linear warm-up over `--warmup-fraction`
of the steps, 10% by default, then cosine to 10% of the peak). train.py evaluates the held-out loss 20 times
over the run and keeps the weights of the lowest (`train.keep_best`); `--early-stop N` ends training once N
evaluations in a row have not beaten it (under repeated data the held-out loss turns up long before the end of
the schedule: what follows only memorizes the corpus). Then, from those best weights (`--evaluate final`: the
last checkpoint), on the prepared held-out split: perplexity in windows of 1x, 2x and 4x the training length, by
position in the document (length extrapolation), and the text passkey (a five-digit key inside filler, asked for
at the end; greedy) at 1x-4x the training length and three depths. Everything lands in `--out`: the run
directory of train.py (checkpoints, metrics.jsonl, best/) and `quality.json`, the only file `report` needs:
the layout and its parameter counts, the schedule, wall time and tokens/s, the loss curve, which weights were
evaluated, the held-out losses and the passkey scores. On the GPU machine, whose calls are limited to 10
minutes and bring back only small files, bring back `quality.json` alone: a ~50M-parameter model trains at
0.3-0.85M tokens/s on an H200 (128 x 1024 tokens per step), so 500M tokens take 10-28 minutes, i.e.
`--max-wall-time` and two or three calls (fewer with `--early-stop`).

`sweep` runs the same training at several peak learning rates (short runs, `--parallel` of them at once on one
GPU: small models leave most of it idle) and names the one with the lowest final held-out loss; a run that fails
(diverges, runs out of memory) is recorded, not fatal. `run --max-wall-time T` pauses training after T (exit
status 75, checkpoint kept): the same command continues it, then evaluates, so a run may span several
10-minute calls on the same machine (training wall time is summed over them).

`report` writes the table (non-embedding and total parameters, tokens, tokens per parameter, epochs over the
prepared corpus, lr, held-out perplexity at 1x / 2x / 4x, the lowest held-out perplexity logged during training and
when, passkey accuracy per length), the sweeps (`--sweeps DIR ...`) and the loss curves
and loss-by-position plots beside it.
What the table supports is for its reader to say: the markdown ends with the runs' facts, not a verdict.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
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
PAUSED = 75                  # train.py's status after train.max_wall_time or a signal: checkpoint written
CLOCK = "quality_clock.json"  # training wall seconds summed over the invocations of one run


def train_command(args) -> list[str]:
    """train.py's command line for `run` (the layout spec resolved to a file plus a `layers=` override)."""
    from eval.sizing import layout_path, split_spec
    name, pattern = split_spec(args.layout)
    steps = max(1, args.tokens // (args.seq_len * args.micro_batch))
    over = [f"layers={pattern}"] if pattern else []
    return ([sys.executable, os.path.join(ROOT, "train.py"), layout_path(name)] + over + list(args.set) + [
        f"model.max_seq_len={args.seq_len * max(MULTIPLES)}", f"train.data={args.data}", f"train.steps={steps}",
        f"train.seq_len={args.seq_len}", f"train.micro_batch={args.micro_batch}", f"train.lr={args.lr}",
        f"train.warmup={max(1, round(steps * args.warmup_fraction))}", f"train.seed={args.seed}",
        f"train.out_dir={args.out}",
        f"train.eval_every={max(1, steps // 20)}", f"train.log_every={max(1, steps // 100)}", "train.save_every=0",
        "train.sample_tokens=0", "train.sampler=epoch"]
        + (["train.keep_best=true", f"train.early_stop={args.early_stop}"] if args.command == "run" else [])
        + ([f"train.max_wall_time={args.max_wall_time}"] if getattr(args, "max_wall_time", None) else []))


def train(args) -> Optional[float]:
    """Run (or continue) train.py for `args`: the training wall seconds summed over every invocation of this run
    directory, or None when train.py paused (train.max_wall_time ran out; the same command continues it)."""
    cmd = train_command(args)
    print("+ " + " ".join(cmd), flush=True)
    os.makedirs(args.out, exist_ok=True)
    clock = os.path.join(args.out, CLOCK)
    spent = 0.0
    if os.path.isfile(clock):
        with open(clock) as f:
            spent = float(json.load(f)["seconds"])
    t0 = time.time()
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    spent += time.time() - t0
    with open(clock, "w") as f:
        json.dump({"seconds": round(spent, 1)}, f)
    if rc == PAUSED:
        return None
    if rc != 0:
        raise ConfigError(f"train.py failed for {args.layout} (status {rc}; its message is above)")
    return spent


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


def heldout_losses(model, stream, seq_len: int, device, max_tokens: int) -> dict:
    """{multiple: {'loss', 'tokens', 'by_position': [(bucket start, loss, tokens)]}} on the prepared held-out split
    (`stream`, from training.data.read_prepared)."""
    from eval.perplexity import evaluate
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


def run(args) -> Optional[dict]:
    from eval.perplexity import load_checkpoint
    from eval.recall import non_embedding_params
    from hybrid.budget import budget
    train_s = train(args)
    if train_s is None:
        print(f"paused: --max-wall-time {args.max_wall_time} ran out and the checkpoint is in {args.out}; the same "
              "command continues the run, then evaluates it", flush=True)
        return None
    final = last_checkpoint(args.out)
    from training.checkpoint import read_best, read_meta
    meta = read_meta(final)
    trained = meta.get("tokens", args.tokens)
    best = read_best(args.out) if args.evaluate == "best" else None
    ckpt = best[0] if best else final
    evaluated = ({"checkpoint": "best", **best[1]} if best else
                 {"checkpoint": "final", "step": meta.get("step"), "tokens": trained, "loss": None})
    device = pick_device(args.device)
    model, tok = load_checkpoint(ckpt, device)
    model.eval()
    layout = model.layout
    from training.data import read_prepared
    manifest, _, held = read_prepared(args.data, "--data")
    result = {
        "layout": args.layout, "set": list(args.set),
        "params": budget(layout).params, "non_embedding_params": non_embedding_params(layout),
        "tokens": int(trained), "data_tokens": int(manifest["totals"]["train"]["tokens"]), "lr": args.lr,
        "seq_len": args.seq_len, "micro_batch": args.micro_batch,
        "warmup_fraction": args.warmup_fraction, "early_stop": args.early_stop,
        "stopped_early": bool(meta.get("stopped_early")), "evaluated": evaluated, "train_seconds": round(train_s, 1),
        "tokens_per_s": round(int(trained) / max(train_s, 1e-9)),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "checkpoint": ckpt,
        "curve": curve(args.out),
        "heldout": heldout_losses(model, held, args.seq_len, device, args.max_eval_tokens),
        "passkey": passkeys(model, tok, args.seq_len, args.passkey_trials, args.seed),
    }
    _save(result, args.out, "quality")
    print(json.dumps({k: v for k, v in result.items() if k not in ("curve",)}, indent=1))
    return result


def final_losses(run_dir: str) -> dict:
    """The last train and held-out losses a run logged (None where it logged none, e.g. it failed early)."""
    c = curve(run_dir) if os.path.isfile(os.path.join(run_dir, "metrics.jsonl")) else {"train": [], "heldout": []}
    return {"train_loss": c["train"][-1][1] if c["train"] else None,
            "heldout_loss": c["heldout"][-1][1] if c["heldout"] else None,
            "steps": c["train"][-1][0] if c["train"] else 0}


def _start(args, lr: float):
    out = os.path.join(args.out, f"lr{lr:g}")
    one = argparse.Namespace(**{**vars(args), "lr": lr, "out": out, "max_wall_time": None})
    os.makedirs(out, exist_ok=True)
    log = open(os.path.join(out, "train.log"), "w")
    cmd = train_command(one)
    print(f"+ [lr {lr:g}] " + " ".join(cmd), flush=True)
    return lr, out, subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log, time.time()


def sweep(args) -> dict:
    """Short runs of one layout at each of `--lrs` (up to `--parallel` at once: small models leave a GPU idle), the
    same schedule as `run`; the best lr by the final held-out loss. A run that fails (diverges, runs out of memory)
    is recorded with its status and the tail of its log, not fatal. Writes sweep.json (and a copy under $OUT)."""
    pending, running, rows = list(args.lrs), [], {}
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        while pending or running:
            while pending and len(running) < args.parallel:
                running.append(_start(args, pending.pop(0)))
            time.sleep(0.5)
            for job in [j for j in running if j[2].poll() is not None]:
                running.remove(job)
                rows[f"{job[0]:g}"] = _finished(*job)
    finally:  # interrupted (Ctrl-C, or SIGTERM from a time limit): no training run is left behind
        signal.signal(signal.SIGTERM, previous)
        for _, _, proc, log, _ in running:
            proc.terminate()
            proc.wait()
            log.close()
    best = best_lr(rows.values())
    if best is None:
        raise ConfigError(f"sweep of {args.layout}: no run finished (see {args.out}/lr*/train.log)")
    result = {"layout": args.layout, "set": list(args.set), "tokens": args.tokens, "seq_len": args.seq_len,
              "micro_batch": args.micro_batch, "warmup_fraction": args.warmup_fraction, "parallel": args.parallel,
              "runs": rows, "best_lr": best}
    _save(result, args.out, "sweep")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))
    return result


def _succeeded(r: dict) -> bool:
    """A sweep run that finished and has a finite held-out loss."""
    return r["status"] == 0 and r["heldout_loss"] is not None and math.isfinite(r["heldout_loss"])


def best_lr(runs) -> Optional[float]:
    """The lr of the sweep run with the lowest held-out loss among those that succeeded; None if none did."""
    ok = [r for r in runs if _succeeded(r)]
    return min(ok, key=lambda r: r["heldout_loss"])["lr"] if ok else None


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _finished(lr: float, out: str, proc, log, t0: float) -> dict:
    """One sweep run's record once its process has exited."""
    log.close()
    row = {"lr": lr, "status": proc.returncode, "seconds": round(time.time() - t0, 1), **final_losses(out)}
    if proc.returncode != 0:
        with open(os.path.join(out, "train.log")) as f:
            row["log_tail"] = f.read()[-1500:]
    print(f"lr {lr:g}: status {proc.returncode}, held-out loss {row['heldout_loss']}", flush=True)
    return row


def _save(result: dict, out: str, kind: str) -> None:
    """DIR/KIND.json, and a copy as $OUT/KIND_DIRNAME.json on the GPU machine (the only file that comes back)."""
    with open(os.path.join(out, f"{kind}.json"), "w") as f:
        json.dump(result, f, indent=1)
    if os.environ.get("OUT"):
        name = os.path.basename(os.path.normpath(out))
        with open(os.path.join(os.environ["OUT"], f"{kind}_{name}.json"), "w") as f:
            json.dump(result, f, indent=1)


def _load(path: str, kind: str) -> dict:
    f = path if path.endswith(".json") else os.path.join(path, f"{kind}.json")
    if not os.path.isfile(f):
        raise ConfigError(f"{path}: no {kind}.json (run `python -m eval.quality {'run' if kind == 'quality' else kind}"
                          f" ... --out {path}` first)")
    with open(f) as fh:
        return json.load(fh)


def merge_sweeps(sweeps: Sequence[dict]) -> list[dict]:
    """One sweep per model: sweeps of the same layout, overrides, tokens and schedule (run at different lrs, in
    different sessions) are merged, and each merged sweep's best lr is the best over all its runs that finished."""
    merged: dict = {}
    for s in sweeps:
        key = (s["layout"], tuple(s.get("set") or ()), s["tokens"], s["seq_len"], s["micro_batch"],
               s.get("warmup_fraction"))
        m = merged.setdefault(key, {**s, "runs": {}})
        m["parallel"] = max(m["parallel"], s["parallel"])
        for r in s["runs"].values():
            m["runs"][repr(r["lr"])] = r
    for m in merged.values():
        m["best_lr"] = best_lr(m["runs"].values())
    return list(merged.values())


def sweep_table(paths: Sequence[str], runs: Sequence[dict] = ()) -> str:
    """The learning-rate sweeps as one table: held-out perplexity per layout and lr, the best in bold (sweeps of
    one model at different lrs share a row), and the lr that model's run in `runs` (same layout and overrides)
    trained at, which may come from an earlier sweep not given here."""
    if not paths:
        return ""
    sweeps = merge_sweeps([_load(p, "sweep") for p in paths])
    run_lr = {(r["layout"], tuple(sorted(r.get("set") or ()))): r["lr"] for r in runs}
    lrs = sorted({r["lr"] for s in sweeps for r in s["runs"].values()})
    rows = []
    for s in sweeps:
        by = {r["lr"]: r for r in s["runs"].values()}
        cells = []
        for lr in lrs:
            r = by.get(lr)
            if r is None:
                cells.append("")
            elif not _succeeded(r):
                cells.append(f"failed ({r['status']})")
            else:
                ppl = f"{math.exp(r['heldout_loss']):.2f}"
                cells.append(f"**{ppl}**" if lr == s["best_lr"] else ppl)
        used = run_lr.get((s["layout"], tuple(sorted(s.get("set") or ()))))
        rows.append([s["layout"], f"{s['tokens'] / 1e6:,.0f}M", *cells, "" if used is None else f"{used:g}"])
    first = sweeps[0]
    parallel = max(s["parallel"] for s in sweeps)
    return (f"\n\n### Learning-rate sweep\n\nHeld-out perplexity after a short run ({first['seq_len']} x "
            f"{first['micro_batch']} tokens per step, the same schedule shape as the runs, up to {parallel} "
            f"run{'s' if parallel > 1 else ''} at once on the GPU); bold: the best of the points recorded here; "
            "last column: the lr of that model's run above (blank: no run of it in this table).\n\n"
            + md_table(["layout", "tokens", *[f"lr {lr:g}" for lr in lrs], "run's lr"], rows))


def best_heldout(r: dict) -> str:
    """The lowest held-out perplexity train.py logged during the run and the tokens seen by then: under repeated
    data the held-out loss can turn up before the end (the model memorizes its corpus), which the final column
    alone would hide."""
    held = r["curve"]["heldout"]
    if not held:
        return ""
    step, loss = min(held, key=lambda p: p[1])
    return f"{math.exp(loss):.2f} ({(step + 1) * r['seq_len'] * r['micro_batch'] / 1e6:,.0f}M)"


def evaluated_at(r: dict) -> str:
    """Which weights the 1x-4x and passkey columns measure: the best held-out loss in training, or the final ones
    (runs from before --evaluate: final), and after how many tokens; 'stopped early' when --early-stop ended it."""
    e = r.get("evaluated") or {"checkpoint": "final", "tokens": r["tokens"]}
    return (f"{e['checkpoint']} ({e['tokens'] / 1e6:,.0f}M)"
            + (f"; stopped early at {r['tokens'] / 1e6:,.0f}M" if r.get("stopped_early") else ""))


def report(args, argv) -> str:
    runs = [_load(path, "quality") for path in args.runs]
    rows = []
    for r in runs:
        ppl = [f"{math.exp(r['heldout'][str(m)]['loss']):.2f}" for m in MULTIPLES]
        pk = [f"{r['passkey'][str(m)]:.0%}" for m in MULTIPLES]
        rows.append([r["layout"], f"{r['non_embedding_params'] / 1e6:.1f}M", f"{r['params'] / 1e6:.1f}M",
                     f"{r['tokens'] / 1e6:,.0f}M", f"{r['tokens'] / r['non_embedding_params']:.1f}",
                     f"{r['tokens'] / r['data_tokens']:.1f}" if r.get("data_tokens") else "", r["lr"],
                     f"{r.get('warmup_fraction', 0.02):.0%}",  # runs from before the option warmed up over 2%
                     evaluated_at(r), *ppl, best_heldout(r), *pk, f"{r['tokens_per_s']:,}"])
    header = ["layout", "non-emb params", "params", "tokens", "tokens / non-emb param", "epochs", "lr", "warm-up",
              "evaluated weights (at tokens)", *[f"held-out ppl {m}x" for m in MULTIPLES],
              "best held-out ppl in training (at tokens)",
              *[f"passkey {m}x" for m in MULTIPLES], "train tokens/s"]
    curves = png_beside(args.out, "loss")
    line_plot(curves, {r["layout"]: ([s for s, _ in r["curve"]["train"]], [v for _, v in r["curve"]["train"]])
                       for r in runs}, xlabel="step", ylabel="train loss (nats/token)", title="training loss")
    held = png_beside(args.out, "heldout")
    line_plot(held, {r["layout"]: ([(s + 1) * r["seq_len"] * r["micro_batch"] / 1e6 for s, _ in r["curve"]["heldout"]],
                                   [math.exp(v) for _, v in r["curve"]["heldout"]]) for r in runs},
              xlabel="training tokens (M)", ylabel="held-out perplexity", logy=True,
              title="held-out perplexity during training (the whole held-out split)")
    by_pos = png_beside(args.out, "by_position")
    line_plot(by_pos, {r["layout"]: ([max(1, b) for b, _, _ in r["heldout"][str(max(MULTIPLES))]["by_position"]],
                                     [v for _, v, _ in r["heldout"][str(max(MULTIPLES))]["by_position"]])
                       for r in runs}, xlabel="position in document (bucket start)", ylabel="held-out loss",
              logx=True, title=f"held-out loss by position, windows of {max(MULTIPLES)}x the training length")
    facts = "\n".join(f"- {r['layout']}: {r['device']}, {r['train_seconds']:.0f} s of training, seq_len "
                      f"{r['seq_len']} x micro-batch {r['micro_batch']}, checkpoint `{r['checkpoint']}`"
                      for r in runs)
    lead = ("Every run follows one schedule shape (linear warm-up, then cosine over its planned tokens); `tokens` "
            "is what it trained, less than planned where `--early-stop` ended it; the 1x-4x and passkey columns "
            "measure the weights named in `evaluated weights`.\n\n")
    body = (lead + md_table(header, rows) + "\n\n" + plot_links([curves, held, by_pos],
                                                         ["training loss", "held-out perplexity", "loss by position"])
            + "\n\n" + facts + sweep_table(args.sweeps, runs))
    return write_result(args.out, "Quality at equal parameters and schedule", pick_device("cpu"), body, argv,
                        "eval.quality")


def _training_options(a: argparse.ArgumentParser) -> None:
    """What `run` and `sweep` share: the layout, the data, the schedule's size."""
    a.add_argument("layout", help="shipped layout name or YAML path, optionally NAME:PATTERN")
    a.add_argument("--data", required=True, help="a corpus directory prepared by python -m training.prepare")
    a.add_argument("--tokens", type=int, required=True, help="training tokens (per run)")
    a.add_argument("--seq-len", type=int, default=1024)
    a.add_argument("--micro-batch", type=int, default=16, help="rows per step (one GPU, no accumulation)")
    a.add_argument("--set", nargs="*", default=[], help="dotlist overrides of the layout (model.d_model=512 ...)")
    a.add_argument("--warmup-fraction", type=float, default=0.1,
                   help="linear warm-up over this fraction of the steps (at least one step), then cosine to 10%%")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--out", required=True, help="run directory (train.py's out_dir; the .json summary lands there)")


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m eval.quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train one layout and evaluate it")
    _training_options(r)
    r.add_argument("--lr", type=float, default=3e-3)
    r.add_argument("--max-eval-tokens", type=int, default=2_000_000, help="held-out tokens per evaluation length")
    r.add_argument("--passkey-trials", type=int, default=10, help="trials per length and depth")
    r.add_argument("--max-wall-time", default=None,
                   help="pause training after this long (seconds or HH:MM:SS; exit status 75); the same command "
                        "continues the run from its checkpoint, then evaluates it")
    r.add_argument("--early-stop", type=int, default=0, metavar="N",
                   help="stop training once N held-out evaluations in a row (every 1/20 of the run) have not beaten "
                        "the best (0: train all --tokens)")
    r.add_argument("--evaluate", choices=("best", "final"), default="best",
                   help="evaluate the weights of the lowest held-out loss logged in training (best, default: under "
                        "repeated data the final weights may have memorized the corpus) or the last checkpoint")
    r.add_argument("--device", default=None)
    w = sub.add_parser("sweep", help="short runs of one layout at several learning rates; the best by held-out loss")
    _training_options(w)
    w.add_argument("--lrs", type=float, nargs="+", required=True, help="peak learning rates to try")
    w.add_argument("--parallel", type=int, default=1, help="runs at once (small models share one GPU)")
    p = sub.add_parser("report", help="the table and plots of finished runs")
    p.add_argument("runs", nargs="+", help="run directories (or their quality.json files)")
    p.add_argument("--sweeps", nargs="*", default=[], help="sweep directories (or sweep.json files) to tabulate")
    add_out_argument(p, "quality", "quality")
    for a in (ap, r, w, p):
        a.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = ap.parse_args(argv)
    if args.command in ("run", "sweep"):
        _check_training(args)
    return args


def _check_training(args) -> None:
    names = ["tokens", "seq_len", "micro_batch"] + (["passkey_trials", "max_eval_tokens"] if args.command == "run"
                                                   else ["parallel"])
    for name in names:
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected an integer >= 1")
    if args.command == "run" and args.early_stop < 0:
        raise ConfigError(f"--early-stop {args.early_stop}: expected evaluations >= 0 (0: never stop early)")
    if not 0 <= args.warmup_fraction < 1:
        raise ConfigError(f"--warmup-fraction {args.warmup_fraction}: expected a fraction of the steps in [0, 1)")
    for lr in ([args.lr] if args.command == "run" else args.lrs):
        if not lr > 0:
            raise ConfigError(f"--lr {lr}: expected a positive learning rate" if args.command == "run" else
                              f"--lrs {lr:g}: expected positive learning rates")
    if args.command == "run" and args.max_wall_time is not None:
        from training.faults import parse_duration
        try:
            parse_duration(args.max_wall_time)
        except ConfigError as e:
            raise ConfigError(f"--max-wall-time {args.max_wall_time}: {str(e).split(': ', 1)[-1]}") from None
    if not os.path.isfile(os.path.join(args.data, "manifest.json")):
        raise ConfigError(f"--data {args.data}: not a prepared corpus (no manifest.json; prepare it with "
                          "python -m training.prepare)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.command == "run":
        return 0 if run(args) is not None else PAUSED
    if args.command == "sweep":
        sweep(args)
    else:
        check_out(args.out)
        print(report(args, argv))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
