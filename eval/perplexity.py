"""Held-out perplexity of a checkpoint, overall and by token position (does loss keep falling with context?).

    python -m eval.perplexity CKPT [--seq-len 4096] [--max-tokens 2000000]   # writes runs/eval/perplexity/
    python -m eval.perplexity CKPT --data my_heldout.jsonl        # text / .jsonl / directory, tokenized here
    python -m eval.perplexity CKPT --out eval/results/perplexity.md   # update the recorded results

CKPT is a checkpoint directory written by train.py (model.safetensors, layout.yaml, tokenizer.model,
trainer.json). By default the held-out shard of the run that wrote it is used: <out_dir>/data/*/heldout.bin,
out_dir being two levels up from CKPT. Non-overlapping windows of `--seq-len` tokens are cut from the stream
and packed as in training: a document boundary resets Mamba states and masks attention, so a token's
position is its offset in its own document, i.e. the context the model actually had. Losses are bucketed
by that position in powers of two ([0, 1), [1, 2), [2, 4), ...). A `--seq-len` past the training length
measures length extrapolation, but only documents at least that long can fill the late buckets, so the
table gives the token count of every bucket.

Writes `--out` (markdown: device, date, command, tables; default runs/eval/perplexity/perplexity.md under the
current directory) and the loss-by-position plot beside it (needs matplotlib: `pip install -e ".[plots]"`;
without it the markdown says the plot was not drawn), and prints the path.
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import sys
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from training import checkpoint
from training.data import TokenStream, load_texts, packed_batch
from hybrid.errors import CheckpointError, DataError, cli
from hybrid.model import HybridLM
from training.tokenizer import Tokenizer

from .plots import (add_out_argument, check_out, line_plot, md_table, pick_device, plot_links, png_beside,
                    require_positive, write_result)


def load_checkpoint(ckpt: str, device=None, dtype=torch.float32) -> tuple[HybridLM, Tokenizer]:
    """(model in eval mode, tokenizer) from a train.py checkpoint directory; CheckpointError (naming the file)
    when it is unusable or has no tokenizer.model."""
    model, tok_path = checkpoint.load_checkpoint(ckpt, device, dtype)
    if tok_path is None:
        raise CheckpointError(f"{os.path.join(ckpt, checkpoint.TOKENIZER)}: missing (evaluation needs the "
                              "checkpoint's sentencepiece tokenizer)")
    return model, Tokenizer(tok_path)


def heldout_stream(ckpt: str, tok: Tokenizer, data: Optional[str]) -> tuple[TokenStream, str]:
    """The stream to evaluate and a description of where it came from. A `--data` path that cannot be read,
    or a run with no held-out shard, raises DataError naming the path."""
    if data:
        return data_stream(data, tok)
    out_dir = os.path.dirname(os.path.dirname(os.path.abspath(ckpt)))
    found = sorted(glob.glob(os.path.join(out_dir, "data", "*", "heldout.bin")), key=os.path.getmtime)
    if checkpoint.is_complete(ckpt) and not found:
        cfg = checkpoint.read_meta(ckpt).get("config", {})
        raise DataError(f"{ckpt}: no held-out shard under {out_dir}/data/*/heldout.bin (the run's "
                        f"train.out_dir={cfg.get('out_dir')!r}); pass --data")
    if not found:
        raise DataError(f"{ckpt}: no held-out shard under {out_dir}/data/*/heldout.bin; pass --data")
    return TokenStream.load(found[-1][:-4], tok.vocab_size), os.path.relpath(found[-1])


def check_data_path(data: str) -> None:
    """DataError when `--data` names nothing, or a .bin shard without the .starts.npy written beside it."""
    if not os.path.exists(data):
        raise DataError(f"--data {data}: no such file or directory (expected a heldout.bin shard, a text or "
                        ".jsonl file, or a directory of .txt / .md / .jsonl files)")
    if data.endswith(".bin") and os.path.isfile(data) and not os.path.isfile(data[:-4] + ".starts.npy"):
        raise DataError(f"--data {data}: a .bin shard needs {os.path.basename(data[:-4])}.starts.npy beside it "
                        "(train.py writes both)")


def data_stream(data: str, tok: Tokenizer) -> tuple[TokenStream, str]:
    """`--data`: a heldout.bin shard (with its .starts.npy), or text / .jsonl / a directory, tokenized here."""
    check_data_path(data)
    if data.endswith(".bin") and os.path.isfile(data):
        return TokenStream.load(data[:-4], tok.vocab_size), data
    try:
        docs = load_texts(data)
    except (ValueError, OSError) as e:  # a bad .jsonl line, undecodable bytes, an empty directory, ...
        raise DataError(f"--data {data}: cannot be read as text ({e})") from None
    return TokenStream.from_docs(tok.encode_batch(docs), tok.eos_id), f"{data} ({len(docs)} documents)"


def bucket_edges(seq_len: int) -> list[int]:
    """[0, 1, 2, 4, ..., seq_len]: bucket i holds positions edges[i] <= p < edges[i + 1]."""
    edges = [0, 1]
    while edges[-1] < seq_len:
        edges.append(min(edges[-1] * 2, seq_len))
    return edges


@torch.no_grad()
def evaluate(model: HybridLM, stream: TokenStream, seq_len: int, batch: int, max_tokens: int,
             device: torch.device) -> dict:
    """Loss sums and counts by position bucket over non-overlapping windows. Returns {'edges', 'loss_sum',
    'count'} (numpy arrays per bucket) and 'tokens'."""
    seq_len = min(seq_len, len(stream) - 2)
    if seq_len < 2:
        raise DataError(f"held-out stream of {len(stream)} tokens is too short (at least 4 are needed)")
    n_windows = max(1, min((len(stream) - 1) // seq_len, max_tokens // seq_len))
    starts = np.arange(n_windows, dtype=np.int64) * seq_len
    edges = bucket_edges(seq_len)
    loss_sum = np.zeros(len(edges) - 1)
    count = np.zeros(len(edges) - 1, dtype=np.int64)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for i in range(0, n_windows, batch):
        ids, targets, seq_idx = (t.to(device) for t in packed_batch(stream, starts[i:i + batch], seq_len))
        with autocast:
            logits = model(ids, seq_idx=seq_idx)
        nll = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-100, reduction="none")
        # context the token had: distance to the first token of its document within the window
        first = torch.searchsorted(seq_idx.contiguous(), seq_idx.contiguous(), side="left")
        pos = torch.arange(seq_len, device=device)[None] - first                 # (batch, seq_len)
        bucket = torch.bucketize(pos, torch.tensor(edges[1:], device=device), right=True)
        valid = targets != -100
        loss_sum += torch.zeros(len(edges) - 1, dtype=torch.float64, device=device).index_add_(
            0, bucket[valid], nll[valid].double()).cpu().numpy()
        count += torch.bincount(bucket[valid], minlength=len(edges) - 1).cpu().numpy()
    return {"edges": edges, "loss_sum": loss_sum, "count": count, "tokens": int(count.sum()), "seq_len": seq_len}


def report(res: dict, ckpt: str, source: str, out: str, device, argv) -> str:
    total = res["loss_sum"].sum() / max(1, res["count"].sum())
    rows, xs, ys = [], [], []
    edges = res["edges"]
    for i, (s, c) in enumerate(zip(res["loss_sum"], res["count"])):
        if c == 0:
            continue
        loss = s / c
        rows.append((f"[{edges[i]}, {edges[i + 1]})", f"{c:,}", f"{loss:.3f}", f"{math.exp(loss):.2f}"))
        xs.append(max(1, edges[i]))
        ys.append(loss)
    plot = png_beside(out, "by_position")
    line_plot(plot, {os.path.basename(os.path.normpath(ckpt)): (xs, ys)},
              xlabel="position in document (bucket start, tokens)", ylabel="held-out loss (nats/token)",
              logx=True, title=f"loss by context position ({os.path.basename(os.path.normpath(ckpt))})")
    body = (f"Checkpoint: `{ckpt}`  \nData: `{source}`  \nWindows of {res['seq_len']} tokens, "
            f"{res['tokens']:,} scored tokens.\n\n**Loss {total:.4f} nats/token, perplexity {math.exp(total):.2f}**"
            "\n\n## By position in the document\n\n"
            + md_table(["positions", "tokens", "loss", "ppl"], rows))
    body += "\n\n" + plot_links([plot], ["loss by position"])
    return write_result(out, "Held-out perplexity", device, body, argv, "eval.perplexity")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eval.perplexity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a checkpoint directory written by train.py")
    ap.add_argument("--data", default=None, help="a heldout.bin shard, or text / .jsonl / directory to tokenize")
    ap.add_argument("--seq-len", type=int, default=None, help="window length (default: the layout's max_seq_len)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=2_000_000)
    ap.add_argument("--device", default=None)
    add_out_argument(ap, "perplexity", "perplexity")
    ap.add_argument("--quick", action="store_true", help="at most 4 windows of at most 64 tokens (CPU check)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = ap.parse_args(argv)
    require_positive(seq_len=args.seq_len, batch=args.batch, max_tokens=args.max_tokens)
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    check_out(args.out)
    if args.data:
        check_data_path(args.data)   # before the checkpoint loads: a mistyped path is reported at once
    device = pick_device(args.device)
    model, tok = load_checkpoint(args.checkpoint, device)
    stream, source = heldout_stream(args.checkpoint, tok, args.data)
    if len(stream) < 4:
        raise DataError(f"{source}: {len(stream)} tokens, too few to evaluate (at least 4 are needed)")
    seq_len = args.seq_len or model.layout.model.max_seq_len
    max_tokens = args.max_tokens
    if args.quick:
        seq_len, max_tokens = min(seq_len, 64), min(max_tokens, 4 * min(seq_len, 64))
    res = evaluate(model, stream, seq_len, args.batch, max_tokens, device)
    print(report(res, args.checkpoint, source, args.out, device, argv))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
