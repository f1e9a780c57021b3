"""sha256 of files, byte ranges and directories (data manifests, checkpoints, tokenizers): a module of its own so
that the training loop's imports never load the data preparation command (`python -m training.prepare`)."""
from __future__ import annotations

import hashlib
import os


def file_sha256(path: str) -> str:
    if os.path.isdir(path):  # a datasets directory: the hash of its files' names, sizes and contents
        h = hashlib.sha256()
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(root, name)
                h.update(os.path.relpath(full, path).encode())
                h.update(bytes.fromhex(file_sha256(full)))
        return h.hexdigest()
    return range_sha256(path, 0, os.path.getsize(path))


def range_sha256(path: str, start: int, end: int) -> str:
    """sha256 of bytes [start, end) of a file (the whole file: 0, its size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start
        while left > 0:
            block = f.read(min(left, 1 << 20))
            if not block:
                break
            h.update(block)
            left -= len(block)
    return h.hexdigest()
