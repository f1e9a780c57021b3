"""Training data: the embedded default corpus or the user's text, the tokenizer and token shards it is
tokenized into (`prepare_data`), and rows packed from them with their document boundaries (`packed_batch`).

Default corpus: English prose that ships with every CPython, so it is available offline on any machine: the
reference documentation topics (`pydoc_data`) and the docstrings of the standard library's modules (tests
excluded). Code blocks, tables and repeated paragraphs are dropped: about 450 documents, 1.3 MB of text on
CPython 3.11 (the exact text follows the Python version).
"""
from __future__ import annotations

import ast
import functools
import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from hybrid.errors import ConfigError, DataError

from .config import TrainConfig
from .tokenizer import Tokenizer


def _prose(text: str) -> str:
    """Keep the prose of a reStructuredText-like page: drop indented code, grammar and table lines and
    heading underlines, and join each paragraph's lines into one line."""
    paragraphs, current = [], []
    for line in text.splitlines():
        stripped = line.strip()
        skip = (line.startswith("   ") or stripped.startswith(("+-", "|", ">>>", "..."))
                or (stripped and set(stripped) <= set("*=-~^+")))
        if not stripped or skip:
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        current.append(stripped)
    if current:
        paragraphs.append(" ".join(current))
    return "\n".join(p for p in paragraphs if len(p.split()) >= 4)


_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "lib2to3", "turtledemo",
              "ensurepip", "pydoc_data"}


def _stdlib_docstrings() -> list[str]:
    """One text per standard-library module: its module, class and function docstrings of >= 12 words."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(f for f in filenames if f.endswith(".py")):
            path = os.path.join(dirpath, name)
            try:
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            docs = [ast.get_docstring(n) for n in ast.walk(tree)
                    if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
            docs = [d for d in docs if d and len(d.split()) >= 12]
            if docs:
                out.append("\n\n".join(docs))
    return out


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple:
    from pydoc_data.topics import topics

    sources = [topics[k] for k in sorted(topics)] + _stdlib_docstrings()
    seen, docs = set(), []
    for text in sources:
        paragraphs = [p for p in _prose(text).splitlines() if p not in seen]
        seen.update(paragraphs)
        if paragraphs:
            docs.append("\n".join(paragraphs))
    return tuple(docs)


def default_corpus() -> list[str]:
    """The embedded corpus as a list of documents (one paragraph per line).

    Sources repeat each other's paragraphs (a pydoc topic often contains its subsections, docstrings share
    boilerplate); each paragraph is kept only at its first occurrence, so a held-out document shares no
    paragraph with training."""
    return list(_corpus())


def split_documents(docs: Sequence[str], heldout_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic document-level train / held-out split (at least one document each). A corpus of one
    document (a single text file) is cut at the line nearest (1 - heldout_fraction) of its length instead."""
    if len(docs) == 1:
        return _split_one(docs[0], heldout_fraction)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(docs))
    n_held = max(1, int(round(len(docs) * heldout_fraction)))
    held = sorted(order[:n_held].tolist())
    train = sorted(order[n_held:].tolist())
    return [docs[i] for i in train], [docs[i] for i in held]


def _split_one(text: str, heldout_fraction: float) -> tuple[list[str], list[str]]:
    cut = int(len(text) * (1 - heldout_fraction))
    at = text.rfind("\n", 0, cut)
    if at <= 0:
        at = text.rfind(" ", 0, cut)
    if at <= 0:
        raise DataError(f"the corpus is one document of {len(text)} characters: too short to hold out "
                        f"{heldout_fraction:.0%} of it; give more text")
    return [text[:at]], [text[at + 1:]]


