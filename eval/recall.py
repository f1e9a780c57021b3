"""Synthetic recall: multi-query associative recall (MQAR) trained per layout, then passkey retrieval.

    python -m eval.recall                                   # GPU: mamba2 / transformer / hybrids at equal size
    python -m eval.recall --set defaults.mamba2.d_state=16 --cache runs.jsonl    # a smaller SSM state
    python -m eval.recall --layouts "mamba2:M2 x 4" "griffin:M2 Aw M2 Aw" --d-model 128 --lr 1e-3 3e-3
    python -m eval.recall --passkey-ckpt runs/tiny/checkpoints/step_00000120   # text passkey, a trained LM
    python -m eval.recall --quick                           # CPU: tiny models, a few steps (checks the code)
    python -m eval.recall ... --out eval/results/recall.md  # update the recorded results (only when named)

MQAR (as in Zoology, Arora et al. 2023), generated here: the vocabulary (less token 0, the filler) is split
into keys and values. A sequence starts with `pairs` key-value pairs (distinct keys), then the rest of the
length holds filler with the pairs' keys asked again at random places, each followed by its value. Loss and
accuracy are taken only on those answers: the model must have stored every pair it saw. Every layout
(`NAME[:PATTERN]`, a shipped layout with its layers replaced by PATTERN) is trained from scratch with AdamW on
fresh samples at `--train-len` with a pair count drawn from `--train-pairs` each step, for each learning
rate in `--lr` (the best is kept, as Zoology sweeps it), and resized to the first layout's non-embedding
parameter count (`--no-match` keeps `--d-model` for all). Accuracy is then measured on a grid of pair counts
x lengths, lengths past `--train-len` testing length generalization.

Each (layout, lr) pair is one unit. Units run `--jobs` at a time in separate processes (4 on a GPU: a model
this small leaves most of it idle while the host enqueues kernels). `--cache FILE` appends every finished
unit with the settings it depends on; later runs with the same settings read it instead of training, so a
sweep can be split over several runs (`--only LABEL...` trains a subset) and a report rebuilt from the file.
`--layout-lr LABEL=LR,LR` gives one layout its own learning rates.

Passkey, two forms, neither of which needs a model trained on long text:
  token passkey (always): the MQAR-trained models get one key-value pair at a depth in filler and its key at
      the end of `--passkey-lengths` tokens (up to and past the training length); the score is the accuracy
      of the answer. This measures whether a state or a window can carry one association over distance,
      out of the training distribution in position; it is not a language task.
  text passkey (`--passkey-ckpt`): a train.py checkpoint reads filler prose with "The pass key is NNNNN.
      Remember it." inside and "What is the pass key? The pass key is" at the end; the score is exact match
      of the greedy continuation's digits. A small model pretrained on the embedded corpus has never seen such
      a task, so expect scores near zero: it shows the harness works, not that the model cannot recall.

Writes `--out` (markdown: device, date, command, tables; default runs/eval/recall/recall.md under the current
directory) and four PNGs beside it (need matplotlib: `pip install -e ".[plots]"`; without it the markdown
says which plots were not drawn), and prints the path.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from hybrid.budget import budget
from hybrid.errors import ConfigError, DataError, cli
from hybrid.model import HybridLM, lm_loss
from hybrid.spec import Layout
from training.optim import lr_at, param_groups

from .plots import (add_out_argument, check_out, line_plot, md_table, pick_device, plot_links, png_beside,
                    require_positive, write_result)
from .sizing import match_params, sized_layout

FILLER = 0


# --------------------------------------------------------------------------------------------------- data

@dataclass(frozen=True)
class Vocab:
    """Token 0 is the filler; keys are [1, 1 + n_keys), values the rest."""
    size: int

    @property
    def n_keys(self) -> int:
        return (self.size - 1) // 2

    @property
    def n_values(self) -> int:
        return self.size - 1 - self.n_keys


def mqar_batch(batch: int, pairs: int, seq_len: int, vocab: Vocab, generator: torch.Generator,
               queries: Optional[int] = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, targets), both (batch, seq_len) int64; targets are -100 except at each query's key, where
    they hold the value that follows it."""
    queries = pairs if queries is None else queries
    if pairs > vocab.n_keys:
        raise ValueError(f"{pairs} pairs need {pairs} distinct keys; vocab {vocab.size} has {vocab.n_keys}")
    if queries > pairs or 2 * pairs + 2 * queries > seq_len:
        raise ValueError(f"{pairs} pairs and {queries} queries do not fit in {seq_len} tokens "
                         f"(need 2*pairs + 2*queries <= seq_len, queries <= pairs)")
    g, dev = generator, generator.device     # drawn where the generator lives, then moved to `device`
    keys = 1 + torch.rand(batch, vocab.n_keys, generator=g, device=dev).argsort(dim=1)[:, :pairs]  # distinct
    values = 1 + vocab.n_keys + torch.randint(0, vocab.n_values, (batch, pairs), generator=g, device=dev)
    ids = torch.full((batch, seq_len), FILLER, dtype=torch.int64, device=dev)
    ids[:, 0:2 * pairs:2], ids[:, 1:2 * pairs:2] = keys, values
    # queries sit in 2-token slots after the pairs: key at the slot's first token, its value at the second
    n_slots = (seq_len - 2 * pairs) // 2
    slot = torch.rand(batch, n_slots, generator=g, device=dev).argsort(dim=1)[:, :queries]  # (batch, queries)
    which = torch.rand(batch, pairs, generator=g, device=dev).argsort(dim=1)[:, :queries]   # pair each asks
    qpos = 2 * pairs + 2 * slot
    ids.scatter_(1, qpos, keys.gather(1, which))
    ids.scatter_(1, qpos + 1, values.gather(1, which))
    targets = torch.full_like(ids, -100)
    targets.scatter_(1, qpos, values.gather(1, which))
    return ids.to(device), targets.to(device)


