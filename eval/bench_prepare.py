"""Throughput of the data preparation command (training/prepare.py) against the single-process path of train.py.

    python -m eval.bench_prepare [--copies 48 | --input PATH] [--tokenizer TOK.model] [--repeat 3] [--out FILE.md]

The corpus: `--input` (a file or directory, e.g. the train.jsonl that `python -m eval.corpus` builds), else
`--copies` .jsonl files, each holding every other document of the embedded corpus (training/data.py
default_corpus; about 0.7 MB per copy), so that it is the same on any machine with the same Python. The
tokenizer: `--tokenizer`, else one trained on the embedded corpus (4,096 pieces) in a temporary directory.
Rows: the prepare command on 1 core (the process pinned to one CPU), and on all cores with one worker per core
and with one worker (sentencepiece's own threads); the single-process path (load_texts + encode_batch + one
shard, what `train.py train.data=DIR` does before training). Each is a fresh process, timed wall-clock, median
of `--repeat`; MB/s counts the input files' bytes, tokens/s the tokens written. Each command is also timed on a
one-document file (`startup s`: interpreter, imports, tokenizer load, worker pool, manifest), and the last column
divides the speed-up over one core by the cores with that startup taken off both: the scaling a corpus far larger
than the benchmark's would see. Runs on the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

from eval.plots import add_out_argument, check_out, md_table, require_positive, write_result
from hybrid.errors import cli

SINGLE = """import sys
from training.data import TokenStream, load_texts
from training.tokenizer import Tokenizer
tok = Tokenizer(sys.argv[2])
TokenStream.from_docs(tok.encode_batch(load_texts(sys.argv[1])), tok.eos_id).save(sys.argv[3], tok.vocab_size)
"""


def build_corpus(root: str, copies: int) -> int:
    """`copies` .jsonl files of every other embedded document (offset by the copy); returns the bytes."""
    from training.data import default_corpus
    docs = default_corpus()
    os.makedirs(root, exist_ok=True)
    for c in range(copies):
        with open(os.path.join(root, f"part{c:04d}.jsonl"), "w") as f:
            for i, d in enumerate(docs):
                if (i + c) % 2 == 0:
                    f.write(json.dumps({"text": d}) + "\n")
    return sum(os.path.getsize(os.path.join(root, n)) for n in os.listdir(root))


def timed(cmd: list[str], repeat: int, cpus: Optional[set] = None, clean: Optional[str] = None) -> float:
    """Median wall seconds of the command as a fresh process (pinned to `cpus` when given)."""
    import shutil
    times = []
    for _ in range(repeat):
        if clean:
            shutil.rmtree(clean, ignore_errors=True)
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, preexec_fn=pin)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _commands(tok: str, work: str, cores: int) -> list:
    """(row name, cores, command of (input, out dir), CPUs to pin to or None, whether it writes the out dir) for
    each benchmarked command; the single-process path writes its one shard under `work`."""
    def prep(workers: int):
        return lambda inp, out: [sys.executable, "-m", "training.prepare", inp, "--tokenizer", tok, "--out", out,
                                 "--workers", str(workers)]
    def single(inp, out):
        return [sys.executable, "-c", SINGLE, inp, tok, os.path.join(work, "single")]
    return [("prepare, 1 core", 1, prep(1), {min(os.sched_getaffinity(0))}, True),
            (f"prepare, {cores} cores, 1 worker", cores, prep(1), None, True),
            (f"prepare, {cores} cores, {cores} workers", cores, prep(cores), None, True),
            (f"single process (train.py's path), {cores} cores", cores, single, None, False)]


def _excluded(base_work: float, work: float, cores: int) -> str:
    """Speed-up per core with the startup taken off both runs; '-' where the run is all startup."""
    return f"{base_work / work / cores:.2f}" if work > 0.05 and base_work > 0 else "-"


def run(args) -> str:
    from training.data import default_corpus, split_documents
    from training.tokenizer import Tokenizer
    work = tempfile.mkdtemp(prefix="bench_prepare.")
    if args.input:
        from training.prepare import _size, find_inputs
        corpus = args.input
        nbytes = sum(_size(p) for p in find_inputs([corpus]))
        what = f"{corpus}"
    else:
        corpus = os.path.join(work, "corpus")
        nbytes = build_corpus(corpus, args.copies)
        what = f"{args.copies} .jsonl files (the embedded corpus, every other document per copy)"
    tok = args.tokenizer or os.path.join(work, "tok.model")
    if not args.tokenizer:
        Tokenizer.train(split_documents(default_corpus(), 0.05, 0)[0], 4096, tok)
    cores = len(os.sched_getaffinity(0))
    tiny = os.path.join(work, "startup.jsonl")
    with open(tiny, "w") as f:
        f.write(json.dumps({"text": "One short document."}) + "\n")
    out, out_tiny = os.path.join(work, "out"), os.path.join(work, "out_tiny")
    rows = []
    for name, c, cmd, cpus, writes in _commands(tok, work, cores):
        wall = timed(cmd(corpus, out), args.repeat, cpus, out if writes else None)
        start = timed(cmd(tiny, out_tiny), args.repeat, cpus, out_tiny if writes else None)
        rows.append((name, c, wall, start))
    with open(os.path.join(out, "manifest.json")) as f:
        tokens = sum(v["tokens"] for v in json.load(f)["totals"].values())
    base, base_start = rows[0][2], rows[0][3]
    table = [(name, c, f"{t:.2f}", f"{s:.2f}", f"{nbytes / 1e6 / t:.2f}", f"{tokens / t:,.0f}", f"{base / t:.2f}x",
              f"{base / t / c:.2f}", _excluded(base - base_start, t - s, c)) for name, c, t, s in rows]
    tok_what = "given" if args.tokenizer else "trained here, 4,096 pieces"
    body = (f"Corpus: {what}, {nbytes / 1e6:.1f} MB, {tokens:,} tokens; tokenizer {tok_what}; "
            f"median of {args.repeat} runs, each a fresh process (Python and torch import included).\n\n"
            + md_table(["command", "cores", "wall s", "startup s", "MB/s", "tokens/s", "vs 1 core",
                        "per core (1 = linear)", "per core, startup excluded"], table))
    import torch
    return write_result(args.out, "Data preparation throughput", torch.device("cpu"), body, args.argv,
                        "eval.bench_prepare")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="python -m eval.bench_prepare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=48, help="copies of the embedded corpus (default: 48)")
    ap.add_argument("--input", help="a file or directory to prepare instead of the copies (e.g. eval.corpus's "
                                    "train.jsonl)")
    ap.add_argument("--tokenizer", help="a sentencepiece .model (default: train one here)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per row (default: 3)")
    add_out_argument(ap, "bench_prepare", "prepare")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = ap.parse_args(argv)
    args.argv = argv
    require_positive(copies=args.copies, repeat=args.repeat)
    check_out(args.out)
    print(run(args))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