@dataclass
class TokenStream:
    """All documents concatenated, each followed by EOS. `starts[d]` is the offset of document d's first token.

    Tokens are an in-memory array or a read-only np.memmap of a shard written by `save` (uint16 when the
    vocabulary fits, else uint32): a corpus larger than RAM is read only where batches are cut.
    """
    tokens: np.ndarray   # (n_tokens,) integer
    starts: np.ndarray   # (n_docs,) int64, increasing, starts[0] == 0

    @classmethod
    def from_docs(cls, token_docs: Sequence[Sequence[int]], eos_id: int) -> "TokenStream":
        toks = [np.asarray(list(d) + [eos_id], dtype=np.int32) for d in token_docs]
        lengths = np.array([len(t) for t in toks], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        return cls(np.concatenate(toks) if toks else np.zeros(0, np.int32), starts)

    def __len__(self) -> int:
        return len(self.tokens)

    def doc_of(self, idx: np.ndarray) -> np.ndarray:
        """Document index of each token offset in `idx` (any shape)."""
        return (np.searchsorted(self.starts, idx, side="right") - 1).astype(np.int64)

    def save(self, path: str, vocab_size: int) -> None:
        """Write `path`.bin (tokens) and `path`.starts.npy, each to a temporary name first, then renamed."""
        dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        np.asarray(self.tokens, dtype=dtype).tofile(tmp + ".bin")
        np.save(tmp + ".starts.npy", np.asarray(self.starts, dtype=np.int64))
        os.replace(tmp + ".starts.npy", path + ".starts.npy")
        os.replace(tmp + ".bin", path + ".bin")  # last: the .bin's presence marks a complete shard

    @classmethod
    def load(cls, path: str, vocab_size: int) -> "TokenStream":
        dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
        if os.path.getsize(path + ".bin") == 0:  # an empty shard (a unit with no held-out document): no mmap
            return cls(np.zeros(0, dtype=dtype), np.load(path + ".starts.npy"))
        return cls(np.memmap(path + ".bin", dtype=dtype, mode="r"), np.load(path + ".starts.npy"))

    @staticmethod
    def exists(path: str) -> bool:
        return os.path.exists(path + ".bin") and os.path.exists(path + ".starts.npy")


class _ConcatTokens:
    """The tokens of several shards read as one array by integer-array indexing (what packed_batch does)."""

    def __init__(self, shards: Sequence[TokenStream], offsets: np.ndarray):
        self.shards, self.offsets = shards, offsets

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, idx) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        which = np.searchsorted(self.offsets, idx, side="right") - 1  # shard of each offset
        out = np.empty(idx.shape, dtype=np.int64)
        for w in np.unique(which):
            sel = which == w
            out[sel] = self.shards[w].tokens[idx[sel] - self.offsets[w]]
        return out


class ShardedStream:
    """Shards of a prepared corpus (training/prepare.py) read as one TokenStream: offsets run across shards,
    documents never span two of them, tokens stay memory-mapped in their files."""

    def __init__(self, shards: Sequence[TokenStream]):
        shards = [sh for sh in shards if len(sh)]
        offsets = np.concatenate([[0], np.cumsum([len(sh) for sh in shards])]).astype(np.int64)
        self.tokens = _ConcatTokens(shards, offsets)
        self.starts = (np.concatenate([sh.starts + off for sh, off in zip(shards, offsets)])
                       if shards else np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.tokens)

    def doc_of(self, idx: np.ndarray) -> np.ndarray:
        return (np.searchsorted(self.starts, idx, side="right") - 1).astype(np.int64)


def read_prepared(path: str, key: str = "train.data") -> tuple[dict, "ShardedStream", "ShardedStream"]:
    """(manifest, train, held-out) of a corpus prepared by `python -m training.prepare` into `path`. Raises
    DataError naming what is missing or inconsistent."""
    import json
    from .prepare import MANIFEST
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{key}={path}: {MANIFEST} cannot be read ({e}); prepare it again") from None
    vocab = manifest["tokenizer"]["vocab_size"]
    streams = {}
    for split in ("train", "heldout"):
        shards = []
        for sh in manifest["shards"]:
            if sh["split"] != split:
                continue
            base = os.path.join(path, "shards", sh["name"])
            if not TokenStream.exists(base):
                raise DataError(f"{key}={path}: shard {sh['name']} listed in {MANIFEST} is missing")
            stream = TokenStream.load(base, vocab)
            if len(stream) != sh["tokens"]:
                raise DataError(f"{key}={path}: shard {sh['name']} holds {len(stream)} tokens, {MANIFEST} says "
                                f"{sh['tokens']}: prepare it again")
            shards.append(stream)
        streams[split] = ShardedStream(shards)
    return manifest, streams["train"], streams["heldout"]


