"""Tokenize a corpus of any size into token shards once, on every CPU core, for `train.py train.data=DIR`.

    python -m training.prepare INPUT... --tokenizer TOK.model --out DIR [--workers N] [--heldout-fraction F]
    python -m training.prepare INPUT... --tokenizer NEW.model --train-tokenizer 32000 --out DIR

INPUT: files, directories (searched recursively) and glob patterns. Formats by name: .txt / .md (one document
per file), .jsonl, .jsonl.gz, .jsonl.zst (one document per line, its "text" field or --text-key; .zst needs the
`zstandard` package), .parquet (the --text-key column; needs `pyarrow`), and a directory saved by Hugging Face
`datasets` (`save_to_disk`: read with `load_from_disk`, no hub access; needs `datasets`).

Inputs are sorted and cut into work units (small files grouped; a large file alone, and a plain .jsonl file of
two units or more cut into byte ranges, each range reading the lines that start in it, so one huge file keeps
every core busy too; the unit size follows from the corpus size alone, see unit_size), tokenized by a pool of
worker processes, one per core. Unit i writes DIR/shards/i.train and i.heldout (TokenStream shards: tokens and
document starts) and, last, i.json with what it read (paths, sizes, sha256) and wrote (documents, tokens): a
unit whose .json is there is done, so a killed run picks up where it stopped, and nothing half-written is ever
mistaken for a finished shard (every file is written to a temporary name and renamed). Each document goes to
the held-out split by a hash of (seed, unit, its index in the unit): the shards are the same for any number of
workers. DIR/manifest.json, written when every unit is done, lists the inputs, the shards, the token counts
and the tokenizer (path and sha256); `train.py train.data=DIR` reads it and streams the shards from disk
(memory-mapped; nothing is loaded whole), with that tokenizer.

A file that cannot be read (not UTF-8, bad JSON, a truncated .gz) stops its unit with an error naming the file
and line; the other units' shards are kept, so after fixing or removing the file the same command finishes
the rest.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import io
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from hybrid.errors import ConfigError, DataError, cli

from .data import TokenStream
from .hashing import file_sha256, range_sha256  # noqa: F401  (re-exported: callers name them here)

MANIFEST = "manifest.json"
UNIT_BYTES = 64 << 20  # small files are grouped into units of at most about this many bytes ...
MIN_UNIT_BYTES = 1 << 20  # ... and at least this many, aiming at UNITS_PER_CORPUS units (see unit_size)
UNITS_PER_CORPUS = 256
FORMATS = (".txt", ".md", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
VERSION = 1


@dataclass(frozen=True)
class Unit:
    index: int
    files: tuple  # paths (or one Hugging Face dataset directory)
    span: Optional[tuple] = None  # (start, end) bytes of the one .jsonl file in `files`: the lines starting there


def _is_hf_dataset(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "dataset_info.json"))


def find_inputs(inputs: Sequence[str]) -> list[str]:
    """Every input file (and Hugging Face dataset directory), sorted, once. Raises DataError naming an input
    that matches nothing."""
    found: list[str] = []
    for item in inputs:
        if _is_hf_dataset(item):
            found.append(os.path.abspath(item))
        elif os.path.isdir(item):
            hits = []
            for root, dirs, files in os.walk(item):
                dirs.sort()
                hits += [os.path.join(root, f) for f in sorted(files) if f.endswith(FORMATS)]
            if not hits:
                raise DataError(f"{item}: no {', '.join(FORMATS)} files in this directory")
            found += [os.path.abspath(h) for h in hits]
        elif os.path.isfile(item):
            if not item.endswith(FORMATS):
                raise DataError(f"{item}: unknown format (expected one of {', '.join(FORMATS)} or a datasets "
                                "directory)")
            found.append(os.path.abspath(item))
        else:
            hits = sorted(h for h in glob.glob(item, recursive=True) if os.path.isfile(h) and h.endswith(FORMATS))
            if not hits:
                raise DataError(f"{item}: no such file or directory, and no {', '.join(FORMATS)} file matches it")
            found += [os.path.abspath(h) for h in hits]
    return sorted(dict.fromkeys(found))


def unit_size(total_bytes: int) -> int:
    """Bytes per unit: about UNITS_PER_CORPUS units (enough to keep every core busy), within
    [MIN_UNIT_BYTES, UNIT_BYTES]. It depends on the inputs only, never on the number of workers, so the shards
    are the same however many processes make them."""
    return int(min(UNIT_BYTES, max(MIN_UNIT_BYTES, total_bytes // UNITS_PER_CORPUS)))


def plan_units(paths: Sequence[str], unit_bytes: int = UNIT_BYTES) -> list[Unit]:
    """Units in input order: a file of unit_bytes or more (or a dataset) alone, a plain .jsonl file of two units
    or more in byte ranges of unit_bytes (the last one up to twice that), smaller files grouped."""
    units: list[Unit] = []
    group: list[str] = []
    size = 0
    for p in paths:
        n = 0 if os.path.isdir(p) else os.path.getsize(p)
        if os.path.isdir(p) or n >= unit_bytes:
            if group:
                units.append(Unit(len(units), tuple(group)))
                group, size = [], 0
            # ranges at fixed multiples of unit_bytes (the last one takes the rest): a file that grows at its end
            # changes only its last range, so the finished ones are kept on a rerun
            pieces = n // unit_bytes if p.endswith(".jsonl") else 1
            cuts = [i * unit_bytes for i in range(pieces)] + [n]
            units += [Unit(len(units) + i, (p,), (cuts[i], cuts[i + 1]) if pieces > 1 else None)
                      for i in range(pieces)]
            continue
        group.append(p)
        size += n
        if size >= unit_bytes:
            units.append(Unit(len(units), tuple(group)))
            group, size = [], 0
    if group:
        units.append(Unit(len(units), tuple(group)))
    return units


# ------------------------------------------------------------------------------------------------ reading

def _open_text(path: str):
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    if path.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{path}: reading .zst needs the zstandard package (pip install zstandard)") from None
        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")), encoding="utf-8")
    return open(path, encoding="utf-8")


def _row_text(line: str, where: Callable[[], str], text_key: str) -> str:
    """The text of one .jsonl line ("" for a blank line). where(): the line's path:number, asked only for an
    error."""
    if not line.strip():
        return ""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where()}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict) or not isinstance(row.get(text_key), str):
        raise DataError(f"{where()}: expected a JSON object with a string {text_key!r} field")
    return row[text_key]


def _jsonl_range(path: str, text_key: str, start: int, end: int) -> Iterator[str]:
    """The documents of the .jsonl lines that start at a byte in [start, end): a line that starts before
    `start` belongs to the range before, however far it reaches."""
    try:
        with open(path, "rb") as f:
            if start > 0:
                f.seek(start - 1)
                f.readline()  # the end of the line holding byte start - 1 (just its newline if it ends there)
            pos = f.tell()
            while pos < end:
                line = f.readline()
                if not line:
                    break
                where = lambda: f"{path}:{_line_at(path, pos)}"  # noqa: E731  (counted only for an error)
                try:
                    text = _row_text(line.decode("utf-8"), where, text_key)
                except UnicodeDecodeError as e:
                    raise DataError(f"{where()}: not UTF-8 text (byte {e.start})") from None
                if text.strip():
                    yield text
                pos = f.tell()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None


def _line_at(path: str, pos: int) -> int:
    """The 1-based number of the line that starts at byte `pos` (for error messages only: reads the bytes before)."""
    count = 1
    with open(path, "rb") as f:
        while pos > 0:
            block = f.read(min(pos, 1 << 20))
            if not block:
                break
            count += block.count(b"\n")
            pos -= len(block)
    return count


def documents(path: str, text_key: str = "text", span: Optional[tuple] = None) -> Iterator[str]:
    """The non-empty documents of one input (of its byte range `span` for a .jsonl file), in order. Raises
    DataError naming the file (and line)."""
    if span is not None:
        yield from _jsonl_range(path, text_key, *span)
        return
    if os.path.isdir(path):
        yield from _hf_documents(path, text_key)
        return
    if path.endswith(".parquet"):
        yield from _parquet_documents(path, text_key)
        return
    line_no = 0
    try:
        with _open_text(path) as f:
            if not path.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")):
                text = f.read()
                if text.strip():
                    yield text
                return
            for line_no, line in enumerate(f, 1):
                text = _row_text(line, lambda: f"{path}:{line_no}", text_key)
                if text.strip():
                    yield text
    except UnicodeDecodeError as e:
        raise DataError(f"{path}{f':{line_no + 1}' if line_no else ''}: not UTF-8 text (byte {e.start})") from None
    except (OSError, EOFError) as e:  # unreadable, or a truncated / corrupt compressed stream
        raise DataError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None


def _parquet_documents(path: str, text_key: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs the pyarrow package (pip install pyarrow)") from None
    try:
        table = pq.ParquetFile(path)
        if text_key not in table.schema_arrow.names:
            raise DataError(f"{path}: no {text_key!r} column (columns: {', '.join(table.schema_arrow.names)})")
        for batch in table.iter_batches(columns=[text_key]):
            for text in batch.column(0).to_pylist():
                if isinstance(text, str) and text.strip():
                    yield text
    except DataError:
        raise
    except Exception as e:  # pyarrow's own errors for a corrupt file
        raise DataError(f"{path}: cannot be read as parquet ({e})") from None


def _hf_documents(path: str, text_key: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: a saved datasets directory needs the datasets package (pip install datasets)") \
            from None
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[sorted(ds)[0]]
    if text_key not in ds.column_names:
        raise DataError(f"{path}: no {text_key!r} column (columns: {', '.join(ds.column_names)})")
    for text in ds[text_key]:
        if isinstance(text, str) and text.strip():
            yield text


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
    return os.path.getsize(path)


def unit_inputs(unit: Unit) -> list[dict]:
    """What a unit reads, as its record lists it: path and bytes (of its range, when it has one), and the range."""
    if unit.span is not None:
        return [{"path": unit.files[0], "bytes": unit.span[1] - unit.span[0], "range": list(unit.span)}]
    return [{"path": p, "bytes": _size(p)} for p in unit.files]


# ------------------------------------------------------------------------------------------------ workers

_TOKENIZER: dict = {}


def _tokenizer(path: str):
    if path not in _TOKENIZER:
        from .tokenizer import Tokenizer
        _TOKENIZER[path] = Tokenizer(path)
    return _TOKENIZER[path]


def heldout_mask(seed: int, unit: int, n: int, fraction: float) -> np.ndarray:
    """Which of a unit's n documents are held out: a hash of (seed, unit, index), so it does not depend on
    how units are spread over workers."""
    if fraction <= 0 or n == 0:
        return np.zeros(n, dtype=bool)
    idx = np.arange(n, dtype=np.uint64)
    x = idx * np.uint64(0x9E3779B97F4A7C15) ^ np.uint64((seed * 1000003 + unit * 7919) & 0xFFFFFFFFFFFFFFFF)
    x ^= x >> np.uint64(31)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(29)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


def shard_path(out: str, index: int) -> str:
    return os.path.join(out, "shards", f"{index:06d}")


def run_unit(unit: Unit, out: str, tokenizer: str, fraction: float, seed: int, text_key: str,
             settings: dict, threads: int = -1) -> dict:
    """Tokenize one unit into its train and held-out shards, then write its record (the unit is done)."""
    tok = _tokenizer(tokenizer)
    docs = [d for path in unit.files for d in documents(path, text_key, unit.span)]
    held = heldout_mask(seed, unit.index, len(docs), fraction)
    ids = tok.encode_batch(docs, num_threads=threads) if docs else []
    base = shard_path(out, unit.index)
    record = {"unit": unit.index, "settings": settings, "splits": {},
              "files": [{**f, "sha256": range_sha256(f["path"], *f["range"]) if "range" in f else file_sha256(f["path"])}
                        for f in unit_inputs(unit)]}
    for split, keep in (("train", ~held), ("heldout", held)):
        chosen = [t for t, k in zip(ids, keep) if k]
        TokenStream.from_docs(chosen, tok.eos_id).save(f"{base}.{split}", tok.vocab_size)
        record["splits"][split] = {"docs": len(chosen), "tokens": sum(len(t) + 1 for t in chosen)}
    tmp = f"{base}.json.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, base + ".json")
    return record


def _done(out: str, unit: Unit, settings: dict) -> Optional[dict]:
    """The unit's record if it finished for these same files (paths and sizes) and settings (tokenizer,
    held-out fraction, seed, text key), else None."""
    try:
        with open(shard_path(out, unit.index) + ".json") as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    listed = [{k: v for k, v in r.items() if k != "sha256"} for r in rec.get("files", [])]
    same = listed == unit_inputs(unit) and rec.get("settings") == settings
    shards = all(TokenStream.exists(f"{shard_path(out, unit.index)}.{s}") for s in ("train", "heldout"))
    return rec if same and shards else None


# ------------------------------------------------------------------------------------------------ driver

def sample_documents(paths: Sequence[str], budget_bytes: int, text_key: str = "text") -> list[str]:
    """Documents spread over every input for training a tokenizer: each file gives its first documents up to
    an equal share of `budget_bytes` (so a huge corpus is not read whole, and every source is represented)."""
    share = max(1, budget_bytes // max(1, len(paths)))
    out: list[str] = []
    for p in paths:
        taken = 0
        for d in documents(p, text_key):
            out.append(d)
            taken += len(d.encode("utf-8", "ignore"))
            if taken >= share:
                break
    return out


def train_tokenizer(inputs: Sequence[str], path: str, vocab_size: int, sample_mb: float = 200.0,
                    text_key: str = "text", model_type: str = "bpe") -> str:
    """A sentencepiece tokenizer written to `path`, trained on a sample of `inputs` (sample_documents)."""
    from .tokenizer import Tokenizer
    docs = sample_documents(find_inputs(inputs), int(sample_mb * 1e6), text_key)
    if not docs:
        raise DataError(f"{', '.join(inputs)}: no text to train a tokenizer on")
    print(f"training a {vocab_size}-piece sentencepiece {model_type} tokenizer on {len(docs)} sampled documents "
          f"-> {path}", flush=True)
    try:
        Tokenizer.train(docs, vocab_size, path, model_type=model_type)
    except RuntimeError as e:
        raise DataError(f"cannot train a tokenizer on the sample ({str(e).strip()})") from None
    return path


def prepare(inputs: Sequence[str], out: str, tokenizer: str, workers: int = 0, heldout_fraction: float = 0.01,
            seed: int = 0, text_key: str = "text", unit_bytes: int = 0, progress: bool = True) -> dict:
    """Tokenize `inputs` into shards under `out` (see the module docstring); returns the manifest."""
    if not os.path.isfile(tokenizer):
        raise ConfigError(f"--tokenizer {tokenizer}: no such file (a sentencepiece .model, e.g. a run's "
                          "tokenizer.model)")
    if not 0 <= heldout_fraction < 1:
        raise ConfigError(f"--heldout-fraction {heldout_fraction}: expected a number in [0, 1)")
    tok = _tokenizer(os.path.abspath(tokenizer))
    settings = {"tokenizer_sha256": file_sha256(tokenizer), "heldout_fraction": heldout_fraction, "seed": seed,
                "text_key": text_key}
    paths = find_inputs(inputs)
    units = plan_units(paths, unit_bytes or unit_size(sum(_size(p) for p in paths)))
    os.makedirs(os.path.join(out, "shards"), exist_ok=True)
    records = {u.index: _done(out, u, settings) for u in units}
    todo = [u for u in units if records[u.index] is None]
    workers = min(workers or os.cpu_count() or 1, max(1, len(todo)))
    total = sum(f["bytes"] for u in todo for f in unit_inputs(u))
    meter = _Progress(total, len(units) - len(todo), len(units), progress)
    failed: list[str] = []
    # one process per core, each tokenizing on one thread; a single process lets sentencepiece use every core
    threads = 1 if workers > 1 else -1
    args = (out, os.path.abspath(tokenizer), heldout_fraction, seed, text_key, settings, threads)
    if workers == 1:
        for u in todo:
            try:
                records[u.index] = run_unit(u, *args)
                meter.done(records[u.index])
            except DataError as e:
                failed.append(str(e))
    else:
        with ProcessPoolExecutor(workers) as pool:
            futures = {pool.submit(run_unit, u, *args): u for u in todo}
            for fut in as_completed(futures):
                try:
                    records[futures[fut].index] = fut.result()
                    meter.done(records[futures[fut].index])
                except DataError as e:
                    failed.append(str(e))
    meter.close()
    if failed:
        kept = sum(r is not None for r in records.values())
        raise DataError(f"{len(failed)} of {len(units)} units failed ({kept} done and kept; rerun the same command "
                        f"after fixing or removing the file): " + "; ".join(sorted(failed)))
    manifest = _manifest(out, tokenizer, tok, settings, [records[u.index] for u in units])
    return manifest


def _manifest(out: str, tokenizer: str, tok, settings: dict, records: list) -> dict:
    shards = [{"name": os.path.basename(shard_path(out, r["unit"])) + f".{split}", "split": split, **r["splits"][split]}
              for r in records for split in ("train", "heldout")]
    manifest = {"version": VERSION, "tokenizer": {"path": os.path.abspath(tokenizer), "vocab_size": tok.vocab_size,
                                                  "eos_id": tok.eos_id, "sha256": settings["tokenizer_sha256"]},
                "settings": settings, "inputs": [f for r in records for f in r["files"]], "shards": shards,
                "totals": {split: {"docs": sum(s["docs"] for s in shards if s["split"] == split),
                                   "tokens": sum(s["tokens"] for s in shards if s["split"] == split)}
                           for split in ("train", "heldout")}}
    tmp = os.path.join(out, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(out, MANIFEST))
    return manifest


class _Progress:
    """A line per finished unit on a terminal bar: MB/s, tokens/s and the time left (tqdm when installed)."""

    def __init__(self, total_bytes: int, done: int, units: int, show: bool):
        self.t0, self.bytes, self.tokens, self.units = time.time(), 0, 0, units
        self.bar = None
        if show:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"prepare ({done}/{units} done)")
            except ImportError:
                pass

    def done(self, record: dict) -> None:
        n = sum(f["bytes"] for f in record["files"])
        self.bytes += n
        self.tokens += sum(s["tokens"] for s in record["splits"].values())
        if self.bar is not None:
            dt = max(time.time() - self.t0, 1e-9)
            self.bar.set_postfix_str(f"{self.tokens / dt:,.0f} tokens/s")
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.prepare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", metavar="INPUT", help="files, directories or glob patterns")
    ap.add_argument("--tokenizer", required=True,
                    help="a sentencepiece .model (e.g. a run's tokenizer.model); with --train-tokenizer, where the "
                         "new one is written (kept and reused if it exists)")
    ap.add_argument("--train-tokenizer", type=int, default=0, metavar="VOCAB",
                    help="train a VOCAB-piece tokenizer on a sample of the inputs first")
    ap.add_argument("--tokenizer-sample-mb", type=float, default=200.0,
                    help="text sampled for --train-tokenizer, spread evenly over the input files (default: 200)")
    ap.add_argument("--out", required=True, help="directory of the shards and manifest.json")
    ap.add_argument("--workers", type=int, default=0, help="processes (default: every CPU core)")
    ap.add_argument("--heldout-fraction", type=float, default=0.01, help="documents held out (default: 0.01)")
    ap.add_argument("--seed", type=int, default=0, help="which documents are held out")
    ap.add_argument("--text-key", default="text", help="the text field of .jsonl / column of .parquet / datasets")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = ap.parse_args(argv)
    if args.workers < 0:
        raise ConfigError(f"--workers {args.workers}: expected an integer >= 0 (0: every CPU core)")
    if args.train_tokenizer < 0 or args.tokenizer_sample_mb <= 0:
        raise ConfigError("--train-tokenizer and --tokenizer-sample-mb: expected positive numbers")
    t0 = time.time()
    if args.train_tokenizer and not os.path.isfile(args.tokenizer):
        train_tokenizer(args.inputs, args.tokenizer, args.train_tokenizer, args.tokenizer_sample_mb, args.text_key)
    m = prepare(args.inputs, args.out, args.tokenizer, args.workers, args.heldout_fraction, args.seed, args.text_key,
                progress=sys.stderr.isatty())
    dt = time.time() - t0
    mb = sum(f["bytes"] for f in m["inputs"]) / 1e6
    print(f"{args.out}: {len(m['inputs'])} inputs, {mb:,.1f} MB -> {m['totals']['train']['tokens']:,} train / "
          f"{m['totals']['heldout']['tokens']:,} held-out tokens in {len(m['shards']) // 2} units "
          f"({dt:.1f} s{f', {mb / dt:,.1f} MB/s' if dt > 0 else ''}); train with train.data={args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