def passkey_batch(batch: int, seq_len: int, depth: float, vocab: Vocab, generator: torch.Generator,
                  device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One key-value pair at fraction `depth` of the filler, its key again as the last token (the target)."""
    g, dev = generator, generator.device
    keys = 1 + torch.randint(0, vocab.n_keys, (batch,), generator=g, device=dev)
    values = 1 + vocab.n_keys + torch.randint(0, vocab.n_values, (batch,), generator=g, device=dev)
    at = min(int(depth * (seq_len - 3)), seq_len - 3)
    ids = torch.full((batch, seq_len), FILLER, dtype=torch.int64, device=dev)
    ids[:, at], ids[:, at + 1], ids[:, -1] = keys, values, keys
    targets = torch.full_like(ids, -100)
    targets[:, -1] = values
    return ids.to(device), targets.to(device)


# ---------------------------------------------------------------------------------------------- training

def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def accuracy(model: HybridLM, make_batch, n_batches: int, device: torch.device) -> float:
    """Fraction of target positions where the argmax is the target. make_batch() -> (ids, targets)."""
    right = total = 0
    for _ in range(n_batches):
        ids, targets = make_batch()
        with _autocast(device):
            pred = model(ids).argmax(-1)
        mask = targets != -100
        right += int((pred[mask] == targets[mask]).sum())
        total += int(mask.sum())
    return right / max(1, total)


def train_mqar(layout: Layout, args, lr: float, device: torch.device, seed: int = 0,
               label: str = "") -> tuple[HybridLM, list]:
    """A fresh model trained on MQAR: AdamW with the trainer's parameter groups and schedule (training.optim):
    linear warm-up over 10% of the steps, cosine decay to 10%.
    Batches are drawn on `device` and the loss is read back only at the ten progress lines, so a small model
    on a GPU is not held up by the host. Returns the model and the mean loss of each tenth of training."""
    torch.manual_seed(seed)
    model = HybridLM(layout).to(device).train()
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lr, betas=(0.9, 0.98),
                            fused=device.type == "cuda")
    g = torch.Generator(device).manual_seed(seed + 1)
    pick = random.Random(seed + 2)
    vocab = Vocab(args.vocab)
    warm = every = max(1, args.steps // 10)   # warm-up steps; steps between progress lines
    total, losses, t0 = torch.zeros((), device=device), [], time.perf_counter()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, lr, warmup=warm, min_lr_ratio=0.1)
        ids, targets = mqar_batch(args.batch, pick.choice(args.train_pairs), args.train_len, vocab, g,
                                  device=device)
        with _autocast(device):
            loss = lm_loss(model(ids), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        total += loss.detach()
        if (step + 1) % every == 0 or step + 1 == args.steps:
            n = (step % every) + 1
            losses.append(total.item() / n)
            total.zero_()
            print(f"  {label or layout.name} lr {lr:g} step {step + 1:6d}  loss {losses[-1]:.3f}  "
                  f"{1e3 * (time.perf_counter() - t0) / (step + 1):.1f} ms/step", flush=True)
    return model.eval(), losses


def non_embedding_params(layout: Layout) -> int:
    b = budget(layout)
    return b.params - b.embedding_params - b.lm_head_params


def recall_layouts(args) -> list[tuple[str, Layout]]:
    """(label, layout) per --layouts entry, sized to the first one's non-embedding parameters."""
    common = [f"model.vocab_size={args.vocab}", f"model.max_seq_len={args.train_len}"] + list(args.set)
    if args.window:
        common.append(f"defaults.attention.window={args.window}")
    first = sized_layout(args.layouts[0], common, args.d_model, args.head_dim)
    out = [(args.layouts[0], first)]
    for spec in args.layouts[1:]:
        if args.no_match:
            out.append((spec, sized_layout(spec, common, args.d_model, args.head_dim)))
        else:
            out.append((spec, match_params(spec, non_embedding_params(first), common, args.head_dim,
                                           step=args.head_dim, key=non_embedding_params)))
    return out


# -------------------------------------------------------------------------------------------- text passkey

PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def text_passkey(model: HybridLM, tok, length: int, depth: float, rng: random.Random, digits: int = 5) -> bool:
    """One text passkey trial of about `length` tokens; True when the greedy continuation starts with the key."""
    from hybrid.generate import generate
    key = "".join(rng.choice("0123456789") for _ in range(digits))
    needle = tok.encode(f"The pass key is {key}. Remember it. {key} is the pass key. ")
    question = tok.encode("What is the pass key? The pass key is")
    filler = tok.encode(PASSKEY_FILLER)
    n_fill = max(0, length - len(needle) - len(question))
    fill = (filler * (n_fill // len(filler) + 1))[:n_fill]
    at = int(depth * len(fill))
    prompt = fill[:at] + needle + fill[at:] + question
    out = generate(model, [prompt], max_new_tokens=digits + 3)[0]
    return "".join(c for c in tok.decode(out) if c.isdigit()).startswith(key)


# ------------------------------------------------------------------------------------------------- main

def train_and_measure(label: str, layout: Layout, lr: float, args, device: str) -> dict:
    """One work unit: train `layout` at `lr`, then score it on the MQAR grid and the token passkey. Returns
    plain data (no model), so that units can run in separate processes."""
    device = torch.device(device)
    if device.type == "cpu" and args.jobs > 1:
        torch.set_num_threads(1)
    vocab = Vocab(args.vocab)
    t0 = time.perf_counter()
    model, losses = train_mqar(layout, args, lr, device, seed=args.seed, label=label)
    train_s = time.perf_counter() - t0
    g = torch.Generator(device).manual_seed(args.seed + 7)
    acc = accuracy(model, lambda: mqar_batch(args.eval_batch, max(args.train_pairs), args.train_len, vocab, g,
                                             device=device), args.eval_batches, device)
    print(f"{label}: lr {lr:g}  final loss {losses[-1]:.3f}  accuracy {acc:.3f} ({train_s:.0f} s)", flush=True)
    row = dict(label=label, d_model=layout.model.d_model, params=budget(layout).params,
               non_embedding=non_embedding_params(layout), lr=lr, loss=losses[-1], losses=losses, acc=acc,
               train_s=train_s)
    grid, passkey = [], []
    g = torch.Generator(device).manual_seed(args.seed + 11)
    for length in args.lengths:
        for pairs in args.pairs:
            if 4 * pairs > length:
                continue
            a = accuracy(model, lambda: mqar_batch(args.eval_batch, pairs, length, vocab, g, device=device),
                         args.eval_batches, device)
            grid.append(dict(label=label, pairs=pairs, length=length, acc=a))
    for length in args.passkey_lengths:
        for depth in args.depths:
            a = accuracy(model, lambda: passkey_batch(args.eval_batch, length, depth, vocab, g, device=device),
                         args.eval_batches, device)
            passkey.append(dict(label=label, length=length, depth=depth, acc=a))
    return dict(model=row, grid=grid, passkey=passkey)


# what a unit's result depends on, besides its layout and lr (not --jobs, --device, --out, --cache)
UNIT_ARGS = ("vocab", "train_len", "train_pairs", "steps", "batch", "weight_decay", "seed", "pairs", "lengths",
             "passkey_lengths", "depths", "eval_batch", "eval_batches")


def unit_key(label: str, layout: Layout, lr: float, args) -> str:
    return json.dumps([label, repr(layout), lr, [getattr(args, k) for k in UNIT_ARGS]])


def load_cache(path: Optional[str]) -> dict:
    """{unit_key: result} from a JSON-lines file of earlier units (missing file: empty). A line that is not
    such a record raises DataError naming the file and line."""
    if not path or not os.path.exists(path):
        return {}
    out = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                out[rec["key"]] = rec["result"]
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"--cache {path}:{n}: not a record of this command (expected a JSON object with "
                                f"'key' and 'result'; {type(e).__name__}: {e})") from None
    return out


def lrs_of(label: str, args) -> list:
    """The learning rates swept for one layout: its --layout-lr entry, else --lr."""
    return args.layout_lr.get(label, args.lr)


def run(args) -> dict:
    device = pick_device(args.device)
    if args.jobs is None:
        args.jobs = 4 if device.type == "cuda" else 1
    res = {"device": device, "models": [], "runs": [], "grid": [], "passkey": [], "text_passkey": [], "cached": 0}
    layouts = recall_layouts(args)
    cache = load_cache(args.cache)
    passkey_lm = None
    if args.passkey_ckpt:   # loaded before any training, so that a bad checkpoint is reported at once
        from .perplexity import load_checkpoint
        passkey_lm = load_checkpoint(args.passkey_ckpt, device)
    every = [(label, layout, lr) for label, layout in layouts for lr in lrs_of(label, args)]
    keys = [unit_key(*unit, args) for unit in every]
    from_cache = [cache[k] for k in keys if k in cache]
    units = [unit for unit, k in zip(every, keys) if k not in cache and (not args.only or unit[0] in args.only)]
    if cache:
        print(f"{len(from_cache)} of {len(every)} (layout, lr) units are in {args.cache}; "
              f"training {len(units)}", flush=True)

    if args.cache:
        os.makedirs(os.path.dirname(os.path.abspath(args.cache)), exist_ok=True)

    def keep(unit, d):   # each unit is written as it finishes, so a cut-off sweep loses only unfinished ones
        if args.cache:
            with open(args.cache, "a") as f:
                f.write(json.dumps({"key": unit_key(*unit, args), "result": d}) + "\n")
        return d
    if args.jobs > 1 and len(units) > 1:
        # Small models leave a GPU mostly idle while the host enqueues kernels: units in separate processes
        # share it (and the host's cores) instead of waiting for each other.
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed
        with ProcessPoolExecutor(min(args.jobs, len(units)), mp_context=multiprocessing.get_context("spawn")) as ex:
            futures = {ex.submit(train_and_measure, *unit, args, str(device)): unit for unit in units}
            done = [keep(futures[f], f.result()) for f in as_completed(futures)]
    else:
        done = [keep(unit, train_and_measure(*unit, args, str(device))) for unit in units]
    res["cached"] = len(from_cache)
    done += from_cache
    order = {(lab, lr): i for i, (lab, _, lr) in enumerate(every)}
    done.sort(key=lambda d: order[d["model"]["label"], d["model"]["lr"]])
    for label, _ in layouts:
        mine = [d for d in done if d["model"]["label"] == label]
        if not mine:   # left out by --only and not in the cache
            continue
        res["runs"] += [d["model"] for d in mine]
        best = max(mine, key=lambda d: d["model"]["acc"])   # the first on ties: --lr order
        res["models"].append(best["model"])
        res["grid"] += best["grid"]
        res["passkey"] += best["passkey"]
    if passkey_lm is not None:
        model, tok = passkey_lm
        rng = random.Random(args.seed)
        for length in args.passkey_lengths_text:
            hits = [text_passkey(model, tok, length, d, rng) for d in args.depths for _ in range(args.text_trials)]
            res["text_passkey"].append(dict(length=length, acc=sum(hits) / len(hits), n=len(hits)))
    return res


def report(res: dict, args, argv) -> str:
    models = md_table(["layout", "d_model", "params", "non-embedding", "lr", "final loss",
                       f"accuracy ({max(args.train_pairs)} pairs, {args.train_len} tokens)"],
                      [(m["label"], m["d_model"], f"{m['params'] / 1e6:.2f}M", f"{m['non_embedding'] / 1e6:.3f}M",
                        f"{m['lr']:g}", f"{m['loss']:.3f}", f"{100 * m['acc']:.1f}%") for m in res["models"]])
    cols = sorted({(r["pairs"], r["length"]) for r in res["grid"]}, key=lambda c: (c[1], c[0]))
    grid = md_table(["layout"] + [f"{p} pairs @ {l}" for p, l in cols],
                    [[m["label"]] + [next((f"{100 * r['acc']:.1f}" for r in res["grid"] if r["label"] == m["label"]
                                           and (r["pairs"], r["length"]) == c), "-") for c in cols]
                     for m in res["models"]])
    pk_cols = sorted({r["length"] for r in res["passkey"]})
    pk_depth_cols = sorted({(r["length"], r["depth"]) for r in res["passkey"]})

    def pk_mean(label, length):  # mean over depths
        accs = [r["acc"] for r in res["passkey"] if r["label"] == label and r["length"] == length]
        return sum(accs) / max(1, len(accs))
    passkey = md_table(["layout"] + [f"{l} @ depth {d:g}" for l, d in pk_depth_cols],
                       [[m["label"]] + [next(f"{100 * r['acc']:.1f}" for r in res["passkey"]
                                             if r["label"] == m["label"] and (r["length"], r["depth"]) == c)
                                        for c in pk_depth_cols] for m in res["models"]])
    runs = md_table(["layout", "lr", "final loss", "accuracy", "training time"],
                    [(r["label"], f"{r['lr']:g}", f"{r['loss']:.3f}", f"{100 * r['acc']:.1f}%", f"{r['train_s']:.0f} s")
                     for r in res["runs"]])
    labels = [m["label"] for m in res["models"]]
    # length plot: the most pairs trained on that was evaluated (else the most evaluated)
    trained = [p for p in args.pairs if p <= max(args.train_pairs)]
    top = max(trained or args.pairs)

    def tenths(losses):   # the step at the end of each logged tenth of training
        every = max(1, args.steps // 10)
        return [min(args.steps, every * (i + 1)) for i in range(len(losses))]
    plots = [png_beside(args.out, name) for name in ("mqar_loss", "mqar", "mqar_pairs", "passkey")]
    line_plot(plots[0], {m["label"]: (tenths(m["losses"]), m["losses"]) for m in res["models"]},
              xlabel="training step", ylabel="MQAR training loss (mean over the last tenth)", logy=True,
              title=f"MQAR training loss, best lr per layout (batch {args.batch})")
    line_plot(plots[1], {lab: ([r["length"] for r in res["grid"] if r["label"] == lab and r["pairs"] == top],
                               [r["acc"] for r in res["grid"] if r["label"] == lab and r["pairs"] == top])
                         for lab in labels},
              xlabel="sequence length (tokens)", ylabel="MQAR accuracy", logx=True, hline=0.99, ylim=(0, 1.02),
              title=f"MQAR, {top} key-value pairs (trained at {args.train_len} tokens)")
    line_plot(plots[2], {lab: ([r["pairs"] for r in res["grid"] if r["label"] == lab and r["length"] == args.train_len],
                               [r["acc"] for r in res["grid"] if r["label"] == lab and r["length"] == args.train_len])
                         for lab in labels},
              xlabel="key-value pairs", ylabel="MQAR accuracy", logx=True, hline=0.99, ylim=(0, 1.02),
              title=f"MQAR accuracy vs pairs at {args.train_len} tokens")
    line_plot(plots[3], {lab: (pk_cols, [pk_mean(lab, l) for l in pk_cols]) for lab in labels},
              xlabel="sequence length (tokens)", ylabel="token passkey accuracy", logx=True, ylim=(0, 1.02),
              title=f"token passkey (trained on MQAR at {args.train_len} tokens)")
    body = (f"MQAR: vocabulary {args.vocab} (keys {Vocab(args.vocab).n_keys}, values {Vocab(args.vocab).n_values}), "
            f"trained {args.steps} steps x batch {args.batch} at {args.train_len} tokens with "
            f"{', '.join(map(str, args.train_pairs))} pairs; accuracy over {args.eval_batches} x {args.eval_batch} "
            "fresh sequences (each query's answer scored). Chance is 1 / number of values. Layouts after the "
            "first are resized to its non-embedding parameters"
            + (" (disabled: --no-match)" if args.no_match else "") + "."
            + (f" {res['cached']} of the {len(res['runs'])} (layout, lr) runs were read from `{args.cache}`, "
               "trained by earlier runs of this command with the same settings (their training times are "
               "from those runs)." if res["cached"] else "")
            + "\n\n## Trained models\n\n" + models
            + "\n\nEvery (layout, lr) run; the table above keeps each layout's most accurate one.\n\n" + runs
            + "\n\n## MQAR accuracy (%) by pairs and length\n\n" + grid
            + "\n\n## Token passkey accuracy (%) by length and depth\n\n"
            "One key-value pair in filler, its key as the last token; out of the training distribution in "
            "position, so it measures how far one association is carried, not a language ability. Depth is where the "
            "pair sits, as a fraction of the length: MQAR training always puts pairs first (depth 0), so other "
            "depths are also out of distribution in where the pair is. The plot shows the mean over depths.\n\n"
            + passkey)
    if res["text_passkey"]:
        body += (f"\n\n## Text passkey: `{args.passkey_ckpt}`\n\nExact match of the greedy continuation's "
                 "digits. A model pretrained only on the embedded corpus has never seen this task.\n\n"
                 + md_table(["length (tokens)", "trials", "exact match"],
                            [(r["length"], r["n"], f"{100 * r['acc']:.0f}%") for r in res["text_passkey"]]))
    body += "\n\n## Plots\n\n" + plot_links(plots)
    return write_result(args.out, "Recall: MQAR and passkey", res["device"], body, argv, "eval.recall")


def parse_args(argv: Optional[Sequence[str]] = None):
    ap = argparse.ArgumentParser(prog="python -m eval.recall", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", nargs="+", default=["mamba2:M2 x 4", "transformer:Ag x 4",
                                                     "mamba2:M2 M2 Ag M2", "mamba2:M2 Aw M2 Aw"],
                    help="NAME[:PATTERN] per model; the first sets the size the others are matched to")
    ap.add_argument("--set", nargs="*", default=[], help="dotlist overrides applied to every layout")
    ap.add_argument("--d-model", type=int, default=128, help="d_model of the first layout")
    ap.add_argument("--head-dim", type=int, default=32, help="attention head size (heads = d_model // head-dim)")
    ap.add_argument("--window", type=int, default=64, help="window of local attention layers")
    ap.add_argument("--no-match", action="store_true", help="keep --d-model for every layout")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--train-len", type=int, default=256)
    ap.add_argument("--train-pairs", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2],
                    help="one or more learning rates; each layout keeps its best")
    ap.add_argument("--layout-lr", nargs="+", default=[], metavar="LABEL=LR[,LR...]",
                    help="learning rates for one --layouts label instead of --lr (e.g. 'mamba2:M2 x 4=1e-2')")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--pairs", type=int, nargs="+", default=[4, 16, 64, 128], help="pair counts evaluated")
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024], help="lengths evaluated")
    ap.add_argument("--passkey-lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.5])
    ap.add_argument("--eval-batch", type=int, default=64)
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--passkey-ckpt", default=None, help="a train.py checkpoint for the text passkey")
    ap.add_argument("--passkey-lengths-text", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--text-trials", type=int, default=5, help="text passkey trials per length and depth")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=None,
                    help="train this many (layout, lr) units at once in separate processes, sharing the device "
                         "(default: 4 on a GPU, 1 on the CPU)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--cache", default=None,
                    help="JSON-lines file of finished (layout, lr) units: units found there with the same "
                         "settings are not trained again, new ones are appended (split a sweep over runs)")
    ap.add_argument("--only", nargs="+", default=None,
                    help="train only these --layouts labels (the rest are sized as usual and come from --cache "
                         "when there)")
    add_out_argument(ap, "recall", "recall")
    ap.add_argument("--quick", action="store_true", help="tiny CPU run through every code path")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = ap.parse_args(argv)
    layout_lr = {}
    for item in args.layout_lr:
        label, sep, lrs = item.rpartition("=")
        try:
            layout_lr[label] = [float(x) for x in lrs.split(",")]
        except ValueError:
            sep = ""
        if not sep or label not in args.layouts:
            raise ConfigError(f"--layout-lr {item!r}: expected LABEL=LR[,LR...] with LABEL one of --layouts "
                              f"({', '.join(args.layouts)})")
    args.layout_lr = layout_lr
    if args.quick:
        if args.layouts == ap.get_default("layouts"):
            args.layouts = ["mamba2:M2", "transformer:Ag", "griffin:M2 Aw"]
        if args.lr == ap.get_default("lr"):
            args.lr = [3e-3]
        args.set = args.set + ["defaults.mamba2.headdim=16", "defaults.mamba2.d_state=16",
                               "defaults.mamba2.chunk_size=16", "defaults.mlp.d_ff=64"]
        args.d_model, args.head_dim, args.window, args.vocab = 32, 16, 8, 64
        args.train_len, args.train_pairs, args.steps, args.batch = 32, [2, 4], 3, 8
        args.pairs, args.lengths, args.eval_batch, args.eval_batches = [2, 4], [32, 64], 8, 1
        args.passkey_lengths, args.depths = [32, 128], [0.0]
        args.passkey_lengths_text, args.text_trials = [48], 1
    check_args(args)
    return args


def check_args(args) -> None:
    """ConfigError naming the option when the settings cannot make the sequences asked for."""
    require_positive(d_model=args.d_model, head_dim=args.head_dim, vocab=args.vocab, train_len=args.train_len,
                     train_pairs=args.train_pairs, steps=args.steps, batch=args.batch, lr=args.lr, pairs=args.pairs,
                     lengths=args.lengths, passkey_lengths=args.passkey_lengths, eval_batch=args.eval_batch,
                     eval_batches=args.eval_batches, passkey_lengths_text=args.passkey_lengths_text,
                     text_trials=args.text_trials, jobs=args.jobs,
                     layout_lr=[lr for lrs in args.layout_lr.values() for lr in lrs])
    if args.only and not set(args.only) <= set(args.layouts):
        raise ConfigError(f"--only {sorted(set(args.only) - set(args.layouts))}: not among --layouts "
                          f"({', '.join(args.layouts)})")
    n_keys = Vocab(args.vocab).n_keys
    too_many = [p for p in args.train_pairs + args.pairs if p > n_keys]
    if too_many:
        raise ConfigError(f"--vocab {args.vocab}: {n_keys} keys, too few for {max(too_many, default=1)} pairs "
                          f"(--train-pairs / --pairs need distinct keys; keys are (vocab - 1) // 2)")
    if 4 * max(args.train_pairs) > args.train_len:
        raise ConfigError(f"--train-pairs {max(args.train_pairs)}: does not fit in --train-len {args.train_len} "
                          "(the pairs and as many queries take 4 tokens each: need 4 * pairs <= train-len)")
    if min(args.passkey_lengths) < 3:
        raise ConfigError(f"--passkey-lengths {min(args.passkey_lengths)}: a passkey sequence needs at least 3 tokens")
    if any(not 0 <= d <= 1 for d in args.depths):
        raise ConfigError(f"--depths {args.depths}: expected fractions of the length in [0, 1]")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    check_out(args.out)
    res = run(args)
    print(report(res, args, argv))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