def packed_batch(stream: TokenStream, starts: np.ndarray, seq_len: int, ignore_index: int = -100):
    """Rows of seq_len tokens cut from the stream at `starts`, packed across document boundaries.

    Returns input_ids (batch, seq_len) int64, targets (batch, seq_len) int64 with ignore_index where the next
    token belongs to another document, and seq_idx (batch, seq_len) int32 document ids (renumbered from 0 per
    row) so that Mamba state resets and attention is masked at each boundary.
    """
    idx = starts[:, None] + np.arange(seq_len + 1)[None]          # (batch, seq_len + 1)
    toks = np.asarray(stream.tokens[idx], dtype=np.int64)
    doc = stream.doc_of(idx)
    targets = np.where(doc[:, 1:] == doc[:, :-1], toks[:, 1:], ignore_index)
    seq_idx = (doc[:, :-1] - doc[:, :1]).astype(np.int32)
    import torch  # here, not at the top: `python -m training.prepare` reads this module and needs no torch
    return torch.from_numpy(toks[:, :-1]), torch.from_numpy(targets), torch.from_numpy(seq_idx)


def random_starts(stream: TokenStream, batch: int, seq_len: int, rng: np.random.Generator) -> np.ndarray:
    if len(stream) <= seq_len + 1:
        raise DataError(f"the training split has {len(stream)} tokens, too few for train.seq_len={seq_len}: "
                        "use more text or a shorter train.seq_len")
    return rng.integers(0, len(stream) - seq_len - 1, size=batch)


class EpochSampler:
    """Rows as windows of seq_len + 1 tokens at stride seq_len, shuffled once per epoch (seed, epoch), every
    window once per epoch. The windows are numbered globally in the order they are consumed: a step takes the
    next world x rows of them, rank r the r-th run of `rows`, so ranks read disjoint windows and the position
    follows from the tokens trained so far (an exact resume, also on another number of ranks)."""

    def __init__(self, stream, seq_len: int, seed: int):
        self.seq_len, self.seed = seq_len, seed
        self.n = (len(stream) - 1) // seq_len
        if self.n < 1:
            raise DataError(f"the training split has {len(stream)} tokens, too few for train.seq_len={seq_len}")
        self._perm: dict = {}

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perm[epoch]

    def starts(self, first: int, count: int) -> np.ndarray:
        """Token offsets of windows first .. first + count - 1 of the global order."""
        idx = np.arange(first, first + count, dtype=np.int64)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(idx // self.n):
            sel = idx // self.n == epoch
            out[sel] = self.order(int(epoch))[idx[sel] % self.n] * self.seq_len
        return out


TEXT_SUFFIXES = (".txt", ".md", ".jsonl")


def load_texts(path: str, key: str = "train.data") -> list[str]:
    """Documents from your own corpus: a .jsonl file (one {"text": ...} per line), a text file (one document),
    or a directory (every .txt / .md / .jsonl file under it, in sorted order). Empty documents are dropped.

    Raises DataError naming `key`, the file and (for .jsonl) the line when the path is missing, unreadable,
    not UTF-8, not JSON where JSON is expected, or holds no text at all."""
    if os.path.isdir(path):
        docs: list[str] = []
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                if name.endswith(TEXT_SUFFIXES):
                    docs += _read_file(os.path.join(root, name), key)
        if not docs:
            raise DataError(f"{key}={path}: no text in this directory (read .txt, .md and .jsonl files under it)")
        return docs
    if not os.path.exists(path):
        raise DataError(f"{key}={path}: no such file or directory")
    docs = _read_file(path, key)
    if not docs:
        raise DataError(f"{key}={path}: the file holds no text")
    return docs


def _read_file(path: str, key: str) -> list[str]:
    import json
    try:
        with open(path, encoding="utf-8") as f:
            if not path.endswith(".jsonl"):
                text = f.read()
                return [text] if text.strip() else []
            docs = []
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line.strip())
                except json.JSONDecodeError as e:
                    raise DataError(f"{key}: {path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise DataError(f"{key}: {path}:{n}: expected a JSON object with a string 'text' field")
                if row["text"].strip():
                    docs.append(row["text"])
            return docs
    except UnicodeDecodeError as e:
        raise DataError(f"{key}: {path}: not UTF-8 text (byte {e.start}); convert it or leave it out") from None
    except OSError as e:
        raise DataError(f"{key}: {path}: cannot be read ({e.strerror})") from None


def prepare_data(cfg: TrainConfig, vocab_size: int, out_dir: str, rank: int):
    """Tokenizer (trained on the training split when none is given) and memory-mapped train / held-out token
    shards under <out_dir>/data, built once by rank 0 and reused while corpus and tokenizer are unchanged.
    train.data naming a directory prepared by `python -m training.prepare` is read as it is (its tokenizer)."""
    if cfg.data and os.path.isfile(os.path.join(cfg.data, "manifest.json")):
        return _prepared(cfg)
    from .distributed import barrier
    docs = load_texts(cfg.data) if cfg.data else default_corpus()
    docs_train, docs_held = split_documents(docs, cfg.heldout_fraction, cfg.seed)
    tok_path = cfg.tokenizer or os.path.join(out_dir, "tokenizer.model")
    if cfg.tokenizer is not None and not os.path.isfile(cfg.tokenizer):
        raise ConfigError(f"train.tokenizer={cfg.tokenizer}: no such file (a sentencepiece .model; leave it unset "
                          "to train one)")
    if rank == 0 and cfg.tokenizer is None and not os.path.exists(tok_path):
        print(f"training a {vocab_size}-piece sentencepiece {cfg.tokenizer_type} tokenizer -> {tok_path}", flush=True)
        os.makedirs(out_dir, exist_ok=True)
        try:
            Tokenizer.train(docs_train, vocab_size, tok_path, model_type=cfg.tokenizer_type)
        except RuntimeError as e:  # sentencepiece reports a corpus it cannot learn from as RuntimeError
            raise DataError(f"{'train.data=' + cfg.data if cfg.data else 'the corpus'}: cannot train a tokenizer on "
                            f"it ({str(e).strip()})") from None
    barrier()
    tok = Tokenizer(tok_path)
    with open(tok_path, "rb") as f:
        key = hashlib.sha256(f.read() + repr((cfg.data, cfg.heldout_fraction, cfg.seed, len(docs))).encode())
    key.update("\0".join(docs[:64]).encode())
    data_dir = os.path.join(out_dir, "data", key.hexdigest()[:12])
    streams = {}
    for split, split_docs in (("train", docs_train), ("heldout", docs_held)):
        path = os.path.join(data_dir, split)
        if rank == 0 and not TokenStream.exists(path):
            TokenStream.from_docs(_encode(tok, split_docs, split), tok.eos_id).save(path, tok.vocab_size)
        barrier()
        streams[split] = TokenStream.load(path, tok.vocab_size)
    return tok, tok_path, streams["train"], streams["heldout"]


def _prepared(cfg: TrainConfig):
    manifest, train, held = read_prepared(cfg.data)
    tok_path = manifest["tokenizer"]["path"]
    if cfg.tokenizer is not None and os.path.abspath(cfg.tokenizer) != tok_path:
        from .hashing import file_sha256
        if file_sha256(cfg.tokenizer) != manifest["tokenizer"]["sha256"]:
            raise ConfigError(f"train.tokenizer={cfg.tokenizer} is not the tokenizer train.data={cfg.data} was "
                              f"prepared with ({tok_path}); leave train.tokenizer unset")
        tok_path = cfg.tokenizer
    if not os.path.isfile(tok_path):
        raise DataError(f"train.data={cfg.data}: its tokenizer {tok_path} is gone; pass it as train.tokenizer=...")
    if len(held) < 2:
        raise DataError(f"train.data={cfg.data}: no held-out tokens (prepare it with --heldout-fraction > 0)")
    return Tokenizer(tok_path), tok_path, train, held


def _encode(tok: Tokenizer, docs: list[str], split: str) -> list[list[int]]:
    try:
        from tqdm import tqdm
    except ImportError:
        return tok.encode_batch(docs)
    batch = 64
    out: list[list[int]] = []
    for i in tqdm(range(0, len(docs), batch), desc=f"tokenizing {split}", unit_scale=batch, unit="doc",
                  disable=not sys.stderr.isatty()):
        out += tok.encode_batch(docs[i:i + batch])
    return out
